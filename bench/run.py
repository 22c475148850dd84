"""`make bench`: hpcstage against its peers on the same served repos, in the same run, on this machine.

    .venv/bin/python bench/run.py [--rounds 3] [--only big,wan,small,mixed,warm,verify] [--size-mb 1024]

Generates its repos once under bench/work/hub, serves them with `hpcstage serve` in its own process on
127.0.0.1, warms the server's hash memo, then runs every tool of a scenario once per round, in an order that
rotates each round (ABC BCA CAB ...), each into a fresh cache folder deleted before and after (outside the
timed region). Prints the table with the targets of issues #3 and #18 marked PASS/FAIL and writes bench/results.md.
"""
from __future__ import annotations

import argparse
import datetime as dt
import os
import platform
import shutil
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from hpcstage.transfer.concurrency import START  # noqa: E402
from common import (  # noqa: E402
    BENCH, HUB, MANY_FILES, SMALL_FILES, SMALL_SIZE, VENV_BIN, WORK, Run, Server, big_repo, clean_env,
    make_big, make_many, make_mixed, make_small, many_repo, mixed_repo, python, rmtree, run_timed, small_repo,
)

SCENARIOS = ("big", "wan", "small", "mixed", "warm", "verify", "many")  # many last: it leaves 100,000s of freed inodes
WAN_RATE_MB, WAN_LATENCY_MS = 40.0, 30.0  # the wan scenario's link: each connection capped, each answer late
RUNS = WORK / "runs"
HPCSTAGE = str(VENV_BIN / "hpcstage")
HF = str(VENV_BIN / "hf")


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


@dataclass
class Result:
    scenario: str
    tool: str
    runs: list[Run] = field(default_factory=list)
    requests: list[int] = field(default_factory=list)
    server_cpu: list[float] = field(default_factory=list)
    streams: list[int] = field(default_factory=list)  # the most CDN requests at once, per round
    settled: list[str] = field(default_factory=list)  # hpcstage -v: its stream counts, per round
    failures: list[str] = field(default_factory=list)
    note: str = ""

    @property
    def ok(self) -> bool:
        return bool(self.runs) and not self.failures

    @property
    def seconds(self) -> float:
        return statistics.median(r.seconds for r in self.runs)

    @property
    def cpu(self) -> float:
        return statistics.median(r.cpu for r in self.runs)

    @property
    def rss(self) -> float:
        return statistics.median(r.rss_mb for r in self.runs)

    @property
    def rss_max(self) -> float:
        return max(r.rss_mb for r in self.runs)


@dataclass
class Tool:
    name: str
    cmd: list[str]
    check: callable  # (dest folder) -> error text or None
    env: dict | None = None
    dest: Path | None = None  # set per run


def _snapshot_check(repo_id: str, files: dict[str, int]):
    """The repo's snapshot holds every file with its size (both tools hash what they download themselves)."""

    def check(dest: Path) -> str | None:
        snaps = list((dest / f"models--{repo_id.replace('/', '--')}" / "snapshots").glob("*"))
        if len(snaps) != 1:
            return f"expected one snapshot under {dest}, found {len(snaps)}"
        bad = [p for p, size in files.items() if not (snaps[0] / p).is_file() or (snaps[0] / p).stat().st_size != size]
        return f"{len(bad)} files missing or wrong size, e.g. {bad[0]}" if bad else None

    return check


def _file_check(name: str, size: int):
    def check(dest: Path) -> str | None:
        p = dest / name
        return None if p.is_file() and p.stat().st_size == size else f"{p} missing or not {size} bytes"

    return check


def _repo_files(root: Path) -> dict[str, int]:
    return {p.relative_to(root).as_posix(): p.stat().st_size for p in root.rglob("*") if p.is_file()}


