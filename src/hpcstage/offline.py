"""The offline environment a job needs, computed explicitly for a child process.

huggingface_hub, datasets and transformers read their HF_* variables at import time, so setting them in
a running interpreter is too late; jobs and `check` get them in their environment from here.

Why one module of about 570 lines: `check` is here with the environment it checks (the job's interpreter, the offline
flags, the network switched off by `unshare -n` or the socket guard) because it runs its child with exactly
that environment; Slurm job scripts (slurm/launch.py) import both from here. Which builds are proven is
arrowbuilds.py's.
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from hpcstage import arrowbuilds
from hpcstage.errors import BadInput, HpcstageError
from hpcstage.hfcache import default_cache_dir, default_datasets_cache_dir
from hpcstage.manifest import Manifest

OFFLINE_FLAGS = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
QUIET_FLAGS = {"HF_HUB_DISABLE_TELEMETRY": "1", "HF_UPDATE_DOWNLOAD_COUNTS": "0", "HF_HUB_DISABLE_UPDATE_CHECK": "1"}


def env(
    manifest: Manifest | None = None, *, cache_dir: Path | None = None, datasets_cache_dir: Path | None = None
) -> dict[str, str]:
    """Offline flags plus absolute cache paths: explicit arguments, else the manifest's, else HF rules;
    with data entries in the manifest also HPCSTAGE_DATA_DIR, where they land."""
    hub = cache_dir or (manifest.cache_dir if manifest else None) or default_cache_dir()
    ds = datasets_cache_dir or (manifest.datasets_cache_dir if manifest else None) or default_datasets_cache_dir()
    out = {
        **OFFLINE_FLAGS,
        **QUIET_FLAGS,
        "HF_HUB_CACHE": str(Path(hub).resolve()),
        "HF_DATASETS_CACHE": str(Path(ds).resolve()),
    }
    if manifest is not None and manifest.data_entries:  # url:/local:/file: entries land in <data_dir>/<dest>
        from hpcstage.datadir import data_dir_of

        out["HPCSTAGE_DATA_DIR"] = str(data_dir_of(manifest, Path(hub)).resolve())
    return out


def online_env(
    manifest: Manifest | None = None,
    *,
    cache_dir: Path | None = None,
    datasets_cache_dir: Path | None = None,
    base: dict[str, str] | None = None,
) -> dict[str, str]:
    """A full environment for a child that must reach the Hub (prebuild on the login node).

    The user's endpoint, token and HF_HOME pass through from `base` (default: this process's environment);
    offline flags are removed; the cache paths are the same ones `env()` gives jobs, so a build lands
    exactly where the offline job will look for it."""
    out = {k: v for k, v in (os.environ if base is None else base).items() if k not in OFFLINE_FLAGS}
    paths = env(manifest, cache_dir=cache_dir, datasets_cache_dir=datasets_cache_dir)
    out.update({k: v for k, v in paths.items() if k not in OFFLINE_FLAGS})
    out["HF_HUB_DISABLE_PROGRESS_BARS"] = "1"
    out["HF_DATASETS_DISABLE_PROGRESS_BARS"] = "1"
    return out


def job_env(
    manifest: Manifest | None = None,
    *,
    cache_dir: Path | None = None,
    datasets_cache_dir: Path | None = None,
    base: dict[str, str] | None = None,
) -> dict[str, str]:
    """A full environment for a child that must behave like an offline job: `base` (default: this
    process's environment) without any HF_* of its own, plus `env()`."""
    out = {
        k: v
        for k, v in (os.environ if base is None else base).items()
        if not k.startswith(("HF_", "HUGGING_FACE_")) or k in ("HF_HOME", "HF_TOKEN", "HF_TOKEN_PATH")
    }
    out.update(env(manifest, cache_dir=cache_dir, datasets_cache_dir=datasets_cache_dir))
    out["HF_HUB_DISABLE_PROGRESS_BARS"] = "1"
    out["HF_DATASETS_DISABLE_PROGRESS_BARS"] = "1"
    return out


# -- the job's interpreter: prebuild and check run their loads in it ----------------------------------

# Versions without importing anything (importlib.metadata reads the installed distributions): ~50 ms, so a
# warm prebuild still skips without importing datasets. Python 3.8+; never imports hpcstage.
_PROBE = r"""
import json, sys
try:
    from importlib.metadata import version, PackageNotFoundError
except ImportError:
    version = None
out = {"python": "%d.%d.%d" % sys.version_info[:3]}
for name in ("datasets", "huggingface_hub", "transformers"):
    try:
        out[name] = version(name) if version else None
    except PackageNotFoundError:
        out[name] = None
print(json.dumps(out))
"""


@dataclass(frozen=True)
class JobStack:
    """The interpreter jobs run in and the versions of the clients in it: what decides how the Arrow caches
    must look. `origin` says where the choice came from (--python, the manifest, HPCSTAGE_PYTHON, hpcstage)."""

    python: str
    origin: str
    versions: dict = field(default_factory=dict, hash=False)

    @property
    def datasets(self) -> str:
        return self.versions.get("datasets") or ""

    def describe(self) -> str:
        names = ("datasets", "huggingface_hub", "transformers")
        return (
            f"{self.python} (python {self.versions.get('python')}, "
            + ", ".join(f"{n} {self.versions.get(n) or 'not installed'}" for n in names)
            + ")"
        )


OWN_PYTHON = "hpcstage's own interpreter"


def job_python(manifest: Manifest | None = None, python: str | os.PathLike | None = None) -> tuple[str, str]:
    """(interpreter, origin): `python` (--python), else the manifest's `python:`, else HPCSTAGE_PYTHON, else
    this interpreter. Paths are made absolute (not resolved: a venv's bin/python is a symlink that must stay one)."""
    if python:
        return _interpreter(str(python)), "--python"
    if manifest is not None and manifest.python:
        return manifest.python, f"python: in {manifest.path}" if manifest.path else "python:"
    if os.environ.get("HPCSTAGE_PYTHON"):
        return _interpreter(os.environ["HPCSTAGE_PYTHON"]), "HPCSTAGE_PYTHON"
    return sys.executable, OWN_PYTHON


def _interpreter(value: str) -> str:
    """A path (~ and $VARS expanded) made absolute, or a bare name (`python3`) looked up on PATH."""
    value = os.path.expandvars(os.path.expanduser(value))
    if os.sep not in value:
        return shutil.which(value) or str(Path(value).absolute())
    return str(Path(value).absolute())


_stacks: dict[str, JobStack] = {}


def job_stack(manifest: Manifest | None = None, python: str | os.PathLike | None = None) -> JobStack:
    """The job's interpreter with its client versions; a BadInput (one line, exit 2) naming the interpreter
    and what to install when it does not run or has no `datasets`."""
    path, origin = job_python(manifest, python)
    if path in _stacks:
        return JobStack(path, origin, _stacks[path].versions)
    if not os.path.isfile(path) or not os.access(path, os.X_OK):
        raise BadInput(
            f"job interpreter {path} (from {origin}) is not an executable file; point it at the "
            "jobs' Python, e.g. /path/to/venv/bin/python"
        )
    try:
        r = subprocess.run(
            [path, "-c", _PROBE],
            capture_output=True,
            text=True,
            timeout=60,
            env={k: v for k, v in os.environ.items() if not k.startswith("PYTHON")},
        )
        versions = json.loads(r.stdout.strip().splitlines()[-1]) if r.returncode == 0 else None
    except (OSError, subprocess.TimeoutExpired, ValueError, IndexError):
        versions = None
    if not isinstance(versions, dict):
        raise BadInput(
            f"job interpreter {path} (from {origin}) does not run Python 3.8+ code; point it at the "
            "jobs' Python, e.g. /path/to/venv/bin/python"
        )
    if not versions.get("datasets") and origin == OWN_PYTHON:
        raise BadInput(
            f"no job interpreter given and hpcstage's own ({path}) has no `datasets`; set `python:` in "
            "the manifest (or --python, or HPCSTAGE_PYTHON) to the jobs' Python, or install "
            "'hpcstage[datasets]'"
        )
    if not versions.get("datasets"):
        raise BadInput(
            f"job interpreter {path} (from {origin}) has no `datasets`; install it there "
            f"({path} -m pip install 'datasets>=2.16') or point --python / `python:` at the jobs' Python"
        )
    stack = JobStack(path, origin, versions)
    _stacks[path] = stack
    return stack


# -- readiness check: what a job would do, in a process with the network off ---------------------------

# Files a job's loaders read when the repo has them (transformers' AutoConfig / AutoTokenizer and friends).
JOB_FILES = (
    "config.json",
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "tokenizer.model",
    "vocab.json",
    "vocab.txt",
    "merges.txt",
    "added_tokens.json",
    "chat_template.jinja",
    "chat_template.json",
    "preprocessor_config.json",
    "processor_config.json",
)

# Installed in the check child when no network namespace is available: any IP connection fails.
_GUARD = r"""
import socket as _s
_connect, _connect_ex = _s.socket.connect, _s.socket.connect_ex
def _off(sock):
    return sock.family in (_s.AF_INET, _s.AF_INET6)
def connect(self, address, *a):
    if _off(self):
        raise OSError(101, f"hpcstage check: the network is off (connect to {address!r})")
    return _connect(self, address, *a)
def connect_ex(self, address, *a):
    return 101 if _off(self) else _connect_ex(self, address, *a)
_s.socket.connect, _s.socket.connect_ex = connect, connect_ex
"""

# Reads the task list (JSON) on stdin, does each task as a job would, prints one JSON list on stdout.
# Functions both children (check's below, prebuild's worker) define: they run in the JOB's interpreter, so
# Python 3.8+ and public datasets APIs only, never hpcstage.
CHILD_HELPERS = r"""
def first_line(e):
    text = str(e).strip().splitlines()
    return "%s: %s" % (type(e).__name__, text[0] if text else "")

def misnamed_argument(load_dataset, kwargs):
    # (key, the load_dataset argument it misspells) or None: a typo would reach the builder config as a key
    import difflib, inspect
    named = [n for n, p in inspect.signature(load_dataset).parameters.items() if p.kind != p.VAR_KEYWORD]
    for k in kwargs:
        near = difflib.get_close_matches(k, named, n=1, cutoff=0.75) if k not in named else []
        if near:
            return k, near[0]
    return None
"""

_CHECK = (
    CHILD_HELPERS
    + r"""
import json, os, sys
tasks = json.load(sys.stdin)
real_stdout = os.fdopen(os.dup(1), "w")
os.dup2(2, 1)
sys.stdout = sys.stderr

out = []
for t in tasks:
    r = {"error": None, "missing": [], "files": []}
    try:
        if t["kind"] in ("model", "dataset"):
            from huggingface_hub import snapshot_download
            snapshot_download(t["repo"], repo_type=t["kind"], revision=t["revision"], allow_patterns=t["include"],
                              ignore_patterns=t["exclude"], local_files_only=True)
        else:
            from datasets import load_dataset
            bad = misnamed_argument(load_dataset, t["kwargs"])
            if bad:
                r["bad_arg"] = list(bad)
                raise TypeError("load_dataset has no argument %r; did you mean %r?" % bad)
            ds = load_dataset(t["path"], **t["kwargs"])
            parts = list(ds.values()) if isinstance(ds, dict) else [ds]
            r["files"] = sorted({f["filename"] for d in parts for f in getattr(d, "cache_files", None) or []})
    except Exception as e:
        r["error"] = first_line(e)
    snap = t.get("snapshot")
    r["missing"] = [f for f in t.get("expect", []) if not (snap and os.path.exists(os.path.join(snap, f)))]
    out.append(r)
real_stdout.write(json.dumps(out) + "\n")
real_stdout.flush()
"""
)


class CheckError(HpcstageError):
    """The check process itself could not run (not: something is missing; that is a finding)."""


@dataclass
class EntryCheck:
    """One manifest entry as an offline job sees it: ok, or what is missing and the command that fixes it."""

    entry: str
    ok: bool
    problems: list[str] = field(default_factory=list)
    fix: str | None = None


@dataclass
class CheckReport:
    entries: list[EntryCheck]
    isolation: str  # "netns" (unshare -n: no network interface but a downed loopback) or "guard" (socket patch)
    seconds: float
    stack: JobStack | None = None  # the job's interpreter the loads ran in

    @property
    def ok(self) -> bool:
        return all(e.ok for e in self.entries)

    def as_dict(self) -> dict:
        return {
            "ok": self.ok,
            "isolation": self.isolation,
            "seconds": round(self.seconds, 3),
            "python": self.stack.python if self.stack else None,
            "versions": self.stack.versions if self.stack else None,
            "entries": [asdict(e) for e in self.entries],
        }


_netns: bool | None = None


def netns_available() -> bool:
    """True when `unshare -n` can start a process in a new network namespace here (root, or user namespaces)."""
    global _netns
    if _netns is None:
        try:
            _netns = subprocess.run(["unshare", "-n", "true"], capture_output=True, timeout=10).returncode == 0
        except (OSError, subprocess.TimeoutExpired):
            _netns = False
    return _netns


def _model_task(manifest: Manifest, entry, hub_cache: Path, lock) -> tuple[dict, dict]:
    """The child's task for a Hub repo, and what the parent needs to explain its findings."""
    from hpcstage import policy
    from hpcstage.hfcache import RepoCache
    from hpcstage.sources.hub import select

    cache = RepoCache(hub_cache, entry.repo_type, entry.repo)
    locked = lock.entries.get(entry.key) if lock else None
    commit = (
        (locked.commit if locked else None)
        or cache.read_ref(entry.revision)
        or (entry.revision if policy.is_commit(entry.revision) else None)
    )
    tree = cache.read_tree(commit) if commit else None
    selected = (
        [f.path for f in select(tree, entry.include, entry.exclude)]
        if tree is not None
        else ([f["path"] for f in locked.files] if locked and locked.matches(entry) else [])
    )
    in_repo = {f.path for f in tree} if tree is not None else set(selected)
    job_files = [f for f in JOB_FILES if f in in_repo] if entry.repo_type == "model" else []
    expect = sorted(set(selected) | set(job_files))
    task = {
        "kind": entry.repo_type,
        "repo": entry.repo,
        "revision": entry.revision,
        "include": entry.include,
        "exclude": entry.exclude,
        "snapshot": str(cache.snapshot(commit)) if commit else None,
        "expect": expect,
    }
    return task, {"selected": set(selected)}


def check(
    manifest: Manifest,
    *,
    cache_dir: Path | None = None,
    datasets_cache_dir: Path | None = None,
    isolation: str = "auto",
    timeout: float = 600,
    python: str | os.PathLike | None = None,
) -> CheckReport:
    """Do, in a child of the job's interpreter (`python`, else the manifest's `python:`, else HPCSTAGE_PYTHON,
    else this one) with the offline flags and the network off, what each job would do:
    models through `snapshot_download(..., local_files_only=True)` plus their config/tokenizer files,
    datasets through their `load:` call (else `snapshot_download`), `prebuild:` entries through theirs.

    isolation: "netns" (`unshare -n`), "guard" (socket connect patched in the child) or "auto" (netns
    where it works, else guard)."""
    from hpcstage.manifest import load_lock

    started = time.monotonic()
    if isolation == "auto":
        isolation = "netns" if netns_available() else "guard"
    if isolation not in ("netns", "guard"):
        raise ValueError(f"isolation must be auto, netns or guard, not {isolation!r}")
    stack = job_stack(manifest, python)
    child_env = job_env(manifest, cache_dir=cache_dir, datasets_cache_dir=datasets_cache_dir)
    hub_cache, ds_cache = Path(child_env["HF_HUB_CACHE"]), Path(child_env["HF_DATASETS_CACHE"])
    lock = load_lock(manifest.lock_path) if manifest.path else None
    m = shlex.quote(str(manifest.path)) if manifest.path else "hpcstage.yaml"
    flags = f" --cache-dir {shlex.quote(str(cache_dir))}" if cache_dir else ""  # the fix works on the same caches
    pull_fix = f"hpcstage pull -f {m}{flags}"
    if datasets_cache_dir:
        flags += f" --datasets-cache-dir {shlex.quote(str(datasets_cache_dir))}"
    if stack.origin == "--python":  # the fix must build for the same stack the check ran in
        flags += f" --python {shlex.quote(stack.python)}"
    prebuild_fix = f"hpcstage prebuild -f {m}{flags}"
    # a proven build whose offline load fails now (files removed or changed behind prebuild's back):
    # its marker would make a plain prebuild skip it, so the fix rebuilds
    rebuild_fix = f"{prebuild_fix} --force"

    tasks: list[dict] = []
    explain: list = []  # per entry: (label, kind, extra) for tasks, or a finished EntryCheck
    for entry in manifest.entries:
        if entry.repo_type == "dataset" and entry.load is not None:
            label = f"dataset {entry.repo} load({', '.join(f'{k}={v!r}' for k, v in entry.load.items())})"
            tasks.append({"kind": "load", "path": entry.repo, "kwargs": entry.load})
            explain.append(
                (label, "load", arrowbuilds.read_marker(ds_cache, arrowbuilds.hub_build(entry, lock), stack.datasets))
            )
            continue
        task, extra = _model_task(manifest, entry, hub_cache, lock)
        tasks.append(task)
        explain.append((f"{entry.repo_type} {entry.repo}@{entry.revision}", "snapshot", extra))
    if manifest.data_entries:  # url/local/file entries: staged, in place, and their `expect:` met
        from hpcstage.datadir import check_entries

        for label, problems, staged in check_entries(manifest, hub_cache, lock):
            # staged and in place but `expect:` fails: pulling again fetches the same data
            fix: str | None = (
                f"inspect the data, then fix the source or the entry's `expect:` in {m}" if staged else pull_fix
            )
            explain.append(EntryCheck(label, not problems, problems, fix if problems else None))
    for i, spec in enumerate(manifest.prebuild):
        build = arrowbuilds.local_build(
            spec, manifest.path.parent if manifest.path else Path.cwd(), where=f"{m}: prebuild[{i}]"
        )
        label = f"prebuild {build.label}"
        if build.missing:
            explain.append(
                EntryCheck(
                    label,
                    False,
                    [f"data file not found: {', '.join(build.missing)}"],
                    f"restore the file, or fix prebuild[{i}] in {m}",
                )
            )
        elif (marker := arrowbuilds.read_marker(ds_cache, build, stack.datasets)) is None:
            reason = arrowbuilds.read_failure(ds_cache, build, stack.datasets)
            if reason:  # prebuild built it but could not make it load offline: rerunning it changes nothing
                explain.append(
                    EntryCheck(
                        label,
                        False,
                        [f"prebuild cannot make {build.call} load offline (datasets {stack.datasets}): {reason}"],
                        _offline_form_fix(build, i, m, prebuild_fix),
                    )
                )
                continue
            # loading would build it now, in the job's place
            explain.append(
                EntryCheck(
                    label,
                    False,
                    [f"no prebuilt Arrow cache for {build.call} (datasets {stack.datasets})"],
                    prebuild_fix,
                )
            )
        else:
            tasks.append({"kind": "load", "path": build.path, "kwargs": build.kwargs})
            explain.append((label, "load", marker))

    answers = _run_child(tasks, child_env, isolation, timeout, stack.python) if tasks else []
    entries, it = [], iter(answers)
    for item in explain:
        if isinstance(item, EntryCheck):
            entries.append(item)
            continue
        label, kind, extra = item
        r = next(it)
        if kind == "load":
            problems = [] if r["error"] is None else [f"offline load_dataset failed: {r['error']}"]
            if r.get("bad_arg"):  # prebuild would fail the same way: the manifest is what to fix
                bad, near = r["bad_arg"]
                entries.append(
                    EntryCheck(
                        label, False, problems, f"change {bad!r} to {near!r} in `load:` in {m}, then `{prebuild_fix}`"
                    )
                )
                continue
            got = os.path.dirname(r["files"][0]) if r["files"] else None
            if extra is not None and got and os.path.realpath(got) != os.path.realpath(extra["cache_dir"]):
                problems.append(
                    f"offline load reads {got}, not the build prebuilt for this commit "
                    f"({extra['cache_dir']}): datasets picks the newest build"
                )
            # a newer build winning: prebuild's skip puts the proven one back on top; a proven build that
            # fails to load now: only a rebuild (--force) makes and proves it again
            fix = None if not problems else rebuild_fix if extra is not None and r["error"] else prebuild_fix
            entries.append(EntryCheck(label, not problems, problems, fix))
            continue
        problems, fix = [], None
        for f in r["missing"]:
            problems.append(f"{f} is in the repo but not staged")
        unselected = [f for f in r["missing"] if f not in extra["selected"]]
        if unselected:  # one fix for all of them, not one run per file
            fix = (
                f"add {', '.join(repr(f) for f in unselected)} to include (or drop the exclude that matches "
                f"{'it' if len(unselected) == 1 else 'them'}) in {m}, then `{pull_fix}`"
            )
        if r["error"] and not r["missing"]:
            problems.append(f"offline snapshot_download failed: {r['error']}")
        if problems and fix is None:
            fix = pull_fix
        entries.append(EntryCheck(label, not problems, problems, fix))
    return CheckReport(entries, isolation, time.monotonic() - started, stack)


def _offline_form_fix(build, index: int, manifest: str, prebuild_fix: str) -> str:
    """The edit that makes a load provable offline, then the command. `hf://` data files need the network
    to be listed even offline: the same files by repo id load from the prebuilt cache."""
    files = build.kwargs.get("data_files")
    if isinstance(files, str) and files.startswith("hf://datasets/"):
        parts = files[len("hf://datasets/") :].split("/", 2)  # org, name[@rev], path pattern in the repo
        if len(parts) == 3:
            repo = f"{parts[0]}/{parts[1].split('@')[0]}"
            return (
                f"in {manifest} write prebuild[{index}] as {{path: {repo}, data_files: {parts[2]!r}}} and load it "
                f"so in the job (hf:// paths need the network offline), then `{prebuild_fix}`"
            )
    return (
        f"change prebuild[{index}] in {manifest} to a form that loads offline (a Hub repo id with data_files "
        f"inside it, or local files), then `{prebuild_fix}`"
    )


def isolated_command(code: str, isolation: str, python: str | None = None) -> list[str]:
    """argv running Python `code` in `python` (default: this interpreter) with the network off: in a new
    network namespace, or behind the guard."""
    python = python or sys.executable
    if isolation == "netns":
        return ["unshare", "-n", python, "-c", code]
    return [python, "-c", _GUARD + code]


def _run_child(
    tasks: list[dict], child_env: dict[str, str], isolation: str, timeout: float, python: str | None = None
) -> list[dict]:
    argv = isolated_command(_CHECK, isolation, python)
    try:
        r = subprocess.run(
            argv, input=json.dumps(tasks), env=child_env, capture_output=True, text=True, timeout=timeout
        )
    except subprocess.TimeoutExpired:
        raise CheckError(f"the offline check process did not finish in {timeout:g}s") from None
    try:
        answers = json.loads(r.stdout.strip().splitlines()[-1])
    except (IndexError, ValueError):
        tail = [s for s in r.stderr.strip().splitlines() if s.strip()][-1:] or ["no output"]
        raise CheckError(
            f"the offline check process ({python or sys.executable}) exited with code {r.returncode} ({tail[0]})"
        ) from None
    if len(answers) != len(tasks):
        raise CheckError("the offline check process answered for the wrong number of entries")
    return answers
