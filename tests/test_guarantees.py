"""Guarantees that once had no test failing when their code was broken (issue 22's surviving mutants):
a lost lease stops the commit, Retry-After and backoff are waited out, hostile revisions and lockfiles
are refused, hardlinked archive members count toward the unpacked-size limit."""
from __future__ import annotations

import io
import shutil
import tempfile
import json
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

from conftest import MID_MODEL
from helpers import client_env, hpcstage, sha256, wait_for
from hpcstage.hub import engine
from hpcstage.hub.pull import pull
from hpcstage.manifest import HubEntry
from hpcstage.options import Options
from hpcstage.errors import HpcstageError
from hpcstage.testing.hub import FaultRule, HubServer

REPO = MID_MODEL
REPO_DIR = "models--demo-org--mid-model"


def test_a_lease_lost_after_the_download_stops_the_commit(mid_hub, tmp_path, monkeypatch):
    """Another process took the blob's lease over while this one (stalled) finished its download: the bytes
    must not be committed under the blob's name, since the other may be writing the same partial."""
    for k, v in client_env(mid_hub, tmp_path / "h").items():
        monkeypatch.setenv(k, v)
    monkeypatch.setattr(engine, "LEASE_TTL", 0.9)  # heartbeat every 0.3 s: the loss is seen quickly
    leases: list = []

    class Recorded(engine.Lease):
        def __init__(self, *a, **kw):
            super().__init__(*a, **kw)
            leases.append(self)

    real_fetch = engine.fetch

    def fetch_then_lose_the_lease(*a, **kw):
        n = real_fetch(*a, **kw)
        lease = leases[-1]
        meta = json.loads(lease.path.read_text())
        tmp = lease.path.with_name("takeover.tmp")
        tmp.write_text(json.dumps({**meta, "token": "another-process"}))
        os.replace(tmp, lease.path)  # what a takeover by another node looks like to the holder
        wait_for(lambda: lease.lost, 10, "the heartbeat to notice the takeover")
        return n

    monkeypatch.setattr(engine, "Lease", Recorded)
    monkeypatch.setattr(engine, "fetch", fetch_then_lose_the_lease)
    cache = tmp_path / "cache"
    with pytest.raises(HpcstageError, match="lost"):
        pull([HubEntry(repo=REPO)], Options(cache_dir=cache, quiet=True))
    sha = mid_hub.files_of("model", REPO)["model.safetensors"].sha256
    assert not (cache / REPO_DIR / "blobs" / sha).exists()  # never committed
    assert not (cache / REPO_DIR / "snapshots").exists() or not any((cache / REPO_DIR / "snapshots").rglob("*.safetensors"))


def _resolves(log, name: str) -> list:
    """The `resolve` requests of one file (not the 307's follow-up into `/api/resolve-cache/`)."""
    return [r for r in log if "/resolve/" in r.path and r.path.endswith(name)]


def _gaps(log, name: str) -> list[float]:
    times = [r.time for r in _resolves(log, name)]
    return [b - a for a, b in zip(times, times[1:])]


def test_retry_after_is_waited_out(mid_hub, tmp_path):
    mid_hub.add_fault(FaultRule(path="resolve/.*config.json", status=503, retry_after=2, times=1))
    r = hpcstage("pull", REPO, "--cache-dir", str(tmp_path / "c"), "-q", env=client_env(mid_hub, tmp_path / "h"))
    assert r.returncode == 0, r.stderr
    tried = _resolves(mid_hub.log, "config.json")
    assert [x.status for x in tried] == [503, 307]  # the fault fired, then the retry succeeded
    assert _gaps(mid_hub.log, "config.json")[0] >= 1.9  # the server's 2 s, not an immediate retry


def test_errors_without_a_hint_back_off(mid_hub, tmp_path):
    mid_hub.add_fault(FaultRule(path="resolve/.*config.json", status=503, times=2))
    r = hpcstage("pull", REPO, "--cache-dir", str(tmp_path / "c"), "-q", env=client_env(mid_hub, tmp_path / "h"))
    assert r.returncode == 0, r.stderr
    assert [x.status for x in _resolves(mid_hub.log, "config.json")] == [503, 503, 307]
    first, second = _gaps(mid_hub.log, "config.json")
    assert first >= 0.45 and second >= 0.9  # exponential: about 1 s then 2 s (with jitter down to half)


@pytest.mark.parametrize("revision", ["/x", "x/", "a//b", "../main", "main.lock", "-x", "a b"])
def test_a_hostile_revision_is_refused_before_any_request(mid_hub, tmp_path, revision):
    cache = tmp_path / "c"
    r = hpcstage("pull", REPO, f"--revision={revision}", "--cache-dir", str(cache), env=client_env(mid_hub, tmp_path / "h"))
    assert r.returncode == 2 and "invalid revision" in r.stderr and "Traceback" not in r.stderr, r.stderr
    assert mid_hub.log == [] and not cache.exists()
    m = tmp_path / "hpcstage.yaml"
    m.write_text(f"cache_dir: c2\nmodels:\n  - repo: {REPO}\n    revision: {json.dumps(revision)}\n")
    r = hpcstage("pull", "-f", str(m), env=client_env(mid_hub, tmp_path / "h"))
    assert r.returncode == 2 and "revision" in r.stderr, r.stderr
    assert mid_hub.log == [] and not (tmp_path / "c2").exists()


