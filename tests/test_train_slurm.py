"""The training path for real, on the one-node Slurm test cluster: `hpcstage launch --job-type train` runs
llamafactory through torchrun (2 processes, CPU) in the llamafactory job stack, from the staged cache with the
Hub down, and the chained eval job runs lm_eval's boolq task definition (pointed at the sample Hub's
demo-org/tiny-boolq) on the checkpoint it wrote, with the task's dataset staged and prebuilt by the launch.

Skipped without the cluster, failed when HPCSTAGE_REQUIRE_SLURM=1. The stack is built first when it is not
cached (scripts/job-stacks.py: minutes, once).
"""

from __future__ import annotations

import json
import subprocess
import re
import shlex
import time
from pathlib import Path

import pytest

from helpers import client_env, hpcstage, job_stack, sha256
from hpcstage.slurm.jobs import wait

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
TRAIN_CONFIG = EXAMPLES / "llamafactory" / "tiny_sft.yaml"
TASK = EXAMPLES / "lm_eval" / "tiny_boolq.yaml"
MODEL, EVAL_DATASET = "demo-org/tiny-model", "demo-org/tiny-boolq"
CANARY = "hf_CANARYcanaryCANARYcanary0123456789"


def elapsed(*job_ids: str) -> str:
    """Each job's run time as Slurm's job completion log has it (for the printed summary, not asserted)."""
    out = subprocess.run(["sacct", "-c", "-n", "-P", "-o", "JobID,JobName,Elapsed", "-j", ",".join(job_ids)],
                         capture_output=True, text=True).stdout
    return ", ".join(" ".join(line.split("|")[1:]) for line in out.splitlines() if line.strip())


@pytest.fixture
def stack():
    return job_stack("llamafactory")


@pytest.fixture
def env(tmp_path, hub):
    """The login node's environment: the emulator as the Hub, caches under tmp_path, a canary token."""
    return client_env(hub, tmp_path, XDG_CONFIG_HOME=str(tmp_path / "config"), HF_TOKEN=CANARY)


def launch_train(tmp_path: Path, env: dict, stack: dict, name: str, *extra,
                 evaluate: bool = True) -> subprocess.CompletedProcess:
    """The train job on 2 (fake) GPUs with 2 CPUs: torchrun starts 2 processes; with `evaluate`, lm_eval after it."""
    chained = ["--eval-tasks", TASK, "--eval-time-limit", "30:00"] if evaluate else []
    return hpcstage("launch", "--job-type", "train", "--cluster", "local", "--offline", "--name", name,
                    "--experiments-dir", tmp_path / "experiments", "--json", "--model", MODEL,
                    "--train-config", TRAIN_CONFIG, "--python", stack["python"], "--gpus-per-node", "2",
                    "--cpus-per-task", "2", "--time-limit", "30:00", *chained, *extra, env=env, timeout=900)


@pytest.mark.timeout(3600)
def test_train_with_torchrun_then_eval_the_checkpoint_offline_on_slurm(cluster, hub, stack, tmp_path, env):
    t0 = time.monotonic()
    proc = launch_train(tmp_path, env, stack, "e2e")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    t_launch = time.monotonic() - t0
    hub.stop()  # staged, prebuilt and checked on the login node: from here on nothing can be fetched
    records = json.loads(proc.stdout)["jobs"]
    train = next(r["job_id"] for r in records if r["key"] == "train")
    evaluation = next(r for r in records if r["key"] == "eval")
    assert evaluation["dependency"] == f"afterok:{train}"
    exp = tmp_path / "experiments" / "e2e"
    commit = hub.commit_of("model", MODEL, "main")
    snapshot = tmp_path / "hub" / "models--demo-org--tiny-model" / "snapshots" / commit
    # the eval task's dataset was staged and prebuilt (in the job's datasets 4.0) by the launch
    assert (tmp_path / "hub" / "datasets--demo-org--tiny-boolq" / "refs" / "main").is_file()
    assert sorted(p.name.split(".", 1)[1] for p in (tmp_path / "datasets" / ".hpcstage-prebuild").iterdir()) == \
        ["datasets-4.0.0.json"]

    states = wait([train, evaluation["job_id"]], timeout=3000, poll=1)
    t_done = time.monotonic() - t0
    logs = {p.name.split("-")[1]: p.read_text(errors="replace") for p in (exp / "logs").iterdir()}
    assert {s.state for s in states.values()} == {"COMPLETED"}, (states, {k: v[-3000:] for k, v in logs.items()})

    train_log = logs["train"]
    assert train_log.count("world size: 2, device: cpu") == 2  # two processes under torchrun, ranks 0 and 1
    losses = [float(x) for x in re.findall(r"'loss': '([0-9.]+)'", train_log)]
    assert len(losses) == 2, train_log[-3000:]  # max_steps 2, logging_steps 1
    assert str(snapshot) in train_log  # the model came from the staged snapshot of the repo id
    checkpoints = exp / "checkpoints"
    assert (checkpoints / "checkpoint-2" / "model.safetensors").is_file()
    assert sha256(checkpoints / "model.safetensors") != sha256(snapshot / "model.safetensors")  # trained

    results = [json.loads(p.read_text()) for p in (exp / "eval").rglob("results_*.json")]
    assert len(results) == 1, logs["eval"][-3000:]
    metric = results[0]["results"]["tiny_boolq"]["acc,none"]
    assert 0.0 <= metric <= 1.0
    assert results[0]["n-samples"]["tiny_boolq"] == {"original": 12, "effective": 12}  # the validation split
    assert results[0]["config"]["model_args"] == {"pretrained": str(checkpoints)}
    for path in exp.rglob("*"):
        if path.is_file() and path.suffix in (".out", ".sbatch", ".json"):
            assert CANARY not in path.read_text(errors="replace"), path
    print(f"\ntrain+eval on slurm: launch (stage, resolve task data, prebuild, check) {t_launch:.0f}s, "
          f"both jobs done {t_done:.0f}s after launch ({elapsed(train, evaluation['job_id'])}); losses {losses}, "
          f"tiny_boolq acc {metric}")


