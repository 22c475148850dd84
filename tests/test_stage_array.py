"""Staging as a Slurm job array on the real test cluster: workers share a planned manifest through the
leases, every file lands once, a cancelled worker's files are finished by the others."""
from __future__ import annotations

import json
import os
import random
import time
from pathlib import Path

import pytest

from helpers import client_env, hpcstage, online_nodes, slurm_saved_environments, wait_for
from hpcstage.testing.hub import FaultRule, HubServer
from hpcstage.slurm.jobs import job_states, wait
from hpcstage.slurm.submit import cancel

MODEL, DATASET = "demo-org/array-model", "demo-org/array-dataset"
SMALL_FILES = 2000


@pytest.fixture(scope="module")
def array_root(tmp_path_factory):
    """A model (one 40 MiB LFS file + config) and a 2,000-file dataset of small json files."""
    root = tmp_path_factory.mktemp("array")
    rng = random.Random(3)
    model = root / "models" / MODEL
    model.mkdir(parents=True)
    (model / "config.json").write_text('{"model_type": "llama"}\n')
    (model / "model.safetensors").write_bytes(rng.randbytes(40 << 20))
    data = root / "datasets" / DATASET / "data"
    data.mkdir(parents=True)
    for i in range(SMALL_FILES):
        (data / f"{i // 100:02d}" / f"rec-{i:04d}.json").parent.mkdir(exist_ok=True)
        (data / f"{i // 100:02d}" / f"rec-{i:04d}.json").write_text(json.dumps({"id": i, "text": rng.randbytes(600).hex()}))
    return root


@pytest.fixture
def array_hub(array_root):
    with HubServer(array_root) as server:
        yield server