class Bench:
    def __init__(self, args: argparse.Namespace, server: Server):
        self.args, self.server = args, server
        self.env = clean_env(HF_ENDPOINT=server.url)
        self.results: list[Result] = []
        self.notes: list[str] = []

    def measure(self, scenario: str, tools: list[Tool], rounds: int, keep: bool = False) -> list[Result]:
        """`keep`: leave each run's folder until the scenario ends instead of deleting it after the run. ext4
        skips inodes freed in the last minutes when it allocates new ones (`recently_deleted()` in
        ialloc.c), so deleting 2,000+ files makes the next run's creates scan past them: `perf` showed 20%
        of a small-file pull in `recently_deleted`, and system time grew run after run (0.7 -> 4.4 s) until
        the folders were kept (0.6-0.8 s). Not kept for the big file: one inode, and freeing its 1 GiB of
        page cache right away is what the buffered writers (curl, hf) have always had here."""
        results = {t.name: Result(scenario, t.name) for t in tools}
        kept: list[Path] = []
        for rnd in range(rounds):
            k = rnd % len(tools)
            for tool in tools[k:] + tools[:k]:  # rotate: no tool always first or always after the same one
                res = results[tool.name]
                if res.failures:
                    continue
                dest = self.args.runs_dir / f"{scenario}-{tool.name}-{rnd}".replace(" ", "_")
                rmtree(dest)
                dest.mkdir(parents=True)
                cmd = [a.replace("{dest}", str(dest)) for a in tool.cmd]
                offset, scpu = self.server.log_offset(), self.server.cpu_seconds()
                run = run_timed(cmd, env=tool.env or self.env, cwd=WORK)
                records = self.server.requests_since(offset, settle=0.15)
                reqs = len(records)
                scpu = self.server.cpu_seconds() - scpu
                error = f"exit {run.rc}: {run.output.strip()[-300:]}" if run.rc else tool.check(dest)
                if keep:
                    kept.append(dest)
                else:
                    rmtree(dest)
                if error:
                    res.failures.append(error)
                    log(f"{scenario} {tool.name}: FAILED {error}")
                    continue
                res.runs.append(run)
                res.requests.append(reqs)
                res.server_cpu.append(scpu)
                res.streams.append(peak_streams(records))
                counts = stream_counts(run.output) if "-v" in tool.cmd else ""
                if counts:
                    res.settled.append(counts)
                log(f"{scenario} round {rnd + 1} {tool.name}: {run.seconds:.2f}s cpu {run.user:.2f}u+{run.sys:.2f}s "
                    f"rss {run.rss_mb:.0f}MB {reqs} requests, at most {res.streams[-1]} CDN requests at once"
                    + (f"; streams {counts}" if counts else ""))
        for dest in kept:
            rmtree(dest)
        out = list(results.values())
        self.results.extend(out)
        return out

    # -- scenarios ---------------------------------------------------------------------------------------

    def big(self) -> None:
        size = self.args.size_mb << 20
        repo = big_repo(self.args.size_mb)
        url = f"{self.server.url}/{repo}/resolve/main/model.safetensors"
        check = _snapshot_check(repo, {"model.safetensors": size})
        tools = [
            Tool("hpcstage", [HPCSTAGE, "pull", repo, "--cache-dir", "{dest}", "-q", "-v"], check),
            Tool("hf download", [HF, "download", repo, "--cache-dir", "{dest}", "-q"], check),
            Tool("curl", ["curl", "-sS", "-f", "-L", "-o", "{dest}/model.safetensors", url],
                 _file_check("model.safetensors", size)),
        ]
        if shutil.which("aria2c"):
            tools.append(Tool("aria2c -x8 -s8", [
                "aria2c", "-x8", "-s8", "-q", "-d", "{dest}", "-o", "model.safetensors", "--file-allocation=falloc",
                "--allow-overwrite=true", "--auto-file-renaming=false", "--summary-interval=0", url,
            ], _file_check("model.safetensors", size)))
        else:
            self.notes.append("aria2c is not installed: its row is skipped (apt-get install aria2 to add it).")
            log("aria2c not installed: skipped")
        self.measure("big", tools, self.args.rounds)

    def wan(self) -> None:
        """The big file over a link that caps each connection (WAN_RATE_MB per connection, WAN_LATENCY_MS before
        every answer: a CDN's per-connection cap, one TCP stream over a long path), from its own server. The
        tools that open more streams go faster; hpcstage's count adapts (issue #18)."""
        if not shutil.which("aria2c"):
            raise SystemExit("the wan scenario compares against aria2c -x16 -s16: install it (apt-get install -y "
                             "aria2; `make bench` does as root) or leave wan out (--only big,small,...)")
        size = self.args.size_mb << 20
        repo = big_repo(self.args.size_mb)
        check = _snapshot_check(repo, {"model.safetensors": size})
        main = self.server
        with Server(HUB, WORK / "server-wan.jsonl", latency_ms=WAN_LATENCY_MS, conn_rate_mb=WAN_RATE_MB) as server:
            server.warm(repo)
            url = f"{server.url}/{repo}/resolve/main/model.safetensors"
            self.server, self.env = server, clean_env(HF_ENDPOINT=server.url)
            try:
                self.measure("wan", [
                    Tool("hpcstage", [HPCSTAGE, "pull", repo, "--cache-dir", "{dest}", "-q", "-v"], check),
                    Tool("hf download", [HF, "download", repo, "--cache-dir", "{dest}", "-q"], check),
                    Tool("aria2c -x16 -s16", [
                        "aria2c", "-x16", "-s16", "-q", "-d", "{dest}", "-o", "model.safetensors",
                        "--file-allocation=falloc", "--allow-overwrite=true", "--auto-file-renaming=false",
                        "--summary-interval=0", url,
                    ], _file_check("model.safetensors", size)),
                ], self.args.rounds)
            finally:
                self.server, self.env = main, clean_env(HF_ENDPOINT=main.url)
        self.notes.append(f"wan: every connection capped at {WAN_RATE_MB:.0f} MB/s and every answer (hub and CDN) "
                          f"{WAN_LATENCY_MS:.0f} ms late (`hpcstage serve --conn-rate-mb {WAN_RATE_MB:.0f} "
                          f"--latency-ms {WAN_LATENCY_MS:.0f}`): not a network emulation, loopback's bandwidth and "
                          "the same 2 cores carry every stream.")

    def small(self) -> None:
        repo = small_repo()
        check = _snapshot_check(repo, _repo_files(HUB / "models" / repo))
        settled = wait_for_settled_inodes(self.args.runs_dir)
        if settled:
            self.notes.append(settled)
        self.measure("small", [
            Tool("hpcstage", [HPCSTAGE, "pull", repo, "--cache-dir", "{dest}", "-q"], check),
            Tool("hf download", [HF, "download", repo, "--cache-dir", "{dest}", "-q"], check),
        ], self.args.rounds, keep=True)

    def mixed(self) -> None:
        repo = mixed_repo(self.args.size_mb)
        check = _snapshot_check(repo, _repo_files(HUB / "models" / repo))
        self.measure("mixed", [
            Tool("hpcstage", [HPCSTAGE, "pull", repo, "--cache-dir", "{dest}", "-q"], check),
            Tool("hf download", [HF, "download", repo, "--cache-dir", "{dest}", "-q"], check),
        ], self.args.rounds)

    def warm(self) -> None:
        """Re-pull of the already-staged 2,000-file repo: hpcstage from its lockfile, hf from its cache."""
        repo = small_repo()
        files = _repo_files(HUB / "models" / repo)
        folder = self.args.runs_dir / "warm"
        rmtree(folder)
        folder.mkdir(parents=True)
        manifest = folder / "hpcstage.yaml"
        manifest.write_text(f"models:\n  - repo: {repo}\n")
        hpc_cache, hf_cache = folder / "hpcstage-cache", folder / "hf-cache"
        log("warm: staging the 2,000-file repo once with each tool (untimed)")
        for cmd in ([HPCSTAGE, "pull", "-f", str(manifest), "--cache-dir", str(hpc_cache), "-q"],
                    [HF, "download", repo, "--cache-dir", str(hf_cache), "-q"]):
            r = run_timed(cmd, env=self.env, cwd=folder)
            if r.rc:
                raise SystemExit(f"warm set-up failed: {' '.join(cmd)}: {r.output[-500:]}")
        if not (folder / "hpcstage.lock").exists():
            raise SystemExit("warm set-up: hpcstage pull -f did not write hpcstage.lock")
        results = {n: Result("warm", n) for n in ("hpcstage -f (lock)", "hf download (cached)", "python import floor")}
        cmds = {
            "hpcstage -f (lock)": [HPCSTAGE, "pull", "-f", str(manifest), "--cache-dir", str(hpc_cache), "-q"],
            "hf download (cached)": [HF, "download", repo, "--cache-dir", str(hf_cache), "-q"],
            # not a tool: what starting the CLI costs before any work (interpreter + hpcstage's imports)
            "python import floor": [python(), "-c", "import hpcstage.cli, hpcstage.staging, hpcstage.manifest"],
        }
        checks = {"hpcstage -f (lock)": _snapshot_check(repo, files), "hf download (cached)": _snapshot_check(repo, files)}
        dests = {"hpcstage -f (lock)": hpc_cache, "hf download (cached)": hf_cache}
        names = list(cmds)
        for rnd in range(self.args.rounds):
            k = rnd % len(names)
            for name in names[k:] + names[:k]:
                offset, scpu = self.server.log_offset(), self.server.cpu_seconds()
                run = run_timed(cmds[name], env=self.env, cwd=folder)
                reqs = len(self.server.requests_since(offset, settle=0.15))
                scpu = self.server.cpu_seconds() - scpu
                error = f"exit {run.rc}: {run.output.strip()[-300:]}" if run.rc else (
                    checks[name](dests[name]) if name in checks else None)
                if error:
                    results[name].failures.append(error)
                    log(f"warm {name}: FAILED {error}")
                    continue
                results[name].runs.append(run)
                results[name].requests.append(reqs)
                results[name].server_cpu.append(scpu)
                log(f"warm round {rnd + 1} {name}: {run.seconds:.3f}s {reqs} requests")
        results["python import floor"].note = "interpreter start + `import hpcstage.cli, .staging, .manifest`"
        self.results.extend(results.values())
        rmtree(folder)


    def verify(self) -> None:
        """Offline verify of the staged big file (hashing from the page cache) against sha256sum of the blob."""
        repo = big_repo(self.args.size_mb)
        folder = self.args.runs_dir / "verify"
        rmtree(folder)
        folder.mkdir(parents=True)
        cache = folder / "cache"
        r = run_timed([HPCSTAGE, "pull", repo, "--cache-dir", str(cache), "-q"], env=self.env, cwd=folder)
        if r.rc:
            raise SystemExit(f"verify set-up failed: {r.output[-500:]}")
        blob = next((cache).glob("*/blobs/*"))
        cmds = {
            "hpcstage verify": [HPCSTAGE, "verify", repo, "--cache-dir", str(cache), "-q"],
            "sha256sum": ["sha256sum", str(blob)],
        }
        if shutil.which("openssl"):
            cmds["openssl dgst -sha256"] = ["openssl", "dgst", "-sha256", str(blob)]
        results = {n: Result("verify", n) for n in cmds}
        names = list(cmds)
        for rnd in range(self.args.rounds):
            k = rnd % len(names)
            for name in names[k:] + names[:k]:
                run = run_timed(cmds[name], env=self.env, cwd=folder)
                if run.rc:
                    results[name].failures.append(f"exit {run.rc}: {run.output.strip()[-300:]}")
                    continue
                results[name].runs.append(run)
                results[name].requests.append(0)
                results[name].server_cpu.append(0.0)
                log(f"verify round {rnd + 1} {name}: {run.seconds:.3f}s cpu {run.cpu:.2f}s")
        self.results.extend(results.values())
        rmtree(folder)

    def many(self) -> None:
        """Scale: 2,000 and 20,000 files of 1 KiB. Per repo: pulls into fresh folders (kept until the end, as
        for `small`), then on one staged copy the warm pull from the lockfile, `verify`, `status -f`, and
        `find | xargs sha1sum` over the repo's blobs (the floor verify is held to)."""
        settled = wait_for_settled_inodes(self.args.runs_dir)
        if settled:
            self.notes.append(settled.replace("small-file scenario", "scale scenario"))
        for files in MANY_FILES:
            repo = many_repo(files)
            scenario = f"many-{files}"
            check = _snapshot_check(repo, _repo_files(HUB / "models" / repo))
            pulls = self.measure(scenario, [Tool("hpcstage pull", [HPCSTAGE, "pull", repo, "--cache-dir", "{dest}", "-q"],
                                                 check)], self.args.rounds, keep=True)
            folder = self.args.runs_dir / f"{scenario}-staged"
            rmtree(folder)
            folder.mkdir(parents=True)
            manifest, cache = folder / "hpcstage.yaml", folder / "cache"
            manifest.write_text(f"cache_dir: cache\nmodels:\n  - repo: {repo}\n")
            r = run_timed([HPCSTAGE, "pull", "-f", str(manifest), "-q"], env=self.env, cwd=folder)
            if r.rc:
                raise SystemExit(f"{scenario} set-up failed: {r.output[-500:]}")
            blobs = cache / f"models--{repo.replace('/', '--')}" / "blobs"
            cmds = {
                "hpcstage -f (lock)": [HPCSTAGE, "pull", "-f", str(manifest), "-q"],
                "hpcstage verify": [HPCSTAGE, "verify", repo, "--cache-dir", str(cache), "-q"],
                "hpcstage status -f": [HPCSTAGE, "status", "-f", str(manifest)],
                "find | xargs sha1sum": ["sh", "-c", f"find '{blobs}' -type f -print0 | xargs -0 sha1sum >/dev/null"],
            }
            results = {n: Result(scenario, n) for n in cmds}
            names = list(cmds)
            for rnd in range(self.args.rounds):
                k = rnd % len(names)
                for name in names[k:] + names[:k]:
                    offset = self.server.log_offset()
                    run = run_timed(cmds[name], env=self.env, cwd=folder)
                    reqs = len(self.server.requests_since(offset, settle=0.15)) if name.startswith("hpcstage -f") else 0
                    if run.rc:
                        results[name].failures.append(f"exit {run.rc}: {run.output.strip()[-300:]}")
                        log(f"{scenario} {name}: FAILED {results[name].failures[-1]}")
                        continue
                    results[name].runs.append(run)
                    results[name].requests.append(reqs)
                    results[name].server_cpu.append(0.0)
                    log(f"{scenario} round {rnd + 1} {name}: {run.seconds:.3f}s cpu {run.cpu:.2f}s rss {run.rss_mb:.0f}MB")
            self.results.extend(results.values())  # after the pulls `measure` recorded
            if pulls[0].ok:
                log(f"{scenario}: pull {pulls[0].seconds / files * 1e3:.3f} ms per file")


