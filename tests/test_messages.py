"""Issue 21: every message true, every fix hint a command that works in its context (each one is run here
and must fix what it names), and the habits `hf download` users bring. All through the real CLI against
the Hub emulator; assertions on bytes, request logs, exit codes and the lines printed."""
from __future__ import annotations

import io
import json
import os
import re
import shlex
import signal
import socket
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import pytest

from conftest import BIG_MODEL
from helpers import client_env, hpcstage, pieces_done, sha256
from hpcstage.testing.hub import FaultRule, HubServer

MODEL, DATASET = "demo-org/tiny-model", "demo-org/tiny-dataset"
MODEL_DIR, DATASET_DIR = "models--demo-org--tiny-model", "datasets--demo-org--tiny-dataset"
MODEL_FILES = {"README.md", "config.json", "generation_config.json", "model.safetensors", "special_tokens_map.json",
               "tokenizer.json", "tokenizer_config.json"}


def hint(text: str) -> list[str]:
    """The first `hpcstage ...` command a message proposes, as argv."""
    found = re.findall(r"`(hpcstage [^`]+)`", text) or ([text] if text.startswith("hpcstage ") else [])
    assert found, f"no command in: {text}"  # a message quotes it; check's fix column is the command alone
    return shlex.split(found[0])[1:]


def run_hint(text: str, env: dict, cwd: Path | None = None) -> subprocess.CompletedProcess:
    return hpcstage(*hint(text), env=env, cwd=cwd)


def one_line(r: subprocess.CompletedProcess, code: int, *words: str) -> str:
    assert r.returncode == code, r.stdout + r.stderr
    assert "Traceback" not in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr
    for w in words:
        assert w in r.stderr, r.stderr
    return r.stderr


def snapshot(cache: Path, hub, kind: str = "model", repo: str = MODEL) -> Path:
    folder = (MODEL_DIR if kind == "model" else DATASET_DIR)
    return cache / folder / "snapshots" / hub.commit_of(kind, repo)


