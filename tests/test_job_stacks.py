"""prebuild and check in the JOB's own Python stack, not hpcstage's: real virtualenvs (scripts/job-stacks.py)
with datasets 4.0 + huggingface_hub 0.36 + transformers 4.57 (llamafactory 0.9.5's range), datasets 2.21 +
huggingface_hub 0.24, the current releases, and the llamafactory training stack. For each: pull, prebuild, check ready, then eight offline
jobs started together in that interpreter load every form a job uses, the Hub dataset with `data_files`
included (datasets issue 4760), and no Arrow file is added or changed while they run."""
from __future__ import annotations

import hashlib
import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

from hpcstage import offline
from hpcstage.manifest import load_manifest
from hpcstage.testing.samples import MODEL_TAG
from helpers import client_env, hpcstage, job_stack, job_stack_names

DATASET = "demo-org/tiny-dataset"
MODEL = "demo-org/tiny-model"
TRAIN_ROWS = 300
EVAL_ROWS = 7


def files_state(folder: Path) -> dict[str, tuple]:
    out = {}
    for p in folder.rglob("*"):
        if p.is_file() and not p.name.endswith(".lock"):  # datasets' FileLocks may appear
            st = p.stat()
            out[p.relative_to(folder).as_posix()] = (st.st_ino, st.st_size, st.st_mtime_ns)
    return out


def write_manifest(tmp_path: Path, python: str | None) -> Path:
    eval_file = tmp_path / "data" / "eval.json"
    eval_file.parent.mkdir(parents=True, exist_ok=True)
    eval_file.write_text(json.dumps({"test": [{"q": f"q{i}", "a": i} for i in range(EVAL_ROWS)], "meta": {}}))
    manifest = tmp_path / "hpcstage.yaml"
    manifest.write_text(f"""
cache_dir: hub
datasets_cache_dir: datasets
{f'python: {python}' if python else ''}
models:
  - repo: {MODEL}
  - repo: {MODEL}
    revision: {MODEL_TAG}
datasets:
  - repo: {DATASET}
    load: {{data_files: "data/train-*.parquet", split: train}}
prebuild:
  - {{path: {DATASET}, split: train}}
  - {{path: json, data_files: data/eval.json, field: test, split: train}}
""")
    return manifest


# One offline job: every load form of the manifest, as a job script writes it, plus the hub client's own
# offline downloads by repo id and by tag (with any warning they emit recorded).
JOB = r"""
import hashlib, json, logging, os, sys, warnings
out = {}
def attempt(name, fn):
    try:
        out[name] = fn()
    except Exception as e:
        text = str(e).strip().splitlines()
        out[name] = "%s: %s" % (type(e).__name__, text[0] if text else "")
def sha(path):
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()
from datasets import load_dataset
attempt("hub", lambda: len(load_dataset("demo-org/tiny-dataset", split="train")))
attempt("hub_data_files", lambda: len(load_dataset("demo-org/tiny-dataset", data_files="data/train-*.parquet",
                                                   split="train")))
attempt("json_field", lambda: len(load_dataset("json", data_files=sys.argv[1], field="test", split="train")))
from transformers import AutoConfig, AutoTokenizer
attempt("tokenizer", lambda: AutoTokenizer.from_pretrained("demo-org/tiny-model")("cache node job")["input_ids"])
attempt("config", lambda: AutoConfig.from_pretrained("demo-org/tiny-model").model_type)
records = []
class Keep(logging.Handler):
    def emit(self, record):
        records.append(record.getMessage())
logging.getLogger("huggingface_hub").addHandler(Keep(logging.WARNING))
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    from huggingface_hub import hf_hub_download, snapshot_download
    for rev in ("main", sys.argv[2]):
        attempt("snapshot@" + rev, lambda: sorted(
            os.path.relpath(os.path.join(d, f), snap) for snap in [snapshot_download("demo-org/tiny-model", revision=rev)]
            for d, _, fs in os.walk(snap) for f in fs))
        attempt("config.json@" + rev, lambda: sha(hf_hub_download("demo-org/tiny-model", "config.json", revision=rev)))
out["hub_warnings"] = [str(w.message) for w in caught] + records
print(json.dumps(out))
"""


