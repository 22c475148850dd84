"""Writes below a shared root that no planted link can redirect.

Why by hand: `shared_group` makes cache folders group-writable, so any member can put a symlink where
another member's pull writes next (`blobs/<sha>.hpcstage-partial -> ~/.bashrc`, or `blobs -> ~/`).
pathlib and os follow links at every component of every path, and no library opens a tree the way the
kernel's `fs.protected_symlinks` guards sticky folders. So below a root (the hub cache, a data_dir, an
experiments folder) hpcstage writes only through `Dir`s:

* A `Dir` is a folder opened by walking from the root one component at a time with
  `openat(O_DIRECTORY|O_NOFOLLOW)`; later operations use its descriptor (`dir_fd`), so a folder swapped
  for a link after the walk changes nothing. The root itself may be a link (users point
  `~/.cache/huggingface` at scratch): it is the user's choice, and is followed.
* A symlink met below the root is followed only when it belongs to the user running hpcstage (or to
  root, the site); otherwise `UnsafeLink`, one line naming the path and its owner. This is stricter than
  the kernel's `protected_symlinks` rule, which also trusts the owner of the folder holding the link: in
  a shared cache that owner is whoever staged a repo first, i.e. another member, who could otherwise
  redirect everyone's later writes in "their" repo folder (tests/test_planted_links.py shows it).
* Final names: new files are created with O_CREAT|O_EXCL (never follows a link), existing ones are
  opened with O_NOFOLLOW and checked to be a regular file with one link; renames, symlinks and unlinks
  act on the name itself. hpcstage's own transient files (partials, leases, temporaries) found to be a
  link or a hard link are removed and created again (`open_transient`).
* Folders that hpcstage builds and then publishes whole (extraction, copies) are made 0700 while being
  built (`private_dir`): nobody else can plant anything inside, so path-based code may work in them.

`Sharing` (the group and bits of a `shared_group` cache) lives here too: every `Dir` applies it by
descriptor as it makes a folder or file, and hfcache/xetstore only pass it along.

What a group member can still do (by design of a group-writable folder): delete or replace finished
files and links; `verify` detects changed content. See README "Security".
"""

from __future__ import annotations

import collections
import errno
import grp
import os
import pwd
import secrets
import stat
import threading
from dataclasses import dataclass
from pathlib import Path

from hpcstage.errors import BadInput, HpcstageError
from hpcstage.layout import TMP_SUFFIX

_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC
_NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)
_CACHE_SIZE = 256  # open folders kept per process (a pull writes into a few folders many times)


class UnsafeLink(HpcstageError):
    """A link below a shared root belongs to someone else: hpcstage does not write through it."""

    def __init__(self, path: Path | str, uid: int | None = None):
        if uid is None:  # re-raised with a longer message (`type(e)(f"{e} ...")`)
            super().__init__(str(path))
            return
        self.uid = uid
        super().__init__(
            f"{path} is a link owned by {_user(uid)}: not following it; remove it or ask its owner",
            path=str(path),
            hint="remove the link, or ask its owner to",
        )


class NotAFolder(HpcstageError):
    """A name that must be a folder is something else."""

    exit_code = 2


def _user(uid: int) -> str:
    try:
        return f"uid {uid} ({pwd.getpwuid(uid).pw_name})"
    except KeyError:
        return f"uid {uid}"


def trusted_link(link: os.stat_result) -> bool:
    """Follow a link below a root only if we (or root) made it: see the module docstring."""
    return link.st_uid in (os.geteuid(), 0)


