"""The cache-wide Xet blob store, laid out exactly as huggingface_hub 2.4 keeps it: one copy per content.

A file the Hub lists with a `xetHash` is stored once per cache, whichever repos and revisions hold it:

    <cache>/blobs/.huggingface-shared-blobs     "1\\n": the marker; neither tool uses an unmarked folder
    <cache>/blobs/<h[:2]>/<h>                   the content: a regular, read-only file
    <cache>/blobs/<h[:2]>/<h>.refs              one line per link into it: `models--org--name/blobs/<etag>`
    <cache>/<repo>/blobs/<etag> -> ../../blobs/<h[:2]>/<h>        each repo's blob: a relative symlink

(FACTS.md; huggingface_hub/utils/_shared_blobs.py). Both tools read and add to the same store, and
huggingface_hub's cache deletion collects an entry once no `.refs` line names a link that still points at it.
So the `.refs` line is written and flushed before its link appears, as huggingface_hub does.

Why by hand: huggingface_hub guards each entry with `filelock` on `<h>.lock` (flock), which does not hold
across nodes on Lustre/NFS. Here each entry is guarded by an hpcstage lease (locks.py) under
`.locks/hpcstage/xet/` (scan_cache_dir skips `.locks`). Writes go through safefs (by descriptor, no link
followed); the store's own relative links are ours, so following them is safe.

Content enters the store only after its sha256 and its Xet hash, computed here with `hf_xet.hash_files`,
both match the listing (huggingface_hub publishes only Xet-verified downloads too). Without hf_xet, with a
masked or absent `xetHash`, with HF_HUB_DISABLE_SHARED_BLOBS set, or where symlinks cannot be made, files
go to the per-repo `blobs/<etag>` as before.
"""

from __future__ import annotations

import errno
import functools
import os
import re
import secrets
import stat
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from hpcstage import safefs
from hpcstage.errors import HashMismatch
from hpcstage.hfcache import CachedFile, RepoCache
from hpcstage.layout import LEASE_SUFFIX, TMP_SUFFIX
from hpcstage.layout import XET_LEASES as LEASES
from hpcstage.safefs import Sharing

MARKER = ".huggingface-shared-blobs"
# What marking a fresh store leaves while it runs: the marker, a marker temp (huggingface_hub's or ours), our probe.
_MARKING = re.compile(rf"{re.escape(MARKER)}(\.[0-9a-f]{{8}}\.tmp)?|\.probe\.[0-9a-f]{{8}}{re.escape(TMP_SUFFIX)}")
LAYOUT_VERSION = b"1\n"
REFS_SUFFIX = ".refs"
_XET_HASH = re.compile(r"[0-9a-f]{64}")
_REPO_BLOB = re.compile(r"(models|datasets|spaces)--[^/]+/blobs/[^/\n\r]+")


def disabled_by_env() -> bool:
    """HF_HUB_DISABLE_SHARED_BLOBS, read now (huggingface_hub reads it at import)."""
    return os.environ.get("HF_HUB_DISABLE_SHARED_BLOBS", "").strip().upper() in ("1", "ON", "YES", "TRUE")


@functools.cache
def hf_xet_available() -> bool:
    try:
        import hf_xet  # noqa: F401  (imported lazily: only a pull with Xet files needs it)
    except ImportError:
        return False
    return True


def xet_hash_of(path: str | os.PathLike) -> str:
    """The Xet file hash of the content at `path`, as the Hub computes it (hf_xet, no network)."""
    import hf_xet

    return hf_xet.hash_files([os.fspath(path)])[0].hash


class XetHashMismatch(HashMismatch):
    """The content matched its sha256 but not the `xetHash` the listing gave: the listing is wrong about it,
    so nothing is stored. Fetching again would not help."""

    rerun_helps = False


@dataclass(frozen=True)
class Entry:
    """One content in the store: its hash, size and the repo links that point at it now."""

    xet_hash: str
    size: int
    links: tuple[Path, ...]
    has_manifest: bool  # without its `.refs` manifest an entry is never collected (huggingface_hub's rule)

    @property
    def unreferenced(self) -> bool:
        return self.has_manifest and not self.links


