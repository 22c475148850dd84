"""The download engine: pooled HTTP, retries with backoff, timeouts, ranged resume into partial files.

Why not huggingface_hub's downloader (FACTS.md): its repo-info and tree calls have no timeout (a stalled
server hangs forever), its content GET does not retry a 503, and across processes it restarts every file
from zero. Here every request has connect and read timeouts and one retry policy with a time budget, and
a partial file survives its process so the next one continues where it stopped.
"""

from __future__ import annotations

import base64
import email.utils
import errno
import http.client
import json
import logging
import math
import mmap
import os
import random
import socket
import ssl
import threading
import time
import urllib.request
from collections import deque
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import unquote, urljoin, urlsplit

from hpcstage import safefs
from hpcstage.errors import BadInput, HashMismatch, HpcstageError, ProxyError, TransferError
from hpcstage.hfcache import new_hasher
from hpcstage.layout import ranges_payload, ranges_record
from hpcstage.streams import Streams

RETRY_STATUSES = frozenset({408, 429, 500, 502, 503, 504})
CHUNK = 1 << 20  # one read from the socket
SMALL = 8 << 20  # files below this are fetched whole into memory: no partial, no lease
# Unit of parallel ranges, of in-order hashing from memory and of the resume record. 4 MiB: the buffer
# budget (BUFFERS) then holds 30 streams, and a piece at 40 MB/s still spends 3/4 of its time moving bytes
# behind a 30 ms request latency (bench/README.md).
PIECE = 4 << 20
MAX_CONNECTIONS = 32  # range requests at once for all large files of a client (--max-connections)
RECORD_EVERY = 0.25  # seconds between saves of the resume record while pieces arrive
DIRECT_ALIGN = 4096  # O_DIRECT alignment that every Linux filesystem accepts
BUFFERS = 32  # PIECE buffers for all large files of a process at once: 128 MiB (peak RSS <= 200 MB)
_BUFFERS = threading.BoundedSemaphore(BUFFERS)
logger = logging.getLogger(__name__)


@dataclass
class RetryPolicy:
    """Exponential backoff with jitter, honouring Retry-After, bounded by attempts and a time budget."""

    attempts: int = 6
    base: float = 1.0
    cap: float = 16.0
    # Seconds from the first try of one request. Rate-limit waits spend this time, not tries: the Hub's
    # windows are 5 minutes (FACTS.md), and the default waits one out more than once (2 x 301 s).
    budget: float = 900.0

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

    limited: int = 0  # 429s so far: they spend the time budget, never a try

    def wait(self, reason: str, retry_after: str | None = None, cause: BaseException | None = None) -> None:
        delay = self.policy.delay(self.n, retry_after)
        self.n += 1
        spent = time.monotonic() - self.started
        if self.n >= self.policy.attempts or spent + delay > self.policy.budget:
            raise TransferError(f"{self.what}: {reason} (gave up after {self.n} tries in {spent:.0f}s)") from cause
        time.sleep(delay)

    def rate_limited(self, delay: float | None) -> float:
        """A 429: the wait (the server's hint, else backoff that does not use up tries), or TransferError
        when it would end past the budget. The caller's next request waits in the origin's pacer."""
        if delay is None:
            delay = self.policy.delay(self.limited, None)
        self.limited += 1
        spent = time.monotonic() - self.started
        if spent + delay > self.policy.budget:
            raise TransferError(
                f"{self.what}: rate-limited by the server for {spent:.0f}s and told to wait "
                f"{delay:.0f}s more, past --retry-budget ({self.policy.budget:.0f}s); raise "
                "--retry-budget, or log in (`hf auth login`) for a larger Hub quota",
                status=429,
            )
        return delay


def _origin(url: str) -> tuple[str, str, int | None]:
    parts = urlsplit(url)
    return parts.scheme, parts.hostname or "", parts.port


# What a read from a live connection raises when the peer goes away or stalls (not disk errors: ENOSPC
# and EDQUOT are plain OSErrors and must reach the caller's disk-full handling).
DROPPED = (ConnectionError, TimeoutError, http.client.HTTPException)


# -- proxies and TLS --------------------------------------------------------------------------------


@dataclass(frozen=True)
class Proxy:
    """An http proxy from the environment. `name` is what messages show: never the credentials."""

    host: str
    port: int
    auth: str | None  # the Proxy-Authorization value, from user:password in the proxy URL
    variable: str  # which variable named it (HTTPS_PROXY, ...)

    @property
    def name(self) -> str:
        return f"http://{self.host}:{self.port}"

    @property
    def headers(self) -> dict[str, str]:
        return {"Proxy-Authorization": self.auth} if self.auth else {}


