"""Large files in parallel Range pieces written in place and hashed from memory, resumable across processes
and nodes through the `.ranges` record (`fetch`); small files in one request (`fetch_small`).

Why not huggingface_hub's downloader (FACTS.md): across processes it restarts every file from zero. Here a
partial file survives its process, and the next one, on any node, continues where it stopped.

Why one module of about 600 lines: `RangedDownload` (its range threads, the in-order hasher, the fallback
for servers that ignore Range) is half of it, and the rest is what it alone uses: the partial file's
writer (`_PartialFile`, O_DIRECT), the resume record's pieces (`_Pieces`; status and cleanup read the
record through `layout`), the Content-Range check; plus `fetch_small`, its counterpart for small files.
"""

from __future__ import annotations

import errno
import json
import logging
import mmap
import os
import threading
import time
from collections import deque
from collections.abc import Callable
from contextlib import nullcontext
from pathlib import Path
from typing import Literal, get_args

from hpcstage import safefs
from hpcstage.errors import HashMismatch, TransferError
from hpcstage.hfcache import new_hasher
from hpcstage.layout import ranges_payload, ranges_record
from hpcstage.transfer import concurrency
from hpcstage.transfer.http import DROPPED, Attempts, Http

CHUNK = 1 << 20  # one read from the socket
SMALL = 8 << 20  # files below this are fetched whole into memory: no partial, no lease
# Unit of parallel ranges, of in-order hashing from memory and of the resume record. 4 MiB: the buffer
# budget (BUFFERS) then holds 30 streams, and a piece at 40 MB/s still spends 3/4 of its time moving bytes
# behind a 30 ms request latency (bench/README.md).
PIECE = 4 << 20
RECORD_EVERY = 0.25  # seconds between saves of the resume record while pieces arrive
DIRECT_ALIGN = 4096  # O_DIRECT alignment that every Linux filesystem accepts
# How a file's content is hashed: "sha256" (LFS files, URLs) or "git", the git blob sha1 regular Hub files are
# named by (`hfcache.new_hasher`).
Algorithm = Literal["sha256", "git"]
logger = logging.getLogger(__name__)


def _known(algorithm: str) -> None:
    """A name that is no Algorithm fails before any request (not silently as the git sha1)."""
    if algorithm not in get_args(Algorithm):
        raise ValueError(f"hash algorithm {algorithm!r}: use one of {', '.join(get_args(Algorithm))}")


def _hasher(algorithm: Algorithm, size: int):
    return new_hasher(algorithm == "sha256", size)


def _hash_mismatch(label: str) -> HashMismatch:
    return HashMismatch(f"download {label}: content hash mismatch (wrong bytes discarded)")


def fetch_small(http: Http, url: str, *, size: int, expected: str, algorithm: Algorithm, label: str = "") -> bytes:
    """A small file in one request, its content hashed by `algorithm` and checked against `expected` in
    memory: no partial, no lease, nothing to resume."""
    _known(algorithm)
    label = label or url
    attempts = Attempts(http.retry, f"download {label}")
    mismatched = False
    while True:
        resp = http.request("GET", url, what=f"download {label}")
        try:
            if resp.status != 200:
                raise http.status_error(resp, url, f"download {label}")
            data = resp.read()
        except DROPPED as e:
            attempts.wait(f"connection dropped ({type(e).__name__})")
            continue
        finally:
            resp.release_conn()
        if len(data) != size:
            attempts.wait(f"got {len(data)} of {size} bytes")
            continue
        hasher = _hasher(algorithm, size)
        hasher.update(data)
        if hasher.hexdigest() == expected:
            return data
        if mismatched:
            raise _hash_mismatch(label)
        mismatched = True  # wrong bytes: discarded, fetched once more


class _Stopped(Exception):
    """Another piece of the same file failed: this one stops too (the first error is reported)."""


