"""`pull`: turn manifest entries into a plan, execute it into the hub cache, record it in the lockfile.

Plan first, then move bytes: each entry becomes a commit and a list of files (from the lockfile when it
pins them, else from the Hub), and files already in the cache cost nothing. Each blob is written by one
process at a time under its lease; a blob another process is writing is put back in the queue while
workers take other files, then linked when its writer is done.
"""

from __future__ import annotations

import dataclasses
import errno
import hashlib
import logging
import math
import os
import queue
import shutil
import statistics
import threading
import time
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor, wait
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hpcstage import ledger, policy, safefs
from hpcstage.errors import (
    BadInput,
    HashMismatch,
    HpcstageError,
    HubError,
    InvalidToken,
    RepoNotFound,
    RepoRefused,
    RevisionNotFound,
    TransferError,
)
from hpcstage.hfcache import CachedFile, RepoCache, Sharing, default_cache_dir, share_cache
from hpcstage.layout import BATCH_LEASES, LEASE_SUFFIX, LEASE_TTL, PARTIAL_SUFFIX, TMP_SUFFIX, ranges_record
from hpcstage.locks import Lease, break_expired, read_lease
from hpcstage.manifest import HubEntry, Lockfile, Manifest, Update, entry_lock, load_lock, save_lock
from hpcstage.progress import Progress, ProgressCallback, human_bytes
from hpcstage.sources import hub
from hpcstage.transfer import MAX_CONNECTIONS, SMALL, Http, RetryPolicy, fetch, fetch_small
from hpcstage.xetstore import XetStore

BUSY_RETRY = 0.5  # seconds before a blob held by another process is looked at again
BATCH_FILES = 64  # small files leased together by array workers
SMALL_BATCH = 32  # at most this many small files per unit of a single pull (fewer thread hand-offs)
STOP_GRACE = 5.0  # seconds workers get to stop and release their leases after Ctrl-C/SIGTERM

logger = logging.getLogger(__name__)


@dataclass
class StagedRepo:
    repo_type: str
    repo_id: str
    revision: str
    commit: str
    snapshot: Path
    files: int
    bytes: int


@dataclass
class PullSummary:
    repos: list[StagedRepo] = field(default_factory=list)
    files: int = 0
    bytes: int = 0
    downloaded_files: int = 0
    downloaded_bytes: int = 0
    seconds: float = 0.0

    def as_dict(self) -> dict:
        return {
            "repos": [{**r.__dict__, "snapshot": str(r.snapshot)} for r in self.repos],
            "files": self.files,
            "bytes": self.bytes,
            "downloaded_files": self.downloaded_files,
            "downloaded_bytes": self.downloaded_bytes,
            "seconds": round(self.seconds, 3),
        }


@dataclass
class _RepoPlan:
    entry: HubEntry
    ref: hub.RepoRef
    cache: RepoCache
    commit: str
    files: list[CachedFile]  # the selected files
    all_files: list[CachedFile] | None  # full listing for trees/<commit>.json; None when already on disk

    def staged(self) -> StagedRepo:
        """This repo as a pull's summary reports it: its snapshot and what was selected."""
        return StagedRepo(
            self.entry.repo_type,
            self.entry.repo,
            self.entry.revision,
            self.commit,
            self.cache.snapshot(self.commit),
            len(self.files),
            sum(f.size for f in self.files),
        )


@dataclass(frozen=True)
class Options:
    """What a caller chooses for a pull. Frozen: a manifest's settings or a repair come in as a changed copy
    (`dataclasses.replace`), never written into the caller's object."""

    cache_dir: Path | None = None
    workers: int = 8
    max_connections: int = MAX_CONNECTIONS  # range requests at once for all large files (transfer.Streams)
    token: str | None = None
    timeout: float = 30.0
    retry: RetryPolicy = field(default_factory=RetryPolicy)
    quiet: bool = False
    allow: list[str] | None = None
    shared_group: str | None = None  # a group-shared cache: setgid folders, group-readable files
    manifest_path: Path | None = None  # entries come from this manifest: hints name its keys, not flags
    progress: ProgressCallback | None = None  # the library's callback (bytes, total bytes, files, total files)


