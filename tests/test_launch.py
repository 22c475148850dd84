"""`hpcstage launch --dry-run` and `hpcstage clusters`: rendered scripts against golden files, no Slurm needed.

Golden files live in tests/golden/launch/<case>/ with the test's folder written as <TMP> and this interpreter
as <PYTHON>. After an intended change to the templates, regenerate them and review the diff:

    HPCSTAGE_UPDATE_GOLDEN=1 .venv/bin/python -m pytest tests/test_launch.py
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from hpcstage import cli
from hpcstage.slurm import clusters
from hpcstage.slurm.clusters import load_registry

GOLDEN = Path(__file__).parent / "golden" / "launch"
UPDATE = os.environ.get("HPCSTAGE_UPDATE_GOLDEN") == "1"
CLUSTERS = load_registry().names()
OFFLINE_LINES = ("HF_HUB_OFFLINE=1", "HF_DATASETS_OFFLINE=1", "TRANSFORMERS_OFFLINE=1")
MODEL = "demo-org/tiny-model"
CANARY = "hf_CANARYcanaryCANARYcanary0123456789"
TRAIN_CONFIG = """\
### llama-factory SFT config (what the jobs of the original launcher ran)
model_name_or_path: Qwen/Qwen2.5-7B-Instruct
stage: sft
do_train: true
finetuning_type: full
deepspeed: examples/deepspeed/ds_z3_config.json
dataset: my_sft_data
template: qwen
cutoff_len: 4096
per_device_train_batch_size: 1
gradient_accumulation_steps: 8
learning_rate: 1.0e-5
num_train_epochs: 3.0
bf16: true
"""


@pytest.fixture(autouse=True)
def isolated(tmp_path, monkeypatch):
    """Bundled registry only; HF caches and experiments under tmp_path; a canary token in the environment."""
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "config"))
    monkeypatch.delenv(clusters.SITE_ENV, raising=False)
    for name in list(os.environ):
        if name.startswith(("HF_", "HUGGING_FACE_")):
            monkeypatch.delenv(name)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "datasets"))
    monkeypatch.setenv("HF_TOKEN", CANARY)
    monkeypatch.setenv("SBATCH_ACCOUNT", "demo-budget")  # what sbatch reads when no --account is given
    monkeypatch.delenv("SLURM_ACCOUNT", raising=False)
    monkeypatch.chdir(tmp_path)


def hpcstage(*args: str, capsys=None) -> tuple[int, str, str]:
    code = cli.main([str(a) for a in args])
    out, err = capsys.readouterr() if capsys else ("", "")
    return code, out, err


def normalise(text: str, tmp_path: Path) -> str:
    return (text.replace(str(tmp_path), "<TMP>").replace(sys.executable, "<PYTHON>")
            .replace(str(Path(sys.executable).parent), "<PYTHON_DIR>"))


def compare_golden(case: str, exp: Path, tmp_path: Path, names: list[str]) -> None:
    folder = GOLDEN / case
    if UPDATE:
        shutil.rmtree(folder, ignore_errors=True)
        folder.mkdir(parents=True)
        for name in names:
            (folder / name).write_text(normalise((exp / name).read_text(), tmp_path))
    assert sorted(p.name for p in folder.iterdir()) == sorted(names), f"regenerate {folder} (see module docstring)"
    for name in names:
        assert normalise((exp / name).read_text(), tmp_path) == (folder / name).read_text(), (
            f"{case}/{name} differs from the golden file; if intended, regenerate (see module docstring)"
        )


def check_script(path: Path) -> str:
    text = path.read_text()
    proc = subprocess.run(["bash", "-n", str(path)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    if shutil.which("shellcheck"):
        proc = subprocess.run(["shellcheck", "-s", "bash", str(path)], capture_output=True, text=True)
        assert proc.returncode == 0, proc.stdout
    return text


def no_canary(folder: Path) -> None:
    for path in folder.rglob("*"):
        if path.is_file():
            assert CANARY not in path.read_text(), path


def train_config(tmp_path: Path) -> Path:
    path = tmp_path / "sft.yaml"
    path.write_text(TRAIN_CONFIG)
    return path


@pytest.mark.parametrize("name", CLUSTERS)
def test_train_with_eval_dry_run_matches_golden_on_every_cluster(name, tmp_path, capsys):
    code, out, err = hpcstage(
        "launch", "--job-type", "train", "--cluster", name, "--train-config", train_config(tmp_path),
        "--model", "demo-org/tiny-model", "--dataset", "demo-org/tiny-dataset", "--num-nodes", "2",
        "--eval-tasks", "hellaswag,arc_easy", "--name", "sft", "--time-limit", "12:00:00", "--account", "demo-budget",
        "--dry-run", capsys=capsys,
    )
    assert code == 0, err
    exp = tmp_path / "experiments" / "sft"
    cluster = load_registry().get(name)
    for script in ("train.sbatch", "eval.sbatch"):
        text = check_script(exp / script)
        offline_lines = [line for line in OFFLINE_LINES if line in text.splitlines()]
        assert offline_lines == ([] if cluster.internet else list(OFFLINE_LINES)), script
        assert ("HPCSTAGE_MODEL=\"$HF_HUB_CACHE/models--demo-org--tiny-model/snapshots/" in text) != cluster.internet
        assert text in out  # dry run prints every script
    jobs = json.loads((exp / "jobs.json").read_text())
    assert [(j["key"], j["job_id"], j["dependency"]) for j in jobs["jobs"]] == [
        ("train", None, None), ("eval", None, "afterok:{train#0}")
    ]
    assert "would run: sbatch --parsable --dependency=afterok:{train#0} " in out
    assert "demo-org/tiny-model@main: " + ("online" if cluster.internet else "would fetch") in out
    config = json.loads((exp / "config.json").read_text())
    assert config["cluster"]["name"] == name and config["offline"] is not cluster.internet
    assert not (tmp_path / "hub").exists()  # a dry run stages nothing
    no_canary(exp)
    compare_golden(f"train-eval-{name}", exp, tmp_path, ["train.sbatch", "eval.sbatch", "jobs.json"])


def test_datagen_35_task_folders_in_chunks_of_10_is_an_array_of_4(tmp_path, capsys):
    tasks = tmp_path / "traces"
    for n in range(35):
        (tasks / f"task-{n:03d}").mkdir(parents=True)
        (tasks / f"task-{n:03d}" / "trace.json").write_text("{}")
    (tasks / "README.md").write_text("not a task folder")
    script = tmp_path / "gen.py"
    script.write_text("print('generate')\n")
    code, out, err = hpcstage(
        "launch", "--job-type", "datagen", "--cluster", "jureca", "--datagen-script", script,
        "--datagen-engine", "vllm", "--datagen-extra-args", "--temperature 0.7 --n 'two words'",
        "--trace-input-path", tasks, "--chunk-size", "10", "--name", "gen", "--dry-run", capsys=capsys,
    )
    assert code == 0, err
    exp = tmp_path / "experiments" / "gen"
    text = check_script(exp / "datagen.sbatch")
    assert "#SBATCH --array=0-3\n" in text
    assert "#SBATCH --output=<TMP>/experiments/gen/logs/%x-%A_%a.out" in normalise(text, tmp_path)
    chunk_map = json.loads((exp / "chunk_map.json").read_text())
    assert [len(c) for c in chunk_map["chunks"]] == [10, 10, 10, 5]
    assert sum(chunk_map["chunks"], []) == [str(tasks / f"task-{n:03d}") for n in range(35)]
    assert len(list(tasks.iterdir())) == 36  # nothing copied, moved or deleted
    compare_golden("datagen-chunks-jureca", exp, tmp_path, ["datagen.sbatch", "jobs.json", "chunk_map.json"])

    code, _, err = hpcstage(
        "launch", "--job-type", "datagen", "--cluster", "jureca", "--datagen-script", script,
        "--trace-input-path", tasks, "--chunk-size", "10", "--max-parallel", "2", "--name", "gen2", "--dry-run",
        capsys=capsys,
    )
    assert code == 0, err
    assert "#SBATCH --array=0-3%2\n" in (tmp_path / "experiments" / "gen2" / "datagen.sbatch").read_text()

    code, _, err = hpcstage(
        "launch", "--job-type", "datagen", "--cluster", "jureca", "--datagen-script", script,
        "--trace-input-path", tasks, "--chunk-size", "10", "--max-parallel", "0", "--name", "gen3", "--dry-run",
        capsys=capsys,
    )
    assert code == 2 and "--max-parallel must be at least 1 (got 0)" in err, err  # not "no limit"
    assert not (tmp_path / "experiments" / "gen3").exists()


def test_consolidate_uses_the_checkpoints_own_zero_to_fp32(tmp_path, capsys):
    ckpt = tmp_path / "checkpoints" / "checkpoint-500"
    code, _, err = hpcstage("launch", "--job-type", "consolidate", "--cluster", "leonardo", "--checkpoint-dir", ckpt,
                            "--name", "merge", "--dry-run", capsys=capsys)
    assert code == 0, err
    exp = tmp_path / "experiments" / "merge"
    text = check_script(exp / "consolidate.sbatch")
    assert '"$HPCSTAGE_PYTHON" "$checkpoint/zero_to_fp32.py" "$checkpoint" "$output" --safe_serialization' in text
    assert "--gres" not in text  # merging needs memory, not GPUs
    compare_golden("consolidate-leonardo", exp, tmp_path, ["consolidate.sbatch", "jobs.json"])


def test_run_with_restarts_and_after_renders_an_afternotok_chain(tmp_path, capsys):
    code, out, err = hpcstage("launch", "--job-type", "run", "--cluster", "claix", "--command", "python x.py --n 1",
                              "--after", "4242", "--max-restarts", "2", "--name", "retry", "--dry-run", capsys=capsys)
    assert code == 0, err
    exp = tmp_path / "experiments" / "retry"
    text = check_script(exp / "run.sbatch")
    assert "trap hpcstage_end_chain EXIT" in text and "\npython x.py --n 1\n" in text
    assert [j["sbatch"][2:-1] for j in json.loads((exp / "jobs.json").read_text())["jobs"]] == [
        ["--dependency=afterok:4242", "--hold"],
        ["--dependency=afternotok:{run#0}", "--kill-on-invalid-dep=yes"],
        ["--dependency=afternotok:{run#1}", "--kill-on-invalid-dep=yes"],
    ]
    compare_golden("run-restarts-claix", exp, tmp_path, ["run.sbatch", "jobs.json"])


def test_online_and_offline_override_the_registry(tmp_path, capsys):
    for name, flag, expect_offline in (("jureca", "--online", False), ("claix", "--offline", True)):
        code, _, err = hpcstage("launch", "--job-type", "run", "--cluster", name, flag, "--command", "true",
                                "--model", "demo-org/tiny-model", "--name", f"{name}{flag}", "--dry-run", capsys=capsys)
        assert code == 0, err
        text = (tmp_path / "experiments" / f"{name}{flag}" / "run.sbatch").read_text()
        assert ("HF_HUB_OFFLINE=1" in text.splitlines()) is expect_offline
        assert ("HPCSTAGE_MODEL=demo-org/tiny-model" in text) is not expect_offline


def test_local_model_path_is_used_as_is(tmp_path, capsys):
    model = tmp_path / "my-model"
    model.mkdir()
    code, out, err = hpcstage("launch", "--job-type", "run", "--cluster", "jureca", "--command", "true",
                              "--model", model, "--name", "local", "--dry-run", capsys=capsys)
    assert code == 0, err
    assert f"HPCSTAGE_MODEL={model}\n" in (tmp_path / "experiments" / "local" / "run.sbatch").read_text()
    assert f"model {model}: local -> {model}" in out


def test_user_templates_override_one_job_type(tmp_path, capsys):
    templates = tmp_path / "templates"
    templates.mkdir()
    (templates / "run.sbatch.j2").write_text(
        '{% extends "base.sbatch.j2" %}\n{% block body %}\necho "site wrapper"\n{{ command }}\n{% endblock %}\n'
    )
    code, _, err = hpcstage("launch", "--job-type", "run", "--cluster", "juwels", "--command", "true",
                            "--templates", templates, "--name", "site", "--dry-run", capsys=capsys)
    assert code == 0, err
    text = check_script(tmp_path / "experiments" / "site" / "run.sbatch")
    assert 'echo "site wrapper"\ntrue\n' in text and "#SBATCH --partition=booster" in text


def test_a_template_naming_an_unknown_variable_is_refused(tmp_path, capsys):
    templates = tmp_path / "templates"
    templates.mkdir()
    (templates / "run.sbatch.j2").write_text('{% extends "base.sbatch.j2" %}\n{% block body %}{{ comand }}{% endblock %}')
    code, _, err = hpcstage("launch", "--job-type", "run", "--cluster", "juwels", "--command", "true",
                            "--templates", templates, "--name", "typo", "--dry-run", capsys=capsys)
    assert code == 2
    assert "'comand' is undefined" in err


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--job-type", "run", "--command", "true", "--chunk-size", "3"], "--chunk-size is for --job-type datagen"),
        (["--job-type", "run", "--command", "true", "--time-limit", "25:00:00"],
         "--time-limit 25:00:00 is over partition dc-gpu's limit of 24:00:00 (from the jureca registry)"),
        (["--job-type", "run", "--command", "true", "--partition", "dc-gpu-devel", "--time-limit", "03:00:00"],
         "--time-limit 03:00:00 is over partition dc-gpu-devel's limit of 02:00:00 (from the jureca registry); "
         "ask for 02:00:00 or less"),
        (["--job-type", "train", "--train-config", "sft.yaml", "--eval-tasks", "x", "--eval-time-limit", "25:00:00"],
         "--eval-time-limit 25:00:00 is over partition dc-gpu's limit of 24:00:00"),
        (["--job-type", "train", "--train-config", "sft.yaml", "--eval-tasks", "x", "--eval-gpus", "5"],
         "jureca partition dc-gpu has 4 GPUs per node; --eval-gpus 5 asked"),
        (["--job-type", "run", "--command", "true", "--after", "no-such-folder"],
         "--after 'no-such-folder' is not a Slurm job id nor an experiment folder (one with jobs.json)"),
        (["--job-type", "run", "--command", "true", "--gpus-per-node", "5"], "jureca partition dc-gpu has 4 GPUs per node"),
        (["--job-type", "run"], '--job-type run needs --command "..."'),
        (["--job-type", "train"], "--train-config is required"),
        (["--job-type", "run", "--command", "true", "--after", "x1"], "--after 'x1' is not a Slurm job id"),
        (["--job-type", "run", "--command", "true", "--cluster", "jurecaa"], "did you mean 'jureca'"),
        (["--job-type", "run", "--command", "true", "--model", "not a repo"], "--model"),
        (["--job-type", "run", "--command", "true", "--cpus-per-task", "0"], "--cpus-per-task must be at least 1"),
        (["--job-type", "run", "--command", "true", "--num-nodes", "0"], "--num-nodes must be at least 1"),
    ],
)
def test_bad_options_are_refused_before_anything_is_written(args, message, tmp_path, capsys):
    train_config(tmp_path)
    if "--cluster" not in args:
        args = [*args, "--cluster", "jureca"]
    code, _, err = hpcstage("launch", *args, "--name", "bad", "--dry-run", capsys=capsys)
    assert code == 2, err
    assert message in err
    assert not (tmp_path / "experiments" / "bad" / "jobs.json").exists()


def test_not_staged_with_no_stage_refuses_to_submit(tmp_path, capsys):
    code, _, err = hpcstage("launch", "--job-type", "run", "--cluster", "jureca", "--command", "true",
                            "--model", "demo-org/tiny-model", "--no-stage", "--name", "ns", capsys=capsys)
    assert code == 1
    assert "not staged in" in err and "model demo-org/tiny-model@main" in err
    assert not (tmp_path / "experiments" / "ns" / "jobs.json").exists()


def test_offline_check_failure_refuses_to_submit(hub, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("HF_ENDPOINT", hub.url)
    monkeypatch.setenv("HF_HUB_DISABLE_XET", "1")
    manifest = tmp_path / "hpcstage.yaml"
    manifest.write_text("models:\n  - repo: demo-org/tiny-model\n    include: ['*.safetensors']\n")
    code, _, err = hpcstage("launch", "--job-type", "run", "--cluster", "jureca", "--command", "true",
                            "-f", manifest, "--name", "chk", capsys=capsys)
    assert code == 1, err
    assert "offline check failed, nothing submitted" in err and "config.json" in err
    assert not (tmp_path / "experiments" / "chk" / "jobs.json").exists()


def test_an_experiment_is_launched_once(tmp_path, capsys):
    exp = tmp_path / "experiments" / "once"
    exp.mkdir(parents=True)
    (exp / "jobs.json").write_text(json.dumps({"jobs": [{"key": "run", "job_id": "12"}]}))
    code, _, err = hpcstage("launch", "--job-type", "run", "--cluster", "jureca", "--command", "true",
                            "--name", "once", "--dry-run", capsys=capsys)
    assert code == 2 and "was launched already" in err


def test_clusters_table_show_and_detect(capsys, monkeypatch):
    code, out, _ = hpcstage("clusters", capsys=capsys)
    assert code == 0
    lines = out.splitlines()
    assert lines[0].split() == ["NAME", "INTERNET", "GPUS", "GPU", "TYPE", "PARTITION", "MAX", "TIME"]
    assert sorted(line.lstrip("* ").split()[0] for line in lines[1:-1]) == CLUSTERS
    code, out, _ = hpcstage("clusters", "show", "perlmutter", capsys=capsys)
    assert code == 0
    assert "--qos=regular --constraint=gpu&hbm80g --gpus-per-node=4" in out
    assert "--time-limit up to 48:00:00; stages before launch: no" in out
    code, _, err = hpcstage("clusters", "show", "perlmuter", capsys=capsys)
    assert code == 2 and "did you mean 'perlmutter'" in err
    monkeypatch.setenv("TACC_SYSTEM", "vista")
    code, out, _ = hpcstage("clusters", "detect", capsys=capsys)
    assert (code, out) == (0, "vista\n")


def test_status_of_a_dry_run_lists_unsubmitted_jobs(tmp_path, capsys):
    hpcstage("launch", "--job-type", "run", "--cluster", "jureca", "--command", "true", "--name", "st", "--dry-run",
             capsys=capsys)
    code, out, _ = hpcstage("status", "--experiment", tmp_path / "experiments" / "st", capsys=capsys)
    assert (code, out) == (0, "run\t-\tNOT SUBMITTED (dry run)\n")


def test_dry_run_pins_what_is_staged_and_says_what_would_be_fetched(hub, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("HF_ENDPOINT", hub.url)
    monkeypatch.setenv("HF_HUB_DISABLE_XET", "1")
    assert hpcstage("pull", "demo-org/tiny-model", "-q", capsys=capsys)[0] == 0
    requests = len(hub.log)
    code, out, err = hpcstage("launch", "--job-type", "run", "--cluster", "juwels", "--command", "true",
                              "--model", "demo-org/tiny-model", "--dataset", "demo-org/tiny-dataset",
                              "--name", "plan", "--dry-run", capsys=capsys)
    assert code == 0, err
    snapshot = tmp_path / "hub" / "models--demo-org--tiny-model" / "snapshots" / hub.commit_of("model", MODEL, "main")
    assert f"model demo-org/tiny-model@main: staged -> {snapshot}" in out
    assert "dataset demo-org/tiny-dataset@main: would fetch" in out
    assert f"HPCSTAGE_MODEL={snapshot}\n" in (tmp_path / "experiments" / "plan" / "run.sbatch").read_text()
    assert not (tmp_path / "hub" / "datasets--demo-org--tiny-dataset").exists()
    assert len(hub.log) == requests  # planning asks the Hub nothing


def test_restarted_array_relies_on_kill_on_invalid_dep(tmp_path, capsys):
    tasks = tmp_path / "traces"
    for n in range(3):
        (tasks / f"t{n}").mkdir(parents=True)
    script = tmp_path / "gen.py"
    script.write_text("")
    code, _, err = hpcstage("launch", "--job-type", "datagen", "--cluster", "local", "--datagen-script", script,
                            "--trace-input-path", tasks, "--chunk-size", "2", "--max-restarts", "1", "--name", "ra",
                            "--dry-run", capsys=capsys)
    assert code == 0, err
    exp = tmp_path / "experiments" / "ra"
    assert "hpcstage_end_chain" not in check_script(exp / "datagen.sbatch")
    assert json.loads((exp / "jobs.json").read_text())["jobs"][1]["sbatch"][2:4] == [
        "--dependency=afternotok:{datagen#0}", "--kill-on-invalid-dep=yes"]


@pytest.mark.parametrize("name", ["jureca", "juwels", "jupiter", "leonardo"])
def test_a_site_that_charges_a_budget_refuses_a_launch_without_account(name, tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("SBATCH_ACCOUNT")
    code, _, err = hpcstage("launch", "--job-type", "run", "--cluster", name, "--command", "true", "--name", "acct",
                            "--dry-run", capsys=capsys)
    assert code == 2
    assert err.strip() == (f"hpcstage: error: {name} charges every job to a project budget: pass --account BUDGET "
                           f"(or export SBATCH_ACCOUNT=BUDGET, or set account under [{name}] in "
                           "~/.config/hpcstage/clusters.toml)")
    assert not (tmp_path / "experiments" / "acct").exists()
    code, _, err = hpcstage("launch", "--job-type", "run", "--cluster", name, "--command", "true", "--name", "acct",
                            "--account", "proj1", "--dry-run", capsys=capsys)
    assert code == 0, err
    assert "#SBATCH --account=proj1\n" in (tmp_path / "experiments" / "acct" / "run.sbatch").read_text()


def test_each_job_asks_for_its_partitions_time_and_its_own_resources(tmp_path, capsys):
    code, out, err = hpcstage("launch", "--job-type", "train", "--cluster", "jureca", "--train-config",
                              train_config(tmp_path), "--partition", "dc-gpu-devel", "--eval-tasks", "hellaswag",
                              "--name", "devel", "--dry-run", capsys=capsys)
    assert code == 0, err
    exp = tmp_path / "experiments" / "devel"
    train, evaluation = (check_script(exp / f"{k}.sbatch") for k in ("train", "eval"))
    # the partition's own limit, not the cluster's 24 h
    assert "#SBATCH --time=02:00:00\n" in train and "#SBATCH --partition=dc-gpu-devel\n" in train
    assert "#SBATCH --gres=gpu:4\n#" in train and "#SBATCH --cpus-per-task=128\n" in train
    # the eval job: one GPU, its share of CPUs, its own (capped) time
    assert "#SBATCH --gres=gpu:1\n" in evaluation and "#SBATCH --cpus-per-task=32\n" in evaluation
    assert "#SBATCH --time=02:00:00\n" in evaluation
    assert "pretrained=$HPCSTAGE_EVAL_MODEL\"" in evaluation and "parallelize" not in evaluation
    code, _, err = hpcstage("launch", "--job-type", "train", "--cluster", "jureca", "--train-config",
                            train_config(tmp_path), "--eval-tasks", "hellaswag", "--eval-gpus", "2",
                            "--eval-time-limit", "01:30:00", "--name", "e2", "--dry-run", capsys=capsys)
    assert code == 0, err
    evaluation = check_script(tmp_path / "experiments" / "e2" / "eval.sbatch")
    assert "#SBATCH --gres=gpu:2\n" in evaluation and "#SBATCH --time=01:30:00\n" in evaluation
    assert "pretrained=$HPCSTAGE_EVAL_MODEL,parallelize=True\"" in evaluation


def test_module_loads_run_under_set_e_and_jsc_rendezvous_uses_the_infiniband_name(tmp_path, capsys):
    code, _, err = hpcstage("launch", "--job-type", "train", "--cluster", "juwels", "--train-config",
                            train_config(tmp_path), "--num-nodes", "2", "--name", "ib", "--dry-run", capsys=capsys)
    assert code == 0, err
    text = check_script(tmp_path / "experiments" / "ib" / "train.sbatch")
    assert text.index("set -euo pipefail") < text.index("module load Stages/2025\nmodule load CUDA\n")
    assert "export MASTER_ADDR=${nodes[0]}i\n" in text
    assert "export NCCL_SOCKET_IFNAME=ib0 GLOO_SOCKET_IFNAME=ib0\n" in text


def test_train_config_paths_are_resolved_against_its_folder_and_its_repo_id_is_staged(tmp_path, capsys,
                                                                                        monkeypatch):
    folder = tmp_path / "project"
    (folder / "data").mkdir(parents=True)
    (folder / "ds_z3.json").write_text("{}")
    config = folder / "sft.yaml"
    config.write_text("model_name_or_path: demo-org/tiny-model\ndataset_dir: data\ndeepspeed: ds_z3.json\n"
                      "output_dir: out/run1\noverwrite_output_dir: true\ntokenized_path: cache/tok\n")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    code, out, err = hpcstage("launch", "--job-type", "train", "--cluster", "jureca", "--train-config", config,
                              "--eval-tasks", "hellaswag", "--max-restarts", "1", "--name", "paths",
                              "--experiments-dir", tmp_path / "experiments", "--dry-run", capsys=capsys)
    assert code == 0, err
    assert "model demo-org/tiny-model@main: would fetch" in out  # the config's repo id is staged like --model
    exp = tmp_path / "experiments" / "paths"
    train = (exp / "train.sbatch").read_text()
    assert (f"\"model_name_or_path=$HPCSTAGE_MODEL\" dataset_dir={folder / 'data'} deepspeed={folder / 'ds_z3.json'} "
            f"output_dir={folder / 'out' / 'run1'}") in train
    assert "HPCSTAGE_MODEL=\"$HF_HUB_CACHE/models--demo-org--tiny-model/snapshots/" in train
    assert f"export HPCSTAGE_EVAL_MODEL={folder / 'out' / 'run1'}\n" in (exp / "eval.sbatch").read_text()
    warnings = [line for line in err.splitlines() if line.startswith("hpcstage: warning:")
                and "install what is missing into the job's environment" not in line]  # this venv has no llamafactory
    assert warnings == [
        "hpcstage: warning: --train-config sft.yaml: tokenized_path: cache/tok exists neither beside the config "
        f"({folder}) nor here ({elsewhere}); the job will look for it in {elsewhere}",
        "hpcstage: warning: --max-restarts 1 with overwrite_output_dir: true in sft.yaml: each restart trains from "
        "scratch; drop overwrite_output_dir (llama-factory then resumes from the last checkpoint in output_dir) or "
        "set resume_from_checkpoint",
    ]


def test_slurm_array_is_refused_where_compute_nodes_have_no_internet(tmp_path, capsys):
    manifest = tmp_path / "hpcstage.yaml"
    manifest.write_text("models:\n  - repo: demo-org/tiny-model\n")
    code, out, err = hpcstage("pull", "-f", manifest, "--slurm-array", "2", "--cluster", "jureca", capsys=capsys)
    assert code == 2
    assert err.strip() == (f"hpcstage: error: --slurm-array: jureca's compute nodes have no internet, so array "
                           f"workers cannot download; pull on the login node instead: `hpcstage pull -f {manifest}`")
    assert out == "" and not (tmp_path / "hpcstage-array").exists() and not (tmp_path / "hpcstage.lock").exists()


def test_after_an_experiment_folder_waits_for_its_last_job(tmp_path, capsys):
    first = tmp_path / "experiments" / "first"
    first.mkdir(parents=True)
    (first / "jobs.json").write_text(json.dumps({"jobs": [
        {"key": "train", "attempt": 0, "job_id": "101"}, {"key": "eval", "attempt": 0, "job_id": "102"},
        {"key": "eval", "attempt": 1, "job_id": "103"}]}))
    code, out, err = hpcstage("launch", "--job-type", "run", "--cluster", "jureca", "--command", "true",
                              "--after", first, "--name", "second", "--dry-run", capsys=capsys)
    assert code == 0, err
    assert "would run: sbatch --parsable --dependency=afterok:102?afterok:103 " in out
    (tmp_path / "experiments" / "dry").mkdir()
    (tmp_path / "experiments" / "dry" / "jobs.json").write_text(json.dumps({"jobs": [{"key": "run", "job_id": None}]}))
    code, _, err = hpcstage("launch", "--job-type", "run", "--cluster", "jureca", "--command", "true",
                            "--after", tmp_path / "experiments" / "dry", "--name", "third", "--dry-run", capsys=capsys)
    assert code == 2 and "nothing of that experiment was submitted (a dry run?); launch it first" in err


def test_dataset_without_a_load_entry_gets_a_warning_naming_what_the_job_should_load(tmp_path, capsys):
    code, _, err = hpcstage("launch", "--job-type", "run", "--cluster", "jureca", "--command", "true",
                            "--dataset", "demo-org/tiny-dataset", "--name", "ds", "--dry-run", capsys=capsys)
    assert code == 0, err
    assert err.splitlines() == [
        "hpcstage: warning: --dataset demo-org/tiny-dataset has no `load:` entry, so no load_dataset call was "
        "prebuilt or checked: offline, load_dataset('demo-org/tiny-dataset', ...) fails in the job; load "
        "$HPCSTAGE_DATASET (the snapshot folder) instead, or name it in a manifest with `load: {split: ...}` (-f)"]
    manifest = tmp_path / "hpcstage.yaml"
    manifest.write_text("datasets:\n  - repo: demo-org/tiny-dataset\n    load: {split: train}\n")
    code, _, err = hpcstage("launch", "--job-type", "run", "--cluster", "jureca", "--command", "true", "-f", manifest,
                            "--dataset", "demo-org/tiny-dataset", "--name", "ds2", "--dry-run", capsys=capsys)
    assert code == 0 and err == "", err


def test_a_tool_missing_from_the_jobs_environment_is_refused_before_any_sbatch(tmp_path, capsys, monkeypatch):
    """`exec: llamafactory-cli: not found` a day later in the queue becomes one line at submit time."""
    from hpcstage.slurm import launch as launch_module

    monkeypatch.setattr(launch_module, "submit", lambda *a, **k: pytest.fail("sbatch was called"))
    monkeypatch.setenv("PATH", "/usr/bin:/bin")  # nothing of the login node's environments on PATH
    env = tmp_path / "trainenv" / "bin"
    env.mkdir(parents=True)
    (env / "python").symlink_to(sys.executable)
    train = ["launch", "--job-type", "train", "--cluster", "jureca", "--train-config", train_config(tmp_path),
             "--python", env / "python"]
    code, _, err = hpcstage(*train, "--name", "tools", capsys=capsys)
    assert code == 2, err
    assert f"the train job runs `llamafactory-cli`, which is neither in {env} nor on PATH" in err
    assert "pass --python of the environment that has them" in err
    assert not (tmp_path / "experiments" / "tools").exists()
    code, _, err = hpcstage("launch", "--job-type", "eval", "--cluster", "jureca", "--model", MODEL, "--eval-tasks",
                            "hellaswag", "--python", env / "python", "--name", "tools", capsys=capsys)
    assert code == 2 and f"the eval job runs `{env / 'python'} -m lm_eval`, which that interpreter cannot import" in err
    # a dry run says the same as a warning and renders everything
    code, _, err = hpcstage(*train, "--name", "dry", "--dry-run", capsys=capsys)
    assert code == 0 and "llamafactory-cli" in err
    # with the tool in the job's environment: no word about it, and the job finds it first on its PATH
    tool = env / "llamafactory-cli"
    tool.write_text("#!/bin/sh\n")
    tool.chmod(0o755)
    code, _, err = hpcstage(*train, "--name", "ok", "--dry-run", capsys=capsys)
    assert code == 0 and "llamafactory-cli" not in err, err
    script = check_script(tmp_path / "experiments" / "ok" / "train.sbatch")
    assert f'export PATH={env}:"$PATH"' in script


def test_a_real_job_stack_without_the_jobs_tools_is_refused_before_any_sbatch(tmp_path, capsys, monkeypatch):
    """The check runs in a job stack that is not hpcstage's (datasets 4.0, no llamafactory, no lm_eval)."""
    from helpers import job_stack, job_stack_names

    from hpcstage.slurm import launch as launch_module

    python = job_stack(next(n for n in job_stack_names() if n.startswith("ds4")))["python"]
    monkeypatch.setattr(launch_module, "submit", lambda *a, **k: pytest.fail("sbatch was called"))
    monkeypatch.setenv("PATH", "/usr/bin:/bin")
    code, _, err = hpcstage("launch", "--job-type", "train", "--cluster", "jureca", "--train-config",
                            train_config(tmp_path), "--eval-tasks", "hellaswag", "--python", python,
                            "--name", "stack", capsys=capsys)
    assert code == 2, err
    assert f"the train job runs `llamafactory-cli`, which is neither in {Path(python).parent} nor on PATH" in err
    assert f"the eval job runs `{python} -m lm_eval`, which that interpreter cannot import" in err
    assert not (tmp_path / "experiments" / "stack").exists()


