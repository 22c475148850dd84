"""One `load_dataset` call a job will make (`Build`) and the marker that records it built and proven offline.

Apart from the build machinery (arrowcache.py, which writes the markers) because `check` (offline.py) reads
them: it asks "is this call's build there and proven for the job's datasets version?" without starting
children or taking leases, and arrowcache in turn needs offline.py's job environment.
"""

from __future__ import annotations

import glob
import hashlib
import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hpcstage import safefs
from hpcstage.errors import BadInput
from hpcstage.layout import ARROW_MARKER_DIR as MARKER_DIR
from hpcstage.manifest import HubEntry, Lockfile

MARKER_VERSION = 2  # 2: one marker per datasets version, written after an offline proof
# datasets' packaged builders: their data_files are local paths; any other `path` is a Hub repo id
PACKAGED = frozenset(
    "json csv parquet text arrow pandas webdataset xml sql imagefolder audiofolder videofolder pdffolder".split()
)
_GLOB_CHARS = frozenset("*?[")


@dataclass(frozen=True)
class Build:
    """One `load_dataset(path, **kwargs)` call, as a job will make it (with the locked commit for Hub
    repos). `label` is what the log names: the Hub repo id, or the local data file."""

    path: str
    kwargs: dict[str, Any] = field(hash=False)
    label: str = ""
    local_files: tuple[str, ...] = ()  # absolute local data files (their mtimes key datasets' cache)
    missing: tuple[str, ...] = ()  # local data files named but absent

    @property
    def key(self) -> str:
        """Stable across processes and nodes: a hash of the call (not of the label or of mtimes)."""
        text = json.dumps({"path": self.path, "kwargs": self.kwargs}, sort_keys=True, default=str)
        return hashlib.sha256(text.encode()).hexdigest()[:32]

    @property
    def call(self) -> str:
        args = [repr(self.path)] + [f"{k}={v!r}" for k, v in self.kwargs.items()]
        return f"load_dataset({', '.join(args)})"

    def fingerprint(self) -> list[list]:
        """[path, size, mtime_ns] of each local data file: what datasets hashes besides the arguments."""
        out = []
        for p in self.local_files:
            st = os.stat(p)
            out.append([p, st.st_size, st.st_mtime_ns])
        return out


def _strings(value: Any) -> list[str]:
    if isinstance(value, str):
        return [value]
    if isinstance(value, (list, tuple)):
        return [s for v in value for s in _strings(v)]
    if isinstance(value, dict):
        return [s for v in value.values() for s in _strings(v)]
    return []


def _absolute(value: Any, base: Path) -> Any:
    """data_files with relative local paths made absolute against `base` (the manifest's folder)."""
    if isinstance(value, str):
        return value if "://" in value or os.path.isabs(value) else str((base / value).absolute())
    if isinstance(value, (list, tuple)):
        return [_absolute(v, base) for v in value]
    if isinstance(value, dict):
        return {k: _absolute(v, base) for k, v in value.items()}
    return value


def local_build(spec: dict[str, Any], base: Path, where: str = "prebuild") -> Build:
    """A `prebuild:` entry: `{path: json, data_files: ..., field: test, split: train}`."""
    if not isinstance(spec, dict) or not isinstance(spec.get("path"), str):
        raise BadInput(
            f"{where}: each prebuild entry is a mapping with a `path:` (e.g. "
            "{path: json, data_files: /data/eval.json, split: train})"
        )
    kwargs = {k: v for k, v in spec.items() if k != "path"}
    path = spec["path"]
    local_path = path not in PACKAGED and os.path.exists(base / path)
    if path not in PACKAGED and not local_path:  # a Hub repo id: data_files are paths inside the repo
        names = _strings(kwargs.get("data_files"))
        return Build(
            path, kwargs, label=f"{path} data_files={names[0] if len(names) == 1 else names}" if names else path
        )
    if local_path:
        path = str((base / path).absolute())
    if "data_files" in kwargs:
        kwargs["data_files"] = _absolute(kwargs["data_files"], base)
    files, missing = [], []
    for pattern in _strings(kwargs.get("data_files")):
        if "://" in pattern:
            continue
        if _GLOB_CHARS & set(pattern):
            found = sorted(glob.glob(pattern, recursive=True))
            (files.extend(found) if found else missing.append(pattern))
        else:
            (files.append(pattern) if os.path.isfile(pattern) else missing.append(pattern))
    names = _strings(kwargs.get("data_files"))
    label = names[0] if len(names) == 1 else f"{path} {names}" if names else path
    return Build(path, kwargs, label=label, local_files=tuple(files), missing=tuple(missing))


