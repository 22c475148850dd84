"""Large files fill the pipe: as many range streams as raise the throughput, no more (issue #18).

The emulator caps each connection's rate (`conn_rate`, as a CDN or one TCP stream over a long path does)
and counts the connections each listener held open at once (`peak_connections`): the CDN listener's peak
is the stream count the client used for its large file.
"""
from __future__ import annotations

import hashlib
import json
import os
import random
from pathlib import Path

import pytest
from conftest import BIG_MODEL, GIB_MODEL, MID_MODEL
from helpers import client_env, hpcstage, sha256

from hpcstage.testing.hub import FaultRule, HubServer
from hpcstage.transfer.concurrency import MIN_WINDOW, START, Streams
from hpcstage.transfer import PIECE


def _blob(cache: Path, repo: str, info) -> Path:
    return cache / f"models--{repo.replace('/', '--')}" / "blobs" / info.sha256


def _pull(server, cache: Path, repo: str, *extra: str):
    return hpcstage("pull", repo, "--cache-dir", cache, "-q", *extra, env=client_env(server, cache))


def test_a_capped_link_gets_more_streams_and_an_uncapped_one_keeps_few(gib_hub, tmp_path):
    info = gib_hub.files_of("model", GIB_MODEL)["model.safetensors"]
    r = _pull(gib_hub, tmp_path / "fast", GIB_MODEL)
    assert r.returncode == 0, r.stderr
    assert sha256(_blob(tmp_path / "fast", GIB_MODEL, info)) == info.sha256
    uncapped = gib_hub.peak_connections["cdn"]
    # loopback: more streams than the first START (and one probe of twice as many) add nothing
    assert uncapped <= 2 * START + 2, uncapped

    with HubServer(gib_hub.root) as capped:
        capped.conn_rate = 10e6  # 10 MB/s per connection: each stream added carries as much again
        r = _pull(capped, tmp_path / "capped", GIB_MODEL)
        assert r.returncode == 0, r.stderr
        assert sha256(_blob(tmp_path / "capped", GIB_MODEL, info)) == info.sha256
        streams = capped.peak_connections["cdn"]
    assert streams >= 3 * START, (streams, uncapped)  # doubled at least twice


def test_max_connections_bounds_the_streams(mid_hub, tmp_path):
    info = mid_hub.files_of("model", MID_MODEL)["model.safetensors"]
    mid_hub.conn_rate = 20e6
    r = _pull(mid_hub, tmp_path / "c", MID_MODEL, "--max-connections", "2")
    assert r.returncode == 0, r.stderr
    assert sha256(_blob(tmp_path / "c", MID_MODEL, info)) == info.sha256
    assert mid_hub.peak_connections["cdn"] <= 2


@pytest.fixture
def mixed_hub(tmp_path, big_root):
    """A model repo as it usually is: one large LFS file beside 120 small configs and shards of text."""
    root = tmp_path / "served"
    repo = root / "models" / "demo-org" / "mixed"
    repo.mkdir(parents=True)
    os.link(big_root / "models" / BIG_MODEL / "model.safetensors", repo / "model.safetensors")  # no copy
    rng = random.Random(5)
    for i in range(120):
        (repo / f"text-{i // 40}" / f"part-{i:03d}.txt").parent.mkdir(exist_ok=True)
        (repo / f"text-{i // 40}" / f"part-{i:03d}.txt").write_bytes(rng.randbytes(2000 + 37 * i).hex().encode())
    with HubServer(root) as server:
        yield server


def test_a_mixed_repo_on_a_capped_link_moves_small_and_large_files_at_once(mixed_hub, tmp_path):
    """The small files' in-flight control and the large file's stream control share one link without
    starving each other: both run at once, the large file still gets more streams, every byte is right."""
    mixed_hub.conn_rate = 10e6
    mixed_hub.add_fault(FaultRule(path="", delay=0.02))  # a distant Hub: every answer 20 ms late
    cache = tmp_path / "c"
    r = _pull(mixed_hub, cache, "demo-org/mixed")
    assert r.returncode == 0, r.stderr
    files = mixed_hub.files_of("model", "demo-org/mixed")
    snapshot = next((cache / "models--demo-org--mixed" / "snapshots").iterdir())
    for path, f in files.items():
        data = (snapshot / path).read_bytes()
        digest = hashlib.sha256(data).hexdigest() if f.sha256 else \
            hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()
        assert digest == f.etag, path
    log = mixed_hub.log
    ranges = [rec for rec in log if rec.server == "cdn" and rec.method == "GET"]
    first, last = min(rec.time for rec in ranges), max(rec.time + rec.duration for rec in ranges)
    small = [rec for rec in log if rec.server == "hub" and "/resolve-cache/" in rec.path]
    assert len(small) == 120
    during = [rec for rec in small if first < rec.time < last]
    assert len(during) >= 10, (len(during), first, last)  # small files kept coming while the large one ran
    events = sorted([(rec.time, 1) for rec in small] + [(rec.time + rec.duration, -1) for rec in small])
    most = now = 0
    for _, step in events:
        now += step
        most = max(most, now)
    assert most >= 3  # the 20 ms waits called for several small files at once
    assert mixed_hub.peak_connections["cdn"] >= 2 * START  # and the large file for more streams


