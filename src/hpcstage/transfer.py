"""The download engine: pooled HTTP, retries with backoff, timeouts, ranged resume into partial files.

Why not huggingface_hub's downloader (FACTS.md): its repo-info and tree calls have no timeout (a stalled
server hangs forever), its content GET does not retry a 503, and across processes it restarts every file
from zero. Here every request has connect and read timeouts and one retry policy with a time budget, and
a partial file survives its process so the next one continues where it stopped.
"""
from __future__ import annotations

import email.utils
import errno
import http.client
import json
import mmap
import os
import random
import ssl
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable
from urllib.parse import urljoin, urlsplit

from hpcstage import safefs
from hpcstage.errors import TransferError
from hpcstage.hfcache import new_hasher

RETRY_STATUSES = frozenset({408, 429, 500, 502, 503, 504})
CHUNK = 1 << 20  # one read from the socket
SMALL = 8 << 20  # files below this are fetched whole into memory: no partial, no lease
PIECE = 8 << 20  # unit of parallel ranges, of in-order hashing from memory and of the resume record
CONNECTIONS = 4  # parallel range requests per large file
RECORD_EVERY = 0.25  # seconds between saves of the resume record while pieces arrive
DIRECT_ALIGN = 4096  # O_DIRECT alignment that every Linux filesystem accepts
BUFFERS = 16  # PIECE buffers for all large files of a process at once: 128 MiB
_BUFFERS = threading.BoundedSemaphore(BUFFERS)
RANGES_SUFFIX = ".ranges"


@dataclass
class RetryPolicy:
    """Exponential backoff with jitter, honouring Retry-After, bounded by attempts and a time budget."""

    attempts: int = 6
    base: float = 1.0
    cap: float = 16.0
    budget: float = 300.0  # seconds from the first try of one request

    def delay(self, attempt: int, retry_after: str | None) -> float:
        hinted = parse_retry_after(retry_after)
        if hinted is not None:
            return hinted
        return min(self.cap, self.base * 2**attempt) * random.uniform(0.5, 1.0)


def parse_retry_after(value: str | None) -> float | None:
    """`Retry-After` is either integer seconds or an HTTP date."""
    if not value:
        return None
    value = value.strip()
    if value.isdigit():
        return float(value)
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - time.time())


@dataclass
class _Attempts:
    """Tracks one logical request's retries; `wait()` sleeps or raises when the policy is spent."""

    policy: RetryPolicy
    what: str
    n: int = 0
    started: float = field(default_factory=time.monotonic)

    def wait(self, reason: str, retry_after: str | None = None) -> None:
        delay = self.policy.delay(self.n, retry_after)
        self.n += 1
        spent = time.monotonic() - self.started
        if self.n >= self.policy.attempts or spent + delay > self.policy.budget:
            raise TransferError(f"{self.what}: {reason} (gave up after {self.n} tries in {spent:.0f}s)")
        time.sleep(delay)


def _origin(url: str) -> tuple[str, str, int | None]:
    parts = urlsplit(url)
    return parts.scheme, parts.hostname or "", parts.port


# What a read from a live connection raises when the peer goes away or stalls (not disk errors: ENOSPC
# and EDQUOT are plain OSErrors and must reach the caller's disk-full handling).
DROPPED = (ConnectionError, TimeoutError, http.client.HTTPException)


class _HTTPConnection(http.client.HTTPConnection):
    """Connect timeout for the connect, read timeout for everything after it."""

    read_timeout: float = 30.0

    def connect(self) -> None:
        super().connect()  # also sets TCP_NODELAY
        self.sock.settimeout(self.read_timeout)


class _HTTPSConnection(http.client.HTTPSConnection):
    read_timeout: float = 30.0

    def connect(self) -> None:
        super().connect()
        self.sock.settimeout(self.read_timeout)


class Response:
    """One answer. `release_conn()` hands the connection back for the next request when the body was read
    to its end, and closes it otherwise (a half-read body cannot be skipped for free)."""

    def __init__(self, http: "Http", key: tuple, conn: http.client.HTTPConnection, raw: http.client.HTTPResponse,
                 url: str):
        self._http, self._key, self._conn, self._raw = http, key, conn, raw
        self.status, self.headers, self.url = raw.status, raw.headers, url

    def read(self, amt: int | None = None) -> bytes:
        return self._raw.read(amt)

    def readinto(self, buffer) -> int:
        """Straight into the caller's buffer: no bytes object per chunk."""
        return self._raw.readinto(buffer)

    def drain_conn(self, limit: int = 1 << 16) -> None:
        """Read a short leftover body (an error page, a redirect's text) so the connection can be reused."""
        try:
            if not self._raw.isclosed() and (self._raw.length or 0) <= limit:
                self._raw.read()
        except (OSError, http.client.HTTPException):
            pass

    def release_conn(self) -> None:
        conn, self._conn = self._conn, None
        if conn is None:
            return
        if self._raw.isclosed() and not self._raw.will_close:
            self._http._put(self._key, conn)
        else:
            self._raw.close()
            conn.close()


