from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from hpcstage.testing.samples import make_samples
from hpcstage.testing.hub import HubServer

pytest_plugins = ["strict_skips"]  # HPCSTAGE_REQUIRE_ALL=1: a skip is a failure (CI)


@pytest.fixture(scope="session")
def sample_root(tmp_path_factory):
    """The sample repos (hpcstage.testing.samples), written once per session: read-only, copy it to change a repo."""
    root = tmp_path_factory.mktemp("samples")
    make_samples(root)
    return root


@pytest.fixture
def hub(sample_root):
    """A started HubServer on the sample repos; stopped after the test."""
    with HubServer(sample_root) as server:
        yield server


BIG_MODEL = "demo-org/big-model"
BIG_SIZE = 100 * 2**20 + 1234  # 26 range pieces of transfer.PIECE (4 MiB): the last one short and not block-aligned


def _one_lfs_file_repo(root: Path, repo_id: str, size: int, seed: int) -> Path:
    """`repo_id` under `root` with a small config.json and a `size`-byte random model.safetensors (LFS)."""
    import random

    repo = root / "models" / repo_id
    repo.mkdir(parents=True)
    (repo / "config.json").write_text('{"model_type": "llama"}\n')
    rng = random.Random(seed)
    with open(repo / "model.safetensors", "wb") as f:
        for start in range(0, size, 64 << 20):
            f.write(rng.randbytes(min(64 << 20, size - start)))
    return root


def _one_lfs_file_hub(name: str, repo_id: str, size: int, seed: int, why: str):
    """Two fixtures: `<name>_root` (the repo, written once per session) and `<name>_hub` (a server on it)."""

    @pytest.fixture(scope="session", name=f"{name}_root")
    def root(tmp_path_factory):
        return _one_lfs_file_repo(tmp_path_factory.mktemp(name), repo_id, size, seed)

    @pytest.fixture(name=f"{name}_hub")
    def hub(request):
        with HubServer(request.getfixturevalue(f"{name}_root")) as server:
            yield server

    root.__doc__ = f"A repo with one {size >> 20} MiB LFS file: {why}."
    return root, hub


MID_MODEL = "demo-org/mid-model"
MID_SIZE = 20 * 2**20 + 123  # 3 pieces: a large file (partial, ranges record, lease) that still arrives in a blink
GIB_MODEL = "demo-org/gib-model"
GIB = 2**30

big_root, big_hub = _one_lfs_file_hub("big", BIG_MODEL, BIG_SIZE, 7,
                                      "the large-file path: lease, parallel ranges, resume record")
mid_root, mid_hub = _one_lfs_file_hub("mid", MID_MODEL, MID_SIZE, 3, "a large file in a blink")
gib_root, gib_hub = _one_lfs_file_hub("gib", GIB_MODEL, GIB, 11,
                                      "kill/concurrency tests that the issue states at that size")


SLURM_SCRIPT = Path(__file__).resolve().parent.parent / "scripts" / "slurm-test-cluster.sh"


@pytest.fixture(scope="session")
def cluster():
    """The one-node Slurm test cluster: skip without it, or fail when HPCSTAGE_REQUIRE_SLURM=1 (CI)."""
    try:
        proc = subprocess.run(
            ["bash", str(SLURM_SCRIPT), "status"], capture_output=True, text=True, timeout=30
        )
        up, detail = proc.returncode == 0, proc.stdout + proc.stderr
    except (OSError, subprocess.TimeoutExpired) as exc:
        up, detail = False, str(exc)
    if not up:
        message = f"Slurm test cluster not up ({detail.strip()}); run: sudo {SLURM_SCRIPT} start"
        if os.environ.get("HPCSTAGE_REQUIRE_SLURM") == "1":
            pytest.fail(message)
        pytest.skip(message)
