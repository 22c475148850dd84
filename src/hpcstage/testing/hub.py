"""A local Hugging Face Hub: serves repos from a folder over the Hub protocol, with fault injection.

Tests and benchmarks run the real clients (huggingface_hub, datasets, hpcstage itself) against it, so it
answers exactly what those clients read (see FACTS.md): repo info, paged trees, paths-info, `resolve` with
ETag/X-Repo-Commit headers, and a 302 to a second listener (the "CDN", another origin) for LFS files.

Layout served: ``ROOT/{models,datasets}/<org>/<name>/...`` is revision ``main``; a sibling folder
``<name>@<rev>/`` is revision ``<rev>`` (``%2F`` in the folder name for a ``/`` in the revision:
``<name>@refs%2Fpr%2F1``). Hashes and commit shas derive from content only, so they are stable across
restarts and machines.

Real-Hub behaviours (FACTS.md "The real Hub"), each switchable on a running server: regular files behind a
307 with a relative Location to ``/api/resolve-cache/...`` (`resolve_cache`); LFS files as signed URLs on
the second origin that expire and then answer 403 (`signed_ttl`); gated repos (`gate`: public listing,
401/403 ``GatedRepo`` on resolve), tokens (`tokens`: any other token gets 401 "Invalid credentials"),
disabled repos (`disabled`), renamed repos (`renamed`: 307 on API and resolve), the resolver rate limit
in fixed windows with ``RateLimit``/``RateLimit-Policy`` (`rate_limit`), a mirror that ignores Range
(`ignore_range`), and Xet-backed LFS files (`xet`: tree entries carry `xetHash`, computed with hf_xet so the
values are real, and resolve answers `X-Xet-Hash`; `listed_xet` lists another value, e.g. a wrong or masked one).
Off by default: huggingface_hub switches to the Xet protocol, which this server does not speak, when a
listing carries `xetHash` (clients then need HF_HUB_DISABLE_XET=1, as helpers.client_env sets).
Uploads (`create_repo`, `upload_folder`) write into the served folder: hpcstage/testing/uploads.py.
A real link's per-connection rate (a CDN's cap, one TCP stream over a long path) is `conn_rate`;
`peak_connections` says how many connections each listener held open at once (on the CDN, a ranged
download's stream count).

Why one module of about 1,150 lines: one request handler answers every read route of the protocol, and each real-Hub
behaviour and fault above must act inside the route it changes (a gate inside resolve, a rate limit
across resolve and the CDN); the write side is uploads.py, the shared answer shapes wire.py.
"""

from __future__ import annotations

import functools
import hashlib
import hmac
import json
import logging
import os
import re
import select
import signal
import socket
import ssl
import stat
import struct
import sys
import threading
import time
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass, field
from datetime import datetime, timezone
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, TextIO
from urllib.parse import parse_qs, quote, unquote, urlencode, urlsplit

from hpcstage.testing import uploads  # the write API (create_repo, upload_folder), in its own module
from hpcstage.testing.wire import (
    _KINDS,
    _NAME,
    INVALID_CREDENTIALS,
    _error_response,
    _FileSlice,
    _git_oid,
    _HubError,
    _json_response,
    _repo_path,
    _Response,
)

logger = logging.getLogger(__name__)

LFS_SUFFIXES = frozenset(
    ".safetensors .bin .parquet .arrow .pt .pth .h5 .msgpack .onnx .gz .tgz .zip .tar .zst .xz .bz2 "
    ".png .jpg .jpeg .npy .npz".split()
)
LFS_MIN_SIZE = 10 * 1024 * 1024  # without LFS rules in .gitattributes: LFS by suffix or size
RESCAN_AFTER = 1.0  # seconds a revision's listing is trusted before its folder is looked at again
RESCAN_SHARE = 20  # ... or this many times its last scan's duration, when that is longer (large repos)
CORRUPT_STRIDE = 4096  # a `corrupt` fault flips the body's first byte and every CORRUPT_STRIDE-th after it

_REVISION = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*(/[A-Za-z0-9][A-Za-z0-9._-]*)*")  # refs/pr/1 too
DISABLED = "Access to this resource is disabled."
_COMMIT = re.compile(r"[0-9a-f]{40}")


@dataclass(frozen=True)
class FileInfo:
    """One file of a served revision, as the Hub describes it."""

    path: str  # path inside the repo, '/'-separated
    size: int
    oid: str  # git blob sha1; for LFS files the sha1 of the LFS pointer, as on the Hub
    sha256: str | None  # set for LFS files only
    local: Path

    @property
    def etag(self) -> str:
        return self.sha256 or self.oid


@dataclass
class FaultRule:
    """Misbehaviour for the requests whose path matches `path` (a regex, searched, query excluded).

    `method` ('GET', 'HEAD', ...) and `server` ('hub' or 'cdn') narrow the match; `times` is how many
    matching requests it applies to (None: all). Effects, applied in this order: wait `delay` seconds;
    wait until the test sets `hold` (an event: the request is held until the test is ready for it to go
    on, without guessing how long that takes); `reset` the connection before any header; `stall` (never
    answer until the client leaves or the server stops); answer `status` (with `Retry-After:
    retry_after`); otherwise answer normally but send the body
    at `rate` bytes/s, with bytes flipped if `corrupt`, closing the connection after `drop_after` bytes.
    """

    path: str
    method: str | None = None
    server: str | None = None
    times: int | None = None
    status: int | None = None
    retry_after: int | str | None = None
    delay: float = 0.0
    stall: bool = False
    hold: threading.Event | None = field(default=None, compare=False)
    drop_after: int | None = None
    reset: bool = False
    rate: float | None = None
    corrupt: bool = False

    def matches(self, server: str, method: str, path: str) -> bool:
        return (
            (self.server is None or self.server == server)
            and (self.method is None or self.method.upper() == method)
            and re.search(self.path, path) is not None
        )

    @property
    def alters_body(self) -> bool:
        return self.drop_after is not None or bool(self.rate) or self.corrupt