def _parse_proxy(value: str, variable: str) -> Proxy:
    """`http://[user:password@]host[:port]` (a bare `host:port` is http too, as curl reads it)."""
    parts = urlsplit(value if "://" in value else f"http://{value}")
    try:
        port = parts.port or 80
    except ValueError:
        port = -1
    if parts.scheme != "http" or not parts.hostname or port < 0:
        shown = f"{parts.scheme}://{parts.hostname or ''}" + (f":{parts.port}" if port > 0 and parts.port else "")
        raise BadInput(
            f"{variable}={shown}...: hpcstage speaks to proxies over plain http "
            "(http://host:port, CONNECT for https); fix or unset it"
        )
    auth = None
    if parts.username is not None:
        pair = f"{unquote(parts.username)}:{unquote(parts.password or '')}"
        auth = "Basic " + base64.b64encode(pair.encode()).decode()
    return Proxy(parts.hostname, port, auth, variable)


class Proxies:
    """The proxy for each origin, read from the environment now (not at import) with the standard library's
    rules (`urllib.request.getproxies`/`proxy_bypass`: those of requests; huggingface_hub's httpx with
    `trust_env` reads the same variables):
    `https_proxy`/`HTTPS_PROXY` for https, `http_proxy`/`HTTP_PROXY` for http, `all_proxy`/`ALL_PROXY`
    for both, `no_proxy`/`NO_PROXY` (host names, domain suffixes, IPs, host:port, `*`) to go direct.
    Written here because http.client has no proxy support beyond a bare `set_tunnel`."""

    def __init__(self):
        self._env = urllib.request.getproxies_environment()
        self._cache: dict[tuple, Proxy | None] = {}

    def variable(self, scheme: str) -> str | None:
        """The variable the proxy for `scheme` comes from (for messages)."""
        for key in (scheme, "all"):
            if self._env.get(key):
                for name in (f"{key}_proxy", f"{key.upper()}_PROXY"):
                    if os.environ.get(name) == self._env[key]:
                        return name
                return f"{key.upper()}_PROXY"
        return None

    def for_origin(self, scheme: str, host: str, port: int | None) -> Proxy | None:
        key = (scheme, host, port)
        if key not in self._cache:
            self._cache[key] = self._lookup(scheme, host, port)
        return self._cache[key]

    def for_url(self, url: str) -> Proxy | None:
        return self.for_origin(*_origin(url))

    def _lookup(self, scheme: str, host: str, port: int | None) -> Proxy | None:
        value = self._env.get(scheme) or self._env.get("all")
        if not value:
            return None
        where = f"{host}:{port}" if port else host
        if urllib.request.proxy_bypass_environment(where, self._env):  # type: ignore[attr-defined]  # stdlib, untyped
            return None
        return _parse_proxy(value, self.variable(scheme) or "proxy")


CA_BUNDLE_VARIABLES = ("REQUESTS_CA_BUNDLE", "CURL_CA_BUNDLE")


def tls_context() -> ssl.SSLContext:
    """The system store (where SSL_CERT_FILE/SSL_CERT_DIR apply), plus the site bundle many sites name in
    REQUESTS_CA_BUNDLE or CURL_CA_BUNDLE (read by requests and curl, not by the ssl module)."""
    ctx = ssl.create_default_context()
    for name in CA_BUNDLE_VARIABLES:
        path = os.environ.get(name)
        if not path:
            continue
        try:
            if os.path.isdir(path):
                ctx.load_verify_locations(capath=path)
            else:
                ctx.load_verify_locations(cafile=path)
        except (OSError, ssl.SSLError) as e:
            raise BadInput(
                f"{name}={path} is not a readable CA bundle ({getattr(e, 'strerror', None) or e}); "
                f"point it at your site's CA file, or unset it"
            ) from None
    return ctx


class _HTTPConnection(http.client.HTTPConnection):
    """Connect timeout for the connect, read timeout for everything after it. Through a proxy (`proxy`
    set) the connection goes to the proxy and requests carry the absolute URL."""

    read_timeout: float = 30.0
    proxy: Proxy | None = None

    def connect(self) -> None:
        super().connect()  # also sets TCP_NODELAY
        self.sock.settimeout(self.read_timeout)


