"""`hpcstage verify`: offline hashing against the lockfile and trees/<commit>.json, and `--repair`."""
from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from hpcstage import verification as verify_mod
from hpcstage.hfcache import HASH_BUF
from helpers import client_env, hpcstage, sha256

MODEL, DATASET = "demo-org/tiny-model", "demo-org/tiny-dataset"
MANIFEST = "cache_dir: cache\nmodels:\n  - repo: demo-org/tiny-model\ndatasets:\n  - repo: demo-org/tiny-dataset\n"
MODEL_DIR, DATASET_DIR = "models--demo-org--tiny-model", "datasets--demo-org--tiny-dataset"


def flip_byte(path: Path, offset: int) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0xFF
    path.write_bytes(bytes(data))


def problems(stdout: str) -> set[tuple[str, str, str]]:
    return {(p["kind"], p["repo_id"], p["path"]) for p in json.loads(stdout)["problems"]}


def staged(tmp_path: Path, hub) -> tuple[Path, dict]:
    (tmp_path / "hpcstage.yaml").write_text(MANIFEST)
    env = client_env(hub, tmp_path / "unused")
    r = hpcstage("pull", "-f", str(tmp_path / "hpcstage.yaml"), "-q", env=env)
    assert r.returncode == 0, r.stderr
    return tmp_path / "hpcstage.yaml", env


