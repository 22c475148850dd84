"""`hpcstage check`: every entry loaded as a job would, in a process with the offline flags and the
network off; exit 1 naming what is missing and the command that fixes it."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest

from hpcstage import offline
from helpers import client_env
from test_prebuild import hpcstage, stage

MODEL = "demo-org/tiny-model"


def test_check_passes_offline_then_names_a_deleted_tokenizer_and_the_fix(hub, tmp_path):
    manifest, _ = stage(hub, tmp_path)
    env = client_env(hub, tmp_path / "unused")
    hub.clear_log()
    r = hpcstage("check", "-f", str(manifest), env=env)
    assert r.returncode == 0, r.stdout + r.stderr
    isolation = "netns" if offline.netns_available() else "guard"
    assert r.stdout.splitlines()[-1].startswith(f"ready: 3 of 3 entries load offline (network off: {isolation}")
    assert hub.log == []

    snapshot = tmp_path / "hub" / "models--demo-org--tiny-model" / "snapshots" / hub.commit_of("model", MODEL)
    (snapshot / "tokenizer.json").unlink()
    r = hpcstage("check", "-f", str(manifest), env=env)
    assert r.returncode == 1
    bad = [line for line in r.stdout.splitlines() if line.startswith("MISSING")]
    assert bad == [f"MISSING\tmodel {MODEL}@main\ttokenizer.json is in the repo but not staged\t"
                   f"fix: hpcstage pull -f {manifest}"]
    assert "Traceback" not in r.stderr

    assert hpcstage("pull", "-f", str(manifest), "-q", env=env).returncode == 0  # the printed fix, run
    assert hpcstage("check", "-f", str(manifest), env=env).returncode == 0


def test_tokenizer_excluded_by_patterns_is_a_finding_with_the_include_fix(hub, tmp_path):
    manifest = tmp_path / "hpcstage.yaml"
    manifest.write_text(f"cache_dir: hub\nmodels:\n  - repo: {MODEL}\n    exclude: ['tokenizer.json']\n")
    env = client_env(hub, tmp_path / "unused")
    assert hpcstage("pull", "-f", str(manifest), "-q", env=env).returncode == 0
    r = hpcstage("check", "-f", str(manifest), "--json", env=env)
    assert r.returncode == 1
    report = json.loads(r.stdout)
    assert report["ok"] is False and report["isolation"] == ("netns" if offline.netns_available() else "guard")
    [entry] = report["entries"]
    assert entry["problems"] == ["tokenizer.json is in the repo but not staged"]
    assert "add 'tokenizer.json' to include" in entry["fix"] and f"hpcstage pull -f {manifest}" in entry["fix"]


def test_without_prebuild_check_names_the_prebuild_command_and_builds_nothing(hub, tmp_path):
    manifest, _ = stage(hub, tmp_path, prebuild=False)
    r = hpcstage("check", "-f", str(manifest), "--json", env=client_env(hub, tmp_path / "unused"))
    assert r.returncode == 1
    entries = {e["entry"]: e for e in json.loads(r.stdout)["entries"]}
    assert entries[f"model {MODEL}@main"]["ok"]
    bad = [e for e in entries.values() if not e["ok"]]
    assert len(bad) == 2 and all(e["fix"] == f"hpcstage prebuild -f {manifest}" for e in bad)
    assert not list((tmp_path / "datasets").rglob("*.arrow"))  # check never builds in the job's place


def test_unpulled_manifest_names_the_pull_command(hub, tmp_path):
    manifest = tmp_path / "hpcstage.yaml"
    manifest.write_text(f"cache_dir: hub\nmodels:\n  - repo: {MODEL}\n")
    r = hpcstage("check", "-f", str(manifest), env=client_env(hub, tmp_path / "unused"))
    assert r.returncode == 1 and f"fix: hpcstage pull -f {manifest}" in r.stdout
    assert hub.log == []
    r = hpcstage("check", "-f", str(tmp_path / "nope.yaml"), env=client_env(hub, tmp_path / "unused"))
    assert r.returncode == 2 and "nope.yaml" in r.stderr and "Traceback" not in r.stderr


CONNECT = "import socket, sys\nsocket.create_connection(('127.0.0.1', int(sys.argv[1])), timeout=5)\nprint('connected')"


@pytest.mark.parametrize("isolation", ["netns", "guard"])
def test_the_check_process_really_has_no_network(hub, isolation):
    if isolation == "netns" and not offline.netns_available():
        pytest.skip("unshare -n is not permitted here")
    port = hub.url.rstrip("/").rsplit(":", 1)[1]
    control = subprocess.run([sys.executable, "-c", CONNECT, port],
                             capture_output=True, text=True, timeout=30)
    assert control.stdout.strip() == "connected", control.stderr  # the server is reachable without isolation
    r = subprocess.run([*offline.isolated_command(CONNECT, isolation), port], capture_output=True, text=True,
                       timeout=30)
    assert r.returncode != 0 and "connected" not in r.stdout
    assert "Network is unreachable" in r.stderr or "the network is off" in r.stderr


def test_a_newer_build_of_another_commit_is_named_and_prebuild_puts_ours_back_on_top(hub, tmp_path):
    """Offline, datasets ignores `revision` and loads the newest build of the config: a build of another
    commit made later (by hand, or by an older stage) would silently win."""
    manifest, _ = stage(hub, tmp_path)
    env = client_env(hub, tmp_path / "unused")
    ours = next((tmp_path / "datasets" / "demo-org___tiny-dataset").glob("default/0.0.0/*/"))
    other = ours.with_name("f" * 40)
    shutil.copytree(ours, other)
    os.utime(other, (ours.stat().st_mtime + 60,) * 2)

    r = hpcstage("check", "-f", str(manifest), "--json", env=env)
    assert r.returncode == 1
    [bad] = [e for e in json.loads(r.stdout)["entries"] if not e["ok"]]
    assert str(other) in bad["problems"][0] and bad["fix"] == f"hpcstage prebuild -f {manifest}"

    r = hpcstage("prebuild", "-f", str(manifest), "--json", env=env)
    assert [x["status"] for x in json.loads(r.stdout)["results"]] == ["skipped", "skipped"]
    assert hpcstage("check", "-f", str(manifest), env=env).returncode == 0


def test_a_job_environment_is_offline_whatever_the_callers_hf_variables_say(tmp_path):
    """The caller's own HF_* settings (online flags, another endpoint or cache) never reach a job; its
    credentials and HF_HOME do, and the rest of its environment is kept."""
    base = {"PATH": "/usr/bin", "HF_HUB_OFFLINE": "0", "HF_DATASETS_OFFLINE": "0", "TRANSFORMERS_OFFLINE": "0",
            "HF_ENDPOINT": "http://127.0.0.1:9", "HF_HUB_CACHE": "/elsewhere", "HUGGING_FACE_HUB_TOKEN": "old",
            "HF_HOME": "/home/u/hf", "HF_TOKEN": "t", "HF_TOKEN_PATH": "/home/u/tok"}
    out = offline.job_env(cache_dir=tmp_path / "hub", datasets_cache_dir=tmp_path / "ds", base=base)
    assert {k: out[k] for k in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE")} == \
        {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    assert out["HF_HUB_CACHE"] == str((tmp_path / "hub").resolve())
    assert out["HF_DATASETS_CACHE"] == str((tmp_path / "ds").resolve())
    assert "HF_ENDPOINT" not in out and "HUGGING_FACE_HUB_TOKEN" not in out
    assert (out["PATH"], out["HF_HOME"], out["HF_TOKEN"], out["HF_TOKEN_PATH"]) == \
        ("/usr/bin", "/home/u/hf", "t", "/home/u/tok")
    assert out["HF_HUB_DISABLE_PROGRESS_BARS"] == out["HF_DATASETS_DISABLE_PROGRESS_BARS"] == "1"
    with pytest.raises(TypeError):
        offline.job_env(None, tmp_path)  # cache folders by keyword only: a swapped pair cannot slip through
    os.environ["HPCSTAGE_TEST_MARK"] = "here"  # default base: this process's environment
    try:
        assert offline.job_env(cache_dir=tmp_path)["HPCSTAGE_TEST_MARK"] == "here"
    finally:
        del os.environ["HPCSTAGE_TEST_MARK"]


def test_isolated_commands_run_the_given_python_with_the_network_off():
    assert offline.isolated_command("print(1)", "netns", "/opt/py") == ["unshare", "-n", "/opt/py", "-c", "print(1)"]
    guarded = offline.isolated_command("print(1)", "guard")
    assert guarded[:2] == [sys.executable, "-c"] and guarded[2].endswith("print(1)") and guarded[2] != "print(1)"
    assert offline.isolated_command("x", "netns")[2] == sys.executable


def test_netns_available_says_whether_unshare_n_can_start_a_process_here(monkeypatch):
    if shutil.which("unshare") is None:
        works = False
    else:
        works = subprocess.run(["unshare", "-n", "true"], capture_output=True, timeout=60).returncode == 0
    monkeypatch.setattr(offline, "_netns", None)
    assert offline.netns_available() is works
    monkeypatch.setattr(offline.subprocess, "run", None)  # asked once per process: the answer is kept
    assert offline.netns_available() is works


def test_without_a_working_unshare_the_guard_is_used_and_nothing_is_printed(tmp_path, monkeypatch, capfd):
    fake = tmp_path / "bin"
    fake.mkdir()
    (fake / "unshare").write_text("#!/bin/sh\necho 'unshare: unshare failed: Operation not permitted' >&2\nexit 1\n")
    (fake / "unshare").chmod(0o755)
    killed = tmp_path / "killed"
    killed.mkdir()
    (killed / "unshare").write_text("#!/bin/sh\nkill -9 $$\n")  # a negative return code: not a success either
    (killed / "unshare").chmod(0o755)
    for path, why in [(str(fake), "refused"), (str(killed), "killed"), (str(tmp_path / "empty"), "missing")]:
        monkeypatch.setenv("PATH", path)
        monkeypatch.setattr(offline, "_netns", None)
        assert offline.netns_available() is False, why
    assert capfd.readouterr() == ("", "")