def manifest_in(folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "hpcstage.yaml"
    path.write_text(f"cache_dir: cache\nmodels:\n  - repo: {MODEL}\ndatasets:\n  - repo: {DATASET}\n")
    return path


def content_gets(server) -> list[tuple[str, str | None]]:
    """Content requests that delivered bytes (a 302 to the CDN is not content), with their byte range."""
    return [(rec.path, rec.range) for rec in server.log if rec.method == "GET" and rec.status in (200, 206)
            and (rec.server == "cdn" or "/resolve" in rec.path)]  # also /api/resolve-cache/ (regular files)


def test_four_workers_stage_each_file_once_and_verify_clean(cluster, array_hub, tmp_path):
    manifest = manifest_in(tmp_path / "array")
    env = online_nodes(tmp_path, client_env(array_hub, tmp_path))
    started = time.monotonic()
    r = hpcstage("pull", "-f", str(manifest), "--slurm-array", "4", "--cluster", "local", "--wait", env=env)
    array_seconds = time.monotonic() - started
    assert r.returncode == 0, r.stdout + r.stderr
    gets = content_gets(array_hub)
    assert len(gets) == len(set(gets))  # no byte range of any file asked twice
    assert len({path for path, _ in gets}) == SMALL_FILES + 2  # and every file was fetched
    api = [(rec.path, rec.query) for rec in array_hub.log if "/api/" in rec.path]
    assert api and len(api) == len(set(api))  # metadata asked once, by the planning step; workers use the lock
    jobs = json.loads(next((tmp_path / "array" / "hpcstage-array").glob("*/jobs.json")).read_text())
    assert len(list(Path(jobs["folder"]).glob("worker-*.out"))) == 4
    v = hpcstage("verify", "-f", str(manifest), env=env)
    assert v.returncode == 0, v.stdout + v.stderr

    single = tmp_path / "single"
    array_hub.clear_log()
    started = time.monotonic()
    r = hpcstage("pull", "-f", str(manifest_in(single)), "-q", env=env)
    single_seconds = time.monotonic() - started
    assert r.returncode == 0, r.stderr
    print(f"[measure] 4-worker array (plan + submit + run + verify): {array_seconds:.1f}s; "
          f"single-process pull: {single_seconds:.1f}s")


def test_a_cancelled_worker_leaves_its_files_to_the_others(cluster, array_hub, tmp_path):
    manifest = manifest_in(tmp_path / "array")
    env = online_nodes(tmp_path, client_env(array_hub, tmp_path))
    array_hub.add_fault(FaultRule(path=r"/resolve/", server="hub", delay=0.1))  # 2,000 files / 24 threads: ~8 s
    r = hpcstage("pull", "-f", str(manifest), "--slurm-array", "3", "--cluster", "local", env=env)
    assert r.returncode == 0, r.stdout + r.stderr
    jobs = json.loads(next((tmp_path / "array" / "hpcstage-array").glob("*/jobs.json")).read_text())
    victim = f"{jobs['array_id']}_1"
    deadline = time.monotonic() + 60
    while job_states([victim]).get(victim, None) is None or job_states([victim])[victim].state != "RUNNING":
        assert time.monotonic() < deadline, "worker 1 never ran"
        time.sleep(0.2)
    wait_for(lambda: len(array_hub.log) >= 300, 120, "the workers to be under way")  # of ~2,000 requests
    cancel([victim])
    states = wait([jobs["finish_id"], jobs["report_id"]], timeout=240, poll=0.5)
    assert states[jobs["finish_id"]].state == "COMPLETED", states
    assert job_states([victim])[victim].state == "CANCELLED"
    finish_log = next(Path(jobs["folder"]).glob("finish-*.out")).read_text()
    assert "downloaded 0 " in finish_log, finish_log  # the other workers had finished the victim's files
    v = hpcstage("verify", "-f", str(manifest), env=env)
    assert v.returncode == 0, v.stdout + v.stderr
    st = hpcstage("status", "-f", str(manifest), env=env)
    assert st.returncode == 0 and st.stdout.count("\tstaged\t") == 2, st.stdout


def test_wait_gives_up_when_the_workers_can_never_start(cluster, tmp_path, capsys):
    """The issue's hang: workers asking for more time than the partition allows sat in PartitionTimeLimit and
    `--wait` printed progress forever. Now the first poll that sees the reason ends the wait with it."""
    from hpcstage.manifest import load_manifest
    from hpcstage.slurm.stage_array import ArrayRun, NeverRunsError, follow
    from hpcstage.slurm.submit import submit

    folder = tmp_path / "array"
    manifest = load_manifest(manifest_in(folder))
    script = folder / "true.sbatch"
    script.write_text("#!/bin/bash\ntrue\n")
    out = [f"--output={folder / 'slurm-%j.out'}"]
    workers = submit(script, extra_args=["--partition=short", "--time=1:00:00", "--array=0-1", *out])
    finish = submit(script, extra_args=[f"--dependency=afterany:{workers}", *out])
    report = submit(script, extra_args=[f"--dependency=afterany:{finish}", *out])
    try:
        deadline = time.monotonic() + 30  # PartitionConfig for a moment after sbatch
        while not any(s.reason == "PartitionTimeLimit" for s in job_states([workers]).values()):
            assert time.monotonic() < deadline
            time.sleep(0.2)
        run = ArrayRun(folder, 2, workers, finish, report)
        with pytest.raises(NeverRunsError) as err:
            follow(run, manifest, folder / "cache", poll=600)  # a second poll would take 10 minutes
        assert str(err.value).startswith(f"job {workers}") and "is PENDING (PartitionTimeLimit) and will never start" \
            in str(err.value)
        last = capsys.readouterr().err.splitlines()[-1]  # the progress line says what the workers wait for
        assert "array: 0 running, pending (PartitionTimeLimit): 0/0 files" in last, last
    finally:
        cancel([workers, finish, report])


def test_array_time_over_the_partitions_limit_is_refused_before_any_sbatch(cluster, tmp_path):
    manifest = manifest_in(tmp_path / "array")
    env = online_nodes(tmp_path, {k: v for k, v in os.environ.items() if not k.startswith("HF_")})
    r = hpcstage("pull", "-f", str(manifest), "--slurm-array", "2", "--cluster", "local", "--partition", "short",
                 "--time", "1:00:00", "--wait", env=env)
    assert r.returncode == 2
    assert r.stderr == ("hpcstage: error: --time 1:00:00 is over partition short's limit of 00:10:00 (from `scontrol "
                        "show partition short`); ask for 00:10:00 or less, or pick a partition with a longer limit "
                        "(--partition)\n")
    assert not (tmp_path / "array" / "hpcstage-array").exists() and not (tmp_path / "array" / "hpcstage.lock").exists()


def test_two_workers_without_slurm_share_the_plan_and_fetch_each_file_once(array_hub, tmp_path, monkeypatch):
    """What each array task runs (`pull -f M --worker`), here as two local processes started together: the
    planned lockfile is their only metadata, batch leases split the small files between them, and every
    file arrives once. Runs without the Slurm cluster, so the worker path is covered wherever tests run."""
    from hpcstage.manifest import load_manifest
    from hpcstage.staging import plan_manifest

    manifest = manifest_in(tmp_path / "array")
    env = client_env(array_hub, tmp_path)
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    plan = plan_manifest(load_manifest(manifest))
    assert plan.downloaded_files == SMALL_FILES + 2  # all still to fetch
    assert not (tmp_path / "array" / "cache" / "models--demo-org--array-model" / "blobs").exists()
    array_hub.clear_log()
    import subprocess
    import sys

    workers = [
        subprocess.Popen([sys.executable, "-m", "hpcstage", "pull", "-f", str(manifest), "--worker", "-q"],
                         env={**os.environ, **env}, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for _ in range(2)
    ]
    for w in workers:
        out, err = w.communicate(timeout=600)
        assert w.returncode == 0, out + err
    gets = content_gets(array_hub)
    assert len(gets) == len(set(gets))  # no byte range of any file asked twice
    assert len({path for path, _ in gets}) == SMALL_FILES + 2  # and every file was fetched
    metadata = [rec.path for rec in array_hub.log if "/api/" in rec.path and "/api/resolve-cache/" not in rec.path]
    assert not metadata  # the workers asked no metadata: the lockfile is their plan
    v = hpcstage("verify", "-f", str(manifest), env=env)
    assert v.returncode == 0, v.stdout + v.stderr


GATED = "demo-org/array-gated"


def test_workers_pull_a_gated_repo_with_the_token_of_the_secrets_file_and_slurm_never_holds_it(cluster, tmp_path):
    """The token reaches the workers only by the secrets file they source at run time: not through sbatch's
    environment (slurmctld stores it), a script, a record or a log. Without a secrets file naming it, the
    submitting shell's HF_TOKEN is withheld and pull says so."""
    token = f"hf_CANARY{os.urandom(8).hex()}"
    root = tmp_path / "repos"
    repo = root / "models" / GATED
    repo.mkdir(parents=True)
    (repo / "config.json").write_text('{"model_type": "llama"}\n')
    for i in range(3):
        (repo / f"shard-{i}.bin").write_bytes(random.Random(i).randbytes(64 << 10))
    with HubServer(root) as hub:
        hub.gate(GATED, granted=(token,))
        hub.add_fault(FaultRule(path=r"/resolve/", server="hub", delay=1.0))  # the jobs stay queued a while
        folder = tmp_path / "array"
        folder.mkdir()
        manifest = folder / "hpcstage.yaml"
        manifest.write_text(f"cache_dir: cache\nmodels:\n  - repo: {GATED}\n")
        secrets = tmp_path / "secrets.env"
        fd = os.open(secrets, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        os.write(fd, f"export HF_TOKEN={token}\n".encode())
        os.close(fd)
        env = online_nodes(tmp_path, client_env(hub, tmp_path, HF_TOKEN=token))
        env["HPCSTAGE_SECRETS_FILE"] = str(secrets)
        r = hpcstage("pull", "-f", str(manifest), "--slurm-array", "2", "--cluster", "local", env=env)
        assert r.returncode == 0, r.stdout + r.stderr
        assert "warning" not in r.stderr, r.stderr
        jobs = json.loads(next((folder / "hpcstage-array").glob("*/jobs.json")).read_text())
        saved = slurm_saved_environments(jobs["report_id"])  # pending until the workers and finish are done
        assert saved, "slurmctld's copy of the report job's environment was not found"
        saved_env = saved[0].read_bytes()
        assert f"HF_ENDPOINT={hub.url}".encode() in saved_env  # the right file: it holds what sbatch exported
        states = wait([jobs["finish_id"], jobs["report_id"]], timeout=240, poll=0.5)
        assert states[jobs["finish_id"]].state == "COMPLETED", states
        gated = [rec for rec in hub.log if GATED in rec.path and "/resolve/" in rec.path]
        assert gated and all(rec.has_auth and rec.status < 400 for rec in gated), [(g.path, g.status) for g in gated]
    v = hpcstage("verify", "-f", str(manifest), env=env)
    assert v.returncode == 0, v.stdout + v.stderr
    scripts = list(Path(jobs["folder"]).glob("*.sbatch"))
    assert len(scripts) == 3 and all(f"hpcstage_secrets={secrets}" in p.read_text() for p in scripts)
    texts = {"pull output": r.stdout + r.stderr, "slurmctld state": saved_env.decode(errors="replace")}
    texts.update({str(p): p.read_text(errors="replace") for p in folder.rglob("*") if p.is_file()
                  and "cache" not in p.relative_to(folder).parts})
    assert [where for where, text in texts.items() if token in text] == []

    # no secrets file: the shell's HF_TOKEN is not handed to Slurm, and pull says where the token belongs
    del env["HPCSTAGE_SECRETS_FILE"]
    other = tmp_path / "other"
    other.mkdir()
    (other / "hpcstage.yaml").write_text(f"cache_dir: cache\nmodels:\n  - repo: {GATED}\n")
    with HubServer(root) as hub:
        hub.gate(GATED, granted=(token,))
        env = {**env, **client_env(hub, tmp_path, HF_TOKEN=token)}
        r = hpcstage("pull", "-f", str(other / "hpcstage.yaml"), "--slurm-array", "1", "--cluster", "local", env=env)
        assert r.returncode == 0, r.stdout + r.stderr
        assert "HF_TOKEN of this shell is not passed to the array workers" in r.stderr
        jobs = json.loads(next((other / "hpcstage-array").glob("*/jobs.json")).read_text())
        cancel([jobs["array_id"], jobs["finish_id"], jobs["report_id"]])
        assert all(token not in p.read_text() for p in Path(jobs["folder"]).glob("*.sbatch"))
