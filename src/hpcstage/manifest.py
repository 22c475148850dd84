"""The manifest (`hpcstage.yaml`, what the user wants) and the lockfile (`hpcstage.lock`, what was resolved).

Errors name `file:line`, the key and the nearest valid key, because a typo found at submit time costs a
day in the queue. The lockfile is JSON: a warm `pull` of a 2,000-file repo reads it in milliseconds.
"""
from __future__ import annotations

import difflib
import json
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, ValidationError, field_validator

from hpcstage import policy
from hpcstage.errors import BadInput, ManifestError, PolicyError
from hpcstage.hfcache import CachedFile, write_atomic

LOCK_NAME = "hpcstage.lock"
LOCK_VERSION = 1


def _as_value_error(check, value):
    """pydantic reports ValueErrors with their location, which the manifest loader turns into file:line."""
    try:
        return check(value)
    except PolicyError as e:
        raise ValueError(str(e)) from None


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class HubEntry(_Strict):
    """A Hub repo (model or dataset) at a revision, optionally filtered by glob patterns."""

    repo: str
    repo_type: Literal["model", "dataset"] = "model"
    revision: str = "main"
    include: list[str] | None = None
    exclude: list[str] | None = None
    load: dict[str, Any] | None = None  # datasets only: the load_dataset arguments jobs will use

    @field_validator("repo")
    @classmethod
    def _repo(cls, v: str) -> str:
        return _as_value_error(policy.check_repo_id, v)

    @field_validator("revision")
    @classmethod
    def _revision(cls, v: str) -> str:
        return _as_value_error(policy.check_revision, v)

    @property
    def key(self) -> str:
        """Identity in the lockfile: one entry per repo and revision."""
        return f"{self.repo_type}:{self.repo}@{self.revision}"


class Manifest(_Strict):
    cache_dir: Path | None = None
    datasets_cache_dir: Path | None = None
    allow: list[str] | None = None
    shared_group: str | None = None  # a group-shared cache: folders setgid + group-writable, files group-readable
    models: list[HubEntry] = []
    datasets: list[HubEntry] = []
    prebuild: list[dict[str, Any]] = []
    path: Path | None = None  # where it was read from; not a manifest key

    @property
    def entries(self) -> list[HubEntry]:
        return [*self.models, *self.datasets]

    @property
    def lock_path(self) -> Path:
        assert self.path is not None, "an in-memory manifest has no lockfile"
        return self.path.parent / LOCK_NAME


def hub_entry(**fields: Any) -> HubEntry:
    """Build one entry from command-line values; invalid ones are a one-line BadInput."""
    try:
        return HubEntry(**fields)
    except ValidationError as e:
        raise BadInput(e.errors()[0]["msg"].removeprefix("Value error, ")) from None


_MANIFEST_KEYS = sorted(k for k in Manifest.model_fields if k != "path")
_HUB_KEYS = sorted(k for k in HubEntry.model_fields if k != "repo_type")
_NOT_YET = {"url", "local", "file"}


def _lines_of(text: str) -> dict[tuple, int]:
    """Map each key path (('models', 0, 'repo')) to its 1-based line in the YAML text."""
    node = yaml.compose(text, Loader=yaml.SafeLoader)
    lines: dict[tuple, int] = {}

    def walk(n: yaml.Node, loc: tuple) -> None:
        lines.setdefault(loc, n.start_mark.line + 1)
        if isinstance(n, yaml.MappingNode):
            for k, v in n.value:
                lines[loc + (k.value,)] = k.start_mark.line + 1
                walk(v, loc + (k.value,))
        elif isinstance(n, yaml.SequenceNode):
            for i, item in enumerate(n.value):
                walk(item, loc + (i,))

    if node is not None:
        walk(node, ())
    return lines


def _where(path: Path, lines: dict[tuple, int], loc: tuple) -> str:
    for n in range(len(loc), -1, -1):
        if loc[:n] in lines:
            return f"{path}:{lines[loc[:n]]}"
    return str(path)


def _dotted(loc: tuple) -> str:
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


def _explain(err: dict, valid: list[str]) -> str:
    loc = err["loc"]
    if err["type"] == "extra_forbidden":
        key = str(loc[-1])
        near = difflib.get_close_matches(key, valid, n=1)
        hint = f"did you mean {near[0]!r}?" if near else f"valid keys: {', '.join(valid)}"
        return f"unknown key {key!r} in {_dotted(loc[:-1]) or 'the manifest'}; {hint}"
    if err["type"] == "missing":
        return f"{_dotted(loc)} is required"
    msg = err["msg"].removeprefix("Value error, ")
    return f"{_dotted(loc)}: {msg}"


