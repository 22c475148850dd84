"""The cache's last steps, one at a time (pulls test them end to end): the blob hashes a pull checks,
moving a checked partial into place, the snapshot link and the ref. Asserted on disk and with
huggingface_hub's own offline lookup, which is what a job uses."""
from __future__ import annotations

import errno
import hashlib
import os
import stat
import subprocess

import pytest
from huggingface_hub import try_to_load_from_cache

from hpcstage import hfcache
from hpcstage.hfcache import CachedFile, RepoCache, digest_file, new_hasher

REPO = "demo-org/commits"
COMMIT = "c" * 40
DATA = bytes(range(256)) * 4099  # not a multiple of the hash's read size when it is shrunk below


def _git_blob_id(path) -> str:
    return subprocess.run(["git", "hash-object", str(path)], capture_output=True, text=True, check=True).stdout.strip()


@pytest.mark.parametrize("data", [b"", b"hello\n", DATA])
def test_the_hashes_are_sha256_and_gits_blob_id_read_in_any_chunk_size(tmp_path, monkeypatch, data):
    path = tmp_path / "f"
    path.write_bytes(data)
    monkeypatch.setattr(hfcache, "HASH_BUF", 4096)  # many reads and a short last one
    counted: list[int] = []
    assert digest_file(path, on_bytes=counted.append) == hashlib.sha256(data).hexdigest()
    assert sum(counted) == len(data) and (len(counted) > 1) == (len(data) > 4096)
    assert digest_file(path, "git") == _git_blob_id(path)
    h = new_hasher(None, len(data))
    h.update(data)
    assert h.hexdigest() == _git_blob_id(path)
    h = new_hasher("a" * 64, len(data))
    h.update(data)
    assert h.hexdigest() == hashlib.sha256(data).hexdigest()


def _cache(tmp_path) -> tuple[RepoCache, CachedFile]:
    cache = RepoCache(tmp_path / "hub", "model", REPO)
    f = CachedFile("weights/deep/model.bin", len(DATA), "b" * 40, hashlib.sha256(DATA).hexdigest())
    return cache, f


def _partial(cache: RepoCache, f: CachedFile, mode: int = 0o600):
    cache.create_partial(f.etag)
    partial = cache.partial(f.etag)
    partial.write_bytes(DATA)
    partial.chmod(mode)
    return partial


def test_a_committed_blob_is_the_partials_bytes_under_its_hash_readable_by_all(tmp_path):
    cache, f = _cache(tmp_path)
    partial = _partial(cache, f)
    cache.commit_blob(partial, f.etag)
    blob = cache.blob(f.etag)
    assert not partial.exists() and blob.read_bytes() == DATA
    assert stat.S_IMODE(blob.stat().st_mode) == 0o644 & ~_umask()
    # another writer committed the same content first: replaced, same bytes
    partial = _partial(cache, f, 0o640)
    cache.commit_blob(partial, f.etag)
    assert not partial.exists() and blob.read_bytes() == DATA and cache.has_blob(f)


@pytest.mark.timeout(30)  # opening the FIFO without O_NONBLOCK would wait for a writer for ever
def test_a_partial_that_is_no_regular_file_is_never_moved_into_place(tmp_path):
    cache, f = _cache(tmp_path)
    cache.create_partial(f.etag)
    partial = cache.partial(f.etag)
    partial.unlink()
    os.mkfifo(partial)  # opens without blocking (O_NONBLOCK), is not a file
    with pytest.raises(OSError) as e:
        cache.commit_blob(partial, f.etag)
    assert e.value.errno == errno.EINVAL and not cache.blob(f.etag).exists()
    partial.unlink()
    elsewhere = tmp_path / "elsewhere"
    elsewhere.write_bytes(DATA)
    partial.symlink_to(elsewhere)  # planted link: refused, not moved
    with pytest.raises(OSError) as e:
        cache.commit_blob(partial, f.etag)
    assert e.value.errno == errno.ELOOP and not cache.blob(f.etag).exists() and partial.is_symlink()


