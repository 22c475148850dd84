"""The manifest (`hpcstage.yaml`, what the user wants) and the lockfile (`hpcstage.lock`, what was resolved).

Errors name `file:line`, the key and the nearest valid key, because a typo found at submit time costs a
day in the queue. The lockfile is JSON: a warm `pull` of a 2,000-file repo reads it in milliseconds.

Why one module of about 570 lines: most of it is the manifest's and the lockfile's pydantic models (their
fields, each with its comment, and the validators that are their rules), plus the `file:line` error
machinery (`_lines_of`, `_where`, `_explain`) the manifest is validated with.
"""

from __future__ import annotations

import difflib
import os
import shlex
from collections.abc import Collection, Mapping
from pathlib import Path
from typing import Annotated, Any, ClassVar, Literal

import yaml
from pydantic import AfterValidator, BaseModel, ConfigDict, ValidationError, field_validator, model_validator

from hpcstage import policy, safefs
from hpcstage.errors import BadInput, ManifestError, PolicyError
from hpcstage.hfcache import CachedFile
from hpcstage.yamlfile import read_yaml

# `--update`: every entry (True), none (False), or the entries these names pick (options.entry_names)
Update = bool | Collection[str]

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


RepoId = Annotated[str, AfterValidator(lambda v: _as_value_error(policy.check_repo_id, v))]
Revision = Annotated[str, AfterValidator(lambda v: _as_value_error(policy.check_revision, v))]


class HubEntry(_Strict):
    """A Hub repo (model or dataset) at a revision, optionally filtered by glob patterns."""

    repo: RepoId
    repo_type: Literal["model", "dataset"] = "model"
    revision: Revision = "main"
    include: list[str] | None = None
    exclude: list[str] | None = None
    load: dict[str, Any] | None = None  # datasets only: the load_dataset arguments jobs will use

    @property
    def key(self) -> str:
        """Identity in the lockfile: one entry per repo and revision."""
        return f"{self.repo_type}:{self.repo}@{self.revision}"


# -- data entries: `url:`, `local:` and `repo:` + `file:` under `datasets:`, staged under `data_dir/<dest>` --

_SHA256_HEX = frozenset("0123456789abcdef")


def _size(v: Any) -> int:
    """Bytes as an int or a string like "500GB" / "2TiB" (manifest limits)."""
    if isinstance(v, int) and not isinstance(v, bool):
        return v
    if isinstance(v, str):
        text = v.strip().upper().replace(" ", "")
        for unit, mult in (
            ("TIB", 1 << 40),
            ("GIB", 1 << 30),
            ("MIB", 1 << 20),
            ("KIB", 1 << 10),
            ("TB", 10**12),
            ("GB", 10**9),
            ("MB", 10**6),
            ("KB", 10**3),
            ("B", 1),
        ):
            if text.endswith(unit):
                try:
                    return int(float(text[: -len(unit)]) * mult)
                except ValueError:
                    break
        if text.isdigit():
            return int(text)
    raise ValueError(f"{v!r} is not a size; use bytes or a string like '500GB'")


class Expect(_Strict):
    """Structure checks after staging, relative to the entry's dest folder."""

    files: list[str] = []
    dirs: list[str] = []
    jsonl: list[str] | dict[str, int | None] = []  # paths, or {path: record count}
    count: dict[str, int] = {}  # {glob: number of files}; a glob without '/' matches names at any depth

    @field_validator("files", "dirs")
    @classmethod
    def _paths(cls, v: list[str]) -> list[str]:
        return [_as_value_error(lambda p: policy.check_relative_path(p, "expect path"), p) for p in v]

    @field_validator("jsonl")
    @classmethod
    def _jsonl(cls, v):
        for p in v:
            _as_value_error(lambda x: policy.check_relative_path(x, "expect path"), p)
        return v


