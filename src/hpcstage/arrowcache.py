"""Build the `datasets` Arrow cache once, on the login node, for exactly the `load_dataset` calls jobs make.

Why (FACTS.md, "datasets 5.x offline"): offline, `load_dataset("org/name")` cannot read the hub cache; it
needs an Arrow build made online with the same arguments, and it picks the most recently modified build
of the config. Local files (`load_dataset("json", data_files=...)`) do build offline, but N jobs starting
together all build into one `<dir>.incomplete` folder and crash on a shared filesystem. So we build each
call once, before any job starts:

* each build runs in a child of the JOB's interpreter (`offline.job_stack`: --python, the manifest's
  `python:`, HPCSTAGE_PYTHON, else this one), whose environment is computed here (`offline.online_env`):
  HF_* variables are read at import time, and the job's datasets version decides the cache layout
  (FACTS.md, "Job stacks are not hpcstage's stack"). The child code uses public datasets APIs of 2.16+
  only and never imports hpcstage;
* one writer per build across processes and nodes: a `Lease` on
  `<datasets_cache>/.hpcstage-locks/<key>.lease`, where key is a hash of the call's arguments;
* each build is proven: a second child of the same interpreter, offline flags set and the network off
  (`unshare -n`, else the socket guard), makes the call as a job makes it and must read the very build.
  datasets 4760 (a Hub dataset with `data_files` is built as `default-<A>` and looked up offline as
  `default-<B>`): B, computed by the job's own `datasets.BuilderConfig.create_config_id`, becomes a
  relative symlink to A, and the load is proven again. Unproven: CACHE_FAILED, the reason recorded in
  `<key>.datasets-<version>.failed` for `check`;
* a proven build leaves `<datasets_cache>/.hpcstage-prebuild/<key>.datasets-<version>.json` naming its
  Arrow files, its alias, and the size and mtime of the local data files the datasets cache key depends
  on; while that marker holds for the job stack's datasets version, the build is skipped without
  importing `datasets` (the version comes from the installed distribution's metadata).

What a call is (`Build`) and its markers' names and contents are arrowbuilds.py's (check reads them too).

The library call is `hpcstage.prebuild(...)` (hpcstage.api); the CLI's is `hpcstage prebuild`.
"""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from hpcstage import offline, safefs
from hpcstage.arrowbuilds import (
    Build,
    failure_path,
    hub_build,
    local_build,
    read_marker,
    write_marker,
)
from hpcstage.errors import BadInput, HpcstageError
from hpcstage.layout import ARROW_LEASE_SUFFIX, LEASE_TTL
from hpcstage.layout import ARROW_LOCK_DIR as LOCK_DIR
from hpcstage.locks import Lease
from hpcstage.manifest import Manifest, load_lock
from hpcstage.yamlfile import read_yaml

POLL = 0.2  # seconds between looks at builds other processes hold


class PrebuildError(HpcstageError):
    """The build child could not be started or died without answering."""


@dataclass
class BuildResult:
    label: str
    key: str
    call: str
    status: str  # built | skipped (a valid marker) | missing (local data file absent) | failed
    seconds: float = 0.0
    cache_dir: str | None = None  # the Arrow build folder
    error: str | None = None
    alias: str | None = None  # the config folder made to point at the build (datasets 4760), if one was needed


@dataclass
class PrebuildSummary:
    datasets_cache_dir: Path
    stack: offline.JobStack | None = None  # the job's interpreter the builds were made and proven in
    results: list[BuildResult] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def ok(self) -> bool:
        return not any(r.status == "failed" for r in self.results)

    @property
    def warnings(self) -> list[str]:
        return [f"{r.label}: data file not found" for r in self.results if r.status == "missing"]

    def as_dict(self) -> dict:
        return {
            "datasets_cache_dir": str(self.datasets_cache_dir),
            "python": self.stack.python if self.stack else None,
            "versions": self.stack.versions if self.stack else None,
            "ok": self.ok,
            "results": [r.__dict__ for r in self.results],
            "warnings": self.warnings,
            "seconds": round(self.seconds, 3),
        }


