"""`pull`: turn manifest entries into a plan, execute it into the hub cache, record it in the lockfile.

Plan first, then move bytes: each entry becomes a commit and a list of files (from the lockfile when it
pins them, else from the Hub), and files already in the cache cost nothing. Each blob is written by one
process at a time under its lease; a blob another process is writing is put back in the queue while
workers take other files, then linked when its writer is done.
"""
from __future__ import annotations

import shutil
import threading
import time
from collections import deque
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from pathlib import Path

from huggingface_hub import get_token

from hpcstage import policy
from hpcstage.errors import TransferError
from hpcstage.hfcache import CachedFile, RepoCache, default_cache_dir
from hpcstage.locks import Lease
from hpcstage.manifest import HubEntry, Lockfile, Manifest, entry_lock, load_lock, save_lock
from hpcstage.progress import Progress, human_bytes
from hpcstage.sources import hub
from hpcstage.transfer import SMALL, Http, RetryPolicy, fetch, fetch_small

LEASE_TTL = 60.0
BUSY_RETRY = 0.5  # seconds before a blob held by another process is looked at again


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
    cache: RepoCache
    commit: str
    files: list[CachedFile]  # the selected files
    all_files: list[CachedFile] | None  # full listing for trees/<commit>.json; None when already on disk


@dataclass
class Options:
    cache_dir: Path | None = None
    workers: int = 8
    token: str | None = None
    timeout: float = 30.0
    retry: RetryPolicy = field(default_factory=RetryPolicy)
    quiet: bool = False
    allow: list[str] | None = None


class _Run:
    """One pull: the shared HTTP client, cache root, progress and counters."""

    def __init__(self, opts: Options):
        self.opts = opts
        self.cache_dir = Path(opts.cache_dir) if opts.cache_dir else default_cache_dir()
        token = opts.token if opts.token is not None else get_token()
        self._headers = hub.hub_headers(token)
        self._http: Http | None = None
        self.summary = PullSummary()
        self.cancel = threading.Event()  # set on Ctrl-C/SIGTERM: workers stop at their next chunk

    @property
    def http(self) -> Http:
        # Created on first use: a warm pull from the lockfile never opens a connection.
        if self._http is None:
            self._http = Http(
                self._headers, pool_size=self.opts.workers + 2, read_timeout=self.opts.timeout, retry=self.opts.retry
            )
        return self._http

    def plan(self, entry: HubEntry, locked) -> _RepoPlan:
        ref = hub.RepoRef(entry.repo_type, entry.repo)
        cache = RepoCache(self.cache_dir, entry.repo_type, entry.repo)
        if locked is not None and locked.matches(entry):
            files = locked.cached_files()
            all_files = None if cache.tree_path(locked.commit).exists() else hub.list_files(self.http, ref, locked.commit)
            return _RepoPlan(entry, cache, locked.commit, files, all_files)
        if locked is not None and (locked.repo_type, locked.repo, locked.revision) == (entry.repo_type, entry.repo, entry.revision):
            commit = locked.commit  # patterns changed: keep the pinned commit, re-select
        elif policy.is_commit(entry.revision):
            commit = entry.revision
        else:
            commit = hub.resolve(self.http, ref, entry.revision)
        on_disk = cache.read_tree(commit)
        all_files = on_disk if on_disk is not None else hub.list_files(self.http, ref, commit)
        files = hub.select(all_files, entry.include, entry.exclude)
        return _RepoPlan(entry, cache, commit, files, None if on_disk is not None else all_files)

    def execute(self, plans: list[_RepoPlan]) -> None:
        jobs = []  # (plan, file, is_duplicate): a blob wanted by two entries is fetched once
        seen: set[Path] = set()
        for p in plans:
            for f in p.files:
                if p.cache.is_linked(p.commit, f):  # the link resolves to a blob of the right size
                    continue
                blob = p.cache.blob(f.etag)
                jobs.append((p, f, blob in seen))
                seen.add(blob)
        total = sum(f.size for p in plans for f in p.files)
        self.summary.files = sum(len(p.files) for p in plans)
        self.summary.bytes = total
        self._check_space([(p, f) for p, f, dup in jobs if not dup])
        with Progress(total, self.summary.files, quiet=self.opts.quiet or not jobs) as progress:
            progress.add(total - sum(f.size for _, f, dup in jobs if not dup))
            for _ in range(self.summary.files - len(jobs)):
                progress.file_done()
            self._run_jobs([(p, f) for p, f, dup in jobs if not dup], progress)
            for p, f, dup in jobs:  # same blob wanted twice: link the second once the first is in place
                if dup:
                    p.cache.link(p.commit, f)
                    progress.file_done()
        for p in plans:
            if p.all_files is not None:
                p.cache.write_tree(p.commit, p.all_files)
            if not policy.is_commit(p.entry.revision):
                p.cache.write_ref(p.entry.revision, p.commit)
            self.summary.repos.append(
                StagedRepo(p.entry.repo_type, p.entry.repo, p.entry.revision, p.commit, p.cache.snapshot(p.commit),
                           len(p.files), sum(f.size for f in p.files))
            )

    def _check_space(self, jobs: list[tuple[_RepoPlan, CachedFile]]) -> None:
        """Refuse early, with the numbers, when what is left to fetch cannot fit."""
        need = sum(f.size for p, f in jobs if not p.cache.has_blob(f))
        if not need:
            return
        self.cache_dir.mkdir(parents=True, exist_ok=True)
        free = shutil.disk_usage(self.cache_dir).free
        margin = 256 << 20
        if need + margin > free:
            raise TransferError(
                f"not enough space in {self.cache_dir}: need {human_bytes(need)} (+{human_bytes(margin)} margin), "
                f"{human_bytes(free)} free; free space or pass --cache-dir on a larger filesystem"
            )

    def _run_jobs(self, jobs: list[tuple[_RepoPlan, CachedFile]], progress: Progress) -> None:
        pending: deque = deque((0.0, j) for j in jobs)
        running: dict[Future, tuple] = {}
        with ThreadPoolExecutor(max_workers=self.opts.workers, thread_name_prefix="hpcstage") as pool:
            try:
                while pending or running:
                    now = time.monotonic()
                    for _ in range(len(pending)):
                        if len(running) >= self.opts.workers:
                            break
                        not_before, job = pending.popleft()
                        if not_before > now:
                            pending.append((not_before, job))
                            continue
                        running[pool.submit(self._stage_file, *job, progress)] = job
                    if not running:
                        time.sleep(min(BUSY_RETRY, max(0.0, min(t for t, _ in pending) - now)))
                        continue
                    done, _ = wait(running, timeout=BUSY_RETRY, return_when=FIRST_COMPLETED)
                    for fut in done:
                        job = running.pop(fut)
                        fetched = fut.result()
                        if fetched is None:
                            pending.append((time.monotonic() + BUSY_RETRY, job))
                            continue
                        progress.file_done()
                        if fetched:
                            self.summary.downloaded_files += 1
                            self.summary.downloaded_bytes += fetched
            except BaseException:
                self.cancel.set()
                for fut in running:
                    fut.cancel()
                raise

    def _stage_file(self, plan: _RepoPlan, f: CachedFile, progress: Progress) -> int | None:
        """Put one file in place; returns the bytes it downloaded, or None when another process holds
        the blob's lease (the caller queues it again and moves on)."""
        cache = plan.cache
        if cache.has_blob(f):
            cache.link(plan.commit, f)
            progress.add(f.size)
            return 0
        url = hub.RepoRef(plan.entry.repo_type, plan.entry.repo).file_url(plan.commit, f.path)
        label = f"{plan.entry.repo}/{f.path}"
        if f.size < SMALL:
            # Racing another process for a small blob costs a few kB twice at worst; a lease costs more.
            data = fetch_small(self.http, url, size=f.size, expected=f.etag, sha256=f.sha256, label=label)
            cache.write_blob(f.etag, data)
            cache.link(plan.commit, f)
            progress.add(f.size)
            return f.size
        lease = Lease(cache.lease(f.etag), ttl=LEASE_TTL)
        if not lease.try_acquire():
            return None
        try:
            if cache.has_blob(f):  # its writer finished while we were queued
                cache.link(plan.commit, f)
                progress.add(f.size)
                return 0

            def on_bytes(n: int) -> None:
                if lease.lost:
                    raise TransferError(f"{label}: lost the lease on its blob to another process; run pull again")
                if self.cancel.is_set():
                    raise KeyboardInterrupt
                progress.add(n)

            for attempt in (1, 2):  # wrong bytes are discarded and fetched once more
                try:
                    fetched = fetch(self.http, url, cache.partial(f.etag), size=f.size, expected=f.etag,
                                    sha256=f.sha256, on_bytes=on_bytes, label=label)
                    break
                except TransferError as e:
                    if attempt == 2 or "hash mismatch" not in str(e):
                        raise
                    progress.add(-f.size)  # fetch reported the whole file before its hash failed
            lease.check()
            cache.commit_blob(cache.partial(f.etag), f.etag)
            cache.link(plan.commit, f)
            return fetched
        finally:
            lease.release()


