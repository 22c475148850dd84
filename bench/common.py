"""Shared by bench/run.py and bench/http_stacks.py: the generated repos, the served Hub, timed child processes."""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

BENCH = Path(__file__).resolve().parent
REPO_ROOT = BENCH.parent
WORK = BENCH / "work"
HUB = WORK / "hub"  # served root: models/<org>/<name>/...
VENV_BIN = REPO_ROOT / ".venv" / "bin"
ORG = "bench"

SMALL_FILES, SMALL_SIZE = 2000, 20 * 1024
MIXED_SHARDS = 4  # plus 16 small files: 20 in all
MANY_FILES, MANY_SIZE = (2000, 20000), 1024  # the scale scenario: the same 1 KiB files, 10x as many


def big_repo(size_mb: int) -> str:
    return f"{ORG}/big-{size_mb}mb"


def small_repo() -> str:
    return f"{ORG}/small-{SMALL_FILES}x{SMALL_SIZE // 1024}kb"


def many_repo(files: int) -> str:
    return f"{ORG}/many-{files}x{MANY_SIZE // 1024}kb"


def make_many(files: int) -> Path:
    """`files` regular files of 1 KiB (random hex), 100 per folder: the scale scenario's repos."""
    root = HUB / "models" / many_repo(files)
    marker = WORK / f".{many_repo(files).replace('/', '--')}.complete"  # outside the served root
    if marker.exists():
        return root
    for i in range(files):
        _write_once(root / f"part-{i // 100:03d}/row-{i:05d}.txt", os.urandom(MANY_SIZE // 2).hex().encode())
    marker.write_bytes(b"ok")
    return root


def mixed_repo(size_mb: int) -> str:
    return f"{ORG}/mixed-{size_mb}mb"


def _random_file(path: Path, size: int, chunk: int = 16 << 20) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        left = size
        while left:
            n = min(chunk, left)
            f.write(os.urandom(n))
            left -= n
    tmp.rename(path)


def _write_once(path: Path, data: bytes) -> None:
    if not (path.exists() and path.stat().st_size == len(data)):
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)


def make_big(size_mb: int) -> Path:
    """One LFS file of random bytes (redirected to the CDN listener)."""
    path = HUB / "models" / big_repo(size_mb) / "model.safetensors"
    if not (path.exists() and path.stat().st_size == size_mb << 20):
        _random_file(path, size_mb << 20)
    return path


def make_small() -> Path:
    """2,000 regular (non-LFS) files of 20 KiB, served by the hub listener itself: 20 folders of 100."""
    root = HUB / "models" / small_repo()
    marker = WORK / f".{small_repo().replace('/', '--')}.complete"  # outside the served root
    if marker.exists():
        return root
    for i in range(SMALL_FILES):
        name = f"shard-{i // 100:02d}/item-{i:04d}." + ("json" if i % 2 else "txt")
        _write_once(root / name, os.urandom(SMALL_SIZE // 2).hex().encode())
    marker.write_bytes(b"ok")
    return root


def make_mixed(size_mb: int) -> Path:
    """20 files: MIXED_SHARDS LFS shards of size_mb/8 each (512 MiB in all by default) and 16 small configs,
    one of them a 4 MiB tokenizer.json (regular file, under the 10 MiB LFS threshold)."""
    root = HUB / "models" / mixed_repo(size_mb)
    shard = max(1, size_mb // 8) << 20
    for i in range(MIXED_SHARDS):
        p = root / f"model-{i + 1:05d}-of-{MIXED_SHARDS:05d}.safetensors"
        if not (p.exists() and p.stat().st_size == shard):
            _random_file(p, shard)
    rnd = lambda n: os.urandom(n // 2).hex().encode()  # noqa: E731
    smalls = {
        "config.json": rnd(1200), "generation_config.json": rnd(300), "tokenizer.json": rnd(4 << 20),
        "tokenizer_config.json": rnd(8000), "special_tokens_map.json": rnd(600), "vocab.txt": rnd(800_000),
        "merges.txt": rnd(400_000), "model.safetensors.index.json": rnd(30_000), "README.md": rnd(5000),
        ".gitattributes": rnd(1500), "LICENSE": rnd(11_000), "added_tokens.json": rnd(100),
        "chat_template.jinja": rnd(4000), "preprocessor_config.json": rnd(500), "params.json": rnd(200),
        "docs/usage.md": rnd(3000),
    }
    for name, data in smalls.items():
        _write_once(root / name, data)
    return root


# -- the served Hub ------------------------------------------------------------------------------------


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """`hpcstage serve` in its own process (its own GIL), with a JSON-lines request log; `latency_ms` answers
    every request that late, `conn_rate_mb` sends each connection's answers at that many MB/s."""

    def __init__(self, root: Path, log_file: Path, latency_ms: float = 0.0, conn_rate_mb: float = 0.0):
        self.root, self.log_file, self.latency_ms, self.conn_rate_mb = root, log_file, latency_ms, conn_rate_mb
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen | None = None

    def __enter__(self) -> "Server":
        self.log_file.unlink(missing_ok=True)
        self._out = open(self.log_file.with_suffix(".out"), "w")
        cmd = [str(VENV_BIN / "hpcstage"), "serve", str(self.root), "--host", "127.0.0.1", "--port", str(self.port),
               "--log-file", str(self.log_file)]
        if self.latency_ms:
            cmd += ["--latency-ms", str(self.latency_ms)]
        if self.conn_rate_mb:
            cmd += ["--conn-rate-mb", str(self.conn_rate_mb)]
        self.proc = subprocess.Popen(cmd, stdout=self._out, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 30
        while True:
            try:
                urllib.request.urlopen(f"{self.url}/api/models/none/none", timeout=2)
            except urllib.error.HTTPError:  # 401 RepoNotFound: it answers
                break
            except OSError:
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"hpcstage serve did not start; see {self.log_file.with_suffix('.out')}")
                time.sleep(0.1)
        return self

    def __exit__(self, *exc) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._out.close()

    def warm(self, repo_id: str) -> dict:
        """Repo info makes the server scan and hash every file of the revision (memoised by path/size/mtime)."""
        with urllib.request.urlopen(f"{self.url}/api/models/{repo_id}", timeout=600) as r:
            return json.load(r)

    def cdn_url(self, repo_id: str, path: str) -> str:
        """Where the hub listener redirects an LFS file (the URL curl -L would end on)."""
        req = urllib.request.Request(f"{self.url}/{repo_id}/resolve/main/{path}", method="HEAD")

        class NoRedirect(urllib.request.HTTPRedirectHandler):
            def redirect_request(self, *a, **k):
                return None

        try:
            urllib.request.build_opener(NoRedirect).open(req, timeout=30)
        except urllib.error.HTTPError as e:
            if e.code == 302:
                return e.headers["Location"]
            raise
        raise RuntimeError(f"{repo_id}/{path} is not redirected: not an LFS file?")

    def cpu_seconds(self) -> float:
        """user+system CPU the server process has used so far (/proc/PID/stat, clock ticks)."""
        try:
            fields = open(f"/proc/{self.proc.pid}/stat").read().rsplit(")", 1)[1].split()
            return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
        except (OSError, AttributeError, IndexError, ValueError):
            return 0.0

    def log_offset(self) -> int:
        return self.log_file.stat().st_size if self.log_file.exists() else 0

    def requests_since(self, offset: int, settle: float = 0.3) -> list[dict]:
        time.sleep(settle)  # the server logs a request after its last byte went out
        with open(self.log_file, "rb") as f:
            f.seek(offset)
            return [json.loads(line) for line in f.read().splitlines() if line.strip()]


# -- timed child processes -----------------------------------------------------------------------------


def vm_hwm_mb(pid: int | str) -> float:
    """Peak RSS of a live process's current program (VmHWM: reset by exec, unlike wait4's ru_maxrss, which
    keeps the RSS of the Python parent that forked it)."""
    try:
        with open(f"/proc/{pid}/status", "rb") as f:
            for line in f:
                if line.startswith(b"VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0


@dataclass
class Run:
    seconds: float
    cpu: float  # user + system of the child and the descendants it waited for (wait4)
    user: float
    sys: float
    rss_mb: float  # peak RSS (VmHWM) of the child, plus the peaks of its descendants
    rc: int
    output: str


def _watch_peak(pid: int, stop: threading.Event, peaks: dict[int, float], interval: float = 0.02) -> None:
    """Poll VmHWM of pid and its descendants until stop; VmHWM only grows, so the last sample before exit
    misses at most the growth of the last `interval`."""
    import psutil

    try:
        root = psutil.Process(pid)
    except psutil.Error:
        return
    while not stop.is_set():
        try:
            pids = [pid] + [c.pid for c in root.children(recursive=True)]
        except psutil.Error:
            pids = [pid]
        for p in pids:
            hwm = vm_hwm_mb(p)
            if hwm > peaks.get(p, 0.0):
                peaks[p] = hwm
        stop.wait(interval)


def run_timed(cmd: list[str], env: dict | None = None, cwd: Path | None = None) -> Run:
    """Wall time from spawn to exit (perf_counter), CPU from wait4's rusage, peak RSS from polled VmHWM
    (summed over the process and its descendants: an upper bound if they did not all peak at once).
    Dirty data is synced to disk first, outside the timed region."""
    out_path = WORK / "last-child.out"
    peaks: dict[int, float] = {}
    stop = threading.Event()
    # Untimed: write back what earlier runs left dirty (1 GiB per buffered big-file run), so that no run
    # shares the cores with the kernel flushing its predecessor's data.
    os.sync()
    with open(out_path, "w+b") as out:
        t0 = time.perf_counter()
        proc = subprocess.Popen(cmd, env=env, cwd=cwd, stdout=out, stderr=subprocess.STDOUT)
        watcher = threading.Thread(target=_watch_peak, args=(proc.pid, stop, peaks), daemon=True)
        watcher.start()
        _, status, ru = os.wait4(proc.pid, 0)
        seconds = time.perf_counter() - t0
        stop.set()
        watcher.join()
        proc.returncode = os.waitstatus_to_exitcode(status)
        out.seek(0)
        text = out.read().decode(errors="replace")
    return Run(seconds, ru.ru_utime + ru.ru_stime, ru.ru_utime, ru.ru_stime, sum(peaks.values()),
               proc.returncode, text)


def clean_env(**extra: str) -> dict:
    """Child environment: no token, no telemetry, no progress bars, nothing from the caller's HF settings."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "HUGGINGFACE_"))}
    env.update(
        HF_HOME=str(WORK / "hf-home"),  # no token file, no stray config
        HF_HUB_DISABLE_XET="1", HF_HUB_DISABLE_TELEMETRY="1", HF_HUB_DISABLE_UPDATE_CHECK="1",
        HF_HUB_DISABLE_PROGRESS_BARS="1", HF_UPDATE_DOWNLOAD_COUNTS="0", HF_HUB_DISABLE_IMPLICIT_TOKEN="1",
        NO_COLOR="1",
    )
    env.update(extra)
    return env


def rmtree(path: Path) -> None:
    shutil.rmtree(path, ignore_errors=True)


def python() -> str:
    return str(VENV_BIN / "python") if (VENV_BIN / "python").exists() else sys.executable
