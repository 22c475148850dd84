"""What a launch is asked: the options every job type shares, and the job type's own (``jobtypes/``); and
what a job type's preflight hook is given.

Plain data in their own module, so that the parts of a launch (job types, artifacts.py, records.py) can
name them without importing the launcher that uses them (no import circle).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hpcstage.slurm.clusters import Cluster


@dataclass(frozen=True)
class LaunchRequest:
    """What every launch takes, and the job type's own options (``jobtypes.<type>.Options``); ``make_request``
    builds one from the CLI's flat option names."""

    job_type: str
    options: Any = None  # the job type's Options; None: its defaults
    cluster: str | None = None  # default: the detected cluster
    partition: str | None = None
    account: str | None = None
    experiments_dir: Path = Path("experiments")
    name: str | None = None  # default: <job type>-<date>-<time>
    after: list[str] = field(default_factory=list)  # job ids this launch waits for (afterok)
    max_restarts: int = 0
    dry_run: bool = False
    offline: bool | None = None  # None: the registry's `internet` decides
    manifest: Path | None = None
    model: str | None = None  # Hub repo id or local path
    dataset: str | None = None
    stage: bool = True
    templates: Path | None = None
    cache_dir: Path | None = None
    python: str | None = None  # interpreter for Python tools in jobs; default: registry, else this one
    num_nodes: int = 1
    time_limit: str | None = None  # default: the cluster's max_time
    gpus_per_node: int | None = None  # default: all for train/eval/datagen, none for run/consolidate
    cpus_per_task: int | None = None  # default: the node's CPUs per GPU asked for
    quiet: bool = False
    activate: str | None = None  # replaces the registry's activation line of every job
    env_files: list[str] = field(default_factory=list)  # KEY=value files exported into the jobs


@dataclass(frozen=True)
class Preflight:
    """What a job type's ``preflight`` hook checks its options against, before anything is written."""

    cluster: Cluster
    offline: bool
    offline_given: bool  # --offline was given (rather than the registry saying so)
    secrets: Path | None  # the secrets file, checked private
    secret_names: list[str]  # the names it assigns
