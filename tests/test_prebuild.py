"""`hpcstage prebuild`: the datasets Arrow cache built once on the login node, so that many offline jobs
starting together only read it. Real CLI, real `datasets`, the Hub emulator."""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

from hpcstage import offline
from hpcstage.manifest import load_manifest
from helpers import client_env, hpcstage, run_python

DATASET = "demo-org/tiny-dataset"
EVAL_ROWS = 50
STAMP = r"\[\d{4}-\d\d-\d\d \d\d:\d\d:\d\d\]"


def write_eval(path: Path, rows: int = EVAL_ROWS) -> Path:
    """An eval file as the experiment launcher writes them: the rows under `test`, other keys beside."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"test": [{"question": f"q{i}", "answer": i} for i in range(rows)],
                                "meta": {"source": "tests"}}))
    return path


def stage(hub, tmp_path: Path, *, prebuild: bool = True) -> tuple[Path, Path]:
    """A manifest with the sample dataset (`load: {split: train}`) and a local json `prebuild:` entry,
    pulled, and prebuilt unless told not to. Returns (manifest, eval file)."""
    eval_file = write_eval(tmp_path / "data" / "eval.json")
    manifest = tmp_path / "hpcstage.yaml"
    manifest.write_text(f"""
cache_dir: hub
datasets_cache_dir: datasets
models:
  - repo: demo-org/tiny-model
datasets:
  - repo: {DATASET}
    load: {{split: train}}
prebuild:
  - {{path: json, data_files: {eval_file}, field: test, split: train}}
""")
    env = client_env(hub, tmp_path / "unused")
    r = hpcstage("pull", "-f", str(manifest), "-q", env=env)
    assert r.returncode == 0, r.stderr
    if prebuild:
        r = hpcstage("prebuild", "-f", str(manifest), env=env)
        assert r.returncode == 0, r.stderr + r.stdout
    return manifest, eval_file


def _version_or(name: str, default: str) -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(name)
    except PackageNotFoundError:
        return default


def files_state(folder: Path) -> dict[str, tuple]:
    """Every file under `folder` with its inode, size and mtime: a rewrite changes one of them."""
    out = {}
    for p in folder.rglob("*"):
        if p.is_file():
            st = p.stat()
            out[p.relative_to(folder).as_posix()] = (st.st_ino, st.st_size, st.st_mtime_ns)
    return out


# What a job does: load the Hub dataset by repo id and the eval file, as in the job's own script.
JOB = """
import json, sys
from datasets import load_dataset
out = {}
for name, call in (("hub", lambda: load_dataset("demo-org/tiny-dataset", split="train")),
                   ("json", lambda: load_dataset("json", data_files=sys.argv[1], field="test", split="train"))):
    try:
        out[name] = len(call())
    except Exception as e:
        out[name] = type(e).__name__ + ": " + (str(e).strip().splitlines() or [""])[0]