def pull(entries: list[HubEntry], opts: Options | None = None, lock: Lockfile | None = None,
         update: bool = False) -> tuple[PullSummary, Lockfile]:
    """Stage `entries` into the hub cache. Returns the summary and the lockfile describing what is staged."""
    opts = opts or Options()
    started = time.monotonic()
    allow = policy.Allowlist(opts.allow)
    for e in entries:  # refuse before any request
        allow.check(e.repo)
    run = _Run(opts)
    lock = lock or Lockfile()
    plans = [run.plan(e, None if update else lock.entries.get(e.key)) for e in entries]
    run.execute(plans)
    new_entries = dict(lock.entries)
    for p in plans:
        new_entries[p.entry.key] = entry_lock(p.entry, p.commit, p.files)
    run.summary.seconds = time.monotonic() - started
    return run.summary, Lockfile(entries=new_entries)


def pull_manifest(manifest: Manifest, opts: Options | None = None, update: bool = False) -> PullSummary:
    """Pull every entry of a manifest and write `hpcstage.lock` beside it (only when it changed)."""
    opts = opts or Options()
    if manifest.cache_dir and not opts.cache_dir:
        opts.cache_dir = manifest.cache_dir
    if manifest.allow is not None:
        opts.allow = manifest.allow
    old = load_lock(manifest.lock_path)
    summary, new = pull(manifest.entries, opts, old, update)
    keep = {e.key for e in manifest.entries}
    new = Lockfile(entries={k: v for k, v in new.entries.items() if k in keep})
    if new != old:
        save_lock(manifest.lock_path, new)
    return summary
