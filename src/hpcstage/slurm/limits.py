"""Time limits a partition accepts: asked of Slurm on the cluster itself, else read from the registry."""

from __future__ import annotations

from hpcstage.errors import BadInput
from hpcstage.slurm.clusters import Cluster, is_here, live_max_time, slurm_time_seconds


def partition_limit(cluster: Cluster, partition: str | None, live: bool) -> tuple[bool, str | None, str]:
    """(known, longest time or None for no limit, where that came from) for a partition of ``cluster``:
    ``scontrol show partition`` when ``live`` (this machine is on the cluster), else the registry."""
    if live and partition:
        known, most = live_max_time(partition)
        if known:
            return True, most, f"`scontrol show partition {partition}`"
    most = cluster.partition_max_time(partition)
    return most is not None, most, f"the {cluster.name} registry"


def preflight_time(
    cluster: Cluster,
    partition: str | None,
    limit: str | None,
    option: str,
    live: bool | None = None,
    default: str | None = None,
) -> str:
    """The time limit to ask for: ``limit`` if the partition accepts it, else BadInput naming the fix;
    unset, ``default`` capped at the partition's limit (no default: the partition's limit)."""
    if live is None:
        live = is_here(cluster)
    known, most, source = partition_limit(cluster, partition, live)
    fallback = most or cluster.partition_max_time(partition) or cluster.max_time
    if limit is None:
        if default is not None and (most is None or slurm_time_seconds(default) <= slurm_time_seconds(most)):
            return default
        return fallback
    try:
        seconds = slurm_time_seconds(limit)
    except ValueError as e:
        raise BadInput(f"{option}: {e}") from None
    if most is not None and seconds > slurm_time_seconds(most):
        where = f"partition {partition}" if partition else cluster.name
        raise BadInput(
            f"{option} {limit} is over {where}'s limit of {most} (from {source}); "
            f"ask for {most} or less, or pick a partition with a longer limit (--partition)"
        )
    return limit
