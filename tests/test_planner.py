"""The Hub planner on its own (hub/planner.py): which commit, which files, where each goes. No Hub and no
cache is touched: the planner is pure, so these rules are checked on plain values."""

from __future__ import annotations

import dataclasses
import hashlib
from pathlib import Path

import pytest

from hpcstage.errors import HubError
from hpcstage.hfcache import CachedFile, RepoCache
from hpcstage.hub import planner
from hpcstage.manifest import HubEntry, LockedEntry
from hpcstage.sources.hub import RepoRef

COMMIT = "a" * 40
OTHER = "b" * 40
LFS = CachedFile("model.safetensors", 5 << 20, hashlib.sha1(b"x").hexdigest(), hashlib.sha256(b"x").hexdigest())
CONFIG = CachedFile("config.json", 12, hashlib.sha1(b"y").hexdigest())
README = CachedFile("README.md", 30, hashlib.sha1(b"z").hexdigest())
LISTING = [LFS, CONFIG, README]


def _where(entry: HubEntry, tmp_path: Path) -> tuple[RepoRef, RepoCache]:
    return RepoRef(entry.repo_type, entry.repo), RepoCache(tmp_path, entry.repo_type, entry.repo)


def _locked(entry: HubEntry, files: list[CachedFile], commit: str = COMMIT) -> LockedEntry:
    return LockedEntry(
        repo_type=entry.repo_type,
        repo=entry.repo,
        revision=entry.revision,
        commit=commit,
        include=entry.include,
        exclude=entry.exclude,
        files=[{"path": f.path, "size": f.size, "blob_id": f.blob_id, **({"sha256": f.sha256} if f.sha256 else {})}
               for f in files],
    )


def test_a_branch_without_a_lock_asks_the_hub_and_a_commit_sha_does_not():
    assert planner.pinned_commit(HubEntry(repo="org/m"), None) is None
    assert planner.pinned_commit(HubEntry(repo="org/m", revision=OTHER), None) == OTHER


def test_changed_patterns_keep_the_locked_commit_but_another_revision_does_not():
    entry = HubEntry(repo="org/m", include=["*.json"])
    locked = _locked(HubEntry(repo="org/m"), LISTING)  # same revision, no patterns then
    assert planner.pinned_commit(entry, locked) == COMMIT
    assert planner.pinned_commit(HubEntry(repo="org/m", revision="v2"), locked) is None
    assert planner.pinned_commit(HubEntry(repo="org/m", repo_type="dataset"), locked) is None


def test_select_applies_include_and_exclude_and_writes_the_full_listing_only_when_asked(tmp_path):
    entry = HubEntry(repo="org/m", include=["*.json", "*.md"], exclude=["README*"])
    ref, cache = _where(entry, tmp_path)
    plan = planner.select(entry, ref, cache, COMMIT, LISTING, write_listing=True)
    assert [f.path for f in plan.files] == ["config.json"]
    assert plan.listing == tuple(LISTING)  # trees/<commit>.json holds every file, not the selection
    assert plan.commit == COMMIT
    assert planner.select(entry, ref, cache, COMMIT, LISTING, write_listing=False).listing is None
    assert not any(tmp_path.iterdir())  # planning wrote nothing


def test_files_named_on_the_command_line_must_be_in_the_listing(tmp_path):
    entry = HubEntry(repo="org/m")
    ref, cache = _where(entry, tmp_path)
    plan = planner.select(entry, ref, cache, COMMIT, LISTING, write_listing=False, named=["config.json"])
    assert plan.commit == COMMIT
    with pytest.raises(HubError, match=r"model org/m@main has no file 'weights\.bin', 'x/y'; check the name"):
        planner.select(entry, ref, cache, COMMIT, LISTING, write_listing=False, named=["config.json", "weights.bin", "x/y"])


def test_a_matching_lock_gives_its_files_without_selection(tmp_path):
    entry = HubEntry(repo="org/m", include=["*.json"])
    ref, cache = _where(entry, tmp_path)
    locked = _locked(entry, [LFS, README], commit=OTHER)  # whatever the lock says, even files the patterns miss
    plan = planner.from_lock(entry, ref, cache, locked, None)
    assert (plan.commit, [f.path for f in plan.files], plan.listing) == (OTHER, ["model.safetensors", "README.md"], None)


def test_each_file_plan_names_its_hash_algorithm_and_its_blob(tmp_path):
    entry = HubEntry(repo="org/m")
    ref, cache = _where(entry, tmp_path)
    lfs, config = planner.select(entry, ref, cache, COMMIT, [LFS, CONFIG], write_listing=False).file_plans()
    assert (lfs.path, lfs.size, lfs.hash, lfs.algorithm) == (LFS.path, LFS.size, LFS.sha256, "sha256")
    assert (config.hash, config.algorithm) == (CONFIG.blob_id, "git-sha1")
    assert lfs.blob == tmp_path / "models--org--m" / "blobs" / LFS.sha256
    assert config.blob == tmp_path / "models--org--m" / "blobs" / CONFIG.blob_id
    assert lfs.label == "org/m/model.safetensors"
    with pytest.raises(dataclasses.FrozenInstanceError):
        lfs.size = 0  # type: ignore[misc]
