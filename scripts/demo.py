"""`make demo`: the whole flow a user walks, on the bundled sample Hub, one short block per step.

1. pull examples/demo.yaml into demo-work/ from the Hub emulator (127.0.0.1, the sample repos)
2. pull again: warm, from hpcstage.lock, no request
3. verify: every staged file hashed offline
4. prebuild: the dataset's Arrow cache, built once and proven offline
5. check: every entry loaded with the network off (the emulator is stopped before this step), then what a
   job does: the real huggingface_hub and datasets load model and dataset offline
6. launch: a job on the local Slurm test cluster when one is running (`sinfo`, cluster `hpcstage`: the
   registry's `local`), waited for and its log printed; otherwise the same launch with --dry-run

Each step is the command a user types, printed before it runs; the demo stops at the first that fails.
"""
from __future__ import annotations

import os
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

from hpcstage.testing.samples import make_samples
from hpcstage.testing.hub import HubServer

REPO = Path(__file__).resolve().parent.parent
WORK = REPO / "demo-work"
STEPS = 6

OFFLINE_LOAD = r'''
import json, struct
from huggingface_hub import hf_hub_download, snapshot_download
from datasets import load_dataset

model = snapshot_download("demo-org/tiny-model", local_files_only=True)
with open(f"{model}/model.safetensors", "rb") as f:
    header = json.loads(f.read(struct.unpack("<Q", f.read(8))[0]))
tensors = {k: v["shape"] for k, v in header.items() if k != "__metadata__"}
vocab = json.load(open(f"{model}/tokenizer.json"))["model"]["vocab"]
print(f"   model main: {len(tensors)} tensors, {len(vocab)} tokens <- snapshot_download(local_files_only=True)")
cfg = json.load(open(hf_hub_download("demo-org/tiny-model", "config.json", revision="v1.0", local_files_only=True)))
print(f"   model v1.0: config.json max_position_embeddings={cfg.get('max_position_embeddings')} <- hf_hub_download")
ds = load_dataset("demo-org/tiny-dataset", split="train")
print(f"   dataset: {len(ds)} rows, columns {ds.column_names} <- load_dataset(\"demo-org/tiny-dataset\", split=\"train\")")
'''

# The job of step 6 (demo-work/job.py): it finds the snapshot folders in $HPCSTAGE_MODEL / $HPCSTAGE_DATASET
# and runs with the offline flags set.
JOB = """import json, os, socket
from datasets import load_dataset
from datasets.utils.logging import disable_progress_bar
disable_progress_bar()
ds = load_dataset(os.environ["HPCSTAGE_DATASET"], split="train")
cfg = json.load(open(os.path.join(os.environ["HPCSTAGE_MODEL"], "config.json")))
print(f"job on {socket.gethostname()} (HF_HUB_OFFLINE={os.environ['HF_HUB_OFFLINE']}): model_type {cfg['model_type']}, "
      f"{len(ds)} train rows")
"""


def step(n: int, title: str) -> None:
    print(f"\n== {n}/{STEPS} {title}", flush=True)


def run(argv: list[str], env: dict, show: list[str] | None = None, brief: bool = False) -> None:
    """Print the command as a user would type it (`show`: a shorter spelling), then run it; stop on failure.
    `brief`: of a long output only the first and last lines (a dry run prints the whole job script)."""
    print(f"$ {' '.join(shlex.quote(a) for a in (show or argv))}", flush=True)
    if not brief:
        subprocess.run(argv, env=env, check=True, cwd=WORK)
        return
    done = subprocess.run(argv, env=env, cwd=WORK, capture_output=True, text=True)
    lines = done.stdout.splitlines()
    print("\n".join(lines if len(lines) <= 12 else [*lines[:5], f"... ({len(lines) - 9} lines)", *lines[-4:]]))
    print(done.stderr, end="", file=sys.stderr)
    done.check_returncode()


