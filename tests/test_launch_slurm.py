"""`hpcstage launch` on the real one-node Slurm test cluster (scripts/slurm-test-cluster.sh).

Each test drives the real CLI in a subprocess, lets the scheduler run the rendered scripts and asserts on
what the jobs wrote and on their states. Skipped without the cluster, failed when HPCSTAGE_REQUIRE_SLURM=1.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from helpers import client_env, slurm_saved_environments, two_of_the_nodes_gpus
from hpcstage.slurm.jobs import job_states, wait
from hpcstage.slurm.submit import cancel

MODEL, DATASET = "demo-org/tiny-model", "demo-org/tiny-dataset"
CANARY = "hf_CANARYcanaryCANARYcanary0123456789"
POLL = 0.2
PY = sys.executable

LOADER = """\
import json, os, sys
from huggingface_hub import snapshot_download
from datasets import load_dataset
model = snapshot_download("demo-org/tiny-model", local_files_only=True)
data = snapshot_download("demo-org/tiny-dataset", repo_type="dataset", local_files_only=True)
rows = {split: d.num_rows for split, d in load_dataset(os.environ["HPCSTAGE_DATASET"]).items()}
with open(os.path.join(model, "config.json")) as f:
    config = json.load(f)
json.dump({
    "model": model, "model_env": os.environ["HPCSTAGE_MODEL"], "model_type": config.get("model_type"),
    "dataset": data, "dataset_env": os.environ["HPCSTAGE_DATASET"], "rows": rows,
    "offline": [os.environ.get(k) for k in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE")],
    "token": os.environ.get("HF_TOKEN", "none"), "job": os.environ["SLURM_JOB_ID"], "ended": __import__("time").time(),
}, open(sys.argv[1], "w"))
"""

FAKE_TRAINER = """\
import json, os, sys
keys = ("NODE_RANK", "MASTER_ADDR", "MASTER_PORT", "NNODES", "NPROC_PER_NODE", "FORCE_TORCHRUN", "CUDA_VISIBLE_DEVICES")
json.dump({"argv": sys.argv[1:], "env": {k: os.environ.get(k) for k in keys}}, open(sys.argv[1] + ".seen", "w"))
sys.exit(1)  # a training run that crashes
"""

DATAGEN = """\
import json, os
index = os.environ["HPCSTAGE_CHUNK_INDEX"]
folders = open(os.environ["HPCSTAGE_CHUNK_LIST"]).read().split()
out = os.path.join(os.environ["HPCSTAGE_EXPERIMENT"], "out")
os.makedirs(out, exist_ok=True)
json.dump({"index": int(index), "folders": folders, "engine": os.environ.get("ENGINE_SEEN")},
          open(os.path.join(out, f"{index}.json"), "w"))
"""


@pytest.fixture
def env(tmp_path, monkeypatch):
    """The launching process's environment: bundled registry, caches under tmp_path, a canary token."""
    base = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "HUGGING_FACE_"))}
    base.update(XDG_CONFIG_HOME=str(tmp_path / "config"), HF_TOKEN=CANARY,
                HF_HUB_CACHE=str(tmp_path / "hub"), HF_DATASETS_CACHE=str(tmp_path / "datasets"),
                HF_ENDPOINT="http://127.0.0.1:9")  # a test that stages sets its emulator; nothing reaches a real hub
    base.pop("HPCSTAGE_CLUSTERS", None)
    return base