class _HTTPSConnection(http.client.HTTPSConnection):
    read_timeout: float = 30.0
    proxy: Proxy | None = None  # https through an http proxy: a CONNECT tunnel, then TLS inside it
    tls: ssl.SSLContext

    def connect(self) -> None:
        if self.proxy is None:
            super().connect()
        else:
            self._tunnel_through(self.proxy)
        self.sock.settimeout(self.read_timeout)

    def _tunnel_through(self, proxy: Proxy) -> None:
        """CONNECT host:port through the proxy, then TLS with the target's name. By hand rather than with
        `set_tunnel`, so that the proxy's refusal comes back as a status (ProxyError), not as message text."""
        sock = socket.create_connection((proxy.host, proxy.port), self.timeout)
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            target = f"{self.host}:{self.port or 443}"
            head = [f"CONNECT {target} HTTP/1.1", f"Host: {target}"] + [f"{k}: {v}" for k, v in proxy.headers.items()]
            sock.sendall(("\r\n".join(head) + "\r\n\r\n").encode("latin-1"))
            answer = http.client.HTTPResponse(sock, method="CONNECT")
            answer.begin()
            if answer.status != 200:
                answer.close()
                hint = {
                    407: "put user:password in the proxy URL (http://user:password@host:port)",
                    403: "ask the site whether this host is allowed through the proxy",
                }.get(answer.status, "")
                raise ProxyError(
                    f"proxy {proxy.name} ({proxy.variable}) refused CONNECT to {target}: "
                    f"{answer.status} {answer.reason.strip().lower()}" + (f"; {hint}" if hint else ""),
                    status=answer.status,
                    hint=hint or None,
                )
            sock.settimeout(self.read_timeout)
            self.sock = self.tls.wrap_socket(sock, server_hostname=self.host)
        except BaseException:
            sock.close()
            raise


_Conn = _HTTPConnection | _HTTPSConnection  # a pooled connection: either carries proxy and read_timeout


def open_connection(url: str, timeout: float) -> None:
    """Open (and close) a connection to `url`'s origin the way requests go: through its proxy (the CONNECT
    tunnel and TLS for https). Raises what a request would meet (ProxyError, OSError, ssl errors)."""
    http = Http({}, connect_timeout=timeout, read_timeout=timeout)
    conn = http._connection(_origin(url))
    try:
        conn.connect()
    finally:
        conn.close()


class Response:
    """One answer. `release_conn()` hands the connection back for the next request when the body was read
    to its end, and closes it otherwise (a half-read body cannot be skipped for free)."""

    def __init__(self, http: Http, key: tuple, conn: _Conn, raw: http.client.HTTPResponse, url: str):
        self._http, self._key, self._raw = http, key, raw
        self._conn: _Conn | None = conn
        self.status, self.headers, self.url = raw.status, raw.headers, url
        self.sent_auth = False  # whether Authorization went with the request that got this answer

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


# -- rate limits ------------------------------------------------------------------------------------


def _resource(path: str) -> str:
    """Which of the Hub's quotas a request spends: resolver requests (`/resolve/`, `/api/resolve-cache/`)
    have their own, smaller than the API's (FACTS.md)."""
    return "resolvers" if "/resolve" in path else "api"


class _PastDeadline(Exception):
    """A rate-limit wait that would outlast the request's retry budget (`seconds`: the wait)."""

    def __init__(self, seconds: float):
        super().__init__(seconds)
        self.seconds = seconds


