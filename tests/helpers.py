"""Run the real Hugging Face clients against a local HubServer, in a subprocess.

huggingface_hub and datasets read every HF_* variable at import time, so each client run gets a fresh
interpreter with the environment built here.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

from hpcstage.layout import pieces_done  # noqa: F401  (the resume record's format has one owner; tests import it here)


def client_env(server, cache_dir: Path, **extra: str) -> dict:
    """Environment for a client that talks only to `server` and caches under `cache_dir`."""
    cache_dir = Path(cache_dir)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "HUGGING_FACE_"))}
    env.update({
        "HF_ENDPOINT": server.url,
        "HF_HOME": str(cache_dir / "home"),
        "HF_HUB_CACHE": str(cache_dir / "hub"),
        "HF_DATASETS_CACHE": str(cache_dir / "datasets"),
        "HF_HUB_DISABLE_TELEMETRY": "1",
        "HF_UPDATE_DOWNLOAD_COUNTS": "0",
        "HF_HUB_DISABLE_XET": "1",
        "HF_HUB_DISABLE_PROGRESS_BARS": "1",
        "HF_HUB_DISABLE_UPDATE_CHECK": "1",  # else the `hf` CLI asks pypi.org for a newer version
    })
    for name in ("NO_PROXY", "no_proxy"):  # a site proxy must never see the local test server
        env[name] = ",".join(filter(None, [os.environ.get(name), "127.0.0.1"]))
    env.update(extra)
    return env


def hpcstage(*args, env: dict, timeout: float = 300, **kw) -> subprocess.CompletedProcess:
    """The real CLI in a fresh interpreter, as a user runs it; stdout/stderr captured as text."""
    return subprocess.run([sys.executable, "-m", "hpcstage", *map(str, args)], env=env, capture_output=True,
                          text=True, timeout=timeout, **kw)


def run_python(code: str, env: dict, timeout: float = 120) -> subprocess.CompletedProcess:
    """Run `code` in a fresh interpreter; stdout/stderr captured as text."""
    return subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=timeout)


def sha256(path) -> str:
    """sha256 of a file's bytes, read in chunks (test files reach 1 GiB)."""
    import hashlib

    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(8 << 20):
            h.update(chunk)
    return h.hexdigest()


def wait_for(predicate, timeout: float, what: str, interval: float = 0.05) -> None:
    """Poll `predicate` until it holds; AssertionError naming `what` after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(interval)


def python_for(user: str) -> tuple[str, dict]:
    """An interpreter `user` can run with this test's packages: ours, or (when it lives under a private
    home such as /root/.pyenv) the system python of the same version with our site-packages on PYTHONPATH."""
    import shutil
    import site

    import hpcstage
    import pytest

    def works(python: str, env: dict) -> bool:
        cmd = ["runuser", "-u", user, "--", "env", "-i", *[f"{k}={v}" for k, v in env.items()], python, "-c",
               "import huggingface_hub, hpcstage.verification"]
        return subprocess.run(cmd, capture_output=True, cwd="/").returncode == 0

    if works(sys.executable, {}):
        return sys.executable, {}
    system = shutil.which(f"python{sys.version_info.major}.{sys.version_info.minor}", path="/usr/bin:/usr/local/bin")
    path = {"PYTHONPATH": os.pathsep.join([*site.getsitepackages(), str(Path(hpcstage.__file__).parent.parent)])}
    if system and works(system, path):
        return system, path
    pytest.skip(f"no python that user {user} can run with this venv's packages")


def _job_stacks():
    """scripts/job-stacks.py as a module (its name has a dash)."""
    import importlib.util

    script = Path(__file__).resolve().parent.parent / "scripts" / "job-stacks.py"
    spec = importlib.util.spec_from_file_location("job_stacks", script)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def job_stack_names() -> list[str]:
    """The job stacks scripts/job-stacks.py builds (datasets 4.0 / 2.21 / current releases, the llamafactory one)."""
    return list(_job_stacks().STACKS)


def job_stack(name: str) -> dict:
    """Job stack `name`, built first if it is not cached: its record plus `python`, the interpreter."""
    module = _job_stacks()
    record = module.build(name, log=lambda text: print(text, flush=True))
    return {**record, "python": str(module.python_of(name))}


def two_of_the_nodes_gpus(visible: str) -> bool:
    """CUDA_VISIBLE_DEVICES as Slurm sets it for --gres=gpu:2 on the test node (4 GPUs): two distinct indices.
    Which two depends on the other jobs holding GPUs at the time, so tests must not name them."""
    ids = visible.split(",")
    return len(ids) == 2 and len(set(ids)) == 2 and all(i in {"0", "1", "2", "3"} for i in ids)


def slurm_saved_environments(job_id: str) -> list[Path]:
    """slurmctld's saved copy of a job's environment (readable here: the test cluster runs as this user)."""
    proc = subprocess.run(["scontrol", "show", "config"], capture_output=True, text=True, check=True)
    location = next(line.split("=", 1)[1].strip() for line in proc.stdout.splitlines()
                    if line.startswith("StateSaveLocation"))
    return sorted(Path(location).glob(f"hash.*/job.{job_id}/environment"))


def online_nodes(tmp_path: Path, env: dict) -> dict:
    """The local cluster with internet = true (a site file): its nodes reach the emulator on 127.0.0.1, and
    --slurm-array is refused on clusters whose compute nodes have no internet."""
    site = tmp_path / "site-clusters.toml"
    site.write_text("[local]\ninternet = true\n")
    return {**env, "HPCSTAGE_CLUSTERS": str(site), "XDG_CONFIG_HOME": str(tmp_path / "config")}
