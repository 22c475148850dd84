"""The manifest level: every entry of a manifest staged, and `hpcstage.lock` written beside it.

Hub entries go through hub/pull.py (plan, then bytes), data entries (`url:`, `local:`, `repo:`+`file:`)
through datadir.py; here only the order (Hub pins saved before any data entry runs), the manifest's
settings over the caller's options, the lockfile's content and one summary for both.
"""

from __future__ import annotations

import dataclasses
import time

from hpcstage.hub.pull import PullSummary, lock_with, plan_entries, pull, staged
from hpcstage.manifest import Lockfile, Manifest, Update, load_lock, save_lock
from hpcstage.options import Options


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
    from hpcstage import datadir  # archive, tarfile, zipfile: ~20 ms a manifest without data entries skips

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
    _, plans = plan_entries(manifest.entries, opts, old, update)
    summary = PullSummary()
    for p in plans:
        if p.listing is not None:
            p.cache.write_tree(p.commit, list(p.listing))
        missing = [f for f in p.files if not p.cache.is_linked(p.commit, f)]
        summary.repos.append(staged(p))
        summary.files += len(p.files)
        summary.bytes += sum(f.size for f in p.files)
        summary.downloaded_files += len(missing)
        summary.downloaded_bytes += sum(f.size for f in missing)
    _save(manifest, old, lock_with(old, plans))
    return summary