# -- report ------------------------------------------------------------------------------------------------


def _find(results: list[Result], scenario: str, tool: str) -> Result | None:
    r = next((r for r in results if r.scenario == scenario and r.tool == tool), None)
    return r if r and r.ok else None


def targets(results: list[Result], size_mb: int) -> list[tuple[str, str, str]]:
    """(target, measured, PASS/FAIL) for each target of issue #3 (stated for 1 GiB; --size-mb changes the file)."""
    out = []
    big = "1 GiB file" if size_mb == 1024 else f"{size_mb} MiB file (target stated for 1 GiB)"
    hpc, hf, curl = (_find(results, "big", t) for t in ("hpcstage", "hf download", "curl"))
    if hpc and hf:
        x = hf.seconds / hpc.seconds
        out.append((f"{big}: hpcstage >= 3x faster than hf download", f"{x:.2f}x", "PASS" if x >= 3 else "FAIL"))
    if hpc and curl:
        x = curl.seconds / hpc.seconds
        out.append((f"{big}: hpcstage >= 0.9x curl's speed", f"{x:.2f}x", "PASS" if x >= 0.9 else "FAIL"))
    if hpc:
        out.append((f"{big}: hpcstage peak RSS <= 200 MB (worst round)", f"{hpc.rss_max:.0f} MB",
                    "PASS" if hpc.rss_max <= 200 else "FAIL"))
    hpc, hf, aria = (_find(results, "wan", t) for t in ("hpcstage", "hf download", "aria2c -x16 -s16"))
    wan = f"wan ({WAN_RATE_MB:.0f} MB/s per connection, {WAN_LATENCY_MS:.0f} ms)"
    if hpc and hf:
        x = hf.seconds / hpc.seconds
        out.append((f"{wan}: hpcstage >= 6x faster than hf download", f"{x:.2f}x", "PASS" if x >= 6 else "FAIL"))
    if hpc and aria:
        x = aria.seconds / hpc.seconds
        out.append((f"{wan}: hpcstage >= 0.9x aria2c -x16 -s16's speed", f"{x:.2f}x", "PASS" if x >= 0.9 else "FAIL"))
    if hpc:
        out.append((f"{wan}: hpcstage peak RSS <= 200 MB (worst round)", f"{hpc.rss_max:.0f} MB",
                    "PASS" if hpc.rss_max <= 200 else "FAIL"))
    hpc, hf = _find(results, "small", "hpcstage"), _find(results, "small", "hf download")
    if hpc and hf:
        x = hf.seconds / hpc.seconds
        out.append(("2,000 x 20 KB: hpcstage >= 5x faster than hf download", f"{x:.2f}x", "PASS" if x >= 5 else "FAIL"))
    warm = _find(results, "warm", "hpcstage -f (lock)")
    if warm:
        n = max(warm.requests)
        out.append(("warm re-pull (lockfile): 0 requests", f"{n} (worst round)", "PASS" if n == 0 else "FAIL"))
        out.append(("warm re-pull (lockfile): <= 0.3 s", f"{warm.seconds:.3f} s", "PASS" if warm.seconds <= 0.3 else "FAIL"))
    ver, ref = _find(results, "verify", "hpcstage verify"), _find(results, "verify", "sha256sum")
    if ver and ref and ver.ok and ref.ok:  # issue #5: per core used, close to sha256sum
        x = ref.cpu / max(ver.cpu, 1e-9)  # the same bytes hashed: CPU seconds compare throughput per core
        out.append(("verify: hash throughput per CPU second >= 0.8x sha256sum's", f"{x:.2f}x", "PASS" if x >= 0.8 else "FAIL"))
    small_pull, many_pull = (_find(results, f"many-{n}", "hpcstage pull") for n in MANY_FILES)
    if small_pull and many_pull:  # per file, each at its median
        x = (many_pull.seconds / MANY_FILES[1]) / (small_pull.seconds / MANY_FILES[0])
        out.append((f"{MANY_FILES[1]:,} x 1 KB: pull per file <= 1.3x per file at {MANY_FILES[0]:,}", f"{x:.2f}x",
                    "PASS" if x <= 1.3 else "FAIL"))
    ver, floor = (_find(results, f"many-{MANY_FILES[1]}", t) for t in ("hpcstage verify", "find | xargs sha1sum"))
    if ver and floor:
        x = ver.seconds / floor.seconds
        out.append((f"{MANY_FILES[1]:,} x 1 KB: verify <= 4x a `find | xargs sha1sum` pass", f"{x:.2f}x",
                    "PASS" if x <= 4 else "FAIL"))
    warm = _find(results, f"many-{MANY_FILES[1]}", "hpcstage -f (lock)")
    if warm:
        n = max(warm.requests)
        out.append((f"{MANY_FILES[1]:,} x 1 KB: warm re-pull (lockfile): 0 requests", f"{n} (worst round)",
                    "PASS" if n == 0 else "FAIL"))
    for r in results:
        if r.failures and r.tool.startswith("hpcstage"):
            out.append((f"{r.scenario}: hpcstage completes", r.failures[0][:80], "FAIL"))
    return out


