"""Large files in parallel Range pieces written in place and hashed from memory, resumable across processes
and nodes through the `.ranges` record (`fetch`); small files in one request (`fetch_small`).

Why not huggingface_hub's downloader (FACTS.md): across processes it restarts every file from zero. Here a
partial file survives its process, and the next one, on any node, continues where it stopped.
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
logger = logging.getLogger(__name__)


def _hash_mismatch(label: str) -> HashMismatch:
    return HashMismatch(f"download {label}: content hash mismatch (wrong bytes discarded)")


def fetch_small(http: Http, url: str, *, size: int, expected: str, sha256: str | None, label: str = "") -> bytes:
    """A small file in one request, checked in memory: no partial, no lease, nothing to resume."""
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
        hasher = new_hasher(sha256, size)
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
    sha256: str | None,
    on_bytes: Callable[[int], None] = lambda n: None,
    label: str = "",
    on_digest: Callable[[str], None] | None = None,
    root: Path | None = None,
) -> int:
    """Download `url` into `partial` until it holds `size` bytes hashing to `expected`; returns the
    bytes fetched (less than `size` when pieces were already there).

    `sha256` truthy selects a sha256 content hash (LFS files, URLs), else the git blob sha1. `expected`
    None (a URL whose hash is not known yet) skips the comparison; `on_digest` receives the hex digest.

    PIECE-sized pieces are handed out in order to parallel Range requests, as many as `http.streams` gives
    this file (it adapts the count to what the link carries, and shares it between the client's large
    files); each is read into its own buffer and written in place, and this thread hashes the buffers in
    order, so the bytes are hashed from memory as they arrive instead of read back from disk. A file holds
    at most its streams + 2 buffers, and all files of the process together BUFFERS (the memory bound,
    whatever --workers is): a stream that is ahead waits for a free one. Pieces already done by this
    or a dead process (the `.ranges` record) are not fetched again, only read back for the hash. On a hash
    mismatch the partial is deleted and TransferError raised: wrong bytes are never kept. The caller holds
    the blob's lease, so no one else writes `partial` meanwhile. `root` is the trusted folder `partial` lives
    below (the hub cache, a data_dir): no link another user planted below it is written through (safefs).
    """
    label = label or url
    folder = safefs.opendir(root or partial.parent, partial.parent)
    record = ranges_record(partial.name)
    pieces = _Pieces(folder, record, size)
    if folder.exists(partial.name):
        pieces.load()
    resumed = frozenset(pieces.done)
    out = _PartialFile(folder, partial.name, size)
    finished = False
    owned = [0]  # buffers this file holds of the process-wide budget
    streams, me = http.streams, object()
    try:
        todo = deque(i for i in range(pieces.count) if i not in resumed)
        kept = sum(b - a for a, b in map(pieces.bounds, resumed))
        reported = [0]  # bytes told to on_bytes, taken back if the file has to be streamed again

        def counted(n: int) -> None:
            reported[0] += n
            on_bytes(n)

        counted(kept)
        cond = threading.Condition()
        failed: list[BaseException] = []
        ready: dict[int, memoryview] = {}  # fetched and written, waiting for the hasher
        free: list[memoryview] = []
        source = [url]  # where the pieces are fetched from (the CDN, after the first redirect)
        resolving = threading.Lock()  # one request at a time through `url` until it has redirected

        running = [0]  # range threads of this file
        threads: list[threading.Thread] = []

        def take() -> tuple[int, memoryview] | None:
            """A buffer first, then the next piece: the piece the hasher waits for always has a buffer, so
            every file holding buffers moves on and, at its end, gives them back to the others. None: this
            thread ends (nothing left, a failure, or the file's part of the streams shrank)."""
            with cond:
                while not failed and todo and running[0] <= streams.share(me):
                    if free:
                        return todo.popleft(), free.pop()
                    if owned[0] < streams.share(me) + 2 and concurrency.BUFFER_BUDGET.acquire(blocking=False):
                        owned[0] += 1
                        return todo.popleft(), _piece_buffer()
                    # wait for our hasher to free one; while we hold none, also look at the budget again
                    cond.wait(timeout=None if owned[0] else 0.05)
                running[0] -= 1
                while free and owned[0] > streams.share(me) + 2:  # fewer streams: spare buffers to the others
                    free.pop()
                    owned[0] -= 1
                    concurrency.BUFFER_BUDGET.release()
                return None

        def grow() -> None:
            """Start range threads up to the file's part of the streams (the caller holds `cond`)."""
            while not failed and running[0] < min(streams.share(me), len(todo)):
                running[0] += 1
                t = threading.Thread(target=worker, name=f"range-{len(threads)}", daemon=True)
                threads.append(t)
                t.start()

        def recycle(buf: memoryview) -> None:
            """A hashed piece's buffer: kept for the next piece, or given back when the file's part shrank."""
            if owned[0] > streams.share(me) + 2:
                owned[0] -= 1
                concurrency.BUFFER_BUDGET.release()
            else:
                free.append(buf)

        def arrived(n: int) -> None:
            streams.moved(n)
            counted(n)

        def worker() -> None:
            try:
                while (job := take()) is not None:
                    i, buf = job
                    start, end = pieces.bounds(i)
                    view = buf[: end - start]
                    began = time.monotonic()
                    _fetch_piece(
                        http,
                        source,
                        url,
                        view,
                        start,
                        size,
                        arrived,
                        label,
                        lambda: bool(failed),
                        resolving,
                        streams.trouble,
                    )
                    streams.piece_done(time.monotonic() - began)
                    out.write(view, start)
                    with cond:
                        ready[i] = buf
                        pieces.add(i)
                        cond.notify_all()
            except BaseException as e:  # noqa: BLE001 - handed to the caller below
                with cond:
                    running[0] -= 1
                    failed.append(e)
                    cond.notify_all()

        def wake() -> None:
            with cond:
                cond.notify_all()

        streams.join(me, wake)
        with cond:
            grow()
        try:
            digest = _hash_in_order(
                out.fd, pieces, resumed, new_hasher(sha256, size), cond, ready, failed, recycle, grow, streams.hashed
            )
        except BaseException as e:
            with cond:
                failed.append(e)
                cond.notify_all()
            raise
        finally:
            streams.leave(me)
            while threads:
                threads.pop().join()
        if failed and isinstance(failed[0], _RangeIgnored):
            # A mirror or caching proxy that answers 200 with the whole body to a ranged request: one
            # stream from the start, hashed as it arrives (what arrived in pieces is counted again).
            logger.info("%s: the server ignores Range (200 to a ranged request); fetching it as one stream", label)
            on_bytes(-reported[0])
            for _ in range(owned[0]):  # the stream needs one buffer of its own, not the pieces' ones
                concurrency.BUFFER_BUDGET.release()
            owned[0] = 0
            pieces.done.clear()
            folder.unlink(record)
            kept, resumed = 0, frozenset()
            digest = _stream_whole(http, url, out, size, sha256, on_bytes, label)
        elif failed:
            raise failed[0]
        if on_digest is not None and digest is not None:
            on_digest(digest)
        if expected is not None and digest != expected:
            out.close()
            folder.unlink(partial.name)
            folder.unlink(record)
            finished = True
            raise _hash_mismatch(label)
        folder.unlink(record)
        finished = True
        return size - kept
    finally:
        for _ in range(owned[0]):
            concurrency.BUFFER_BUDGET.release()
        out.close()
        if not finished:
            pieces.save()  # stopped early: what is on disk is what the next run continues from


def _hash_in_order(
    fd: int,
    pieces: _Pieces,
    resumed: frozenset[int],
    hasher,
    cond: threading.Condition,
    ready: dict[int, memoryview],
    failed: list,
    recycle: Callable[[memoryview], None],
    grow: Callable[[], None],
    on_hashed: Callable[[bool], None],
) -> str | None:
    """Hash pieces in order as they arrive, from their buffers; pieces from an earlier run are read back.
    Before each piece and whenever it wakes, it starts range threads if the file's part of the streams grew
    (`grow`); `recycle` takes each hashed buffer (both under `cond`). `on_hashed` hears, per piece, whether
    the hasher had to wait for it (the stream count holds while the hash, not the link, is behind)."""
    scratch: memoryview | None = None
    for i in range(pieces.count):
        start, end = pieces.bounds(i)
        if i in resumed:
            scratch = scratch or memoryview(bytearray(CHUNK * 4))
            pos = start
            while pos < end:
                n = os.preadv(fd, [scratch[: min(len(scratch), end - pos)]], pos)
                if n <= 0:
                    raise OSError(f"partial file shorter than recorded ({pos} of {end})")
                hasher.update(scratch[:n])
                pos += n
            continue
        with cond:
            grow()
            waited = i not in ready
            while i not in ready and not failed:
                cond.wait()
                grow()
            if failed:
                return None
            buf = ready.pop(i)
        on_hashed(waited)
        hasher.update(buf[: end - start])
        with cond:
            recycle(buf)
            cond.notify_all()
    return hasher.hexdigest()


_EXPIRED = (401, 403, 404, 410)  # what a CDN says to a signed URL past its expiry


class _RangeIgnored(Exception):
    """The server answered 200 (the whole body) to a ranged request."""


def _stream_whole(
    http: Http, url: str, out: _PartialFile, size: int, sha256: str | None, on_bytes: Callable[[int], None], label: str
) -> str:
    """The whole file in one GET from the start, written in place and hashed as it arrives; a broken stream
    starts over (a server that ignores Range cannot continue one)."""
    attempts = Attempts(http.retry, f"download {label}")
    buf = _piece_buffer()
    while True:
        hasher = new_hasher(sha256, size)
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
                        on_bytes(n)
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
        on_bytes(-got)
        attempts.wait(f"{why or 'connection closed'} at byte {got} of {size} (one stream: the server ignores Range)")


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


def _fetch_piece(
    http: Http,
    source: list[str],
    url: str,
    view: memoryview,
    start: int,
    size: int,
    on_bytes: Callable[[int], None],
    label: str,
    stop: Callable[[], bool],
    resolving: threading.Lock,
    trouble: Callable[[], None] = lambda: None,
) -> None:
    """Bytes [start, start + len(view)) of the file into `view`; a dropped connection continues where it broke.

    `source[0]` is where the bytes last came from: after the first piece's redirect, the others go to the
    CDN directly instead of asking the Hub to redirect each of them (back to `url` if that link expired).
    Until a request through `url` has answered, the others wait for it (`resolving`): a large file costs one
    resolver request of the Hub's rate limit, not one per connection, and a refused repo one refusal.
    The body is read with `readinto` straight into the piece's buffer when the connection allows it: a new
    bytes object per chunk costs about a CPU second per GiB (bench/README.md). `trouble` hears every drop
    and retry (the stream count backs off)."""
    attempts = Attempts(http.retry, f"download {label}")
    end = start + len(view)
    filled = 0
    while start + filled < end:
        pos = start + filled
        whole = pos == 0 and end == size
        headers = {} if whole else {"Range": f"bytes={pos}-{end - 1}"}
        with resolving if source[0] == url else nullcontext():
            if stop():
                raise _Stopped()
            target = source[0]
            resp = http.request("GET", target, headers=headers, what=f"download {label}", on_retry=trouble)
            if resp.status in (200, 206):
                source[0] = resp.url or target
        dropped: BaseException | None = None
        try:
            if resp.status in _EXPIRED and target != url:
                source[0] = url
                continue
            if resp.status == 200 and not whole:
                raise _RangeIgnored()
            if resp.status not in (200, 206):
                raise http.status_error(resp, url, f"download {label}")
            if resp.status == 206:
                _check_content_range(resp.headers.get("Content-Range"), pos, end, size, label)
            while filled < len(view):
                if stop():
                    raise _Stopped()
                try:
                    n = resp.readinto(view[filled : filled + CHUNK])
                except DROPPED as e:
                    dropped = e
                    break
                if not n:
                    break
                filled += n
                on_bytes(n)
        finally:
            resp.release_conn()
        if dropped is not None:
            trouble()
            attempts.wait(f"connection dropped at byte {start + filled} ({type(dropped).__name__})")
        elif filled < len(view):
            trouble()
            attempts.wait(f"connection closed at byte {start + filled} of {size}")
