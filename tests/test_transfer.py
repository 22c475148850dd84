"""The engine below `pull`: keep-alive reuse, small files in flight, large files written O_DIRECT or buffered."""
from __future__ import annotations

import errno
import hashlib
import json
import os
import subprocess
import sys
import threading
from pathlib import Path

import pytest
from helpers import client_env, sha256

from hpcstage.testing.hub import FaultRule, HubServer
from hpcstage.errors import HashMismatch
from hpcstage.hub.engine import InFlight
from hpcstage.transfer import Http, RetryPolicy, concurrency, fetch, fetch_small


def test_a_keep_alive_connection_closed_by_the_server_is_replaced_without_a_retry(hub):
    # attempts=1: any retry would raise, so only the silent reconnect can make the second request succeed
    http = Http({}, retry=RetryPolicy(attempts=1, budget=5))
    url = f"{hub.url}/api/models/demo-org/tiny-model"
    first = http.request("GET", url)
    assert first.status == 200 and json.loads(first.read())["id"] == "demo-org/tiny-model"
    first.release_conn()
    assert sum(len(idle) for idle in http._idle.values()) == 1  # kept for the next request
    for listener in hub._listeners:  # the server closes every idle keep-alive connection
        listener.close_connections(timeout=5)
    second = http.request("GET", url)
    assert second.status == 200 and json.loads(second.read())["id"] == "demo-org/tiny-model"
    second.release_conn()
    assert [r.path for r in hub.log].count("/api/models/demo-org/tiny-model") == 2


def test_a_half_read_body_closes_its_connection_instead_of_reusing_it(hub):
    http = Http({})
    files = hub.files_of("model", "demo-org/tiny-model")
    path, info = max(((p, f) for p, f in files.items() if f.sha256 is None), key=lambda kv: kv[1].size)  # no redirect
    assert info.size > 10
    resp = http.request("GET", f"{hub.url}/demo-org/tiny-model/resolve/main/{path}")
    assert resp.status == 200 and len(resp.read(10)) == 10
    resp.release_conn()
    assert sum(len(idle) for idle in http._idle.values()) == 0
    again = http.request("GET", f"{hub.url}/demo-org/tiny-model/resolve/main/{path}")
    assert len(again.read()) == info.size
    again.release_conn()


# -- small files: batches and how many run at once ----------------------------------------------------


@pytest.fixture
def many_hub(tmp_path):
    """40 small regular files (served by the hub listener itself)."""
    repo = tmp_path / "served" / "models" / "demo-org" / "many"
    for i in range(40):
        (repo / f"part-{i // 10}").mkdir(parents=True, exist_ok=True)
        (repo / f"part-{i // 10}" / f"item-{i:02d}.txt").write_text(f"item {i}\n" * (i + 1))
    with HubServer(tmp_path / "served") as server:
        yield server


def pull(server, cache: Path, *extra: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "hpcstage", "pull", "demo-org/many", "--cache-dir", str(cache), "-q",
                           *extra], env=client_env(server, cache), capture_output=True, text=True, timeout=120)


def test_one_bad_small_file_does_not_stop_the_others_in_its_batch(many_hub, tmp_path):
    many_hub.add_fault(FaultRule(path=r"/item-13\.txt$", server="hub", method="GET", corrupt=True))
    cache = tmp_path / "cache"
    r = pull(many_hub, cache, "--workers", "2")  # 40 files / (4 x 2 workers): batches of 5
    assert r.returncode == 1 and "1 of 40 files failed" in r.stderr and "item-13.txt" in r.stderr, r.stderr
    snapshot = next((cache / "models--demo-org--many" / "snapshots").iterdir())
    for i in range(40):
        path = snapshot / f"part-{i // 10}" / f"item-{i:02d}.txt"
        if i == 13:
            assert not path.exists()
        else:
            assert path.read_text() == f"item {i}\n" * (i + 1)


def test_a_slow_link_gets_all_workers_at_once(many_hub, tmp_path):
    many_hub.add_fault(FaultRule(path=r"/resolve/", server="hub", method="GET", delay=0.1))
    r = pull(many_hub, tmp_path / "cache", "--workers", "6")
    assert r.returncode == 0, r.stderr
    gets = [rec for rec in many_hub.log if "/resolve/" in rec.path]
    assert len(gets) == 40
    events = sorted([(rec.time, 1) for rec in gets] + [(rec.time + rec.duration, -1) for rec in gets])
    most = now = 0
    for _, step in events:
        now += step
        most = max(most, now)
    assert most == 6  # after the first 16 files at 2 at once, the 100 ms waits called for all 6


@pytest.mark.parametrize("wait, work, most, expected", [
    (0.0004, 0.0003, 8, 3),  # loopback: a file waits about as long as it costs in CPU
    (0.0002, 0.0003, 8, 2),  # never fewer than 2
    (0.040, 0.0003, 8, 8),  # a distant Hub: as many as --workers allows
    (0.040, 0.0003, 1, 1),  # --workers 1 means one
])
def test_in_flight_follows_littles_law(wait, work, most, expected):
    gauge = InFlight(most)
    gauge.samples = [(wait, work)] * InFlight.PROBE
    with gauge.cond:
        gauge._decide()
    assert gauge.limit == expected and gauge.samples is None


# -- large files: O_DIRECT where the filesystem takes it, buffered where it does not --------------------