@pytest.mark.parametrize("bad", ["../../../escaped", "/tmp/hpcstage-lock-escape", "a/../../b", "sub//x"])
def test_a_hostile_lockfile_path_is_refused_and_nothing_is_written(mid_hub, tmp_path, bad):
    m = tmp_path / "hpcstage.yaml"
    m.write_text(f"cache_dir: cache\nmodels:\n  - repo: {REPO}\n")
    env = client_env(mid_hub, tmp_path / "h")
    assert hpcstage("pull", "-f", str(m), "-q", env=env).returncode == 0
    lock = json.loads((tmp_path / "hpcstage.lock").read_text())
    [entry] = lock["entries"].values()
    entry["files"][0]["path"] = bad
    (tmp_path / "hpcstage.lock").write_text(json.dumps(lock))
    before = sorted(p.relative_to(tmp_path).as_posix() for p in tmp_path.rglob("*"))
    mid_hub.clear_log()
    r = hpcstage("pull", "-f", str(m), "-q", env=env)
    assert r.returncode == 2 and "lockfile" in r.stderr and "Traceback" not in r.stderr, r.stderr
    assert mid_hub.log == []
    assert sorted(p.relative_to(tmp_path).as_posix() for p in tmp_path.rglob("*")) == before
    assert not Path("/tmp/hpcstage-lock-escape").exists()


def test_hardlinked_members_count_toward_the_unpacked_size_limit(tmp_path):
    from hpcstage.archive import ArchiveError, Limits, extract_into

    a = tmp_path / "links.tar"
    data = os.urandom(1 << 20)
    with tarfile.open(a, "w") as tf:
        info = tarfile.TarInfo("one.bin")
        info.size = len(data)
        tf.addfile(info, io.BytesIO(data))
        for i in range(9):  # 10 MiB once unpacked (each link is a full file to whoever reads it)
            link = tarfile.TarInfo(f"link-{i}.bin")
            link.type, link.linkname = tarfile.LNKTYPE, "one.bin"
            tf.addfile(link)
    out = tmp_path / "out"
    out.mkdir()
    with pytest.raises(ArchiveError, match="unpacks to more than"):
        extract_into(a, out, limits=Limits(max_bytes=5 << 20))
    out2 = tmp_path / "out2"
    out2.mkdir()
    got = extract_into(a, out2, limits=Limits(max_bytes=11 << 20))
    assert got.bytes == 10 << 20 and sha256(out2 / "link-8.bin") == sha256(out2 / "one.bin")


PROBE = """\
import json, os, socket, sys
if sys.argv[:1] != ["-m"]:  # every child of the CLI, not the CLI itself
    try:
        socket.create_connection(("127.0.0.1", {port}), timeout=3).close()
        reached = True
    except OSError:
        reached = False
    flags = [os.environ.get(k) for k in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE")]
    with open({out!r}, "a") as f:
        f.write(json.dumps({{"argv0": sys.argv[0], "reached": reached, "flags": flags}}) + "\\n")
"""


def test_the_check_child_has_no_network_and_the_offline_flags(hub, tmp_path):
    """Asserted from inside the child (it tries a connection to a listening socket and reads its own
    environment) and from outside (the listener accepts nothing)."""
    import socket
    import threading

    listener = socket.create_server(("127.0.0.1", 0))
    accepted: list = []
    threading.Thread(target=lambda: accepted.append(listener.accept()), daemon=True).start()
    site, out = tmp_path / "site", tmp_path / "probe.jsonl"
    site.mkdir()
    (site / "sitecustomize.py").write_text(PROBE.format(port=listener.getsockname()[1], out=str(out)))
    m = tmp_path / "hpcstage.yaml"
    m.write_text("cache_dir: cache\nmodels:\n  - repo: demo-org/tiny-model\n")
    env = client_env(hub, tmp_path / "h")
    assert hpcstage("pull", "-f", str(m), "-q", env=env).returncode == 0
    r = hpcstage("check", "-f", str(m), env={**env, "PYTHONPATH": str(site)})
    assert r.returncode == 0, r.stdout + r.stderr
    children = [json.loads(line) for line in out.read_text().splitlines()]
    assert children, "the check ran no child process"
    assert all(c["reached"] is False for c in children), children
    assert all(c["flags"] == ["1", "1", "1"] for c in children), children
    assert accepted == []
    listener.close()


# -- states and paths no test used to reach