def hub_build(entry: HubEntry, lock: Lockfile | None) -> Build:
    """A `datasets:` entry's `load:` call, at its locked commit (else its revision)."""
    locked = lock.entries.get(entry.key) if lock else None
    revision = locked.commit if locked else entry.revision
    return Build(entry.repo, {"revision": revision, **(entry.load or {})}, label=entry.repo)


def marker_path(datasets_cache_dir: Path, build: Build, datasets_version: str) -> Path:
    """One marker per build and job stack's datasets version: a build proven for 5.2 says nothing of 4.0."""
    safe = "".join(c if c.isalnum() or c in ".-+" else "_" for c in datasets_version)
    return Path(datasets_cache_dir) / MARKER_DIR / f"{build.key}.datasets-{safe}.json"


def failure_path(datasets_cache_dir: Path, build: Build, datasets_version: str) -> Path:
    """Why the last build of this call for this datasets version could not be proven offline (check names it)."""
    return marker_path(datasets_cache_dir, build, datasets_version).with_suffix(".failed")


def read_failure(datasets_cache_dir: Path, build: Build, datasets_version: str) -> str | None:
    """The reason recorded by the last failed proof, while the local data files are unchanged."""
    try:
        record = json.loads(failure_path(datasets_cache_dir, build, datasets_version).read_text())
        return record["error"] if record.get("fingerprint") == build.fingerprint() else None
    except (OSError, ValueError, KeyError, TypeError):
        return None


def read_marker(datasets_cache_dir: Path, build: Build, datasets_version: str) -> dict | None:
    """The marker of a finished, proven build for this datasets version if it still holds: same local data
    files (size, mtime), every recorded cache file present with its size, and the config alias (if one
    was made) still in place. A few stats: well under a millisecond per build."""
    try:
        marker = json.loads(marker_path(datasets_cache_dir, build, datasets_version).read_text())
        if marker.get("version") != MARKER_VERSION or marker.get("fingerprint") != build.fingerprint():
            return None
        for f in marker["files"]:
            if os.stat(f["path"]).st_size != f["size"]:
                return None
        if marker.get("alias") and not os.path.isdir(marker["alias"]):
            return None
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return marker


def write_marker(
    datasets_cache_dir: Path, build: Build, cache_dir: str, seconds: float, datasets_version: str, alias: str | None
) -> None:
    folder = Path(cache_dir)
    files = [
        {"path": str(p), "size": p.stat().st_size}
        for p in sorted(folder.iterdir())
        if p.is_file() and (p.suffix == ".arrow" or p.name == "dataset_info.json")
    ]
    marker = {
        "version": MARKER_VERSION,
        "key": build.key,
        "path": build.path,
        "kwargs": build.kwargs,
        "datasets": datasets_version,
        "fingerprint": build.fingerprint(),
        "cache_dir": str(folder),
        "files": files,
        "alias": alias,
        "proven": True,
        "built_at": time.time(),
        "seconds": round(seconds, 3),
    }
    safefs.write_atomic(
        datasets_cache_dir,
        marker_path(datasets_cache_dir, build, datasets_version),
        json.dumps(marker, indent=1, default=str).encode(),
    )