def flip(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


# -- 1. fix hints are the exact command for this context, and running them fixes the problem ------------


def test_verify_hint_after_a_corrupt_blob_names_the_manifest_and_fixes_it(hub, tmp_path):
    """Was: `run hpcstage verify --repair` (the default cache: "0 problems", exit 0, m2 still corrupt)."""
    (tmp_path / "m2").mkdir()
    manifest = tmp_path / "m2" / "demo.yaml"
    manifest.write_text(f"cache_dir: cache\nmodels:\n  - repo: {MODEL}\n")
    env = client_env(hub, tmp_path / "default")  # HF_HUB_CACHE elsewhere: a hint without -f would miss m2
    assert hpcstage("pull", "-f", manifest, "-q", env=env).returncode == 0
    weights = hub.files_of("model", MODEL)["model.safetensors"]
    blob = tmp_path / "m2" / "cache" / MODEL_DIR / "blobs" / weights.etag
    flip(blob)
    r = hpcstage("verify", "-f", manifest, env=env, cwd=tmp_path)
    assert r.returncode == 1 and "corrupt" in r.stdout, r.stdout
    assert hint(r.stdout) == ["verify", "-f", str(manifest), "--repair"]
    fixed = run_hint(r.stdout, env, cwd=tmp_path)
    assert fixed.returncode == 0, fixed.stdout + fixed.stderr
    assert sha256(blob) == weights.sha256


def test_verify_hints_keep_cache_dir_and_repo_type(hub, tmp_path):
    cache = tmp_path / "c"
    env = client_env(hub, tmp_path / "default")
    assert hpcstage("pull", DATASET, "--repo-type", "dataset", "--cache-dir", cache, "-q", env=env).returncode == 0
    shard = hub.files_of("dataset", DATASET)["data/train-00000-of-00002.parquet"]
    (cache / DATASET_DIR / "blobs" / shard.etag).unlink()
    r = hpcstage("verify", DATASET, "--repo-type", "dataset", "--cache-dir", cache, env=env)
    assert r.returncode == 1 and "broken_link" in r.stdout, r.stdout
    assert hint(r.stdout) == ["verify", DATASET, "--repo-type", "dataset", "--repair", "--cache-dir", str(cache)]
    assert run_hint(r.stdout, env).returncode == 0
    assert sha256(cache / DATASET_DIR / "blobs" / shard.etag) == shard.sha256
    assert hpcstage("verify", DATASET, "--repo-type", "dataset", "--cache-dir", cache, env=env).returncode == 0


def test_bad_ref_hint_pulls_into_the_same_cache(hub, tmp_path):
    """Was: `run hpcstage pull ORG/NAME --revision main`, which pulls into HF_HOME."""
    cache = tmp_path / "c"
    env = client_env(hub, tmp_path / "default")
    assert hpcstage("pull", MODEL, "--cache-dir", cache, "-q", env=env).returncode == 0
    ref = cache / MODEL_DIR / "refs" / "main"
    ref.write_text("garbage")
    r = hpcstage("verify", MODEL, "--cache-dir", cache, env=env)
    assert r.returncode == 1 and "bad_ref" in r.stdout
    assert hint(r.stdout) == ["pull", MODEL, "--revision", "main", "--cache-dir", str(cache)]
    assert run_hint(r.stdout, env).returncode == 0
    assert ref.read_text() == hub.commit_of("model", MODEL)
    assert not (tmp_path / "default" / "hub").exists()


def test_verify_repair_with_a_manifest_restores_a_garbage_ref_from_the_lockfile_offline(hub, tmp_path):
    manifest = tmp_path / "hpcstage.yaml"
    manifest.write_text(f"cache_dir: cache\nmodels:\n  - repo: {MODEL}\n")
    env = client_env(hub, tmp_path / "default")
    assert hpcstage("pull", "-f", manifest, "-q", env=env).returncode == 0
    ref = tmp_path / "cache" / MODEL_DIR / "refs" / "main"
    for garbage in ("garbage", "0" * 40):  # not a commit; a commit with no snapshot
        ref.write_text(garbage)
        r = hpcstage("verify", "-f", manifest, env=env)
        assert r.returncode == 1 and "bad_ref" in r.stdout, r.stdout
        assert hint(r.stdout) == ["verify", "-f", str(manifest), "--repair"]
        hub.clear_log()
        fixed = run_hint(r.stdout, env)
        assert fixed.returncode == 0, fixed.stdout + fixed.stderr
        assert ref.read_bytes() == hub.commit_of("model", MODEL).encode()
        assert hub.log == []  # the lockfile knew the commit: no request


# -- 2. without a lockfile, trees/<commit>.json + the pull's patterns show a deleted file -----------------


def test_deleted_snapshot_file_is_missing_for_verify_and_status_without_a_lockfile(hub, tmp_path):
    """Was: verify "ok: 6 files", status "staged 7/7"."""
    cache = tmp_path / "c"
    env = client_env(hub, tmp_path / "default")
    assert hpcstage("pull", MODEL, "--cache-dir", cache, "-q", env=env).returncode == 0
    (snapshot(cache, hub) / "config.json").unlink()
    r = hpcstage("status", "--cache-dir", cache, env=env)
    assert r.returncode == 1 and "6/7 files" in r.stdout and "staged" not in r.stdout.split("\t")[1], r.stdout
    r = hpcstage("verify", MODEL, "--cache-dir", cache, env=env)
    assert r.returncode == 1 and re.search(r"missing: model demo-org/tiny-model@\w+ config.json", r.stdout), r.stdout
    assert run_hint(r.stdout, env).returncode == 0
    assert (snapshot(cache, hub) / "config.json").read_bytes() == hub.files_of("model", MODEL)["config.json"].local.read_bytes()
    r = hpcstage("status", "--cache-dir", cache, env=env)
    assert r.returncode == 0 and "\tstaged\t7/7 files" in r.stdout, r.stdout


def test_a_pull_with_patterns_is_not_missing_the_files_it_left_out(hub, tmp_path):
    cache = tmp_path / "c"
    env = client_env(hub, tmp_path / "default")
    assert hpcstage("pull", MODEL, "--include", "*.json", "--cache-dir", cache, "-q", env=env).returncode == 0
    r = hpcstage("verify", MODEL, "--cache-dir", cache, env=env)
    assert r.returncode == 0, r.stdout
    r = hpcstage("status", "--cache-dir", cache, env=env)
    assert "\tstaged\t5/5 files" in r.stdout, r.stdout


# -- 3. failures reported completely -----------------------------------------------------------------------


def test_failed_pull_names_every_file_and_json_prints_the_summary(hub, tmp_path):
    """Was: one file "(and 1 more)" even with -v; --json printed nothing."""
    cache = tmp_path / "c"
    env = client_env(hub, tmp_path / "default")
    hub.add_fault(FaultRule(path=r"/(config|tokenizer_config)\.json$", method="GET", status=404))
    r = hpcstage("pull", MODEL, "--cache-dir", cache, "--json", "--retry-budget", "0", env=env)
    one_line(r, 1, "2 of 7 files not fetched", f"{MODEL}/config.json", f"{MODEL}/tokenizer_config.json")
    assert "run the same pull again" not in r.stderr  # a 404 does not pass by itself
    out = json.loads(r.stdout)
    assert out["ok"] is False and {f["file"] for f in out["failures"]} == {f"{MODEL}/config.json",
                                                                          f"{MODEL}/tokenizer_config.json"}
    # status without -f counts what is in place (was "failed 0/5 files" with files there)
    r = hpcstage("status", "--cache-dir", cache, env=env)
    assert r.returncode == 1 and re.search(r"\tfailed\t5/7 files", r.stdout), r.stdout
    hub.clear_faults()
    assert hpcstage("pull", MODEL, "--cache-dir", cache, "-q", env=env).returncode == 0


def test_many_failures_are_grouped_and_every_file_is_named(hub, tmp_path):
    env = client_env(hub, tmp_path / "default")
    hub.add_fault(FaultRule(path=r"/resolve/", method="GET", status=404))
    r = hpcstage("pull", MODEL, "--cache-dir", tmp_path / "c", "--retry-budget", "0", "-q", env=env)
    err = one_line(r, 1, "7 of 7 files not fetched")
    for name in MODEL_FILES:
        assert f"{MODEL}/{name}" in err, err
    assert err.count(" x '") < 7  # grouped by reason, not one sentence per file


@pytest.fixture
def url_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("urls")
    repo = root / "datasets" / "demo-org" / "files"
    repo.mkdir(parents=True)
    (repo / "plain.bin").write_bytes(os.urandom(50_000))  # served by the hub itself
    (repo / "other.bin").write_bytes(os.urandom(30_000))
    with tarfile.open(repo / "pages.tar.gz", "w:gz") as tf:  # LFS-suffixed: the hub redirects to its CDN
        for name, data in {"pages/a.jsonl": b'{"a": 1}\n', "pages/b.jsonl": b'{"b": 2}\n'}.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    return root


@pytest.fixture
def uhub(url_root):
    with HubServer(url_root) as server:
        yield server


def url_of(server, name: str) -> str:
    return f"{server.url}/datasets/demo-org/files/resolve/main/{name}"


def test_status_shows_a_live_and_an_interrupted_url_download(big_hub, tmp_path):
    """Was: "missing 0/0 files" while the download ran or after it died."""
    url = f"{big_hub.url}/{BIG_MODEL}/resolve/main/model.safetensors"
    m = tmp_path / "hpcstage.yaml"
    m.write_text(f"cache_dir: cache\ndata_dir: data\ndatasets:\n  - url: {url}\n    allow_http: true\n    dest: w\n")
    env = client_env(big_hub, tmp_path / "default")
    big_hub.add_fault(FaultRule(path=r"/lfs/", server="cdn", rate=2_000_000))
    proc = subprocess.Popen([sys.executable, "-m", "hpcstage", "pull", "-f", str(m), "-q"], env=env)
    try:
        downloads = tmp_path / "data" / ".hpcstage" / "downloads"
        deadline = time.monotonic() + 120
        while not any(pieces_done(r) >= 1 for r in downloads.glob("*.ranges")):
            assert time.monotonic() < deadline and proc.poll() is None, "no progress"
            time.sleep(0.05)
        r = hpcstage("status", "-f", m, env=env)
        assert r.returncode == 1 and re.search(r"^data w\tlocked\t0/0 files; partial \d+%; locked by ", r.stdout,
                                               re.M), r.stdout
        assert "@" not in r.stdout.split("\t")[0]  # was `data w@`
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    r = hpcstage("status", "-f", m, env=env)
    assert re.search(r"^data w\tpartial\t0/0 files; partial \d+%", r.stdout, re.M), r.stdout


# -- 4. HF_HUB_OFFLINE --------------------------------------------------------------------------------------


def test_pull_refuses_with_hf_hub_offline_and_doctor_says_so(hub, tmp_path):
    """Was: doctor said pull cannot fetch, yet the pull downloaded and exited 0."""
    cache = tmp_path / "c"
    env = client_env(hub, tmp_path / "default", HF_HUB_OFFLINE="1")
    r = hpcstage("pull", MODEL, "--cache-dir", cache, env=env)
    one_line(r, 2, "HF_HUB_OFFLINE=1 is set", "pull does not use the network", "`unset HF_HUB_OFFLINE`")
    assert hub.log == [] and not (cache / MODEL_DIR / "blobs").exists()
    r = hpcstage("doctor", "--json", "--cache-dir", cache, env=env)
    offline = {c["name"]: c for c in json.loads(r.stdout)}["offline"]
    assert offline["status"] == "warn"
    assert "`hpcstage pull` refuses to fetch while HF_HUB_OFFLINE is set" in offline["detail"]
    assert "`unset HF_HUB_OFFLINE`" in offline["fix"]
    # the fix both propose: the same command with the variable unset
    fixed = subprocess.run(["bash", "-c", f"unset HF_HUB_OFFLINE; {shlex.quote(sys.executable)} -m hpcstage pull "
                            f"{MODEL} --cache-dir {shlex.quote(str(cache))} -q"], env=env, capture_output=True,
                           text=True, timeout=180)
    assert fixed.returncode == 0, fixed.stderr
    # a warm pull from the lockfile needs no request, so it works offline (as snapshot_download does)
    manifest = tmp_path / "hpcstage.yaml"
    manifest.write_text(f"cache_dir: c\nmodels:\n  - repo: {MODEL}\n")
    assert hpcstage("pull", "-f", manifest, "-q", env=dict(env, HF_HUB_OFFLINE="0")).returncode == 0
    hub.clear_log()
    r = hpcstage("pull", "-f", manifest, env=env)
    assert r.returncode == 0 and hub.log == [], r.stderr


# -- 5. check --------------------------------------------------------------------------------------------


def test_check_names_every_missing_file_in_one_fix_that_works(hub, tmp_path):
    """Was: one missing include per run (five runs for five files)."""
    manifest = tmp_path / "hpcstage.yaml"
    manifest.write_text(f"cache_dir: cache\nmodels:\n  - repo: {MODEL}\n    include: ['*.safetensors']\n")
    env = client_env(hub, tmp_path / "default")
    assert hpcstage("pull", "-f", manifest, "-q", env=env).returncode == 0
    r = hpcstage("check", "-f", manifest, "--isolation", "guard", env=env)
    assert r.returncode == 1, r.stdout + r.stderr
    line = [x for x in r.stdout.splitlines() if x.startswith("MISSING")][0]
    job_files = ["config.json", "generation_config.json", "special_tokens_map.json", "tokenizer.json",
                 "tokenizer_config.json"]
    fix = line.split("\tfix: ")[1]
    for name in job_files:
        assert f"{name!r}" in fix and f"{name} is in the repo but not staged" in line
    assert fix.count("`hpcstage pull") == 1
    # the fix: add them all to include, then run the command it names
    manifest.write_text(f"cache_dir: cache\nmodels:\n  - repo: {MODEL}\n    include: ['*.safetensors', "
                        + ", ".join(repr(n) for n in job_files) + "]\n")
    assert run_hint(fix, env).returncode == 0
    r = hpcstage("check", "-f", manifest, "--isolation", "guard", env=env)
    assert r.returncode == 0, r.stdout


def test_check_names_a_load_argument_typo_instead_of_proposing_prebuild(hub, tmp_path):
    """Was: `splt` passed pull, failed prebuild with datasets' ValueError, and check proposed that prebuild."""
    manifest = tmp_path / "hpcstage.yaml"
    manifest.write_text(f"cache_dir: cache\ndatasets_cache_dir: dcache\ndatasets:\n  - repo: {DATASET}\n"
                        "    load: {splt: train}\n")
    env = client_env(hub, tmp_path / "default")
    assert hpcstage("pull", "-f", manifest, "-q", env=env).returncode == 0
    r = hpcstage("check", "-f", manifest, "--isolation", "guard", env=env)
    assert r.returncode == 1
    line = [x for x in r.stdout.splitlines() if x.startswith("MISSING")][0]
    assert "no argument 'splt'; did you mean 'split'?" in line
    fix = line.split("\tfix: ")[1]
    assert fix.startswith("change 'splt' to 'split' in `load:`"), fix
    r = hpcstage("prebuild", "-f", manifest, env=env)  # prebuild names it too (was datasets' ValueError)
    assert r.returncode == 1 and "no argument 'splt'; did you mean 'split'?" in r.stdout, r.stdout + r.stderr
    manifest.write_text(manifest.read_text().replace("splt", "split"))
    assert run_hint(fix, env).returncode == 0  # the prebuild it names, after the edit
    assert hpcstage("check", "-f", manifest, "--isolation", "guard", env=env).returncode == 0


def test_expect_failure_proposes_inspecting_the_data_not_a_pull(uhub, tmp_path):
    """Was: check proposed `pull -f`, which fails the same way."""
    m = tmp_path / "hpcstage.yaml"
    m.write_text(f"cache_dir: cache\ndata_dir: data\ndatasets:\n  - url: {url_of(uhub, 'pages.tar.gz')}\n"
                 "    allow_http: true\n    extract: true\n    dest: pages\n"
                 "    expect: {files: [pages/a.jsonl, pages/c.jsonl], count: {'*.jsonl': 3}}\n")
    env = client_env(uhub, tmp_path / "default")
    r = hpcstage("pull", "-f", m, "-q", env=env)
    err = one_line(r, 1, "pages/c.jsonl", "inspect it")
    assert "3" in err and "pulling again fetches the same data" in err  # both expectations, not "(and 1 more)"
    r = hpcstage("check", "-f", m, "--isolation", "guard", env=env)
    line = [x for x in r.stdout.splitlines() if x.startswith("MISSING")][0]
    assert "failed its `expect:`" in line and "fix: inspect the data" in line and "hpcstage pull" not in line, line


# -- 6. bad input: exit 2, one line, before any request ------------------------------------------------------


def test_cache_dir_that_is_a_file_is_refused_before_any_request(hub, tmp_path):
    """Was: metadata requests, then `[Errno 20] Not a directory`, exit 1."""
    (tmp_path / "f").write_text("x")
    env = client_env(hub, tmp_path / "default")
    for cache in (tmp_path / "f", tmp_path / "f" / "sub"):
        one_line(hpcstage("pull", MODEL, "--cache-dir", cache, env=env), 2, str(tmp_path / "f"), "--cache-dir")
        one_line(hpcstage("status", "--cache-dir", cache, env=env), 2, "--cache-dir")
    assert hub.log == []


def test_serve_on_a_busy_port_names_it_and_suggests_port_0(tmp_path):
    """Was: `[Errno 98] Address already in use`."""
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        r = hpcstage("serve", tmp_path, "--port", port, env=dict(os.environ))
        one_line(r, 2, f"port {port}", "--port 0")
    proc = subprocess.Popen([sys.executable, "-m", "hpcstage", "serve", str(tmp_path), "--port", "0"],
                            stdout=subprocess.PIPE, text=True)
    try:
        assert re.match(r"http://127\.0\.0\.1:\d+ serving", proc.stdout.readline())  # the suggestion works
    finally:
        proc.send_signal(signal.SIGINT)
        proc.wait(timeout=30)


def test_status_and_cleanup_on_a_missing_cache_and_negative_ages(tmp_path):
    """Was: nothing printed, exit 0; `--older-than -1` accepted."""
    env = dict(os.environ, HF_HOME=str(tmp_path / "home"))
    env.pop("HF_HUB_CACHE", None)
    one_line(hpcstage("status", "--cache-dir", tmp_path / "nope", env=env), 2, "no hub cache", "--cache-dir")
    one_line(hpcstage("cleanup", "--cache-dir", tmp_path / "nope", env=env), 2, "no hub cache")
    one_line(hpcstage("status", env=env), 2, str(tmp_path / "home" / "hub"))
    (tmp_path / "c").mkdir()
    one_line(hpcstage("cleanup", "--cache-dir", tmp_path / "c", "--older-than", "-1", env=env), 2, "--older-than")


def test_empty_manifest_says_there_is_nothing_to_do(tmp_path):
    (tmp_path / "m.yaml").write_text("cache_dir: cache\n")
    env = dict(os.environ, HF_HOME=str(tmp_path / "home"))
    one_line(hpcstage("pull", "-f", tmp_path / "m.yaml", env=env), 2, "nothing to pull")
    one_line(hpcstage("verify", "-f", tmp_path / "m.yaml", env=env), 2, "nothing to verify")


def test_a_corrupt_ledger_record_is_reported_with_a_fix_that_works(hub, tmp_path):
    """Was: the repo vanished from `status`."""
    cache = tmp_path / "c"
    env = client_env(hub, tmp_path / "default")
    assert hpcstage("pull", MODEL, "--cache-dir", cache, "-q", env=env).returncode == 0
    record = cache / ".locks" / "hpcstage" / "ledger" / "models--demo-org--tiny-model@main.json"
    record.write_text("{not json")
    r = hpcstage("status", "--cache-dir", cache, env=env)
    assert r.returncode == 1 and f"model {MODEL}@main\tunreadable" in r.stdout and str(record) in r.stdout, r.stdout
    assert run_hint(r.stdout, env).returncode == 0
    r = hpcstage("status", "--cache-dir", cache, env=env)
    assert r.returncode == 0 and f"model {MODEL}@main\tstaged\t7/7 files" in r.stdout, r.stdout


@pytest.mark.parametrize("body,words", [
    ("models:\n  - repo: org/m\n    revision: 1.0\n", ["m.yaml:3", "YAML read 1.0 as a number", "revision: '1.0'"]),
    ("models:\n  - repo: org/m\n    include: \"*.json\"\n", ["m.yaml:3", "is a list", "include: ['*.json']"]),
])
def test_yaml_slips_get_the_fix(tmp_path, body, words):
    """Was: "Input should be a valid string" / "Input should be a valid list"."""
    (tmp_path / "m.yaml").write_text(body)
    one_line(hpcstage("pull", "-f", tmp_path / "m.yaml", env=dict(os.environ)), 2, *words)


def test_a_dataset_under_models_is_told_to_move(hub, tmp_path):
    """Was: "check the id and --repo-type", a flag manifests do not have."""
    m = tmp_path / "m.yaml"
    m.write_text(f"cache_dir: cache\nmodels:\n  - repo: {DATASET}\n")
    env = client_env(hub, tmp_path / "default")
    one_line(hpcstage("pull", "-f", m, env=env), 1, f"list it under `datasets:` in {m}")
    m.write_text(f"cache_dir: cache\ndatasets:\n  - repo: {DATASET}\n")
    assert hpcstage("pull", "-f", m, "-q", env=env).returncode == 0


# -- 7. words ------------------------------------------------------------------------------------------------


def test_top_level_help_describes_the_tool():
    r = hpcstage("--help", env=dict(os.environ))
    assert "Stage Hugging Face models and datasets onto a shared filesystem" in r.stdout
    assert "argument parsing" not in r.stdout


def test_a_file_entry_is_a_copy_not_a_hardlink_to_the_hub_blob(hub, tmp_path):
    m = tmp_path / "m.yaml"
    m.write_text(f"cache_dir: cache\ndata_dir: data\ndatasets:\n  - repo: {MODEL}\n    repo_type: model\n"
                 "    file: config.json\n    dest: cfg\n")
    env = client_env(hub, tmp_path / "default")
    assert hpcstage("pull", "-f", m, "-q", env=env).returncode == 0
    staged = tmp_path / "data" / "cfg" / "config.json"
    blob = (snapshot(tmp_path / "cache", hub) / "config.json").resolve()
    assert staged.stat().st_ino != blob.stat().st_ino and staged.stat().st_nlink == 1
    staged.write_text("edited")
    assert blob.read_bytes() == hub.files_of("model", MODEL)["config.json"].local.read_bytes()
    r = hpcstage("status", "-f", m, env=env)
    assert "data cfg\t" in r.stdout and "data cfg@" not in r.stdout, r.stdout


# -- 8. hf download habits -----------------------------------------------------------------------------------


def test_pull_repo_file_stages_only_those_files(hub, tmp_path):
    """Was: `config.json` taken for a repo id (404)."""
    cache = tmp_path / "c"
    env = client_env(hub, tmp_path / "default")
    r = hpcstage("pull", MODEL, "config.json", "tokenizer.json", "--cache-dir", cache, env=env)
    assert r.returncode == 0, r.stderr
    assert sorted(p.name for p in snapshot(cache, hub).iterdir()) == ["config.json", "tokenizer.json"]
    assert not [rec for rec in hub.log if "model.safetensors" in rec.path]
    one_line(hpcstage("pull", MODEL, "confg.json", "--cache-dir", cache, env=env), 1, "has no file 'confg.json'")


def test_local_dir_materialises_plain_files(hub, tmp_path):
    cache, out = tmp_path / "c", tmp_path / "out"
    env = client_env(hub, tmp_path / "default")
    r = hpcstage("pull", MODEL, "--cache-dir", cache, "--local-dir", out, env=env)
    assert r.returncode == 0, r.stderr
    files = hub.files_of("model", MODEL)
    assert {p.name for p in out.iterdir()} == MODEL_FILES
    for name, info in files.items():
        p = out / name
        assert not p.is_symlink() and p.stat().st_nlink == 1 and p.read_bytes() == info.local.read_bytes()
    (out / "config.json").write_text("edited")  # the cache is untouched
    assert hpcstage("verify", MODEL, "--cache-dir", cache, env=env).returncode == 0
    r = hpcstage("pull", MODEL, "--cache-dir", cache, "--local-dir", out, env=env)
    assert r.returncode == 0 and "copied 1 files" in r.stdout, r.stdout
    assert (out / "config.json").read_bytes() == files["config.json"].local.read_bytes()


def test_update_asks_url_sources_conditionally_and_downloads_nothing_unchanged(uhub, tmp_path):
    """Was: `pull -f --update` downloaded every unchanged url: archive again."""
    m = tmp_path / "hpcstage.yaml"
    m.write_text(f"cache_dir: cache\ndata_dir: data\ndatasets:\n"
                 f"  - url: {url_of(uhub, 'plain.bin')}\n    allow_http: true\n    dest: plain\n"
                 f"  - url: {url_of(uhub, 'pages.tar.gz')}\n    allow_http: true\n    extract: true\n    dest: pages\n")
    env = client_env(uhub, tmp_path / "default")
    assert hpcstage("pull", "-f", m, "-q", env=env).returncode == 0
    lock = (tmp_path / "hpcstage.lock").read_bytes()
    uhub.clear_log()
    r = hpcstage("pull", "-f", m, "--update", "--json", env=env)
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["downloaded_bytes"] == 0
    log = uhub.log
    assert log and all(rec.method == "HEAD" and rec.bytes_sent == 0 for rec in log), log
    # one conditional HEAD per URL (LFS-suffixed names are redirected to the CDN, which answers 304)
    assert sorted(rec.status for rec in log if rec.server == "cdn") == [304, 304]
    assert all(rec.status == 302 for rec in log if rec.server == "hub")
    assert (tmp_path / "hpcstage.lock").read_bytes() == lock


def test_update_name_refreshes_one_entry(uhub, url_root, tmp_path):
    m = tmp_path / "hpcstage.yaml"
    m.write_text(f"cache_dir: cache\ndata_dir: data\ndatasets:\n"
                 f"  - url: {url_of(uhub, 'plain.bin')}\n    allow_http: true\n    dest: plain\n"
                 f"  - url: {url_of(uhub, 'other.bin')}\n    allow_http: true\n    dest: other\n")
    env = client_env(uhub, tmp_path / "default")
    assert hpcstage("pull", "-f", m, "-q", env=env).returncode == 0
    source = url_root / "datasets" / "demo-org" / "files" / "plain.bin"
    new = os.urandom(40_000)
    source.write_bytes(new)
    uhub.refresh()
    uhub.clear_log()
    r = hpcstage("pull", "-f", m, "--update", "plain", "-q", env=env)
    assert r.returncode == 0, r.stderr
    lfs = uhub.files_of("dataset", "demo-org/files")["plain.bin"].sha256
    assert {rec.path for rec in uhub.log} == {"/datasets/demo-org/files/resolve/main/plain.bin", f"/lfs/{lfs}"}
    assert (tmp_path / "data" / "plain" / "plain.bin").read_bytes() == new
    one_line(hpcstage("pull", "-f", m, "--update", "nope", env=env), 2, "--update nope", "plain", "other")


def test_changed_url_hint_updates_that_entry_and_corrupt_data_hint_repairs(uhub, url_root, tmp_path):
    """Was: `run hpcstage pull -f ... --update` (a literal `...`)."""
    m = tmp_path / "hpcstage.yaml"
    m.write_text(f"cache_dir: cache\ndata_dir: data\ndatasets:\n"
                 f"  - url: {url_of(uhub, 'other.bin')}\n    allow_http: true\n    dest: other\n")
    env = client_env(uhub, tmp_path / "default")
    assert hpcstage("pull", "-f", m, "-q", env=env).returncode == 0
    staged = tmp_path / "data" / "other" / "other.bin"
    flip(staged)
    r = hpcstage("verify", "-f", m, env=env)
    assert r.returncode == 1 and "corrupt" in r.stdout and hint(r.stdout) == ["verify", "-f", str(m), "--repair"]
    assert run_hint(r.stdout, env).returncode == 0
    source = url_root / "datasets" / "demo-org" / "files" / "other.bin"
    assert staged.read_bytes() == source.read_bytes()
    old = source.read_bytes()
    staged.unlink()
    source.write_bytes(os.urandom(20_000))
    uhub.refresh()
    try:
        r = hpcstage("pull", "-f", m, "-q", env=env)
        one_line(r, 1, "changed since it was locked")
        assert hint(r.stderr) == ["pull", "-f", str(m), "--update", "other"]
        assert run_hint(r.stderr, env).returncode == 0
        assert staged.read_bytes() == source.read_bytes()
    finally:
        source.write_bytes(old)
        uhub.refresh()


def test_corrupt_lockfile_hint_names_the_manifest(hub, tmp_path):
    """Was: `run hpcstage pull -f ... --update` (a literal `...`)."""
    m = tmp_path / "demo.yaml"
    m.write_text(f"cache_dir: cache\nmodels:\n  - repo: {MODEL}\n")
    env = client_env(hub, tmp_path / "default")
    (tmp_path / "hpcstage.lock").write_text("{broken")
    r = hpcstage("pull", "-f", m, env=env)
    one_line(r, 2, "not a valid hpcstage lockfile", "delete it")
    assert hint(r.stderr) == ["pull", "-f", str(m), "--update"]
    (tmp_path / "hpcstage.lock").unlink()
    assert run_hint(r.stderr, env).returncode == 0
    assert hpcstage("verify", "-f", m, env=env).returncode == 0


def test_local_dir_copies_only_the_files_named(hub, tmp_path):
    cache, out = tmp_path / "c", tmp_path / "out"
    env = client_env(hub, tmp_path / "default")
    assert hpcstage("pull", MODEL, "--cache-dir", cache, "-q", env=env).returncode == 0  # the whole repo cached
    r = hpcstage("pull", MODEL, "config.json", "--cache-dir", cache, "--local-dir", out, env=env)
    assert r.returncode == 0, r.stderr
    assert [p.name for p in out.iterdir()] == ["config.json"]


def test_update_name_of_a_hub_entry_re_resolves_only_that_one(hub, tmp_path):
    m = tmp_path / "hpcstage.yaml"
    m.write_text(f"cache_dir: cache\nmodels:\n  - repo: {MODEL}\ndatasets:\n  - repo: {DATASET}\n")
    env = client_env(hub, tmp_path / "default")
    assert hpcstage("pull", "-f", m, "-q", env=env).returncode == 0
    hub.clear_log()
    r = hpcstage("pull", "-f", m, "--update", DATASET, "--json", env=env)
    assert r.returncode == 0 and json.loads(r.stdout)["ok"] is True, r.stderr
    assert [rec.path for rec in hub.log] == [f"/api/datasets/{DATASET}/revision/main"]


def test_json_prints_a_summary_for_bad_input_too(tmp_path):
    (tmp_path / "m.yaml").write_text("cache_dir: cache\n")
    r = hpcstage("pull", "-f", tmp_path / "m.yaml", "--json", env=dict(os.environ))
    assert r.returncode == 2
    out = json.loads(r.stdout)
    assert out["ok"] is False and out["exit_code"] == 2 and "nothing to pull" in out["error"]


def test_unknown_revision_in_a_manifest_names_the_key_not_a_flag(hub, tmp_path):
    m = tmp_path / "m.yaml"
    m.write_text(f"cache_dir: cache\nmodels:\n  - repo: {MODEL}\n    revision: v9\n")
    r = hpcstage("pull", "-f", m, env=client_env(hub, tmp_path / "default"))
    err = one_line(r, 1, "revision 'v9' not found", f"check `revision:` of the entry in {m}")
    assert "--revision" not in err


@pytest.mark.parametrize("case", ["not_pulled", "no_listing", "ref_newline", "revision_not_staged"])
def test_more_verify_hints_run_and_fix(hub, tmp_path, case):
    cache = tmp_path / "c"
    env = client_env(hub, tmp_path / "default")
    commit = hub.commit_of("model", MODEL)
    args = [MODEL, "--cache-dir", cache]
    if case != "not_pulled":
        assert hpcstage("pull", MODEL, "--cache-dir", cache, "-q", env=env).returncode == 0
    if case == "no_listing":
        (cache / MODEL_DIR / "trees" / f"{commit}.json").unlink()
    if case == "ref_newline":
        (cache / MODEL_DIR / "refs" / "main").write_text(commit + "\n")
    if case == "revision_not_staged":
        args += ["--revision", "v1.0"]
    r = hpcstage("verify", *args, env=env)
    assert r.returncode == 1, r.stdout
    fixed = run_hint(r.stdout, env)
    assert fixed.returncode == 0, fixed.stdout + fixed.stderr
    assert str(cache) in " ".join(hint(r.stdout))  # never the default cache
    r = hpcstage("verify", *args, env=env)
    assert r.returncode == 0, r.stdout


def test_verify_with_a_manifest_hints_the_pull_for_unpulled_entries(uhub, tmp_path):
    m = tmp_path / "m.yaml"
    m.write_text(f"cache_dir: cache\ndata_dir: data\ndatasets:\n  - repo: demo-org/files\n"
                 f"  - url: {url_of(uhub, 'other.bin')}\n    allow_http: true\n    dest: other\n")
    env = client_env(uhub, tmp_path / "default")
    r = hpcstage("verify", "-f", m, env=env)
    assert r.returncode == 1 and "not_staged" in r.stdout, r.stdout
    assert {tuple(shlex.split(c)) for c in re.findall(r"`(hpcstage [^`]+)`", r.stdout)} == {("hpcstage", "pull", "-f", str(m))}
    assert run_hint(r.stdout, env).returncode == 0
    assert hpcstage("verify", "-f", m, env=env).returncode == 0


def test_yaml_slip_fixes_load(tmp_path):
    (tmp_path / "m.yaml").write_text("models:\n  - repo: org/m\n    revision: '1.0'\n    include: ['*.json']\n")
    r = hpcstage("status", "-f", tmp_path / "m.yaml", env=dict(os.environ, HF_HOME=str(tmp_path / "h")))
    assert r.returncode == 1 and "model org/m@1.0\tmissing" in r.stdout, r.stdout + r.stderr  # valid: not exit 2


@pytest.mark.parametrize("argv", [["verify", "-f", "m.yaml", "--json"], ["status", "--cache-dir", "nope", "--json"],
                                  ["check", "-f", "m.yaml", "--json"]])
def test_every_json_command_prints_json_on_failure(tmp_path, argv):
    (tmp_path / "m.yaml").write_text("models:\n  - repo: org/m\n    revision: 1.0\n")
    r = hpcstage(*argv, env=dict(os.environ, HF_HOME=str(tmp_path / "h")), cwd=tmp_path)
    assert r.returncode == 2
    out = json.loads(r.stdout)
    assert out["ok"] is False and out["error"] in r.stderr


def test_check_fix_keeps_the_cache_dir_it_was_given(hub, tmp_path):
    manifest, cache = tmp_path / "m.yaml", tmp_path / "c"
    manifest.write_text(f"models:\n  - repo: {MODEL}\n    include: ['*.json']\n")
    env = client_env(hub, tmp_path / "default")
    assert hpcstage("pull", "-f", manifest, "--cache-dir", cache, "-q", env=env).returncode == 0
    manifest.write_text(f"models:\n  - repo: {MODEL}\n")  # now the weights too
    r = hpcstage("check", "-f", manifest, "--cache-dir", cache, "--isolation", "guard", env=env)
    assert r.returncode == 1, r.stdout
    fix = [x for x in r.stdout.splitlines() if x.startswith("MISSING")][0].split("\tfix: ")[1]
    assert hint(fix) == ["pull", "-f", str(manifest), "--cache-dir", str(cache)]
    assert run_hint(fix, env).returncode == 0
    assert hpcstage("check", "-f", manifest, "--cache-dir", cache, "--isolation", "guard", env=env).returncode == 0
    assert not (tmp_path / "default" / "hub").exists()


def test_verify_repair_under_hf_hub_offline_refuses_before_deleting(hub, tmp_path):
    cache = tmp_path / "c"
    env = client_env(hub, tmp_path / "default")
    assert hpcstage("pull", MODEL, "--cache-dir", cache, "-q", env=env).returncode == 0
    weights = hub.files_of("model", MODEL)["model.safetensors"]
    blob = cache / MODEL_DIR / "blobs" / weights.etag
    flip(blob)
    r = hpcstage("verify", MODEL, "--cache-dir", cache, "--repair", env=dict(env, HF_HUB_OFFLINE="1"))
    one_line(r, 2, "HF_HUB_OFFLINE=1 is set")
    assert blob.exists()  # nothing deleted
    assert hpcstage("verify", MODEL, "--cache-dir", cache, "--repair", env=env).returncode == 0
    assert sha256(blob) == weights.sha256