# -- what to build -----------------------------------------------------------------------------------


def builds_from_manifest(manifest: Manifest) -> list[Build]:
    """Every `datasets:` entry with `load:` (at its locked commit, else its revision) and every
    `prebuild:` entry, without duplicates."""
    lock = load_lock(manifest.lock_path) if manifest.path else None
    base = manifest.path.parent if manifest.path else Path.cwd()
    out: list[Build] = []
    for i, entry in enumerate(manifest.datasets):
        if entry.load is None:
            continue
        if "revision" in entry.load:
            raise BadInput(
                f"{manifest.path}: datasets[{i}].load has `revision`; set `revision:` on the entry "
                "itself (prebuild uses its locked commit)"
            )
        out.append(hub_build(entry, lock))
    for i, spec in enumerate(manifest.prebuild):
        out.append(local_build(spec, base, where=f"{manifest.path}: prebuild[{i}]"))
    return _unique(out)


def builds_from_experiment(path: str | Path) -> list[Build]:
    """`evaluation.tasks[].dataset` of an experiment summary: each unique file becomes
    `load_dataset("json", data_files=PATH, field="test", split="train")`."""
    path = Path(path)
    data, _ = read_yaml(path, "experiment summary", BadInput, "pass an existing UTF-8 YAML file")
    tasks = ((data or {}).get("evaluation") or {}).get("tasks") if isinstance(data, dict) else None
    if not isinstance(tasks, list):
        raise BadInput(f"{path}: no `evaluation.tasks` list; expected evaluation: {{tasks: [{{dataset: PATH}}, ...]}}")
    out = []
    for task in tasks:
        dataset = task.get("dataset") if isinstance(task, dict) else None
        if isinstance(dataset, str) and dataset:
            out.append(
                local_build({"path": "json", "data_files": dataset, "field": "test", "split": "train"}, path.parent)
            )
    return _unique(out)


def _unique(builds: list[Build]) -> list[Build]:
    seen: dict[str, Build] = {}
    for b in builds:
        seen.setdefault(b.key, b)
    return list(seen.values())


# -- build leases ------------------------------------------------------------------------------------


def lease_path(datasets_cache_dir: Path, build: Build) -> Path:
    return Path(datasets_cache_dir) / LOCK_DIR / f"{build.key}{ARROW_LEASE_SUFFIX}"


def alias_config(datasets_cache_dir: Path, cache_dir: str | Path, config_id: str) -> Path | None:
    """datasets 4760: make `<dataset>/<config_id>` (the folder an offline load looks in) a relative symlink
    to the built config folder (`<dataset>/<built config>`, holding `<version>/<hash>/`). Returns the alias,
    or None when a real folder of that name exists (not ours to replace). Atomic: a temporary link renamed
    over the old one, so a later build of the same call re-points it; written through safefs (no planted
    link below the datasets cache redirects it)."""
    build_dir = Path(cache_dir)
    config_dir = build_dir.parent.parent
    alias = config_dir.parent / config_id
    if config_id in ("", ".", "..") or "/" in config_id or alias == config_dir:
        return None
    folder, name = safefs.parent_of(datasets_cache_dir, alias, create=False)
    try:
        if not stat.S_ISLNK(folder.lstat(name).st_mode):
            return None
    except FileNotFoundError:
        pass
    tmp = f".{config_id}.{os.getpid()}.hpcstage-link"
    folder.unlink(tmp)
    folder.symlink(config_dir.name, tmp)
    folder.replace(tmp, name)
    return alias


def newer_builds(cache_dir: str | Path) -> list[Path]:
    """Other builds of the same dataset config at least as recent as `cache_dir`. Offline, datasets
    ignores `revision` and loads the most recently modified build of the config, so any of these would
    be loaded instead of ours."""
    folder = Path(cache_dir)
    try:
        mine = folder.stat().st_mtime
        return sorted(
            p
            for p in folder.parent.iterdir()
            if p != folder and p.is_dir() and not p.name.endswith(".incomplete") and p.stat().st_mtime >= mine
        )
    except OSError:
        return []