def _rate(r: Result, size_mb: int) -> str:
    if r.scenario in ("big", "wan", "mixed", "verify"):
        total = {"big": size_mb << 20, "wan": size_mb << 20, "verify": size_mb << 20,
                 "mixed": sum(_repo_files(HUB / "models" / mixed_repo(size_mb)).values())}
        return f"{total[r.scenario] / 1e6 / r.seconds:,.0f} MB/s"
    if r.scenario in ("small", "warm") and r.tool != "python import floor":
        return f"{SMALL_FILES / r.seconds:,.0f} files/s"
    if r.scenario.startswith("many-"):
        files = int(r.scenario.split("-")[1])
        return f"{files / r.seconds:,.0f} files/s, {r.seconds / files * 1e3:.3f} ms/file"
    return ""


def table(results: list[Result], size_mb: int) -> str:
    rows = ["| scenario | tool | median s | rate | CPU s | server CPU s | peak RSS MB | requests | streams | "
            "each round (s) |",
            "|---|---|---:|---:|---:|---:|---:|---:|---:|---|"]
    for r in results:
        if not r.ok:
            rows.append(f"| {r.scenario} | {r.tool} | FAILED | | | | | | | {(r.failures or ['no run'])[0][:120]} |")
            continue
        reqs = statistics.median(r.requests) if r.tool != "python import floor" else ""
        reqs = f"{reqs:.0f}" if reqs != "" else ""
        streams = f"{max(r.streams)}" if any(r.streams) else ""
        each = " ".join(f"{x.seconds:.2f}" for x in r.runs)
        rows.append(f"| {r.scenario} | {r.tool} | {r.seconds:.3f} | {_rate(r, size_mb)} | {r.cpu:.2f} | "
                    f"{statistics.median(r.server_cpu):.2f} | {r.rss:.0f} | {reqs} | {streams} | {each} |")
    return "\n".join(rows)


