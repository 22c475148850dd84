"""`pull`: Hub entries into the hub cache, as a summary and the lockfile records that describe them.

Each entry is planned (hub/planner.py; the Hub is asked only for what the lockfile and cache do not
say), the plans are executed (hub/engine.py), and each entry's state goes to the ledger whatever the
outcome: staged, failed or interrupted. Data entries (`repo:`+`file:`) stage their Hub file through here
too, which is why this is not staging.py (the manifest level, which calls datadir.py).
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hpcstage import ledger, policy
from hpcstage.errors import BadInput, HpcstageError, RepoNotFound, RevisionNotFound
from hpcstage.hfcache import RepoCache, share_cache
from hpcstage.hub import planner
from hpcstage.hub.engine import Scheduler, Stager, Tally
from hpcstage.hub.planner import RepoPlan
from hpcstage.layout import TMP_SUFFIX
from hpcstage.manifest import HubEntry, LockedEntry, Lockfile, Update, entry_lock
from hpcstage.options import Options, wants_update
from hpcstage.sources import hub


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
    stager, plans = plan_entries(entries, opts, lock, update, worker, files)
    scheduler = Scheduler(stager)
    try:
        scheduler.execute(plans)
    except BaseException as e:
        _record(
            stager.cache_dir,
            plans,
            "failed" if isinstance(e, HpcstageError) else "interrupted",
            str(e) or type(e).__name__,
        )
        if isinstance(e, HpcstageError):
            e.summary = _summary(scheduler.tally, [], time.monotonic() - started)  # type: ignore[attr-defined]
        raise
    _record(stager.cache_dir, plans, "staged")
    if stager.sharing is not None:
        # New writes got the group's bits already; this also mends what others wrote (huggingface_hub's
        # 0600 trees/*.json), the cache folder itself and `.locks/` (the ledger, huggingface_hub's locks).
        share_cache(stager.cache_dir, stager.sharing, repos=sorted({p.cache.root for p in plans}))
    return _summary(scheduler.tally, [staged(p) for p in plans], time.monotonic() - started), lock_with(lock, plans)


def _summary(tally: Tally, repos: list[StagedRepo], seconds: float) -> PullSummary:
    return PullSummary(repos, tally.files, tally.bytes, tally.downloaded_files, tally.downloaded_bytes, seconds)


def plan_entries(
    entries: list[HubEntry],
    opts: Options,
    lock: Lockfile,
    update: Update,
    worker: bool = False,
    files: dict[str, list[str]] | None = None,
) -> tuple[Stager, list[RepoPlan]]:
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
    stager = Stager(opts, worker)
    files = files or {}
    plans = []
    for e in entries:
        try:
            locked = None if wants_update(update, e) else lock.entries.get(e.key)
            plans.append(plan_entry(stager, e, locked, files.get(e.key)))
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
    return stager, plans


def plan_entry(stager: Stager, entry: HubEntry, locked: LockedEntry | None, named: list[str] | None) -> RepoPlan:
    """The planner's decision for one entry, asking the Hub only what the lockfile and the cache do not say:
    the commit of a branch or tag, and the listing when trees/<commit>.json is not on disk."""
    ref = hub.RepoRef(entry.repo_type, entry.repo)
    cache = RepoCache(stager.cache_dir, entry.repo_type, entry.repo, sharing=stager.sharing)
    if locked is not None and locked.matches(entry):
        listing = None if cache.tree_path(locked.commit).exists() else hub.list_files(stager.http, ref, locked.commit)
        return planner.from_lock(entry, ref, cache, locked, listing)
    commit = planner.pinned_commit(entry, locked)
    if commit is None:
        commit, info = hub.resolve_info(stager.http, ref, entry.revision)
        hub.warn_if_gated(ref, info, stager.token)
    on_disk = cache.read_tree(commit)
    listing = on_disk if on_disk is not None else hub.list_files(stager.http, ref, commit)
    return planner.select(entry, ref, cache, commit, listing, write_listing=on_disk is None, named=named)


def staged(p: RepoPlan) -> StagedRepo:
    """A planned repo as a pull's summary reports it: its snapshot and what was selected."""
    return StagedRepo(
        p.entry.repo_type,
        p.entry.repo,
        p.entry.revision,
        p.commit,
        p.cache.snapshot(p.commit),
        len(p.files),
        sum(f.size for f in p.files),
    )


def lock_with(lock: Lockfile, plans: list[RepoPlan]) -> Lockfile:
    entries = dict(lock.entries)
    for p in plans:
        entries[p.entry.key] = entry_lock(p.entry, p.commit, list(p.files))
    return Lockfile(entries=entries)


def _record(cache_dir: Path, plans: list[RepoPlan], state: str, reason: str = "") -> None:
    """Ledger records: an entry whose files are all linked is staged whatever happened to the others.
    Best effort: a full disk must not hide the error that brought us here."""
    try:
        _write_records(cache_dir, plans, state, reason)
    except OSError as e:
        logging.getLogger(__name__).warning("could not write the ledger in %s: %s", cache_dir, e)


def _write_records(cache_dir: Path, plans: list[RepoPlan], state: str, reason: str) -> None:
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