class _Pacer:
    """Requests to one origin and quota, spaced so that a pull flows under the server's rate limit.

    The server says, on its answers, `RateLimit: "resolvers";r=R;t=T` (R left in this fixed window, which
    ends in T whole seconds: between T and T+1) and `RateLimit-Policy: "fixed window";...;q=Q;w=W`. This
    keeps an estimate of what is left (counted down as requests go out, never above what the server last
    said) and of when the window ends (the earliest T+1 seen); when nothing is left, requests wait for the
    window's end. A 429 pauses every request to the origin until its wait is over. After a wait, one request
    goes first (a probe) and the others follow once its answer says how much the new window holds: a
    server whose T is too short (`t=0` while the window runs on) then costs one 429 per guess, not a burst.
    `share` is this process's part of the quota (array workers share one address, so one quota).
    huggingface_hub has no pacing (it only waits after a 429), hence by hand."""

    PROBE_TIMEOUT = 5.0  # a probe unanswered this long (its connection failed) lets another one go

    def __init__(self, origin: str, share: float, announce: Callable[[str | None], None]):
        self.origin, self.share, self._announce = origin, share, announce
        self._cond = threading.Condition()
        self.remaining: float | None = None  # None: no limit known
        self.ends = 0.0  # monotonic time by which the current window has surely ended
        self.paused_until = 0.0
        self.probe: float | None = None  # when the probe went out; None: not probing
        self.quota: int | None = None
        self.window: int | None = None
        self._said = 0.0  # the resume time last announced

    def _mine(self, remaining: int) -> int:
        return math.ceil(remaining * self.share)

    def before(self, deadline: float = math.inf) -> None:
        """Wait, if need be, until a request may go out; count it. `_PastDeadline` when the wait would end
        after `deadline` (monotonic: the request's retry budget)."""
        with self._cond:
            while True:
                now = time.monotonic()
                if self.remaining is None:
                    return
                if now >= max(self.ends, self.paused_until) and self.probe is None and self.remaining < 1:
                    self.remaining, self.probe = 1, 0.0  # the window is over: one request asks how it looks
                if now < self.paused_until:
                    until = self.paused_until
                elif self.remaining >= 1:
                    self.remaining -= 1
                    if self.probe is not None:
                        self.probe = now
                    if self._said:
                        self._said = 0.0
                        self._announce(None)
                    return
                elif self.probe is not None:  # the probe is out: its answer tells the others
                    if now - self.probe > self.PROBE_TIMEOUT:
                        self.remaining = 1
                        continue
                    self._cond.wait(0.25)
                    continue
                else:
                    until = self.ends
                if until > deadline:
                    raise _PastDeadline(until - now)
                if until > self._said + 0.5 and until - now >= 0.5:
                    self._said = until
                    line = self.line(until - now)
                    logger.warning("%s", line)
                    self._announce(line)
                self._cond.wait(until - now)

    def line(self, seconds: float) -> str:
        quota = f" (quota {self.quota} per {self.window} s)" if self.quota and self.window else ""
        return f"rate-limited by the Hub: resuming in {math.ceil(seconds)} s{quota}"

    def observe(self, info, status: int, limited_for: float | None) -> None:
        """An answer: its RateLimit headers (`info`: huggingface_hub's RateLimitInfo, or None), its status,
        and for a 429 how long to wait."""
        now = time.monotonic()
        with self._cond:
            if info is not None and info.limit and info.window_seconds:
                self.quota, self.window = info.limit, info.window_seconds
            if status == 429:
                self.remaining, self.probe = 0, None
                self.paused_until = max(self.paused_until, now + (limited_for or 1.0))
                self.ends = max(self.ends, self.paused_until)
            elif info is not None:
                earliest, latest = now + info.reset_in_seconds, now + info.reset_in_seconds + 1
                mine = self._mine(info.remaining)
                if self.remaining is None or self.probe is not None or earliest > self.ends:  # a new window
                    self.remaining, self.ends = mine, latest
                else:
                    self.remaining, self.ends = min(self.remaining, mine), min(self.ends, latest)
                self.probe = None
            elif self.probe is not None:  # the probe passed, the server said nothing: assume a fresh window
                self.remaining = self._mine(self.quota) - 1 if self.quota else None
                self.ends = now + (self.window or 1)
                self.probe = None
            self._cond.notify_all()


def _ratelimit_info(headers):
    """The IETF draft headers the Hub sends (`RateLimit`, `RateLimit-Policy`), parsed by huggingface_hub."""
    if "RateLimit" not in headers:  # case-insensitive; the common case costs no import and no parse
        return None
    from huggingface_hub.utils import parse_ratelimit_headers

    return parse_ratelimit_headers(headers)


def ratelimit_wait(headers) -> float | None:
    """A 429's wait: the larger of `Retry-After` and the window's reset plus 1 s (`t=0` means the window
    closes within this second, not "retry now"); None when the server gave neither."""
    waits = []
    retry_after = parse_retry_after(headers.get("Retry-After"))
    if retry_after is not None:
        waits.append(retry_after)
    info = _ratelimit_info(headers)
    if info is not None and info.remaining == 0:
        waits.append(info.reset_in_seconds + 1.0)
    return max(waits) if waits else None