class Http:
    """One client per run: keep-alive connections per origin over the standard library's http.client.
    Redirects are followed here so that Authorization is never sent to another origin (LFS files redirect
    to a CDN).

    Why not urllib3's pool (used before): per small request it cost ~3x the CPU of a bare http.client
    exchange (its pool queue, retry and header objects), and 2,000 small files spent most of their time
    there (bench/README.md). What is kept of a pool here is a list of idle connections per origin."""

    def __init__(
        self,
        headers: dict[str, str],
        *,
        auth_origin: str | None = None,
        pool_size: int = 8,
        connect_timeout: float = 10.0,
        read_timeout: float = 30.0,
        retry: RetryPolicy | None = None,
    ):
        self.headers = headers
        self.auth_origin = _origin(auth_origin) if auth_origin else None
        self.retry = retry or RetryPolicy()
        self.pool_size = pool_size
        self.connect_timeout, self.read_timeout = connect_timeout, read_timeout
        self._idle: dict[tuple, list[http.client.HTTPConnection]] = {}
        self._lock = threading.Lock()
        self._tls: ssl.SSLContext | None = None

    def _connection(self, key: tuple) -> http.client.HTTPConnection:
        scheme, host, port = key
        if scheme == "https":
            if self._tls is None:
                self._tls = ssl.create_default_context()  # system CAs; SSL_CERT_FILE/SSL_CERT_DIR apply
            conn: http.client.HTTPConnection = _HTTPSConnection(host, port, timeout=self.connect_timeout,
                                                                context=self._tls)
        elif scheme == "http":
            conn = _HTTPConnection(host, port, timeout=self.connect_timeout)
        else:
            raise TransferError(f"unsupported URL scheme {scheme!r} (only http and https)")
        conn.read_timeout = self.read_timeout
        return conn

    def _put(self, key: tuple, conn: http.client.HTTPConnection) -> None:
        with self._lock:
            idle = self._idle.setdefault(key, [])
            if len(idle) < self.pool_size:
                idle.append(conn)
                return
        conn.close()

    def _exchange(self, method: str, url: str, parts, headers: dict[str, str], body: bytes | None) -> Response:
        """One request and its response head (`parts`: `url` split, as the caller had it). A reused keep-alive
        connection the server has closed meanwhile fails before any answer: that is tried once more on a new
        connection, without counting as a retry."""
        key = (parts.scheme, parts.hostname or "", parts.port)
        target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
        while True:
            with self._lock:
                idle = self._idle.get(key)
                conn = idle.pop() if idle else None
            reused = conn is not None
            conn = conn or self._connection(key)
            try:
                conn.request(method, target, body=body, headers=headers)
                raw = conn.getresponse()
            except (OSError, http.client.HTTPException):
                conn.close()
                if reused:
                    continue
                raise
            return Response(self, key, conn, raw, url)

    def _send(self, method: str, url: str, headers: dict[str, str], body: bytes | None) -> Response:
        """Follow redirects; Authorization goes only to `auth_origin` (else to the first URL's origin).
        The response's `url` is where it finally came from."""
        trusted = self.auth_origin or _origin(url)
        for _ in range(10):
            parts = urlsplit(url)  # once per hop: small files make this the hot path
            sent = dict(self.headers, **headers)
            if (parts.scheme, parts.hostname or "", parts.port) != trusted:
                sent.pop("authorization", None)
                sent.pop("Authorization", None)
            resp = self._exchange(method, url, parts, sent, body)
            if resp.status in (301, 302, 303, 307, 308) and resp.headers.get("Location"):
                target = urljoin(url, resp.headers["Location"])
                scheme = urlsplit(target).scheme
                if parts.scheme == "https" and scheme != "https":
                    resp.release_conn()
                    raise TransferError(f"{method} {parts.netloc}: refused a redirect from https to {scheme}; "
                                        "the server must stay on https")
                url = target
                resp.drain_conn()
                resp.release_conn()
                continue
            return resp
        raise TransferError(f"{method} {url}: too many redirects")

    def request(
        self, method: str, url: str, *, headers: dict[str, str] | None = None, body: bytes | None = None, what: str = ""
    ) -> Response:
        """Send with retries on 408/429/5xx and connection errors. The caller reads (or releases) the
        body; error statuses other than those come back to the caller to map to a typed error."""
        attempts = _Attempts(self.retry, what or f"{method} {url}")
        while True:
            try:
                resp = self._send(method, url, headers or {}, body)
            except ssl.SSLCertVerificationError as e:
                raise TransferError(f"{attempts.what}: the server's TLS certificate is not trusted "
                                    f"({e.verify_message}); point SSL_CERT_FILE at your site's CA bundle") from None
            except (OSError, http.client.HTTPException) as e:
                attempts.wait(f"connection failed ({type(e).__name__}: {_short(e)})")
                continue
            if resp.status in RETRY_STATUSES:
                retry_after = resp.headers.get("Retry-After") or _ratelimit_reset(resp.headers)
                resp.drain_conn()
                resp.release_conn()
                attempts.wait(f"server answered {resp.status}", retry_after)
                continue
            return resp