def make_newest(cache_dir: str | Path) -> None:
    """Bump the build folder's mtime (not its files') so an offline load of the config picks it."""
    others = newer_builds(cache_dir)
    if others:
        when = max(time.time(), max(p.stat().st_mtime for p in others) + 1)
        os.utime(cache_dir, (when, when))


# -- the build child ---------------------------------------------------------------------------------

# Reads one JSON request per line on stdin, answers one JSON line on the original stdout (datasets'
# own output goes to stderr). Dies with its parent (PR_SET_PDEATHSIG) so a killed prebuild does not
# leave a build running without the lease. Runs in the JOB's interpreter: Python 3.8+, public APIs of
# datasets >= 2.16 only, never imports hpcstage (it is not installed there).
_WORKER = (
    offline.CHILD_HELPERS
    + r"""
import ctypes, json, os, sys, time
try:
    ctypes.CDLL(None, use_errno=True).prctl(1, 9)
except Exception:
    pass
if os.getppid() != int(sys.argv[1]):
    sys.exit(1)
proto = os.fdopen(os.dup(1), "w", buffering=1)
os.dup2(2, 1)
sys.stdout = sys.stderr

try:
    import datasets
    from datasets import load_dataset
except Exception as e:
    proto.write(json.dumps({"ready": False, "error": first_line(e)}) + "\n")
    sys.exit(1)
# load_dataset's own arguments; every other one is a builder config argument, which the offline cache
# lookup hashes into the config id it looks for
NOT_CONFIG = {"path", "name", "split", "cache_dir", "features", "download_config", "download_mode",
              "verification_mode", "keep_in_memory", "save_infos", "revision", "token", "streaming", "num_proc",
              "storage_options", "trust_remote_code", "ignore_verifications", "use_auth_token", "task"}
proto.write(json.dumps({"ready": True, "datasets": datasets.__version__}) + "\n")
for line in sys.stdin:
    req = json.loads(line)
    started = time.perf_counter()
    try:
        bad = misnamed_argument(load_dataset, req["kwargs"])
        if bad:
            raise TypeError("load_dataset has no argument %r; did you mean %r? (fix `load:`)" % bad)
        ds = load_dataset(req["path"], **req["kwargs"])
        parts = list(ds.values()) if isinstance(ds, dict) else [ds]
        files = sorted({f["filename"] for d in parts for f in getattr(d, "cache_files", None) or []})
        out = {"ok": bool(files), "files": files,
               "error": None if files else "the result has no Arrow files (in memory or streaming)"}
    except Exception as e:
        out = {"ok": False, "error": first_line(e)}
    if req.get("offline"):  # the config id the offline lookup wants (datasets 4760: not always the built one)
        config = dict((k, v) for k, v in req["kwargs"].items() if k not in NOT_CONFIG)
        try:
            out["config_id"] = datasets.BuilderConfig(req["kwargs"].get("name") or "default").create_config_id(
                config) if config else None
        except Exception as e:
            out["config_id"] = None
    out["seconds"] = time.perf_counter() - started
    proto.write(json.dumps(out) + "\n")
"""
)