def slurm_cluster_running() -> bool:
    """The registry's `local` test cluster answers here (not some other Slurm this machine may reach)."""
    if not shutil.which("sinfo"):
        return False
    from hpcstage.slurm.clusters import detect

    try:
        found = detect()
        ok = subprocess.run(["sinfo", "-h", "-o", "%P"], capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.SubprocessError, Exception):  # a broken registry or Slurm: no live launch
        return False
    return found is not None and found.name == "local" and ok.returncode == 0 and bool(ok.stdout.strip())


def main() -> int:
    shutil.rmtree(WORK, ignore_errors=True)
    WORK.mkdir()
    make_samples(WORK / "hub-root")
    manifest = WORK / "hpcstage.yaml"
    shutil.copy(REPO / "examples" / "demo.yaml", manifest)
    base = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "HUGGINGFACE_", "HUGGING_FACE_"))}
    base.update(HF_HOME=str(WORK / "hf-home"), HF_HUB_DISABLE_TELEMETRY="1", HF_UPDATE_DOWNLOAD_COUNTS="0",
                HF_HUB_DISABLE_XET="1")
    base.pop("HPCSTAGE_CLUSTERS", None)  # the bundled registry: `local` is the test cluster
    hpcstage = [sys.executable, "-m", "hpcstage"]
    m = ["-f", "hpcstage.yaml"]
    with HubServer(WORK / "hub-root") as server:
        env = dict(base, HF_ENDPOINT=server.url)
        print(f"Hub emulator on {server.url} with the sample repos; working folder {WORK}")
        step(1, "pull: every entry of the manifest into the hub cache; pins written to hpcstage.lock")
        run([*hpcstage, "pull", *m], env, ["hpcstage", "pull", *m])
        server.clear_log()
        step(2, "pull again: warm, from hpcstage.lock")
        run([*hpcstage, "pull", *m, "-q"], env, ["hpcstage", "pull", *m, "-q"])
        print(f"   requests sent to the Hub: {len(server.log)}")
        step(3, "verify: hash every staged file offline against hpcstage.lock")
        run([*hpcstage, "verify", *m], env, ["hpcstage", "verify", *m])
        step(4, "prebuild: the datasets Arrow cache jobs will load, built once and proven offline")
        run([*hpcstage, "prebuild", *m], env, ["hpcstage", "prebuild", *m])
    offline = dict(base, HF_ENDPOINT="http://127.0.0.1:9")  # the Hub is gone: nothing can be fetched now
    step(5, "check: the emulator is stopped; load every entry as a job would, network off")
    run([*hpcstage, "check", *m], offline, ["hpcstage", "check", *m])
    print("   a job's own loads (HF_HUB_OFFLINE=1, the real clients):", flush=True)
    job_env = {**offline, **_job_env(manifest), "DATASETS_VERBOSITY": "error"}
    subprocess.run([sys.executable, "-c", OFFLINE_LOAD], env=job_env, check=True, cwd=WORK)
    launch = ["launch", "--job-type", "run", "--cluster", "local", "--partition", "short", "--time-limit", "00:05:00",
              *m, "--model", "demo-org/tiny-model", "--dataset", "demo-org/tiny-dataset",
              "--experiments-dir", "experiments", "--name", "demo-job", "--command", f"python {WORK / 'job.py'}"]
    (WORK / "job.py").write_text(JOB)
    if slurm_cluster_running():
        step(6, "launch: stage, check and submit a job to the local Slurm cluster; wait for it")
        run([*hpcstage, *launch, "--wait", "--poll", "1"], offline, ["hpcstage", *launch, "--wait"])
        for log in sorted((WORK / "experiments" / "demo-job").rglob("*.out")):
            print(f"   {log.relative_to(WORK)}:")
            for line in log.read_text(errors="replace").splitlines():
                if line.startswith("job on"):
                    print(f"   | {line}")
    else:
        step(6, "launch: no Slurm cluster answers here (`sinfo`), so only render and record (--dry-run)")
        run([*hpcstage, *launch, "--dry-run"], offline, ["hpcstage", *launch, "--dry-run"], brief=True)
    print("\n== demo ok")
    return 0


def _job_env(manifest: Path) -> dict[str, str]:
    import hpcstage

    return hpcstage.job_env(manifest)


if __name__ == "__main__":
    sys.exit(main())