def test_the_snapshot_link_is_what_huggingface_hub_resolves_and_a_wrong_one_is_replaced(tmp_path):
    cache, f = _cache(tmp_path)
    cache.commit_blob(_partial(cache, f), f.etag)
    cache.write_ref("main", COMMIT)
    cache.link(COMMIT, f)
    link = cache.snapshot(COMMIT) / f.path
    assert os.readlink(link) == "../../../../blobs/" + f.etag and cache.is_linked(COMMIT, f)
    found = try_to_load_from_cache(REPO, f.path, cache_dir=cache.cache_dir)
    assert found is not None and open(found, "rb").read() == DATA
    before = os.lstat(link).st_ino
    cache.link(COMMIT, f)  # already right: left alone
    assert os.lstat(link).st_ino == before
    other = CachedFile(f.path, 3, "d" * 40)
    (cache.blob(other.etag)).write_bytes(b"old")
    cache.link(COMMIT, other)  # a link to another blob: replaced by the one asked for
    assert os.readlink(link) == "../../../../blobs/" + "d" * 40 and link.read_bytes() == b"old"
    cache.link(COMMIT, f)  # and back (one of the two targets sorts after the other)
    assert os.readlink(link) == "../../../../blobs/" + f.etag
    link.unlink()
    link.write_bytes(b"a plain file where the link belongs")
    cache.link(COMMIT, f)
    assert link.is_symlink() and link.read_bytes() == DATA
    assert sorted(p.name for p in link.parent.iterdir()) == ["model.bin"]  # no temporary left behind


def test_a_ref_holds_exactly_the_commit_and_moves_only_when_it_changes(tmp_path):
    cache, _ = _cache(tmp_path)
    cache.write_ref("main", COMMIT)
    ref = cache.root / "refs" / "main"
    assert ref.read_bytes() == COMMIT.encode() and cache.read_ref("main") == COMMIT
    before = os.stat(ref).st_ino
    cache.write_ref("main", COMMIT)
    assert os.stat(ref).st_ino == before  # unchanged: not rewritten
    cache.write_ref("main", "e" * 40)
    assert ref.read_bytes() == b"e" * 40
    cache.write_ref("pr/7", COMMIT)  # a nested revision gets its folder
    assert (cache.root / "refs" / "pr" / "7").read_bytes() == COMMIT.encode()


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def test_a_partial_this_user_may_not_chmod_is_still_committed_with_its_owners_bits(tmp_path, monkeypatch):
    """Another group member's partial, resumed here: fchmod is refused (not the owner), the commit goes on."""
    cache, f = _cache(tmp_path)
    partial = _partial(cache, f, 0o664)

    def refused(fd, mode):
        raise PermissionError(errno.EPERM, "not the owner")

    monkeypatch.setattr(hfcache.os, "fchmod", refused)
    cache.commit_blob(partial, f.etag)
    monkeypatch.undo()
    blob = cache.blob(f.etag)
    assert not partial.exists() and blob.read_bytes() == DATA and stat.S_IMODE(blob.stat().st_mode) == 0o664


@pytest.mark.skipif(os.geteuid() != 0, reason="gives files to other groups: needs root")
@pytest.mark.parametrize("folder_gid", [5000, 3000])
def test_a_link_in_a_folder_of_another_group_gets_the_shared_group(tmp_path, folder_gid):
    """A snapshot folder made before the cache was shared (another group, setgid): the new link is given
    the shared group, its owner kept."""
    sharing = hfcache.Sharing(4242, "g4242")
    cache = RepoCache(tmp_path / "hub", "model", REPO, sharing)
    f = CachedFile("a/b.bin", 3, "b" * 40)
    folder = cache.snapshot(COMMIT) / "a"
    folder.mkdir(parents=True)
    os.chown(folder, -1, folder_gid)
    os.chmod(folder, 0o2755)
    cache.link(COMMIT, f)
    st = os.lstat(folder / "b.bin")
    assert (st.st_gid, st.st_uid) == (4242, os.geteuid())


def test_a_folder_where_the_link_belongs_is_refused_and_no_temporary_is_left(tmp_path):
    cache, f = _cache(tmp_path)
    where = cache.snapshot(COMMIT) / f.path
    (where / "inside").mkdir(parents=True)
    with pytest.raises(OSError):
        cache.link(COMMIT, f)
    assert sorted(p.name for p in where.parent.iterdir()) == ["model.bin"] and (where / "inside").is_dir()
