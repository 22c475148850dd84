"""``--job-type consolidate``: DeepSpeed ZeRO shards of a checkpoint to one fp32 state dict, on CPUs."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from hpcstage.errors import BadInput
from hpcstage.slurm.jobtypes.base import Job, Site


@dataclass(frozen=True)
class Options:
    checkpoint_dir: Path | None = None


def jobs(options: Options, site: Site) -> list[Job]:
    if options.checkpoint_dir is None:
        raise BadInput("--job-type consolidate needs --checkpoint-dir")
    ckpt = Path(options.checkpoint_dir).expanduser().resolve()
    # CPU work: the registry's CPU partition where it names one (a GPU partition charges the GPUs too).
    partition = site.request.partition or site.cluster.cpu_partition or site.cluster.partition
    return [
        Job(
            "consolidate",
            f"consolidate: ZeRO shards of {ckpt.name} to fp32",
            1,
            **site.resources(0, partition=partition, time_limit=site.request.time_limit),
            context={"checkpoint_dir": str(ckpt), "output_dir": str(ckpt / "fp32")},
        )
    ]