class Dir:
    """An open folder, reached without following untrusted links. Names passed to its methods are single
    path components. The descriptor closes when the last reference goes (cached `Dir`s are shared by
    threads, so nobody closes one explicitly)."""

    __slots__ = ("fd", "path", "__weakref__")

    def __init__(self, fd: int, path: Path):
        self.fd, self.path = fd, path

    def __del__(self) -> None:
        try:
            os.close(self.fd)
        except (OSError, TypeError, AttributeError):
            pass

    def __repr__(self) -> str:
        return f"Dir({str(self.path)!r})"

    @property
    def proc_path(self) -> Path:
        """A path that names this very folder whatever happens to its ancestors (Linux /proc)."""
        return Path(f"/proc/self/fd/{self.fd}")

    # -- reads -------------------------------------------------------------------------------------

    def lstat(self, name: str) -> os.stat_result:
        return os.stat(name, dir_fd=self.fd, follow_symlinks=False)

    def exists(self, name: str) -> bool:
        try:
            self.lstat(name)
            return True
        except FileNotFoundError:
            return False

    def readlink(self, name: str) -> str:
        return os.readlink(name, dir_fd=self.fd)

    def read(self, name: str, limit: int = 1 << 24) -> bytes | None:
        """The bytes of a regular file (not through a link); None when there is none."""
        try:
            fd = os.open(name, os.O_RDONLY | _NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK, dir_fd=self.fd)
        except (FileNotFoundError, NotADirectoryError):
            return None
        except OSError as e:
            if e.errno == errno.ELOOP:
                return None
            raise
        try:
            if not stat.S_ISREG(os.fstat(fd).st_mode):
                return None
            chunks, left = [], limit
            while left > 0 and (chunk := os.read(fd, min(left, 1 << 20))):
                chunks.append(chunk)
                left -= len(chunk)
            return b"".join(chunks)
        finally:
            os.close(fd)

    # -- writes ------------------------------------------------------------------------------------

    def open(self, name: str, flags: int, mode: int = 0o644) -> int:
        """os.open relative to this folder, never through a link at `name`."""
        return os.open(name, flags | _NOFOLLOW | os.O_CLOEXEC, mode, dir_fd=self.fd)

    def create(self, name: str, mode: int = 0o644, flags: int = os.O_WRONLY) -> int:
        """A new file (O_EXCL: fails with FileExistsError on anything there, a link included)."""
        return self.open(name, flags | os.O_CREAT | os.O_EXCL, mode)

    def open_transient(self, name: str, flags: int = os.O_RDWR, mode: int = 0o644) -> int:
        """Open (creating if needed) one of hpcstage's own transient files for writing, e.g. a partial
        being resumed. A link or a hard link found at the name was planted: it is removed and the file
        created anew, so the write never lands in another file."""
        for _ in range(3):
            try:
                fd = self.open(name, flags | os.O_CREAT, mode)
            except OSError as e:
                if e.errno not in (errno.ELOOP, errno.EISDIR, errno.ENXIO, errno.EWOULDBLOCK):
                    raise
                self._remove_planted(name)
                continue
            st = os.fstat(fd)
            if stat.S_ISREG(st.st_mode) and st.st_nlink == 1:
                return fd
            os.close(fd)
            self._remove_planted(name)
        raise HpcstageError(f"{self.path / name} keeps being replaced by another process; remove it and run again")

    def _remove_planted(self, name: str) -> None:
        try:
            if stat.S_ISDIR(self.lstat(name).st_mode):
                raise NotAFolder(f"{self.path / name} is a folder where hpcstage keeps a file; remove it")
            os.unlink(name, dir_fd=self.fd)
        except FileNotFoundError:
            pass

    def unlink(self, name: str, missing_ok: bool = True) -> None:
        try:
            os.unlink(name, dir_fd=self.fd)
        except FileNotFoundError:
            if not missing_ok:
                raise

    def replace(self, src: str, dst: str, dst_dir: Dir | None = None) -> None:
        """rename(2) of the names themselves: a link at `dst` is replaced, never followed."""
        os.replace(src, dst, src_dir_fd=self.fd, dst_dir_fd=(dst_dir or self).fd)

    def rename(self, src: str, dst: str) -> None:
        os.rename(src, dst, src_dir_fd=self.fd, dst_dir_fd=self.fd)

    def link(self, src: str, dst: str) -> None:
        """A hard link of `src` at `dst` (linkat without following `src` if it is a link)."""
        os.link(src, dst, src_dir_fd=self.fd, dst_dir_fd=self.fd, follow_symlinks=False)

    def symlink(self, target: str, name: str) -> None:
        os.symlink(target, name, dir_fd=self.fd)

    def mkdir(self, name: str, mode: int = 0o777) -> None:
        os.mkdir(name, mode, dir_fd=self.fd)

    def tmp_name(self, name: str) -> str:
        return f".{name}.{secrets.token_hex(4)}{TMP_SUFFIX}"

    def write_atomic(self, name: str, data: bytes, mode: int = 0o644, sharing: Sharing | None = None) -> None:
        """`data` under `name`, via a new temporary file and rename: readers never see a torn file, and
        a link at `name` is replaced, not written through."""
        tmp = self.tmp_name(name)
        fd = self.create(tmp, mode)  # the umask applies, as for any file
        try:
            try:
                view = memoryview(data)
                while view:
                    view = view[os.write(fd, view) :]
                if sharing is not None:
                    sharing.file_fd(fd)
            finally:
                os.close(fd)
            self.replace(tmp, name)
        except BaseException:
            self.unlink(tmp)
            raise

    def child(self, name: str, *, create: bool = True, sharing: Sharing | None = None, mode: int = 0o777) -> Dir:
        """The folder `name` in this one (made if missing and `create`), by the link rule above."""
        for _ in range(3):
            try:
                fd = os.open(name, _DIR_FLAGS | _NOFOLLOW, dir_fd=self.fd)
            except FileNotFoundError:
                if not create:
                    raise
                try:
                    os.mkdir(name, mode, dir_fd=self.fd)
                except FileExistsError:
                    continue
                fd = os.open(name, _DIR_FLAGS | _NOFOLLOW, dir_fd=self.fd)
                if sharing is not None:
                    sharing.dir_fd(fd)
                return Dir(fd, self.path / name)
            except OSError as e:
                if e.errno not in (errno.ENOTDIR, errno.ELOOP):
                    raise
                fd = self._follow(name)
            return Dir(fd, self.path / name)
        raise HpcstageError(f"{self.path / name} keeps changing under us; try again")

    def _follow(self, name: str) -> int:
        st = self.lstat(name)
        if not stat.S_ISLNK(st.st_mode):
            raise NotAFolder(f"{self.path / name} is not a folder; move it away and run again")
        if not trusted_link(st):
            raise UnsafeLink(self.path / name, st.st_uid)
        try:
            return os.open(name, _DIR_FLAGS, dir_fd=self.fd)
        except (FileNotFoundError, NotADirectoryError):
            raise NotAFolder(
                f"{self.path / name} is a link to something that is not a folder "
                f"({self.readlink(name)}); fix or remove it"
            ) from None

    def private_child(self, prefix: str, suffix: str) -> tuple[str, Dir]:
        """A new folder `<prefix><random><suffix>` only we can enter (0700) while we fill it."""
        for _ in range(5):
            name = f"{prefix}{secrets.token_hex(4)}{suffix}"
            try:
                os.mkdir(name, 0o700, dir_fd=self.fd)
            except FileExistsError:
                continue
            return name, self.child(name, create=False)
        raise HpcstageError(f"cannot create a build folder in {self.path}")