class Http:
    """One client per run: keep-alive connections per origin over the standard library's http.client.
    Redirects are followed here so that Authorization is never sent to another origin (LFS files redirect
    to a CDN). Proxies from the environment (`Proxies`), the site's CA bundle (`tls_context`), and the
    server's rate limits (`_Pacer`) apply to every request.

    Why not urllib3's pool (used before): per small request it cost ~3x the CPU of a bare http.client
    exchange (its pool queue, retry and header objects), and 2,000 small files spent most of their time
    there (bench/README.md). What is kept of a pool here is a list of idle connections per origin.

    `errors(resp, url)`, when given, turns an error answer into a typed error (the Hub's X-Error-Code);
    `on_wait(line)` hears "rate-limited ..." while requests wait (None when they go on). `streams` decides
    how many range requests its large files run at once (at most `max_connections`)."""

    def __init__(
        self,
        headers: dict[str, str],
        *,
        auth_origin: str | None = None,
        pool_size: int = 8,
        connect_timeout: float = 10.0,
        read_timeout: float = 30.0,
        retry: RetryPolicy | None = None,
        errors: Callable[[Response, str], HpcstageError | None] | None = None,
        share: float = 1.0,
        max_connections: int = MAX_CONNECTIONS,
    ):
        self.headers = headers
        self.streams = Streams(max_connections, BUFFERS)
        self.auth_origin = _origin(auth_origin) if auth_origin else None
        self.retry = retry or RetryPolicy()
        self.pool_size = pool_size
        self.connect_timeout, self.read_timeout = connect_timeout, read_timeout
        self.errors = errors
        self.share = share
        self.on_wait: Callable[[str | None], None] = lambda line: None
        self.on_response: Callable[[Response, str], None] | None = None  # hears each final answer (and its URL)
        self.proxies = Proxies()
        self._idle: dict[tuple, list[_Conn]] = {}
        self._lock = threading.Lock()
        self._tls: ssl.SSLContext | None = None
        self._pacers: dict[tuple, _Pacer] = {}

    def _connection(self, key: tuple) -> _Conn:
        scheme, host, port = key
        proxy = self.proxies.for_origin(scheme, host, port)
        if scheme == "https":
            if self._tls is None:
                self._tls = tls_context()
            tls = _HTTPSConnection(host, port, timeout=self.connect_timeout, context=self._tls)
            tls.tls = self._tls
            conn: _Conn = tls
        elif scheme == "http":
            to_host, to_port = (proxy.host, proxy.port) if proxy else (host, port)
            conn = _HTTPConnection(to_host, to_port, timeout=self.connect_timeout)
        else:
            raise TransferError(f"unsupported URL scheme {scheme!r} (only http and https)")
        conn.proxy = proxy
        conn.read_timeout = self.read_timeout
        return conn

    def _put(self, key: tuple, conn: _Conn) -> None:
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
            sent = headers
            if conn.proxy is not None and parts.scheme == "http":  # plain http through the proxy: absolute URL
                target, sent = url, {**headers, **conn.proxy.headers}
            try:
                conn.request(method, target, body=body, headers=sent)
                raw = conn.getresponse()
            except (OSError, http.client.HTTPException):
                conn.close()
                if reused:
                    continue
                raise
            return Response(self, key, conn, raw, url)

    def _pacer(self, key: tuple, path: str, create: bool = False) -> _Pacer | None:
        slot = (key, _resource(path))
        pacer = self._pacers.get(slot)
        if pacer is None and create:
            with self._lock:
                pacer = self._pacers.setdefault(
                    slot, _Pacer(f"{key[0]}://{key[1]}", self.share, lambda line: self.on_wait(line))
                )
        return pacer

    def _send(
        self, method: str, url: str, headers: dict[str, str], body: bytes | None, deadline: float = math.inf
    ) -> Response:
        """Follow redirects; Authorization goes only to `auth_origin` (else to the first URL's origin).
        The response's `url` is where it finally came from."""
        trusted = self.auth_origin or _origin(url)
        for _ in range(10):
            parts = urlsplit(url)  # once per hop: small files make this the hot path
            key = (parts.scheme, parts.hostname or "", parts.port)
            sent = dict(self.headers, **headers)
            if key != trusted:
                sent.pop("authorization", None)
                sent.pop("Authorization", None)
            pacer = self._pacer(key, parts.path) if self._pacers else None
            if pacer is not None:
                pacer.before(deadline)
            resp = self._exchange(method, url, parts, sent, body)
            resp.sent_auth = "authorization" in sent or "Authorization" in sent
            info = _ratelimit_info(resp.headers)
            if pacer is None and (info is not None or resp.status == 429):
                pacer = self._pacer(key, parts.path, create=True)
            if pacer is not None:
                pacer.observe(info, resp.status, ratelimit_wait(resp.headers) if resp.status == 429 else None)
            if resp.status in (301, 302, 303, 307, 308) and resp.headers.get("Location"):
                target = urljoin(url, resp.headers["Location"])
                scheme = urlsplit(target).scheme
                if parts.scheme == "https" and scheme != "https":
                    resp.release_conn()
                    raise TransferError(
                        f"{method} {parts.netloc}: refused a redirect from https to {scheme}; "
                        "the server must stay on https"
                    )
                url = target
                resp.drain_conn()
                resp.release_conn()
                continue
            return resp
        raise TransferError(f"{method} {url}: too many redirects")

    def request(
        self,
        method: str,
        url: str,
        *,
        headers: dict[str, str] | None = None,
        body: bytes | None = None,
        what: str = "",
        on_retry: Callable[[], None] = lambda: None,
    ) -> Response:
        """Send with retries on 408/429/5xx and connection errors (`on_retry` hears each). The caller reads
        (or releases) the body; error statuses other than those come back to the caller to map to a typed
        error (`status_error`). A 429 waits as the server says (`ratelimit_wait`) in the origin's pacer,
        spending the retry budget's time but no try."""
        attempts = _Attempts(self.retry, what or f"{method} {url}")
        while True:
            try:
                resp = self._send(method, url, headers or {}, body, attempts.started + self.retry.budget)
            except _PastDeadline as e:
                attempts.rate_limited(e.seconds)  # raises: the wait is past the budget
                continue
            except ssl.SSLCertVerificationError as e:
                raise TransferError(
                    f"{attempts.what}: the server's TLS certificate is not trusted "
                    f"({e.verify_message}); point SSL_CERT_FILE (or REQUESTS_CA_BUNDLE) at "
                    "your site's CA bundle"
                ) from e
            except ProxyError as e:
                if not e.rerun_helps and e.status in (403, 407):
                    raise
                attempts.wait(str(e), cause=e)
                continue
            except (OSError, http.client.HTTPException) as e:
                proxy = self.proxies.for_url(url)
                via = f" through proxy {proxy.name} ({proxy.variable})" if proxy else ""
                on_retry()
                attempts.wait(f"connection failed{via} ({type(e).__name__}: {_short(e)})", cause=e)
                continue
            if resp.status == 429:
                on_retry()
                delay = ratelimit_wait(resp.headers)
                resp.drain_conn()
                resp.release_conn()
                wait = attempts.rate_limited(delay)
                if delay is None:  # no hint: the pacer holds the next request 1 s; back off the rest here
                    time.sleep(max(0.0, wait - 1.0))
                continue
            if resp.status in RETRY_STATUSES:
                on_retry()
                retry_after = resp.headers.get("Retry-After")
                resp.drain_conn()
                resp.release_conn()
                attempts.wait(f"server answered {resp.status}", retry_after)
                continue
            if self.on_response is not None:
                self.on_response(resp, url)
            return resp

    def status_error(self, resp: Response, url: str, what: str) -> HpcstageError:
        """The typed error for an answer the caller cannot use (the body is released here)."""
        resp.drain_conn()
        resp.release_conn()
        error = self.errors(resp, url) if self.errors is not None else None
        return error or TransferError(f"{what}: server answered {resp.status}", status=resp.status)


