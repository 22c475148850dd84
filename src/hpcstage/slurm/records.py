"""An experiment's records: ``jobs.json`` (one record per submitted attempt: job id, dependency, the sbatch
command line) and ``config.json`` (the resolved request, cluster, artifacts and job environments; names of
secrets only, never values), and the status of a recorded experiment now."""

from __future__ import annotations

import json
import os
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from hpcstage import __version__, safefs
from hpcstage.errors import BadInput
from hpcstage.slurm import LaunchError, SlurmError
from hpcstage.slurm.artifacts import Artifact
from hpcstage.slurm.clusters import Cluster
from hpcstage.slurm.jobtypes.base import Job
from hpcstage.slurm.request import LaunchRequest


@dataclass
class Launch:
    """What a launch did (or, dry, would do)."""

    experiment_dir: Path
    cluster: Cluster
    offline: bool
    dry_run: bool
    artifacts: list[Artifact]
    jobs: list[Job]
    env: dict[str, str]
    warnings: list[str] = field(default_factory=list)  # things that will not stop the job but may hurt it
    withheld: list[str] = field(default_factory=list)  # names of this shell's variables sbatch does not export

    def records(self) -> list[dict[str, Any]]:
        """jobs.json's job list: one record per submitted attempt."""
        return [
            {
                "key": job.key,
                "attempt": n,
                "job_id": attempt.job_id,
                "script": job.script.name if job.script else None,
                "array": job.array,
                "dependency": attempt.dependency,
                "sbatch": attempt.argv(job.script),
            }
            for job in self.jobs
            for n, attempt in enumerate(job.attempts)
        ]


def write_records(result: Launch, request: LaunchRequest) -> None:
    """``jobs.json`` and ``config.json`` in the experiment folder (dry runs too: job ids None)."""
    exp = result.experiment_dir
    jobs = {"experiment": exp.name, "cluster": result.cluster.name, "dry_run": result.dry_run, "jobs": result.records()}
    _write_json(exp / "jobs.json", jobs)
    config = {
        "hpcstage": __version__,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "request": {k: _plain(v) for k, v in _flat(request).items()},
        "cluster": result.cluster.model_dump(),
        "offline": result.offline,
        "artifacts": [asdict(a) for a in result.artifacts],
        "env": dict(result.env),
        "jobs": {job.key: {"python": job.python, **asdict(job.env)} for job in result.jobs},
        "sbatch_withheld": result.withheld,  # names only: sbatch's --export list is the rest of the shell's
    }
    _write_json(exp / "config.json", config)


def _flat(request: LaunchRequest) -> dict[str, Any]:
    """The request as the CLI's flat option names: the generic ones, then the job type's."""
    generic = {f.name: getattr(request, f.name) for f in fields(request) if f.name != "options"}
    return {**generic, **asdict(request.options)}


def _plain(value: Any) -> Any:
    return str(value) if isinstance(value, Path) else list(value) if isinstance(value, tuple) else value


def _write_json(path: Path, data: Any) -> None:
    safefs.write_atomic(path.parent, path, (json.dumps(data, indent=1) + "\n").encode())


def experiment_status(experiment_dir: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """Each recorded job (array tasks one by one) with its state now, from squeue/sacct."""
    from hpcstage.slurm.jobs import job_states

    path = Path(experiment_dir) / "jobs.json"
    try:
        records = json.loads(path.read_text())["jobs"]
        if not all(isinstance(r, dict) and "key" in r and "attempt" in r for r in records):
            raise ValueError("a job record lacks key/attempt")
    except (OSError, ValueError, KeyError, TypeError):
        raise BadInput(f"{path} is missing or unreadable: is {experiment_dir} an experiment folder?") from None
    ids = [r["job_id"] for r in records if r.get("job_id")]
    try:
        states = job_states(ids) if ids else {}
    except SlurmError as e:
        raise LaunchError(str(e)) from None
    rows = []
    for r in records:
        job_id = r.get("job_id")
        mine = sorted(
            (s for s in states.values() if job_id and (s.job_id == job_id or s.job_id.startswith(f"{job_id}_"))),
            key=lambda s: (len(s.job_id), s.job_id),
        )
        base = {"key": r["key"], "attempt": r["attempt"]}
        if not job_id:
            rows.append({**base, "job_id": None, "state": "NOT SUBMITTED (dry run)", "reason": None, "exit_code": None})
        elif not mine:
            rows.append(
                {**base, "job_id": job_id, "state": "UNKNOWN", "reason": "forgotten by Slurm", "exit_code": None}
            )
        for s in mine:
            rows.append({**base, "job_id": s.job_id, "state": s.state, "reason": s.reason, "exit_code": s.exit_code})
    return rows