def test_update_follows_main_when_it_moves(sample_root, tmp_path):
    root = tmp_path / "root"
    shutil.copytree(sample_root / "models" / "demo-org" / "tiny-model", root / "models" / "demo-org" / "tiny-model")
    m = tmp_path / "proj" / "hpcstage.yaml"
    m.parent.mkdir()
    m.write_text("cache_dir: cache\nmodels:\n  - repo: demo-org/tiny-model\n    include: ['*.json']\n")
    with HubServer(root) as server:
        env = client_env(server, tmp_path / "h")
        assert hpcstage("pull", "-f", str(m), "-q", env=env).returncode == 0
        first = server.commit_of("model", "demo-org/tiny-model")
        lock = lambda: next(iter(json.loads((m.parent / "hpcstage.lock").read_text())["entries"].values()))  # noqa: E731
        assert lock()["commit"] == first
        (root / "models" / "demo-org" / "tiny-model" / "config.json").write_text('{"model_type": "moved"}\n')
        server.refresh()
        moved = server.commit_of("model", "demo-org/tiny-model")
        assert moved != first
        server.clear_log()
        assert hpcstage("pull", "-f", str(m), "-q", env=env).returncode == 0
        assert lock()["commit"] == first and server.log == []  # pinned: no request, nothing moves
        assert hpcstage("pull", "-f", str(m), "-q", "--update", env=env).returncode == 0
        assert lock()["commit"] == moved
    repo = m.parent / "cache" / "models--demo-org--tiny-model"
    assert (repo / "refs" / "main").read_text() == moved
    assert json.loads((repo / "snapshots" / moved / "config.json").read_text()) == {"model_type": "moved"}
    assert json.loads((repo / "snapshots" / first / "config.json").read_text()) != {"model_type": "moved"}


def _status(m: Path, env: dict) -> dict:
    r = hpcstage("status", "-f", str(m), "--json", env=env)
    assert r.returncode == 1 and "Traceback" not in r.stderr, r.stderr  # 1: not everything is staged
    [row] = [x for x in json.loads(r.stdout) if x["repo"] == REPO]
    return row


def test_status_shows_locked_while_a_pull_runs_and_partial_after_it_is_killed(mid_hub, tmp_path):
    import signal

    from helpers import pieces_done

    m = tmp_path / "hpcstage.yaml"
    m.write_text(f"cache_dir: cache\nmodels:\n  - repo: {REPO}\n")
    env = client_env(mid_hub, tmp_path / "h")
    # the first piece arrives, every later request stalls: the pull holds its lease for as long as the test
    # needs (no race between the download and `status`, however loaded the machine)
    mid_hub.add_fault(FaultRule(path=r"/lfs/", server="cdn", method="GET", times=1))
    mid_hub.add_fault(FaultRule(path=r"/lfs/", server="cdn", method="GET", stall=True))
    sha = mid_hub.files_of("model", REPO)["model.safetensors"].sha256
    record = tmp_path / "cache" / REPO_DIR / "blobs" / f"{sha}.hpcstage-partial.ranges"
    # one stream: the first piece is the first GET
    proc = subprocess.Popen([sys.executable, "-m", "hpcstage", "pull", "-f", str(m), "-q", "--max-connections", "1"],
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        wait_for(lambda: pieces_done(record) >= 1, 60, "a first piece on disk")
        row = _status(m, env)
        assert row["state"] == "locked" and row["locked_by"], row
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    row = _status(m, env)  # the holder is dead: its lease does not count
    assert row["state"] == "partial" and 0 < row["partial_percent"] < 100 and not row["locked_by"], row


def test_a_local_copy_across_filesystems_is_read_back_and_independent_of_its_source(tmp_path):
    shm = Path("/dev/shm")
    if not shm.is_dir() or os.stat(shm).st_dev == os.stat(tmp_path).st_dev:
        pytest.fail("needs /dev/shm on another filesystem than the test folder (a tmpfs on Linux)")
    src = Path(tempfile.mkdtemp(dir=shm, prefix="hpcstage-src-"))
    try:
        (src / "a.txt").write_text("original\n")
        m = tmp_path / "hpcstage.yaml"
        m.write_text(f"data_dir: data\ndatasets:\n  - local: {src}\n    dest: copy\n")
        env = {k: v for k, v in os.environ.items() if not k.startswith("HF_")}
        env["HF_HUB_CACHE"] = str(tmp_path / "cache")
        r = hpcstage("pull", "-f", str(m), "--json", env=env)
        assert r.returncode == 0, r.stderr
        copy = tmp_path / "data" / "copy" / "a.txt"
        assert copy.read_text() == "original\n"
        assert os.stat(copy).st_ino != os.stat(src / "a.txt").st_ino  # a real copy, not a link
        (src / "a.txt").write_text("edited in place\n")
        assert copy.read_text() == "original\n"  # editing the source does not edit the staged copy
        r = hpcstage("pull", "-f", str(m), "-q", env=env)  # the source changed: copied again
        assert r.returncode == 0, r.stderr
        assert copy.read_text() == "edited in place\n"
    finally:
        shutil.rmtree(src, ignore_errors=True)
