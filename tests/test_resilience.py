"""Crash-safety, concurrency and faults: kill -9, many processes, dead leases, the fault matrix, status
and cleanup. Each case ends byte-exact or with a clear error, never a wrong file under a final name."""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import BIG_MODEL, GIB_MODEL
from helpers import client_env, pieces_done, sha256, wait_for
from hpcstage.locks import Lease
from hpcstage.testing.hub import FaultRule
from hpcstage.transfer import PIECE

MODEL = "demo-org/tiny-model"


def pull_cmd(repo: str, cache: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "hpcstage", "pull", repo, "--cache-dir", str(cache), "-q", *extra]


def run(repo, cache, server, *extra, timeout=180, **env_extra) -> subprocess.CompletedProcess:
    return subprocess.run(pull_cmd(repo, cache, *extra), env=client_env(server, cache, **env_extra),
                          capture_output=True, text=True, timeout=timeout)


def cdn_bytes(server, since: float = 0.0) -> int:
    """Content bytes the CDN sent for requests that arrived after `since` (time.time())."""
    return sum(rec.bytes_sent for rec in server.log if rec.server == "cdn" and rec.method == "GET" and rec.time >= since)



def assert_blobs_are_their_hash(cache: Path) -> None:
    """Every blob under its final name holds the bytes its name promises (sha256 or git sha1)."""
    for blob in cache.glob("*/blobs/*"):
        if "." in blob.name:
            continue  # partials, records, leases
        data = blob.read_bytes()
        if len(blob.name) == 64:
            assert hashlib.sha256(data).hexdigest() == blob.name, blob
        else:
            assert hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest() == blob.name, blob