print(json.dumps(out))
"""


def run_jobs(manifest: Path, eval_file: Path, n: int = 8) -> list[dict]:
    """`n` offline jobs started together (env from offline.job_env, network guarded); their results."""
    env = offline.job_env(load_manifest(manifest))
    procs = [subprocess.Popen([*offline.isolated_command(JOB, "guard"), str(eval_file)], env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(n)]
    results = []
    for p in procs:
        out, err = p.communicate(timeout=120)
        assert p.returncode == 0, err
        results.append(json.loads(out.strip().splitlines()[-1]))
    return results


def test_after_prebuild_eight_offline_jobs_load_and_no_arrow_file_is_touched(hub, tmp_path):
    manifest, eval_file = stage(hub, tmp_path)
    cache = tmp_path / "datasets"
    before = files_state(cache)
    assert any(p.endswith(".arrow") and p.startswith("demo-org___tiny-dataset/") for p in before)
    assert any(p.endswith(".arrow") and p.startswith("json/") for p in before)
    hub.stop()  # nothing may need the server from here on

    results = run_jobs(manifest, eval_file)

    assert results == [{"hub": 300, "json": EVAL_ROWS}] * 8
    after = files_state(cache)
    changed = {p for p in before if after.get(p) != before[p]}
    added = set(after) - set(before)
    assert changed == set(), changed
    assert {p for p in added if not p.endswith(".lock")} == set(), added  # datasets' FileLocks may appear


def test_without_prebuild_offline_jobs_cannot_load_by_repo_id(hub, tmp_path, capsys):
    """Demonstration: the hub cache alone does not serve `load_dataset("org/name")` offline. The eval file
    does load (datasets builds it in each job, racing on the shared cache): recorded, not asserted."""
    manifest, eval_file = stage(hub, tmp_path, prebuild=False)
    results = run_jobs(manifest, eval_file)

    # datasets 5.2 with only the hub cache: ConnectionError "Couldn't reach 'org/name' on the Hub (OfflineModeIsEnabled)"
    assert all(str(r["hub"]).startswith(f"ConnectionError: Couldn't reach '{DATASET}'") for r in results), results
    assert not list((tmp_path / "datasets").glob("demo-org___tiny-dataset/**/*.arrow"))
    with capsys.disabled():
        outcomes = sorted({json.dumps(r) for r in results})
        print(f"\n[demo] 8 offline jobs without prebuild: {len(results)} results, distinct: {outcomes}")


def test_log_lines_and_warm_run_skips_in_well_under_a_second(hub, tmp_path):
    manifest, eval_file = stage(hub, tmp_path, prebuild=False)
    env = client_env(hub, tmp_path / "unused")
    r = hpcstage("prebuild", "-f", str(manifest), env=env)
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert re.fullmatch(rf"{STAMP} CACHE_PREBUILD: Pre-building HF datasets cache", lines[0])
    assert lines[1] == "Unique datasets: 2"
    # the job's interpreter (here hpcstage's own: no python:) and its client versions
    import datasets, huggingface_hub
    assert lines[2] == (f"Job Python: {sys.executable} (python {'%d.%d.%d' % sys.version_info[:3]}, datasets "
                        f"{datasets.__version__}, huggingface_hub {huggingface_hub.__version__}, transformers "
                        f"{_version_or('transformers', 'not installed')})")
    assert re.fullmatch(rf"{STAMP} CACHE_BUILT: {DATASET}", lines[3])
    assert re.fullmatch(rf"{STAMP} CACHE_BUILT: {re.escape(str(eval_file))}", lines[4])
    assert re.fullmatch(rf"{STAMP} CACHE_PREBUILD_COMPLETE: All dataset caches ready", lines[5])
    assert len(lines) == 6

    hub.clear_log()
    started = time.monotonic()
    r = hpcstage("prebuild", "-f", str(manifest), "--json", env=env)
    wall = time.monotonic() - started
    assert r.returncode == 0, r.stderr
    summary = json.loads(r.stdout)
    assert [x["status"] for x in summary["results"]] == ["skipped", "skipped"]
    assert summary["seconds"] < 0.5 and wall < 5  # wall includes the interpreter start
    assert hub.log == []
    r = hpcstage("prebuild", "-f", str(manifest), env=env)  # skipped builds say so (was CACHE_BUILT)
    assert re.search(rf"^{STAMP} CACHE_SKIPPED: {DATASET} \(already built\)$", r.stdout, re.M), r.stdout
    assert "CACHE_BUILT" not in r.stdout

    # a changed eval file (new mtime) is a new datasets cache key: rebuilt, and the job finds it
    os.utime(eval_file, ns=(time.time_ns(), time.time_ns() + 10**9))
    r = hpcstage("prebuild", "-f", str(manifest), "--json", env=env)
    assert [x["status"] for x in json.loads(r.stdout)["results"]] == ["skipped", "built"]


def test_concurrent_prebuilds_build_each_dataset_once(hub, tmp_path):
    manifest, _ = stage(hub, tmp_path, prebuild=False)
    env = client_env(hub, tmp_path / "unused")
    procs = [subprocess.Popen([sys.executable, "-m", "hpcstage", "prebuild", "-f", str(manifest), "--json"],
                              env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(3)]
    summaries = []
    for p in procs:
        out, err = p.communicate(timeout=120)
        assert p.returncode == 0, err
        summaries.append(json.loads(out))
    statuses: dict[str, list[str]] = {}
    for s in summaries:
        for r in s["results"]:
            statuses.setdefault(r["key"], []).append(r["status"])
    assert len(statuses) == 2
    for key, seen in statuses.items():
        assert sorted(seen) == ["built", "skipped", "skipped"], (key, seen)
    assert not list((tmp_path / "datasets").rglob("*.incomplete"))


def test_from_experiment_builds_unique_paths_and_warns_about_missing_ones(tmp_path, hub):
    a, b = write_eval(tmp_path / "a.json", 3), write_eval(tmp_path / "b.json", 4)
    summary = tmp_path / "experiment_summary.yaml"
    summary.write_text(f"""