def umask() -> int:
    """The process's umask (read without changing it for longer than the call): the mode a new file or
    folder would get is `mode & ~umask()`."""
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _open_root(root: Path, create: bool) -> int:
    try:
        return os.open(root, _DIR_FLAGS)
    except FileNotFoundError:
        if not create:
            raise
        root.mkdir(parents=True, exist_ok=True)
        return os.open(root, _DIR_FLAGS)
    except NotADirectoryError:
        raise NotAFolder(f"{root} is not a folder; point it at a folder") from None


_cache: collections.OrderedDict[tuple[str, str], Dir] = collections.OrderedDict()
_cache_lock = threading.Lock()


def opendir(
    root: Path | str, folder: Path | str | None = None, *, create: bool = True, sharing: Sharing | None = None
) -> Dir:
    """`folder` (default: `root` itself) opened by the link rule, made (and shared) where missing.

    Cached per process: a cached `Dir` is used again only while its path still names the same folder
    (one stat), so a pull writing thousands of files into `blobs/` walks the path once."""
    root = Path(root)
    folder = root if folder is None else Path(folder)
    rel = folder.relative_to(root).parts if folder != root else ()
    key = (str(root), "/".join(rel))
    with _cache_lock:
        hit = _cache.get(key)
    if hit is not None:
        try:
            a, b = os.stat(folder), os.fstat(hit.fd)
            if (a.st_dev, a.st_ino) == (b.st_dev, b.st_ino):
                return hit
        except OSError:
            pass
    d = Dir(_open_root(root, create), root)
    if sharing is not None and not rel:
        sharing.dir_fd(d.fd)
    for part in rel:
        if part in ("..", "."):
            raise ValueError(f"{folder}: '..' or '.' below {root}")
        d = d.child(part, create=create, sharing=sharing)
    with _cache_lock:
        _cache[key] = d
        _cache.move_to_end(key)
        while len(_cache) > _CACHE_SIZE:
            _cache.popitem(last=False)
    return d


def parent_of(
    root: Path | str, path: Path | str, *, create: bool = True, sharing: Sharing | None = None
) -> tuple[Dir, str]:
    """(the folder holding `path`, its name): the usual way to write one file below `root`."""
    path = Path(path)
    return opendir(root, path.parent, create=create, sharing=sharing), path.name


def write_atomic(
    root: Path | str, path: Path | str, data: bytes, mode: int = 0o644, sharing: Sharing | None = None
) -> None:
    """`Dir.write_atomic` for `path` below `root`, folders made (and shared) as needed."""
    d, name = parent_of(root, path, sharing=sharing)
    d.write_atomic(name, data, mode, sharing)


