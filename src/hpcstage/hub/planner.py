"""Plan a Hub entry: from the entry, its lockfile record and the listing the Hub gave, the commit and the
files to stage, each with its size, hash and place in the cache. Pure (no request, no file read), so
every rule of "which files, at which commit" is testable without a Hub; hub/pull.py does the asking.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from hpcstage import policy
from hpcstage.errors import HubError
from hpcstage.hfcache import CachedFile, RepoCache
from hpcstage.manifest import HubEntry, LockedEntry
from hpcstage.sources import hub


@dataclass(frozen=True, eq=False)
class RepoPlan:
    """One entry at one commit: the files it selects and, when trees/<commit>.json is not on disk yet, the
    full listing to write there (so that offline `snapshot_download` can prove the snapshot complete)."""

    entry: HubEntry
    ref: hub.RepoRef
    cache: RepoCache
    commit: str
    files: tuple[CachedFile, ...]
    listing: tuple[CachedFile, ...] | None

    def file_plans(self) -> list[FilePlan]:
        return [FilePlan.of(self, f) for f in self.files]


@dataclass(frozen=True, eq=False)
class FilePlan:
    """One file to stage: which repo, its path, size and hash (with the algorithm that checks it), its Xet
    hash when the Hub listed a real one, and the blob it becomes. `file` is the same entry as hfcache
    names and links it."""

    repo: RepoPlan
    path: str
    size: int
    hash: str
    algorithm: str  # "sha256" (LFS files) or "git-sha1" (regular files): what `hash` is
    xet_hash: str | None
    blob: Path  # where it goes: <repo folder>/blobs/<hash>
    file: CachedFile

    @classmethod
    def of(cls, repo: RepoPlan, f: CachedFile) -> FilePlan:
        return cls(
            repo, f.path, f.size, f.etag, "sha256" if f.sha256 else "git-sha1", f.xet_hash, repo.cache.blob(f.etag), f
        )

    @property
    def label(self) -> str:
        """How messages name it: `org/name/path`."""
        return f"{self.repo.entry.repo}/{self.path}"


def from_lock(
    entry: HubEntry, ref: hub.RepoRef, cache: RepoCache, locked: LockedEntry, listing: list[CachedFile] | None
) -> RepoPlan:
    """The lockfile names this entry's files (same repo, revision and patterns): no selection, no resolve."""
    return RepoPlan(entry, ref, cache, locked.commit, tuple(locked.cached_files()), _tuple(listing))


def pinned_commit(entry: HubEntry, locked: LockedEntry | None) -> str | None:
    """The commit to plan at without asking the Hub: the locked one when only the patterns changed, the
    revision itself when it is a commit sha; None when the Hub must resolve the revision."""
    if locked is not None and (locked.repo_type, locked.repo, locked.revision) == (
        entry.repo_type,
        entry.repo,
        entry.revision,
    ):
        return locked.commit
    if policy.is_commit(entry.revision):
        return entry.revision
    return None


def select(
    entry: HubEntry,
    ref: hub.RepoRef,
    cache: RepoCache,
    commit: str,
    listing: list[CachedFile],
    *,
    write_listing: bool,
    named: list[str] | None = None,
) -> RepoPlan:
    """The entry's include/exclude applied to the commit's listing. `named`: files given on the command line
    (`pull ORG/NAME FILE...`), each of which must be in the listing, as `hf download` insists."""
    files = hub.select(listing, entry.include, entry.exclude)
    if named:
        have = {f.path for f in listing}
        absent = [n for n in named if n not in have]
        if absent:
            raise HubError(
                f"{entry.repo_type} {entry.repo}@{entry.revision} has no file "
                f"{', '.join(repr(a) for a in absent)}; check the name (paths are relative to the "
                "repo's root, e.g. data/train.parquet)"
            )
    return RepoPlan(entry, ref, cache, commit, tuple(files), tuple(listing) if write_listing else None)


def _tuple(files: list[CachedFile] | None) -> tuple[CachedFile, ...] | None:
    return None if files is None else tuple(files)
