"""``--job-type eval``: lm_eval on a model (also the eval a train job chains after itself, on its own resources)."""

from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from hpcstage.errors import BadInput
from hpcstage.slurm.jobtypes.base import PYTHON, Job, Site, at_least, split_words
from hpcstage.slurm.render import Shell

if TYPE_CHECKING:
    from hpcstage.slurm.artifacts import Artifact

EVAL_TIME_LIMIT = "04:00:00"  # an lm_eval run's default, capped at the partition's limit


@dataclass(frozen=True)
class Options:
    eval_tasks: tuple[str, ...] = ()
    eval_command: str | None = None  # default: $HPCSTAGE_PYTHON -m lm_eval
    eval_gpus: int | None = None  # default 1: lm_eval --model hf runs on one GPU
    eval_time_limit: str | None = None  # default: EVAL_TIME_LIMIT, capped at the partition's limit

    def __post_init__(self) -> None:
        object.__setattr__(self, "eval_tasks", tuple(self.eval_tasks))
        at_least("--eval-gpus", self.eval_gpus, 0)


def jobs(options: Options, site: Site) -> list[Job]:
    if not options.eval_tasks or not site.request.model:
        raise BadInput("--job-type eval needs --model and --eval-tasks")
    gpus = 1 if site.request.gpus_per_node is None else site.request.gpus_per_node
    return [eval_job(options, site, Shell('"$HPCSTAGE_MODEL"'), None, gpus)]


def eval_job(options: Options, site: Site, model: Any, after_job: str | None, gpus_default: int) -> Job:
    """lm_eval on its own resources: --eval-gpus (else `gpus_default`) and --eval-time-limit."""
    from hpcstage.evaltasks import task_spec

    tasks = ",".join(task_spec(t) for t in options.eval_tasks)
    gpus = gpus_default if options.eval_gpus is None else options.eval_gpus
    head = split_words(options.eval_command) or [PYTHON, "-m", "lm_eval"]
    model_args = '"pretrained=$HPCSTAGE_EVAL_MODEL' + (',parallelize=True"' if gpus > 1 else '"')
    argv = [
        *head,
        "--model",
        "hf",
        "--model_args",
        Shell(model_args),
        "--tasks",
        tasks,
        "--output_path",
        str(site.exp / "eval"),
        "--batch_size",
        "auto",
    ]
    resources = site.resources(
        1,
        gpus=gpus,
        gpus_option="--eval-gpus",
        time_limit=options.eval_time_limit,
        time_option="--eval-time-limit",
        time_default=EVAL_TIME_LIMIT,
    )
    return Job(
        "eval",
        f"eval: lm_eval tasks {tasks}",
        1,
        **resources,
        context={"eval_model": model, "eval_argv": argv},
        after_job=after_job,
        modules=() if options.eval_command else ("lm_eval",),
    )


def offline_artifacts(options: Options, jobs: list[Job], python: str | None) -> list[Artifact]:
    """The Hub datasets lm_eval's tasks load, asked of lm_eval in the eval job's interpreter (through its
    activation when it has one): with offline compute nodes they are staged, prebuilt and checked like the job's
    own. None with --eval-command (its own tool: hpcstage cannot ask it)."""
    from hpcstage import evaltasks
    from hpcstage.slurm.artifacts import Artifact

    evaluation = next((j for j in jobs if j.key == "eval"), None)
    if evaluation is None or options.eval_command:
        return []
    runner = str(evaluation.shim) if evaluation.shim else python or sys.executable
    return [
        Artifact("eval", d.repo, "dataset", d.revision, loads=d.loads, tasks=d.tasks)
        for d in evaltasks.resolve(list(options.eval_tasks), runner)
    ]
