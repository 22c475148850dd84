"""Execute a plan into the hub cache: work units, the scheduler that runs them, and the file stager.

Plan first (hub/planner.py), then move bytes here: files already in the cache cost nothing. Each blob is
written by one process at a time under its lease; a unit another process holds is put back in the queue
while workers take other units, then linked when its writer is done. Small files travel in batches (one
thread hand-off per batch), and `InFlight` decides how many of them are fetched at once.

Why one module of about 600 lines: the scheduler, the stager and in-flight control share one pull's state (the HTTP
client, the Hub's refusals, the cancel event, the lease a unit holds while its files are staged) and are
each only correct together with the others (a lease taken by the scheduler is checked by the stager after
the download; Ctrl-C stops both); the failure report at the end names what each of them saw.
"""

from __future__ import annotations

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
from dataclasses import dataclass
from pathlib import Path

from hpcstage import policy
from hpcstage.errors import (
    HashMismatch,
    HpcstageError,
    HubError,
    InvalidToken,
    RepoRefused,
    TransferError,
)
from hpcstage.hfcache import CachedFile, check_cache_dir, default_cache_dir
from hpcstage.hub.planner import FilePlan, RepoPlan
from hpcstage.layout import BATCH_LEASES, LEASE_SUFFIX, LEASE_TTL
from hpcstage.locks import Lease
from hpcstage.options import Options, refuse_offline
from hpcstage.progress import Progress, human_bytes
from hpcstage.safefs import Sharing
from hpcstage.sources import hub
from hpcstage.transfer import SMALL, Http, fetch, fetch_small
from hpcstage.xetstore import XetStore

BUSY_RETRY = 0.5  # seconds before a blob held by another process is looked at again
BATCH_FILES = 64  # small files leased together by array workers
SMALL_BATCH = 32  # at most this many small files per unit of a single pull (fewer thread hand-offs)
STOP_GRACE = 5.0  # seconds workers get to stop and release their leases after Ctrl-C/SIGTERM

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Unit:
    """What one worker thread takes at a time: a large file under its blob's (or Xet store entry's) lease,
    or a batch of small files, unleased in a single pull, under one batch lease for Slurm array workers."""

    lease: Path | None
    files: tuple[FilePlan, ...]

    @property
    def small(self) -> bool:
        return self.files[0].size < SMALL


class Stager:
    """One pull's file stager: puts a unit's files into the blob store and the snapshot, over one shared
    HTTP client, remembering which repos the Hub refused so their other files are not asked for."""

    def __init__(self, opts: Options, worker: bool = False):
        self.opts = opts
        self.worker = worker  # a Slurm array worker: files come from the lockfile only, small ones leased in batches
        self.cache_dir = Path(opts.cache_dir) if opts.cache_dir else default_cache_dir()
        check_cache_dir(self.cache_dir)
        self._http: Http | None = None
        self.sharing = Sharing.for_group(opts.shared_group) if opts.shared_group else None  # checked before any request
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
    def store_lease(self, f: CachedFile, held: Lease | None):
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

    def stage_unit(self, unit: Unit, progress: Progress) -> list[int | HpcstageError] | None:
        """Put a unit's files in place; returns the bytes each one downloaded (or why it failed: one file
        does not stop the others), or None when another process holds the unit's lease (the caller queues
        it again and moves on)."""
        lease = None
        if unit.lease is not None:
            lease = Lease(unit.lease, ttl=LEASE_TTL, root=self.cache_dir)
            if not lease.try_acquire():
                return None
        try:
            done: list[int | HpcstageError] = []
            # Units are either one large file or a batch of small ones; a batch runs under one slot.
            with self.in_flight.slot() if unit.small else nullcontext():
                for fp in unit.files:
                    try:
                        done.append(self._stage_file(fp.repo, fp.file, progress, lease))
                    except (TransferError, HubError) as e:
                        done.append(e)
            return done
        finally:
            if lease is not None:
                lease.release()

    def _stage_file(self, plan: RepoPlan, f: CachedFile, progress: Progress, lease: Lease | None) -> int:
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
            with self.store_lease(f, lease) as held:
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
        plan: RepoPlan,
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