def _ratelimit_reset(headers) -> str | None:
    """The Hub's 429s say when the window resets in `RateLimit: "api";r=0;t=55` (IETF draft)."""
    from huggingface_hub.utils import parse_ratelimit_headers

    info = parse_ratelimit_headers(headers)
    return str(info.reset_in_seconds) if info is not None and info.remaining == 0 else None


def _short(e: Exception) -> str:
    text = str(e)
    return text if len(text) < 160 else text[:157] + "..."


def _hash_mismatch(label: str) -> TransferError:
    return TransferError(f"download {label}: content hash mismatch (wrong bytes discarded)")


def fetch_small(http: Http, url: str, *, size: int, expected: str, sha256: str | None, label: str = "") -> bytes:
    """A small file in one request, checked in memory: no partial, no lease, nothing to resume."""
    label = label or url
    attempts = _Attempts(http.retry, f"download {label}")
    mismatched = False
    while True:
        resp = http.request("GET", url, what=f"download {label}")
        try:
            if resp.status != 200:
                raise TransferError(f"download {label}: server answered {resp.status}")
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
        if isinstance(data, dict) and data.get("size") == self.size and data.get("segment") == PIECE:
            self.done = {i for i in data.get("done", []) if isinstance(i, int) and 0 <= i < self.count}

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
        payload = {"size": self.size, "segment": PIECE, "done": sorted(self.done)}
        self.folder.write_atomic(self.record, json.dumps(payload).encode())
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
    connections: int = CONNECTIONS,
    on_digest: Callable[[str], None] | None = None,
    root: Path | None = None,
) -> int:
    """Download `url` into `partial` until it holds `size` bytes hashing to `expected`; returns the
    bytes fetched (less than `size` when pieces were already there).

    `sha256` truthy selects a sha256 content hash (LFS files, URLs), else the git blob sha1. `expected`
    None (a URL whose hash is not known yet) skips the comparison; `on_digest` receives the hex digest.

    PIECE-sized pieces are handed out in order to up to `connections` parallel Range requests, each read
    into its own buffer and written in place; this thread hashes the buffers in order, so the bytes are
    hashed from memory as they arrive instead of read back from disk. A file holds at most `connections + 2`
    buffers, and all files of the process together BUFFERS (the memory bound, whatever --workers is): a
    connection that is ahead waits for a free one. Pieces already done by this
    or a dead process (the `.ranges` record) are not fetched again, only read back for the hash. On a hash
    mismatch the partial is deleted and TransferError raised: wrong bytes are never kept. The caller holds
    the blob's lease, so no one else writes `partial` meanwhile. `root` is the trusted folder `partial` lives
    below (the hub cache, a data_dir): no link another user planted below it is written through (safefs).
    """
    label = label or url
    folder = safefs.opendir(root or partial.parent, partial.parent)
    record = partial.name + RANGES_SUFFIX
    pieces = _Pieces(folder, record, size)
    if folder.exists(partial.name):
        pieces.load()
    resumed = frozenset(pieces.done)
    out = _PartialFile(folder, partial.name, size)
    finished = False
    owned = [0]  # buffers this file holds of the process-wide budget
    try:
        todo = deque(i for i in range(pieces.count) if i not in resumed)
        kept = sum(b - a for a, b in map(pieces.bounds, resumed))
        on_bytes(kept)
        cond = threading.Condition()
        failed: list[BaseException] = []
        ready: dict[int, memoryview] = {}  # fetched and written, waiting for the hasher
        free: list[memoryview] = []
        source = [url]  # where the pieces are fetched from (the CDN, after the first redirect)

        def take() -> tuple[int, memoryview] | None:
            """A buffer first, then the next piece: the piece the hasher waits for always has a buffer, so
            every file holding buffers moves on and, at its end, gives them back to the others."""
            with cond:
                while not failed and todo:
                    if free:
                        return todo.popleft(), free.pop()
                    if owned[0] < connections + 2 and _BUFFERS.acquire(blocking=False):
                        owned[0] += 1
                        return todo.popleft(), _piece_buffer()
                    # wait for our hasher to free one; while we hold none, also look at the budget again
                    cond.wait(timeout=None if owned[0] else 0.05)
                return None

        def worker() -> None:
            try:
                while (job := take()) is not None:
                    i, buf = job
                    start, end = pieces.bounds(i)
                    view = buf[: end - start]
                    _fetch_piece(http, source, url, view, start, size, on_bytes, label, lambda: bool(failed))
                    out.write(view, start)
                    with cond:
                        ready[i] = buf
                        pieces.add(i)
                        cond.notify_all()
            except BaseException as e:  # noqa: BLE001 - handed to the caller below
                with cond:
                    failed.append(e)
                    cond.notify_all()

        fresh = pieces.count - len(resumed)
        threads = [threading.Thread(target=worker, name=f"range-{n}", daemon=True)
                   for n in range(min(connections, fresh))]
        for t in threads:
            t.start()
        try:
            digest = _hash_in_order(out.fd, pieces, resumed, new_hasher(sha256, size), cond, ready, free, failed)
        except BaseException as e:
            with cond:
                failed.append(e)
                cond.notify_all()
            raise
        finally:
            for t in threads:
                t.join()
        if failed:
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
            _BUFFERS.release()
        out.close()
        if not finished:
            pieces.save()  # stopped early: what is on disk is what the next run continues from