# -- environments and secrets (slurm/environment.py)


def private_file(path: Path, text: str, mode: int = 0o600) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.chmod(path, mode)
    return path


def user_clusters(tmp_path: Path, text: str) -> None:
    path = tmp_path / "config" / "hpcstage" / "clusters.toml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def test_activate_lines_per_job_type_run_after_the_module_loads_and_env_files_are_exported(tmp_path, capsys):
    user_clusters(tmp_path, """
[juwels.activate]
default = "source /p/project/x/miniconda3/bin/activate /p/project/x/envs/train"
eval = "source /p/project/x/envs/eval/bin/activate"
[juwels.env_file]
train = "%s"
""" % (tmp_path / "train.env"))
    (tmp_path / "train.env").write_text("# paths of my project\nexport DCFT=/p/project/x/dcft\n"
                                        "WANDB_PROJECT='sft runs' # a comment\nWANDB_MODE=offline\n")
    (tmp_path / "more.env").write_text("WANDB_MODE=online\n")
    code, _, err = hpcstage("launch", "--job-type", "train", "--cluster", "juwels", "--train-config",
                            train_config(tmp_path), "--eval-tasks", "hellaswag", "--env-file", tmp_path / "more.env",
                            "--name", "act", "--dry-run", capsys=capsys)
    assert code == 0, err
    exp = tmp_path / "experiments" / "act"
    train, evaluation = (check_script(exp / f"{k}.sbatch") for k in ("train", "eval"))
    line = "source /p/project/x/miniconda3/bin/activate /p/project/x/envs/train\n"
    # no interpreter named: the job runs the one its activation provides
    assert train.index("module load CUDA\n") < train.index(line) < train.index("HPCSTAGE_PYTHON=$(command -v python)")
    assert train.index("set -euo pipefail") < train.index(line)
    assert "source /p/project/x/envs/eval/bin/activate\n" in evaluation and line not in evaluation
    assert "export DCFT=/p/project/x/dcft\nexport WANDB_PROJECT='sft runs'\nexport WANDB_MODE=online\n" in train
    assert "DCFT" not in evaluation and "export WANDB_MODE=online\n" in evaluation  # the table: train only
    config = json.loads((exp / "config.json").read_text())
    assert config["jobs"]["train"]["env"] == {"DCFT": "/p/project/x/dcft", "WANDB_PROJECT": "sft runs",
                                              "WANDB_MODE": "online"}
    assert config["jobs"]["train"]["env_files"] == [str(tmp_path / "train.env"), str(tmp_path / "more.env")]
    assert config["jobs"]["eval"]["activate"] == "source /p/project/x/envs/eval/bin/activate"
    # --activate replaces the registry's line for every job of the launch
    code, _, err = hpcstage("launch", "--job-type", "run", "--cluster", "juwels", "--command", "true",
                            "--activate", "conda activate mine", "--name", "cli", "--dry-run", capsys=capsys)
    assert code == 0, err
    script = check_script(tmp_path / "experiments" / "cli" / "run.sbatch")
    assert "\nconda activate mine\n" in script and "miniconda3" not in script