def test_kill_9_half_way_through_1_gib_resumes_without_refetching(gib_hub, tmp_path):
    cache = tmp_path / "cache"
    info = gib_hub.files_of("model", GIB_MODEL)["model.safetensors"]
    blobs = cache / "models--demo-org--gib-model" / "blobs"
    record = blobs / f"{info.sha256}.hpcstage-partial.ranges"
    gib_hub.add_fault(FaultRule(path=r"/lfs/", server="cdn", rate=60_000_000))  # ~4 s with 4 connections
    proc = subprocess.Popen(pull_cmd(GIB_MODEL, cache), env=client_env(gib_hub, cache))
    total = -(-info.size // PIECE)
    wait_for(lambda: pieces_done(record) >= total // 2, 120, "half of the pieces")
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    gib_hub.clear_faults()
    since = time.time()
    r = run(GIB_MODEL, cache, gib_hub)
    assert r.returncode == 0, r.stderr
    first, second = cdn_bytes(gib_hub) - cdn_bytes(gib_hub, since), cdn_bytes(gib_hub, since)
    assert second <= 0.6 * info.size, (first, second)
    assert sha256(blobs / info.sha256) == info.sha256
    assert not list(blobs.glob("*.hpcstage-*"))


def test_six_processes_pulling_one_1_gib_repo_fetch_it_about_once(gib_hub, tmp_path):
    cache = tmp_path / "cache"
    info = gib_hub.files_of("model", GIB_MODEL)["model.safetensors"]
    gib_hub.add_fault(FaultRule(path=r"/lfs/", server="cdn", rate=100_000_000))
    env = client_env(gib_hub, cache)
    procs = [subprocess.Popen(pull_cmd(GIB_MODEL, cache), env=env, stderr=subprocess.PIPE, text=True)
             for _ in range(6)]
    for p in procs:
        assert p.wait(timeout=300) == 0, p.stderr.read()
    assert cdn_bytes(gib_hub) <= 1.15 * info.size
    assert sha256(cache / "models--demo-org--gib-model" / "blobs" / info.sha256) == info.sha256


def test_lease_of_a_vanished_node_expires_and_is_taken_over(big_hub, tmp_path):
    cache = tmp_path / "cache"
    info = big_hub.files_of("model", BIG_MODEL)["model.safetensors"]
    blobs = cache / "models--demo-org--big-model" / "blobs"
    blobs.mkdir(parents=True)
    lease = blobs / f"{info.sha256}.hpcstage-lease"
    lease.write_text(json.dumps({"host": "node-gone.example", "pid": 4242, "token": "x", "created": 0, "ttl": 60}))
    old = time.time() - 3600
    os.utime(lease, (old, old))
    r = run(BIG_MODEL, cache, big_hub)
    assert r.returncode == 0, r.stderr
    assert sha256(blobs / info.sha256) == info.sha256


def test_a_live_lease_makes_others_wait_then_link(big_hub, tmp_path):
    """While another process holds the blob's lease, pull works on the other files and waits, fetching
    nothing twice; when the holder releases without finishing, the waiter fetches it itself."""
    cache = tmp_path / "cache"
    info = big_hub.files_of("model", BIG_MODEL)["model.safetensors"]
    blobs = cache / "models--demo-org--big-model" / "blobs"
    holder = Lease(blobs / f"{info.sha256}.hpcstage-lease", ttl=30)
    assert holder.try_acquire()
    proc = subprocess.Popen(pull_cmd(BIG_MODEL, cache), env=client_env(big_hub, cache),
                            stderr=subprocess.PIPE, text=True)
    wait_for(lambda: any("config.json" in rec.path for rec in big_hub.log), 30, "the small file")
    time.sleep(1.0)
    assert cdn_bytes(big_hub) == 0 and proc.poll() is None  # waiting on the lease, not fetching
    holder.release()
    assert proc.wait(timeout=60) == 0, proc.stderr.read()
    assert cdn_bytes(big_hub) == info.size


@pytest.mark.parametrize(
    "name, rule, extra, outcome",
    [
        ("503 on repo info", FaultRule(path="/revision/", status=503, retry_after=0, times=2), (), "ok"),
        ("429 on tree, Retry-After", FaultRule(path="/tree/", status=429, retry_after=1, times=1), (), "ok"),
        ("503 on content (hub)", FaultRule(path="/resolve/", server="hub", method="GET", status=503, retry_after=0, times=3), (), "ok"),
        ("429 on content (cdn)", FaultRule(path="/lfs/", server="cdn", status=429, retry_after=0, times=2), (), "ok"),
        ("500 forever on repo info", FaultRule(path="/revision/", status=500, retry_after=0), ("--retry-budget", "2"), "gave up"),
        ("connection reset before headers", FaultRule(path="/resolve/", server="hub", reset=True, times=2), (), "ok"),
        ("connection dropped mid-body", FaultRule(path="/lfs/", server="cdn", drop_after=100_000, times=2), (), "ok"),
        ("throttled", FaultRule(path="/lfs/", server="cdn", rate=30_000_000), (), "ok"),
        ("wrong bytes once", FaultRule(path="/lfs/", server="cdn", corrupt=True, times=1), (), "ok"),
        ("wrong bytes always", FaultRule(path="/lfs/", server="cdn", corrupt=True), (), "hash mismatch"),
        ("stalled metadata", FaultRule(path="/api/", stall=True), ("--timeout", "1", "--retry-budget", "2"), "Timeout"),
        ("stalled content once", FaultRule(path="/lfs/", server="cdn", stall=True, times=1), ("--timeout", "1"), "ok"),
        ("slow answer", FaultRule(path="/revision/", delay=1.5), (), "ok"),
    ],
)
def test_fault_matrix(big_hub, tmp_path, name, rule, extra, outcome):
    cache = tmp_path / "cache"
    big_hub.add_fault(rule)
    started = time.monotonic()
    r = run(BIG_MODEL, cache, big_hub, *extra, timeout=120)
    assert "Traceback" not in r.stderr
    if outcome == "ok":
        assert r.returncode == 0, r.stderr
        info = big_hub.files_of("model", BIG_MODEL)["model.safetensors"]
        blob = cache / "models--demo-org--big-model" / "blobs" / info.sha256
        assert sha256(blob) == info.sha256
    else:
        assert r.returncode == 1 and outcome in r.stderr, r.stderr
        assert len(r.stderr.strip().splitlines()) == 1, r.stderr
        assert time.monotonic() - started < 60
    if cache.exists():
        assert_blobs_are_their_hash(cache)


@pytest.fixture
def small_fs(tmp_path):
    """A 300 MiB tmpfs (root only): a real full disk."""
    if os.geteuid() != 0 or not shutil.which("mount"):
        pytest.skip("mounting a small filesystem needs root")
    mnt = tmp_path / "small"
    mnt.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=300m", "tmpfs", str(mnt)], capture_output=True, text=True)
    if r.returncode != 0:
        pytest.skip(f"cannot mount tmpfs here: {r.stderr.strip()}")
    yield mnt
    subprocess.run(["umount", "-l", str(mnt)])


def test_not_enough_space_is_refused_before_any_download(big_hub, small_fs):
    filler = small_fs / "filler"
    with open(filler, "wb") as f:
        f.truncate(0)
        os.posix_fallocate(f.fileno(), 0, 250 << 20)
    r = run(BIG_MODEL, small_fs / "cache", big_hub)
    assert r.returncode == 1 and "not enough space" in r.stderr and "free" in r.stderr, r.stderr
    assert cdn_bytes(big_hub) == 0


def fill(path: Path) -> None:
    """Write zeros until the filesystem says it is full."""
    block = bytes(1 << 20)
    with open(path, "wb", buffering=0) as f:
        try:
            while True:
                f.write(block)
        except OSError as e:
            assert e.errno == 28, e


def test_disk_full_mid_file_keeps_the_partial_and_resumes(big_hub, small_fs):
    cache = small_fs / "cache"
    big_hub.add_fault(FaultRule(path=r"/lfs/", server="cdn", rate=10_000_000))  # 4 connections: ~2.5 s
    proc = subprocess.Popen(pull_cmd(BIG_MODEL, cache), env=client_env(big_hub, cache),
                            stderr=subprocess.PIPE, text=True)
    info = big_hub.files_of("model", BIG_MODEL)["model.safetensors"]
    blobs = cache / "models--demo-org--big-model" / "blobs"
    record = blobs / f"{info.sha256}.hpcstage-partial.ranges"
    wait_for(lambda: pieces_done(record) >= 1, 60, "a first piece on disk (the download is under way)")
    filler = small_fs / "filler"
    fill(filler)
    assert proc.wait(timeout=60) == 1
    err = proc.stderr.read()
    assert "full" in err and "partial file is kept" in err and "Traceback" not in err, err
    assert not (blobs / info.sha256).exists()
    filler.unlink()
    big_hub.clear_faults()
    since = time.time()
    r = run(BIG_MODEL, cache, big_hub)
    assert r.returncode == 0, r.stderr
    assert cdn_bytes(big_hub, since) < info.size  # the pieces written before the disk filled were kept
    assert sha256(blobs / info.sha256) == info.sha256


def test_sigterm_stops_promptly_and_the_next_run_resumes(big_hub, tmp_path):
    cache = tmp_path / "cache"
    info = big_hub.files_of("model", BIG_MODEL)["model.safetensors"]
    blobs = cache / "models--demo-org--big-model" / "blobs"
    big_hub.add_fault(FaultRule(path=r"/lfs/", server="cdn", rate=5_000_000))
    proc = subprocess.Popen(pull_cmd(BIG_MODEL, cache), env=client_env(big_hub, cache),
                            stderr=subprocess.PIPE, text=True)
    wait_for(lambda: pieces_done(blobs / f"{info.sha256}.hpcstage-partial.ranges") >= 1, 60, "one piece")
    proc.send_signal(signal.SIGTERM)
    started = time.monotonic()
    assert proc.wait(timeout=30) == 143
    assert time.monotonic() - started < 10
    record = json.loads((blobs / f"{info.sha256}.hpcstage-partial.ranges").read_text())
    kept = sum(min(info.size, (i + 1) * PIECE) - i * PIECE for i in record["done"])
    assert "run the same command again" in proc.stderr.read()
    assert not (blobs / f"{info.sha256}.hpcstage-lease").exists()  # released on the way out
    big_hub.clear_faults()
    since = time.time()
    r = run(BIG_MODEL, cache, big_hub)
    assert r.returncode == 0, r.stderr
    assert kept > 0 and cdn_bytes(big_hub, since) == info.size - kept
    assert sha256(blobs / info.sha256) == info.sha256


def test_status_names_staged_partial_and_failed(big_hub, tmp_path):
    cache = tmp_path / "cache"
    manifest = tmp_path / "hpcstage.yaml"
    manifest.write_text(f"cache_dir: cache\nmodels:\n  - repo: {BIG_MODEL}\n")
    env = client_env(big_hub, cache)
    big_hub.add_fault(FaultRule(path=r"/lfs/", server="cdn", corrupt=True))
    r = subprocess.run([sys.executable, "-m", "hpcstage", "pull", "-f", str(manifest), "-q"], env=env,
                       capture_output=True, text=True)
    assert r.returncode == 1
    st = subprocess.run([sys.executable, "-m", "hpcstage", "status", "--cache-dir", str(cache), "--json"],
                        env=env, capture_output=True, text=True)
    assert st.returncode == 1
    (row,) = json.loads(st.stdout)
    assert row["state"] == "failed" and "hash mismatch" in row["reason"]
    big_hub.clear_faults()
    assert subprocess.run([sys.executable, "-m", "hpcstage", "pull", "-f", str(manifest), "-q"], env=env).returncode == 0
    st = subprocess.run([sys.executable, "-m", "hpcstage", "status", "-f", str(manifest)], env=env,
                        capture_output=True, text=True)
    assert st.returncode == 0 and "\tstaged\t2/2 files" in st.stdout, st.stdout


def test_cleanup_removes_dead_leftovers_and_keeps_live_ones(tmp_path):
    blobs = tmp_path / "cache" / "models--org--m" / "blobs"
    blobs.mkdir(parents=True)
    old = time.time() - 48 * 3600
    dead = blobs / ("a" * 64 + ".hpcstage-lease")
    dead.write_text(json.dumps({"host": "gone.example", "pid": 1, "token": "t", "created": 0, "ttl": 60}))
    os.utime(dead, (old, old))
    abandoned = blobs / ("a" * 64 + ".hpcstage-partial")
    abandoned.write_bytes(b"x" * 10)
    Path(str(abandoned) + ".ranges").write_text("{}")
    os.utime(abandoned, (old, old))
    live = Lease(blobs / ("b" * 64 + ".hpcstage-lease"), ttl=60)
    assert live.try_acquire()
    guarded = blobs / ("b" * 64 + ".hpcstage-partial")
    guarded.write_bytes(b"y")
    os.utime(guarded, (old, old))
    fresh = blobs / ("c" * 64 + ".hpcstage-partial")
    fresh.write_bytes(b"z")
    cmd = [sys.executable, "-m", "hpcstage", "cleanup", "--cache-dir", str(tmp_path / "cache")]
    dry = subprocess.run([*cmd, "--dry-run"], capture_output=True, text=True)
    assert dry.returncode == 0 and dead.exists() and abandoned.exists() and "would remove" in dry.stdout
    r = subprocess.run(cmd, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert not dead.exists() and not abandoned.exists() and not Path(str(abandoned) + ".ranges").exists()
    assert live.held and (blobs / ("b" * 64 + ".hpcstage-lease")).exists() and guarded.exists() and fresh.exists()
    live.release()


def test_hf_download_and_hpcstage_share_one_cache(big_hub, tmp_path):
    """huggingface_hub's own writer and ours, on one cache at once: both finish, blobs are right."""
    cache = tmp_path / "cache"
    env = client_env(big_hub, cache, HF_HUB_CACHE=str(cache))
    code = f"from huggingface_hub import snapshot_download; print(snapshot_download({BIG_MODEL!r}))"
    hf = subprocess.Popen([sys.executable, "-c", code], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    ours = subprocess.Popen(pull_cmd(BIG_MODEL, cache), env=env, stderr=subprocess.PIPE, text=True)
    assert ours.wait(timeout=120) == 0, ours.stderr.read()
    out, err = hf.communicate(timeout=120)
    assert hf.returncode == 0, err
    info = big_hub.files_of("model", BIG_MODEL)["model.safetensors"]
    snap = Path(out.strip().splitlines()[-1])
    assert sha256(snap / "model.safetensors") == info.sha256
    assert_blobs_are_their_hash(cache)


def test_cleanup_sweeps_the_data_folder_too(tmp_path):
    """Abandoned URL partials and half-built data folders go; one whose builder is alive stays."""
    data = tmp_path / "hpcstage-data"
    downloads = data / ".hpcstage" / "downloads"
    downloads.mkdir(parents=True)
    old = time.time() - 48 * 3600
    partial = downloads / "0123abcd-v1.hpcstage-partial"
    partial.write_bytes(b"x")
    os.utime(partial, (old, old))
    gone = data / ".websight.1a2b3c4d.hpcstage-build"
    kept = data / ".other.5e6f7a8b.hpcstage-build"
    for folder in (gone, kept):
        (folder / "images").mkdir(parents=True)
        os.utime(folder, (old, old))
    builder = Lease(data / ".hpcstage" / "locks" / "other.hpcstage-lease", ttl=60)
    assert builder.try_acquire()
    r = subprocess.run([sys.executable, "-m", "hpcstage", "cleanup", "--cache-dir", str(tmp_path / "hub")],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert not partial.exists() and not gone.exists() and kept.exists(), r.stdout
    builder.release()
