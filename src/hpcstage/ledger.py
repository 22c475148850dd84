"""Per-artifact records (what the last pull did to each repo@revision) and the live status of a cache.

A record is one small JSON file per artifact under `<cache>/.locks/hpcstage/ledger/`, replaced atomically, so
concurrent pulls on many nodes never interleave writes. Status combines the records with what is on disk
right now: linked files, partial files (with the pieces done) and leases (who holds them, how old).
"""

from __future__ import annotations

import json
import os
import socket
import time
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path

from hpcstage import safefs
from hpcstage.hfcache import CachedFile, RepoCache
from hpcstage.layout import (
    LEASE_SUFFIX,
    LEDGER_DIR,
    PARTIAL_SUFFIX,
    artifact_of_ledger_name,
    ledger_name,
    partial_progress,
)
from hpcstage.locks import read_lease


@dataclass
class Record:
    repo_type: str
    repo: str
    revision: str
    commit: str
    state: str  # staged | failed | interrupted
    files: int
    bytes: int
    reason: str = ""
    host: str = field(default_factory=socket.gethostname)
    pid: int = field(default_factory=os.getpid)
    updated: float = field(default_factory=time.time)
    # {include, exclude} of the pull (None in records written before they were kept): with the commit's
    # trees/<commit>.json they name every file the pull selected, so status and verify see a missing one.
    patterns: dict | None = None

    def selected(self, listing: list[CachedFile]) -> list[CachedFile] | None:
        """The files this pull selected from the commit's full listing (None: the record kept no patterns)."""
        if self.patterns is None:
            return None
        if self.patterns.get("include") is None and self.patterns.get("exclude") is None:
            return list(listing)  # everything: no need to match 20,000 paths against no pattern
        from hpcstage.sources.hub import select

        return select(listing, self.patterns.get("include"), self.patterns.get("exclude"))


def _path(cache_dir: Path, repo_type: str, repo: str, revision: str) -> Path:
    return Path(cache_dir) / LEDGER_DIR / ledger_name(repo_type, repo, revision)


def write(cache_dir: Path, record: Record) -> None:
    safefs.write_atomic(
        cache_dir, _path(cache_dir, record.repo_type, record.repo, record.revision), json.dumps(asdict(record)).encode()
    )


def read(cache_dir: Path, repo_type: str, repo: str, revision: str) -> Record | None:
    try:
        return Record(**json.loads(_path(cache_dir, repo_type, repo, revision).read_text()))
    except (OSError, ValueError, TypeError):
        return None


def read_all(cache_dir: Path) -> list[Record]:
    return [r for r in read_all_checked(cache_dir) if isinstance(r, Record)]


@dataclass
class Unreadable:
    """A ledger file that could not be read: reported by `status`, never hidden."""

    path: Path
    why: str

    def artifact(self) -> tuple[str, str, str] | None:
        """(repo_type, repo, revision) from the file's name, when it has the ledger's form."""
        return artifact_of_ledger_name(self.path.name)


def read_all_checked(cache_dir: Path) -> list[Record | Unreadable]:
    out: list[Record | Unreadable] = []
    for p in sorted((Path(cache_dir) / LEDGER_DIR).glob("*.json")):
        try:
            out.append(Record(**json.loads(p.read_text())))
        except OSError as e:
            out.append(Unreadable(p, e.strerror or str(e)))
        except (ValueError, TypeError) as e:
            out.append(Unreadable(p, f"not a ledger record: {str(e).splitlines()[0][:80]}"))
    return out


@dataclass
class ArtifactStatus:
    """One repo@revision as it is now: `state` is staged, partial, locked, failed, interrupted or missing."""

    repo_type: str
    repo: str
    revision: str
    commit: str | None
    state: str
    files: int  # expected (from the lockfile or the last record); 0 when unknown
    staged_files: int
    partial_percent: float | None = None  # bytes done across partial files, when any
    locked_by: list[str] = field(default_factory=list)  # "host:pid (age 12s)"
    reason: str = ""
    updated: float | None = None

    def look_at(self, partials: Iterable[Path], leases: Iterable[Path]) -> bool:
        """Fill in what is under way from the disk: bytes done across `partials` (from their pieces records)
        and who holds a live lease among `leases`. True when any partial file exists."""
        progress = [partial_progress(p) for p in partials]
        if progress:
            done, total = sum(d for d, _ in progress), sum(t for _, t in progress)
            self.partial_percent = round(100.0 * done / total, 1) if total else 0.0
        for path in leases:
            lease = read_lease(path)
            if lease is not None and not lease.expired:
                self.locked_by.append(f"{lease.host}:{lease.pid} (age {lease.age:.0f}s)")
        return bool(progress)


def artifact_status(
    cache_dir: Path,
    repo_type: str,
    repo: str,
    revision: str,
    commit: str | None = None,
    files: list[CachedFile] | None = None,
    record: Record | None = None,
) -> ArtifactStatus:
    """The record (read here unless given) plus a look at the disk; `files` (from the lockfile) makes the
    counts exact."""
    rec = record or read(cache_dir, repo_type, repo, revision)
    cache = RepoCache(Path(cache_dir), repo_type, repo)
    commit = commit or (rec.commit if rec else None) or cache.read_ref(revision)
    if files is None and commit and rec is not None and rec.patterns is not None and rec.commit == commit:
        listing = cache.read_tree(commit)  # the pull's selection, from the listing and its patterns
        if listing is not None:
            files = rec.selected(listing)
    if files is not None and commit:
        expected, staged = len(files), sum(cache.is_linked(commit, f) for f in files)
    elif rec is not None:
        expected, staged = rec.files, (rec.files if rec.state == "staged" else 0)
    else:
        expected = staged = 0
    st = ArtifactStatus(
        repo_type,
        repo,
        revision,
        commit,
        "missing",
        expected,
        staged,
        reason=rec.reason if rec else "",
        updated=rec.updated if rec else None,
    )
    blobs = cache.root / "blobs"
    progress = st.look_at(blobs.glob(f"*{PARTIAL_SUFFIX}"), blobs.glob(f"*{LEASE_SUFFIX}"))
    if expected and staged >= expected:
        st.state = "staged"
    elif st.locked_by:
        st.state = "locked"
    elif rec is not None and rec.state != "staged":
        st.state = rec.state
    elif staged or progress:
        st.state = "partial"
    return st