@pytest.mark.parametrize("text, message", [
    ("WANDB_API_KEY=abc\n", "{f}:1: WANDB_API_KEY looks like a credential, and env files are copied into job scripts "
                            "and config.json; move it to your secrets file ($HPCSTAGE_SECRETS_FILE, chmod 600)"),
    ("OK=1\nnot a pair\n", "{f}:2: not a KEY=value line; write NAME=value (NAME of letters, digits, _)"),
])
def test_a_bad_env_file_is_refused_naming_its_line(text, message, tmp_path, capsys):
    (tmp_path / "bad.env").write_text(text)
    code, _, err = hpcstage("launch", "--job-type", "run", "--cluster", "jureca", "--command", "true", "--env-file",
                            tmp_path / "bad.env", "--name", "bad", "--dry-run", capsys=capsys)
    assert code == 2
    assert err.strip() == "hpcstage: error: " + message.format(f=tmp_path / "bad.env")
    assert not (tmp_path / "experiments" / "bad").exists()


def test_secrets_file_is_sourced_at_run_time_and_refused_when_others_can_read_it(tmp_path, capsys, monkeypatch):
    secret = "wandb_CANARY" + "7" * 24
    secrets = private_file(tmp_path / "private" / "secrets.env", f"WANDB_API_KEY={secret}\nexport HF_TOKEN={CANARY}\n")
    user_clusters(tmp_path, f'[jureca]\nsecrets_file = "{secrets}"\n')
    args = ["launch", "--job-type", "run", "--cluster", "jureca", "--command", "true", "--dry-run"]
    code, out, err = hpcstage(*args, "--name", "ok", capsys=capsys)
    assert code == 0, err
    exp = tmp_path / "experiments" / "ok"
    script = check_script(exp / "run.sbatch")
    assert f"hpcstage_secrets={secrets}\n" in script and 'source "$hpcstage_secrets"' in script
    assert script.index("{ set +x; } 2>/dev/null") < script.index('source "$hpcstage_secrets"')
    assert secret not in out + err and CANARY not in out + err
    no_canary(exp)
    assert [p for p in exp.rglob("*") if p.is_file() and secret in p.read_text()] == []
    assert json.loads((exp / "config.json").read_text())["jobs"]["run"]["secrets_file"] == str(secrets)

    secrets.chmod(0o640)
    code, _, err = hpcstage(*args, "--name", "open", capsys=capsys)
    assert code == 2 and not (tmp_path / "experiments" / "open").exists()
    assert err.strip() == (f"hpcstage: error: secrets file {secrets} (from secrets_file of [jureca] in clusters.toml) "
                           f"is open to others (mode 0640); make it private: chmod 600 {secrets}")
    # $HPCSTAGE_SECRETS_FILE wins over the registry, and must exist
    monkeypatch.setenv("HPCSTAGE_SECRETS_FILE", str(tmp_path / "missing.env"))
    code, _, err = hpcstage(*args, "--name", "missing", capsys=capsys)
    assert code == 2 and err.startswith(f"hpcstage: error: secrets file {tmp_path / 'missing.env'} "
                                        "(from $HPCSTAGE_SECRETS_FILE) does not exist; create it with `install -m 600")


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to give a file to another user")
def test_a_secrets_file_owned_by_someone_else_is_refused(tmp_path, capsys, monkeypatch):
    secrets = private_file(tmp_path / "theirs.env", "HF_TOKEN=x\n")
    os.chown(secrets, 65534, 65534)
    monkeypatch.setenv("HPCSTAGE_SECRETS_FILE", str(secrets))
    code, _, err = hpcstage("launch", "--job-type", "run", "--cluster", "jureca", "--command", "true", "--dry-run",
                            capsys=capsys)
    assert code == 2
    assert err.strip() == (f"hpcstage: error: secrets file {secrets} (from $HPCSTAGE_SECRETS_FILE) belongs to uid "
                           "65534, not to you: whoever owns it can change what your jobs run; use a file of your own "
                           "(chmod 600)")


