"""HTTP for every download: pooled keep-alive connections, proxies and the site's CA bundle, one retry
policy with a time budget, and pacing under the server's rate limits (`Http`).

Why not huggingface_hub's downloader (FACTS.md): its repo-info and tree calls have no timeout (a stalled
server hangs forever), and its content GET does not retry a 503. Here every request has connect and read
timeouts and one retry policy with a time budget.

Why one module of about 650 lines: every part acts on each request of the one client, in one loop
(`Http.request`, `_send`): the proxy decides the connection, TLS wraps it, the pacer holds the request back
under the rate limit, redirects decide where Authorization goes, the retry policy repeats it. Apart, each
part would reach into `Http`'s pool of idle connections and its `Response`.
"""

from __future__ import annotations

import base64
import email.utils
import http.client
import logging
import math
import os
import random
import socket
import ssl
import threading
import time
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from urllib.parse import unquote, urljoin, urlsplit

from hpcstage.errors import BadInput, HpcstageError, ProxyError, TransferError
from hpcstage.transfer.concurrency import BUFFERS, MAX_CONNECTIONS, Streams

RETRY_STATUSES = frozenset({408, 429, 500, 502, 503, 504})
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
class Attempts:
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

    def __init__(self) -> None:
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
        attempts = Attempts(self.retry, what or f"{method} {url}")
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