def _short(e: Exception) -> str:
    text = str(e)
    return text if len(text) < 160 else text[:157] + "..."


def _hash_mismatch(label: str) -> HashMismatch:
    return HashMismatch(f"download {label}: content hash mismatch (wrong bytes discarded)")


def fetch_small(http: Http, url: str, *, size: int, expected: str, sha256: str | None, label: str = "") -> bytes:
    """A small file in one request, checked in memory: no partial, no lease, nothing to resume."""
    label = label or url
    attempts = _Attempts(http.retry, f"download {label}")
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
                    if owned[0] < streams.share(me) + 2 and _BUFFERS.acquire(blocking=False):
                        owned[0] += 1
                        return todo.popleft(), _piece_buffer()
                    # wait for our hasher to free one; while we hold none, also look at the budget again
                    cond.wait(timeout=None if owned[0] else 0.05)
                running[0] -= 1
                while free and owned[0] > streams.share(me) + 2:  # fewer streams: spare buffers to the others
                    free.pop()
                    owned[0] -= 1
                    _BUFFERS.release()
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
                _BUFFERS.release()
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
                _BUFFERS.release()
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
            _BUFFERS.release()
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
    attempts = _Attempts(http.retry, f"download {label}")
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
    attempts = _Attempts(http.retry, f"download {label}")
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