class _Run:
    """One pull: the shared HTTP client, cache root, progress and counters."""

    def __init__(self, opts: Options, worker: bool = False, files: dict[str, list[str]] | None = None):
        self.opts = opts
        self.worker = worker  # a Slurm array worker: files come from the lockfile only, small ones leased in batches
        self.files = files or {}  # entry key -> files named on the command line (`pull ORG/NAME FILE...`)
        self.cache_dir = Path(opts.cache_dir) if opts.cache_dir else default_cache_dir()
        check_cache_dir(self.cache_dir)
        self._http: Http | None = None
        self.sharing = Sharing.for_group(opts.shared_group) if opts.shared_group else None  # checked before any request
        self.summary = PullSummary()
        self.cancel = threading.Event()  # set on Ctrl-C/SIGTERM: workers stop at their next chunk
        self.in_flight = InFlight(opts.workers)
        self.token: str | None = None
        self.progress: Progress | None = None
        # "type:repo" (or "*" for the token itself) -> the Hub's refusal: its remaining files are not asked for
        self.refused: dict[str, RepoRefused] = {}
        # "type:repo" -> set once the Hub has answered a first download of it: until then one request asks alone,
        # so that a repo the Hub refuses costs one refused request, not one per worker thread
        self._first_answer: dict[str, threading.Event] = {}
        self._first_lock = threading.Lock()
        self.store = XetStore(self.cache_dir, self.sharing)
        self._store_usable: bool | None = None  # decided when the first file with a xetHash comes along

    def store_for(self, f: CachedFile) -> XetStore | None:
        """The cache-wide Xet store, when `f` has a real xetHash and the store can be used here."""
        if f.xet_hash is None:
            return None
        if self._store_usable is None:
            why = self.store.usable()
            if why is not None:  # said once per pull; quietly when the user switched it off
                log = logger.info if why.startswith("HF_HUB_DISABLE_SHARED_BLOBS") else logger.warning
                log("the shared Xet blob store is not used (%s): files go to each repo's blobs/", why)
            self._store_usable = why is None
        return self.store if self._store_usable else None

    @contextmanager
    def _store_lease(self, f: CachedFile, held: Lease | None):
        """The lease on `f`'s store entry: the unit's own when it is that one, else taken here (waiting while
        another process adds the same content)."""
        assert f.xet_hash is not None  # a store file
        path = self.store.lease(f.xet_hash)
        if held is not None and held.path == path.absolute():
            yield held
            return
        lease = Lease(path, ttl=LEASE_TTL, root=self.cache_dir)
        while not lease.try_acquire():
            if self.cancel.wait(BUSY_RETRY):
                raise KeyboardInterrupt
        try:
            yield lease
        finally:
            lease.release()

    @property
    def http(self) -> Http:
        # Created on first use: a warm pull from the lockfile never opens a connection.
        if self._http is None:
            refuse_offline()
            origin = hub.endpoint()  # a malformed HF_ENDPOINT is bad input, before huggingface_hub parses it
            from huggingface_hub import get_token  # HF_TOKEN, else the token file; imported only when needed

            token = self.opts.token if self.opts.token is not None else get_token()
            self.token = token or None
            self._http = Http(
                hub.hub_headers(token),
                auth_origin=origin,
                pool_size=self.opts.workers + self.opts.max_connections,
                max_connections=self.opts.max_connections,
                read_timeout=self.opts.timeout,
                retry=self.opts.retry,
                errors=hub.error_for,
                share=_array_share() if self.worker else 1.0,
            )
            self._http.on_wait = self._on_wait
            self._http.on_response = self._heard
        return self._http

    def _heard(self, resp, url: str) -> None:
        """A final answer from the Hub: a refusal of the repo is recorded before anyone waiting on the
        repo's first answer goes on."""
        if all(event.is_set() for event in list(self._first_answer.values())) and resp.status < 400:
            return
        where = hub.parse_hub_url(url)
        if where is None or where[2] is None:  # not a download (the API at plan time)
            return
        repo = f"{where[0].repo_type}:{where[0].repo_id}"
        if resp.status >= 400:
            error = hub.error_for(resp, url)
            if isinstance(error, RepoRefused):
                self._refuse(repo, error)
        event = self._first_answer.get(repo)
        if event is not None:
            event.set()

    def _refuse(self, repo: str, error: RepoRefused) -> None:
        """The Hub refused `repo` ("type:repo") as a whole, or the token itself: its other files are not asked for."""
        self.refused.setdefault("*" if isinstance(error, InvalidToken) else repo, error)

    def _first_of(self, repo: str) -> threading.Event | None:
        """The event to set when this thread's request is the repo's first (None: the first answer is in)."""
        with self._first_lock:
            event = self._first_answer.get(repo)
            if event is None:
                event = self._first_answer[repo] = threading.Event()
                return event
        while not event.wait(0.25):
            if self.cancel.is_set():
                raise KeyboardInterrupt
        return None

    def _on_wait(self, line: str | None) -> None:
        """ "rate-limited by the Hub: resuming in N s ..." on the progress line (None: waiting is over)."""
        if self.progress is not None:
            self.progress.note(line)

    def plan(self, entry: HubEntry, locked) -> _RepoPlan:
        ref = hub.RepoRef(entry.repo_type, entry.repo)
        cache = RepoCache(self.cache_dir, entry.repo_type, entry.repo, sharing=self.sharing)
        if locked is not None and locked.matches(entry):
            files = locked.cached_files()
            all_files = (
                None if cache.tree_path(locked.commit).exists() else hub.list_files(self.http, ref, locked.commit)
            )
            return _RepoPlan(entry, ref, cache, locked.commit, files, all_files)
        if locked is not None and (locked.repo_type, locked.repo, locked.revision) == (
            entry.repo_type,
            entry.repo,
            entry.revision,
        ):
            commit = locked.commit  # patterns changed: keep the pinned commit, re-select
        elif policy.is_commit(entry.revision):
            commit = entry.revision
        else:
            commit, info = hub.resolve_info(self.http, ref, entry.revision)
            hub.warn_if_gated(ref, info, self.token)
        on_disk = cache.read_tree(commit)
        all_files = on_disk if on_disk is not None else hub.list_files(self.http, ref, commit)
        files = hub.select(all_files, entry.include, entry.exclude)
        named = self.files.get(entry.key)
        if named:  # `pull ORG/NAME FILE...`: each must be a file of the repo, as `hf download` insists
            have = {f.path for f in all_files}
            absent = [n for n in named if n not in have]
            if absent:
                raise HubError(
                    f"{entry.repo_type} {entry.repo}@{entry.revision} has no file "
                    f"{', '.join(repr(a) for a in absent)}; check the name (paths are relative to the "
                    "repo's root, e.g. data/train.parquet)"
                )
        return _RepoPlan(entry, ref, cache, commit, files, None if on_disk is not None else all_files)

    def execute(self, plans: list[_RepoPlan]) -> None:
        jobs = []  # (plan, file, is_duplicate): a blob wanted by two entries is fetched once
        seen: set[object] = set()  # blob paths, or ("xet", hash)
        for p in plans:
            for f in p.files:
                if p.cache.is_linked(p.commit, f):  # the link resolves to a blob of the right size
                    continue
                # one download per content: per blob, or per Xet hash across repos when the store is used
                blob = ("xet", f.xet_hash) if self.store_for(f) else p.cache.blob(f.etag)
                jobs.append((p, f, blob in seen))
                seen.add(blob)
        total = sum(f.size for p in plans for f in p.files)
        self.summary.files = sum(len(p.files) for p in plans)
        self.summary.bytes = total
        todo = [(p, f) for p, f, dup in jobs if not dup]
        self._check_space(todo)
        for p in plans:  # the listing first: `status` and `verify` of a failed run then know what is missing
            if p.all_files is not None:
                p.cache.write_tree(p.commit, p.all_files)
                p.all_files = None
        with Progress(
            total, self.summary.files, quiet=self.opts.quiet or not jobs, callback=self.opts.progress
        ) as progress:
            self.progress = progress
            progress.add(total - sum(f.size for _, f in todo))
            for _ in range(self.summary.files - len(jobs)):
                progress.file_done()
            self._run_jobs(self._units(plans, todo), progress)
            for p, f, dup in jobs:  # same blob wanted twice: link the second once the first is in place
                if dup:
                    if (store := self.store_for(f)) is not None and not p.cache.has_blob(f):
                        with self._store_lease(f, None):
                            store.link_into(p.cache, f)
                    p.cache.link(p.commit, f)
                    progress.file_done()
        for p in plans:
            if p.all_files is not None:
                p.cache.write_tree(p.commit, p.all_files)
            if not policy.is_commit(p.entry.revision):
                p.cache.write_ref(p.entry.revision, p.commit)
            self.summary.repos.append(p.staged())

    def _check_space(self, jobs: list[tuple[_RepoPlan, CachedFile]]) -> None:
        """Refuse early, with the numbers, when what is left to fetch cannot fit."""
        need = sum(f.size for p, f in jobs if not p.cache.has_blob(f))
        if not need:
            return
        self.cache_dir.mkdir(parents=True, exist_ok=True)
        free = shutil.disk_usage(self.cache_dir).free
        margin = (64 << 20) + need // 50  # room for trees, refs and what others write meanwhile
        if need + margin > free:
            raise TransferError(
                f"not enough space in {self.cache_dir}: need {human_bytes(need)} (+{human_bytes(margin)} margin), "
                f"{human_bytes(free)} free; free space or pass --cache-dir on a larger filesystem"
            )

    def _run_jobs(self, jobs: list[tuple[Path | None, list]], progress: Progress) -> None:
        """Run file jobs on `workers` threads. Every unit is queued at once (largest first) so workers never
        wait for this thread; completions come back through a queue, O(1) each. A unit leased elsewhere is
        queued again after BUSY_RETRY; a file that fails is reported at the end while the others go on. On
        Ctrl-C/SIGTERM workers stop at their next chunk, and after STOP_GRACE we stop waiting for any stuck
        in a read: their partials are recorded piece by piece and a dead local holder's lease is taken over
        at once by the next run."""
        finished: queue.SimpleQueue = queue.SimpleQueue()
        running: dict[Future, tuple] = {}
        later: deque = deque()  # (not before, job): units another process holds
        failures: list[tuple[str, HpcstageError]] = []
        pool = ThreadPoolExecutor(max_workers=self.opts.workers, thread_name_prefix="hpcstage")

        def start(job: tuple[Any, ...]) -> None:
            fut = pool.submit(self._stage_unit, job[0], job[1], progress)
            running[fut] = job
            fut.add_done_callback(finished.put)

        try:
            for job in jobs:
                start(job)
            while running or later:
                while later and later[0][0] <= time.monotonic():
                    start(later.popleft()[1])
                try:
                    fut = finished.get(timeout=BUSY_RETRY)
                except queue.Empty:
                    continue
                job = running.pop(fut)
                plan, f = job[1][0]
                try:
                    fetched = fut.result()
                except (TransferError, HubError) as e:
                    failures.append((f"{plan.entry.repo}/{f.path}", e))
                    continue
                except OSError as e:
                    if e.errno not in (errno.ENOSPC, errno.EDQUOT):
                        raise
                    raise TransferError(
                        f"{plan.entry.repo}/{f.path}: the disk or quota under {self.cache_dir} is full "
                        f"({e.strerror}); the partial file is kept: free space and run the same pull again "
                        "to continue"
                    ) from None
                if fetched is None:
                    later.append((time.monotonic() + BUSY_RETRY, job))
                    continue
                for (p_, f_), n in zip(job[1], fetched, strict=True):
                    if isinstance(n, HpcstageError):
                        failures.append((f"{p_.entry.repo}/{f_.path}", n))
                        continue
                    progress.file_done()
                    self.summary.downloaded_files += n > 0
                    self.summary.downloaded_bytes += n
        except BaseException:
            self.cancel.set()
            pool.shutdown(wait=False, cancel_futures=True)
            wait([f for f in running if not f.cancelled()], timeout=STOP_GRACE)
            raise
        pool.shutdown()
        if failures:
            raise _failed(failures, sum(len(j[1]) for j in jobs))

    def _units(
        self, plans: list[_RepoPlan], todo: list[tuple[_RepoPlan, CachedFile]]
    ) -> list[tuple[Path | None, list]]:
        """Work units, largest first: (lease or None, files). A large file is leased alone. Small files go
        unleased in batches of up to SMALL_BATCH, except for Slurm array workers: there they are leased in
        batches of BATCH_FILES, so that N workers fetch each file once without paying for a lease per file.
        Those batches are cut from the whole plan (the lockfile), not from what is missing now, so every
        worker names the same batches."""
        large = sorted((x for x in todo if x[1].size >= SMALL), key=lambda x: -x[1].size)
        units: list[tuple[Path | None, list]] = [
            (
                store.lease(f.xet_hash) if (store := self.store_for(f)) and f.xet_hash else p.cache.lease(f.etag),
                [(p, f)],
            )
            for p, f in large
        ]
        if not self.worker:
            small = [x for x in todo if x[1].size < SMALL]
            # Batches cut a future (and a wake-up of this thread) per file, yet stay small enough that
            # every worker gets several: the last ones to finish leave no long tail.
            n = max(1, min(SMALL_BATCH, len(small) // (4 * self.opts.workers)))
            return units + [(None, small[i : i + n]) for i in range(0, len(small), n)]
        wanted = {(id(p), f.path) for p, f in todo}
        small = [(p, f) for p in plans for f in sorted(p.files, key=lambda f: f.path) if f.size < SMALL]
        for i in range(0, len(small), BATCH_FILES):
            batch = small[i : i + BATCH_FILES]
            missing = [(p, f) for p, f in batch if (id(p), f.path) in wanted]
            if missing:
                name = hashlib.sha1("".join(f.etag for _, f in batch).encode()).hexdigest()
                units.append((self.cache_dir / BATCH_LEASES / f"{name}{LEASE_SUFFIX}", missing))
        return units

    def _stage_unit(self, lease_path: Path | None, items: list, progress: Progress) -> list[int | HpcstageError] | None:
        """Put a unit's files in place; returns the bytes each one downloaded (or why it failed: one file
        does not stop the others), or None when another process holds the unit's lease (the caller queues
        it again and moves on)."""
        lease = None
        if lease_path is not None:
            lease = Lease(lease_path, ttl=LEASE_TTL, root=self.cache_dir)
            if not lease.try_acquire():
                return None
        try:
            done: list[int | HpcstageError] = []
            # Units are either one large file or a batch of small ones; a batch runs under one slot.
            with self.in_flight.slot() if items[0][1].size < SMALL else nullcontext():
                for plan, f in items:
                    try:
                        done.append(self._stage_file(plan, f, progress, lease))
                    except (TransferError, HubError) as e:
                        done.append(e)
            return done
        finally:
            if lease is not None:
                lease.release()

    def _stage_file(self, plan: _RepoPlan, f: CachedFile, progress: Progress, lease: Lease | None) -> int:
        """One file into the blob store and the snapshot; returns the bytes it downloaded."""
        cache = plan.cache
        if cache.has_blob(f):  # already there, or its writer finished while we were queued
            cache.link(plan.commit, f)
            progress.add(f.size)
            return 0
        key = f"{plan.entry.repo_type}:{plan.entry.repo}"
        first = self._first_of(key)
        refused = self.refused.get(key) or self.refused.get("*")
        if refused is not None:  # the Hub refused this repo (or the token): asking again gets the same answer
            if first is not None:
                first.set()
            raise refused
        url = plan.ref.file_url(plan.commit, f.path)
        label = f"{plan.entry.repo}/{f.path}"
        try:
            store = self.store_for(f)
            if store is None:
                return self._fetch_file(plan, f, progress, lease, url, label)
            with self._store_lease(f, lease) as held:
                if store.link_into(cache, f):  # already in the store (another repo, revision, user or tool)
                    cache.link(plan.commit, f)
                    progress.add(f.size)
                    return 0
                return self._fetch_file(plan, f, progress, held, url, label, store)
        except RepoRefused as e:
            self._refuse(key, e)
            raise
        finally:
            if first is not None:  # also when the request never got an answer
                first.set()

    def _fetch_file(
        self,
        plan: _RepoPlan,
        f: CachedFile,
        progress: Progress,
        lease: Lease | None,
        url: str,
        label: str,
        store: XetStore | None = None,
    ) -> int:
        cache = plan.cache
        if f.size < SMALL:
            # Racing another process for a small blob costs a few kB twice at worst; a lease costs more.
            with self.in_flight.timed():
                data = fetch_small(
                    self.http,
                    url,
                    size=f.size,
                    expected=f.etag,
                    algorithm="sha256" if f.sha256 else "git",
                    label=label,
                )
                if store is None:
                    cache.write_blob(f.etag, data)
                else:  # checked against its xetHash from a file, then moved into the store
                    partial = cache.partial(f.etag)
                    cache.folder(partial.parent).write_atomic(partial.name, data)
                    if not store.publish(cache, partial.name, f):
                        cache.commit_blob(partial, f.etag)
                cache.link(plan.commit, f)
            progress.add(f.size)
            return f.size
        assert lease is not None, "large files are fetched under their blob's lease"

        def on_bytes(n: int) -> None:
            if lease.lost:
                raise TransferError(f"{label}: lost the lease on its blob to another process; run pull again")
            if self.cancel.is_set():
                raise KeyboardInterrupt
            progress.add(n)

        if cache.sharing is not None:  # another member of the group must be able to continue it
            cache.create_partial(f.etag)
        for attempt in (1, 2):  # wrong bytes are discarded and fetched once more
            try:
                fetched = fetch(
                    self.http,
                    url,
                    cache.partial(f.etag),
                    size=f.size,
                    expected=f.etag,
                    algorithm="sha256" if f.sha256 else "git",
                    on_bytes=on_bytes,
                    label=label,
                    root=self.cache_dir,
                )
                break
            except TransferError as e:
                if attempt == 2 or not isinstance(e, HashMismatch):
                    raise
                progress.add(-f.size)  # fetch reported the whole file before its hash failed
        lease.check()
        if store is None or not store.publish(cache, cache.partial(f.etag).name, f):
            cache.commit_blob(cache.partial(f.etag), f.etag)
        cache.link(plan.commit, f)
        return fetched


GROUP_AT = 5  # more failures than this are grouped by their reason


def describe_failures(failures: list[tuple[str, str]]) -> str:
    """Every failed file by name: each with its error, or, when many, grouped under each distinct reason
    (the error with the file's own name taken out)."""
    if len(failures) <= GROUP_AT:
        return "; ".join(why if why.startswith(name) else f"{name}: {why}" for name, why in failures)
    groups: dict[str, list[str]] = {}
    for name, why in failures:
        reason = why.replace(name, "FILE") if name in why else why
        groups.setdefault(reason, []).append(name)
    return "; ".join(f"{len(names)} x {reason!r}: {', '.join(names)}" for reason, names in groups.items())


def refuse_offline() -> None:
    """huggingface_hub refuses to use the network with HF_HUB_OFFLINE=1 set; so does pull (a warm pull,
    which needs no request, still works)."""
    value = os.environ.get("HF_HUB_OFFLINE", "")
    if value.strip().upper() in ("1", "ON", "YES", "TRUE"):
        raise BadInput(
            f"HF_HUB_OFFLINE={value} is set, so pull does not use the network (as huggingface_hub); "
            "`unset HF_HUB_OFFLINE`, then run the same command again"
        )


def check_cache_dir(folder: Path) -> None:
    """A cache path that is a file (or lies under one) is bad input, found before any request."""
    for p in (folder, *folder.absolute().parents):
        if p.exists():
            if not p.is_dir():
                what = "is a file" if p == folder else f"lies under {p}, which is a file"
                raise BadInput(f"cache folder {folder} {what}; pass --cache-dir (or `cache_dir:`) naming a folder")
            return


def _failed(failures: list[tuple[str, HpcstageError]], total: int) -> HpcstageError:
    """One error for a run whose files failed, naming every failed file (`describe_failures`), except that a
    repo the Hub refuses as a whole (a gate, a bad token) is told once, not per file. "Run the same pull
    again" only when some failure could pass. `.failures` lists each file and its error (for `--json`)."""
    passing = [(name, e) for name, e in failures if e.rerun_helps]
    other = [(name, e) for name, e in failures if not e.rerun_helps and not isinstance(e, RepoRefused)]
    reasons: list[HpcstageError] = []
    for _, e in failures:  # one line per distinct refusal (the same refusal object stands for a repo's files)
        if isinstance(e, RepoRefused) and not any(
            type(r) is type(e) and (r.repo, str(r)) == (e.repo, str(e)) for r in reasons
        ):
            reasons.append(e)
    told = [str(r) for r in reasons[:3]] + (
        [f"(and {len(reasons) - 3} more refused repos)"] if len(reasons) > 3 else []
    )
    if other:
        told.append(describe_failures([(name, str(e)) for name, e in other]))
    if not passing:
        first = reasons[0] if reasons else other[0][1]
        err = type(first)(
            f"{len(failures)} of {total} files not fetched: {'; '.join(told)}",
            repo=first.repo,
            path=first.path,
            status=first.status,
            hint=first.hint,
        )
    else:
        also = f"; not retried: {'; '.join(told)}" if told else ""
        lead = passing[0][1]
        err = TransferError(
            f"{len(failures)} of {total} files failed: "
            f"{describe_failures([(name, str(e)) for name, e in passing])}; run the same pull again "
            f"to retry them (finished files are kept){also}",
            repo=lead.repo,
            path=lead.path,
            status=lead.status,
        )
    err.failures = [{"file": name, "error": str(e)} for name, e in failures]  # type: ignore[attr-defined]
    return err


def _array_share() -> float:
    """An array worker's part of the Hub's rate limit: the workers share one address, so one quota."""
    try:
        return 1.0 / max(1, int(os.environ.get("SLURM_ARRAY_TASK_COUNT", "1")))
    except ValueError:
        return 1.0


class InFlight:
    """How many small files are fetched at once: enough to cover the waits, and no more.

    Little's law: to keep this process busy, 1 + wait/work files must be in flight, where `work` is the CPU
    a file costs this process (request, hash, commit: `time.thread_time`) and `wait` the rest of its wall
    time (the Hub's answer, the filesystem's metadata round trips). Both are measured on the first PROBE
    files, fetched 2 at a time (so that contention cannot inflate them); the limit is then set once,
    between 2 and `most` (--workers). Why not always `most`: over a fast link to a fast disk every runnable
    thread beyond ~2 adds GIL hand-offs and no speed (strace of 2,000 x 20 KB over loopback: 93 futex calls
    per file with 8 threads, 20 with 2; bench/README.md); when files wait on a distant Hub or a slow
    metadata server, the waits overlap and all `most` run."""

    PROBE = 16

    def __init__(self, most: int):
        self.most = max(1, most)
        self.limit = min(2, self.most)
        self.running = 0
        self.samples: list[tuple[float, float]] | None = []  # (wait, work); None once decided
        self.cond = threading.Condition()

    @contextmanager
    def slot(self):
        """Held for a whole batch of small files, so that a thread hands its turn over once per batch,
        not once per file (each hand-off is a wake-up of another thread)."""
        with self.cond:
            while self.running >= self.limit:
                self.cond.wait()
            self.running += 1
        try:
            yield
        finally:
            with self.cond:
                self.running -= 1
                self.cond.notify()

    @contextmanager
    def timed(self):
        """One small file, measured while the limit is still being probed."""
        if self.samples is None:
            yield
            return
        start, cpu = time.monotonic(), time.thread_time()
        try:
            yield
        finally:
            wall, cpu = time.monotonic() - start, time.thread_time() - cpu
            with self.cond:
                if self.samples is not None:
                    self.samples.append((max(0.0, wall - cpu), cpu))
                    if len(self.samples) >= self.PROBE:
                        self._decide()

    def _decide(self) -> None:
        assert self.samples is not None  # _decide runs only while probing
        wait = statistics.median(w for w, _ in self.samples)
        work = statistics.median(w for _, w in self.samples)
        self.limit = max(self.limit, min(self.most, math.ceil(1 + wait / max(work, 1e-5))))
        logging.getLogger(__name__).debug(
            "small files: %d at once (wait %.2f ms, work %.2f ms)", self.limit, wait * 1e3, work * 1e3
        )
        self.samples = None
        self.cond.notify_all()


def _record(cache_dir: Path, plans: list[_RepoPlan], state: str, reason: str = "") -> None:
    """Ledger records: an entry whose files are all linked is staged whatever happened to the others.
    Best effort: a full disk must not hide the error that brought us here."""
    try:
        _write_records(cache_dir, plans, state, reason)
    except OSError as e:
        logging.getLogger(__name__).warning("could not write the ledger in %s: %s", cache_dir, e)


def _write_records(cache_dir: Path, plans: list[_RepoPlan], state: str, reason: str) -> None:
    for p in plans:
        # After a clean run every file is linked (execute checked them); only a failed run needs a look.
        done = state == "staged" or all(p.cache.is_linked(p.commit, f) for f in p.files)
        new = ledger.Record(
            p.entry.repo_type,
            p.entry.repo,
            p.entry.revision,
            p.commit,
            "staged" if done else state,
            len(p.files),
            sum(f.size for f in p.files),
            "" if done else reason,
            patterns={"include": p.entry.include, "exclude": p.entry.exclude},
        )
        old = ledger.read(cache_dir, p.entry.repo_type, p.entry.repo, p.entry.revision)
        if old is None or (old.commit, old.state, old.files, old.bytes, old.reason, old.patterns) != (
            new.commit,
            new.state,
            new.files,
            new.bytes,
            new.reason,
            new.patterns,
        ):  # a warm pull writes nothing
            ledger.write(cache_dir, new)


def _start(
    entries: list[HubEntry],
    opts: Options,
    lock: Lockfile,
    update: Update,
    worker: bool = False,
    files: dict[str, list[str]] | None = None,
) -> tuple[_Run, list[_RepoPlan]]:
    """Refuse what the allowlist forbids (before any request), then plan every entry."""
    allow = policy.Allowlist(opts.allow)
    for e in entries:
        allow.check(e.repo)
    if worker:
        unplanned = [e for e in entries if not (e.key in lock.entries and lock.entries[e.key].matches(e))]
        if unplanned or update:
            what = f"{unplanned[0].repo}@{unplanned[0].revision} is not" if unplanned else "--update is not allowed:"
            raise BadInput(
                f"array worker: {what} planned in the lockfile; "
                "plan first with `hpcstage pull -f MANIFEST --slurm-array N`"
            )
    run = _Run(opts, worker, files)
    plans = []
    for e in entries:
        try:
            plans.append(run.plan(e, None if wants_update(update, e) else lock.entries.get(e.key)))
        except (RevisionNotFound, RepoNotFound) as err:
            if opts.manifest_path is None:  # the hint names the command's flags: right as it is
                raise
            # from a manifest: the hint names its keys (there are no such flags with -f)
            fields: dict[str, Any] = {"repo": err.repo, "path": err.path, "status": err.status}
            if isinstance(err, RevisionNotFound):
                hint = f"check `revision:` of the entry in {opts.manifest_path}"
                raise RevisionNotFound(
                    f"revision {e.revision!r} not found in {e.repo_type} repo {e.repo}; {hint}", hint=hint, **fields
                ) from None
            other = "dataset" if e.repo_type == "model" else "model"
            hint = (
                f"if it is a {other}, list it under `{other}s:` in {opts.manifest_path} (a file entry: "
                f"`repo_type: {other}`), else check the id (private or gated repos need HF_TOKEN)"
            )
            raise RepoNotFound(
                f"{e.repo_type} repo {e.repo} not found at {hub.endpoint()}; {hint}", hint=hint, **fields
            ) from None
    return run, plans


def entry_names(entry) -> set[str]:
    """What `--update NAME` may call an entry: its repo id, its lockfile key, a data entry's dest or source."""
    names = {entry.key, getattr(entry, "repo", None), getattr(entry, "dest", None), getattr(entry, "source", None)}
    return {n for n in names if n}


def wants_update(update: Update, entry) -> bool:
    """`update` is True/False (every entry or none) or the names given to `--update NAME`."""
    if isinstance(update, bool) or update is None:
        return bool(update)
    return bool(entry_names(entry) & set(update))


def _locked(lock: Lockfile, plans: list[_RepoPlan]) -> Lockfile:
    entries = dict(lock.entries)
    for p in plans:
        entries[p.entry.key] = entry_lock(p.entry, p.commit, p.files)
    return Lockfile(entries=entries)


def pull(
    entries: list[HubEntry],
    opts: Options | None = None,
    lock: Lockfile | None = None,
    update: Update = False,
    *,
    worker: bool = False,
    files: dict[str, list[str]] | None = None,
) -> tuple[PullSummary, Lockfile]:
    """Stage `entries` into the hub cache. Returns the summary and the lockfile describing what is staged.
    `worker`: run as a Slurm array worker (stage-array internals); `files`: entry key -> the files named on
    the command line, each of which must exist in the repo."""
    opts = opts or Options()
    started = time.monotonic()
    lock = lock or Lockfile()
    run, plans = _start(entries, opts, lock, update, worker, files)
    try:
        run.execute(plans)
    except BaseException as e:
        _record(
            run.cache_dir,
            plans,
            "failed" if isinstance(e, HpcstageError) else "interrupted",
            str(e) or type(e).__name__,
        )
        if isinstance(e, HpcstageError):
            run.summary.seconds = time.monotonic() - started
            e.summary = run.summary  # type: ignore[attr-defined]  # what did get staged, for `--json`
        raise
    _record(run.cache_dir, plans, "staged")
    if run.sharing is not None:
        # New writes got the group's bits already; this also mends what others wrote (huggingface_hub's
        # 0600 trees/*.json), the cache folder itself and `.locks/` (the ledger, huggingface_hub's locks).
        share_cache(run.cache_dir, run.sharing, repos=sorted({p.cache.root for p in plans}))
    run.summary.seconds = time.monotonic() - started
    return run.summary, _locked(lock, plans)


def manifest_options(manifest: Manifest, opts: Options | None) -> Options:
    """`opts` with the manifest's settings filled in (a copy: the caller's object is left as it was)."""
    opts = opts or Options()
    return dataclasses.replace(
        opts,
        cache_dir=opts.cache_dir or manifest.cache_dir or None,
        allow=manifest.allow if manifest.allow is not None else opts.allow,
        shared_group=opts.shared_group or manifest.shared_group or None,
        manifest_path=manifest.path,
    )


def _save(manifest: Manifest, old: Lockfile, new: Lockfile) -> None:
    """Write `hpcstage.lock` beside the manifest, only the manifest's entries, only when it changed.
    Data entries' records (`data`, datadir.py) are carried over from `old` unless `new` has its own."""
    keep = {e.key for e in manifest.entries}
    data_keys = {e.key for e in manifest.data_entries}
    new = Lockfile(
        entries={k: v for k, v in new.entries.items() if k in keep},
        data={k: v for k, v in (new.data or old.data).items() if k in data_keys},
    )
    if new != old:
        save_lock(manifest.lock_path, new)


def pull_manifest(
    manifest: Manifest, opts: Options | None = None, update: Update = False, *, worker: bool = False
) -> PullSummary:
    """Pull every entry of a manifest and write `hpcstage.lock` beside it: the Hub repos first (their
    pins saved before anything else runs), then the data entries (`url:`, `local:`, `repo:`+`file:`,
    datadir.py), each recorded only once staged and its `expect:` met."""
    opts = manifest_options(manifest, opts)
    old = load_lock(manifest.lock_path, manifest.path)
    summary, new = pull(manifest.entries, opts, old, update, worker=worker)
    if not manifest.data_entries:
        _save(manifest, old, new)
        return summary
    from hpcstage import datadir

    started = time.monotonic()
    hub_lock = new.model_copy(update={"data": old.data})
    _save(manifest, old, hub_lock)
    records, results, failures = datadir.stage_all(manifest, opts, old, update)
    final = datadir.lock_with_data(hub_lock, manifest, records, failures)
    keep = {e.key for e in manifest.entries}
    final = Lockfile(entries={k: v for k, v in final.entries.items() if k in keep}, data=final.data)
    if final != old:
        save_lock(manifest.lock_path, final)
    summary.files += sum(r.files for r in results)
    summary.bytes += sum(r.bytes for r in results)
    summary.downloaded_files += sum(1 for r in results if r.downloaded_bytes)
    summary.downloaded_bytes += sum(r.downloaded_bytes for r in results)
    summary.seconds += time.monotonic() - started
    if failures:
        err = datadir.first_failure(failures)
        err.summary = summary  # type: ignore[attr-defined]
        raise err
    return summary


def plan_manifest(manifest: Manifest, opts: Options | None = None, update: Update = False) -> PullSummary:
    """Resolve every entry's commit and file list once and write them to the lockfile (and each commit's
    trees JSON), fetching no file: the planning step of a Slurm array, whose workers then need no metadata
    request. The summary counts what is left to fetch in `downloaded_*`."""
    opts = manifest_options(manifest, opts)
    old = load_lock(manifest.lock_path, manifest.path)
    run, plans = _start(manifest.entries, opts, old, update)
    for p in plans:
        if p.all_files is not None:
            p.cache.write_tree(p.commit, p.all_files)
        missing = [f for f in p.files if not p.cache.is_linked(p.commit, f)]
        run.summary.repos.append(p.staged())
        run.summary.files += len(p.files)
        run.summary.bytes += sum(f.size for f in p.files)
        run.summary.downloaded_files += len(missing)
        run.summary.downloaded_bytes += sum(f.size for f in missing)
    _save(manifest, old, _locked(old, plans))
    return run.summary


def materialise(snapshot: Path, local_dir: Path, entry: HubEntry) -> int:
    """`pull --local-dir DIR`: the snapshot's files as plain files under DIR (a reflink where the filesystem
    can, else a copy; never a hardlink or symlink into the cache, so editing them leaves the cache intact).
    A file already there with the blob's size and bytes is left alone. Returns the files written."""
    import filecmp

    from huggingface_hub.utils import filter_repo_objects

    from hpcstage.sources import local

    found = [
        (Path(here) / name).relative_to(snapshot).as_posix()
        for here, _dirs, names in os.walk(snapshot)
        for name in names
    ]
    written = 0
    # only this pull's selection: the snapshot may hold files other pulls added
    for rel in filter_repo_objects(found, allow_patterns=entry.include, ignore_patterns=entry.exclude):
        src = snapshot / rel
        dst = Path(local_dir) / rel
        blob = src.resolve()
        if (
            dst.is_file()
            and not dst.is_symlink()
            and dst.stat().st_size == blob.stat().st_size
            and filecmp.cmp(dst, blob, shallow=False)
        ):
            continue
        dst.parent.mkdir(parents=True, exist_ok=True)
        tmp = dst.with_name(f".{dst.name}{TMP_SUFFIX}")
        tmp.unlink(missing_ok=True)
        local.place(blob, tmp, lambda n: None, allow_hardlink=False)
        os.replace(tmp, dst)
        written += 1
    return written


@dataclass
class Leftover:
    path: Path
    why: str


def cleanup(
    cache_dir: Path | None = None, *, data_dir: Path | None = None, older_than: float = 24 * 3600, dry_run: bool = False
) -> list[Leftover]:
    """Remove what dead runs left in the hub cache and the data folder: leases whose owner is dead or
    expired, and partial downloads, temporary files and half-built data folders that no live lease
    protects and that have not changed for `older_than` seconds (a partial younger than that may still be
    continued), and shared Xet blobs no repo links to any more (under their lease, by huggingface_hub's rule:
    one whose `.refs` manifest is missing is kept). Never a live lease or what it guards."""
    from hpcstage import datadir
    from hpcstage.sources import url

    cache_dir = Path(cache_dir) if cache_dir else default_cache_dir()
    data_dir = Path(data_dir) if data_dir else datadir.default_data_dir(cache_dir)
    downloads = url.downloads_dir(data_dir)
    now = time.time()
    found: list[Leftover] = []

    def old(path: Path) -> float | None:
        try:
            age = now - path.lstat().st_mtime
        except FileNotFoundError:
            return None
        return age if age >= older_than else None

    def root_of(path: Path) -> Path:
        return data_dir if data_dir in path.parents else cache_dir

    def live(lease_path: Path) -> bool:
        info = read_lease(lease_path, root_of(lease_path))
        return info is not None and not info.expired

    # Links below the roots are not followed: what cleanup removes is always inside the cache or data_dir.
    blob_dirs = sorted(p for p in cache_dir.glob("*/blobs") if not p.parent.is_symlink() and not p.is_symlink())
    store = XetStore(cache_dir)
    lease_dirs = [*blob_dirs, cache_dir / BATCH_LEASES, store.leases, *datadir.lease_folders(data_dir)]
    for folder in lease_dirs:
        for lease_path in sorted(folder.glob(f"*{LEASE_SUFFIX}")):
            info = read_lease(lease_path, root_of(lease_path))
            if info is not None and info.expired and (dry_run or break_expired(lease_path, root_of(lease_path))):
                found.append(Leftover(lease_path, f"lease of {info.host}:{info.pid}, dead or silent {info.age:.0f}s"))
    # each partial with the lease its writer holds: a blob's (hfcache) or a URL download's (url.py)
    partials = [(p, RepoCache.partial_guard(p)) for d in blob_dirs for p in sorted(d.glob(f"*{PARTIAL_SUFFIX}"))]
    partials += [(p, url.partial_guard(p)) for p in sorted(downloads.glob(f"*{PARTIAL_SUFFIX}"))]
    for partial, guard in partials:
        if live(guard) or (age := old(partial)) is None:
            continue
        if dry_run:
            found.append(Leftover(partial, f"partial download untouched for {age / 3600:.1f}h"))
            continue
        lease = Lease(guard, ttl=LEASE_TTL, root=root_of(guard))  # a run starting now cannot be resuming it
        if not lease.try_acquire():
            continue
        try:
            found.append(Leftover(partial, f"partial download untouched for {age / 3600:.1f}h"))
            partial.unlink(missing_ok=True)
            partial.with_name(ranges_record(partial.name)).unlink(missing_ok=True)
        finally:
            lease.release()
    for entry in store.entries():  # content no repo links to any more (its repos were deleted)
        if not entry.unreferenced:
            continue
        if dry_run:
            found.append(Leftover(store.path(entry.xet_hash), "shared Xet blob no repo links to"))
            continue
        lease = Lease(store.lease(entry.xet_hash), ttl=LEASE_TTL, root=cache_dir)
        if not lease.try_acquire():
            continue  # someone is adding a link to it right now
        try:
            if store.sweep(entry.xet_hash):
                found.append(Leftover(store.path(entry.xet_hash), "shared Xet blob no repo links to"))
        finally:
            lease.release()
    for tmp in safefs.walk_names(cache_dir, f".*{TMP_SUFFIX}", min_depth=1):
        if (age := old(tmp)) is not None:
            found.append(Leftover(tmp, f"temporary file untouched for {age / 3600:.1f}h"))
            if not dry_run:
                tmp.unlink(missing_ok=True)
    for build, guard in datadir.unfinished_builds(data_dir):
        if live(guard) or (age := old(build)) is None:
            continue
        found.append(Leftover(build, f"unfinished data folder untouched for {age / 3600:.1f}h"))
        if not dry_run:
            shutil.rmtree(build, ignore_errors=True)
    return found