def test_datagen_target_repo_is_refused_offline_and_without_a_token_and_rendered_per_chunk(tmp_path, capsys,
                                                                                          monkeypatch):
    tasks = tmp_path / "traces"
    for n in range(5):
        (tasks / f"task-{n}").mkdir(parents=True)
    (tmp_path / "gen.py").write_text("pass\n")
    args = ["launch", "--job-type", "datagen", "--datagen-script", tmp_path / "gen.py", "--trace-input-path", tasks,
            "--chunk-size", "2", "--datagen-target-repo", "gen-org/traces", "--dry-run"]
    code, _, err = hpcstage(*args, "--cluster", "jureca", "--name", "off", capsys=capsys)
    assert code == 2 and not (tmp_path / "experiments" / "off").exists()
    assert err.strip() == ("hpcstage: error: --datagen-target-repo: jureca's compute nodes have no internet, so the job "
                           "cannot upload; launch on a cluster with internet, or upload the experiment's output/ folder "
                           "from the login node afterwards (`hf upload --repo-type dataset gen-org/traces "
                           "EXPERIMENT/output`)")
    code, _, err = hpcstage(*args, "--cluster", "alpha", "--name", "notoken", capsys=capsys)
    assert code == 2 and "no secrets file is set; add a line HF_TOKEN=hf_... to a private file" in err
    monkeypatch.setenv("HPCSTAGE_SECRETS_FILE", str(private_file(tmp_path / "s.env", f"HF_TOKEN={CANARY}\n")))
    code, _, err = hpcstage(*args, "--cluster", "alpha", "--name", "up", capsys=capsys)
    assert code == 0, err
    script = check_script(tmp_path / "experiments" / "up" / "datagen.sbatch")
    assert "' gen-org/traces\"-chunk-$HPCSTAGE_CHUNK_INDEX\" \"$HPCSTAGE_OUTPUT_DIR\" up-datagen\n" in script
    assert 'export HPCSTAGE_OUTPUT_DIR="$HPCSTAGE_EXPERIMENT/output/chunk-$HPCSTAGE_CHUNK_INDEX"' in script
    assert CANARY not in script


