"""`hpcstage cleanup`: what dead runs left in the hub cache and the data folder, removed only when no live
lease guards it. Its own module because it crosses every owner of on-disk names (hfcache's blobs and
partials, xetstore's shared blobs, url.py's downloads, datadir's builds) and stages nothing.
"""

from __future__ import annotations

import shutil
import time
from dataclasses import dataclass
from pathlib import Path

from hpcstage import datadir, safefs
from hpcstage.hfcache import RepoCache, default_cache_dir
from hpcstage.layout import BATCH_LEASES, LEASE_SUFFIX, LEASE_TTL, PARTIAL_SUFFIX, TMP_SUFFIX, ranges_record
from hpcstage.locks import Lease, break_expired, read_lease
from hpcstage.sources import url
from hpcstage.xetstore import XetStore


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