def _hash_in_order(fd: int, pieces: _Pieces, resumed: frozenset[int], hasher, cond: threading.Condition,
                   ready: dict[int, memoryview], free: list[memoryview], failed: list) -> str | None:
    """Hash pieces in order as they arrive, from their buffers; pieces from an earlier run are read back."""
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
            while i not in ready and not failed:
                cond.wait()
            if failed:
                return None
            buf = ready.pop(i)
        hasher.update(buf[: end - start])
        with cond:
            free.append(buf)
            cond.notify_all()
    return hasher.hexdigest()


_EXPIRED = (401, 403, 404, 410)  # what a CDN says to a signed URL past its expiry


def _fetch_piece(http: Http, source: list[str], url: str, view: memoryview, start: int, size: int,
                 on_bytes: Callable[[int], None], label: str, stop: Callable[[], bool]) -> None:
    """Bytes [start, start + len(view)) of the file into `view`; a dropped connection continues where it broke.

    `source[0]` is where the bytes last came from: after the first piece's redirect, the others go to the
    CDN directly instead of asking the Hub to redirect each of them (back to `url` if that link expired).
    The body is read with `readinto` straight into the piece's buffer when the connection allows it: a new
    bytes object per chunk costs about a CPU second per GiB (bench/README.md)."""
    attempts = _Attempts(http.retry, f"download {label}")
    end = start + len(view)
    filled = 0
    while start + filled < end:
        pos = start + filled
        whole = pos == 0 and end == size
        headers = {} if whole else {"Range": f"bytes={pos}-{end - 1}"}
        target = source[0]
        resp = http.request("GET", target, headers=headers, what=f"download {label}")
        dropped: BaseException | None = None
        try:
            if resp.status in _EXPIRED and target != url:
                source[0] = url
                continue
            if resp.status not in ((200, 206) if whole else (206,)):
                raise TransferError(f"download {label}: server answered {resp.status} to a range request")
            source[0] = resp.url or target
            while filled < len(view):
                if stop():
                    raise _Stopped()
                try:
                    n = resp.readinto(view[filled: filled + CHUNK])
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
            attempts.wait(f"connection dropped at byte {start + filled} ({type(dropped).__name__})")
        elif filled < len(view):
            attempts.wait(f"connection closed at byte {start + filled} of {size}")
