"""``--job-type run``: one shell command on the cluster's nodes, no GPUs unless asked."""

from __future__ import annotations

from dataclasses import dataclass

from hpcstage.errors import BadInput
from hpcstage.slurm.jobtypes.base import Job, Site


@dataclass(frozen=True)
class Options:
    command: str | None = None


def jobs(options: Options, site: Site) -> list[Job]:
    if not options.command:
        raise BadInput('--job-type run needs --command "..."')
    resources = site.resources(0, time_limit=site.request.time_limit)
    return [Job("run", "run: a command", site.request.num_nodes, **resources, context={"command": options.command})]
