"""The standard Hugging Face hub cache, written exactly as huggingface_hub reads it offline.

Layout (FACTS.md): `<cache>/<type>s--org--name/{blobs,snapshots,refs,trees}`. Blobs are named by their
etag (git sha1 for regular files, sha256 for LFS files); snapshots hold relative symlinks to blobs; refs hold
the commit sha with no trailing newline; `trees/<commit>.json` holds the full listing so offline
`snapshot_download` can prove completeness.

Every write here is atomic: a blob, symlink, ref or tree appears under its final name only complete.
Our partial data and leases live beside the blob under names no other tool uses (layout.py names them).
A repo's `blobs/<etag>` may instead be a link into the cache-wide Xet blob store (`<cache>/blobs/`), whose
names and writes are xetstore.py's; everything here reads such a blob through its link.
"""

from __future__ import annotations

import errno
import functools
import hashlib
import json
import os
import re
import stat
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from hpcstage import safefs
from hpcstage.errors import BadInput, PolicyError
from hpcstage.layout import LEASE_SUFFIX, PARTIAL_SUFFIX, repo_folder_name
from hpcstage.policy import check_relative_path
from hpcstage.safefs import Sharing

_GIT_SHA1 = re.compile(r"[0-9a-f]{40}")
_SHA256 = re.compile(r"[0-9a-f]{64}")
TREE_FORMAT_VERSION = 1


HASH_BUF = 8 << 20  # bytes per read: large updates release the GIL for long stretches


def new_hasher(sha256: str | bool | None, size: int):
    """The hash a blob is named by: sha256 for LFS files, else the git blob sha1 (`blob <size>\\0` + content)."""
    if sha256:
        return hashlib.sha256()
    h = hashlib.sha1()
    h.update(b"blob %d\0" % size)
    return h


def digest_file(path: str | os.PathLike, algo: str = "sha256", on_bytes: Callable[[int], None] | None = None) -> str:
    """`sha256` of a file's content, or `git` (the git blob sha1), read in large chunks."""
    with open(path, "rb", buffering=0) as f:
        h = new_hasher(algo == "sha256", os.fstat(f.fileno()).st_size)
        try:
            os.posix_fadvise(f.fileno(), 0, 0, os.POSIX_FADV_SEQUENTIAL)
        except (AttributeError, OSError):
            pass
        view = memoryview(bytearray(HASH_BUF))
        while n := f.readinto(view):
            h.update(view[:n])
            if on_bytes is not None:
                on_bytes(n)
    return h.hexdigest()


def _env_path(name: str) -> Path | None:
    value = os.environ.get(name)
    return Path(os.path.expandvars(os.path.expanduser(value))) if value else None


def hf_home() -> Path:
    xdg = _env_path("XDG_CACHE_HOME") or Path.home() / ".cache"
    return _env_path("HF_HOME") or xdg / "huggingface"


def default_cache_dir() -> Path:
    """The hub cache huggingface_hub would use, computed from the environment now (not at import)."""
    return _env_path("HF_HUB_CACHE") or hf_home() / "hub"


def default_datasets_cache_dir() -> Path:
    """The `datasets` Arrow cache: HF_DATASETS_CACHE, else HF_HOME/datasets, as datasets computes it."""
    return _env_path("HF_DATASETS_CACHE") or hf_home() / "datasets"


def check_cache_dir(folder: Path) -> None:
    """A cache path that is a file (or lies under one) is bad input, found before any request."""
    for p in (folder, *folder.absolute().parents):
        if p.exists():
            if not p.is_dir():
                what = "is a file" if p == folder else f"lies under {p}, which is a file"
                raise BadInput(f"cache folder {folder} {what}; pass --cache-dir (or `cache_dir:`) naming a folder")
            return


def fix_permissions(path: Path | str, group: str | int | Sharing) -> int:
    """Give `path` (a hub cache or one repo folder in it) and everything below it the shared group and bits,
    including `trees/*.json` that huggingface_hub writes 0600. Walked by descriptor (os.fwalk), never
    through a link. Returns how many entries were looked at."""
    sharing = group if isinstance(group, Sharing) else Sharing.for_group(group)
    path = Path(path)
    sharing.dir(path)
    n = 1
    for _, dirs, files, dir_fd in os.fwalk(path, follow_symlinks=False):
        for name in dirs + files:
            sharing.entry(dir_fd, name)
            n += 1
    return n