def test_a_resume_record_with_another_piece_size_is_continued(big_hub, tmp_path):
    """A partial left by a version with twice the piece size: the pieces its segments cover are kept."""
    info = big_hub.files_of("model", BIG_MODEL)["model.safetensors"]
    cache = tmp_path / "c"
    blobs = cache / "models--demo-org--big-model" / "blobs"
    blobs.mkdir(parents=True)
    data = info.local.read_bytes()
    segment = 2 * PIECE
    partial = blobs / f"{info.sha256}.hpcstage-partial"
    partial.write_bytes(data[:2 * segment] + bytes(info.size - 2 * segment))
    Path(f"{partial}.ranges").write_text(json.dumps({"size": info.size, "segment": segment, "done": [0, 1]}))
    r = _pull(big_hub, cache, BIG_MODEL)
    assert r.returncode == 0, r.stderr
    sent = sum(rec.bytes_sent for rec in big_hub.log if rec.server == "cdn" and rec.method == "GET")
    assert sent == info.size - 2 * segment
    assert sha256(blobs / info.sha256) == info.sha256


def test_serve_refuses_a_rate_or_latency_that_is_not_positive(tmp_path):
    for flag in ("--conn-rate-mb", "--latency-ms"):
        r = hpcstage("serve", tmp_path, "--port", "0", flag, "0", env=dict(os.environ))
        assert r.returncode == 2 and f"{flag} 0: give a number above 0" in r.stderr, r.stderr


# -- the controller's decisions, on rates it is told ------------------------------------------------


class Clock:
    def __init__(self):
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def _run(streams: Streams, clock: Clock, per_stream: float, total: float | None, windows: int,
         hasher_waits: bool | None = None) -> list[int]:
    """Feed the controller what a link gives (`per_stream` bytes/s per stream, at most `total` in all) in
    steps of a tenth of a window; the count after each step. `hasher_waits`: each step, a file's hasher
    also takes a piece, having waited for it (True) or found it there (False); None: no hasher reports."""
    counts = []
    streams.piece_done(0.05)
    for _ in range(windows * 40):
        rate = streams.limit * per_stream if total is None else min(total, streams.limit * per_stream)
        clock.now += MIN_WINDOW / 10
        if hasher_waits is not None:
            streams.hashed(hasher_waits)
        streams.moved(int(rate * MIN_WINDOW / 10))
        counts.append(streams.limit)
    return counts


def test_streams_double_while_each_carries_its_share_and_stop_at_the_plateau():
    clock = Clock()
    s = Streams(32, buffers=32, clock=clock)
    s.join("file", lambda: None)
    counts = _run(s, clock, per_stream=40e6, total=380e6, windows=30)
    assert START in counts and 2 * START in counts and 4 * START in counts  # 4 -> 8 -> 16 ...
    # 16 add a sixth to 8's 320 MB/s: back to 8; a quarter more (10) fills the 380 MB/s, 12 adds nothing
    assert counts[-1] == 10 and not s.growing


def test_streams_stay_at_the_start_when_more_add_nothing():
    clock = Clock()
    s = Streams(32, buffers=32, clock=clock)
    s.join("file", lambda: None)
    counts = _run(s, clock, per_stream=1e9, total=1e9, windows=8)
    assert max(counts) == 2 * START and counts[-1] in (START, START + 1)  # held, or probing one more


def test_streams_hold_while_the_hash_and_not_the_link_is_behind():
    # every stream added would carry 40 MB/s more, but the hasher never waits for a piece: the CPU, not the
    # link, sets the rate (loopback, a fast LAN), so no stream is added
    clock = Clock()
    s = Streams(32, buffers=40, clock=clock)
    s.join("file", lambda: None)
    counts = _run(s, clock, per_stream=40e6, total=None, windows=20, hasher_waits=False)
    assert set(counts) == {START} and not s.growing
    # the hasher starts waiting (the link is behind now): the count probes upwards again
    counts = _run(s, clock, per_stream=40e6, total=None, windows=30, hasher_waits=True)
    assert counts[-1] > START
    # the same link with a hasher that waits from the start: doubles to the bound as before
    clock = Clock()
    s = Streams(32, buffers=40, clock=clock)
    s.join("file", lambda: None)
    assert max(_run(s, clock, per_stream=40e6, total=None, windows=10, hasher_waits=True)) == 32


def test_streams_are_bounded_by_max_connections_and_the_buffers():
    clock = Clock()
    s = Streams(6, buffers=32, clock=clock)
    s.join("file", lambda: None)
    assert max(_run(s, clock, per_stream=40e6, total=None, windows=10)) == 6
    clock = Clock()
    s = Streams(32, buffers=12, clock=clock)
    s.join("a", lambda: None)
    s.join("b", lambda: None)
    assert max(_run(s, clock, per_stream=40e6, total=None, windows=10)) == 12 - 2 * 2  # two buffers per file


def test_trouble_halves_the_streams_once_per_window():
    clock = Clock()
    s = Streams(32, buffers=40, clock=clock)
    s.join("file", lambda: None)
    _run(s, clock, per_stream=40e6, total=None, windows=10)
    assert s.limit == 32
    s.trouble()
    s.trouble()  # the same burst of errors: one halving
    assert s.limit == 16 and not s.growing


def test_streams_are_shared_fairly_between_large_files():
    s = Streams(32, buffers=40)
    woken = []
    for name in "abc":
        s.join(name, lambda name=name: woken.append(name))
    s.limit = 16
    shares = [s.share(name) for name in "abc"]
    assert sum(shares) == 16 and max(shares) - min(shares) <= 1
    woken.clear()
    s.leave("b")
    assert s.share("a") + s.share("c") == 16 and "a" in woken and "c" in woken