def _lfs_file(hub):
    files = hub.files_of("model", "demo-org/tiny-model")
    path, info = max(((p, f) for p, f in files.items() if f.sha256), key=lambda kv: kv[1].size)
    assert info.size % 4096, "the tail must be unaligned to take both write paths"
    return f"{hub.url}/demo-org/tiny-model/resolve/main/{path}", info


def _fetch(hub, partial: Path):
    url, info = _lfs_file(hub)
    fetched = fetch(Http({}), url, partial, size=info.size, expected=info.sha256, algorithm="sha256")
    assert fetched == info.size and sha256(partial) == info.sha256
    assert not Path(str(partial) + ".ranges").exists()


def test_a_filesystem_that_refuses_o_direct_gets_buffered_writes(hub, tmp_path, monkeypatch):
    real_open = os.open
    refused = []

    def no_direct(path, flags, *args, **kw):
        if flags & os.O_DIRECT:
            refused.append(path)
            raise OSError(errno.EINVAL, "Invalid argument")
        return real_open(path, flags, *args, **kw)

    monkeypatch.setattr(os, "open", no_direct)
    _fetch(hub, tmp_path / "blob.partial")
    assert refused  # the direct descriptor was asked for, and its refusal was not an error


def _direct_fds(monkeypatch) -> set[int]:
    """The descriptors the engine opens with O_DIRECT, collected as it opens them."""
    real_open, fds = os.open, set()

    def track(path, flags, *args, **kw):
        fd = real_open(path, flags, *args, **kw)
        if flags & os.O_DIRECT:
            fds.add(fd)
        return fd

    monkeypatch.setattr(os, "open", track)
    return fds


def test_o_direct_accepted_at_open_but_refused_at_write_falls_back(hub, tmp_path, monkeypatch):
    real_pwrite, direct_fds = os.pwrite, _direct_fds(monkeypatch)

    def refuse(fd, data, offset):
        if fd in direct_fds:
            raise OSError(errno.EINVAL, "Invalid argument")
        return real_pwrite(fd, data, offset)

    monkeypatch.setattr(os, "pwrite", refuse)
    _fetch(hub, tmp_path / "blob.partial")
    assert direct_fds


def test_o_direct_writes_the_aligned_part_and_buffers_the_tail(hub, tmp_path, monkeypatch):
    real_pwrite, direct_fds, writes = os.pwrite, _direct_fds(monkeypatch), []

    def record(fd, data, offset):
        writes.append((fd in direct_fds, offset, len(data)))
        return real_pwrite(fd, data, offset)

    monkeypatch.setattr(os, "pwrite", record)
    _fetch(hub, tmp_path / "blob.partial")
    _, info = _lfs_file(hub)
    aligned = info.size - info.size % 4096
    assert (True, 0, aligned) in writes and (False, aligned, info.size - aligned) in writes, writes


def test_large_files_at_once_share_one_buffer_budget(hub, tmp_path, monkeypatch):
    """With room for only 2 piece buffers in the process, 3 files fetched at once still all finish."""
    monkeypatch.setattr(concurrency, "BUFFER_BUDGET", threading.BoundedSemaphore(2))
    errors = []

    def one(n):
        try:
            _fetch(hub, tmp_path / f"blob-{n}.partial")
        except BaseException as e:  # noqa: BLE001
            errors.append(e)

    threads = [threading.Thread(target=one, args=(n,)) for n in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors and not any(t.is_alive() for t in threads)
    assert concurrency.BUFFER_BUDGET._value == 2  # every buffer given back


# -- the hash: named by the caller, not guessed -------------------------------------------------------------


def _git_sha1(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def test_the_caller_names_the_hash_a_small_file_is_checked_with(hub):
    files = hub.files_of("model", "demo-org/tiny-model")
    path, info = max(((p, f) for p, f in files.items() if f.sha256 is None), key=lambda kv: kv[1].size)
    url, http = f"{hub.url}/demo-org/tiny-model/resolve/main/{path}", Http({})
    data = fetch_small(http, url, size=info.size, expected=info.oid, algorithm="git")
    assert data == info.local.read_bytes() and _git_sha1(data) == info.oid
    with pytest.raises(HashMismatch):  # the same bytes under sha256 do not hash to the git blob sha1
        fetch_small(http, url, size=info.size, expected=info.oid, algorithm="sha256")
    asked = len(hub.log)
    with pytest.raises(ValueError, match="'sha1'"):  # not silently the git sha1, and before any request
        fetch_small(http, url, size=info.size, expected=info.oid, algorithm="sha1")  # type: ignore[arg-type]
    assert len(hub.log) == asked


def test_the_caller_names_the_hash_a_large_file_is_checked_with(hub, tmp_path):
    url, info = _lfs_file(hub)
    content, digests = info.local.read_bytes(), []
    partial = tmp_path / "blob.partial"
    fetch(Http({}), url, partial, size=info.size, expected=None, algorithm="git", on_digest=digests.append)
    assert digests == [_git_sha1(content)] and partial.read_bytes() == content
    partial.unlink()
    with pytest.raises(HashMismatch):  # the sha256 asked for, hashed as git: wrong, and nothing kept
        fetch(Http({}), url, partial, size=info.size, expected=info.sha256, algorithm="git")
    assert not partial.exists() and not Path(f"{partial}.ranges").exists()
    with pytest.raises(ValueError, match="'md5'"):
        fetch(Http({}), url, partial, size=info.size, expected=None, algorithm="md5")  # type: ignore[arg-type]
    assert not partial.exists()