def test_checks_of_the_jobs_environment_run_through_its_activation(tmp_path, capsys, monkeypatch):
    """An activated venv without huggingface_hub is found out on the login node, before any sbatch."""
    from hpcstage.slurm import launch as launch_module

    monkeypatch.setattr(launch_module, "submit", lambda *a, **k: pytest.fail("sbatch was called"))
    venv = tmp_path / "bare"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    monkeypatch.setenv("HPCSTAGE_SECRETS_FILE", str(private_file(tmp_path / "s.env", "HF_TOKEN=x\n")))
    (tmp_path / "gen.py").write_text("pass\n")
    code, _, err = hpcstage("launch", "--job-type", "datagen", "--cluster", "alpha", "--datagen-script",
                            tmp_path / "gen.py", "--datagen-target-repo", "gen-org/x", "--gpus-per-node", "0",
                            "--activate", f"source {venv}/bin/activate", "--name", "bare", capsys=capsys)
    assert code == 2
    assert ("the datagen job imports huggingface_hub in `python (after its activation)`, which cannot import it"
            in err), err
    assert not (tmp_path / "experiments" / "bare").exists()


def test_an_activate_table_naming_an_unknown_job_type_is_refused(tmp_path, capsys):
    user_clusters(tmp_path, '[jureca.activate]\ntrian = "source /p/x/bin/activate"\n')
    code, _, err = hpcstage("launch", "--job-type", "train", "--cluster", "jureca", "--train-config",
                            train_config(tmp_path), "--name", "typo", "--dry-run", capsys=capsys)
    assert code == 2 and not (tmp_path / "experiments" / "typo").exists()
    assert err.strip().endswith("activate: Value error, unknown job type trian; use train, datagen, consolidate, "
                                "eval, run or default")