def share_cache(cache_dir: Path | str, group: str | int | Sharing, repos: list[Path] | None = None) -> int:
    """`fix_permissions` for a hub cache: the folder itself, its `.locks/` (huggingface_hub's locks and the
    hpcstage ledger, which every member writes), the shared Xet blob store `blobs/` (xetstore) and the repo
    folders in `repos` (default: all of them)."""
    sharing = group if isinstance(group, Sharing) else Sharing.for_group(group)
    cache_dir = Path(cache_dir)
    sharing.dir_fd(safefs.opendir(cache_dir, create=False).fd)
    if repos is None:
        repos = [p for p in cache_dir.iterdir() if "--" in p.name and p.is_dir() and not p.is_symlink()]
    folders = [p for p in (cache_dir / ".locks", cache_dir / "blobs", *repos) if p.is_dir() and not p.is_symlink()]
    return 1 + sum(fix_permissions(p, sharing) for p in folders)


def listed_xet_hash(value: object) -> str | None:
    """A listed `xetHash` when it is a real one; None when absent or masked (the Hub may list asterisks)."""
    return value if isinstance(value, str) and _SHA256.fullmatch(value) else None


@dataclass(frozen=True)
class CachedFile:
    """One file of a snapshot: its path in the repo and the blob it points to."""

    path: str
    size: int
    blob_id: str  # git sha1 of the content
    sha256: str | None = None  # set for LFS files
    # the Hub's `xetHash` (64 hex) when it listed a real one: the file's name in the cache-wide store (xetstore)
    xet_hash: str | None = field(default=None, compare=False)

    def __post_init__(self) -> None:
        # The etag becomes a file name under blobs/: a listing, tree file or lockfile naming `../x` must
        # not write outside the cache.
        if not _GIT_SHA1.fullmatch(self.blob_id) or (self.sha256 is not None and not _SHA256.fullmatch(self.sha256)):
            raise ValueError(f"invalid blob id for {self.path!r}: {self.blob_id!r} / {self.sha256!r}")
        if self.xet_hash is not None and (not _SHA256.fullmatch(self.xet_hash) or self.sha256 is None):
            raise ValueError(f"invalid xet hash for {self.path!r}: {self.xet_hash!r}")

    @property
    def etag(self) -> str:
        """The blob's name in the cache: sha256 for LFS files, git sha1 otherwise (as huggingface_hub)."""
        return self.sha256 or self.blob_id