class _Worker:
    """One child interpreter for all builds of a run: `datasets` is imported once, not per build."""

    def __init__(self, env: dict[str, str], python: str = sys.executable, isolation: str | None = None):
        """`isolation`: None (network on: builds), else "netns"/"guard" (network off: offline proofs)."""
        self._log = tempfile.TemporaryFile(mode="w+")
        self.python = python
        argv = (
            [python, "-c", _WORKER]
            if isolation is None
            else offline.isolated_command(_WORKER, isolation, python=python)
        ) + [str(os.getpid())]
        self.proc = subprocess.Popen(
            argv, env=env, text=True, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self._log
        )
        assert self.proc.stdin is not None and self.proc.stdout is not None  # both PIPE
        self._requests, self._answers = self.proc.stdin, self.proc.stdout
        ready = self._answer()  # import errors surface here, not inside a lease
        if not ready.get("ready"):
            self.close()
            raise PrebuildError(
                f"{python} cannot import datasets ({ready.get('error')}); repair it there: "
                f"{python} -m pip install --force-reinstall 'datasets>=2.16'"
            )
        self.datasets = ready.get("datasets")

    def _answer(self) -> dict:
        line = self._answers.readline()
        if not line:
            self.proc.wait()
            self._log.seek(0)
            tail = [s for s in self._log.read().strip().splitlines() if s.strip()][-1:] or ["no output"]
            raise PrebuildError(
                f"the build process ({self.python}) exited with code {self.proc.returncode} "
                f"({tail[0]}); check that `datasets` is installed in this Python"
            )
        return json.loads(line)

    def load(self, build: Build, *, offline: bool = False) -> dict:
        """Online: the build's call as given. Offline (the proof): the call as a job makes it, without the
        pinned `revision` (offline, datasets looks the build up by config, not by commit)."""
        kwargs = {k: v for k, v in build.kwargs.items() if not (offline and k == "revision")}
        self._requests.write(json.dumps({"path": build.path, "kwargs": kwargs, "offline": offline}, default=str) + "\n")
        self._requests.flush()
        return self._answer()

    def close(self) -> None:
        if self.proc.poll() is None:
            self._requests.close()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log.close()


# -- the run -----------------------------------------------------------------------------------------


def prebuild(
    builds: list[Build],
    *,
    datasets_cache_dir: Path | None = None,
    cache_dir: Path | None = None,
    manifest: Manifest | None = None,
    python: str | os.PathLike | None = None,
    on_event: Callable[[str, str], None] | None = None,
    lease_ttl: float = LEASE_TTL,
    base_env: dict[str, str] | None = None,
    force: bool = False,
    isolation: str = "auto",
) -> PrebuildSummary:
    """Build each call once into the datasets cache (manifest's, else HF_DATASETS_CACHE rules), in the job's
    interpreter (`python`, else the manifest's `python:`, else HPCSTAGE_PYTHON, else this one), and prove
    each build by loading it as a job will: offline flags, the network off (`isolation`), that interpreter.

    `on_event(kind, text)` is told of progress: kind is "start" (text: the count), "stack" (the job's
    interpreter and versions), "built", "skipped", "missing", "failed" (text: label, or label and error).
    Builds held by another process are waited for while this one builds the rest. `force` rebuilds and
    proves again even where a marker holds."""
    started = time.monotonic()
    stack = offline.job_stack(manifest, python)
    env = offline.online_env(manifest, cache_dir=cache_dir, datasets_cache_dir=datasets_cache_dir, base=base_env)
    proof_env = offline.job_env(manifest, cache_dir=cache_dir, datasets_cache_dir=datasets_cache_dir, base=base_env)
    if isolation == "auto":
        isolation = "netns" if offline.netns_available() else "guard"
    ds_dir = Path(env["HF_DATASETS_CACHE"])
    summary = PrebuildSummary(ds_dir, stack=stack)
    tell = on_event or (lambda kind, text: None)
    tell("start", str(len(builds)))
    tell("stack", stack.describe())
    results: dict[str, BuildResult] = {}
    pending: list[Build] = []
    for b in builds:
        if b.missing:
            results[b.key] = BuildResult(b.label, b.key, b.call, "missing", error=f"not found: {', '.join(b.missing)}")
            tell("missing", b.label)
        else:
            pending.append(b)
    workers: dict[str, _Worker] = {}

    def worker(kind: str) -> _Worker:  # started once there is something to build: importing datasets costs ~1 s
        if kind not in workers:
            workers[kind] = (
                _Worker(env, stack.python) if kind == "build" else _Worker(proof_env, stack.python, isolation=isolation)
            )
        return workers[kind]

    try:
        while pending:
            progressed = False
            for b in list(pending):
                t0 = time.perf_counter()
                marker = None if force else read_marker(ds_dir, b, stack.datasets)
                if marker is not None:
                    make_newest(marker["cache_dir"])
                    results[b.key] = BuildResult(
                        b.label,
                        b.key,
                        b.call,
                        "skipped",
                        time.perf_counter() - t0,
                        marker["cache_dir"],
                        alias=marker.get("alias"),
                    )
                    pending.remove(b)
                    progressed = True
                    tell("skipped", b.label)
                    continue
                lease = Lease(lease_path(ds_dir, b), ttl=lease_ttl, root=ds_dir)
                if not lease.try_acquire():
                    continue  # another process builds it; look again next round
                try:
                    results[b.key] = _build_one(worker, ds_dir, b, lease, t0, stack.datasets, force)
                finally:
                    lease.release()
                pending.remove(b)
                progressed = True
                r = results[b.key]
                tell(r.status, b.label if r.status != "failed" else f"{b.label}: {r.error}")
            if pending and not progressed:
                time.sleep(POLL)
    finally:
        for w in workers.values():
            w.close()
    summary.results = [results[b.key] for b in builds]
    summary.seconds = time.monotonic() - started
    return summary