@pytest.mark.timeout(1800)
def test_eval_task_data_not_staged_or_unknown_task_is_refused_before_submitting(cluster, hub, stack, tmp_path, env):
    assert hpcstage("pull", MODEL, env=env).returncode == 0  # the model is staged, the task's data is not
    proc = launch_train(tmp_path, env, stack, "nostage", "--no-stage")
    assert proc.returncode == 1, proc.stdout + proc.stderr
    line = proc.stderr.strip()
    assert "eval task tiny_boolq loads dataset demo-org/tiny-boolq@main, which is not staged" in line, line
    assert not (tmp_path / "experiments" / "nostage" / "jobs.json").exists()  # nothing submitted
    fix = re.search(r"`(hpcstage pull [^`]+)`", line).group(1)
    assert hpcstage(*shlex.split(fix)[1:], env=env).returncode == 0  # the command it names stages the data
    assert (tmp_path / "hub" / "datasets--demo-org--tiny-boolq" / "refs" / "main").is_file()

    proc = hpcstage("launch", "--job-type", "train", "--cluster", "local", "--offline", "--name", "unknown",
                    "--experiments-dir", tmp_path / "experiments", "--model", MODEL, "--train-config", TRAIN_CONFIG,
                    "--python", stack["python"], "--gpus-per-node", "2", "--eval-tasks", "no_such_task",
                    env=env, timeout=900)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert proc.stderr.startswith("hpcstage: error: --eval-tasks no_such_task: lm_eval does not know it"), proc.stderr
    assert not (tmp_path / "experiments" / "unknown").exists()  # refused: nothing left behind


COMPARE = """\
import json, sys
from safetensors.torch import load_file
a, b = load_file(sys.argv[1]), load_file(sys.argv[2])
print(json.dumps({"keys": sorted(a) == sorted(b), "equal": all(bool((a[k] == b[k]).all()) for k in a), "n": len(a)}))
"""


@pytest.mark.timeout(3600)
def test_zero_checkpoint_is_consolidated_by_the_consolidate_job_with_its_own_script(cluster, hub, stack, tmp_path,
                                                                                     env):
    """A ZeRO-2 run (deepspeed on CPU, 2 ranks) writes a sharded checkpoint; the consolidate job, afterok, merges
    it with the zero_to_fp32.py DeepSpeed wrote into that checkpoint, into the weights the trainer saved."""
    proc = launch_train(tmp_path, env, stack, "zero", "--train-extra-args",
                        f"deepspeed={EXAMPLES / 'llamafactory' / 'ds_z2.json'}", evaluate=False)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    hub.stop()
    records = json.loads(proc.stdout)["jobs"]
    train = next(r["job_id"] for r in records if r["key"] == "train")
    checkpoint = tmp_path / "experiments" / "zero" / "checkpoints" / "checkpoint-2"
    proc = hpcstage("launch", "--job-type", "consolidate", "--cluster", "local", "--name", "merge", "--json",
                    "--experiments-dir", tmp_path / "experiments", "--checkpoint-dir", checkpoint, "--after", train,
                    "--python", stack["python"], "--cpus-per-task", "1", "--time-limit", "30:00", env=env)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    merge = json.loads(proc.stdout)["jobs"][0]["job_id"]

    t0 = time.monotonic()
    states = wait([train, merge], timeout=3000, poll=1)
    logs = {p.name: p.read_text(errors="replace")[-3000:] for p in (tmp_path / "experiments").rglob("logs/*.out")}
    assert {s.state for s in states.values()} == {"COMPLETED"}, (states, logs)
    shards = sorted(p.name for p in (checkpoint / "global_step2").iterdir())
    assert shards == ["mp_rank_00_model_states.pt", "zero_pp_rank_0_mp_rank_00_optim_states.pt",
                      "zero_pp_rank_1_mp_rank_00_optim_states.pt"]  # ZeRO partitions of two ranks
    merged = checkpoint / "fp32" / "model.safetensors"
    out = subprocess.run([stack["python"], "-c", COMPARE, str(merged), str(checkpoint / "model.safetensors")],
                         capture_output=True, text=True, timeout=300)
    assert json.loads(out.stdout.strip().splitlines()[-1]) == {"keys": True, "equal": True, "n": 12}, out.stderr
    print(f"\nZeRO-2 train + consolidate on slurm: all done {time.monotonic() - t0:.0f}s after submission "
          f"({elapsed(train, merge)})")