def load_manifest(path: str | Path) -> Manifest:
    """Read and validate a manifest; every problem is a ManifestError naming file:line and the fix."""
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as e:
        raise ManifestError(f"cannot read manifest {path}: {e.strerror}; pass an existing file with -f") from None
    try:
        data = yaml.safe_load(text)
        lines = _lines_of(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"{path}:{mark.line + 1}" if mark else str(path)
        raise ManifestError(f"{where}: not valid YAML ({getattr(e, 'problem', e)})") from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ManifestError(f"{path}:1: a manifest is a mapping with keys {', '.join(_MANIFEST_KEYS)}")
    for section in ("models", "datasets"):
        items = data.get(section)
        if items is None:
            continue
        if not isinstance(items, list):
            raise ManifestError(f"{_where(path, lines, (section,))}: {section} must be a list of entries")
        for i, item in enumerate(items):
            if isinstance(item, dict):
                if section == "datasets" and _NOT_YET & item.keys() and "repo" not in item:
                    kind = sorted(_NOT_YET & item.keys())[0]
                    raise ManifestError(
                        f"{_where(path, lines, (section, i))}: `{kind}:` entries are not supported by this "
                        "version of hpcstage; stage this dataset by hand or use a Hub `repo:` entry"
                    )
                if section == "models" and "load" in item:
                    raise ManifestError(
                        f"{_where(path, lines, (section, i, 'load'))}: `load:` is for datasets entries only"
                    )
                item.setdefault("repo_type", "model" if section == "models" else "dataset")
    try:
        manifest = Manifest(**data, path=path)
    except ValidationError as e:
        err = e.errors()[0]
        loc = err["loc"]
        valid = _HUB_KEYS if len(loc) >= 3 and loc[0] in ("models", "datasets") else _MANIFEST_KEYS
        raise ManifestError(f"{_where(path, lines, loc)}: {_explain(err, valid)}") from None
    except TypeError:
        raise ManifestError(f"{path}: the manifest's top level must use keys {', '.join(_MANIFEST_KEYS)}") from None
    for key in ("cache_dir", "datasets_cache_dir"):
        folder = getattr(manifest, key)
        if folder is not None and not folder.is_absolute():
            manifest = manifest.model_copy(update={key: (path.parent / folder).resolve()})
    seen: set[str] = set()
    for entry in manifest.entries:
        if entry.key in seen:
            raise ManifestError(f"{path}: {entry.repo}@{entry.revision} is listed twice; keep one entry")
        seen.add(entry.key)
    return manifest


class LockedEntry(_Strict):
    """What one manifest entry resolved to: the commit and every selected file with its hash."""

    repo_type: str
    repo: str
    revision: str
    commit: str
    include: list[str] | None = None
    exclude: list[str] | None = None
    files: list[dict[str, Any]]  # {path, size, blob_id, sha256?}

    def cached_files(self) -> list[CachedFile]:
        return [CachedFile(f["path"], f["size"], f["blob_id"], f.get("sha256")) for f in self.files]

    def matches(self, entry: HubEntry) -> bool:
        """Same repo, revision and patterns: the locked file list is the one this entry wants."""
        return (self.repo_type, self.repo, self.revision, self.include, self.exclude) == (
            entry.repo_type, entry.repo, entry.revision, entry.include, entry.exclude,
        )


class Lockfile(_Strict):
    version: int = LOCK_VERSION
    entries: dict[str, LockedEntry] = {}


def load_lock(path: Path) -> Lockfile:
    """An absent lockfile is empty; a corrupt one is an error (never silently re-resolved)."""
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        return Lockfile()
    try:
        lock = Lockfile.model_validate_json(raw)
    except ValidationError:
        raise ManifestError(f"{path} is not a valid hpcstage lockfile; delete it and run `hpcstage pull -f ... --update`") from None
    if lock.version != LOCK_VERSION:
        raise ManifestError(f"{path} has lock version {lock.version}; run `hpcstage pull -f ... --update`")
    return lock


def entry_lock(entry: HubEntry, commit: str, files: list[CachedFile]) -> LockedEntry:
    return LockedEntry(
        repo_type=entry.repo_type,
        repo=entry.repo,
        revision=entry.revision,
        commit=commit,
        include=entry.include,
        exclude=entry.exclude,
        files=[
            {"path": f.path, "size": f.size, "blob_id": f.blob_id, **({"sha256": f.sha256} if f.sha256 else {})}
            for f in sorted(files, key=lambda f: f.path)
        ],
    )


def save_lock(path: Path, lock: Lockfile) -> None:
    write_atomic(path, (lock.model_dump_json(indent=1) + "\n").encode())