def peak_streams(records: list[dict]) -> int:
    """The most content requests to the CDN listener answered at once (from the server's request log)."""
    events = sorted(e for r in records if r["server"] == "cdn" and r["method"] == "GET"
                    for e in ((r["time"], 1), (r["time"] + r["duration"], -1)))
    most = now = 0
    for _, step in events:
        now += step
        most = max(most, now)
    return most


def stream_counts(output: str) -> str:
    """hpcstage -v's range-stream counts as `4 8 16 8`: where it started and each count it moved to."""
    moves = [line.rsplit("-> ", 1)[1].strip() for line in output.splitlines() if "range streams:" in line and "-> " in line]
    return " ".join([str(START)] + moves)


def _cmd(cmd: list[str]) -> str:
    try:
        return subprocess.run(cmd, capture_output=True, text=True, timeout=20).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return ""


def machine(where: Path) -> list[tuple[str, str]]:
    cpu = next((l.split(":", 1)[1].strip() for l in _cmd(["lscpu"]).splitlines() if l.startswith("Model name")),
               platform.processor())
    mem = next((int(l.split()[1]) for l in open("/proc/meminfo") if l.startswith("MemTotal")), 0)
    fs = " ".join((_cmd(["findmnt", "-n", "-o", "FSTYPE,SOURCE", "-T", str(where)]).splitlines() or [""])[0].split()) or _cmd(["stat", "-f", "-c", "%T", str(where)])
    def ver(pkg):
        try:
            return metadata.version(pkg)
        except metadata.PackageNotFoundError:
            return "not installed"
    head = _cmd(["git", "-C", str(BENCH.parent), "rev-parse", "--short", "HEAD"])
    dirty = _cmd(["git", "-C", str(BENCH.parent), "status", "--porcelain", "--", "src"])
    return [
        ("CPU", f"{cpu}, {os.cpu_count()} logical cores"),
        ("Memory", f"{mem / 1024 / 1024:.1f} GiB"),
        ("Kernel", platform.release()),
        (f"Filesystem of the client caches ({where})", fs),
        ("Python", platform.python_version()),
        ("huggingface_hub / httpx2", f"{ver('huggingface_hub')} / {ver('httpx2')}"),
        ("hpcstage", f"{ver('hpcstage')} (git {head or '?'}{', src/ has uncommitted changes' if dirty else ''})"),
        ("curl", (_cmd(["curl", "--version"]).splitlines() or ["not installed"])[0]),
        ("aria2c", (_cmd(["aria2c", "--version"]).splitlines() or ["not installed"])[0] if shutil.which("aria2c")
         else "not installed"),
        ("Load average at start / end", ""),
    ]