class _DataEntry(_Strict):
    dest: str  # folder under data_dir
    extract: bool = False
    strip_components: int = 0
    expect: Expect | None = None
    max_unpacked_bytes: int | None = None
    max_ratio: float | None = None
    max_members: int | None = None

    @field_validator("dest")
    @classmethod
    def _dest(cls, v: str) -> str:
        v = _as_value_error(lambda p: policy.check_relative_path(p.rstrip("/"), "dest"), v.rstrip("/"))
        if v.split("/")[0] == ".hpcstage" or v.endswith((".hpcstage-build", ".hpcstage-old")):
            raise ValueError(f"dest {v!r} is hpcstage's own state in the data folder; pick another name")
        return v

    @field_validator("max_unpacked_bytes", mode="before")
    @classmethod
    def _max_bytes(cls, v):
        return None if v is None else _size(v)

    @field_validator("strip_components", "max_members", "max_unpacked_bytes", "max_ratio")
    @classmethod
    def _non_negative(cls, v):
        if v is not None and v < 0:
            raise ValueError("must be 0 or more")
        return v

    @property
    def key(self) -> str:
        """Identity in the lockfile: the dest folder (one entry per dest)."""
        return f"data:{self.dest}"

    def limits(self):
        from hpcstage.archive import Limits

        base = Limits()
        return Limits(
            max_bytes=self.max_unpacked_bytes if self.max_unpacked_bytes is not None else base.max_bytes,
            max_ratio=self.max_ratio if self.max_ratio is not None else base.max_ratio,
            max_members=self.max_members if self.max_members is not None else base.max_members,
        )


class UrlEntry(_DataEntry):
    """A file fetched over HTTPS (http:// only with allow_http); never sent the HF token."""

    url: str
    sha256: str | None = None
    allow_http: bool = False
    keep_archive: bool = False

    kind: ClassVar[str] = "url"

    @field_validator("sha256", mode="before")
    @classmethod
    def _sha_text(cls, v):
        if v is not None and not isinstance(v, str):
            raise ValueError("YAML read it as a number; quote it: sha256: '<64 hex digits>'")
        return v

    @field_validator("sha256")
    @classmethod
    def _sha(cls, v: str | None) -> str | None:
        if v is not None and (len(v) != 64 or not set(v.lower()) <= _SHA256_HEX):
            raise ValueError(f"{v!r} is not a sha256 (64 hex digits)")
        return v.lower() if v else v

    @model_validator(mode="after")
    def _scheme(self) -> UrlEntry:
        from urllib.parse import urlsplit

        parts = urlsplit(self.url)
        if parts.scheme == "http" and not self.allow_http:
            raise ValueError(
                f"refused url {self.url!r}: http:// is not encrypted; use https:// or set "
                "`allow_http: true` on the entry"
            )
        if parts.scheme not in ("https", "http") or not parts.hostname:
            raise ValueError(f"refused url {self.url!r}: use an https:// URL")
        return self

    @property
    def source(self) -> str:
        return self.url


class LocalEntry(_DataEntry):
    """A local folder or file (relative to the manifest's folder), copied with hardlinks/reflinks when it can."""

    local: Path

    kind: ClassVar[str] = "local"

    @property
    def source(self) -> str:
        return str(self.local)


class HubFileEntry(_DataEntry):
    """One file of a Hub repo, staged through the hub cache, then copied or extracted to dest."""

    repo: RepoId
    file: str
    repo_type: Literal["model", "dataset"] = "dataset"
    revision: Revision = "main"

    kind: ClassVar[str] = "hub-file"

    @field_validator("file")
    @classmethod
    def _file(cls, v: str) -> str:
        return _as_value_error(lambda p: policy.check_relative_path(p, "file"), v)

    @property
    def source(self) -> str:
        return f"{self.repo_type}:{self.repo}@{self.revision}:{self.file}"

    def hub_entry(self) -> HubEntry:
        return HubEntry(repo=self.repo, repo_type=self.repo_type, revision=self.revision, include=[self.file])


