"""Local folders and files: list them, fingerprint them, and place copies cheaply.

A copy is placed by the cheapest means that gives the same bytes: a reflink (copy-on-write clone, on
btrfs/XFS), else a hardlink (same filesystem: no bytes move, but the copy shares the source's inode, so
an in-place edit of the source shows in the copy; `verify`/the lockfile hashes catch it), else a
streamed copy with progress. Every placed file is hashed (sha256) and, when it is a separate copy,
compared with the source's hash.
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import os
import shutil
import stat
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from hpcstage.errors import BadInput, HpcstageError
from hpcstage.hfcache import digest_file

CHUNK = 8 << 20
FICLONE = 0x40049409  # linux/fs.h: _IOW(0x94, 9, int)


@dataclass(frozen=True)
class SourceFile:
    rel: str  # '/'-path under the source folder (the file name for a single-file source)
    path: Path
    size: int
    mtime_ns: int


def scan(source: Path) -> list[SourceFile]:
    """Every regular file under `source` (or `source` itself), following symlinks to files and folders
    (a folder reached twice, a loop, is listed once). Devices, FIFOs and sockets are refused."""
    source = Path(source)
    try:
        st = source.stat()
    except OSError as e:
        raise BadInput(f"local source {source} cannot be read ({e.strerror}); fix the `local:` path") from None
    if stat.S_ISREG(st.st_mode):
        return [SourceFile(source.name, source, st.st_size, st.st_mtime_ns)]
    if not stat.S_ISDIR(st.st_mode):
        raise BadInput(f"local source {source} is not a file or folder; fix the `local:` path")
    out: list[SourceFile] = []
    seen_dirs = {(st.st_dev, st.st_ino)}

    def unreadable(e: OSError) -> None:  # os.walk would skip the folder silently: a copy missing files
        raise BadInput(f"local source {e.filename} cannot be read ({e.strerror}); fix its permissions")

    for folder, dirs, files in os.walk(source, followlinks=True, onerror=unreadable):
        keep = []
        for d in sorted(dirs):
            dst = os.stat(os.path.join(folder, d))
            if (dst.st_dev, dst.st_ino) not in seen_dirs:
                seen_dirs.add((dst.st_dev, dst.st_ino))
                keep.append(d)
        dirs[:] = keep
        for name in sorted(files):
            p = Path(folder) / name
            try:
                fst = p.stat()
            except FileNotFoundError:
                continue  # a dangling symlink: nothing to copy
            if not stat.S_ISREG(fst.st_mode):
                raise BadInput(
                    f"local source {p} is not a regular file (device, FIFO or socket); remove it from the source folder"
                )
            out.append(SourceFile(p.relative_to(source).as_posix(), p, fst.st_size, fst.st_mtime_ns))
    return out


def fingerprint(files: list[SourceFile]) -> str:
    """Changes when any file is added, removed, resized or touched."""
    h = hashlib.sha256()
    for f in sorted(files, key=lambda f: f.rel):
        h.update(f"{f.rel}\0{f.size}\0{f.mtime_ns}\n".encode())
    return h.hexdigest()


def _reflink(src: Path, dst: Path) -> bool:
    try:
        with open(src, "rb") as fs:
            fd = os.open(dst, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            try:
                fcntl.ioctl(fd, FICLONE, fs.fileno())
            except OSError:
                os.close(fd)
                os.unlink(dst)
                return False
            os.close(fd)
    except OSError:
        return False
    shutil.copystat(src, dst)
    return True


def place(src: Path, dst: Path, on_bytes: Callable[[int], None], allow_hardlink: bool = True) -> tuple[str, str, int]:
    """Put a copy of `src` at `dst` (which must not exist); returns (how, sha256, bytes copied), `how` being
    reflink, hardlink or copy. A copy whose bytes differ from the source's is an error."""
    if _reflink(src, dst):
        return "reflink", digest_file(dst, "sha256", on_bytes), 0
    if allow_hardlink:
        try:
            os.link(src, dst)
            return "hardlink", digest_file(dst, "sha256", on_bytes), 0
        except OSError as e:
            if e.errno not in (errno.EXDEV, errno.EPERM, errno.EMLINK, errno.EACCES, errno.ENOTSUP):
                raise
    h = hashlib.sha256()
    copied = 0
    with open(src, "rb") as fs, open(dst, "xb") as fd:
        while chunk := fs.read(CHUNK):
            fd.write(chunk)
            h.update(chunk)
            copied += len(chunk)
            on_bytes(len(chunk))
    shutil.copystat(src, dst)
    digest = digest_file(dst)
    if digest != h.hexdigest():
        raise HpcstageError(
            f"copy of {src} to {dst} does not read back the same bytes; check the filesystem and run pull again"
        )
    return "copy", digest, copied