@dataclass(frozen=True)
class RequestRecord:
    """One served request, for tests to assert what a client actually did."""

    server: str  # 'hub' or 'cdn'
    method: str
    path: str  # without the query string
    query: str
    range: str | None  # the Range header
    status: int | None  # None when no response was sent (reset, stall)
    bytes_sent: int  # body bytes actually written
    has_auth: bool  # an Authorization header was present
    time: float  # when the request arrived (time.time())
    duration: float  # seconds until the answer was sent or abandoned


class _Once:
    """Compute a value once per key (again once it is `max_age` seconds old), even when many threads ask
    for it at the same moment."""

    def __init__(self):
        self._lock = threading.Lock()
        self._values: dict = {}  # key -> (value, monotonic time computed)
        self._busy: dict = {}

    def get(self, key, compute: Callable, max_age: float | None = None):
        def fresh(hit: tuple[Any, float] | None) -> bool:
            return hit is not None and (max_age is None or time.monotonic() - hit[1] < max_age)

        with self._lock:
            hit = self._values.get(key)
            if hit is not None and fresh(hit):
                return hit[0]
            key_lock = self._busy.setdefault(key, threading.Lock())
        with key_lock:
            with self._lock:
                hit = self._values.get(key)
                if hit is not None and fresh(hit):
                    return hit[0]
            value = compute()
            with self._lock:
                self._values[key] = (value, time.monotonic())
                self._busy.pop(key, None)
            return value

    def clear(self) -> None:
        with self._lock:
            self._values.clear()


def _lfs_pointer(sha256: str, size: int) -> bytes:
    return f"version https://git-lfs.github.com/spec/v1\noid sha256:{sha256}\nsize {size}\n".encode()


def _digest(path: Path, lfs: bool) -> str:
    """sha256 for LFS files (streamed: they can be huge), git blob sha1 for the others (small)."""
    if not lfs:
        return _git_oid(path.read_bytes())
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):  # hashlib.file_digest is 3.11+; we support 3.10
            h.update(chunk)
    return h.hexdigest()