def journalless_ext4(where: Path) -> str | None:
    """The device's name when `where` is on ext4 without a journal (no /proc/fs/jbd2/<dev>-8), else None.
    Such an ext4 skips inodes freed in the last minutes when it allocates new ones (`recently_deleted()`
    in fs/ext4/ialloc.c), so every create pays for recent mass deletions (see bench/README.md)."""
    st = os.stat(where)
    try:
        name = Path(f"/sys/dev/block/{os.major(st.st_dev)}:{os.minor(st.st_dev)}").resolve(strict=True).name
    except OSError:
        return None
    if not Path(f"/sys/fs/ext4/{name}").is_dir():
        return None
    return None if any(p.name.startswith(f"{name}-") for p in Path("/proc/fs/jbd2").glob("*")) else name


SETTLED_CREATE_US = 100  # an empty file's create on this machine's journal-less ext4: ~15 us when no
# recently freed inodes are in the way, 200-800 us within minutes of a mass deletion
SETTLE_LIMIT = 600.0


def create_cost_us(folder: Path, n: int = 300) -> float:
    """Microseconds per create of an empty file, in a new sub-folder of `folder` (kept: deleting it would
    free inodes and disturb what comes next)."""
    probe = folder / f"create-probe-{time.time_ns()}"
    probe.mkdir(parents=True)
    t0 = time.perf_counter()
    for i in range(n):
        os.close(os.open(probe / str(i), os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644))
    return (time.perf_counter() - t0) / n * 1e6


