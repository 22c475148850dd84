"""`hpcstage pull` end to end: the real CLI against the Hub emulator, then the real clients offline."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import BIG_MODEL
from hpcstage.testing.hub import FaultRule
from hpcstage.transfer import PIECE
from helpers import client_env, hpcstage, run_python, sha256

MODEL, DATASET = "demo-org/tiny-model", "demo-org/tiny-dataset"


def write_manifest(folder: Path, text: str) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "hpcstage.yaml"
    path.write_text(text)
    return path


DEMO_MANIFEST = """
cache_dir: cache
models:
  - repo: demo-org/tiny-model
  - repo: demo-org/tiny-model
    revision: v1.0
    include: ["*.json", "*.safetensors"]
datasets:
  - repo: demo-org/tiny-dataset
"""


def offline_env(tmp_path: Path, cache: Path) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("HF_")}
    env.update(
        HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", HF_HUB_CACHE=str(cache), HF_HOME=str(tmp_path / "hf-home"),
        HF_DATASETS_CACHE=str(tmp_path / "ds-cache"), HF_ENDPOINT="http://127.0.0.1:9", HF_HUB_DISABLE_TELEMETRY="1",
    )
    return env


def test_pulled_manifest_loads_offline_byte_exact_after_server_stops(hub, tmp_path):
    manifest = write_manifest(tmp_path, DEMO_MANIFEST)
    r = hpcstage("pull", "-f", str(manifest), env=client_env(hub, tmp_path / "unused"))
    assert r.returncode == 0, r.stderr
    expected = {
        (rev, path): sha256(info.local)
        for rev in ("main", "v1.0")
        for path, info in hub.files_of("model", MODEL, rev).items()
    }
    data_expected = {p: sha256(i.local) for p, i in hub.files_of("dataset", DATASET).items()}
    commits = {rev: hub.commit_of("model", MODEL, rev) for rev in ("main", "v1.0")}
    hub.stop()

    code = f"""
import hashlib, json, os
from pathlib import Path
from huggingface_hub import hf_hub_download, snapshot_download, scan_cache_dir
from datasets import load_dataset
out = {{}}
main = snapshot_download({MODEL!r}, local_files_only=True)
v1 = snapshot_download({MODEL!r}, revision="v1.0", allow_patterns=["*.json", "*.safetensors"], local_files_only=True)
for rev, root in (("main", main), ("v1.0", v1)):
    for p in Path(root).rglob("*"):
        if p.is_file():
            out[rev + "|" + p.relative_to(root).as_posix()] = hashlib.sha256(p.read_bytes()).hexdigest()
cfg = hf_hub_download({MODEL!r}, "config.json", revision="v1.0", local_files_only=True)
data = snapshot_download({DATASET!r}, repo_type="dataset", local_files_only=True)
ds = load_dataset(data)
info = scan_cache_dir()
print(json.dumps({{"files": out, "main": main, "v1": v1, "cfg": cfg, "rows": {{s: len(ds[s]) for s in ds}},
                  "data_files": {{p.relative_to(data).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
                                 for p in Path(data).rglob("*") if p.is_file()}},
                  "warnings": [str(w) for w in info.warnings]}}))
"""
    r = run_python(code, offline_env(tmp_path, tmp_path / "cache"))
    assert r.returncode == 0, r.stderr
    got = json.loads(r.stdout.strip().splitlines()[-1])
    assert got["main"].endswith(commits["main"]) and got["v1"].endswith(commits["v1.0"])
    assert got["cfg"].startswith(got["v1"])
    want = {f"{rev}|{p}": h for (rev, p), h in expected.items()
            if rev == "main" or p.endswith((".json", ".safetensors"))}
    assert got["files"] == want
    assert got["data_files"] == data_expected
    assert got["rows"] == {"train": 300, "test": 100}
    assert got["warnings"] == []


def test_refs_hold_the_commit_without_newline_and_trees_are_group_readable(hub, tmp_path):
    cache = tmp_path / "cache"
    r = hpcstage("pull", MODEL, "--revision", "v1.0", "--cache-dir", str(cache), env=client_env(hub, cache))
    assert r.returncode == 0, r.stderr
    repo = cache / "models--demo-org--tiny-model"
    commit = hub.commit_of("model", MODEL, "v1.0")
    assert (repo / "refs" / "v1.0").read_bytes() == commit.encode()
    assert (repo / "trees" / f"{commit}.json").stat().st_mode & 0o044 == 0o044
    for link in (repo / "snapshots" / commit).rglob("*"):
        if link.is_symlink():
            assert not os.path.isabs(os.readlink(link))


def test_include_exclude_select_files_and_offline_completeness_agrees(hub, tmp_path):
    cache = tmp_path / "cache"
    r = hpcstage("pull", MODEL, "--include", "*.json", "--exclude", "tokenizer*", "--cache-dir", str(cache),
                 env=client_env(hub, cache))
    assert r.returncode == 0, r.stderr
    commit = hub.commit_of("model", MODEL)
    snap = cache / "models--demo-org--tiny-model" / "snapshots" / commit
    staged = sorted(p.relative_to(snap).as_posix() for p in snap.rglob("*") if p.is_file())
    want = sorted(p for p in hub.files_of("model", MODEL) if p.endswith(".json") and not p.startswith("tokenizer"))
    assert staged == want and "model.safetensors" not in staged
    code = f"""