@dataclass(frozen=True)
class RepoCache:
    """One repo's folder in the hub cache."""

    cache_dir: Path
    repo_type: str
    repo_id: str
    sharing: Sharing | None = None  # a group-shared cache: every write gets the group's bits

    def folder(self, path: Path) -> safefs.Dir:
        """`path` (a folder below the cache) opened without following another user's links, made and
        shared where missing (safefs)."""
        return safefs.opendir(self.cache_dir, path, sharing=self.sharing)

    @functools.cached_property
    def root(self) -> Path:
        return self.cache_dir / self.folder_name

    @functools.cached_property
    def _blobs(self) -> Path:  # a pull asks for thousands of blob paths: join the folder part once
        return self.root / "blobs"

    @functools.cached_property
    def folder_name(self) -> str:
        """`models--org--name`, as huggingface_hub's `repo_folder_name` spells it."""
        return repo_folder_name(self.repo_type, self.repo_id)

    def blob(self, etag: str) -> Path:
        return self._blobs / etag

    def partial(self, etag: str) -> Path:
        return self._blobs / (etag + PARTIAL_SUFFIX)

    def lease(self, etag: str) -> Path:
        return self._blobs / (etag + LEASE_SUFFIX)

    @staticmethod
    def partial_guard(partial: Path) -> Path:
        """The lease whoever writes the blob partial `partial` holds (for cleanup: never a live one's)."""
        return partial.with_name(partial.name.removesuffix(PARTIAL_SUFFIX) + LEASE_SUFFIX)

    def snapshot(self, commit: str) -> Path:
        return self.root / "snapshots" / commit

    def has_blob(self, file: CachedFile) -> bool:
        try:
            return self.blob(file.etag).stat().st_size == file.size
        except FileNotFoundError:
            return False

    def is_linked(self, commit: str, file: CachedFile) -> bool:
        """True when the snapshot entry resolves to the blob of the right size."""
        link = self.snapshot(commit) / file.path
        try:
            return os.readlink(link) == self._link_target(file.path, file.etag) and link.stat().st_size == file.size
        except OSError:
            return False

    @staticmethod
    def _link_target(path: str, etag: str) -> str:
        """`snapshots/<commit>/<path>` -> `../../blobs/<etag>`, one more `../` per folder in `path`
        (what huggingface_hub writes; computed as a string because a warm pull checks thousands)."""
        return "../" * (2 + path.count("/")) + "blobs/" + etag

    def write_blob(self, etag: str, data: bytes) -> None:
        """A small blob checked in memory, written under a temporary name and renamed into place."""
        self.folder(self._blobs).write_atomic(etag, data, sharing=self.sharing)

    def create_partial(self, etag: str) -> None:
        """The partial file, group-writable on a shared cache so anyone in the group can resume it."""
        fd = self.folder(self._blobs).open_transient(etag + PARTIAL_SUFFIX, os.O_WRONLY, 0o664)
        try:
            if self.sharing is not None:
                self.sharing.file_fd(fd)
                os.fchmod(fd, os.fstat(fd).st_mode | stat.S_IWGRP)
        finally:
            os.close(fd)

    def commit_blob(self, partial: Path, etag: str) -> None:
        """Move a complete, hash-checked partial into place. If another writer committed the same etag
        first, replacing it is harmless: the name is the content's hash."""
        blobs = self.folder(partial.parent)
        fd = blobs.open(partial.name, os.O_RDONLY | os.O_NONBLOCK)  # a link planted meanwhile: ELOOP, not moved
        try:
            if not stat.S_ISREG(os.fstat(fd).st_mode):
                raise OSError(errno.EINVAL, f"{partial} is not a regular file")
            try:
                os.fchmod(fd, 0o644 & ~safefs.umask())
                if self.sharing is not None:
                    self.sharing.file_fd(fd)
            except PermissionError:
                pass  # another member's partial, resumed here: its owner's bits stay
        finally:
            os.close(fd)
        blobs.replace(partial.name, etag, self.folder(self._blobs))

    def link(self, commit: str, file: CachedFile) -> None:
        """Point `snapshots/<commit>/<path>` at the blob with a relative symlink. A new link is one
        symlink call (a half-made symlink cannot exist); a wrong one is replaced atomically by rename
        (which replaces a link, never follows it)."""
        link = self.snapshot(commit) / file.path
        target = self._link_target(file.path, file.etag)
        folder = self.folder(link.parent)
        name = link.name
        try:
            folder.symlink(target, name)
        except FileExistsError:
            try:
                if folder.readlink(name) == target:
                    return None
            except OSError:
                pass  # not a link: replaced below
            tmp = folder.tmp_name(name)
            folder.symlink(target, tmp)
            try:
                folder.replace(tmp, name)
            except BaseException:
                folder.unlink(tmp)
                raise
        if self.sharing is not None:
            if folder.lstat(name).st_gid != self.sharing.gid:
                os.chown(name, -1, self.sharing.gid, dir_fd=folder.fd, follow_symlinks=False)
        return None

    def write_ref(self, revision: str, commit: str) -> None:
        """`refs/<revision>` holds exactly the 40-hex commit, no newline (a newline breaks offline loads)."""
        ref = self.root / "refs" / revision
        folder = self.folder(ref.parent)
        if folder.read(ref.name, 64) == commit.encode():
            return
        folder.write_atomic(ref.name, commit.encode(), sharing=self.sharing)

    def read_ref(self, revision: str) -> str | None:
        try:
            return (self.root / "refs" / revision).read_text()
        except OSError:
            return None

    def tree_path(self, commit: str) -> Path:
        return self.root / "trees" / f"{commit}.json"

    def write_tree(self, commit: str, files: list[CachedFile]) -> None:
        """The full listing (all files, not only the selected ones), group/world-readable unlike
        huggingface_hub's 0600 default, so a shared cache's completeness check works for everyone."""
        entries = {}
        for f in sorted(files, key=lambda f: f.path):
            info: dict = {"size": f.size, "blob_id": f.blob_id}
            if f.sha256:
                info.update(lfs_sha256=f.sha256, lfs_size=f.size)
            if f.xet_hash:  # as huggingface_hub 2.4 records it (a masked hash is left out: it rejects those)
                info["xet_hash"] = f.xet_hash
            entries[f.path] = info
        data = {"format_version": TREE_FORMAT_VERSION, "files": entries}
        self.folder(self.tree_path(commit).parent).write_atomic(
            f"{commit}.json", json.dumps(data, indent=1).encode(), sharing=self.sharing
        )

    def read_tree(self, commit: str) -> list[CachedFile] | None:
        try:
            data = json.loads(self.tree_path(commit).read_text())
        except (OSError, ValueError):
            return None
        if not isinstance(data, dict) or data.get("format_version") != TREE_FORMAT_VERSION:
            return None
        try:  # anyone who can write the cache can write this file: distrust it, list the tree again
            return [
                CachedFile(
                    path=check_relative_path(p, "path in a trees file"),
                    size=int(i["size"]),
                    blob_id=i["blob_id"],
                    sha256=i.get("lfs_sha256"),
                    xet_hash=listed_xet_hash(i.get("xet_hash")),
                )
                for p, i in data["files"].items()
            ]
        except (KeyError, TypeError, ValueError, AttributeError, PolicyError):
            return None
