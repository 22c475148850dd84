"""Job types, one module each, behind one small interface; the generic launcher (slurm/launch.py) does the rest
(artifacts, environments, rendering, submission, restart chains, records).

A job type module has:

- ``Options``: a frozen dataclass of its own options (the CLI's ``--flags`` with ``_``), checked on construction;
- ``jobs(options, site) -> list[Job]``: the jobs to render (``base.Job``: template key, resources, template
  context, dependencies between them), in submission order; files they read are written into ``site.exp``;

and, only where it needs them, hooks the launcher calls:

- ``preflight(options, at)``: checks against the cluster and the secrets file before anything is written;
- ``model(options)``: a Hub model repo its own config names (staged like ``--model``);
- ``offline_artifacts(options, jobs, python)``: what its jobs load that must be staged for offline nodes;
- ``CHAINS``: the job types whose options it takes too (train chains an eval).
"""

from __future__ import annotations

from dataclasses import fields
from types import ModuleType
from typing import Any

from hpcstage.errors import BadInput
from hpcstage.slurm import JOB_TYPES
from hpcstage.slurm.jobtypes import consolidate, datagen, run, train
from hpcstage.slurm.jobtypes import eval as evaluation

REGISTRY: dict[str, ModuleType] = {
    "train": train,
    "datagen": datagen,
    "consolidate": consolidate,
    "eval": evaluation,
    "run": run,
}
assert tuple(REGISTRY) == JOB_TYPES  # the CLI's choices and the registry's per-job-type tables name the same


def get(job_type: str) -> ModuleType:
    try:
        return REGISTRY[job_type]
    except KeyError:
        raise BadInput(f"unknown job type {job_type!r}; choose one of {', '.join(JOB_TYPES)}") from None


def option_names() -> set[str]:
    """Every job type's option names."""
    return {f.name for module in REGISTRY.values() for f in fields(module.Options)}


def options(job_type: str, values: dict[str, Any]) -> Any:
    """``job_type``'s Options from ``values`` (names of any job type's options; None or empty: unset). An option
    of another job type is refused, naming the job types it is for."""
    module = get(job_type)
    own = {f.name for f in fields(module.Options)}
    for name, value in values.items():
        if value is None or value == [] or value == ():
            continue
        if name not in own:
            raise BadInput(f"--{name.replace('_', '-')} is for --job-type {_owners(name)}")
    return module.Options(**{k: v for k, v in values.items() if k in own and v is not None})


def _owners(name: str) -> str:
    """`train (a chained eval) or eval`: the job types taking option `name`."""
    out = []
    for kind, module in REGISTRY.items():
        if name in {f.name for f in fields(module.Options)}:
            chained = [c for c in getattr(module, "CHAINS", ()) if name in {f.name for f in fields(get(c).Options)}]
            out.append(f"{kind} (a chained {chained[0]})" if chained else kind)
    return " or ".join(out)