class _Pieces:
    """Which PIECE-sized parts of a partial file are complete, persisted beside it (atomically, at most every
    RECORD_EVERY seconds while running, and whenever the download stops early), so a process started later,
    on any node, continues instead of starting over."""

    def __init__(self, folder: safefs.Dir, record: str, size: int):
        self.folder, self.record, self.size = folder, record, size
        self.count = max(1, -(-size // PIECE))
        self.done: set[int] = set()
        self._written = 0.0  # monotonic time of the last save
        self._dirty = False

    def load(self) -> None:
        try:
            data = json.loads(self.folder.read(self.record) or b"null")
        except (OSError, ValueError):
            return
        if not (
            isinstance(data, dict)
            and data.get("size") == self.size
            and isinstance(data.get("segment"), int)
            and data["segment"] > 0
        ):
            return
        # a record written with another piece size (an earlier version): the pieces its segments cover
        segment = data["segment"]
        have = {i for i in data.get("done", []) if isinstance(i, int) and 0 <= i * segment < self.size}
        for i in range(self.count):
            start, end = self.bounds(i)
            if all(k in have for k in range(start // segment, (end - 1) // segment + 1)):
                self.done.add(i)

    def bounds(self, i: int) -> tuple[int, int]:
        return i * PIECE, min(self.size, (i + 1) * PIECE)

    def add(self, i: int) -> None:
        self.done.add(i)
        self._dirty = True
        if time.monotonic() - self._written >= RECORD_EVERY:
            self.save()

    def save(self) -> None:
        if not self._dirty:
            return
        self.folder.write_atomic(self.record, ranges_payload(self.size, PIECE, sorted(self.done)))
        self._written, self._dirty = time.monotonic(), False


class _PartialFile:
    """The partial file, written with O_DIRECT where the filesystem takes it, buffered otherwise.

    Why by hand: a staged file is read by jobs on other nodes, not by this one, so copying it into the login
    node's page cache is work (and memory other users lose) for nothing. Measured here (bench/README.md):
    writing 1 GiB through the page cache costs 0.2-2.3 s of system time depending on whether the kernel has
    pages at hand; the same bytes written O_DIRECT from aligned buffers take 0.36 s and 0.05 s of CPU.
    O_DIRECT needs the buffer, offset and length aligned: pieces are mmap buffers (page-aligned) at PIECE
    offsets, and the unaligned tail of the last piece goes through a second, buffered descriptor.
    Filesystems that refuse O_DIRECT (tmpfs, some FUSE mounts) get buffered writes."""

    def __init__(self, folder: safefs.Dir, name: str, size: int):
        # never through a link planted at the name (safefs): a link or hard link there is replaced
        self.fd = folder.open_transient(name, os.O_RDWR)
        self.direct = -1
        try:
            if os.fstat(self.fd).st_size != size:
                os.ftruncate(self.fd, size)
            if hasattr(os, "O_DIRECT"):  # a second description of the same inode, not of the name
                self.direct = os.open(f"/proc/self/fd/{self.fd}", os.O_WRONLY | os.O_DIRECT | os.O_CLOEXEC)
        except OSError as e:
            if e.errno not in (errno.EINVAL, errno.ENOENT):  # no O_DIRECT here, or no /proc: buffered
                self.close()
                raise
        self.use_direct = self.direct >= 0

    def write(self, view: memoryview, offset: int) -> None:
        """Called by several range threads at once (each its own piece)."""
        n = len(view)
        aligned = n - n % DIRECT_ALIGN if self.use_direct and offset % DIRECT_ALIGN == 0 else 0
        if aligned:
            try:
                _pwrite_all(self.direct, view[:aligned], offset)
            except OSError as e:
                if e.errno != errno.EINVAL:
                    raise
                # accepted at open, refused at write: buffered from now on (the descriptor stays open
                # until close(), another thread may be writing through it)
                self.use_direct, aligned = False, 0
        if aligned < n:
            _pwrite_all(self.fd, view[aligned:], offset + aligned)

    def close(self) -> None:
        for fd in (self.direct, self.fd):
            if fd >= 0:
                os.close(fd)
        self.direct = self.fd = -1


def _pwrite_all(fd: int, view: memoryview, offset: int) -> None:
    while len(view):
        n = os.pwrite(fd, view, offset)
        view, offset = view[n:], offset + n


def _piece_buffer() -> memoryview:
    """PIECE bytes of anonymous memory: page-aligned, as O_DIRECT needs."""
    return memoryview(mmap.mmap(-1, PIECE))


def fetch(
    http: Http,
    url: str,
    partial: Path,
    *,
    size: int,
    expected: str | None,
    algorithm: Algorithm,
    on_bytes: Callable[[int], None] = lambda n: None,
    label: str = "",
    on_digest: Callable[[str], None] | None = None,
    root: Path | None = None,
) -> int:
    """Download `url` into `partial` until it holds `size` bytes hashing to `expected` by `algorithm`
    ("sha256": LFS files, URLs; "git": the git blob sha1 of regular Hub files); returns the bytes fetched
    (less than `size` when pieces were already there). `expected` None (a URL whose hash is not known yet)
    skips the comparison; `on_digest` receives the hex digest. How: `RangedDownload`."""
    return RangedDownload(
        http,
        url,
        partial,
        size=size,
        expected=expected,
        algorithm=algorithm,
        on_bytes=on_bytes,
        label=label,
        on_digest=on_digest,
        root=root,
    ).run()


class RangedDownload:
    """One large file's download into its partial file, in parallel Range pieces.

    PIECE-sized pieces are handed out in order to parallel Range requests, as many as `http.streams` gives
    this file (it adapts the count to what the link carries, and shares it between the client's large
    files); each is read into its own buffer and written in place, and the calling thread hashes the buffers
    in order, so the bytes are hashed from memory as they arrive instead of read back from disk. A file holds
    at most its streams + 2 buffers, and all files of the process together BUFFERS (the memory bound,
    whatever --workers is): a stream that is ahead waits for a free one. Pieces already done by this
    or a dead process (the `.ranges` record) are not fetched again, only read back for the hash. On a hash
    mismatch the partial is deleted and HashMismatch raised: wrong bytes are never kept. The caller holds
    the blob's lease, so no one else writes `partial` meanwhile. `root` is the trusted folder `partial` lives
    below (the hub cache, a data_dir): no link another user planted below it is written through (safefs).

    The state below is shared by the range threads and the hasher, under `cond`."""

    to_fetch: deque[int]  # pieces not handed to a range thread yet, in file order
    resumed: frozenset[int]  # pieces complete on disk before this run: read back for the hash only
    kept: int  # bytes of those pieces
    ready: dict[int, memoryview]  # fetched and written, waiting for the hasher
    free: list[memoryview]  # this file's buffers not in use
    owned: int  # buffers this file holds of the process-wide budget (concurrency.BUFFER_BUDGET)
    running: int  # range threads of this file
    reported: int  # bytes told to on_bytes, taken back if the file has to be streamed again
    error: BaseException | None  # the first failure of any thread: every other one stops
    source: str  # where the pieces are fetched from (the CDN, after the first redirect)
    pieces: _Pieces  # the pieces complete on disk, saved in the `.ranges` record
    out: _PartialFile  # the partial file the range threads write into

    def __init__(
        self,
        http: Http,
        url: str,
        partial: Path,
        *,
        size: int,
        expected: str | None,
        algorithm: Algorithm,
        on_bytes: Callable[[int], None] = lambda n: None,
        label: str = "",
        on_digest: Callable[[str], None] | None = None,
        root: Path | None = None,
    ):
        _known(algorithm)
        self.http, self.url, self.partial, self.root = http, url, partial, root
        self.size, self.expected, self.algorithm = size, expected, algorithm
        self.on_bytes, self.on_digest = on_bytes, on_digest
        self.label = label or url
        self.streams = http.streams
        self.cond = threading.Condition()
        self.resolving = threading.Lock()  # one request at a time through `url` until it has redirected
        self.threads: list[threading.Thread] = []
        self.to_fetch, self.resumed, self.kept = deque(), frozenset(), 0
        self.ready, self.free = {}, []
        self.owned = self.running = self.reported = 0
        self.error = None
        self.source = url

    def run(self) -> int:
        """The bytes fetched; the partial is complete and hash-checked when this returns."""
        folder = safefs.opendir(self.root or self.partial.parent, self.partial.parent)
        record = ranges_record(self.partial.name)
        self.pieces = pieces = _Pieces(folder, record, self.size)
        if folder.exists(self.partial.name):
            pieces.load()
        self.resumed = frozenset(pieces.done)
        self.out = out = _PartialFile(folder, self.partial.name, self.size)
        finished = False
        try:
            self.to_fetch = deque(i for i in range(pieces.count) if i not in self.resumed)
            self.kept = sum(b - a for a, b in map(pieces.bounds, self.resumed))
            self._counted(self.kept)
            self.streams.join(self, self._wake)
            with self.cond:
                self._grow()
            try:
                digest = self._hash_in_order(_hasher(self.algorithm, self.size))
            except BaseException as e:
                with self.cond:
                    self._fail(e)
                raise
            finally:
                self.streams.leave(self)
                while self.threads:
                    self.threads.pop().join()
            if isinstance(self.error, _RangeIgnored):
                # A mirror or caching proxy that answers 200 with the whole body to a ranged request: one
                # stream from the start, hashed as it arrives (what arrived in pieces is counted again).
                logger.info(
                    "%s: the server ignores Range (200 to a ranged request); fetching it as one stream", self.label
                )
                self.on_bytes(-self.reported)
                self._release_buffers()  # the stream needs one buffer of its own, not the pieces' ones
                pieces.done.clear()
                folder.unlink(record)
                self.kept, self.resumed = 0, frozenset()
                digest = self._stream_whole()
            elif self.error is not None:
                raise self.error
            if self.on_digest is not None and digest is not None:
                self.on_digest(digest)
            if self.expected is not None and digest != self.expected:
                out.close()
                folder.unlink(self.partial.name)
                folder.unlink(record)
                finished = True
                raise _hash_mismatch(self.label)
            folder.unlink(record)
            finished = True
            return self.size - self.kept
        finally:
            self._release_buffers()
            out.close()
            if not finished:
                pieces.save()  # stopped early: what is on disk is what the next run continues from

    # -- the range threads --------------------------------------------------------------------------

    def _counted(self, n: int) -> None:
        self.reported += n
        self.on_bytes(n)

    def _arrived(self, n: int) -> None:
        self.streams.moved(n)
        self._counted(n)

    def _fail(self, e: BaseException) -> None:
        """Keep the first failure and wake everyone (the caller holds `cond`)."""
        if self.error is None:
            self.error = e
        self.cond.notify_all()

    def _wake(self) -> None:
        with self.cond:
            self.cond.notify_all()

    def _share(self) -> int:
        return self.streams.share(self)

    def _take(self) -> tuple[int, memoryview] | None:
        """A buffer first, then the next piece: the piece the hasher waits for always has a buffer, so
        every file holding buffers moves on and, at its end, gives them back to the others. None: this
        thread ends (nothing left, a failure, or the file's part of the streams shrank)."""
        with self.cond:
            while self.error is None and self.to_fetch and self.running <= self._share():
                if self.free:
                    return self.to_fetch.popleft(), self.free.pop()
                if self.owned < self._share() + 2 and concurrency.BUFFER_BUDGET.acquire(blocking=False):
                    self.owned += 1
                    return self.to_fetch.popleft(), _piece_buffer()
                # wait for our hasher to free one; while we hold none, also look at the budget again
                self.cond.wait(timeout=None if self.owned else 0.05)
            self.running -= 1
            while self.free and self.owned > self._share() + 2:  # fewer streams: spare buffers to the others
                self.free.pop()
                self.owned -= 1
                concurrency.BUFFER_BUDGET.release()
            return None

    def _grow(self) -> None:
        """Start range threads up to the file's part of the streams (the caller holds `cond`)."""
        while self.error is None and self.running < min(self._share(), len(self.to_fetch)):
            self.running += 1
            t = threading.Thread(target=self._range_thread, name=f"range-{len(self.threads)}", daemon=True)
            self.threads.append(t)
            t.start()

    def _recycle(self, buf: memoryview) -> None:
        """A hashed piece's buffer: kept for the next piece, or given back when the file's part shrank
        (the caller holds `cond`)."""
        if self.owned > self._share() + 2:
            self.owned -= 1
            concurrency.BUFFER_BUDGET.release()
        else:
            self.free.append(buf)

    def _release_buffers(self) -> None:
        for _ in range(self.owned):
            concurrency.BUFFER_BUDGET.release()
        self.owned = 0

    def _range_thread(self) -> None:
        pieces, out = self.pieces, self.out
        try:
            while (job := self._take()) is not None:
                i, buf = job
                start, end = pieces.bounds(i)
                view = buf[: end - start]
                began = time.monotonic()
                self._fetch_piece(view, start)
                self.streams.piece_done(time.monotonic() - began)
                out.write(view, start)
                with self.cond:
                    self.ready[i] = buf
                    pieces.add(i)
                    self.cond.notify_all()
        except BaseException as e:  # noqa: BLE001 - handed to the caller through `error`
            with self.cond:
                self.running -= 1
                self._fail(e)

    # -- the hasher (the calling thread) ------------------------------------------------------------

    def _hash_in_order(self, hasher) -> str | None:
        """Hash pieces in order as they arrive, from their buffers; pieces from an earlier run are read back.
        Before each piece and whenever it wakes, it starts range threads if the file's part of the streams
        grew; each hashed buffer is recycled. The stream count hears, per piece, whether the hasher had to
        wait for it (the count holds while the hash, not the link, is behind). None: a thread failed."""
        pieces, fd = self.pieces, self.out.fd
        scratch: memoryview | None = None
        for i in range(pieces.count):
            start, end = pieces.bounds(i)
            if i in self.resumed:
                scratch = scratch or memoryview(bytearray(CHUNK * 4))
                pos = start
                while pos < end:
                    n = os.preadv(fd, [scratch[: min(len(scratch), end - pos)]], pos)
                    if n <= 0:
                        raise OSError(f"partial file shorter than recorded ({pos} of {end})")
                    hasher.update(scratch[:n])
                    pos += n
                continue
            with self.cond:
                self._grow()
                waited = i not in self.ready
                while i not in self.ready and self.error is None:
                    self.cond.wait()
                    self._grow()
                if self.error is not None:
                    return None
                buf = self.ready.pop(i)
            self.streams.hashed(waited)
            hasher.update(buf[: end - start])
            with self.cond:
                self._recycle(buf)
                self.cond.notify_all()
        return hasher.hexdigest()

    # -- the requests -------------------------------------------------------------------------------

    def _fetch_piece(self, view: memoryview, start: int) -> None:
        """Bytes [start, start + len(view)) of the file into `view`; a dropped connection continues where it
        broke.

        `source` is where the bytes last came from: after the first piece's redirect, the others go to the
        CDN directly instead of asking the Hub to redirect each of them (back to `url` if that link expired).
        Until a request through `url` has answered, the others wait for it (`resolving`): a large file costs
        one resolver request of the Hub's rate limit, not one per connection, and a refused repo one refusal.
        The body is read with `readinto` straight into the piece's buffer when the connection allows it: a
        new bytes object per chunk costs about a CPU second per GiB (bench/README.md). The stream count hears
        every drop and retry (`trouble`: it backs off)."""
        http, url, size, label = self.http, self.url, self.size, self.label
        attempts = Attempts(http.retry, f"download {label}")
        end = start + len(view)
        filled = 0
        while start + filled < end:
            pos = start + filled
            whole = pos == 0 and end == size
            headers = {} if whole else {"Range": f"bytes={pos}-{end - 1}"}
            with self.resolving if self.source == url else nullcontext():
                if self.error is not None:
                    raise _Stopped()
                target = self.source
                resp = http.request(
                    "GET", target, headers=headers, what=f"download {label}", on_retry=self.streams.trouble
                )
                if resp.status in (200, 206):
                    self.source = resp.url or target
                elif target == url:  # the Hub's own final answer (refused, gone): told before the next may ask
                    error = http.status_error(resp, url, f"download {label}")
                    with self.cond:
                        self._fail(error)
                    raise error
            dropped: BaseException | None = None
            try:
                if resp.status in _EXPIRED and target != url:
                    self.source = url
                    continue
                if resp.status == 200 and not whole:
                    raise _RangeIgnored()
                if resp.status not in (200, 206):
                    raise http.status_error(resp, url, f"download {label}")
                if resp.status == 206:
                    _check_content_range(resp.headers.get("Content-Range"), pos, end, size, label)
                while filled < len(view):
                    if self.error is not None:
                        raise _Stopped()
                    try:
                        n = resp.readinto(view[filled : filled + CHUNK])
                    except DROPPED as e:
                        dropped = e
                        break
                    if not n:
                        break
                    filled += n
                    self._arrived(n)
            finally:
                resp.release_conn()
            if dropped is not None:
                self.streams.trouble()
                attempts.wait(f"connection dropped at byte {start + filled} ({type(dropped).__name__})")
            elif filled < len(view):
                self.streams.trouble()
                attempts.wait(f"connection closed at byte {start + filled} of {size}")

    def _stream_whole(self) -> str:
        """The whole file in one GET from the start, written in place and hashed as it arrives; a broken stream
        starts over (a server that ignores Range cannot continue one)."""
        http, url, size, label, out = self.http, self.url, self.size, self.label, self.out
        attempts = Attempts(http.retry, f"download {label}")
        buf = _piece_buffer()
        while True:
            hasher = _hasher(self.algorithm, size)
            resp = http.request("GET", url, what=f"download {label}")
            got, why = 0, ""
            try:
                if resp.status != 200:
                    raise http.status_error(resp, url, f"download {label}")
                while got < size:
                    want, filled = min(PIECE, size - got), 0
                    try:
                        while filled < want and (n := resp.readinto(buf[filled:want])):
                            filled += n
                            self.on_bytes(n)
                    except DROPPED as e:
                        why = f"connection dropped ({type(e).__name__})"
                    hasher.update(buf[:filled])
                    out.write(buf[:filled], got)
                    got += filled
                    if filled < want:
                        break
            finally:
                resp.release_conn()
            if got == size:
                return hasher.hexdigest()
            self.on_bytes(-got)
            attempts.wait(
                f"{why or 'connection closed'} at byte {got} of {size} (one stream: the server ignores Range)"
            )


_EXPIRED = (401, 403, 404, 410)  # what a CDN says to a signed URL past its expiry


class _RangeIgnored(Exception):
    """The server answered 200 (the whole body) to a ranged request."""


def _check_content_range(value: str | None, start: int, end: int, size: int, label: str) -> None:
    """A 206 must carry the bytes asked for: `Content-Range: bytes start-(end-1)/size` (total may be `*`)."""
    if value is None:
        return
    unit, _, spec = value.strip().partition(" ")
    span, _, total = spec.partition("/")
    first, _, last = span.partition("-")
    try:
        ok = (
            unit == "bytes"
            and int(first) == start
            and int(last) == end - 1
            and (total.strip() == "*" or int(total) == size)
        )
    except ValueError:
        ok = False
    if not ok:
        raise TransferError(
            f"download {label}: asked for bytes {start}-{end - 1} of {size}, the server sent "
            f"Content-Range {value!r}; the server or a proxy between is broken"
        )
