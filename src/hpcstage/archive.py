"""Safe tar/zip extraction and structure expectations.

`extract_into` unpacks an archive into an empty folder (the caller's temporary folder beside `dest`,
renamed into place only when complete: see `datadir.building`). The rules are explicit and the same for
tar and zip, because zipfile has no filter and tarfile's `filter="data"` is not on every Python we run on:

* member names are relative and stay inside: absolute names, drive letters and `..` are refused;
* symlinks must point inside the tree (checked on the name, then again with realpath once the tree is
  built, so a chain of links cannot climb out); they are created last, so no member is ever written
  through one, and a member whose path goes through a symlink member is refused;
* hardlinks may only point at a regular file extracted earlier from the same archive;
* devices, FIFOs, sockets and sparse members are refused; setuid/setgid/sticky and group/other write
  bits are stripped (files become 0644, or 0755 when any execute bit was set); owners are never applied;
* bombs: limits on the total unpacked size, the number of members and the unpacked/packed ratio (above a
  floor, so a few MB of repetitive text is not a bomb), checked before a member is written and while it
  is written; zip's central directory is checked before anything is written.

Every regular file's sha256 is computed while it is written, for the lockfile and later verification.

Why one module of about 600 lines: the rules above hold for tar and zip alike because both go through one
writer (`_Writer`) that checks each member and the limits while it writes; formats and rules in separate
files would separate the checks from the writes they guard. The `expect:` checks at the end
(`check_expect`) are another concept, kept here so far because they run on the tree just extracted.
"""

from __future__ import annotations

import contextlib
import errno
import fnmatch
import hashlib
import io
import json
import lzma
import os
import queue
import stat
import tarfile
import threading
import time
import zipfile
import zlib
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

from hpcstage.errors import HpcstageError
from hpcstage.progress import Progress, human_bytes

CHUNK = 1 << 20
TAR_KINDS = ("tar", "tar.gz", "tar.bz2", "tar.xz", "tar.zst")
KINDS = (*TAR_KINDS, "zip")
# Unpacked size per packed byte, for the space check before the archive is here (by its name).
EXPANSION = {"tar": 1.0, "zip": 2.0, "tar.gz": 3.0, "tar.bz2": 4.0, "tar.xz": 4.0, "tar.zst": 3.0}


class ArchiveError(HpcstageError):
    """An archive was refused (unsafe member, bomb, unknown format) or is damaged: nothing is left behind."""


class ExpectationFailed(HpcstageError):
    """Staged data does not have the structure the manifest's `expect:` asks for (kept for inspection)."""


@dataclass(frozen=True)
class Limits:
    """Bomb limits; manifest keys `max_unpacked_bytes`, `max_ratio`, `max_members` on the entry."""

    max_bytes: int = 1 << 40  # 1 TiB unpacked
    max_ratio: float = 200.0  # unpacked bytes per archive byte ...
    ratio_floor: int = 64 << 20  # ... once more than this has been unpacked
    max_members: int = 1_000_000


@dataclass(frozen=True)
class FileRecord:
    path: str
    size: int
    sha256: str

    def as_dict(self) -> dict:
        return {"path": self.path, "size": self.size, "sha256": self.sha256}


@dataclass
class Extracted:
    kind: str
    members: int = 0
    bytes: int = 0
    files: list[FileRecord] = field(default_factory=list)
    seconds: float = 0.0


# -- formats --------------------------------------------------------------------------------------------

_MAGIC = [
    (b"\x1f\x8b", "tar.gz"),
    (b"BZh", "tar.bz2"),
    (b"\xfd7zXZ\x00", "tar.xz"),
    (b"\x28\xb5\x2f\xfd", "tar.zst"),
    (b"PK\x03\x04", "zip"),
    (b"PK\x05\x06", "zip"),
]


def detect(path: Path, name: str | None = None) -> str:
    """The archive kind from its first bytes (names lie); ArchiveError when it is none we read."""
    with open(path, "rb") as f:
        head = f.read(512)
    for magic, kind in _MAGIC:
        if head.startswith(magic):
            return kind
    if len(head) == 512 and head[257:262] == b"ustar" or _plain_tar(path):
        return "tar"
    raise ArchiveError(
        f"{name or path.name}: not a tar, tar.gz/bz2/xz/zst or zip archive; set `extract: false` to keep "
        "the file as it is"
    )


def _plain_tar(path: Path) -> bool:
    try:
        return tarfile.is_tarfile(path)
    except OSError:
        return False