name: demo
evaluation:
  tasks:
    - {{name: t1, dataset: {a}}}
    - {{name: t2, dataset: {b}}}
    - {{name: t3, dataset: {a}}}
    - {{name: t4, dataset: {tmp_path / 'gone.json'}}}
""")
    env = client_env(hub, tmp_path / "home")
    r = hpcstage("prebuild", "--from-experiment", str(summary), env=env)
    assert r.returncode == 0, r.stderr + r.stdout
    out = r.stdout
    assert "Unique datasets: 3" in out
    assert re.search(rf"{STAMP} CACHE_BUILT: {re.escape(str(a))}\n", out)
    assert re.search(rf"{STAMP} CACHE_BUILT: {re.escape(str(b))}\n", out)
    assert "gone.json" in out and "not found" in out
    assert re.search(rf"{STAMP} CACHE_PREBUILD_COMPLETE: All dataset caches ready", out)
    assert hub.log == []  # local files: no request
    # the job's own call, offline, reads what was built (HF_DATASETS_CACHE from client_env)
    code = (f"from datasets import load_dataset\n"
            f"print(len(load_dataset('json', data_files={str(b)!r}, field='test', split='train')))")
    before = files_state(tmp_path / "home" / "datasets")
    r = run_python(code, {**env, "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1"})
    assert r.returncode == 0 and r.stdout.strip() == "4", r.stderr
    assert {k: v for k, v in files_state(tmp_path / "home" / "datasets").items() if k.endswith(".arrow")} == \
        {k: v for k, v in before.items() if k.endswith(".arrow")}


def test_prebuild_failure_and_bad_input_are_one_line(hub, tmp_path):
    env = client_env(hub, tmp_path / "home")
    r = hpcstage("prebuild", env=env)
    assert r.returncode == 2 and "-f MANIFEST" in r.stderr and "Traceback" not in r.stderr
    bad = tmp_path / "x.yaml"
    bad.write_text("evaluation: {}\n")
    r = hpcstage("prebuild", "--from-experiment", str(bad), env=env)
    assert r.returncode == 2 and "evaluation.tasks" in r.stderr
    manifest = tmp_path / "hpcstage.yaml"
    manifest.write_text("prebuild:\n  - {data_files: x.json}\n")
    r = hpcstage("prebuild", "-f", str(manifest), env=env)
    assert r.returncode == 2 and "path:" in r.stderr and "Traceback" not in r.stderr
    manifest.write_text("datasets:\n  - repo: demo-org/nope\n    load: {split: train}\n")
    r = hpcstage("prebuild", "-f", str(manifest), env=env)
    assert r.returncode == 1 and "CACHE_FAILED: demo-org/nope" in r.stdout and "Traceback" not in r.stderr


def test_measure_prebuild_against_a_plain_load_dataset(hub, tmp_path, capsys):
    """Numbers for the report: a cold prebuild (CLI start, build child, lease, marker) against the same
    plain `load_dataset` call in a fresh interpreter, and the warm skip."""
    manifest, _ = stage(hub, tmp_path, prebuild=False)
    env = client_env(hub, tmp_path / "plain")
    code = f"from datasets import load_dataset\nload_dataset({DATASET!r}, split='train')"
    t0 = time.monotonic()
    assert run_python(code, env).returncode == 0
    plain = time.monotonic() - t0
    t0 = time.monotonic()
    assert hpcstage("prebuild", "-f", str(manifest), "-q", env=env).returncode == 0
    cold = time.monotonic() - t0
    t0 = time.monotonic()
    assert hpcstage("prebuild", "-f", str(manifest), "-q", env=env).returncode == 0
    warm = time.monotonic() - t0
    with capsys.disabled():
        print(f"\n[measure] plain load_dataset (hub, 1 call): {plain:.2f}s; prebuild cold (hub + json): {cold:.2f}s; "
              f"prebuild warm: {warm:.2f}s")
    assert warm < cold


def test_a_build_that_does_not_load_offline_is_cache_failed_and_check_names_the_edit_that_fixes_it(hub, tmp_path):
    """`hf://` data files are listed over the network even offline: the build succeeds online, its offline
    proof fails, so prebuild says CACHE_FAILED (exit 1) instead of "All dataset caches ready"; check names
    the form that loads offline, and that form passes both."""
    manifest = tmp_path / "hpcstage.yaml"
    hf_url = f"hf://datasets/{DATASET}/data/train-*.parquet"
    manifest.write_text(f"""