@dataclass
class Saved:
    contents: int = 0
    stored: int = 0  # bytes in the store
    links: int = 0  # repo blobs pointing into it
    saved: int = 0  # bytes each extra link would have cost as a copy
    unreferenced: int = 0  # contents no link points at (`hpcstage cleanup` removes them)


class XetStore:
    """The store of one hub cache: the only place that knows its names and how to add to it."""

    def __init__(self, cache_dir: Path | str, sharing: Sharing | None = None):
        self.cache_dir = Path(cache_dir)
        self.sharing = sharing
        self.root = self.cache_dir / "blobs"

    # -- names

    def path(self, xet_hash: str) -> Path:
        return self.root / xet_hash[:2] / xet_hash

    def refs_path(self, xet_hash: str) -> Path:
        return self.root / xet_hash[:2] / f"{xet_hash}{REFS_SUFFIX}"

    @property
    def leases(self) -> Path:
        return self.cache_dir / LEASES

    def lease(self, xet_hash: str) -> Path:
        """The lease whoever adds to or removes this entry holds (hpcstage's, instead of flock)."""
        return self.leases / f"{xet_hash}{LEASE_SUFFIX}"

    @staticmethod
    def link_target(xet_hash: str) -> str:
        """What `<repo>/blobs/<etag>` holds: the store entry, relative (as huggingface_hub writes it)."""
        return f"../../blobs/{xet_hash[:2]}/{xet_hash}"

    # -- state

    def is_marked(self) -> bool:
        """A folder with huggingface_hub's marker, version 1 (what `is_shared_blobs_dir` accepts)."""
        try:
            top = safefs.opendir(self.cache_dir, create=False)
            if not stat.S_ISDIR(top.lstat("blobs").st_mode):
                return False
            return top.child("blobs", create=False).read(MARKER, 16) == LAYOUT_VERSION
        except OSError:
            return False

    def has(self, xet_hash: str, size: int) -> bool:
        """A usable entry: a regular file of the expected size (huggingface_hub's test, no hashing)."""
        try:
            st = os.lstat(self.path(xet_hash))
        except OSError:
            return False
        return stat.S_ISREG(st.st_mode) and st.st_size == size and self.is_marked()

    def links_of(self, xet_hash: str) -> list[Path]:
        """The repo blobs the `.refs` manifest names that are links to this entry now (the manifest is a hint)."""
        try:
            lines = self.refs_path(xet_hash).read_text().splitlines()
        except (OSError, UnicodeError):
            return []
        found: dict[Path, None] = {}
        for line in lines:
            if not _REPO_BLOB.fullmatch(line):
                continue
            link = self.cache_dir / line
            try:
                if os.readlink(link) == self.link_target(xet_hash):
                    found[link] = None
            except OSError:
                continue
        return list(found)

    def entries(self) -> Iterator[Entry]:
        """Every content in a marked store, with its live links."""
        if not self.is_marked():
            return
        for prefix in sorted(self.root.iterdir()):
            if not re.fullmatch(r"[0-9a-f]{2}", prefix.name) or prefix.is_symlink() or not prefix.is_dir():
                continue
            for item in sorted(prefix.iterdir()):
                if not _XET_HASH.fullmatch(item.name) or not item.name.startswith(prefix.name):
                    continue
                try:
                    st = os.lstat(item)
                except OSError:
                    continue
                if stat.S_ISREG(st.st_mode):
                    yield Entry(
                        item.name,
                        st.st_size,
                        tuple(self.links_of(item.name)),
                        os.path.lexists(self.refs_path(item.name)),
                    )

    def saved(self) -> Saved:
        """What the store holds and what it saves (bytes that would be stored again without it)."""
        out = Saved()
        for e in self.entries():
            out.contents += 1
            out.stored += e.size
            out.links += len(e.links)
            out.saved += e.size * max(0, len(e.links) - 1)
            out.unreferenced += e.unreferenced
        return out

    # -- writes (the caller holds `lease(xet_hash)`)

    def _modes(self) -> tuple[int, int]:
        """(folder mode, content mode) as huggingface_hub derives them from the cache root: folders mirror
        its bits; content is 0400, readable by the group and others as far as they may enter the root."""
        root = stat.S_IMODE(os.stat(self.cache_dir).st_mode)
        file_mode = 0o400 | (0o040 if root & stat.S_IXGRP else 0) | (0o004 if root & stat.S_IXOTH else 0)
        if self.sharing is not None:
            file_mode |= 0o040
        return root & (0o777 | stat.S_ISGID | stat.S_ISVTX), file_mode

    def _folder(self, name: str | None = None) -> safefs.Dir | None:
        """The store (or one prefix folder in it), made and marked if missing; None when a folder named
        `blobs` is there without the marker and holds something else: it is not ours to adopt."""
        top = safefs.opendir(self.cache_dir, sharing=self.sharing)  # made if missing: its bits decide the modes
        dir_mode, file_mode = self._modes()
        store = top.child("blobs", sharing=self.sharing)
        if store.read(MARKER, 16) != LAYOUT_VERSION:
            # Other processes (an array's workers on a fresh cache) may be marking it at this very moment:
            # their marker and probe temps, and the marker itself, are ours to share, never to delete (a
            # deleted temp fails their rename, and they would fall back to per-repo copies of the content).
            if any(not _MARKING.fullmatch(n) for n in os.listdir(store.proc_path)):
                if store.read(MARKER, 16) != LAYOUT_VERSION:  # not marked meanwhile by one of them
                    return None
            self._chmod_dir(store, dir_mode)
            tmp = f"{MARKER}.{secrets.token_hex(4)}.tmp"
            fd = store.create(tmp, file_mode)
            try:
                os.write(fd, LAYOUT_VERSION)
                os.fchmod(fd, file_mode)
            finally:
                os.close(fd)
            store.replace(tmp, MARKER)
        if name is None:
            return store
        prefix = store.child(name, sharing=self.sharing)
        self._chmod_dir(prefix, dir_mode)
        return prefix

    def _chmod_dir(self, d: safefs.Dir, mode: int) -> None:
        st = os.fstat(d.fd)
        if st.st_uid == os.geteuid() and stat.S_IMODE(st.st_mode) != mode:
            os.fchmod(d.fd, mode)

    def usable(self) -> str | None:
        """None when the store can be used here, else why not (for `doctor` and the fallback)."""
        if disabled_by_env():
            return "HF_HUB_DISABLE_SHARED_BLOBS is set"
        if not hf_xet_available():
            return "hf_xet is not installed (it checks the Xet hash before content is shared)"
        try:
            store = self._folder()
            if store is None:
                return f"{self.root} exists without huggingface_hub's marker and holds other files"
            probe = store.tmp_name("probe")
            store.symlink(MARKER, probe)
            store.unlink(probe)
        except OSError as e:
            return f"cannot write {self.root} ({e.strerror or e})"
        return None

    def link_into(self, cache: RepoCache, f: CachedFile) -> bool:
        """Point `<repo>/blobs/<etag>` at the existing entry for `f` (no download). False when there is none
        usable or links cannot be made here."""
        h = f.xet_hash
        assert h is not None
        if not self.has(h, f.size):
            return False
        blobs = cache.folder(cache.blob(f.etag).parent)
        tmp = self._temp_link(blobs, h, f.etag)
        if tmp is None:
            return False
        try:
            self._commit_link(blobs, tmp, h, cache, f.etag)
        finally:
            blobs.unlink(tmp)
        return True

    def publish(self, cache: RepoCache, partial: str, f: CachedFile) -> bool:
        """Move the complete, sha256-checked file `partial` (a name in the repo's blobs/ folder) into the
        store after checking its Xet hash, and link `blobs/<etag>` to it. XetHashMismatch (the partial
        deleted, nothing stored) when the content does not hash to the listed `xetHash`; False (the partial
        left for the caller to commit as a per-repo blob) when the store cannot be used here."""
        h = f.xet_hash
        assert h is not None
        blobs = cache.folder(cache.blob(f.etag).parent)
        got = xet_hash_of(blobs.proc_path / partial)
        if got != h:
            blobs.unlink(partial)
            raise XetHashMismatch(
                f"{cache.repo_id}/{f.path}: the content matches its sha256 but not the xetHash the Hub listed "
                f"({got[:12]}… instead of {h[:12]}…), so it was not stored; report it to the repo's owners, or set "
                "HF_HUB_DISABLE_SHARED_BLOBS=1 to keep it as a per-repo blob",
                repo=cache.repo_id,
                path=f.path,
            )
        prefix = self._folder(h[:2])
        if prefix is None:
            return False
        tmp = self._temp_link(blobs, h, f.etag)
        if tmp is None:
            return False  # no symlinks here (some FUSE mounts): a per-repo blob it is
        try:
            if self.has(h, f.size):  # someone else (huggingface_hub, another user) stored it meanwhile
                blobs.unlink(partial)
            else:
                _, file_mode = self._modes()
                fd = blobs.open(partial, os.O_RDONLY | os.O_NONBLOCK)
                try:
                    if not stat.S_ISREG(os.fstat(fd).st_mode):
                        raise OSError(errno.EINVAL, f"{partial} is not a regular file")
                    if self.sharing is not None:
                        self.sharing.file_fd(fd)
                    os.fchmod(fd, file_mode)
                finally:
                    os.close(fd)
                blobs.replace(partial, h, prefix)
            self._commit_link(blobs, tmp, h, cache, f.etag)
        finally:
            blobs.unlink(tmp)
        return True

    def _temp_link(self, blobs: safefs.Dir, h: str, etag: str) -> str | None:
        """A link to the entry under a temporary name beside `etag`; None where links cannot be made."""
        tmp = blobs.tmp_name(etag)
        try:
            blobs.symlink(self.link_target(h), tmp)
        except OSError:
            return None
        return tmp

    def _commit_link(self, blobs: safefs.Dir, tmp: str, h: str, cache: RepoCache, etag: str) -> None:
        """Name the link in the entry's `.refs` first (so huggingface_hub's deletion never misses it), then
        rename it over `blobs/<etag>`."""
        self.add_ref(h, cache, etag)
        blobs.replace(tmp, etag)
        self._share_link(blobs, etag)

    def add_ref(self, h: str, cache: RepoCache, etag: str) -> None:
        """Append `<repo>/blobs/<etag>` to the entry's manifest and flush it, before the link appears."""
        link = self.cache_dir / cache.folder_name / "blobs" / etag
        if link in self.links_of(h):
            return
        line = f"{cache.folder_name}/blobs/{etag}\n".encode()
        prefix = self._folder(h[:2])
        assert prefix is not None
        fd = prefix.open(f"{h}{REFS_SUFFIX}", os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o666)
        try:
            if not stat.S_ISREG(os.fstat(fd).st_mode):
                raise OSError(errno.EINVAL, f"{self.refs_path(h)} is not a regular file")
            if os.fstat(fd).st_uid == os.geteuid():
                os.fchmod(fd, 0o666)  # as huggingface_hub: every user of the cache appends to it
            if os.write(fd, line) != len(line):
                raise OSError(errno.EIO, f"short write to {self.refs_path(h)}")
            os.fsync(fd)
        finally:
            os.close(fd)

    def _share_link(self, blobs: safefs.Dir, name: str) -> None:
        if self.sharing is not None and blobs.lstat(name).st_gid != self.sharing.gid:
            os.chown(name, -1, self.sharing.gid, dir_fd=blobs.fd, follow_symlinks=False)

    def sweep(self, xet_hash: str) -> int:
        """Remove an entry no link points at any more (its manifest rewritten to the live links otherwise);
        returns the bytes freed. A missing manifest is never grounds for deletion (huggingface_hub's rule)."""
        prefix = self._folder(xet_hash[:2])
        if prefix is None or prefix.read(f"{xet_hash}{REFS_SUFFIX}") is None:
            return 0
        links = self.links_of(xet_hash)
        if links:
            text = "".join(f"{p.relative_to(self.cache_dir)}\n" for p in sorted(links)).encode()
            prefix.write_atomic(f"{xet_hash}{REFS_SUFFIX}", text)
            fd = prefix.open(f"{xet_hash}{REFS_SUFFIX}", os.O_RDONLY)
            try:
                os.fchmod(fd, 0o666)
            finally:
                os.close(fd)
            return 0
        try:
            size = prefix.lstat(xet_hash).st_size
        except FileNotFoundError:
            return 0
        prefix.unlink(xet_hash)
        prefix.unlink(f"{xet_hash}{REFS_SUFFIX}")
        return size
