"""The download engine: pooled HTTP, retries with backoff, timeouts, ranged resume into partial files.

Why not huggingface_hub's downloader (FACTS.md): its repo-info and tree calls have no timeout (a stalled
server hangs forever), its content GET does not retry a 503, and across processes it restarts every file
from zero. Here every request has connect and read timeouts and one retry policy with a time budget, and
a partial file survives its process so the next one continues where it stopped.
"""
from __future__ import annotations

import email.utils
import hashlib
import os
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable
from urllib.parse import urljoin, urlsplit

import urllib3
from urllib3.exceptions import HTTPError as Urllib3Error

from hpcstage.errors import TransferError

RETRY_STATUSES = frozenset({408, 429, 500, 502, 503, 504})
CHUNK = 1 << 20


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


class Http:
    """One pooled client per run. Redirects are followed here so that Authorization is never sent to
    another origin (LFS files redirect to a CDN)."""

    def __init__(
        self,
        headers: dict[str, str],
        *,
        pool_size: int = 8,
        connect_timeout: float = 10.0,
        read_timeout: float = 30.0,
        retry: RetryPolicy | None = None,
    ):
        self.headers = headers
        self.retry = retry or RetryPolicy()
        self.pool = urllib3.PoolManager(
            num_pools=8,
            maxsize=pool_size,
            retries=False,
            timeout=urllib3.Timeout(connect=connect_timeout, read=read_timeout),
        )

    def _send(self, method: str, url: str, headers: dict[str, str], body: bytes | None) -> urllib3.BaseHTTPResponse:
        origin = _origin(url)
        for _ in range(10):
            sent = dict(self.headers, **headers)
            if _origin(url) != origin:
                sent.pop("authorization", None)
                sent.pop("Authorization", None)
            resp = self.pool.request(
                method, url, headers=sent, body=body, preload_content=False, redirect=False, decode_content=False
            )
            if resp.status in (301, 302, 303, 307, 308) and resp.headers.get("Location"):
                url = urljoin(url, resp.headers["Location"])
                resp.drain_conn()
                resp.release_conn()
                continue
            return resp
        raise TransferError(f"{method} {url}: too many redirects")

    def request(
        self, method: str, url: str, *, headers: dict[str, str] | None = None, body: bytes | None = None, what: str = ""
    ) -> urllib3.BaseHTTPResponse:
        """Send with retries on 408/429/5xx and connection errors. The caller reads (or releases) the
        body; error statuses other than those come back to the caller to map to a typed error."""
        attempts = _Attempts(self.retry, what or f"{method} {url}")
        while True:
            try:
                resp = self._send(method, url, headers or {}, body)
            except Urllib3Error as e:
                attempts.wait(f"connection failed ({type(e).__name__}: {_short(e)})")
                continue
            if resp.status in RETRY_STATUSES:
                retry_after = resp.headers.get("Retry-After")
                resp.drain_conn()
                resp.release_conn()
                attempts.wait(f"server answered {resp.status}", retry_after)
                continue
            return resp


def _short(e: Exception) -> str:
    text = str(e)
    return text if len(text) < 160 else text[:157] + "..."


def new_hasher(sha256: str | None, size: int):
    """sha256 for LFS files; for regular files the git blob sha1 (`blob <size>\\0` + content)."""
    if sha256:
        return hashlib.sha256()
    h = hashlib.sha1()
    h.update(b"blob %d\0" % size)
    return h


def _hash_prefix(fd: int, length: int, hasher) -> None:
    buf = bytearray(8 * CHUNK)
    view = memoryview(buf)
    done = 0
    while done < length:
        n = os.preadv(fd, [view[: min(len(buf), length - done)]], done)
        if n <= 0:
            raise OSError("partial file shrank while resuming")
        hasher.update(view[:n])
        done += n


def fetch(
    http: Http,
    url: str,
    partial: Path,
    *,
    size: int,
    expected: str,
    sha256: str | None,
    on_bytes: Callable[[int], None] = lambda n: None,
    label: str = "",
) -> None:
    """Download `url` into `partial` until it holds `size` bytes hashing to `expected`.

    Resumes from bytes already in `partial` (left by this or a dead process), with Range requests after
    a dropped connection. On a hash mismatch the partial is deleted and TransferError raised: wrong bytes
    are never kept. The caller holds the blob's lease, so no one else writes `partial` meanwhile.
    """
    label = label or url
    hasher = new_hasher(sha256, size)
    partial.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(partial, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        offset = os.fstat(fd).st_size
        if offset > size:
            os.ftruncate(fd, 0)
            offset = 0
        if offset:
            _hash_prefix(fd, offset, hasher)
            on_bytes(offset)
        attempts = _Attempts(http.retry, f"download {label}")
        while offset < size:
            headers = {"Range": f"bytes={offset}-"} if offset else {}
            resp = http.request("GET", url, headers=headers, what=f"download {label}")
            try:
                if resp.status == 200 and offset:
                    # The server ignored Range: start over rather than mix two streams.
                    os.ftruncate(fd, 0)
                    offset = 0
                    hasher = new_hasher(sha256, size)
                elif resp.status not in (200, 206):
                    raise TransferError(f"download {label}: server answered {resp.status}")
                while offset < size:
                    chunk = resp.read(min(CHUNK, size - offset))
                    if not chunk:
                        break
                    os.pwrite(fd, chunk, offset)
                    hasher.update(chunk)
                    offset += len(chunk)
                    on_bytes(len(chunk))
            except Urllib3Error as e:
                attempts.wait(f"connection dropped at byte {offset} ({type(e).__name__})")
                continue
            finally:
                resp.release_conn()
            if offset < size:
                attempts.wait(f"connection closed at byte {offset} of {size}")
        if hasher.hexdigest() != expected:
            os.close(fd)
            fd = -1
            partial.unlink(missing_ok=True)
            raise TransferError(f"download {label}: content hash mismatch (wrong bytes discarded)")
    finally:
        if fd >= 0:
            os.close(fd)