def _iso(ns: int) -> str:
    return datetime.fromtimestamp(ns / 1e9, timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.000Z")


class _Revision:
    """The files of one revision folder, with the tree entries the Hub would list for them."""

    def __init__(self, kind: str, repo_id: str, name: str, files: dict[str, FileInfo], mtime_ns: int):
        self.name = name
        self.files = dict(sorted(files.items()))
        listing = "".join(f"{p}\0{f.oid}\n" for p, f in self.files.items())
        self.commit = hashlib.sha1(f"{kind}\n{repo_id}\n{name}\n{listing}".encode()).hexdigest()
        self.last_modified = _iso(mtime_ns)
        beneath: dict[str, list[str]] = {}
        for path, f in self.files.items():
            parts = path.split("/")
            for i in range(1, len(parts)):
                beneath.setdefault("/".join(parts[:i]), []).append(f"{path}\0{f.oid}\n")
        self.dirs = {d: hashlib.sha1("".join(lines).encode()).hexdigest() for d, lines in sorted(beneath.items())}

    def entry(self, path: str, expand: bool = False, xet: Callable[[FileInfo], str] | None = None) -> dict | None:
        if path in self.files:
            f = self.files[path]
            entry = {"type": "file", "oid": f.oid, "size": f.size, "path": path}
            if f.sha256:
                entry["lfs"] = {"oid": f.sha256, "size": f.size, "pointerSize": len(_lfs_pointer(f.sha256, f.size))}
                if xet is not None:
                    entry["xetHash"] = xet(f)
        elif path in self.dirs:
            entry = {"type": "directory", "oid": self.dirs[path], "size": 0, "path": path}
        else:
            return None
        if expand:
            entry["lastCommit"] = {"id": self.commit, "title": f"Revision {self.name}", "date": self.last_modified}
        return entry

    def tree(
        self, folder: str, recursive: bool, expand: bool, xet: Callable[[FileInfo], str] | None = None
    ) -> list[dict]:
        if folder and folder not in self.dirs:
            raise _HubError(404, "EntryNotFound", f"{folder!r} is not a folder at revision {self.name}")
        prefix = f"{folder}/" if folder else ""
        paths = [p for p in (*self.dirs, *self.files) if p.startswith(prefix)]
        if not recursive:
            paths = [p for p in paths if "/" not in p[len(prefix) :]]
        return [e for p in sorted(paths) if (e := self.entry(p, expand, xet)) is not None]

    def info(self, repo_id: str, kind: str) -> dict:
        siblings = []
        for path, f in self.files.items():
            sibling = {"rfilename": path, "size": f.size, "blobId": f.oid}
            if f.sha256:
                sibling["lfs"] = {
                    "sha256": f.sha256,
                    "size": f.size,
                    "pointerSize": len(_lfs_pointer(f.sha256, f.size)),
                }
            siblings.append(sibling)
        info = {
            "id": repo_id,
            "author": repo_id.split("/")[0],
            "sha": self.commit,
            "private": False,
            "gated": False,
            "disabled": False,
            "downloads": 0,
            "likes": 0,
            "tags": [],
            "lastModified": self.last_modified,
            "createdAt": self.last_modified,
            "usedStorage": sum(f.size for f in self.files.values()),
            "siblings": siblings,
        }
        if kind == "models":
            info["modelId"] = repo_id
        return info


class _Repos:
    """Maps the served folder to repos and revisions; hashes each file once per (path, size, mtime)."""

    def __init__(self, root: Path):
        self.root = Path(root).resolve()
        self._hashes = _Once()
        self._revisions = _Once()
        self._lfs_lock = threading.Lock()
        self._lfs: dict[str, FileInfo] = {}
        self._folders: dict[tuple[str, str], tuple[int | None, dict[str, Path]]] = {}
        self._scan_seconds: dict[tuple, float] = {}  # what the last scan of each revision took
        self._last: dict[tuple, tuple] = {}  # revision key -> (what its last scan found, the _Revision built)

    def revision(self, kind: str, repo_id: str, revision: str) -> _Revision:
        folders = self._revision_folders(kind, repo_id)
        if revision in folders:
            return self._scan(kind, repo_id, revision, folders[revision])
        if _COMMIT.fullmatch(revision):
            for name, folder in folders.items():
                scanned = self._scan(kind, repo_id, name, folder)
                if scanned.commit == revision:
                    return scanned
        raise _HubError(404, "RevisionNotFound", f"Revision {revision!r} not found in {repo_id}")

    def lfs_file(self, sha256: str) -> FileInfo | None:
        with self._lfs_lock:
            return self._lfs.get(sha256)

    def xet_hash(self, f: FileInfo) -> str:
        """The file's Xet hash, computed once per content (hf_xet: the Hub's own algorithm)."""
        import hf_xet

        return self._hashes.get(("xet", f.sha256), lambda: hf_xet.hash_files([str(f.local)])[0].hash)

    def refresh(self) -> None:
        self._revisions.clear()
        self._folders.clear()
        self._last.clear()

    def _revision_folders(self, kind: str, repo_id: str) -> dict[str, Path]:
        """`name` is main, `name@rev` siblings are other revisions. Listed again only when the org folder
        changed (its mtime): listing it on every request was the emulator's largest cost per small file."""
        org, _, name = repo_id.partition("/")
        if not (_NAME.fullmatch(org) and _NAME.fullmatch(name)):
            raise _HubError(401, "RepoNotFound", f"Repository {repo_id!r} not found")
        main = self.root / kind / org / name
        try:
            version = main.parent.stat().st_mtime_ns
        except OSError:
            version = None
        cached = self._folders.get((kind, repo_id))
        if cached is not None and version is not None and cached[0] == version:
            return cached[1]
        if not main.is_dir():
            raise _HubError(401, "RepoNotFound", f"Repository {repo_id!r} not found")
        folders = {"main": main}
        for sibling in main.parent.iterdir():
            base, at, rev = sibling.name.partition("@")
            rev = unquote(rev)
            if at and base == name and _REVISION.fullmatch(rev) and sibling.is_dir():
                folders.setdefault(rev, sibling)
        self._folders[(kind, repo_id)] = (version, folders)
        return folders

    def _scan(self, kind: str, repo_id: str, name: str, folder: Path) -> _Revision:
        """The revision as the folder holds it now: looked at again (sizes and mtimes; unchanged files keep
        their hashes) at most every RESCAN_AFTER seconds, so files changed while the server runs are served
        as a new commit, as on the Hub after a push."""
        key = (kind, repo_id, name, folder)
        # A large repo's scan costs (~0.15 s per 10,000 files): trusted for RESCAN_SHARE times that, so that
        # rescanning never takes more than ~5% of the server's time (at 20,000 files, rescanning every second
        # was all it did and a pull crawled).
        return self._revisions.get(
            key, lambda: self._read(*key), max_age=max(RESCAN_AFTER, RESCAN_SHARE * self._scan_seconds.get(key, 0.0))
        )

    def _read(self, kind: str, repo_id: str, name: str, folder: Path) -> _Revision:
        """Walk the folder (one lstat per plain file); when no file's size or mtime changed since the last
        walk, the last revision is returned as it was (building it again was most of a rescan's cost)."""
        started, key = time.monotonic(), (kind, repo_id, name, folder)
        found: list[tuple[str, str, int, int]] = []  # (path in the repo, real path, size, mtime_ns)
        real_folder = os.path.realpath(folder)
        inside = Path(real_folder).is_relative_to(self.root)
        for dirpath, dirnames, filenames in os.walk(folder):
            dirnames[:] = [d for d in dirnames if d != ".git"]
            rel_dir = os.path.relpath(dirpath, folder).replace(os.sep, "/")
            for filename in filenames:
                rel = filename if rel_dir == "." else f"{rel_dir}/{filename}"
                try:
                    st = os.lstat(os.path.join(dirpath, filename))
                except OSError:
                    continue
                if stat.S_ISREG(st.st_mode) and inside:  # a plain file in a folder inside ROOT: no resolve
                    real = f"{real_folder}/{rel}"
                else:  # symlinks are served only when they stay inside ROOT
                    resolved = Path(dirpath, filename).resolve()
                    if not resolved.is_relative_to(self.root) or not resolved.is_file():
                        continue
                    st, real = resolved.stat(), str(resolved)
                found.append((rel, real, st.st_size, st.st_mtime_ns))
        lfs_rules = _lfs_rules(folder / ".gitattributes")
        last = self._last.get(key)
        if last is not None and last[0] == (lfs_rules, found):
            self._scan_seconds[key] = time.monotonic() - started
            return last[1]
        files: dict[str, FileInfo] = {}
        for rel, real, size, mtime in found:
            if lfs_rules:  # as the Hub: what .gitattributes sends to LFS is LFS
                lfs = _is_lfs(rel, lfs_rules)
            else:
                lfs = os.path.splitext(real)[1].lower() in LFS_SUFFIXES or size >= LFS_MIN_SIZE
            digest = self._hashes.get((real, size, mtime, lfs), functools.partial(_digest, Path(real), lfs))
            oid = _git_oid(_lfs_pointer(digest, size)) if lfs else digest
            files[rel] = FileInfo(rel, size, oid, digest if lfs else None, Path(real))
        with self._lfs_lock:
            self._lfs.update({f.sha256: f for f in files.values() if f.sha256})
        revision = _Revision(kind, repo_id, name, files, max((m for *_, m in found), default=0))
        self._last[key] = ((lfs_rules, found), revision)
        self._scan_seconds[key] = time.monotonic() - started
        return revision


def _lfs_rules(path: Path) -> list[tuple[str, bool]]:
    """(pattern, is LFS) for each `.gitattributes` line that sets or unsets `filter` (`filter=lfs`,
    `-filter`, `!filter`); empty when the file is missing or names no LFS pattern."""
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return []
    rules = []
    for line in text.splitlines():
        fields = line.split()
        if not fields or fields[0].startswith("#"):
            continue
        for attribute in fields[1:]:
            if attribute == "filter=lfs":
                rules.append((fields[0], True))
            elif attribute in ("-filter", "!filter") or attribute.startswith("filter="):
                rules.append((fields[0], False))
    return rules if any(lfs for _, lfs in rules) else []


def _is_lfs(path: str, rules: list[tuple[str, bool]]) -> bool:
    """git's rule: the last matching line wins; a pattern without '/' matches the name at any depth."""
    import fnmatch

    lfs = False
    for pattern, value in rules:
        if "/" in pattern.rstrip("/"):
            hit = fnmatch.fnmatchcase(path, pattern.lstrip("/").replace("**/", "*"))
        else:
            hit = fnmatch.fnmatchcase(path.rsplit("/", 1)[-1], pattern)
        if hit:
            lfs = value
    return lfs


def _target(path: str) -> tuple[str, str, bool] | None:
    """(kind, repo id, is a resolver request) for the hub's repo routes, else None."""
    segments = path.split("/")[1:]
    if segments[:2] == ["api", "resolve-cache"] and len(segments) >= 5 and segments[2] in _KINDS.values():
        return segments[2], f"{unquote(segments[3])}/{unquote(segments[4])}", True
    if segments[:1] == ["api"] and len(segments) >= 4 and segments[1] in _KINDS.values():
        return segments[1], f"{unquote(segments[2])}/{unquote(segments[3])}", False
    kind, rest = ("datasets", segments[1:]) if segments[:1] == ["datasets"] else ("models", segments)
    if len(rest) >= 5 and rest[2] == "resolve":
        return kind, f"{unquote(rest[0])}/{unquote(rest[1])}", True
    return None


def _parse_range(value: str | None, size: int) -> tuple[int, int] | None:
    """(first, last) byte of a single `bytes=` range, None to send the whole body; 416 past the end."""
    m = re.fullmatch(r"bytes=(\d*)-(\d*)", (value or "").strip())
    if not m or m.groups() == ("", ""):
        return None
    first, last = m.groups()
    if first:
        start, end = int(first), min(int(last), size - 1) if last else size - 1
        if last and int(last) < start:
            return None
    else:
        start, end = max(0, size - int(last)), size - 1
        if int(last) == 0:
            start = size
    if start >= size:
        raise _HubError(416, None, "Range not satisfiable", {"Content-Range": f"bytes */{size}"})
    return start, end


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    # Headers and body go out in separate writes; with Nagle on, each keep-alive response then waits for
    # the client's delayed ACK (~40 ms), capping a connection at ~25 small files/s.
    disable_nagle_algorithm = True
    # Buffered writes: the head and a small body leave in one send (flushed after each request), as from
    # a real server; unbuffered, every small file cost the client an extra segment to read.
    wbufsize = 64 * 1024
    server: _Listener

    def do_GET(self):
        self._handle("GET")

    def do_HEAD(self):
        self._handle("HEAD")

    def do_POST(self):
        self._handle("POST")

    def version_string(self) -> str:
        return "hpcstage-serve"

    def log_message(self, format, *args):  # the request log replaces stderr lines
        pass

    def _handle(self, method: str) -> None:
        owner, role = self.server.owner, self.server.role
        url = urlsplit(self.path)
        arrived, started = time.time(), time.monotonic()
        owner._arrived()
        self._status: int | None = None
        self._sent = 0
        try:
            length = int(self.headers.get("Content-Length") or 0)
            body = self.rfile.read(length) if length else b""
            fault = owner._take_fault(role, method, url.path)
            if fault and fault.delay:
                owner._stopping.wait(fault.delay)
            if fault and fault.hold:
                while not (fault.hold.wait(0.1) or owner._stopping.is_set()):
                    pass
            if fault and fault.reset:
                self._reset()
            elif fault and fault.stall:
                self._stall()
            elif fault and fault.status:
                retry = {"Retry-After": str(fault.retry_after)} if fault.retry_after is not None else {}
                self._send(method, _error_response(_HubError(fault.status, None, "Injected fault", retry)), fault)
            else:
                extra: dict[str, str] = {}
                try:
                    early = self._hub_rules(url.path, url.query, extra) if role == "hub" else None
                except _HubError as error:
                    early = _error_response(error)
                answer = early or self._answer(method, url.path, url.query, body)
                if extra:
                    answer = _Response(answer.status, {**answer.headers, **extra}, answer.body)
                self._send(method, answer, fault)
        except OSError:  # the client went away, or stop() cut the connection
            self.close_connection = True
        finally:
            owner._record(
                RequestRecord(
                    server=role,
                    method=method,
                    path=url.path,
                    query=url.query,
                    range=self.headers.get("Range"),
                    status=self._status,
                    bytes_sent=self._sent,
                    has_auth="Authorization" in self.headers,
                    time=arrived,
                    duration=time.monotonic() - started,
                )
            )

    def _hub_rules(self, path: str, query: str, extra: dict[str, str]) -> _Response | None:
        """The real Hub's answers before any content: rate limit (resolver requests), the token, renamed,
        disabled and gated repos. Adds the RateLimit headers to `extra`; an answer here replaces the route's."""
        owner = self.server.owner
        target = _target(path)
        if target is None:
            return None
        kind, repo_id, resolver = target
        if resolver and owner.rate_limit is not None:
            owner._count_resolver(extra)
        token = (self.headers.get("Authorization") or "").removeprefix("Bearer ").strip() or None
        if token is not None and owner.tokens is not None and token not in owner.tokens:
            raise _HubError(401, None, INVALID_CREDENTIALS)
        if repo_id in owner.renamed:
            org, name = repo_id.split("/")
            new_org, new_name = owner.renamed[repo_id].split("/")
            moved = (path + "/").replace(f"/{org}/{name}/", f"/{new_org}/{new_name}/", 1)[:-1]
            return _Response(307, {"Location": moved + (f"?{query}" if query else "")}, b"")
        if repo_id in owner.disabled:
            raise _HubError(403, None, DISABLED)
        if resolver and repo_id in owner.gated:
            noun = kind[:-1]
            if token is None:
                raise _HubError(
                    401,
                    "GatedRepo",
                    f"Access to {noun} {repo_id} is restricted. You must have access to "
                    "it and be authenticated to access it. Please log in.",
                )
            if token not in owner.gated[repo_id]:
                raise _HubError(
                    403,
                    "GatedRepo",
                    f"Access to {noun} {repo_id} is restricted and you are not in the "
                    f"authorized list. Visit {owner.url}/{repo_id} to ask for access.",
                )
        return None

    def _answer(self, method: str, path: str, query: str, body: bytes) -> _Response:
        try:
            return self._route(method, path, query, body)
        except _HubError as error:
            return _error_response(error)
        except Exception as error:  # a bug or an unreadable file: answer like a failing Hub would
            logger.exception("hpcstage serve: error answering %s %s", method, self.path)
            return _error_response(_HubError(500, None, f"Internal error: {error!r}"))

    # -- routing -------------------------------------------------------------------------------------

    def _route(self, method: str, path: str, query: str, body: bytes) -> _Response:
        segments = path.split("/")[1:]
        if self.server.role == "cdn":
            if method in ("GET", "HEAD") and len(segments) == 2 and segments[0] == "lfs":
                return self._cdn(segments[1], parse_qs(query))
        elif (
            segments[:2] == ["api", "resolve-cache"]
            and len(segments) >= 7
            and segments[2] in _KINDS.values()
            and method in ("GET", "HEAD")
        ):
            return self._resolve_cache(
                segments[2], f"{unquote(segments[3])}/{unquote(segments[4])}", unquote(segments[5]), segments[6:]
            )
        elif segments == ["api", "repos", "create"] and method == "POST":
            return uploads.create_repo(self.server.owner, self.headers, body)
        elif segments[:1] == ["api"] and len(segments) >= 4 and segments[1] in _KINDS.values():
            return self._api(
                method,
                segments[1],
                f"{unquote(segments[2])}/{unquote(segments[3])}",
                segments[4:],
                parse_qs(query, keep_blank_values=True),
                body,
            )
        elif method in ("GET", "HEAD"):
            kind, rest = ("datasets", segments[1:]) if segments[:1] == ["datasets"] else ("models", segments)
            if len(rest) >= 5 and rest[2] == "resolve":
                return self._resolve(kind, f"{unquote(rest[0])}/{unquote(rest[1])}", unquote(rest[3]), rest[4:])
        raise _HubError(404, None, f"Not found: {method} {path}")

    def _api(self, method: str, kind: str, repo_id: str, rest: list[str], query: dict, body: bytes) -> _Response:
        repos = self.server.owner._repos
        get = method in ("GET", "HEAD")
        gated = "manual" if repo_id in self.server.owner.gated else False
        if get and not rest:
            return _json_response(200, {**repos.revision(kind, repo_id, "main").info(repo_id, kind), "gated": gated})
        if get and len(rest) == 2 and rest[0] == "revision":
            info = repos.revision(kind, repo_id, unquote(rest[1])).info(repo_id, kind)
            return _json_response(200, {**info, "gated": gated})
        if get and len(rest) >= 2 and rest[0] == "tree":
            revision = repos.revision(kind, repo_id, unquote(rest[1]))
            return self._tree(revision, _repo_path(rest[2:]), query)
        if method == "POST" and len(rest) == 2 and rest[0] == "paths-info":
            revision = repos.revision(kind, repo_id, unquote(rest[1]))
            return self._paths_info(revision, body)
        if method == "POST" and len(rest) == 2 and rest[0] in ("preupload", "commit"):
            write = uploads.preupload if rest[0] == "preupload" else uploads.commit
            return write(self.server.owner, kind, repo_id, unquote(rest[1]), self.headers, body)
        raise _HubError(404, None, f"Not found: {method} {self.path}")

    def _tree(self, revision: _Revision, folder: str, query: dict) -> _Response:
        flag = lambda name: query.get(name, ["false"])[0].lower() in ("true", "1")  # noqa: E731
        entries = revision.tree(folder, flag("recursive"), flag("expand"), self.server.owner._xet_of())
        try:
            cursor = int(query.get("cursor", ["0"])[0])
        except ValueError:
            raise _HubError(400, None, "Invalid cursor") from None
        page_size = self.server.owner.page_size
        headers = {}
        if cursor + page_size < len(entries):
            next_query = urlencode({**query, "cursor": [str(cursor + page_size)]}, doseq=True)
            host = self.headers.get("Host") or self.server.owner.url.split("//")[1]
            headers["Link"] = f'<{self.server.scheme}://{host}{urlsplit(self.path).path}?{next_query}>; rel="next"'
        return _json_response(200, entries[cursor : cursor + page_size], headers)

    def _paths_info(self, revision: _Revision, body: bytes) -> _Response:
        if self.headers.get("Content-Type", "").startswith("application/json"):
            fields = json.loads(body or b"{}")
            paths, expand = fields.get("paths", []), bool(fields.get("expand", False))
            paths = [paths] if isinstance(paths, str) else paths
        else:
            fields = parse_qs(body.decode(), keep_blank_values=True)
            paths, expand = fields.get("paths", []), fields.get("expand", ["false"])[0].lower() in ("true", "1")
        entries = [revision.entry(p.strip("/"), expand, self.server.owner._xet_of()) for p in paths]
        return _json_response(200, [e for e in entries if e is not None])

    def _resolve(self, kind: str, repo_id: str, revision_name: str, path_segments: list[str]) -> _Response:
        owner = self.server.owner
        revision = owner._repos.revision(kind, repo_id, revision_name)
        path = _repo_path(path_segments)
        f = revision.files.get(path)
        headers = {"X-Repo-Commit": revision.commit}
        if f is None:
            raise _HubError(404, "EntryNotFound", f"{path!r} not found at revision {revision.name}", headers)
        headers.update({"ETag": f'"{f.etag}"', "Accept-Ranges": "bytes"})
        if f.sha256 is None:
            if not owner.resolve_cache:
                return self._file(f, headers)
            # The real Hub: a 307 with a relative Location to the resolve cache (another resolver request).
            location = (
                f"/api/resolve-cache/{kind}/{repo_id}/{revision.commit}/{quote(path)}?{urlencode({'etag': f.oid})}"
            )
            return _Response(307, {**headers, "Location": location}, b"")
        host = (self.headers.get("Host") or "127.0.0.1").rsplit(":", 1)[0]
        cdn = owner._listeners[1].scheme
        location = f"{cdn}://{host}:{owner.cdn_port}{owner.cdn_path(f.sha256, path.rsplit('/', 1)[-1])}"
        headers.update({"X-Linked-Etag": f'"{f.sha256}"', "X-Linked-Size": str(f.size), "Location": location})
        if (xet := owner._xet_of()) is not None:
            headers["X-Xet-Hash"] = xet(f)
        return _Response(302, headers, b"")

    def _resolve_cache(self, kind: str, repo_id: str, commit: str, path_segments: list[str]) -> _Response:
        revision = self.server.owner._repos.revision(kind, repo_id, commit)
        path = _repo_path(path_segments)
        f = revision.files.get(path)
        headers = {"X-Repo-Commit": revision.commit}
        if f is None:
            raise _HubError(404, "EntryNotFound", f"{path!r} not found at revision {revision.name}", headers)
        return self._file(f, {**headers, "ETag": f'"{f.etag}"', "Accept-Ranges": "bytes"})

    def _cdn(self, sha256: str, query: dict) -> _Response:
        owner = self.server.owner
        expires, signature = query.get("expires", [""])[0], query.get("signature", [""])[0]
        if not expires.isdigit() or not hmac.compare_digest(signature, owner._sign(sha256, expires)):
            raise _HubError(403, None, "Invalid signature")
        if time.time() > int(expires):
            raise _HubError(403, None, "Request has expired")  # signed URLs end; the client goes back to resolve
        f = owner._repos.lfs_file(sha256)
        if f is None:
            raise _HubError(404, None, "No such object")
        return self._file(f, {"ETag": f'"{f.sha256}"', "Accept-Ranges": "bytes"})

    def _file(self, f: FileInfo, headers: dict) -> _Response:
        headers["Content-Type"] = "application/octet-stream"
        if headers.get("ETag") and headers["ETag"] in (self.headers.get("If-None-Match") or ""):
            return _Response(304, headers, b"")  # a conditional request for what the client has
        if self.server.owner.ignore_range:  # a mirror or caching proxy that ignores Range: always the whole body
            return _Response(200, headers, _FileSlice(f.local, 0, f.size))
        span = _parse_range(self.headers.get("Range"), f.size)
        if span is None:
            return _Response(200, headers, _FileSlice(f.local, 0, f.size))
        start, end = span
        headers["Content-Range"] = f"bytes {start}-{end}/{f.size}"
        return _Response(206, headers, _FileSlice(f.local, start, end - start + 1))

    # -- sending -------------------------------------------------------------------------------------

    def _send(self, method: str, response: _Response, fault: FaultRule | None) -> None:
        body = response.body
        length = body.length if isinstance(body, _FileSlice) else len(body)
        self.send_response(response.status)
        for name, value in response.headers.items():
            self.send_header(name, value)
        self.send_header("Content-Length", str(length))
        self.end_headers()
        self._status = response.status
        if method == "HEAD" or not length:
            return
        if fault and fault.alters_body:
            self._send_altered(body, length, fault)
        elif self.server.owner.conn_rate:
            self._send_paced(body, length, self.server.owner.conn_rate)
        elif isinstance(body, bytes):
            self.wfile.write(body)
            self._sent = length
        elif length <= self.wbufsize:
            with open(body.path, "rb") as f:
                data = os.pread(f.fileno(), length, body.offset)
            self.wfile.write(data)
            self._sent = len(data)
            if len(data) < length:  # file shrank under us: the promised length cannot be met
                self.close_connection = True
        else:
            self._sendfile(body)

    def _sendfile(self, body: _FileSlice) -> None:
        """Kernel-side copy: the benchmark's 1 GiB file must go at disk/loopback speed."""
        self.wfile.flush()  # the head first
        with open(body.path, "rb") as f:  # os.sendfile on plain sockets, send() over TLS
            self._sent = self.connection.sendfile(f, body.offset, body.length)
        if self._sent < body.length:  # file shrank under us: the promised length cannot be met
            self.close_connection = True

    def _send_paced(self, body: bytes | _FileSlice, length: int, rate: float) -> None:
        """The body at `rate` bytes/s: slices of 1/50 s each, sent by the kernel (sendfile) for files."""
        self.wfile.flush()  # the head first
        step = max(16 * 1024, int(rate / 50))
        stopping, started = self.server.owner._stopping, time.monotonic()
        with open(body.path, "rb") if isinstance(body, _FileSlice) else nullcontext() as f:
            while self._sent < length and not stopping.is_set():
                n = min(step, length - self._sent)
                if isinstance(body, _FileSlice):
                    assert f is not None  # opened above for a file
                    sent = self.connection.sendfile(f, body.offset + self._sent, n)
                else:
                    self.connection.sendall(body[self._sent : self._sent + n])
                    sent = n
                if not sent:
                    break
                self._sent += sent
                stopping.wait(max(0.0, started + self._sent / rate - time.monotonic()))
        if self._sent < length:
            self.close_connection = True

    def _send_altered(self, body: bytes | _FileSlice, length: int, fault: FaultRule) -> None:
        limit = length if fault.drop_after is None else min(length, fault.drop_after)
        chunk = 64 * 1024 if not fault.rate else max(1, min(64 * 1024, int(fault.rate / 20)))
        stopping = self.server.owner._stopping
        started = time.monotonic()
        self.wfile.flush()  # the head first
        with open(body.path, "rb") if isinstance(body, _FileSlice) else nullcontext() as f:
            if f is not None and isinstance(body, _FileSlice):
                f.seek(body.offset)
            while self._sent < limit and not stopping.is_set():
                n = min(chunk, limit - self._sent)
                if isinstance(body, _FileSlice):
                    assert f is not None  # opened above for a file
                    data = bytearray(f.read(n))
                else:
                    data = bytearray(body[self._sent : self._sent + n])
                if not data:
                    break
                if fault.corrupt:
                    for i in range(-self._sent % CORRUPT_STRIDE, len(data), CORRUPT_STRIDE):
                        data[i] ^= 0xFF
                self.connection.sendall(data)
                self._sent += len(data)
                if fault.rate:
                    stopping.wait(max(0.0, started + self._sent / fault.rate - time.monotonic()))
        if self._sent < length:
            self.close_connection = True

    def _reset(self) -> None:
        """Abort the connection with a TCP RST before any byte of the answer."""
        self.close_connection = True
        self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        self.connection.close()

    def _stall(self) -> None:
        """Hold the request unanswered until the client disconnects or the server stops."""
        self.close_connection = True
        stopping = self.server.owner._stopping
        while not stopping.is_set():
            readable, _, _ = select.select([self.connection], [], [], 0.1)
            if readable and not self.connection.recv(1, socket.MSG_PEEK):
                return
            if readable:
                stopping.wait(0.1)


class _Listener(ThreadingHTTPServer):
    """One listening socket, a thread per connection; stop() can cut every connection and wait for it."""

    daemon_threads = True  # a handler stuck on a dead client never keeps the interpreter alive
    request_queue_size = 128

    def __init__(self, address: tuple[str, int], owner: HubServer, role: str, tls: ssl.SSLContext | None):
        self.owner, self.role = owner, role
        self._connections: dict[socket.socket, threading.Thread] = {}
        self._connections_lock = threading.Lock()
        self.peak = 0  # the most connections open at once
        super().__init__(address, _Handler)
        self.scheme = "https" if tls else "http"
        if tls:  # the handshake happens in accept(): fine for a test server
            self.socket = tls.wrap_socket(self.socket, server_side=True)

    def process_request(self, request, client_address):
        thread = threading.Thread(
            target=self.process_request_thread,
            args=(request, client_address),
            name=f"hpcstage-serve-{self.role}-conn",
            daemon=self.daemon_threads,
        )
        with self._connections_lock:
            self._connections[request] = thread
            self.peak = max(self.peak, len(self._connections))
        thread.start()

    def shutdown_request(self, request):
        with self._connections_lock:
            self._connections.pop(request, None)
        super().shutdown_request(request)

    def handle_error(self, request, client_address):
        if not isinstance(sys.exc_info()[1], OSError):  # clients and stop() closing sockets are routine
            super().handle_error(request, client_address)

    def close_connections(self, timeout: float) -> None:
        """Shut every open connection down, then wait (bounded) for their handlers to log and exit."""
        with self._connections_lock:
            connections = list(self._connections.items())
        for connection, _ in connections:
            try:
                connection.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        deadline = time.monotonic() + timeout
        for _, thread in connections:
            thread.join(max(0.0, deadline - time.monotonic()))


class HubServer:
    """The hub listener and its CDN listener (another port, hence another origin for LFS redirects)."""

    def __init__(
        self,
        root: Path | str,
        host: str = "127.0.0.1",
        port: int = 0,
        cdn_port: int = 0,
        page_size: int = 1000,
        log_file: Path | str | None = None,
        tls: dict[str, ssl.SSLContext] | None = None,
        resolve_cache: bool = True,
    ):
        """`tls`: a server-side SSLContext per listener ('hub', 'cdn') to serve over https (tests)."""
        self.root = Path(root)
        # Real-Hub behaviours (module docstring); attributes a test may change while the server runs.
        self.resolve_cache = resolve_cache  # regular files: 307 to /api/resolve-cache/...
        self.signed_ttl = 3600.0  # seconds a signed LFS URL stays valid
        self.gated: dict[str, set[str]] = {}  # gated repo id -> tokens granted access
        self.tokens: set[str] | None = None  # valid tokens; None: any token is accepted
        self.disabled: set[str] = set()
        self.renamed: dict[str, str] = {}  # old repo id -> new repo id
        self.rate_limit: tuple[int, int] | None = None  # (resolver requests, window in whole seconds)
        self.rate_limit_reset: int | None = None  # say this t on every answer instead of the real one
        self.rate_limit_on_success = True  # RateLimit headers on every resolver answer (the Hub's way), not only 429s
        self.ignore_range = False
        self.xet = False  # list `xetHash` / answer `X-Xet-Hash` for LFS files (module docstring)
        self.listed_xet: dict[str, str] = {}  # sha256 -> the xetHash to list instead of the real one (faults)
        self.conn_rate: float | None = None  # bytes/s each connection's answers are sent at; None: as fast as it goes
        self._secret = os.urandom(16)
        self._window = (0.0, -1, 0)  # (start, index, requests counted in it)
        self.rate_window_started = 0.0
        self._tls = tls or {}
        self.host, self.page_size = host, page_size
        self._ports = (port, cdn_port)
        self._log_path = Path(log_file) if log_file else None
        self._repos = _Repos(self.root)
        self._stopping = threading.Event()
        self._lock = threading.Lock()
        self._answered = threading.Condition(self._lock)
        self._in_flight = 0
        self._received = 0
        self._faults: list[list] = []  # [rule, remaining uses or None]
        self._log: list[RequestRecord] = []
        self._log_stream: TextIO | None = None
        self._listeners: list[_Listener] = []
        self._threads: list[threading.Thread] = []

    # -- lifecycle -----------------------------------------------------------------------------------

    def start(self) -> HubServer:
        if self._listeners:  # already running (e.g. `with HubServer(...).start()`)
            return self
        self._stopping.clear()
        if self._log_path:
            self._log_stream = open(self._log_path, "a", encoding="utf-8")
        self._listeners = [
            _Listener((self.host, p), self, role, self._tls.get(role))
            for p, role in zip(self._ports, ("hub", "cdn"), strict=True)
        ]
        for listener in self._listeners:
            thread = threading.Thread(
                target=listener.serve_forever,
                kwargs={"poll_interval": 0.05},
                name=f"hpcstage-serve-{listener.role}",
                daemon=True,
            )
            thread.start()
            self._threads.append(thread)
        return self

    def stop(self) -> None:
        """Stop promptly: stalled and throttled requests end, idle keep-alive connections are cut."""
        self._stopping.set()
        for listener in self._listeners:
            listener.shutdown()
            listener.close_connections(timeout=5)
            listener.server_close()
        for thread in self._threads:
            thread.join()
        self._listeners, self._threads = [], []
        if self._log_stream:
            self._log_stream.close()
            self._log_stream = None

    def __enter__(self) -> HubServer:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    @property
    def url(self) -> str:
        return self._url_of(self._listeners[0])

    @property
    def cdn_url(self) -> str:
        return self._url_of(self._listeners[1])

    @property
    def cdn_port(self) -> int:
        return self._listeners[1].server_address[1]

    def _url_of(self, listener: _Listener) -> str:
        host = "127.0.0.1" if self.host in ("", "0.0.0.0") else self.host
        return f"{listener.scheme}://{host}:{listener.server_address[1]}"

    # -- content -------------------------------------------------------------------------------------

    def commit_of(self, repo_type: str, repo_id: str, revision: str = "main") -> str:
        return self._revision(repo_type, repo_id, revision).commit

    def files_of(self, repo_type: str, repo_id: str, revision: str = "main") -> dict[str, FileInfo]:
        return dict(self._revision(repo_type, repo_id, revision).files)

    def refresh(self) -> None:
        """Re-read the folders on the next request (after a test changed a repo); unchanged files keep their hashes."""
        self._repos.refresh()

    def _revision(self, repo_type: str, repo_id: str, revision: str) -> _Revision:
        try:
            return self._repos.revision(_KINDS[repo_type], repo_id, revision)
        except _HubError as error:
            raise LookupError(str(error)) from None

    # -- real-Hub behaviours ----------------------------------------------------------------------------

    def gate(self, repo_id: str, granted: tuple[str, ...] = ()) -> None:
        """Make `repo_id` gated: listed publicly, its files refused unless the token is in `granted`."""
        self.gated[repo_id] = set(granted)
        self.tokens = (self.tokens or set()) | set(granted)

    def limit_resolvers(self, quota: int, window: int) -> None:
        """The Hub's resolver rate limit: `quota` requests per fixed window of `window` seconds, starting now."""
        with self._lock:
            self.rate_limit = (quota, window)
            self._window = (time.monotonic(), -1, 0)
            self.rate_window_started = time.time()  # the same moment on the request log's clock

    def _count_resolver(self, headers: dict[str, str]) -> None:
        """Count one resolver request in the current window; RateLimit headers into `headers`; 429 when over."""
        assert self.rate_limit is not None  # called only while a limit is set
        quota, window = self.rate_limit
        with self._lock:
            start, index, count = self._window
            now = time.monotonic()
            current = int((now - start) // window)
            count = count + 1 if current == index else 1
            self._window = (start, current, count)
        reset = int(start + (current + 1) * window - now)  # whole seconds, rounded down: 0 in the last second
        if self.rate_limit_reset is not None:  # a server that always says t=N, whatever is left of the window
            reset = self.rate_limit_reset
        said = {
            "RateLimit": f'"resolvers";r={max(0, quota - count)};t={reset}',
            "RateLimit-Policy": f'"fixed window";"resolvers";q={quota};w={int(window)}',
        }
        if count > quota:
            raise _HubError(429, None, "You have exceeded the rate limit for resolver requests", said)
        if self.rate_limit_on_success:
            headers.update(said)

    def _xet_of(self) -> Callable[[FileInfo], str] | None:
        """What an LFS file's `xetHash` is listed as; None while `xet` is off."""
        if not self.xet:
            return None
        return lambda f: self.listed_xet.get(f.sha256 or "") or self._repos.xet_hash(f)

    def cdn_path(self, sha256: str, filename: str = "") -> str:
        """A signed path on the CDN listener for an LFS object, valid for `signed_ttl` seconds from now."""
        expires = str(int(time.time() + self.signed_ttl))
        query = {"filename": filename} if filename else {}
        return f"/lfs/{sha256}?{urlencode({**query, 'expires': expires, 'signature': self._sign(sha256, expires)})}"

    def _sign(self, sha256: str, expires: str) -> str:
        return hmac.new(self._secret, f"{sha256}:{expires}".encode(), "sha256").hexdigest()

    # -- faults and log ------------------------------------------------------------------------------

    def add_fault(self, rule: FaultRule) -> None:
        with self._lock:
            self._faults.append([rule, rule.times])

    def clear_faults(self) -> None:
        with self._lock:
            self._faults.clear()

    def _take_fault(self, server: str, method: str, path: str) -> FaultRule | None:
        if not self._faults:  # the usual case, without taking the lock every request would
            return None
        with self._lock:
            for slot in self._faults:
                rule, remaining = slot
                if rule.matches(server, method, path):
                    if remaining is not None:
                        slot[1] -= 1
                        if slot[1] <= 0:
                            self._faults.remove(slot)
                    return rule
        return None

    @property
    def log(self) -> list[RequestRecord]:
        """Requests so far. Waits (at most 1 s) for requests being answered, so that a client which just got
        its answer finds it here: the server logs a request only after its last byte has gone out."""
        with self._answered:
            self._answered.wait_for(lambda: self._in_flight == 0, timeout=1.0)
            return list(self._log)

    @property
    def received(self) -> int:
        """Requests received so far, answered or not (tests wait on this instead of sleeping)."""
        with self._lock:
            return self._received

    @property
    def peak_connections(self) -> dict[str, int]:
        """Per listener ('hub', 'cdn'): the most connections open at once (keep-alive ones count while idle)."""
        return {listener.role: listener.peak for listener in self._listeners}

    def clear_log(self) -> None:
        with self._lock:
            self._log.clear()

    def _arrived(self) -> None:
        with self._lock:
            self._in_flight += 1
            self._received += 1

    def _record(self, record: RequestRecord) -> None:
        with self._answered:
            self._in_flight -= 1
            self._answered.notify_all()
            self._log.append(record)
            if self._log_stream:
                self._log_stream.write(json.dumps(vars(record)) + "\n")  # asdict() deep-copies: slow
                self._log_stream.flush()


def serve_forever(
    root: Path | str,
    host: str = "127.0.0.1",
    port: int = 0,
    log_file: Path | str | None = None,
    setup: Callable[[HubServer], None] | None = None,
) -> None:
    """Serve `root` until SIGINT/SIGTERM; print one line with the URL first (`hpcstage serve`). `setup`
    switches real-Hub behaviours on (gated repos, tokens, rate limit, ...) before the first request."""
    stop = threading.Event()
    previous = {sig: signal.signal(sig, lambda *_: stop.set()) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        with HubServer(root, host, port, log_file=log_file) as server:
            if setup is not None:
                setup(server)
            print(f"{server.url} serving {root} (LFS files from {server.cdn_url})", flush=True)
            while not stop.wait(0.5):
                pass
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
