"""What a job type hands the generic launcher: ``Job`` (one batch script to render and submit) and ``Site`` (what
it may look at to build its jobs), plus the few helpers several job types share."""

from __future__ import annotations

import shlex
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from hpcstage.errors import BadInput
from hpcstage.slurm import environment
from hpcstage.slurm.clusters import Cluster
from hpcstage.slurm.limits import preflight_time
from hpcstage.slurm.render import Shell

if TYPE_CHECKING:
    from hpcstage.slurm.request import LaunchRequest

PYTHON = Shell('"$HPCSTAGE_PYTHON"')


@dataclass
class Attempt:
    """One submission of a job's script: its sbatch options (from data, never sliced out of an argv)."""

    options: tuple[str, ...]
    dependency: str | None = None  # the --dependency value among `options`, for the records
    job_id: str | None = None  # once submitted

    def argv(self, script: Path | None) -> list[str]:
        return ["sbatch", "--parsable", *self.options, str(script)]


@dataclass
class Job:
    """One batch script (``<key>.sbatch.j2``) and how it is submitted. A job type fills in the first block;
    the launcher fills in the rest (environment, dependencies, the script it rendered, the attempts)."""

    key: str  # train, eval, datagen, consolidate, run: also the template's name
    description: str
    nodes: int
    gpus: int
    cpus: int
    time_limit: str
    context: dict[str, Any]  # the template's own variables
    array: str | None = None
    after_job: str | None = None  # key of a job of this launch (afterok on any of its attempts)
    partition: str | None = None  # default: the cluster's
    tools: tuple[str, ...] = ()  # programs the job runs from its environment (the interpreter's folder, PATH)
    modules: tuple[str, ...] = ()  # modules it runs with `$HPCSTAGE_PYTHON -m`
    imports: tuple[str, ...] = ()  # modules its script's own Python code imports (the datagen upload)
    # --- filled in by the launcher
    after: list[str] = field(default_factory=list)  # external job ids (afterok)
    restarts: int = 0
    script: Path | None = None
    env: environment.JobEnvironment = field(default_factory=environment.JobEnvironment)
    python: str | None = None  # its interpreter; None: the `python` its activation puts first on PATH
    shim: Path | None = None  # with an activation: that interpreter as the job starts it, for the login node's checks
    attempts: list[Attempt] = field(default_factory=list)

    @property
    def ids(self) -> list[str]:
        """The Slurm job id of each submitted attempt."""
        return [a.job_id for a in self.attempts if a.job_id]

    @property
    def sbatch(self) -> list[list[str]]:
        """The sbatch command line of each attempt (what jobs.json records and the CLI prints)."""
        return [a.argv(self.script) for a in self.attempts]


@dataclass(frozen=True)
class Site:
    """What a job type builds its jobs from: the launch's generic request, the cluster, the experiment folder
    (files the jobs read are written there), whether this machine is on the cluster (live limits), and the
    launch's warnings (appended to)."""

    request: LaunchRequest
    cluster: Cluster
    exp: Path
    live: bool = False
    warnings: list[str] = field(default_factory=list)

    def default_partition(self) -> str | None:
        return self.request.partition or self.cluster.partition

    def node_gpus(self) -> int:
        return self.cluster.node_shape(self.default_partition())[1]

    def resources(
        self,
        gpus_default: int,
        *,
        partition: str | None = None,
        gpus: int | None = None,
        gpus_option: str = "--gpus-per-node",
        time_limit: str | None = None,
        time_option: str = "--time-limit",
        time_default: str | None = None,
    ) -> dict[str, Any]:
        """GPUs, CPUs, time limit and partition of one job, each checked against the partition's node and limit
        (GPUs and CPUs unset: --gpus-per-node and --cpus-per-task of the request)."""
        request, cluster = self.request, self.cluster
        partition = partition or cluster.partition
        node_cpus, node_gpus = cluster.node_shape(partition)
        where = f"{cluster.name} partition {partition}" if partition else cluster.name
        if gpus is None:
            gpus = gpus_default if request.gpus_per_node is None else request.gpus_per_node
        if not 0 <= gpus <= node_gpus:
            raise BadInput(f"{where} has {node_gpus} GPUs per node; {gpus_option} {gpus} asked")
        share = node_cpus // max(node_gpus, 1)
        cpus = request.cpus_per_task if request.cpus_per_task is not None else (share * gpus if gpus else share) or 1
        if not 1 <= cpus <= node_cpus:
            raise BadInput(f"{where} has {node_cpus} CPUs per node; --cpus-per-task {cpus} asked")
        limit = preflight_time(cluster, partition, time_limit, time_option, live=self.live, default=time_default)
        return {"gpus": gpus, "cpus": cpus, "time_limit": limit, "partition": partition}


def split_words(text: str | None) -> list[str]:
    """A command line option's words, as the shell would split them."""
    try:
        return shlex.split(text) if text else []
    except ValueError as e:
        raise BadInput(f"cannot split {text!r} into words ({e}); balance the quotes") from None


def existing_file(path: Path | None, option: str) -> Path:
    if path is None:
        raise BadInput(f"{option} is required for this job type")
    path = Path(path).expanduser().resolve()
    if not path.is_file():
        raise BadInput(f"{option} {path}: no such file")
    return path


def at_least(option: str, value: int | None, least: int) -> None:
    """Refuse a number under `least` (0 must not silently mean "the default")."""
    if value is not None and value < least:
        raise BadInput(f"{option} must be at least {least} (got {value})")