def hpcstage(*args, env: dict, check: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run([PY, "-m", "hpcstage", *map(str, args)], env=env, capture_output=True, text=True,
                          timeout=120)
    if check:
        assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc


def launch(tmp_path: Path, env: dict, *args) -> list[dict]:
    """Launch on the local cluster; returns jobs.json's records."""
    proc = hpcstage("launch", "--cluster", "local", "--experiments-dir", tmp_path / "experiments", "--json",
                    *args, env=env)
    return json.loads(proc.stdout)["jobs"]


def ids(records: list[dict], key: str | None = None) -> list[str]:
    return [r["job_id"] for r in records if key is None or r["key"] == key]


def no_canary(folder: Path) -> None:
    for path in folder.rglob("*"):
        if path.is_file():
            assert CANARY not in path.read_text(errors="replace"), path


def test_offline_job_loads_staged_model_and_dataset_by_repo_id_then_after_job_runs(cluster, hub, tmp_path, env):
    online = client_env(hub, tmp_path / "unused", **{k: env[k] for k in ("HF_HUB_CACHE", "HF_DATASETS_CACHE")})
    hpcstage("pull", MODEL, env=online)
    hpcstage("pull", "--repo-type", "dataset", DATASET, env=online)
    commit = hub.commit_of("model", MODEL, "main")
    env = {**env, "HF_ENDPOINT": hub.url, "HF_HUB_DISABLE_XET": "1"}
    hub.stop()  # from here on, nothing can be fetched
    (tmp_path / "load.py").write_text(LOADER)
    out, after_out = tmp_path / "loaded.json", tmp_path / "after.txt"

    t0 = time.monotonic()
    first = launch(tmp_path, env, "--job-type", "run", "--offline", "--name", "load", "--model", MODEL,
                   "--dataset", DATASET, "--command", f"{PY} {tmp_path / 'load.py'} {out}")
    second = launch(tmp_path, env, "--job-type", "run", "--name", "next", "--after", ids(first)[0],
                    "--command", f"test -s {out} && date +%s.%N >{after_out}")
    t_submitted = time.monotonic() - t0
    states = wait(ids(first) + ids(second), timeout=60, poll=POLL)
    t_done = time.monotonic() - t0
    assert {s.state for s in states.values()} == {"COMPLETED"}, states

    loaded = json.loads(out.read_text())
    snapshot = str(tmp_path / "hub" / "models--demo-org--tiny-model" / "snapshots" / commit)
    assert loaded["model"] == loaded["model_env"] == snapshot
    assert loaded["dataset"] == loaded["dataset_env"]
    assert loaded["rows"] == {"train": 300, "test": 100} and loaded["model_type"] == "llama"
    assert loaded["offline"] == ["1", "1", "1"]
    assert loaded["token"] == "none"  # the token stays on the login node
    assert float(after_out.read_text()) >= loaded["ended"]
    for exp in ("load", "next"):
        no_canary(tmp_path / "experiments" / exp)
    status = hpcstage("status", "--experiment", tmp_path / "experiments" / "load", env=env).stdout
    assert status == f"run\t{ids(first)[0]}\tCOMPLETED exit 0\n"
    print(f"\nstaged-offline run + after: submitted in {t_submitted:.1f}s, both done {t_done:.1f}s after launch")


def test_failing_train_leaves_its_chained_eval_never_running(cluster, tmp_path, env):
    (tmp_path / "fake_train.py").write_text(FAKE_TRAINER)
    (tmp_path / "sft.yaml").write_text("stage: sft\nmodel_name_or_path: /models/tiny-model\n")
    records = launch(tmp_path, env, "--job-type", "train", "--name", "crash", "--train-config", tmp_path / "sft.yaml",
                     "--train-command", f"{PY} {tmp_path / 'fake_train.py'}", "--gpus-per-node", "2",
                     "--eval-tasks", "hellaswag", "--eval-command", f"{PY} -c pass", "--time-limit", "10:00")
    train, evaluation = ids(records, "train")[0], ids(records, "eval")[0]
    try:
        states = wait([train, evaluation], timeout=60, poll=POLL)
        assert (states[train].state, states[train].exit_code) == ("FAILED", 1)
        assert (states[evaluation].state, states[evaluation].reason) == ("PENDING", "DependencyNeverSatisfied")
        status = hpcstage("status", "--experiment", tmp_path / "experiments" / "crash", env=env)
        assert f"eval\t{evaluation}\tPENDING (DependencyNeverSatisfied)\n" in status.stdout
        assert status.stderr == (f"hpcstage: warning: job {evaluation} is PENDING (DependencyNeverSatisfied) and will "
                                 "never start: a job it depends on failed or was cancelled; fix that job and launch "
                                 "again\n")
    finally:
        cancel([evaluation])
    assert wait([evaluation], timeout=20, poll=POLL)[evaluation].state == "CANCELLED"
    exp = tmp_path / "experiments" / "crash"
    seen = json.loads((exp / "train_config.yaml.seen").read_text())
    assert seen["argv"] == [str(exp / "train_config.yaml"), f"output_dir={exp / 'checkpoints'}"]
    gpus = seen["env"].pop("CUDA_VISIBLE_DEVICES")
    assert seen["env"] == {"NODE_RANK": "0", "MASTER_ADDR": seen["env"]["MASTER_ADDR"], "MASTER_PORT": "29500",
                           "NNODES": "1", "NPROC_PER_NODE": "2", "FORCE_TORCHRUN": "1"}
    assert seen["env"]["MASTER_ADDR"]
    assert two_of_the_nodes_gpus(gpus)  # which two depends on what else runs on the node
    assert not list((exp / "logs").glob("crash-eval-*"))  # the eval never started


def test_datagen_array_of_4_chunks_at_most_2_at_once_covers_every_task(cluster, tmp_path, env):
    tasks = tmp_path / "traces"
    for n in range(35):
        (tasks / f"task-{n:02d}").mkdir(parents=True)
    (tmp_path / "gen.py").write_text(DATAGEN)
    records = launch(tmp_path, env, "--job-type", "datagen", "--name", "gen", "--datagen-script", tmp_path / "gen.py",
                     "--trace-input-path", tasks, "--chunk-size", "10", "--max-parallel", "2", "--gpus-per-node", "0")
    array = ids(records)[0]
    running, deadline = [], time.monotonic() + 60
    while not ((states := job_states([array])) and len(states) == 4 and all(s.done for s in states.values())):
        running.append(sum(s.state == "RUNNING" for s in states.values()))
        assert time.monotonic() < deadline, states
        time.sleep(POLL)
    assert sorted(states) == [f"{array}_{i}" for i in range(4)]
    assert {s.state for s in states.values()} == {"COMPLETED"}
    assert max(running, default=0) <= 2
    out = tmp_path / "experiments" / "gen" / "out"
    chunks = [json.loads((out / f"{i}.json").read_text()) for i in range(4)]
    assert [len(c["folders"]) for c in chunks] == [10, 10, 10, 5]
    assert sorted(sum((c["folders"] for c in chunks), [])) == sorted(str(p) for p in tasks.iterdir())
    assert len(list(tasks.iterdir())) == 35


def test_restarts_stop_at_the_first_success_and_leave_nothing_pending(cluster, tmp_path, env):
    marker = tmp_path / "failed-once"
    ok = launch(tmp_path, env, "--job-type", "run", "--name", "ok", "--max-restarts", "2", "--command", "true")
    flaky = launch(tmp_path, env, "--job-type", "run", "--name", "flaky", "--max-restarts", "2",
                   "--command", f"if [[ ! -e {marker} ]]; then touch {marker}; exit 3; fi")
    chain = ids(ok) + ids(flaky)
    states = wait(chain, timeout=60, poll=POLL)
    assert [states[i].state for i in ids(ok)] == ["COMPLETED", "CANCELLED", "CANCELLED"]
    assert [states[i].state for i in ids(flaky)] == ["FAILED", "COMPLETED", "CANCELLED"]
    time.sleep(1)  # nothing comes back to life afterwards
    assert not [s for s in job_states(chain).values() if s.state == "PENDING"]
    status = hpcstage("status", "--experiment", tmp_path / "experiments" / "flaky", env=env).stdout.splitlines()
    assert [line.split("\t")[2] for line in status] == [
        "FAILED (NonZeroExitCode) exit 3", "COMPLETED exit 0", "CANCELLED (Dependency) exit 0"
    ]
    records = json.loads((tmp_path / "experiments" / "flaky" / "jobs.json").read_text())["jobs"]
    assert [r["dependency"] for r in records] == [None, f"afternotok:{ids(flaky)[0]}", f"afternotok:{ids(flaky)[1]}"]


SEE_JOB = """\
import json, os, subprocess, sys
limit = subprocess.run(["squeue", "-h", "-j", os.environ["SLURM_JOB_ID"], "-o", "%l"], capture_output=True,
                       text=True).stdout.strip()
out = os.path.join(os.environ["HPCSTAGE_EXPERIMENT"], os.path.basename(sys.argv[0]) + ".json")
json.dump({"argv": sys.argv[1:], "gpus": os.environ.get("CUDA_VISIBLE_DEVICES"), "limit": limit,
           "cpus": os.environ.get("SLURM_CPUS_PER_TASK"), "partition": os.environ.get("SLURM_JOB_PARTITION")},
          open(out, "w"))
"""


def test_eval_chained_after_train_runs_on_its_own_resources(cluster, tmp_path, env):
    for name in ("train_seen.py", "eval_seen.py"):
        (tmp_path / name).write_text(SEE_JOB)
    (tmp_path / "sft.yaml").write_text("stage: sft\noutput_dir: out\n")
    records = launch(tmp_path, env, "--job-type", "train", "--name", "chain", "--train-config", tmp_path / "sft.yaml",
                     "--train-command", f"{PY} {tmp_path / 'train_seen.py'}", "--time-limit", "2:00:00",
                     "--eval-tasks", "hellaswag", "--eval-command", f"{PY} {tmp_path / 'eval_seen.py'}")
    states = wait(ids(records), timeout=60, poll=POLL)
    assert {s.state for s in states.values()} == {"COMPLETED"}, states
    exp = tmp_path / "experiments" / "chain"
    train = json.loads((exp / "train_seen.py.json").read_text())
    evaluation = json.loads((exp / "eval_seen.py.json").read_text())
    assert (train["gpus"], train["cpus"], train["limit"]) == ("0,1,2,3", "8", "2:00:00")
    assert (evaluation["gpus"], evaluation["cpus"], evaluation["limit"]) == ("0", "2", "4:00:00")
    assert train["argv"] == [str(exp / "train_config.yaml"), f"output_dir={tmp_path / 'out'}"]
    assert evaluation["argv"][evaluation["argv"].index("--model_args") + 1] == f"pretrained={tmp_path / 'out'}"


def test_after_a_job_that_does_not_exist_or_failed_is_refused_before_any_sbatch(cluster, tmp_path, env):
    proc = hpcstage("launch", "--cluster", "local", "--experiments-dir", tmp_path / "experiments", "--job-type", "run",
                    "--command", "true", "--after", "99999999", "--name", "typo", env=env, check=False)
    assert proc.returncode == 2
    assert proc.stderr == ("hpcstage: error: --after 99999999: job 99999999 is unknown to squeue and sacct (a typo?); "
                           "`squeue --me` lists your jobs\n")
    assert not (tmp_path / "experiments" / "typo").exists()
    failed = launch(tmp_path, env, "--job-type", "run", "--name", "bad", "--command", "exit 3")
    wait(ids(failed), timeout=60, poll=POLL)
    for after in (ids(failed)[0], tmp_path / "experiments" / "bad"):
        proc = hpcstage("launch", "--cluster", "local", "--experiments-dir", tmp_path / "experiments", "--job-type",
                        "run", "--command", "true", "--after", after, "--name", "next", env=env, check=False)
        assert proc.returncode == 2
        assert (f"--after {after}: job {ids(failed)[0]} ended FAILED, so a job after it would never start; "
                "launch after a job that can still succeed, or without --after") in proc.stderr
        assert not (tmp_path / "experiments" / "next").exists()
    good = launch(tmp_path, env, "--job-type", "run", "--name", "good", "--command", "true")
    wait(ids(good), timeout=60, poll=POLL)
    follower = launch(tmp_path, env, "--job-type", "run", "--name", "follow", "--after", tmp_path / "experiments" / "good",
                      "--command", "true")
    assert follower[0]["dependency"] == f"afterok:{ids(good)[0]}"
    assert wait(ids(follower), timeout=60, poll=POLL)[ids(follower)[0]].state == "COMPLETED"


def test_time_limit_over_the_live_partition_limit_is_refused(cluster, tmp_path, env):
    proc = hpcstage("launch", "--cluster", "local", "--experiments-dir", tmp_path / "experiments", "--job-type", "run",
                    "--command", "true", "--partition", "short", "--time-limit", "20:00", "--name", "long", env=env,
                    check=False)
    assert proc.returncode == 2
    assert proc.stderr == ("hpcstage: error: --time-limit 20:00 is over partition short's limit of 00:10:00 (from "
                           "`scontrol show partition short`); ask for 00:10:00 or less, or pick a partition with a "
                           "longer limit (--partition)\n")
    assert not (tmp_path / "experiments" / "long").exists()


TRAIN_LOADS_MODEL = """\
import json, os, sys
from huggingface_hub import snapshot_download
path = next(a.split("=", 1)[1] for a in sys.argv[2:] if a.startswith("model_name_or_path="))
by_id = snapshot_download("demo-org/tiny-model", local_files_only=True)
config = json.load(open(os.path.join(path, "config.json")))
json.dump({"path": path, "by_id": by_id, "model_type": config["model_type"],
           "offline": os.environ.get("HF_HUB_OFFLINE")}, open(sys.argv[1] + ".loaded", "w"))
"""


def test_train_config_naming_a_repo_id_gets_it_staged_and_the_job_loads_it_offline(cluster, hub, tmp_path, env):
    env = {**env, "HF_ENDPOINT": hub.url, "HF_HUB_DISABLE_XET": "1"}
    (tmp_path / "train.py").write_text(TRAIN_LOADS_MODEL)
    (tmp_path / "sft.yaml").write_text(f"model_name_or_path: {MODEL}\nstage: sft\n")
    records = launch(tmp_path, env, "--job-type", "train", "--name", "repo", "--train-config", tmp_path / "sft.yaml",
                     "--train-command", f"{PY} {tmp_path / 'train.py'}", "--gpus-per-node", "1",
                     "--time-limit", "10:00")
    hub.stop()  # the job cannot reach the Hub
    states = wait(ids(records), timeout=60, poll=POLL)
    assert {s.state for s in states.values()} == {"COMPLETED"}, states
    snapshot = str(tmp_path / "hub" / "models--demo-org--tiny-model" / "snapshots" / hub.commit_of("model", MODEL, "main"))
    loaded = json.loads((tmp_path / "experiments" / "repo" / "train_config.yaml.loaded").read_text())
    assert loaded == {"path": snapshot, "by_id": snapshot, "model_type": "llama", "offline": "1"}


def test_launch_wait_follows_the_jobs_and_exits_with_their_result(cluster, tmp_path, env):
    proc = hpcstage("launch", "--cluster", "local", "--experiments-dir", tmp_path / "experiments", "--job-type", "run",
                    "--command", "exit 4", "--name", "w", "--wait", "--poll", "0.2", env=env, check=False)
    assert proc.returncode == 1
    job = json.loads((tmp_path / "experiments" / "w" / "jobs.json").read_text())["jobs"][0]["job_id"]
    assert f"job {job}: FAILED (NonZeroExitCode)\n" in proc.stdout
    assert proc.stderr.startswith(f"hpcstage: error: not completed: run ({job} FAILED)")


STACK_JOB = """\
import json, sys
import datasets
from datasets import load_dataset
out = {"python": sys.executable, "datasets": datasets.__version__}
for name, call in (
        ("hub", lambda: load_dataset("demo-org/tiny-dataset", split="train")),
        ("hub_data_files", lambda: load_dataset("demo-org/tiny-dataset", data_files="data/train-*.parquet", split="train")),
        ("json_field", lambda: load_dataset("json", data_files=sys.argv[2], field="test", split="train"))):
    try:
        out[name] = len(call())
    except Exception as e:
        out[name] = type(e).__name__ + ": " + (str(e).strip().splitlines() or [""])[0]
json.dump(out, open(sys.argv[1], "w"))
"""


@pytest.mark.timeout(1800)  # the job stack is built first when it is not cached (minutes, once)
@pytest.mark.parametrize("how", ["--python", "--activate"])
def test_launch_with_python_of_a_job_stack_prebuilds_checks_and_runs_in_it(how, cluster, hub, tmp_path, env):
    """launch --python <datasets 4.0 stack> (or --activate 'source <stack>/bin/activate'): prebuild and check run
    in that interpreter (their records are for datasets 4.0 only, and the launch passes the check), and the job
    runs in it and loads offline every form the manifest names, `data_files` on a Hub dataset included, without
    building anything."""
    from helpers import job_stack

    stack = job_stack("ds4.0")
    # What `activate` does, spelled out: the cached stacks are built in a .partial folder and renamed, so their own
    # bin/activate names a folder that no longer exists.
    folder = Path(stack["python"]).parent
    activation = f'export VIRTUAL_ENV={folder.parent} PATH={folder}:"$PATH"'
    chosen = [how, stack["python"] if how == "--python" else activation]
    eval_file = tmp_path / "eval.json"
    eval_file.write_text(json.dumps({"test": [{"q": i} for i in range(5)]}))
    manifest = tmp_path / "hpcstage.yaml"
    manifest.write_text(f"""
models:
  - repo: {MODEL}
datasets:
  - repo: {DATASET}
    load: {{split: train}}
prebuild:
  - {{path: {DATASET}, data_files: "data/train-*.parquet", split: train}}
  - {{path: json, data_files: {eval_file}, field: test, split: train}}
""")
    (tmp_path / "job.py").write_text(STACK_JOB)
    out = tmp_path / "loaded.json"
    env = {**env, "HF_ENDPOINT": hub.url, "HF_HUB_DISABLE_XET": "1", "HF_HUB_DISABLE_TELEMETRY": "1",
           "HF_UPDATE_DOWNLOAD_COUNTS": "0", "NO_PROXY": "127.0.0.1"}
    jobs = launch(tmp_path, env, "--job-type", "run", "--offline", "--name", "stack", "-f", manifest,
                  *chosen, "--command", f'"$HPCSTAGE_PYTHON" {tmp_path / "job.py"} {out} {eval_file}')
    hub.stop()  # staged, built and checked: the job needs no server
    datasets_cache = tmp_path / "datasets"
    markers = sorted(p.name.split(".", 1)[1] for p in (datasets_cache / ".hpcstage-prebuild").iterdir())
    assert markers == ["datasets-4.0.0.json"] * 3, markers  # built and proven for the job's stack only
    arrow_before = {p: p.stat().st_mtime_ns for p in datasets_cache.rglob("*.arrow")}

    states = wait(ids(jobs), timeout=120, poll=POLL)
    assert {s.state for s in states.values()} == {"COMPLETED"}, states
    loaded = json.loads(out.read_text())
    assert loaded == {"python": stack["python"], "datasets": "4.0.0", "hub": 300, "hub_data_files": 300,
                      "json_field": 5}
    assert {p: p.stat().st_mtime_ns for p in datasets_cache.rglob("*.arrow")} == arrow_before
    script = (tmp_path / "experiments" / "stack" / "run.sbatch").read_text()
    if how == "--python":
        assert f"export HPCSTAGE_PYTHON={stack['python']}" in script
    else:  # the activated environment's `python`, found by the job itself
        assert f"\n{activation}\n" in script
        assert "HPCSTAGE_PYTHON=$(command -v python)" in script


# -- environments and secrets


SHOW_PYTHON = """\
import json, os, sys
json.dump({"executable": sys.executable, "prefix": sys.prefix, "HPCSTAGE_PYTHON": os.environ["HPCSTAGE_PYTHON"]},
          open(sys.argv[1], "w"))
"""


def private_file(path: Path, text: str) -> Path:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(text)
    return path


def gate(tmp_path: Path, env: dict, name: str) -> tuple[str, Path]:
    """A job that runs until the returned file exists: a later job launched --after it starts when the test says."""
    release = tmp_path / f"{name}.release"
    records = launch(tmp_path, env, "--job-type", "run", "--name", name, "--command",
                     f"for i in $(seq 600); do [[ -e {release} ]] && exit 0; sleep 0.1; done; exit 1")
    return ids(records)[0], release


def test_activate_enters_a_separate_venv_and_a_failing_activation_stops_the_job_with_its_message(cluster, tmp_path,
                                                                                                env):
    venv = tmp_path / "jobvenv"
    subprocess.run([PY, "-m", "venv", "--without-pip", str(venv)], check=True)
    (tmp_path / "show.py").write_text(SHOW_PYTHON)
    out = tmp_path / "python.json"
    ok = launch(tmp_path, env, "--job-type", "run", "--name", "venv", "--activate", f"source {venv}/bin/activate",
                "--command", f"python {tmp_path / 'show.py'} {out}")
    # an activation that works at launch and is broken when the job starts (an environment deleted meanwhile)
    activate, marker = tmp_path / "activate.sh", tmp_path / "command-ran"
    activate.write_text("export FROM_ACTIVATION=1\n")
    first, release = gate(tmp_path, env, "gate")
    bad = launch(tmp_path, env, "--job-type", "run", "--name", "broken", "--after", first,
                 "--activate", f"source {activate}", "--command", f"touch {marker}")
    activate.write_text('echo "activate: environment /p/project/x/envs/train not found" >&2\nreturn 3\n')
    release.touch()
    states = wait(ids(ok) + [first] + ids(bad), timeout=60, poll=POLL)
    assert states[ids(ok)[0]].state == "COMPLETED", states
    assert json.loads(out.read_text()) == {"executable": str(venv / "bin" / "python"), "prefix": str(venv),
                                           "HPCSTAGE_PYTHON": str(venv / "bin" / "python")}
    assert (states[ids(bad)[0]].state, states[ids(bad)[0]].exit_code) == ("FAILED", 3)
    assert not marker.exists()  # stopped at the activation: the command never ran
    log = next((tmp_path / "experiments" / "broken" / "logs").glob("*.out")).read_text()
    assert log == ("activate: environment /p/project/x/envs/train not found\n"
                   "hpcstage: the activate line failed (exit 3); fix it (--activate) and launch again\n")


SECRET_HASHES = """\
import hashlib, json, os, sys
names = ("WANDB_API_KEY", "HF_TOKEN", "MY_SERVICE_TOKEN", "JOBENV_MARKER")
json.dump({n: os.environ[n] and hashlib.sha256(os.environ[n].encode()).hexdigest() if n in os.environ else None
           for n in names}, open(sys.argv[1], "w"))
"""


def test_a_canary_in_the_secrets_file_reaches_the_job_and_no_script_record_log_or_slurm_state(cluster, tmp_path,
                                                                                              env):
    import hashlib

    wandb, token, shell_only = (f"{kind}_CANARY{os.urandom(8).hex()}" for kind in ("wandb", "hf", "svc"))
    secrets = private_file(tmp_path / "secrets.env", f"WANDB_API_KEY={wandb}\nexport HF_TOKEN={token}\n")
    env = {**env, "HPCSTAGE_SECRETS_FILE": str(secrets), "MY_SERVICE_TOKEN": shell_only, "WANDB_API_KEY": shell_only,
           "JOBENV_MARKER": "exported-by-the-list"}
    (tmp_path / "hashes.py").write_text(SECRET_HASHES)
    out, release = tmp_path / "hashes.json", tmp_path / "release"
    proc = hpcstage("launch", "--cluster", "local", "--experiments-dir", tmp_path / "experiments", "--name", "sec",
                    "--job-type", "run", "--activate", "set -x",  # the job traces every line: not the secrets'
                    "--command", f"{PY} {tmp_path / 'hashes.py'} {out}; "
                                 f"for i in $(seq 600); do [[ -e {release} ]] && break; sleep 0.1; done",
                    env=env)
    job = json.loads((tmp_path / "experiments" / "sec" / "jobs.json").read_text())["jobs"][0]["job_id"]
    try:
        wait_for_file = time.monotonic() + 60
        while not out.exists():
            assert time.monotonic() < wait_for_file, "the job never wrote its hashes"
            time.sleep(POLL)
        shown = subprocess.run(["scontrol", "show", "job", "-dd", job], capture_output=True, text=True, check=True)
        script = subprocess.run(["scontrol", "write", "batch_script", job, "-"], capture_output=True, text=True)
        saved = slurm_saved_environments(job)
        assert saved, "slurmctld's copy of the job's environment was not found"
        saved_env = saved[0].read_bytes()
    finally:
        release.touch()
    states = wait([job], timeout=60, poll=POLL)
    assert states[job].state == "COMPLETED", states

    sha = lambda text: hashlib.sha256(text.encode()).hexdigest()  # noqa: E731
    assert json.loads(out.read_text()) == {"WANDB_API_KEY": sha(wandb), "HF_TOKEN": sha(token),
                                           "MY_SERVICE_TOKEN": None, "JOBENV_MARKER": sha("exported-by-the-list")}
    assert b"JOBENV_MARKER=exported-by-the-list" in saved_env  # the right file: it holds what sbatch exported
    log = next((tmp_path / "experiments" / "sec" / "logs").glob("*.out")).read_text()
    assert "+ export HPCSTAGE_EXPERIMENT=" in log and "+ source" not in log  # traced, except the secrets
    texts = {"launch output": proc.stdout + proc.stderr, "scontrol show job -dd": shown.stdout,
             "batch script": script.stdout, "slurmctld state": saved_env.decode(errors="replace")}
    texts.update({str(p): p.read_text(errors="replace") for p in (tmp_path / "experiments").rglob("*") if p.is_file()})
    for canary in (wandb, token, shell_only, CANARY):
        assert [where for where, text in texts.items() if canary in text] == []


GENERATE = """\
import json, os
folders = open(os.environ["HPCSTAGE_CHUNK_LIST"]).read().split()
with open(os.path.join(os.environ["HPCSTAGE_OUTPUT_DIR"], "rows.jsonl"), "w") as f:
    for folder in folders:
        f.write(json.dumps({"task": os.path.basename(folder), "chunk": int(os.environ["HPCSTAGE_CHUNK_INDEX"])}) + "\\n")
"""

NET_LOCAL = """\
[netlocal]
description = "the local test cluster declared with internet: its jobs reach the emulator on 127.0.0.1"
internet = true
gpus_per_node = 4
gpu_type = "fake (character devices)"
cpus_per_node = 8
mem = "4G"
partition = "debug"
gpu_directive = "gres"
max_time = "1-00:00:00"
secrets_file = "{secrets}"
"""


def test_datagen_array_of_3_chunks_uploads_each_chunk_to_its_own_repo_that_a_later_pull_reads(cluster, tmp_path,
                                                                                              env):
    from hpcstage.testing.hub import HubServer

    token = f"hf_CANARY{os.urandom(8).hex()}"
    secrets = private_file(tmp_path / "secrets.env", f"HF_TOKEN={token}\n")
    (tmp_path / "config" / "hpcstage").mkdir(parents=True)
    (tmp_path / "config" / "hpcstage" / "clusters.toml").write_text(NET_LOCAL.format(secrets=secrets))
    tasks = tmp_path / "traces"
    for n in range(6):
        (tasks / f"task-{n}").mkdir(parents=True)
    (tmp_path / "generate.py").write_text(GENERATE)
    root = tmp_path / "hubroot"
    (root / "datasets").mkdir(parents=True)
    with HubServer(root) as hub:
        hub.tokens = {token}  # the shell's HF_TOKEN (CANARY) would be refused: only the secrets file's is good
        net_env = {**env, "HF_ENDPOINT": hub.url, "HF_HOME": str(tmp_path / "hf-home"), "NO_PROXY": "127.0.0.1",
                   "HF_HUB_DISABLE_TELEMETRY": "1", "HF_HUB_DISABLE_PROGRESS_BARS": "1"}
        proc = hpcstage("launch", "--cluster", "netlocal", "--experiments-dir", tmp_path / "experiments", "--json",
                        "--name", "up", "--job-type", "datagen", "--datagen-script", tmp_path / "generate.py",
                        "--trace-input-path", tasks, "--chunk-size", "2", "--gpus-per-node", "0",
                        "--datagen-target-repo", "gen-org/traces", env=net_env)
        array = ids(json.loads(proc.stdout)["jobs"])[0]
        states = wait([array], timeout=120, poll=POLL)
        assert sorted(states) == [f"{array}_{i}" for i in range(3)]
        assert {s.state for s in states.values()} == {"COMPLETED"}, states
        commits = [r for r in hub.log if r.method == "POST" and r.path.endswith("/commit/main")]
        assert sorted(r.path for r in commits) == [f"/api/datasets/gen-org/traces-chunk-{i}/commit/main"
                                                   for i in range(3)]
        assert all(r.status == 200 and r.has_auth for r in commits)
        for i in range(3):
            r = hpcstage("pull", "--repo-type", "dataset", f"gen-org/traces-chunk-{i}", "--cache-dir",
                         tmp_path / "pulled", env={**net_env, "HF_TOKEN": token})
            assert r.returncode == 0, r.stderr
            snapshot = (tmp_path / "pulled" / f"datasets--gen-org--traces-chunk-{i}" / "snapshots" /
                        hub.commit_of("dataset", f"gen-org/traces-chunk-{i}"))
            rows = [json.loads(line) for line in (snapshot / "rows.jsonl").read_text().splitlines()]
            assert rows == [{"task": f"task-{n}", "chunk": i} for n in (2 * i, 2 * i + 1)]
    logs = sorted((tmp_path / "experiments" / "up" / "logs").glob("*.out"))
    assert all("hpcstage: uploaded " in p.read_text() for p in logs) and len(logs) == 3
    texts = [p.read_text(errors="replace") for p in (tmp_path / "experiments").rglob("*") if p.is_file()]
    assert not [t for t in texts if token in t or CANARY in t]