def kind_from_name(name: str) -> str | None:
    """The kind a file name suggests (for the space estimate before download)."""
    n = name.lower()
    for suffix, kind in (
        (".tar.gz", "tar.gz"),
        (".tgz", "tar.gz"),
        (".tar.bz2", "tar.bz2"),
        (".tbz2", "tar.bz2"),
        (".tar.xz", "tar.xz"),
        (".txz", "tar.xz"),
        (".tar.zst", "tar.zst"),
        (".tzst", "tar.zst"),
        (".tar", "tar"),
        (".zip", "zip"),
    ):
        if n.endswith(suffix):
            return kind
    return None


def estimate_unpacked(path: Path, kind: str | None = None) -> int:
    """Bytes the archive will unpack to: exact for zip (central directory), the gzip trailer for a
    single-stream tar.gz under 4 GiB, else a ratio by format."""
    kind = kind or detect(path)
    size = path.stat().st_size
    if kind == "zip":
        try:
            with zipfile.ZipFile(path) as zf:
                return sum(i.file_size for i in zf.infolist())
        except (zipfile.BadZipFile, OSError):
            return size
    if kind == "tar.gz" and size < 1 << 32:
        with open(path, "rb") as f:
            f.seek(-4, os.SEEK_END)
            isize = int.from_bytes(f.read(4), "little")
        if isize >= size // 2:  # plausible (no wrap past 4 GiB)
            return isize
    return int(size * EXPANSION.get(kind, 3.0))


# -- member rules ---------------------------------------------------------------------------------------


def _refuse(archive: str, msg: str) -> ArchiveError:
    return ArchiveError(f"{archive}: refused: {msg}; nothing was extracted (get a clean archive or fix it)")


def clean_name(name: str, archive: str, strip: int = 0, backslash_ok: bool = True) -> str | None:
    """A member name as a safe relative '/'-path; None when `strip` leading components remove it all."""
    if "\x00" in name:
        raise _refuse(archive, f"member {name!r} has a NUL byte in its name")
    if name.startswith(("/", "\\")) or (len(name) > 1 and name[1] == ":" and name[0].isalpha()):
        raise _refuse(archive, f"member {name!r} has an absolute path")
    if not backslash_ok and "\\" in name:
        raise _refuse(archive, f"member {name!r} uses '\\' in its path (a Windows path)")
    parts = [p for p in name.split("/") if p not in ("", ".")]
    if ".." in parts:
        raise _refuse(archive, f"member {name!r} climbs out of the folder with '..'")
    parts = parts[strip:]
    return "/".join(parts) if parts else None


def _link_inside(name: str, target: str, archive: str) -> None:
    if not target or "\x00" in target:
        raise _refuse(archive, f"symlink {name!r} has an empty or invalid target")
    if target.startswith("/"):
        raise _refuse(archive, f"symlink {name!r} points to the absolute path {target!r}")
    resolved = os.path.normpath(os.path.join(os.path.dirname(name), target))
    if resolved == ".." or resolved.startswith("../"):
        raise _refuse(archive, f"symlink {name!r} points outside the folder ({target!r})")


def _file_mode(mode: int) -> int:
    """Strip setuid/setgid/sticky and group/other write: 0755 when any execute bit was set, else 0644."""
    return 0o755 if mode & 0o111 else 0o644