DataEntry = UrlEntry | LocalEntry | HubFileEntry


class Manifest(_Strict):
    cache_dir: Path | None = None
    datasets_cache_dir: Path | None = None
    data_dir: Path | None = None  # where url/local/file entries land; default: beside the hub cache
    allow: list[str] | None = None
    shared_group: str | None = None  # a group-shared cache: folders setgid + group-writable, files group-readable
    python: str | None = None  # the jobs' interpreter: prebuild and check run their loads in it
    models: list[HubEntry] = []
    datasets: list[HubEntry] = []
    prebuild: list[dict[str, Any]] = []
    path: Path | None = None  # where it was read from; not a manifest key
    data_entries: list[DataEntry] = []  # `datasets:` items with url/local/file; not a manifest key

    @property
    def entries(self) -> list[HubEntry]:
        """The Hub repo entries (models and `repo:` datasets); data entries are in `data_entries`."""
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


_MANIFEST_KEYS = sorted(k for k in Manifest.model_fields if k not in ("path", "data_entries"))
_HUB_KEYS = sorted(k for k in HubEntry.model_fields if k != "repo_type")


def _data_model(item: dict) -> type[UrlEntry] | type[LocalEntry] | type[HubFileEntry] | None:
    """Which data entry model a `datasets:` item is, by its keys; None for a Hub repo entry."""
    if "url" in item:
        return UrlEntry
    if "local" in item:
        return LocalEntry
    if "file" in item:
        return HubFileEntry
    return None


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


def _explain(err: Mapping[str, Any], valid: list[str]) -> str:
    loc = err["loc"]
    if err["type"] == "extra_forbidden":
        key = str(loc[-1])
        near = difflib.get_close_matches(key, valid, n=1)
        hint = f"did you mean {near[0]!r}?" if near else f"valid keys: {', '.join(valid)}"
        return f"unknown key {key!r} in {_dotted(loc[:-1]) or 'the manifest'}; {hint}"
    if err["type"] == "missing":
        return f"{_dotted(loc)} is required"
    msg = err["msg"].removeprefix("Value error, ")
    key = loc[-1] if loc else ""
    value = err.get("input")
    if err["type"] == "string_type" and isinstance(value, (int, float)) and not isinstance(value, bool):
        return (
            f"{_dotted(loc)}: YAML read {value!r} as a number; quote it: {key}: '{value}'"
            if isinstance(key, str)
            else f"{_dotted(loc)}: YAML read {value!r} as a number; quote it: '{value}'"
        )
    if err["type"] == "list_type" and isinstance(value, str) and isinstance(key, str):
        return f"{_dotted(loc)} is a list, not a string; write {key}: [{value!r}]"
    return f"{_dotted(loc)}: {msg}"


