"""Files from plain HTTP(S) URLs: probe, then download resumably into `data_dir/.hpcstage/downloads/`.

Same engine as Hub files (`transfer.fetch`: parallel Range pieces with a `.ranges` record, retries,
timeouts, redirects that never carry Authorization across origins), and the HF token is never sent at all:
the client here has no Authorization header. The partial is named by the URL *and* the server's validator
(ETag, else Last-Modified, plus the size), so a source that changed between runs discards the old
partial instead of splicing two versions; one process downloads a URL at a time (a lease per URL).
"""
from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable
from urllib.parse import unquote, urlsplit

from hpcstage import __version__
from hpcstage.errors import HashMismatch, TransferError
from hpcstage.hfcache import LEASE_SUFFIX, PARTIAL_SUFFIX, digest_file
from hpcstage.locks import Lease
from hpcstage.transfer import CHUNK, CONNECTIONS, DROPPED, RANGES_SUFFIX, Http, RetryPolicy, fetch

LEASE_TTL = 60.0


def client(*, workers: int = 4, timeout: float = 30.0, retry: RetryPolicy | None = None) -> Http:
    """An HTTP client for arbitrary URLs: our user agent, no token."""
    return Http({"user-agent": f"hpcstage/{__version__}"}, pool_size=workers * CONNECTIONS + 2, read_timeout=timeout,
                retry=retry)


@dataclass(frozen=True)
class Probe:
    url: str
    size: int | None  # None: the server did not say (chunked)
    ranges: bool  # byte ranges supported: resumable in pieces
    validator: str  # ETag, else Last-Modified; "" when the server sends neither

    @property
    def fingerprint(self) -> str:
        return f"{self.validator}|{self.size}"


def file_name(url: str) -> str:
    """The last path segment of the URL (its file name), or "download"."""
    name = unquote(urlsplit(url).path.rsplit("/", 1)[-1]).replace("/", "_").replace("\\", "_")  # %2F stays one name
    return name if name and name not in (".", "..") and "\x00" not in name else "download"


def probe(http: Http, url: str) -> Probe:
    """HEAD (redirects followed, Authorization dropped across origins); servers that refuse HEAD get a
    one-byte ranged GET instead."""
    resp = http.request("HEAD", url, what=f"HEAD {url}")
    resp.drain_conn()
    resp.release_conn()
    headers, status = resp.headers, resp.status
    size: int | None = None
    if status == 200:
        length = headers.get("Content-Length")
        size = int(length) if length and length.isdigit() else None
        ranges = headers.get("Accept-Ranges", "").lower() == "bytes"
    elif status in (403, 405, 501):
        resp = http.request("GET", url, headers={"Range": "bytes=0-0"}, what=f"GET {url}")
        resp.drain_conn()
        resp.release_conn()
        headers, status = resp.headers, resp.status
        ranges = status == 206
        total = headers.get("Content-Range", "").rsplit("/", 1)[-1]
        size = int(total) if ranges and total.isdigit() else None
        if status not in (200, 206):
            raise _status_error(url, status)
    else:
        raise _status_error(url, status)
    validator = (headers.get("ETag") or headers.get("Last-Modified") or "").strip()
    if validator.startswith("W/"):  # a weak ETag says nothing about bytes
        validator = headers.get("Last-Modified", "") or ""
    return Probe(url, size, ranges and size is not None, validator)


def _status_error(url: str, status: int) -> TransferError:
    hint = {404: "check the url", 401: "the server wants credentials, which hpcstage never sends to URLs",
            403: "access denied; check the url"}.get(status, "try again later or check the url")
    return TransferError(f"{url}: the server answered {status}; {hint}")


@dataclass
class Download:
    path: Path  # the complete file
    sha256: str
    size: int
    fingerprint: str
    fetched: int  # bytes downloaded by this call


def downloads_dir(data_dir: Path) -> Path:
    return Path(data_dir) / ".hpcstage" / "downloads"


def _key(url: str) -> str:
    return hashlib.sha256(url.encode()).hexdigest()[:32]


def download(http: Http, url: str, data_dir: Path, *, sha256: str | None, on_bytes: Callable[[int], None],
             before_fetch: Callable[[Probe], None] = lambda p: None) -> Download:
    """Fetch `url` into the downloads folder; returns the complete, hash-checked file. `sha256`, when
    known (manifest or lockfile), is checked; wrong bytes are deleted. `before_fetch` sees the probe
    (the caller's space check) before any content byte is requested."""
    p = probe(http, url)
    folder = downloads_dir(data_dir)
    folder.mkdir(parents=True, exist_ok=True)
    key = _key(url)
    version = hashlib.sha256(p.fingerprint.encode()).hexdigest()[:16]
    final = folder / f"{key}-{version}--{file_name(url)}"
    partial = folder / f"{key}-{version}{PARTIAL_SUFFIX}"
    lease = Lease(folder / f"{key}{LEASE_SUFFIX}", ttl=LEASE_TTL)
    lease.acquire()
    try:
        for old in folder.glob(f"{key}-*"):  # another version of this URL: the source changed, drop it
            if not old.name.startswith(f"{key}-{version}"):
                old.unlink(missing_ok=True)
        if final.exists() and (p.size is None or final.stat().st_size == p.size):
            digest = digest_file(final)
            if sha256 is None or digest == sha256:
                return Download(final, digest, final.stat().st_size, p.fingerprint, 0)
            final.unlink()
        before_fetch(p)

        def counted(n: int) -> None:
            if lease.lost:
                raise TransferError(f"{url}: lost the download lease to another process; run pull again")
            on_bytes(n)

        digests: list[str] = []
        if p.ranges and p.size:
            fetched = fetch(http, url, partial, size=p.size, expected=sha256, sha256="sha256", on_bytes=counted,
                            label=url, on_digest=digests.append)
        else:
            fetched = _stream(http, url, partial, counted, digests)
            if sha256 is not None and digests[0] != sha256:
                partial.unlink(missing_ok=True)
                raise HashMismatch(f"download {url}: content hash mismatch (wrong bytes discarded)")
        lease.check()
        os.replace(partial, final)
        return Download(final, digests[0], final.stat().st_size, p.fingerprint, fetched)
    finally:
        lease.release()


def _stream(http: Http, url: str, partial: Path, on_bytes: Callable[[int], None], digests: list[str]) -> int:
    """No size or no ranges: one GET from the start (nothing to resume), hashed on the way."""
    partial.with_name(partial.name + RANGES_SUFFIX).unlink(missing_ok=True)
    resp = http.request("GET", url, what=f"download {url}")
    try:
        if resp.status != 200:
            raise _status_error(url, resp.status)
        h = hashlib.sha256()
        n = 0
        with open(partial, "wb") as f:
            while chunk := resp.read(CHUNK):
                f.write(chunk)
                h.update(chunk)
                n += len(chunk)
                on_bytes(len(chunk))
    except DROPPED as e:
        raise TransferError(f"download {url}: connection dropped ({type(e).__name__}); the server offers no "
                            "byte ranges, so run pull again to start over") from None
    finally:
        resp.release_conn()
    digests.append(h.hexdigest())
    return n