def wait_for_settled_inodes(folder: Path) -> str:
    """On a journal-less ext4, wait (at most SETTLE_LIMIT) until creating files is cheap again, so that the
    small-file scenario does not time the allocator skipping inodes freed by the test suite or a previous
    bench. Returns a note for results.md ("" on other filesystems)."""
    dev = journalless_ext4(folder.parent)
    if dev is None:
        return ""
    started = time.monotonic()
    while True:
        cost = create_cost_us(folder)
        waited = time.monotonic() - started
        if cost <= SETTLED_CREATE_US:
            return (f"The client caches are on ext4 without a journal ({dev}); before the small-file scenario "
                    f"the bench waited {waited:.0f} s until a create cost {cost:.0f} us (<= {SETTLED_CREATE_US}), "
                    "i.e. until no recently freed inodes were in the way (bench/README.md).")
        if waited >= SETTLE_LIMIT:
            return (f"The client caches are on ext4 without a journal ({dev}) and a create still cost {cost:.0f} us "
                    f"after {waited:.0f} s of waiting (settled: <= {SETTLED_CREATE_US} us): small-file times include "
                    "the allocator skipping recently freed inodes, 2-4x slower for every tool (bench/README.md).")
        log(f"ext4 without a journal is skipping recently freed inodes ({cost:.0f} us per create); "
            "waiting 30 s before the small-file scenario")
        time.sleep(30)