def _same_folder(a: str | Path, b: str | Path) -> bool:
    return os.path.realpath(a) == os.path.realpath(b)


def _build_one(
    worker: Callable[[str], _Worker], ds_dir: Path, b: Build, lease: Lease, t0: float, version: str, force: bool
) -> BuildResult:
    """Build online, then prove offline; on datasets 4760 (the offline lookup wants another config id than
    the one built) alias that id to the build and prove again. Only a proven build gets a marker."""
    marker = None if force else read_marker(ds_dir, b, version)  # built by the lease's previous holder meanwhile
    if marker is not None:
        return BuildResult(
            b.label, b.key, b.call, "skipped", time.perf_counter() - t0, marker["cache_dir"], alias=marker.get("alias")
        )

    def failed(error: str) -> BuildResult:
        return BuildResult(b.label, b.key, b.call, "failed", time.perf_counter() - t0, error=error)

    answer = worker("build").load(b)
    if not answer["ok"]:
        return failed(answer["error"])
    cache_dir = os.path.dirname(answer["files"][0])
    make_newest(cache_dir)
    proof = worker("proof").load(b, offline=True)
    alias = None
    if not (proof["ok"] and _same_folder(os.path.dirname(proof["files"][0]), cache_dir)) and proof.get("config_id"):
        alias = alias_config(ds_dir, cache_dir, proof["config_id"])
        if alias is not None:
            proof = worker("proof").load(b, offline=True)

    def unproven(error: str) -> BuildResult:  # recorded, so that `check` can say why instead of "run prebuild"
        safefs.write_atomic(
            ds_dir,
            failure_path(ds_dir, b, version),
            json.dumps({"error": error, "fingerprint": b.fingerprint(), "at": time.time()}, default=str).encode(),
        )
        return failed(error)

    if not proof["ok"]:
        return unproven(
            f"built into {cache_dir}, but the same call offline fails in the job's Python: {proof['error']}"
        )
    got = os.path.dirname(proof["files"][0])
    if not _same_folder(got, cache_dir):
        return unproven(f"built into {cache_dir}, but the same call offline reads {got}")
    if alias is None and os.path.normpath(got) != os.path.normpath(cache_dir):  # through a link made before
        alias = Path(got).parent.parent
    if lease.lost:  # we stalled past the ttl: someone else may have built alongside; do not vouch for it
        return failed(f"lease {lease.path} was lost during the build; run `hpcstage prebuild` again")
    seconds = time.perf_counter() - t0
    write_marker(ds_dir, b, cache_dir, seconds, version, str(alias) if alias else None)
    folder, name = safefs.parent_of(ds_dir, failure_path(ds_dir, b, version))
    folder.unlink(name)
    return BuildResult(b.label, b.key, b.call, "built", seconds, cache_dir, alias=str(alias) if alias else None)