def load_manifest(path: str | Path) -> Manifest:
    """Read and validate a manifest; every problem is a ManifestError naming file:line and the fix."""
    path = Path(path)
    data, text = read_yaml(path, "manifest", ManifestError, "pass an existing UTF-8 YAML file with -f")
    lines = _lines_of(text)
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
                if section == "models" and _data_model(item) is not None:
                    raise ManifestError(
                        f"{_where(path, lines, (section, i))}: url/local/file entries go under "
                        "`datasets:`, not `models:`"
                    )
                if section == "models" and "load" in item:
                    raise ManifestError(
                        f"{_where(path, lines, (section, i, 'load'))}: `load:` is for datasets entries only"
                    )
                item.setdefault("repo_type", "model" if section == "models" else "dataset")
    if "data_entries" in data:
        raise ManifestError(
            f"{_where(path, lines, ('data_entries',))}: unknown key 'data_entries' in the manifest; "
            f"valid keys: {', '.join(_MANIFEST_KEYS)}"
        )
    data_entries, hub_index = _load_data_entries(path, data, lines)
    try:
        manifest = Manifest(**data, path=path, data_entries=data_entries)
    except ValidationError as e:
        err = e.errors()[0]
        loc = err["loc"]
        if loc[:1] == ("datasets",) and len(loc) > 1 and isinstance(loc[1], int) and loc[1] < len(hub_index):
            loc = ("datasets", hub_index[loc[1]], *loc[2:])  # its place in the file, among the data entries
            err = {**err, "loc": loc}
        valid = _HUB_KEYS if len(loc) >= 3 and loc[0] in ("models", "datasets") else _MANIFEST_KEYS
        raise ManifestError(f"{_where(path, lines, loc)}: {_explain(err, valid)}") from None
    except TypeError:
        raise ManifestError(f"{path}: the manifest's top level must use keys {', '.join(_MANIFEST_KEYS)}") from None
    for key in ("cache_dir", "datasets_cache_dir", "data_dir"):
        folder = getattr(manifest, key)
        if folder is not None and not folder.is_absolute():
            manifest = manifest.model_copy(update={key: (path.parent / folder).resolve()})
    if manifest.python:  # ~ and $VARS expanded, relative to this file's folder; symlinks kept (a venv's python is one)
        python = Path(os.path.expandvars(os.path.expanduser(manifest.python)))
        manifest = manifest.model_copy(update={"python": str((path.parent / python).absolute())})
    seen: set[str] = set()
    for entry in manifest.entries:
        if entry.key in seen:
            raise ManifestError(f"{path}: {entry.repo}@{entry.revision} is listed twice; keep one entry")
        seen.add(entry.key)
    dests: dict[str, str] = {}
    for data in manifest.data_entries:
        for other, src in dests.items():
            if data.dest == other or data.dest.startswith(other + "/") or other.startswith(data.dest + "/"):
                raise ManifestError(
                    f"{path}: dest {data.dest!r} ({data.source}) overlaps dest {other!r} ({src}); "
                    "give each data entry its own folder"
                )
        dests[data.dest] = data.source
    return manifest


def _load_data_entries(path: Path, data: dict, lines: dict[tuple, int]) -> tuple[list[DataEntry], list[int]]:
    """Take the url/local/file items out of `datasets:` and validate each with its own model. Also
    returns where each remaining Hub item stood in the file's list, for error locations."""
    items = data.get("datasets")
    if not isinstance(items, list):
        return [], []
    out: list[DataEntry] = []
    hub_items, hub_index = [], []
    for i, item in enumerate(items):
        model = _data_model(item) if isinstance(item, dict) else None
        if model is None:
            hub_items.append(item)
            hub_index.append(i)
            continue
        fields = {k: v for k, v in item.items() if not (k == "repo_type" and model is not HubFileEntry)}
        if model is not HubFileEntry and "repo" in fields:
            raise ManifestError(
                f"{_where(path, lines, ('datasets', i, 'repo'))}: an entry has either `repo:` "
                f"(with optional `file:`) or `{model.kind}:`, not both"
            )
        try:
            entry = model(**fields)
        except ValidationError as e:
            err = e.errors()[0]
            loc = ("datasets", i, *err["loc"])
            err = {**err, "loc": loc}
            valid = (
                sorted(Expect.model_fields)
                if "expect" in loc[:-1]
                else sorted(k for k in model.model_fields if k != "repo_type" or model is HubFileEntry)
            )
            raise ManifestError(f"{_where(path, lines, loc)}: {_explain(err, valid)}") from None
        if isinstance(entry, LocalEntry) and not entry.local.is_absolute():
            entry = entry.model_copy(update={"local": (path.parent / entry.local).resolve()})
        out.append(entry)
    data["datasets"] = hub_items
    return out, hub_index