# -- job types as modules (slurm/jobtypes/)


def test_each_job_type_takes_only_its_own_options_and_the_record_keeps_them_by_flag_name(tmp_path, capsys):
    """One registry maps --job-type to its module; an option of another job type is refused naming the job types
    it is for (train takes the eval options of the eval it chains), from the CLI and the library alike."""
    import hpcstage as api
    from hpcstage.slurm import JOB_TYPES, jobtypes

    assert tuple(jobtypes.REGISTRY) == JOB_TYPES
    for args, message in (
        (["--job-type", "run", "--command", "true", "--eval-command", "x"],
         "--eval-command is for --job-type train (a chained eval) or eval"),
        (["--job-type", "eval", "--model", MODEL, "--eval-tasks", "x", "--train-config", "sft.yaml"],
         "--train-config is for --job-type train"),
        (["--job-type", "datagen", "--datagen-script", "gen.py", "--command", "true"], "--command is for --job-type run"),
    ):
        code, _, err = hpcstage("launch", *args, "--cluster", "jureca", "--name", "other", "--dry-run", capsys=capsys)
        assert code == 2 and message in err, err
    assert not (tmp_path / "experiments" / "other").exists()
    with pytest.raises(api.BadInput, match="--checkpoint-dir is for --job-type consolidate"):
        api.launch("run", cluster="jureca", command="true", checkpoint_dir="ckpt", dry_run=True)
    with pytest.raises(api.BadInput, match="did you mean 'chunk_size'"):
        api.launch("datagen", cluster="jureca", chunk_sise=3, dry_run=True)

    done = api.launch("train", cluster="jureca", train_config=train_config(tmp_path), eval_tasks=["hellaswag"],
                           eval_gpus=2, name="flat", dry_run=True)
    from hpcstage.slurm.jobtypes.train import Options

    with pytest.raises(AttributeError):  # frozen: what was checked is what runs
        Options(eval_gpus=2).eval_gpus = 5  # type: ignore[misc]
    done_options = json.loads((done.experiment_dir / "config.json").read_text())["request"]
    assert [j.key for j in done.jobs] == ["train", "eval"] and done.jobs[1].gpus == 2
    assert done_options["job_type"] == "train" and done_options["eval_gpus"] == 2
    assert done_options["eval_tasks"] == ["hellaswag"] and done_options["train_config"] == str(train_config(tmp_path))
    assert "command" not in done_options and "chunk_size" not in done_options  # other job types' options: none