class _Writer:
    """Writes members into `root` by the rules above; symlinks are kept for the end."""

    def __init__(self, root: Path, archive: Path, limits: Limits, progress: Progress | None, label: str):
        self.root, self.archive, self.limits, self.progress = root, archive, limits, progress
        self.label = label
        self.packed = max(1, archive.stat().st_size)
        self.out = Extracted(kind="")
        self.files: dict[str, FileRecord] = {}
        self.symlinks: dict[str, str] = {}
        self.dirs: set[str] = set()

    def member(self) -> None:
        self.out.members += 1
        if self.out.members > self.limits.max_members:
            raise _refuse(
                self.label,
                f"more than {self.limits.max_members} members (raise `max_members` on the entry if this is expected)",
            )

    def grow(self, n: int) -> None:
        """Account `n` more unpacked bytes against the limits (before they are written)."""
        total = self.out.bytes + n
        lim = self.limits
        if total > lim.max_bytes:
            raise _refuse(
                self.label,
                f"it unpacks to more than {human_bytes(lim.max_bytes)} (raise "
                "`max_unpacked_bytes` on the entry if this is expected)",
            )
        if total > lim.ratio_floor and total > lim.max_ratio * self.packed:
            raise _refuse(
                self.label,
                f"it unpacks to more than {lim.max_ratio:g} times its size "
                f"({human_bytes(self.packed)} packed): an archive bomb? (raise `max_ratio` "
                "on the entry if this is expected)",
            )
        self.out.bytes = total

    def _check_parents(self, name: str) -> None:
        parts = name.split("/")
        for i in range(1, len(parts) + 1):
            prefix = "/".join(parts[:i])
            if prefix in self.symlinks:
                raise _refuse(self.label, f"member {name!r} goes through the symlink member {prefix!r}")
            if i < len(parts) and prefix in self.files:
                raise _refuse(self.label, f"member {name!r} goes through the file member {prefix!r}")

    def directory(self, name: str) -> None:
        self._check_parents(name)
        if name in self.files:
            raise _refuse(self.label, f"member {name!r} is both a file and a folder")
        (self.root / name).mkdir(parents=True, exist_ok=True)
        self.dirs.add(name)

    def regular(self, name: str, size: int, mode: int, mtime: float | None, src: IO[bytes]) -> None:
        self._check_parents(name)
        if name in self.dirs:
            raise _refuse(self.label, f"member {name!r} is both a folder and a file")
        self.grow(size)
        path = self.root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        if name in self.files:  # a later copy of the same name wins, as tar does
            path.unlink()
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
        h = hashlib.sha256()
        written = 0
        try:
            while True:
                chunk = src.read(CHUNK)
                if not chunk:
                    break
                written += len(chunk)
                if written > size:
                    raise _refuse(self.label, f"member {name!r} holds more data than its header says")
                h.update(chunk)
                view = memoryview(chunk)
                while view:
                    view = view[os.write(fd, view) :]
                if self.progress is not None and self.out.kind == "zip":
                    self.progress.add(len(chunk))
            os.fchmod(fd, _file_mode(mode))
        finally:
            os.close(fd)
        if written != size:
            raise ArchiveError(
                f"{self.label}: member {name!r} is truncated ({written} of {size} bytes); the archive "
                "is damaged: fetch it again"
            )
        if mtime is not None:
            os.utime(path, (mtime, mtime))
        self.files[name] = FileRecord(name, size, h.hexdigest())
        if self.progress is not None:
            self.progress.file_done()

    def hardlink(self, name: str, target: str | None) -> None:
        self._check_parents(name)
        if target is None or target not in self.files:
            raise _refuse(self.label, f"hardlink {name!r} points to {target!r}, which is not a file of this archive")
        self.grow(self.files[target].size)
        path = self.root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        if name in self.files:
            path.unlink()
        os.link(self.root / target, path)
        self.files[name] = FileRecord(name, self.files[target].size, self.files[target].sha256)

    def symlink(self, name: str, target: str) -> None:
        self._check_parents(name)
        _link_inside(name, target, self.label)
        if name in self.files or name in self.dirs:
            raise _refuse(self.label, f"member {name!r} is both a symlink and a file or folder")
        self.symlinks[name] = target

    def finish(self) -> Extracted:
        """Create the symlinks, then prove with realpath that none leads out of the tree."""
        root = os.path.realpath(self.root)
        for name, target in self.symlinks.items():
            path = self.root / name
            path.parent.mkdir(parents=True, exist_ok=True)
            os.symlink(target, path)
        for name in self.symlinks:
            real = os.path.realpath(self.root / name)
            if real != root and not real.startswith(root + os.sep):
                raise _refuse(self.label, f"symlink {name!r} leads outside the folder through other links")
        self.out.files = sorted(self.files.values(), key=lambda f: f.path)
        return self.out


# -- extraction -----------------------------------------------------------------------------------------


def _decompressed(raw: IO[bytes], kind: str) -> IO[bytes] | io.BufferedIOBase:
    if kind == "tar":
        return raw
    if kind == "tar.gz":
        import gzip

        return gzip.GzipFile(fileobj=raw, mode="rb")
    if kind == "tar.bz2":
        import bz2

        return bz2.BZ2File(raw, "rb")
    if kind == "tar.xz":
        import lzma

        return lzma.LZMAFile(raw, "rb")
    try:
        import zstandard
    except ImportError:
        raise ArchiveError("a .tar.zst archive needs the `zstandard` package: pip install zstandard") from None
    return zstandard.ZstdDecompressor().stream_reader(raw)