def wan_unavailable() -> str | None:
    """Why the netem profile cannot run here, or None. It needs root, `unshare`, `tc` and the kernel's netem."""
    if os.geteuid() != 0:
        return "needs root (a private network namespace with tc netem)"
    for tool in ("unshare", "tc", "ip"):
        if not shutil.which(tool):
            return f"`{tool}` is not installed"
    probe = subprocess.run(["unshare", "-n", "sh", "-c", "ip link set lo up && tc qdisc add dev lo root netem delay 20ms"],
                           capture_output=True, text=True)
    if probe.returncode:
        return f"netem does not work in this kernel ({(probe.stderr.strip() or 'tc failed').splitlines()[-1]})"
    return "the netem run itself is not implemented yet (netem works here: see bench/README.md)"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=3, help="timed rounds per tool (default 3)")
    ap.add_argument("--only", help=f"comma-separated scenarios out of {', '.join(SCENARIOS)} (default all)")
    ap.add_argument("--size-mb", type=int, default=1024, help="size of the big file in MiB (default 1024); "
                    "the mixed repo's 4 shards are size/8 each")
    ap.add_argument("--latency-ms", type=float, default=0.0,
                    help="answer every request this late (server-side delay: per-request latency of a distant Hub; "
                         "bandwidth stays loopback's). Default 0")
    ap.add_argument("--wan", action="store_true", help="netem 40 ms RTT in a private network namespace (see README)")
    ap.add_argument("--runs-dir", type=Path, default=RUNS,
                    help="where the clients' cache folders go (default bench/work/runs; e.g. /dev/shm/x to take the "
                         "disk's metadata cost out)")
    ap.add_argument("--strict", action="store_true", help="exit 1 when a target FAILs (default: report only)")
    ap.add_argument("--results", type=Path, default=BENCH / "results.md", help="where to write the report")
    args = ap.parse_args()
    only = args.only.split(",") if args.only else list(SCENARIOS)
    unknown = set(only) - set(SCENARIOS)
    if unknown or args.rounds < 1 or args.size_mb < 1:
        ap.error(f"unknown scenario {sorted(unknown)}" if unknown else "--rounds and --size-mb must be >= 1")

    if args.wan:
        reason = wan_unavailable()
        if reason:
            log(f"--wan skipped: {reason}. --latency-ms 40 gives per-request latency without netem.")
            return 0
    if args.runs_dir != RUNS:  # never delete a folder the user named: work in a sub-folder of our own
        args.runs_dir = args.runs_dir / "hpcstage-bench-runs"
    started, load0 = time.monotonic(), os.getloadavg()
    WORK.mkdir(parents=True, exist_ok=True)
    log("generating repos (once; kept in bench/work/hub)")
    if {"big", "wan", "verify"} & set(only):
        make_big(args.size_mb)
    if {"small", "warm"} & set(only):
        make_small()
    if "mixed" in only:
        make_mixed(args.size_mb)
    if "many" in only:
        for files in MANY_FILES:
            make_many(files)
    rmtree(args.runs_dir)

    with Server(HUB, WORK / "server.jsonl", latency_ms=args.latency_ms) as server:
        log(f"serving {HUB} at {server.url}; warming the hash memo")
        for scenario, repo in (("big", big_repo(args.size_mb)), ("small", small_repo()), ("warm", small_repo()),
                               ("mixed", mixed_repo(args.size_mb)), ("verify", big_repo(args.size_mb)),
                               *(("many", many_repo(n)) for n in MANY_FILES)):
            if scenario in only:
                server.warm(repo)
        bench = Bench(args, server)
        for scenario in SCENARIOS:
            if scenario in only:
                log(f"scenario {scenario}")
                getattr(bench, scenario)()
    rmtree(args.runs_dir)

    load1 = os.getloadavg()
    cores = os.cpu_count() or 1
    if max(load0[0], load1[0]) > cores:
        bench.notes.append(f"The machine was busy (1-minute load {load0[0]:.1f} at start, {load1[0]:.1f} at end, "
                           f"{cores} cores): other processes competed for the CPUs, times can be off by 2x. Re-run "
                           "when it is idle before drawing conclusions.")
    if args.latency_ms:
        bench.notes.append(f"Latency profile: the server answered every request {args.latency_ms:.0f} ms late.")
    for r in bench.results:
        if r.settled:
            bench.notes.append(f"{r.scenario}: hpcstage's range streams per round (start, then each change): "
                               + "; ".join(r.settled) + ". Streams column: the most CDN requests answered at once "
                               "(server log), the worst round.")
    args.runs_dir.mkdir(parents=True, exist_ok=True)
    info = machine(args.runs_dir)
    rmtree(args.runs_dir)
    info[-1] = (info[-1][0], f"{load0[0]:.2f} / {load1[0]:.2f} (1-minute)")
    checks = targets(bench.results, args.size_mb)
    tbl = table(bench.results, args.size_mb)
    tgt = "\n".join(["| target | measured | |", "|---|---:|---|"] + [f"| {t} | {m} | {v} |" for t, m, v in checks])
    elapsed = time.monotonic() - started
    print()
    print(tbl)
    print()
    print(tgt)
    for n in bench.notes:
        print(f"note: {n}")

    md = [
        "# hpcstage benchmark results", "",
        f"Written by `{' '.join(['bench/run.py', *sys.argv[1:]])}` on {dt.datetime.now():%Y-%m-%d %H:%M} "
        f"in {elapsed:.0f} s: {args.rounds} rounds per tool, order rotated each round, median reported. "
        "Server: `hpcstage serve` in its own process on 127.0.0.1 (LFS files through its CDN listener, "
        "`sendfile`); every client is a fresh process writing into an empty cache folder on the same disk.", "",
        "## Machine", "", "| | |", "|---|---|", *[f"| {k} | {v} |" for k, v in info], "",
        "## Results", "",
        f"Big file: {args.size_mb} MiB `model.safetensors` (LFS, 302 to the CDN listener). Small: "
        f"{SMALL_FILES:,} regular files of {SMALL_SIZE // 1024} KiB (served by the hub listener). Mixed: 4 LFS "
        f"shards of {args.size_mb // 8} MiB + 16 small files (one 4 MiB tokenizer.json). Warm: re-pull of the "
        "staged small repo (hpcstage from `hpcstage.lock`, hf from its cache). Many-N: N regular files of 1 KiB "
        "(pull into a fresh folder; on one staged copy the warm pull, verify, status -f, and `find | xargs sha1sum` "
        "over its blobs). CPU s: user+system of the client "
        "process (wait4); server CPU s: what `hpcstage serve` used meanwhile (it shares the same cores). Peak RSS: VmHWM of the client, polled every 20 ms. Requests: lines the server logged "
        "during the run.", "",
        tbl, "",
        "## Targets (issues #3, #5, #15, #18)", "", tgt, "",
        *[f"- {n}" for n in bench.notes],
    ]
    args.results.write_text("\n".join(md).rstrip() + "\n")
    log(f"wrote {args.results} ({elapsed:.0f} s)")
    return 1 if args.strict and any(v == "FAIL" for _, _, v in checks) else 0


if __name__ == "__main__":
    sys.exit(main())
