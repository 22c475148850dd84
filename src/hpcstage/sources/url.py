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
import stat
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import unquote, urlsplit

from hpcstage import __version__, safefs
from hpcstage.errors import HashMismatch, TransferError
from hpcstage.hfcache import digest_file
from hpcstage.layout import DATA_STATE, LEASE_SUFFIX, LEASE_TTL, PARTIAL_SUFFIX, ranges_record
from hpcstage.locks import Lease
from hpcstage.transfer import CHUNK, DROPPED, MAX_CONNECTIONS, Http, RetryPolicy, fetch


def client(
    *, workers: int = 4, timeout: float = 30.0, retry: RetryPolicy | None = None, max_connections: int = MAX_CONNECTIONS
) -> Http:
    """An HTTP client for arbitrary URLs: our user agent, no token."""
    return Http(
        {"user-agent": f"hpcstage/{__version__}"},
        pool_size=workers + max_connections,
        read_timeout=timeout,
        retry=retry,
        max_connections=max_connections,
    )


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


def unchanged(http: Http, url: str, fingerprint: str) -> bool:
    """`pull --update` of a staged URL: one conditional HEAD (If-None-Match with the recorded ETag, else
    If-Modified-Since with the recorded Last-Modified). True when the server answers 304, or 200 with the
    same validator and size; no content byte is requested either way. False when there is nothing to
    compare (no validator was recorded) or the source changed."""
    validator, _, size = fingerprint.rpartition("|")
    if not validator:
        return False
    cond = {"If-None-Match": validator} if validator.startswith('"') else {"If-Modified-Since": validator}
    resp = http.request("HEAD", url, headers=cond, what=f"HEAD {url}")
    resp.drain_conn()
    resp.release_conn()
    if resp.status == 304:
        return True
    if resp.status != 200:
        return False
    now = (resp.headers.get("ETag") or resp.headers.get("Last-Modified") or "").strip()
    length = resp.headers.get("Content-Length")
    return now == validator and (length or "None") == size


def _status_error(url: str, status: int) -> TransferError:
    hint = {
        404: "check the url",
        401: "the server wants credentials, which hpcstage never sends to URLs",
        403: "access denied; check the url",
    }.get(status, "try again later or check the url")
    return TransferError(f"{url}: the server answered {status}; {hint}")


@dataclass
class Download:
    path: Path  # the complete file
    sha256: str
    size: int
    fingerprint: str
    fetched: int  # bytes downloaded by this call


def downloads_dir(data_dir: Path) -> Path:
    return Path(data_dir) / DATA_STATE / "downloads"


def download_lease(data_dir: Path, url: str) -> Path:
    """The lease whoever downloads `url` holds: one per URL, whatever version of it is fetched."""
    return downloads_dir(data_dir) / f"{_key(url)}{LEASE_SUFFIX}"


def partials_of(data_dir: Path, url: str) -> list[Path]:
    """The partial files of `url` under way (one per version of the source)."""
    return sorted(downloads_dir(data_dir).glob(f"{_key(url)}-*{PARTIAL_SUFFIX}"))


def partial_guard(partial: Path) -> Path:
    """The lease that guards the download partial `partial` (`<key>-<version>.hpcstage-partial`)."""
    return partial.with_name(f"{partial.name.removesuffix(PARTIAL_SUFFIX).split('-')[0]}{LEASE_SUFFIX}")


def _key(url: str) -> str:
    return hashlib.sha256(url.encode()).hexdigest()[:32]


def download(
    http: Http,
    url: str,
    data_dir: Path,
    *,
    sha256: str | None,
    on_bytes: Callable[[int], None],
    before_fetch: Callable[[Probe], None] = lambda p: None,
) -> Download:
    """Fetch `url` into the downloads folder; returns the complete, hash-checked file. `sha256`, when
    known (manifest or lockfile), is checked; wrong bytes are deleted. `before_fetch` sees the probe
    (the caller's space check) before any content byte is requested."""
    p = probe(http, url)
    data_dir = Path(data_dir)
    folder = downloads_dir(data_dir)
    d = safefs.opendir(data_dir, folder)  # no link another user planted below data_dir is followed
    key = _key(url)
    version = hashlib.sha256(p.fingerprint.encode()).hexdigest()[:16]
    final = folder / f"{key}-{version}--{file_name(url)}"
    partial = folder / f"{key}-{version}{PARTIAL_SUFFIX}"
    lease = Lease(download_lease(data_dir, url), ttl=LEASE_TTL, root=data_dir)
    lease.acquire()
    try:
        for old in os.listdir(d.fd):  # another version of this URL: the source changed, drop it
            if old.startswith(f"{key}-") and not old.startswith(f"{key}-{version}"):
                d.unlink(old)
        st = _regular(d, final.name)
        if st is not None and (p.size is None or st.st_size == p.size):
            digest = digest_file(d.proc_path / final.name)
            if sha256 is None or digest == sha256:
                return Download(final, digest, st.st_size, p.fingerprint, 0)
            d.unlink(final.name)
        before_fetch(p)

        def counted(n: int) -> None:
            if lease.lost:
                raise TransferError(f"{url}: lost the download lease to another process; run pull again")
            on_bytes(n)

        digests: list[str] = []
        if p.ranges and p.size:
            fetched = fetch(
                http,
                url,
                partial,
                size=p.size,
                expected=sha256,
                algorithm="sha256",
                on_bytes=counted,
                label=url,
                on_digest=digests.append,
                root=data_dir,
            )
        else:
            fetched = _stream(http, url, d, partial.name, counted, digests)
            if sha256 is not None and digests[0] != sha256:
                d.unlink(partial.name)
                raise HashMismatch(f"download {url}: content hash mismatch (wrong bytes discarded)")
        lease.check()
        d.replace(partial.name, final.name)
        return Download(final, digests[0], d.lstat(final.name).st_size, p.fingerprint, fetched)
    finally:
        lease.release()


def _regular(d: safefs.Dir, name: str) -> os.stat_result | None:
    try:
        st = d.lstat(name)
    except FileNotFoundError:
        return None
    return st if stat.S_ISREG(st.st_mode) else None


def _stream(
    http: Http, url: str, d: safefs.Dir, partial: str, on_bytes: Callable[[int], None], digests: list[str]
) -> int:
    """No size or no ranges: one GET from the start (nothing to resume), hashed on the way."""
    d.unlink(ranges_record(partial))
    resp = http.request("GET", url, what=f"download {url}")
    try:
        if resp.status != 200:
            raise _status_error(url, resp.status)
        h = hashlib.sha256()
        n = 0
        with open(d.open_transient(partial, os.O_WRONLY | os.O_TRUNC), "wb") as f:
            while chunk := resp.read(CHUNK):
                f.write(chunk)
                h.update(chunk)
                n += len(chunk)
                on_bytes(len(chunk))
    except DROPPED as e:
        raise TransferError(
            f"download {url}: connection dropped ({type(e).__name__}); the server offers no "
            "byte ranges, so run pull again to start over"
        ) from None
    finally:
        resp.release_conn()
    digests.append(h.hexdigest())
    return n