class _Prefetch(io.RawIOBase):
    """Decompress in a thread (zlib, bz2, lzma and zstd release the GIL) while the caller writes and hashes:
    GNU tar gets the same overlap from its separate gzip process."""

    def __init__(self, stream: IO[bytes] | io.BufferedIOBase, depth: int = 8):
        self._q: queue.Queue = queue.Queue(maxsize=depth)
        self._buf = memoryview(b"")
        self._done = False
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(stream,), name="decompress", daemon=True)
        self._thread.start()

    def _run(self, stream: IO[bytes] | io.BufferedIOBase) -> None:
        try:
            while not self._stop.is_set():
                chunk = stream.read(CHUNK)
                self._put(chunk)
                if not chunk:
                    return
        except BaseException as e:  # noqa: BLE001 - handed to the reader
            self._put(e)

    def _put(self, item) -> None:
        while not self._stop.is_set():
            try:
                self._q.put(item, timeout=0.1)
                return
            except queue.Full:
                continue

    def readable(self) -> bool:
        return True

    def readinto(self, b) -> int:
        if not self._buf:
            if self._done:
                return 0
            item = self._q.get()
            if isinstance(item, BaseException):
                self._done = True
                raise item
            if not item:
                self._done = True
                return 0
            self._buf = memoryview(item)
        n = min(len(b), len(self._buf))
        b[:n] = self._buf[:n]
        self._buf = self._buf[n:]
        return n

    def close(self) -> None:
        self._stop.set()
        super().close()


class _ExtractProgress(Progress):
    def _files_text(self) -> str:
        return f"{self.files} files" if not self.total_files else super()._files_text()


def extract_into(
    archive: Path,
    root: Path,
    *,
    limits: Limits | None = None,
    strip_components: int = 0,
    quiet: bool = True,
    name: str | None = None,
) -> Extracted:
    """Unpack `archive` into the existing empty folder `root` by the module's rules. On ArchiveError the
    caller removes `root` (it is a temporary folder that nobody else sees)."""
    archive, root = Path(archive), Path(root)
    limits = limits or Limits()
    kind = detect(archive, name)
    started = time.monotonic()
    if kind == "zip":
        out = _extract_zip(archive, root, limits, strip_components, quiet, name or archive.name)
    else:
        out = _extract_tar(archive, root, kind, limits, strip_components, quiet, name or archive.name)
    out.seconds = time.monotonic() - started
    return out


def _extract_tar(
    archive: Path, root: Path, kind: str, limits: Limits, strip: int, quiet: bool, label: str
) -> Extracted:
    size = archive.stat().st_size
    with open(archive, "rb") as raw, _ExtractProgress(size, 0, label=f"extract {label}", quiet=quiet) as prog:
        w = _Writer(root, archive, limits, None if quiet else prog, label)
        w.out.kind = kind
        seen = 0
        try:
            stream = _decompressed(raw, kind)
            if kind != "tar":
                stream = io.BufferedReader(_Prefetch(stream), CHUNK)
            with contextlib.closing(stream), tarfile.open(fileobj=stream, mode="r|", bufsize=CHUNK) as tf:
                for m in tf:
                    w.member()
                    name = clean_name(m.name, label, strip)
                    if m.ischr() or m.isblk() or m.isfifo() or not (m.isreg() or m.isdir() or m.issym() or m.islnk()):
                        kind_name = (
                            "character device"
                            if m.ischr()
                            else "block device"
                            if m.isblk()
                            else "FIFO"
                            if m.isfifo()
                            else f"type {m.type!r}"
                        )
                        raise _refuse(label, f"member {m.name!r} is a {kind_name}")
                    if m.issparse():
                        raise _refuse(label, f"member {m.name!r} is a sparse file")
                    if name is None:
                        continue
                    if m.isdir():
                        w.directory(name)
                    elif m.issym():
                        w.symlink(name, m.linkname)
                    elif m.islnk():
                        w.hardlink(name, clean_name(m.linkname, label, strip))
                    else:
                        src = tf.extractfile(m)
                        assert src is not None  # a regular member: the other kinds were refused above
                        w.regular(name, m.size, m.mode, m.mtime, src)
                    pos = raw.tell()
                    prog.add(pos - seen)
                    seen = pos
        except (tarfile.TarError, EOFError, OSError, ValueError, zlib.error, lzma.LZMAError) as e:
            if isinstance(e, OSError) and e.errno is not None:
                raise  # a local problem (disk full, permissions): not the archive's fault
            raise ArchiveError(f"{label}: damaged {kind} archive ({type(e).__name__}: {e}); fetch it again") from None
        return w.finish()


def _zip_type(info: zipfile.ZipInfo) -> str:
    mode = info.external_attr >> 16
    if info.is_dir():
        return "dir"
    if info.create_system == 3 and mode:  # unix attributes
        if stat.S_ISLNK(mode):
            return "symlink"
        if stat.S_ISCHR(mode):
            return "character device"
        if stat.S_ISBLK(mode):
            return "block device"
        if stat.S_ISFIFO(mode):
            return "FIFO"
        if stat.S_ISSOCK(mode):
            return "socket"
    return "file"


