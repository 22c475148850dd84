"""The library API, used only through `import hpcstage` as a Python user would: `stage` returns the snapshot
folder that the real huggingface_hub and transformers load offline; errors carry their fields; everything
is silent unless a progress callback is given."""
from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

import hpcstage
from helpers import job_stack, sha256

MODEL = "demo-org/tiny-model"
DATASET = "demo-org/tiny-dataset"


@pytest.fixture
def api_env(hub, monkeypatch):
    """The library reads HF_ENDPOINT and the token at call time: point them at the emulator."""
    for name in [k for k in os.environ if k.startswith(("HF_", "HUGGING_FACE_"))]:
        monkeypatch.delenv(name)
    monkeypatch.setenv("HF_ENDPOINT", hub.url)
    monkeypatch.setenv("HF_HOME", "/nonexistent-hf-home")  # no token file: the calls say what they use
    monkeypatch.setenv("NO_PROXY", "127.0.0.1")
    return hub


def test_import_is_cheap_and_typed():
    code = ("import sys, hpcstage; heavy = [m for m in ('huggingface_hub', 'pydantic', 'rich', 'typing') "
            "if m in sys.modules]; print(heavy)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
    assert (Path(hpcstage.__file__).parent / "py.typed").is_file()
    for name in ("stage", "stage_manifest", "verify", "prebuild", "check_offline", "job_env", "launch"):
        assert name in hpcstage.__all__ and callable(getattr(hpcstage, name)), name
        assert "Raises:" in getattr(hpcstage.api, name).__doc__ and "Returns:" in getattr(hpcstage.api, name).__doc__


def test_stage_returns_the_snapshot_and_transformers_loads_it_offline(api_env, tmp_path, capsys):
    hub = api_env
    calls = []
    snapshot = hpcstage.stage(MODEL, cache_dir=tmp_path / "hub", progress=lambda *counts: calls.append(counts))
    commit = hub.commit_of("model", MODEL)
    assert snapshot == (tmp_path / "hub" / "models--demo-org--tiny-model" / "snapshots" / commit)
    files = hub.files_of("model", MODEL)
    for path in files:
        assert sha256(snapshot / path) == hashlib.sha256((hub.root / "models" / MODEL / path).read_bytes()).hexdigest()
    total = sum(f.size for f in files.values())
    assert calls[-1] == (total, total, len(files), len(files))
    assert capsys.readouterr() == ("", "")  # silent: no bar, no summary line
    hub.clear_log()
    calls.clear()
    assert hpcstage.stage(MODEL, cache_dir=tmp_path / "hub", progress=lambda *c: calls.append(c)) == snapshot
    assert hub.log == [] or [r.path for r in hub.log] == [f"/api/models/{MODEL}/revision/main"]
    assert calls and calls[-1][2] == calls[-1][3] == len(files)  # told once even when nothing moved

    # The jobs' stack (huggingface_hub 2.4, transformers 5) loads the returned folder with the network off.
    python = job_stack("current")["python"]
    load = (
        "import json, sys\n"
        "from huggingface_hub import snapshot_download\n"
        "from transformers import AutoConfig, AutoTokenizer\n"
        "folder = sys.argv[1]\n"
        "print(json.dumps({'snapshot': snapshot_download(sys.argv[2], local_files_only=True),\n"
        "                  'model_type': AutoConfig.from_pretrained(folder).model_type,\n"
        "                  'ids': AutoTokenizer.from_pretrained(folder)('cache node job')['input_ids']}))\n")
    env = {**{k: v for k, v in os.environ.items() if not k.startswith("HF_")},
           **hpcstage.job_env(cache_dir=tmp_path / "hub"), "HF_ENDPOINT": "http://127.0.0.1:9"}
    hub.clear_log()
    r = subprocess.run([python, "-c", load, str(snapshot), MODEL], env=env, capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    loaded = json.loads(r.stdout.strip().splitlines()[-1])
    assert loaded["snapshot"] == str(snapshot) and loaded["model_type"] == "llama" and loaded["ids"]
    assert hub.log == []


def test_stage_with_patterns_and_a_tag(api_env, tmp_path):
    hub = api_env
    snapshot = hpcstage.stage(MODEL, revision="v1.0", include="*.json", cache_dir=tmp_path / "hub", workers=2)
    assert snapshot.name == hub.commit_of("model", MODEL, "v1.0")
    staged = sorted(p.relative_to(snapshot).as_posix() for p in snapshot.rglob("*") if p.is_file())
    assert staged and all(p.endswith(".json") for p in staged)
    assert (snapshot.parent.parent / "refs" / "v1.0").read_text() == snapshot.name


def test_errors_carry_repo_path_status_and_hint(api_env, tmp_path):
    hub = api_env
    with pytest.raises(hpcstage.RepoNotFound) as gone:
        hpcstage.stage("demo-org/no-such-model", cache_dir=tmp_path / "hub")
    assert (gone.value.repo, gone.value.status) == ("demo-org/no-such-model", 401)
    assert gone.value.hint and gone.value.hint in str(gone.value)
    with pytest.raises(hpcstage.RevisionNotFound) as rev:
        hpcstage.stage(MODEL, revision="no-such-branch", cache_dir=tmp_path / "hub")
    assert (rev.value.repo, rev.value.status) == (MODEL, 404) and rev.value.hint
    hub.gate(MODEL)
    with pytest.raises(hpcstage.GatedRepo) as gated:
        hpcstage.stage(MODEL, include="config.json", cache_dir=tmp_path / "hub")
    assert (gated.value.repo, gated.value.path, gated.value.status) == (MODEL, "config.json", 401)
    assert f"{hub.url}/{MODEL}" in gated.value.hint and isinstance(gated.value, hpcstage.RepoRefused)
    assert not list((tmp_path / "hub").rglob("config.json"))
    hub.clear_log()
    for bad in (lambda: hpcstage.stage("not a repo", cache_dir=tmp_path / "x"),
                lambda: hpcstage.stage(MODEL, include=[1], cache_dir=tmp_path / "x"),
                lambda: hpcstage.stage(MODEL, workers=0, cache_dir=tmp_path / "x"),
                lambda: hpcstage.launch("run", comand="true", dry_run=True)):
        with pytest.raises(hpcstage.BadInput) as refused:
            bad()
        assert refused.value.exit_code == 2 and "\n" not in str(refused.value)
    assert "did you mean 'command'" in str(refused.value)
    assert hub.log == [] and not (tmp_path / "x").exists()  # refused before any request or write


def test_stage_manifest_verify_and_job_env(api_env, tmp_path):
    hub = api_env
    manifest = tmp_path / "hpcstage.yaml"
    manifest.write_text(f"cache_dir: hub\nmodels:\n  - repo: {MODEL}\ndatasets:\n  - repo: {DATASET}\n")
    summary = hpcstage.stage_manifest(manifest)
    assert isinstance(summary, hpcstage.PullSummary)
    assert [(r.repo_id, r.snapshot.name) for r in summary.repos] == [
        (MODEL, hub.commit_of("model", MODEL)), (DATASET, hub.commit_of("dataset", DATASET))]
    lock = json.loads((tmp_path / "hpcstage.lock").read_text())
    assert lock["entries"][f"model:{MODEL}@main"]["commit"] == hub.commit_of("model", MODEL)
    hub.clear_log()
    assert hpcstage.stage_manifest(manifest).downloaded_files == 0 and hub.log == []  # warm: from the lockfile
    with pytest.raises(hpcstage.BadInput, match="no such entry"):
        hpcstage.stage_manifest(manifest, update=["demo-org/other"])

    report = hpcstage.verify(manifest=manifest)
    assert report.ok and report.files == summary.files
    blob = (summary.repos[0].snapshot / "config.json").resolve()
    blob.chmod(0o644)
    blob.write_bytes(b"{}")
    again = hpcstage.verify(MODEL, cache_dir=tmp_path / "hub")  # twice: `hpcstage.verify` stays the call
    assert [(p.kind, p.path) for p in again.problems] == [("corrupt", "config.json")]
    fixed = hpcstage.verify(manifest=manifest, repair=True)
    assert fixed.ok and [p.path for p in fixed.repaired] == ["config.json"]
    assert sha256(blob) == hashlib.sha256((hub.root / "models" / MODEL / "config.json").read_bytes()).hexdigest()

    env = hpcstage.job_env(manifest)
    assert env["HF_HUB_OFFLINE"] == env["HF_DATASETS_OFFLINE"] == env["TRANSFORMERS_OFFLINE"] == "1"
    assert env["HF_HUB_CACHE"] == str((tmp_path / "hub").resolve())


def test_prebuild_and_check_offline(api_env, tmp_path):
    manifest = tmp_path / "hpcstage.yaml"
    manifest.write_text(f"cache_dir: hub\ndatasets_cache_dir: ds\nmodels:\n  - repo: {MODEL}\n"
                        f"datasets:\n  - repo: {DATASET}\n    load: {{split: train}}\n")
    hpcstage.stage_manifest(manifest)
    events = []
    built = hpcstage.prebuild(manifest, on_event=lambda kind, text: events.append(kind))
    assert built.ok and [r.status for r in built.results] == ["built"] and "built" in events
    assert list((tmp_path / "ds").glob("demo-org___tiny-dataset/*/*/*/dataset_info.json"))
    report = hpcstage.check_offline(manifest)
    assert report.ok and len(report.entries) == 2 and all(e.ok for e in report.entries)
    (tmp_path / "hub" / "models--demo-org--tiny-model" / "snapshots" / api_env.commit_of("model", MODEL)
     / "config.json").unlink()
    missing = hpcstage.check_offline(manifest)
    assert not missing.ok and "hpcstage pull -f" in next(e.fix for e in missing.entries if not e.ok)


def test_launch_dry_run_renders_and_submits_nothing(tmp_path):
    done = hpcstage.launch("run", dry_run=True, cluster="local", partition="short", command="echo hello",
                           experiments_dir=tmp_path / "exp", name="api-run", stage=False)
    assert isinstance(done, hpcstage.Launch) and done.dry_run and done.experiment_dir == tmp_path / "exp" / "api-run"
    script = done.jobs[0].script.read_text()
    assert "echo hello" in script and "#SBATCH --partition=short" in script and done.jobs[0].ids == []