from huggingface_hub import snapshot_download
from huggingface_hub.errors import IncompleteSnapshotError
snapshot_download({MODEL!r}, allow_patterns=["*.json"], ignore_patterns=["tokenizer*"], local_files_only=True)
try:
    snapshot_download({MODEL!r}, local_files_only=True)
except IncompleteSnapshotError:
    print("incomplete-without-patterns")
"""
    r = run_python(code, offline_env(tmp_path, cache))
    assert r.returncode == 0, r.stderr
    assert "incomplete-without-patterns" in r.stdout


def test_second_pull_of_staged_manifest_sends_no_request(hub, tmp_path):
    manifest = write_manifest(tmp_path, DEMO_MANIFEST)
    env = client_env(hub, tmp_path / "unused")
    assert hpcstage("pull", "-f", str(manifest), env=env).returncode == 0
    lock = json.loads((tmp_path / "hpcstage.lock").read_text())
    assert {e["commit"] for e in lock["entries"].values()} >= {hub.commit_of("model", MODEL, "v1.0")}
    hub.clear_log()
    r = hpcstage("pull", "-f", str(manifest), "--json", env=env)
    assert r.returncode == 0, r.stderr
    assert hub.log == []
    summary = json.loads(r.stdout)
    assert summary["downloaded_files"] == 0 and summary["files"] > 0


def test_lockfile_pins_commit_until_update(hub, tmp_path, sample_root):
    manifest = write_manifest(tmp_path, "cache_dir: cache\nmodels:\n  - repo: demo-org/tiny-model\n")
    env = client_env(hub, tmp_path / "unused")
    assert hpcstage("pull", "-f", str(manifest), env=env).returncode == 0
    first = json.loads((tmp_path / "hpcstage.lock").read_text())
    (tmp_path / "cache" / "models--demo-org--tiny-model" / "refs" / "main").unlink()
    hub.clear_log()
    assert hpcstage("pull", "-f", str(manifest), env=env).returncode == 0
    assert hub.log == []  # the locked commit is reused: no resolve request
    r = hpcstage("pull", "-f", str(manifest), "--update", "--json", env=env)
    assert r.returncode == 0, r.stderr
    assert any("/revision/main" in rec.path for rec in hub.log)
    assert json.loads((tmp_path / "hpcstage.lock").read_text()) == first


def test_token_goes_to_the_hub_only_and_is_never_printed(hub, tmp_path):
    canary = "hf_CANARY" + "x" * 30
    cache = tmp_path / "cache"
    env = client_env(hub, cache, HF_TOKEN=canary)
    r = hpcstage("pull", MODEL, "--cache-dir", str(cache), "-v", env=env)
    assert r.returncode == 0, r.stderr
    assert canary not in r.stdout + r.stderr
    assert any(rec.has_auth for rec in hub.log if rec.server == "hub")
    cdn = [rec for rec in hub.log if rec.server == "cdn"]
    assert cdn and not any(rec.has_auth for rec in cdn)
    for p in cache.rglob("*"):
        if p.is_file() and not p.is_symlink():
            assert canary.encode() not in p.read_bytes()


def test_wrong_bytes_are_refetched_never_committed(hub, tmp_path):
    cache = tmp_path / "cache"
    hub.add_fault(FaultRule(path=r"model\.safetensors|/lfs/", server="cdn", corrupt=True, times=1))
    r = hpcstage("pull", MODEL, "--cache-dir", str(cache), env=client_env(hub, cache))
    assert r.returncode == 0, r.stderr
    snap = cache / "models--demo-org--tiny-model" / "snapshots" / hub.commit_of("model", MODEL)
    assert sha256(snap / "model.safetensors") == sha256(hub.files_of("model", MODEL)["model.safetensors"].local)


def test_always_wrong_bytes_fail_with_nothing_under_the_final_name(hub, tmp_path):
    cache = tmp_path / "cache"
    hub.add_fault(FaultRule(path=r".", server="cdn", corrupt=True))
    r = hpcstage("pull", MODEL, "--cache-dir", str(cache), env=client_env(hub, cache))
    assert r.returncode == 1
    assert "hash mismatch" in r.stderr and "Traceback" not in r.stderr
    sha = hub.files_of("model", MODEL)["model.safetensors"].sha256
    assert not (cache / "models--demo-org--tiny-model" / "blobs" / sha).exists()


def cdn_gets(server) -> list:
    return [rec for rec in server.log if rec.server == "cdn" and rec.method == "GET"]


def big_blob(server, cache: Path) -> tuple[Path, object]:
    info = server.files_of("model", BIG_MODEL)["model.safetensors"]
    return cache / "models--demo-org--big-model" / "blobs" / info.sha256, info


def test_large_file_arrives_in_parallel_ranges_byte_exact(big_hub, tmp_path):
    cache = tmp_path / "cache"
    r = hpcstage("pull", BIG_MODEL, "--cache-dir", str(cache), env=client_env(big_hub, cache))
    assert r.returncode == 0, r.stderr
    blob, info = big_blob(big_hub, cache)
    assert sha256(blob) == info.sha256
    gets = cdn_gets(big_hub)
    assert sorted(rec.range for rec in gets) == sorted(
        f"bytes={a}-{min(a + PIECE, info.size) - 1}" for a in range(0, info.size, PIECE))
    assert sum(rec.bytes_sent for rec in gets) == info.size
    assert not list(blob.parent.glob("*.hpcstage-*"))  # no partial, record or lease left behind


def test_dropped_connection_continues_where_it_broke(big_hub, tmp_path):
    cache = tmp_path / "cache"
    big_hub.add_fault(FaultRule(path=r"/lfs/", server="cdn", drop_after=1000, times=1))
    r = hpcstage("pull", BIG_MODEL, "--cache-dir", str(cache), env=client_env(big_hub, cache))
    assert r.returncode == 0, r.stderr
    blob, info = big_blob(big_hub, cache)
    assert sha256(blob) == info.sha256
    gets = cdn_gets(big_hub)
    dropped = [rec for rec in gets if rec.bytes_sent == 1000]
    start = int(dropped[0].range.split("=")[1].split("-")[0])
    assert any(rec.range.startswith(f"bytes={start + 1000}-") for rec in gets)
    assert sum(rec.bytes_sent for rec in gets) == info.size  # no byte crossed twice


def test_pieces_left_by_a_dead_process_are_not_fetched_again(big_hub, tmp_path):
    cache = tmp_path / "cache"
    blob, info = big_blob(big_hub, cache)
    blob.parent.mkdir(parents=True)
    partial = blob.with_name(blob.name + ".hpcstage-partial")
    data = Path(info.local).read_bytes()
    partial.write_bytes(data[: 2 * PIECE] + bytes(info.size - 2 * PIECE))
    Path(str(partial) + ".ranges").write_text(json.dumps({"size": info.size, "segment": PIECE, "done": [0, 1]}))
    r = hpcstage("pull", BIG_MODEL, "--cache-dir", str(cache), env=client_env(big_hub, cache))
    assert r.returncode == 0, r.stderr
    assert sha256(blob) == info.sha256
    assert sum(rec.bytes_sent for rec in cdn_gets(big_hub)) == info.size - 2 * PIECE
    assert not partial.exists()


def test_large_file_with_wrong_bytes_is_refetched_whole(big_hub, tmp_path):
    cache = tmp_path / "cache"
    big_hub.add_fault(FaultRule(path=r"/lfs/", server="cdn", corrupt=True, times=1))
    r = hpcstage("pull", BIG_MODEL, "--cache-dir", str(cache), env=client_env(big_hub, cache))
    assert r.returncode == 0, r.stderr
    blob, info = big_blob(big_hub, cache)
    assert sha256(blob) == info.sha256


@pytest.mark.parametrize("on", ["/revision/", "/tree/"])
def test_503_on_metadata_is_retried(hub, tmp_path, on):
    cache = tmp_path / "cache"
    hub.add_fault(FaultRule(path=on, status=503, retry_after="0", times=2))
    r = hpcstage("pull", MODEL, "--cache-dir", str(cache), env=client_env(hub, cache))
    assert r.returncode == 0, r.stderr
    assert [rec.status for rec in hub.log if on in rec.path] == [503, 503, 200]


def test_two_processes_at_once_fetch_the_large_blob_once(big_hub, tmp_path):
    cache = tmp_path / "cache"
    env = client_env(big_hub, cache)
    big_hub.add_fault(FaultRule(path=r"/lfs/", server="cdn", rate=20_000_000))  # ~1.3 s: the second process starts meanwhile
    procs = [subprocess.Popen([sys.executable, "-m", "hpcstage", "pull", BIG_MODEL, "--cache-dir", str(cache), "-q"],
                              env=env, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    for p in procs:
        assert p.wait(timeout=120) == 0, p.stderr.read()
    blob, info = big_blob(big_hub, cache)
    assert sha256(blob) == info.sha256
    assert sum(rec.bytes_sent for rec in cdn_gets(big_hub)) == info.size


# -- bad input and unreachable endpoints: one line, the right exit code, no traceback


def test_bad_manifest_key_names_file_line_and_nearest_key(tmp_path, hub):
    manifest = write_manifest(tmp_path, "models:\n  - repo: demo-org/tiny-model\n    revison: main\n")
    r = hpcstage("pull", "-f", str(manifest), env=client_env(hub, tmp_path / "c"))
    assert r.returncode == 2
    assert f"{manifest}:3" in r.stderr and "'revision'" in r.stderr
    assert hub.log == [] and not (tmp_path / "hpcstage.lock").exists()


def test_invalid_repo_id_is_bad_input(hub, tmp_path):
    r = hpcstage("pull", "not//valid", "--cache-dir", str(tmp_path), env=client_env(hub, tmp_path))
    assert r.returncode == 2 and "invalid repo id" in r.stderr and "Traceback" not in r.stderr
    assert hub.log == []


def test_unknown_repo_and_revision_exit_1_with_the_hubs_reason(hub, tmp_path):
    env = client_env(hub, tmp_path)
    r = hpcstage("pull", "demo-org/nope", "--cache-dir", str(tmp_path), env=env)
    assert r.returncode == 1 and "not found" in r.stderr and "demo-org/nope" in r.stderr
    r = hpcstage("pull", MODEL, "--revision", "v9", "--cache-dir", str(tmp_path), env=env)
    assert r.returncode == 1 and "revision 'v9' not found" in r.stderr


def test_allowlist_refuses_before_any_request(hub, tmp_path):
    manifest = write_manifest(tmp_path, "allow: ['other-org/*']\nmodels:\n  - repo: demo-org/tiny-model\n")
    r = hpcstage("pull", "-f", str(manifest), env=client_env(hub, tmp_path / "c"))
    assert r.returncode == 2 and "allowlist" in r.stderr
    assert hub.log == []


def test_unreachable_endpoint_fails_fast(tmp_path, hub):
    env = client_env(hub, tmp_path, HF_ENDPOINT="http://127.0.0.1:9")
    started = time.monotonic()
    r = hpcstage("pull", MODEL, "--cache-dir", str(tmp_path), "--retry-budget", "3", env=env)
    assert r.returncode == 1 and "connection failed" in r.stderr and "Traceback" not in r.stderr
    assert time.monotonic() - started < 30


def test_stalled_endpoint_ends_with_an_error_not_a_hang(hub, tmp_path):
    hub.add_fault(FaultRule(path=r"/api/", stall=True))
    started = time.monotonic()
    r = hpcstage("pull", MODEL, "--cache-dir", str(tmp_path), "--timeout", "1", "--retry-budget", "3",
                 env=client_env(hub, tmp_path))
    assert r.returncode == 1 and "Timeout" in r.stderr and "Traceback" not in r.stderr
    assert time.monotonic() - started < 30