def _extract_zip(archive: Path, root: Path, limits: Limits, strip: int, quiet: bool, label: str) -> Extracted:
    try:
        zf = zipfile.ZipFile(archive)
    except (zipfile.BadZipFile, OSError) as e:
        raise ArchiveError(f"{label}: damaged zip archive ({e}); fetch it again") from None
    with zf:
        infos = zf.infolist()
        plan = []
        # The whole central directory is judged before anything is written.
        check = _Writer(root, archive, limits, None, label)
        for info in infos:
            check.member()
            kind = _zip_type(info)
            if kind not in ("dir", "file", "symlink"):
                raise _refuse(label, f"member {info.filename!r} is a {kind}")
            if info.flag_bits & 0x1:
                raise _refuse(label, f"member {info.filename!r} is encrypted")
            name = clean_name(info.filename, label, strip, backslash_ok=False)
            if name is None:
                continue
            if kind != "dir":
                check.grow(info.file_size)
            plan.append((info, kind, name))
        total = check.out.bytes
        with _ExtractProgress(
            total, sum(k == "file" for _, k, _ in plan), label=f"extract {label}", quiet=quiet
        ) as prog:
            w = _Writer(root, archive, limits, None if quiet else prog, label)
            w.out.kind = "zip"
            try:
                for info, kind, name in plan:
                    w.member()
                    if kind == "dir":
                        w.directory(name)
                    elif kind == "symlink":
                        if info.file_size > 4096:
                            raise _refuse(label, f"symlink {info.filename!r} has a {info.file_size}-byte target")
                        w.symlink(name, zf.read(info).decode("utf-8", "replace"))
                    else:
                        mode = (info.external_attr >> 16) if info.create_system == 3 else 0o644
                        mtime = time.mktime(info.date_time + (0, 0, -1))
                        with zf.open(info) as src:
                            w.regular(name, info.file_size, mode, mtime, src)
            except (zipfile.BadZipFile, EOFError, ValueError, NotImplementedError, zlib.error, lzma.LZMAError) as e:
                raise ArchiveError(f"{label}: damaged zip archive ({e}); fetch it again") from None
            except OSError as e:
                if e.errno not in (None, errno.EEXIST, errno.ENOTDIR, errno.EISDIR):
                    raise  # the disk (ENOSPC, EACCES): not the archive's fault
                raise ArchiveError(f"{label}: damaged or self-colliding zip archive ({e}); fetch it again") from None
            return w.finish()


# -- expectations ---------------------------------------------------------------------------------------


def check_expect(root: Path, expect: dict | None) -> list[str]:
    """What `root` lacks against an `expect:` mapping: `files`, `dirs`, `jsonl` (list of paths, or
    {path: record count}), `count` ({glob: number of files}). Returns one line per problem; [] is ok."""
    if not expect:
        return []
    root = Path(root)
    problems: list[str] = []
    if not root.is_dir():
        return [f"{root} does not exist"]
    for f in expect.get("files") or []:
        if not (root / f).is_file():
            problems.append(f"file {f} is missing")
    for d in expect.get("dirs") or []:
        if not (root / d).is_dir():
            problems.append(f"folder {d} is missing")
    jsonl = expect.get("jsonl") or {}
    if isinstance(jsonl, list):
        jsonl = {p: None for p in jsonl}
    for f, want in jsonl.items():
        problems += _check_jsonl(root / f, f, want)
    for pattern, want in (expect.get("count") or {}).items():
        got = sum(1 for _ in _glob_files(root, pattern))
        if got != want:
            problems.append(f"{pattern} matches {got} files, expected {want}")
    return problems


def _glob_files(root: Path, pattern: str) -> Iterable[Path]:
    if "**" in pattern or "/" in pattern:
        return (p for p in root.glob(pattern) if p.is_file())
    return (p for p in root.rglob("*") if p.is_file() and fnmatch.fnmatchcase(p.name, pattern))


def _check_jsonl(path: Path, name: str, want: int | None) -> list[str]:
    if not path.is_file():
        return [f"jsonl {name} is missing"]
    records = 0
    with open(path, "rb") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                json.loads(line)
            except ValueError:
                return [f"jsonl {name}: line {lineno} is not valid JSON"]
            records += 1
    if want is not None and records != want:
        return [f"jsonl {name} has {records} records, expected {want}"]
    return []