class LockedEntry(_Strict):
    """What one manifest entry resolved to: the commit and every selected file with its hash."""

    repo_type: str
    repo: str
    revision: str
    commit: str
    include: list[str] | None = None
    exclude: list[str] | None = None
    files: list[dict[str, Any]]  # {path, size, blob_id, sha256?, xet_hash?}

    @field_validator("files")
    @classmethod
    def _files(cls, files: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """A lockfile is a file anyone can edit: its paths and blob ids must be ones a listing could give."""
        for f in files:
            try:
                policy.check_relative_path(f["path"], "path in the lockfile")
                CachedFile(f["path"], int(f["size"]), f["blob_id"], f.get("sha256"), f.get("xet_hash"))
            except (KeyError, TypeError, ValueError, PolicyError) as e:
                raise ValueError(f"bad file record {f!r} ({e})") from None
        return files

    def cached_files(self) -> list[CachedFile]:
        return [CachedFile(f["path"], f["size"], f["blob_id"], f.get("sha256"), f.get("xet_hash")) for f in self.files]

    def matches(self, entry: HubEntry) -> bool:
        """Same repo, revision and patterns: the locked file list is the one this entry wants."""
        return (self.repo_type, self.repo, self.revision, self.include, self.exclude) == (
            entry.repo_type,
            entry.repo,
            entry.revision,
            entry.include,
            entry.exclude,
        )


class LockedData(_Strict):
    """What one data entry staged: where from (and the fingerprint of that source: the server's validator,
    or the local files' sizes and mtimes), the fetched file's sha256, and every file under dest."""

    kind: str  # url | local | hub-file
    source: str
    dest: str
    extract: bool = False
    strip_components: int = 0
    sha256: str | None = None  # the downloaded file (url) or the hub file (hub-file)
    size: int | None = None
    fingerprint: str | None = None
    commit: str | None = None  # hub-file: the resolved commit
    blob_id: str | None = None  # hub-file: the git blob sha1, for the hub lock of the one file
    lfs: bool = False  # hub-file: an LFS file (its blob is named by sha256)
    archive: str | None = None  # url + keep_archive: where the archive was kept
    files: list[dict[str, Any]] = []  # {path, size, sha256} under dest

    def matches(self, entry: DataEntry) -> bool:
        return (self.kind, self.source, self.dest, self.extract, self.strip_components) == (
            entry.kind,
            entry.source,
            entry.dest,
            entry.extract,
            entry.strip_components,
        )


class Lockfile(_Strict):
    version: int = LOCK_VERSION
    entries: dict[str, LockedEntry] = {}
    data: dict[str, LockedData] = {}  # data entries by `data:<dest>`


def load_lock(path: Path, manifest: Path | None = None) -> Lockfile:
    """An absent lockfile is empty; a corrupt one is an error (never silently re-resolved); one that is
    another user's link is refused (safefs). `manifest`, the file it belongs to, goes into the command the
    error proposes."""
    safefs.refuse_foreign_link(path)
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        return Lockfile()
    m = shlex.quote(str(manifest)) if manifest else shlex.quote(str(Path(path).parent)) + "/<manifest>.yaml"
    try:
        lock = Lockfile.model_validate_json(raw)
    except ValidationError:
        raise ManifestError(
            f"{path} is not a valid hpcstage lockfile; delete it and run `hpcstage pull -f {m} --update`"
        ) from None
    if lock.version != LOCK_VERSION:
        raise ManifestError(
            f"{path} has lock version {lock.version}; delete it and run `hpcstage pull -f {m} --update`"
        )
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
            {
                "path": f.path,
                "size": f.size,
                "blob_id": f.blob_id,
                **({"sha256": f.sha256} if f.sha256 else {}),
                **({"xet_hash": f.xet_hash} if f.xet_hash else {}),
            }
            for f in sorted(files, key=lambda f: f.path)
        ],
    )


def save_lock(path: Path, lock: Lockfile) -> None:
    safefs.write_atomic(path.parent, path, (lock.model_dump_json(indent=1) + "\n").encode())