@dataclass
class Tally:
    """What a pull's execution counted: selected files and bytes, and what it downloaded (so far, when it
    failed)."""

    files: int = 0
    bytes: int = 0
    downloaded_files: int = 0
    downloaded_bytes: int = 0


class Scheduler:
    """Runs one pull's plans: what is missing becomes units (largest first), run on `workers` threads under
    their leases, with the space check before the first byte and the repo's refs after the last."""

    def __init__(self, stager: Stager):
        self.stager = stager
        self.opts = stager.opts
        self.tally = Tally()

    def execute(self, plans: list[RepoPlan]) -> None:
        """Stage every planned file not linked yet (each content fetched once), then point the refs at
        the commits. The trees are written first, so that a failed run's `status` and `verify` know what
        is missing."""
        stager = self.stager
        todo: list[FilePlan] = []
        dups: list[FilePlan] = []  # a blob wanted by two entries is fetched once, then linked for the second
        seen: set[object] = set()  # blob paths, or ("xet", hash)
        for p in plans:
            for fp in p.file_plans():
                if p.cache.is_linked(p.commit, fp.file):  # the link resolves to a blob of the right size
                    continue
                # one download per content: per blob, or per Xet hash across repos when the store is used
                blob = ("xet", fp.xet_hash) if stager.store_for(fp.file) else fp.blob
                (dups if blob in seen else todo).append(fp)
                seen.add(blob)
        total = sum(f.size for p in plans for f in p.files)
        self.tally.files = sum(len(p.files) for p in plans)
        self.tally.bytes = total
        check_space(stager.cache_dir, todo)
        for p in plans:  # the listing first: `status` and `verify` of a failed run then know what is missing
            if p.listing is not None:
                p.cache.write_tree(p.commit, list(p.listing))
        missing = len(todo) + len(dups)
        with Progress(
            total, self.tally.files, quiet=self.opts.quiet or not missing, callback=self.opts.progress
        ) as progress:
            stager.progress = progress
            progress.add(total - sum(f.size for f in todo))
            for _ in range(self.tally.files - missing):
                progress.file_done()
            self._run(self.units(plans, todo), progress)
            for fp in dups:  # same blob wanted twice: link the second once the first is in place
                p, f = fp.repo, fp.file
                if (store := stager.store_for(f)) is not None and not p.cache.has_blob(f):
                    with stager.store_lease(f, None):
                        store.link_into(p.cache, f)
                p.cache.link(p.commit, f)
                progress.file_done()
        for p in plans:
            if not policy.is_commit(p.entry.revision):
                p.cache.write_ref(p.entry.revision, p.commit)

    def _run(self, units: list[Unit], progress: Progress) -> None:
        """Run units on `workers` threads. Every unit is queued at once (largest first) so workers never
        wait for this thread; completions come back through a queue, O(1) each. A unit leased elsewhere is
        queued again after BUSY_RETRY; a file that fails is reported at the end while the others go on. On
        Ctrl-C/SIGTERM workers stop at their next chunk, and after STOP_GRACE we stop waiting for any stuck
        in a read: their partials are recorded piece by piece and a dead local holder's lease is taken over
        at once by the next run."""
        stager = self.stager
        finished: queue.SimpleQueue = queue.SimpleQueue()
        running: dict[Future, Unit] = {}
        later: deque[tuple[float, Unit]] = deque()  # (not before, unit): units another process holds
        failures: list[tuple[str, HpcstageError]] = []
        pool = ThreadPoolExecutor(max_workers=self.opts.workers, thread_name_prefix="hpcstage")

        def start(unit: Unit) -> None:
            fut = pool.submit(stager.stage_unit, unit, progress)
            running[fut] = unit
            fut.add_done_callback(finished.put)

        try:
            for unit in units:
                start(unit)
            while running or later:
                while later and later[0][0] <= time.monotonic():
                    start(later.popleft()[1])
                try:
                    fut = finished.get(timeout=BUSY_RETRY)
                except queue.Empty:
                    continue
                unit = running.pop(fut)
                first = unit.files[0]
                try:
                    fetched = fut.result()
                except (TransferError, HubError) as e:
                    failures.append((first.label, e))
                    continue
                except OSError as e:
                    if e.errno not in (errno.ENOSPC, errno.EDQUOT):
                        raise
                    raise TransferError(
                        f"{first.label}: the disk or quota under {stager.cache_dir} is full "
                        f"({e.strerror}); the partial file is kept: free space and run the same pull again "
                        "to continue"
                    ) from None
                if fetched is None:
                    later.append((time.monotonic() + BUSY_RETRY, unit))
                    continue
                for fp, n in zip(unit.files, fetched, strict=True):
                    if isinstance(n, HpcstageError):
                        failures.append((fp.label, n))
                        continue
                    progress.file_done()
                    self.tally.downloaded_files += n > 0
                    self.tally.downloaded_bytes += n
        except BaseException:
            stager.cancel.set()
            pool.shutdown(wait=False, cancel_futures=True)
            wait([f for f in running if not f.cancelled()], timeout=STOP_GRACE)
            raise
        pool.shutdown()
        if failures:
            raise _failed(failures, sum(len(u.files) for u in units))

    def units(self, plans: list[RepoPlan], todo: list[FilePlan]) -> list[Unit]:
        """Work units, largest first. A large file is leased alone. Small files go unleased in batches of up
        to SMALL_BATCH, except for Slurm array workers: there they are leased in batches of BATCH_FILES, so
        that N workers fetch each file once without paying for a lease per file. Those batches are cut from
        the whole plan (the lockfile), not from what is missing now, so every worker names the same batches."""
        stager = self.stager
        large = sorted((fp for fp in todo if fp.size >= SMALL), key=lambda fp: -fp.size)
        units = [
            Unit(
                store.lease(fp.xet_hash)
                if (store := stager.store_for(fp.file)) and fp.xet_hash
                else fp.repo.cache.lease(fp.hash),
                (fp,),
            )
            for fp in large
        ]
        if not stager.worker:
            small = [fp for fp in todo if fp.size < SMALL]
            # Batches cut a future (and a wake-up of this thread) per file, yet stay small enough that
            # every worker gets several: the last ones to finish leave no long tail.
            n = max(1, min(SMALL_BATCH, len(small) // (4 * self.opts.workers)))
            return units + [Unit(None, tuple(small[i : i + n])) for i in range(0, len(small), n)]
        wanted = {(id(fp.repo), fp.path) for fp in todo}
        small_all = [(p, f) for p in plans for f in sorted(p.files, key=lambda f: f.path) if f.size < SMALL]
        for i in range(0, len(small_all), BATCH_FILES):
            batch = small_all[i : i + BATCH_FILES]
            missing = tuple(FilePlan.of(p, f) for p, f in batch if (id(p), f.path) in wanted)
            if missing:
                name = hashlib.sha1("".join(f.etag for _, f in batch).encode()).hexdigest()
                units.append(Unit(stager.cache_dir / BATCH_LEASES / f"{name}{LEASE_SUFFIX}", missing))
        return units


def check_space(cache_dir: Path, todo: list[FilePlan]) -> None:
    """Refuse early, with the numbers, when what is left to fetch cannot fit."""
    need = sum(fp.size for fp in todo if not fp.repo.cache.has_blob(fp.file))
    if not need:
        return
    cache_dir.mkdir(parents=True, exist_ok=True)
    free = shutil.disk_usage(cache_dir).free
    margin = (64 << 20) + need // 50  # room for trees, refs and what others write meanwhile
    if need + margin > free:
        raise TransferError(
            f"not enough space in {cache_dir}: need {human_bytes(need)} (+{human_bytes(margin)} margin), "
            f"{human_bytes(free)} free; free space or pass --cache-dir on a larger filesystem"
        )


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