def refuse_foreign_link(path: Path | str) -> None:
    """UnsafeLink when `path` is a link another user planted (the rule above), before it is read."""
    path = Path(path)
    try:
        st = os.lstat(path)
        if stat.S_ISLNK(st.st_mode) and not trusted_link(st):
            raise UnsafeLink(path, st.st_uid)
    except FileNotFoundError:
        pass


def is_link_error(e: OSError) -> bool:
    return e.errno in (errno.ELOOP, errno.ENOTDIR)


def walk_names(root: Path, pattern: str, min_depth: int = 0) -> list[Path]:
    """Names matching `pattern` (fnmatch) below `root`, never through a link (pathlib's `**` follows them)."""
    import fnmatch

    found = []
    for folder, dirs, files in os.walk(root):  # followlinks=False
        depth = len(Path(folder).relative_to(root).parts)
        if depth >= min_depth:
            found += [Path(folder) / n for n in fnmatch.filter(dirs + files, pattern)]
    return sorted(found)


# The group bits a shared cache's writes get: applied here, by descriptor, as each folder or file is made.
@dataclass(frozen=True)
class Sharing:
    """A group-shared cache: folders setgid and group-writable, files and trees group-readable, all owned
    by one group, so everyone in it can read (and add to) what anyone staged."""

    gid: int
    group: str

    @classmethod
    def for_group(cls, group: str | int) -> Sharing:
        """Resolve a group name (or gid); checked before anything is written."""
        try:
            entry = grp.getgrgid(int(group)) if str(group).isdigit() else grp.getgrnam(str(group))
        except (KeyError, ValueError):
            raise BadInput(f"unknown group {group!r} for --shared-group; pick one of yours (`id -Gn`)") from None
        if os.geteuid() != 0 and entry.gr_gid not in (os.getegid(), *os.getgroups()):
            raise BadInput(f"you are not a member of group {entry.gr_name!r}; pick one of yours (`id -Gn`)")
        return cls(entry.gr_gid, entry.gr_name)

    def dir_fd(self, fd: int) -> None:
        """Give the open folder `fd` the group and the shared bits (by descriptor: no link is followed)."""
        st = os.fstat(fd)
        if st.st_gid != self.gid:
            os.fchown(fd, -1, self.gid)
        want = stat.S_IMODE(st.st_mode) | SHARED_DIR_BITS
        if stat.S_IMODE(st.st_mode) != want or st.st_gid != self.gid:  # chown may clear setgid
            os.fchmod(fd, want)

    def file_fd(self, fd: int) -> None:
        st = os.fstat(fd)
        if st.st_gid != self.gid:
            os.fchown(fd, -1, self.gid)
        mode = stat.S_IMODE(st.st_mode)
        want = mode | SHARED_FILE_BITS | (0o010 if mode & 0o100 else 0)
        if mode != want:
            os.fchmod(fd, want)

    def dir(self, path: Path | str) -> None:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
        try:
            self.dir_fd(fd)
        finally:
            os.close(fd)

    def file(self, path: Path | str) -> None:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
        try:
            self.file_fd(fd)
        finally:
            os.close(fd)

    def entry(self, dir_fd: int, name: str) -> None:
        """Whatever `name` in the open folder `dir_fd` is (folder, file, symlink), opened without
        following a link, gets the shared group and bits. Other users' entries are left as they are."""
        try:
            st = os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
            if stat.S_ISLNK(st.st_mode):
                if st.st_gid != self.gid:
                    os.chown(name, -1, self.gid, dir_fd=dir_fd, follow_symlinks=False)
                return
            if not (stat.S_ISDIR(st.st_mode) or stat.S_ISREG(st.st_mode)):
                return
            flags = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
            fd = os.open(name, flags | (os.O_DIRECTORY if stat.S_ISDIR(st.st_mode) else 0), dir_fd=dir_fd)
        except (FileNotFoundError, PermissionError):
            return
        except OSError as e:
            if is_link_error(e):  # swapped for a link meanwhile: not ours to touch
                return
            raise
        try:
            st = os.fstat(fd)
            if st.st_uid != os.geteuid() and os.geteuid() != 0:
                return  # only the owner may chmod; another member's pull mends its own files
            (self.dir_fd if stat.S_ISDIR(st.st_mode) else self.file_fd)(fd)
        finally:
            os.close(fd)


SHARED_DIR_BITS = stat.S_ISGID | 0o070  # setgid: new entries inherit the group; rwx for the group
SHARED_FILE_BITS = 0o040  # group-readable