cache_dir: hub
datasets_cache_dir: datasets
datasets:
  - repo: {DATASET}
prebuild:
  - {{path: parquet, data_files: "{hf_url}", split: train}}
""")
    env = client_env(hub, tmp_path / "unused")
    assert hpcstage("pull", "-f", str(manifest), "-q", env=env).returncode == 0
    r = hpcstage("prebuild", "-f", str(manifest), env=env)
    assert r.returncode == 1, r.stdout + r.stderr
    assert re.search(rf"{STAMP} CACHE_FAILED: {re.escape(hf_url)}: built into .*, but the same call offline fails "
                     r"in the job's Python: \w+", r.stdout), r.stdout
    assert "CACHE_PREBUILD_FAILED: 1 of 1 builds failed" in r.stdout
    assert "All dataset caches ready" not in r.stdout and "CACHE_BUILT" not in r.stdout
    assert not list((tmp_path / "datasets" / ".hpcstage-prebuild").glob("*.json"))  # no marker: not vouched for

    r = hpcstage("check", "-f", str(manifest), "--json", env=env)
    assert r.returncode == 1
    [bad] = [e for e in json.loads(r.stdout)["entries"] if not e["ok"]]
    assert "prebuild cannot make" in bad["problems"][0] and "offline fails" in bad["problems"][0]
    assert bad["fix"].startswith(f"in {manifest} write prebuild[0] as {{path: {DATASET}, "
                                 "data_files: 'data/train-*.parquet'}")

    # the edit check proposes: now built, proven, and ready
    manifest.write_text(manifest.read_text().replace(f'{{path: parquet, data_files: "{hf_url}", split: train}}',
                                                     f'{{path: {DATASET}, data_files: "data/train-*.parquet", split: train}}'))
    r = hpcstage("prebuild", "-f", str(manifest), env=env)
    assert r.returncode == 0 and "CACHE_PREBUILD_COMPLETE" in r.stdout, r.stdout + r.stderr
    r = hpcstage("check", "-f", str(manifest), env=env)
    assert r.returncode == 0, r.stdout


def test_data_files_on_a_hub_dataset_is_aliased_for_the_offline_lookup(hub, tmp_path):
    """datasets 4760: built online as default-<A>, looked up offline as default-<B>. prebuild links B to A
    (records it in the marker) and proves the load; removing the link makes check fail with a fix that
    makes it again."""
    manifest = tmp_path / "hpcstage.yaml"
    manifest.write_text(f"""
cache_dir: hub
datasets_cache_dir: datasets
datasets:
  - repo: {DATASET}
prebuild:
  - {{path: {DATASET}, data_files: "data/train-*.parquet", split: train}}