def expected_job(sample_root: Path) -> dict:
    model = sample_root / "models" / MODEL
    tagged = model.with_name(f"{model.name}@{MODEL_TAG}")
    listing = {rev: sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file())
               for rev, folder in (("main", model), (MODEL_TAG, tagged))}
    return {
        "hub": TRAIN_ROWS, "hub_data_files": TRAIN_ROWS, "json_field": EVAL_ROWS, "config": "llama",
        "snapshot@main": listing["main"], f"snapshot@{MODEL_TAG}": listing[MODEL_TAG],
        "config.json@main": hashlib.sha256((model / "config.json").read_bytes()).hexdigest(),
        f"config.json@{MODEL_TAG}": hashlib.sha256((tagged / "config.json").read_bytes()).hexdigest(),
        "hub_warnings": [],
    }


def run_jobs(manifest: Path, python: str, eval_file: Path, n: int = 8) -> list[dict]:
    """`n` offline jobs started together in `python`, with the network off and the job environment."""
    env = offline.job_env(load_manifest(manifest))
    isolation = "netns" if offline.netns_available() else "guard"
    argv = [*offline.isolated_command(JOB, isolation, python=python), str(eval_file), MODEL_TAG]
    procs = [subprocess.Popen(argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for _ in range(n)]
    results = []
    for p in procs:
        out, err = p.communicate(timeout=300)
        assert p.returncode == 0, err[-3000:]
        results.append(json.loads(out.strip().splitlines()[-1]))
    return results


@pytest.mark.timeout(1800)  # a stack missing from the cache is built first (minutes, once)
@pytest.mark.parametrize("stack_name", job_stack_names())
def test_eight_offline_jobs_in_the_job_stack_load_every_form(stack_name, hub, sample_root, tmp_path, capsys):
    stack = job_stack(stack_name)
    manifest = write_manifest(tmp_path, stack["python"])
    env = client_env(hub, tmp_path / "unused")
    r = hpcstage("pull", "-f", str(manifest), "-q", env=env)
    assert r.returncode == 0, r.stderr

    started = time.monotonic()
    r = hpcstage("prebuild", "-f", str(manifest), "--json", env=env)
    prebuild_seconds = time.monotonic() - started
    assert r.returncode == 0, r.stdout + r.stderr
    summary = json.loads(r.stdout)
    assert summary["python"] == stack["python"]
    assert summary["versions"]["datasets"] == stack["versions"]["datasets"]
    assert [x["status"] for x in summary["results"]] == ["built", "built", "built"]
    # markers are per datasets version of the job stack
    markers = sorted(p.name for p in (tmp_path / "datasets" / ".hpcstage-prebuild").iterdir())
    assert markers and all(f".datasets-{stack['versions']['datasets']}.json" in m for m in markers), markers

    r = hpcstage("check", "-f", str(manifest), env=env)
    assert r.returncode == 0, r.stdout + r.stderr
    assert f"datasets {stack['versions']['datasets']}" in r.stdout.splitlines()[0]
    assert "ready: 5 of 5 entries load offline" in r.stdout

    hub.stop()  # nothing may need the server from here on
    cache = tmp_path / "datasets"
    before = files_state(cache)
    results = run_jobs(manifest, stack["python"], tmp_path / "data" / "eval.json")

    expected = expected_job(sample_root)
    for result in results:
        tokens = result.pop("tokenizer")
        assert isinstance(tokens, list) and tokens and all(isinstance(t, int) for t in tokens), tokens
        assert result == expected
    assert files_state(cache) == before  # no Arrow file (nor anything else) added or changed by the jobs
    with capsys.disabled():
        print(f"\n[stack {stack_name}] {stack['versions']}: prebuild (3 builds, each proven offline) "
              f"{prebuild_seconds:.1f}s; stack {'cached' if stack['cached'] else 'built'} "
              f"({stack['build_seconds']}s when built); 8 jobs x 9 load forms ok; config aliases (datasets 4760): "
              f"{[Path(x['alias']).name for x in summary['results'] if x['alias']]}")


@pytest.mark.timeout(1800)
def test_builds_belong_to_a_stack_and_two_stacks_share_one_datasets_cache(hub, tmp_path):
    """A build proven for datasets 5.x (hpcstage's own stack here) is not skipped for a job stack on 4.0: the
    local json's folder hash includes the packaged builder's code, which differs between versions. Two
    manifests with different `python:` share one hub and datasets cache; each ends ready in its stack."""
    import datasets  # hpcstage's own stack (the test extra)

    old = job_stack("ds4.0")
    assert old["versions"]["datasets"] != datasets.__version__
    manifests = {}
    for name, python in (("own", sys.executable), ("ds4.0", old["python"])):
        folder = tmp_path / name
        folder.mkdir()
        manifests[name] = write_manifest(folder, python)
        text = manifests[name].read_text().replace("cache_dir: hub", f"cache_dir: {tmp_path / 'hub'}")
        text = text.replace("datasets_cache_dir: datasets", f"datasets_cache_dir: {tmp_path / 'datasets'}")
        manifests[name].write_text(text.replace("data_files: data/eval.json", f"data_files: {tmp_path / 'eval.json'}"))
    (tmp_path / "eval.json").write_text(json.dumps({"test": [{"q": i} for i in range(EVAL_ROWS)]}))
    env = client_env(hub, tmp_path / "unused")
    assert hpcstage("pull", "-f", str(manifests["own"]), "-q", env=env).returncode == 0

    statuses = {}
    for name in ("own", "ds4.0", "own", "ds4.0"):
        r = hpcstage("prebuild", "-f", str(manifests[name]), "--json", env=env)
        assert r.returncode == 0, r.stdout + r.stderr
        statuses.setdefault(name, []).append([x["status"] for x in json.loads(r.stdout)["results"]])
    assert statuses == {"own": [["built"] * 3, ["skipped"] * 3], "ds4.0": [["built"] * 3, ["skipped"] * 3]}
    json_builds = {p.parent for p in (tmp_path / "datasets" / "json").rglob("*.arrow")}
    assert len(json_builds) == 2  # one local-json build per datasets version, each found by its own stack
    for name in ("own", "ds4.0"):
        r = hpcstage("check", "-f", str(manifests[name]), env=env)
        assert r.returncode == 0 and "ready: 5 of 5" in r.stdout, r.stdout + r.stderr


BLOCK_DATASETS = """\
import sys
if sys.prefix == {prefix!r}:  # hpcstage's own interpreter only: the job stack's children import it freely
    class _NoDatasets:
        def find_spec(self, name, path=None, target=None):
            if name == "datasets" or name.startswith("datasets."):
                raise ImportError("hpcstage's own process must not import datasets")
    sys.meta_path.insert(0, _NoDatasets())
"""


@pytest.mark.timeout(1800)
def test_hpcstage_installed_as_a_tool_never_imports_datasets_itself(hub, tmp_path):
    """`datasets` is an extra: with `python:` naming the job stack, pull, prebuild and check work in a
    hpcstage process where importing datasets fails."""
    stack = job_stack("ds4.0")
    manifest = write_manifest(tmp_path, stack["python"])
    blocker = tmp_path / "block"
    blocker.mkdir()
    (blocker / "sitecustomize.py").write_text(BLOCK_DATASETS.format(prefix=sys.prefix))
    env = client_env(hub, tmp_path / "unused", PYTHONPATH=str(blocker))
    probe = subprocess.run([sys.executable, "-c", "import datasets"], env=env, capture_output=True, text=True)
    assert "must not import datasets" in probe.stderr  # the blocker works
    for cmd in ("pull", "prebuild", "check"):
        r = hpcstage(cmd, "-f", str(manifest), env=env)
        assert r.returncode == 0, r.stdout + r.stderr
    assert "ready: 5 of 5" in r.stdout