def test_corrupt_and_deleted_blobs_are_named_and_repair_refetches_only_them(hub, tmp_path):
    manifest, env = staged(tmp_path, hub)
    cache = tmp_path / "cache"
    weights = hub.files_of("model", MODEL)["model.safetensors"]
    shard = hub.files_of("dataset", DATASET)["data/train-00000-of-00002.parquet"]
    flip_byte(cache / MODEL_DIR / "blobs" / weights.etag, weights.size // 2)
    (cache / DATASET_DIR / "blobs" / shard.etag).unlink()
    hub.clear_log()

    r = hpcstage("verify", "-f", str(manifest), "--json", env=env)
    assert r.returncode == 1, r.stderr
    assert problems(r.stdout) == {("corrupt", MODEL, "model.safetensors"),
                                  ("broken_link", DATASET, "data/train-00000-of-00002.parquet")}
    assert hub.log == []  # verify is offline
    r = hpcstage("verify", "-f", str(manifest), env=env)
    assert r.returncode == 1
    lines = [line for line in r.stdout.splitlines() if not line.startswith("FAILED")]
    assert len(lines) == 2 and "model.safetensors" in lines[0] + lines[1] and "train-00000" in lines[0] + lines[1]

    r = hpcstage("verify", "-f", str(manifest), "--repair", "--json", env=env)
    assert r.returncode == 0, r.stdout + r.stderr
    assert {(p["kind"], p["path"]) for p in json.loads(r.stdout)["repaired"]} == {
        ("corrupt", "model.safetensors"), ("broken_link", "data/train-00000-of-00002.parquet")}
    fetched = sorted(rec.path for rec in hub.log if rec.server == "hub" and rec.method == "GET")
    assert fetched == sorted([f"/{MODEL}/resolve/{hub.commit_of('model', MODEL)}/model.safetensors",
                              f"/datasets/{DATASET}/resolve/{hub.commit_of('dataset', DATASET)}/"
                              "data/train-00000-of-00002.parquet"])
    assert sorted(rec.path for rec in hub.log if rec.server == "cdn") == sorted(
        f"/lfs/{f.sha256}" for f in (weights, shard) if f.sha256)

    hub.stop()  # and now with no server at all
    offline = dict(env, HF_ENDPOINT="http://127.0.0.1:9", HF_HUB_OFFLINE="1")
    r = hpcstage("verify", "-f", str(manifest), env=offline)
    assert r.returncode == 0, r.stdout + r.stderr
    assert r.stdout.startswith("ok: ")
    snap = cache / MODEL_DIR / "snapshots" / hub.commit_of("model", MODEL)
    assert sha256(snap / "model.safetensors") == sha256(weights.local)
    data_snap = cache / DATASET_DIR / "snapshots" / hub.commit_of("dataset", DATASET)
    assert sha256(data_snap / shard.path) == sha256(shard.local)


def test_a_deleted_snapshot_entry_is_missing_by_the_lockfile_and_an_extra_file_is_named(hub, tmp_path):
    manifest, env = staged(tmp_path, hub)
    snap = tmp_path / "cache" / MODEL_DIR / "snapshots" / hub.commit_of("model", MODEL)
    (snap / "config.json").unlink()
    (snap / "notes.txt").write_text("left here by hand\n")
    r = hpcstage("verify", "-f", str(manifest), "--json", env=env)
    assert r.returncode == 1
    assert problems(r.stdout) == {("missing", MODEL, "config.json"), ("extra", MODEL, "notes.txt")}
    r = hpcstage("verify", "-f", str(manifest), "--repair", "--json", env=env)
    assert r.returncode == 1  # the extra file is the user's: reported, never deleted
    assert problems(r.stdout) == {("extra", MODEL, "notes.txt")}
    assert sha256(snap / "config.json") == sha256(hub.files_of("model", MODEL)["config.json"].local)
    assert (snap / "notes.txt").read_text() == "left here by hand\n"


def test_bad_refs_are_reported_and_a_trailing_newline_is_repaired_offline(hub, tmp_path):
    cache = tmp_path / "cache"
    env = client_env(hub, cache)
    assert hpcstage("pull", MODEL, "--cache-dir", str(cache), "-q", env=env).returncode == 0
    refs = cache / MODEL_DIR / "refs"
    commit = hub.commit_of("model", MODEL)
    (refs / "main").write_text(commit + "\n")
    (refs / "gone").write_text("b" * 40)
    (refs / "junk").write_text("not-a-commit")
    hub.clear_log()
    r = hpcstage("verify", MODEL, "--cache-dir", str(cache), "--json", env=env)
    assert r.returncode == 1
    assert problems(r.stdout) == {("bad_ref", MODEL, "refs/main"), ("bad_ref", MODEL, "refs/gone"),
                                  ("bad_ref", MODEL, "refs/junk")}
    r = hpcstage("verify", MODEL, "--cache-dir", str(cache), "--repair", "--json", env=env)
    assert r.returncode == 1
    assert problems(r.stdout) == {("bad_ref", MODEL, "refs/gone"), ("bad_ref", MODEL, "refs/junk")}
    assert (refs / "main").read_bytes() == commit.encode()
    assert hub.log == []


def test_hf_download_cache_verifies_clean_and_a_flipped_byte_is_found(hub, tmp_path):
    cache = tmp_path / "hfc"
    env = client_env(hub, cache)
    hf = Path(sys.executable).with_name("hf")
    for args in ([MODEL], [DATASET, "--repo-type", "dataset"]):
        r = subprocess.run([str(hf), "download", *args], env=env, capture_output=True, text=True, timeout=120)
        assert r.returncode == 0, r.stderr
    trees = list((cache / "hub").glob("*/trees/*.json"))
    assert len(trees) == 2  # what huggingface_hub itself wrote, not hpcstage
    r = hpcstage("verify", "--cache-dir", str(cache / "hub"), "--json", env=env)
    assert r.returncode == 0, r.stdout + r.stderr
    report = json.loads(r.stdout)
    assert report["repos"] == 2 and report["files"] == len(hub.files_of("model", MODEL)) + len(
        hub.files_of("dataset", DATASET))
    tok = hub.files_of("model", MODEL)["tokenizer.json"]
    flip_byte(cache / "hub" / MODEL_DIR / "blobs" / tok.etag, 0)
    r = hpcstage("verify", "--cache-dir", str(cache / "hub"), "--json", env=env)
    assert r.returncode == 1 and problems(r.stdout) == {("corrupt", MODEL, "tokenizer.json")}


def test_a_blob_shared_by_two_snapshots_is_hashed_once(hub, tmp_path):
    cache = tmp_path / "cache"
    env = client_env(hub, cache)
    for rev in ("main", "v1.0"):
        assert hpcstage("pull", MODEL, "--revision", rev, "--cache-dir", str(cache), "-q", env=env).returncode == 0
    files = [*hub.files_of("model", MODEL).values(), *hub.files_of("model", MODEL, "v1.0").values()]
    r = hpcstage("verify", MODEL, "--cache-dir", str(cache), "--json", env=env)
    assert r.returncode == 0, r.stdout
    report = json.loads(r.stdout)
    assert report["snapshots"] == 2 and report["files"] == len(files)
    assert report["blobs_hashed"] == len({f.etag for f in files}) < len(files)
    r = hpcstage("verify", MODEL, "--revision", "v1.0", "--cache-dir", str(cache), "--json", env=env)
    assert json.loads(r.stdout)["snapshots"] == 1


def test_unknown_repo_and_snapshot_without_listing_fail_with_the_fix(hub, tmp_path):
    cache = tmp_path / "cache"
    env = client_env(hub, cache)
    assert hpcstage("pull", MODEL, "--cache-dir", str(cache), "-q", env=env).returncode == 0
    r = hpcstage("verify", "demo-org/nope", "--cache-dir", str(cache), env=env)
    assert r.returncode == 1 and "not_staged" in r.stdout and "hpcstage pull demo-org/nope" in r.stdout
    commit = hub.commit_of("model", MODEL)
    (cache / MODEL_DIR / "trees" / f"{commit}.json").unlink()
    r = hpcstage("verify", MODEL, "--cache-dir", str(cache), env=env)
    assert r.returncode == 1 and "unverifiable" in r.stdout and f"--revision {commit}" in r.stdout
    r = hpcstage("verify", "--revision", "main", "--cache-dir", str(cache), env=env)
    assert r.returncode == 2 and "needs a REPO_ID" in r.stderr


def test_digests_match_git_and_sha256(tmp_path):
    empty, data = tmp_path / "empty", tmp_path / "data"
    empty.write_bytes(b"")
    data.write_bytes(os.urandom(3 * HASH_BUF + 17))
    assert verify_mod.digest_file(empty, "git") == "e69de29bb2d1d6434b8b29ae775ad8c2e48c5391"  # git's empty blob
    got = verify_mod.hash_files([(str(data), "sha256"), (str(data), "git"), (str(data), "sha256")], workers=2)
    raw = data.read_bytes()
    assert got == {(str(data), "sha256"): hashlib.sha256(raw).hexdigest(),
                   (str(data), "git"): hashlib.sha1(b"blob %d\0" % len(raw) + raw).hexdigest()}
    assert verify_mod.throughput([data])["bytes"] == len(raw)


def test_locked_branch_ref_missing_is_restored_but_a_moved_ref_is_only_reported(hub, tmp_path):
    manifest, env = staged(tmp_path, hub)
    refs = tmp_path / "cache" / MODEL_DIR / "refs"
    commit = hub.commit_of("model", MODEL)
    (refs / "main").unlink()
    r = hpcstage("verify", "-f", str(manifest), "--repair", "--json", env=env)
    assert r.returncode == 0, r.stdout
    assert (refs / "main").read_bytes() == commit.encode()
    other = hub.commit_of("model", MODEL, "v1.0")  # someone pulled another commit as main on a shared cache
    assert hpcstage("pull", MODEL, "--revision", "v1.0", "--cache-dir", str(tmp_path / "cache"), "-q",
                    env=env).returncode == 0
    (refs / "main").write_text(other)
    r = hpcstage("verify", "-f", str(manifest), "--repair", "--json", env=env)
    assert r.returncode == 1 and problems(r.stdout) == {("bad_ref", MODEL, "refs/main")}
    assert (refs / "main").read_text() == other


def test_a_dataset_named_without_repo_type_is_pointed_to_it(hub, tmp_path):
    cache = tmp_path / "cache"
    env = client_env(hub, cache)
    assert hpcstage("pull", DATASET, "--repo-type", "dataset", "--cache-dir", str(cache), "-q", env=env).returncode == 0
    r = hpcstage("verify", DATASET, "--cache-dir", str(cache), env=env)
    assert r.returncode == 1 and "staged as a dataset: pass --repo-type dataset" in r.stdout, r.stdout
    r = hpcstage("verify", DATASET, "--repo-type", "dataset", "--revision", "v9", "--cache-dir", str(cache), env=env)
    assert r.returncode == 1 and f"hpcstage pull {DATASET} --repo-type dataset --revision v9" in r.stdout, r.stdout
    assert hpcstage("verify", DATASET, "--repo-type", "dataset", "--cache-dir", str(cache), env=env).returncode == 0


def test_batched_hashing_gives_each_file_its_own_digest(tmp_path):
    """Small files are hashed in batches and large ones alone: every digest lands on its own file, an empty
    and an unreadable file included, across batch boundaries."""
    files = []
    for i in range(700):  # three batches of small files, sizes all different
        p = tmp_path / f"small-{i}"
        p.write_bytes(os.urandom(i * 3))
        files.append(p)
    for i in range(2):
        p = tmp_path / f"large-{i}"
        p.write_bytes(os.urandom(verify_mod.SMALL_HASH + i * 4099))
        files.append(p)
    gone = str(tmp_path / "gone")
    items = [(str(p), algo) for p in files for algo in ("git", "sha256")] + [(gone, "git")]
    got = verify_mod.hash_files(items, workers=3)
    for p in files:
        raw = p.read_bytes()
        assert got[(str(p), "git")] == hashlib.sha1(b"blob %d\0" % len(raw) + raw).hexdigest(), p
        assert got[(str(p), "sha256")] == hashlib.sha256(raw).hexdigest(), p
    assert isinstance(got[(gone, "git")], FileNotFoundError) and len(got) == len(items)


def test_small_files_are_read_to_their_real_end_whatever_size_was_listed(tmp_path):
    """A small file is read with one call sized by its listing; a file that grew or shrank since is still
    hashed whole (its digest then fails the comparison, never a digest of a prefix)."""
    p = tmp_path / "f"
    for real, listed in ((5000, 10), (10, 5000), (0, 0), (70_000, 1)):
        raw = os.urandom(real)
        p.write_bytes(raw)
        assert verify_mod._digest_small(str(p), "sha256", listed) == hashlib.sha256(raw).hexdigest()
        assert verify_mod._digest_small(str(p), "git", listed) == hashlib.sha1(b"blob %d\0" % real + raw).hexdigest()


@pytest.mark.parametrize("delay", [0.0, 0.001])
def test_small_files_go_to_the_pool_only_where_each_open_is_a_round_trip(tmp_path, monkeypatch, delay):
    """On a fast filesystem small files are hashed by the caller's thread (threads only fight over the GIL);
    where each open takes a shared filesystem's round trip (1 ms here), the batches after the first are
    hashed by the pool's threads, whose opens overlap. Digests are right either way."""
    import threading

    files = []
    for i in range(4 * verify_mod.BATCH_FILES):
        p = tmp_path / f"small-{i}"
        p.write_bytes(os.urandom(100 + i))
        files.append(p)
    opened_by: list[str] = []
    real_open = os.open

    def open_with_latency(path, *args, **kwargs):
        if str(path).startswith(str(tmp_path)):
            opened_by.append(threading.current_thread().name)
            time.sleep(delay)
        return real_open(path, *args, **kwargs)

    monkeypatch.setattr(os, "open", open_with_latency)
    got = verify_mod.hash_files([(str(p), "sha256") for p in files], workers=4)
    assert all(got[(str(p), "sha256")] == hashlib.sha256(p.read_bytes()).hexdigest() for p in files)
    pooled = sum(name.startswith("hpcstage-hash") for name in opened_by)
    if delay:
        assert pooled == len(files) - verify_mod.BATCH_FILES, "the batches after the first slow one are pooled"
    else:
        assert pooled == 0, "a fast filesystem's small files are hashed by the caller"


def test_repair_fetches_with_the_callers_token_and_retry_policy(hub, tmp_path, monkeypatch):
    """A repair is a pull with the caller's settings, not fresh defaults: the gated repo is fetched again with
    the caller's token (no HF_TOKEN, no token file here), and a file the Hub keeps refusing with 503 is asked
    for exactly as often as the caller's retry policy says (the default would ask 6 times, seconds apart)."""
    from hpcstage.errors import HpcstageError
    from hpcstage.manifest import hub_entry
    from hpcstage.testing.hub import FaultRule
    from hpcstage.hub.pull import pull
    from hpcstage.options import Options
    from hpcstage.transfer import RetryPolicy

    for name in [k for k in os.environ if k.startswith(("HF_", "HUGGING_FACE_"))]:
        monkeypatch.delenv(name)
    monkeypatch.setenv("HF_ENDPOINT", hub.url)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "no-token-here"))
    monkeypatch.setenv("NO_PROXY", "127.0.0.1")
    hub.gate(MODEL, ("hf_granted",))
    cache = tmp_path / "hub"
    opts = Options(cache_dir=cache, quiet=True, token="hf_granted", timeout=5.0,
                   retry=RetryPolicy(attempts=2, base=0.01, cap=0.01))
    pull([hub_entry(repo=MODEL)], opts)
    weights = hub.files_of("model", MODEL)["model.safetensors"]
    blob = cache / MODEL_DIR / "blobs" / weights.etag
    good = sha256(blob)

    flip_byte(blob, weights.size // 2)
    hub.clear_log()
    report = verify_mod.verify([MODEL], cache_dir=cache, repair=True, options=opts)
    assert report.ok, report.problems
    assert [(p.kind, p.path) for p in report.repaired] == [("corrupt", "model.safetensors")]
    assert sha256(blob) == good
    asked = [r for r in hub.log if r.server == "hub"]
    assert asked and all(r.has_auth and r.status in (200, 302) for r in asked)  # the gate let the token in

    flip_byte(blob, weights.size // 2)
    hub.add_fault(FaultRule(path="resolve/.*model.safetensors", status=503))
    hub.clear_log()
    with pytest.raises(HpcstageError, match="503"):
        verify_mod.verify([MODEL], cache_dir=cache, repair=True, options=opts)
    tries = [r for r in hub.log if r.path.endswith("/model.safetensors")]
    assert [r.status for r in tries] == [503, 503]
    assert not blob.exists()  # the bad blob is gone, nothing half-written took its place
    assert opts == Options(cache_dir=cache, quiet=True, token="hf_granted", timeout=5.0,
                           retry=RetryPolicy(attempts=2, base=0.01, cap=0.01))  # the caller's object is as it was