""")
    env = client_env(hub, tmp_path / "unused")
    assert hpcstage("pull", "-f", str(manifest), "-q", env=env).returncode == 0
    r = hpcstage("prebuild", "-f", str(manifest), "--json", env=env)
    assert r.returncode == 0, r.stdout + r.stderr
    [result] = json.loads(r.stdout)["results"]
    alias = Path(result["alias"])
    assert alias.is_symlink() and not os.path.isabs(os.readlink(alias))
    assert alias.resolve() == Path(result["cache_dir"]).parent.parent.resolve() != alias
    assert hpcstage("check", "-f", str(manifest), env=env).returncode == 0

    alias.unlink()  # as if someone cleaned the cache by hand
    r = hpcstage("check", "-f", str(manifest), "--json", env=env)
    assert r.returncode == 1
    [bad] = [e for e in json.loads(r.stdout)["entries"] if not e["ok"]]
    assert bad["fix"] == f"hpcstage prebuild -f {manifest}"  # the marker no longer holds: a plain prebuild redoes it
    r = subprocess.run(bad["fix"].replace("hpcstage", f"{sys.executable} -m hpcstage", 1).split(), env=env,
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr
    assert alias.is_symlink()
    assert hpcstage("check", "-f", str(manifest), env=env).returncode == 0


def test_the_job_interpreter_comes_from_flag_manifest_or_environment_and_a_bad_one_is_one_line(hub, tmp_path):
    venv = tmp_path / "jobenv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    manifest, _ = stage(hub, tmp_path, prebuild=False)
    env = client_env(hub, tmp_path / "unused")
    bare = str(venv / "bin" / "python")

    for args, extra, origin in ((["--python", bare], {}, "--python"),
                                ([], {"HPCSTAGE_PYTHON": bare}, "HPCSTAGE_PYTHON")):
        for cmd in ("prebuild", "check"):
            r = hpcstage(cmd, "-f", str(manifest), *args, env={**env, **extra})
            assert r.returncode == 2, r.stdout + r.stderr
            assert r.stderr.strip() == (f"hpcstage: error: job interpreter {bare} (from {origin}) has no `datasets`; "
                                        f"install it there ({bare} -m pip install 'datasets>=2.16') or point "
                                        "--python / `python:` at the jobs' Python"), r.stderr
    r = hpcstage("prebuild", "-f", str(manifest), "--python", str(tmp_path / "nope" / "python"), env=env)
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1
    assert f"{tmp_path / 'nope' / 'python'} (from --python) is not an executable file" in r.stderr
    broken = tmp_path / "broken-python"
    broken.write_text("#!/bin/sh\necho 'libpython3.11.so.1.0: cannot open shared object file' >&2\nexit 127\n")
    broken.chmod(0o755)
    r = hpcstage("check", "-f", str(manifest), "--python", str(broken), env=env)
    assert r.returncode == 2 and r.stderr.strip() == (
        f"hpcstage: error: job interpreter {broken} (from --python) does not run Python 3.8+ code; point it at "
        "the jobs' Python, e.g. /path/to/venv/bin/python"), r.stderr

    # --python given on the command line: check's fix line carries it, and running that line fixes it
    r = hpcstage("check", "-f", str(manifest), "--python", sys.executable, "--json", env=env)
    assert r.returncode == 1
    fixes = {e["fix"] for e in json.loads(r.stdout)["entries"] if not e["ok"]}
    assert fixes == {f"hpcstage prebuild -f {manifest} --python {sys.executable}"}, fixes
    r = subprocess.run([sys.executable, "-m", *fixes.pop().split()], env=env, capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr
    assert hpcstage("check", "-f", str(manifest), "--python", sys.executable, env=env).returncode == 0

    # the manifest's `python:`: ~ and $VARS expanded, relative to the manifest's folder, symlinks kept
    (tmp_path / "sub").mkdir()
    other = tmp_path / "sub" / "hpcstage.yaml"
    other.write_text("python: ../jobenv/bin/python\n")
    assert load_manifest(other).python == str(tmp_path / "sub" / ".." / "jobenv" / "bin" / "python")
    other.write_text("python: $JOBENV/bin/python\n")
    os.environ["JOBENV"] = str(venv)
    try:
        assert load_manifest(other).python == bare
    finally:
        del os.environ["JOBENV"]
    # the manifest's python: wins over HPCSTAGE_PYTHON, and --python over both
    manifest.write_text(manifest.read_text() + f"python: {bare}\n")
    r = hpcstage("prebuild", "-f", str(manifest), env={**env, "HPCSTAGE_PYTHON": sys.executable})
    assert r.returncode == 2 and f"(from python: in {manifest})" in r.stderr
    r = hpcstage("prebuild", "-f", str(manifest), "--python", sys.executable, env=env)
    assert r.returncode == 0, r.stdout + r.stderr
    assert f"Job Python: {sys.executable} (python" in r.stdout
