"""``--after``: a launch waits for jobs submitted before it, named by job id or by experiment folder, and is
refused when Slurm does not know them or they can no longer succeed (afterok would never be met)."""

from __future__ import annotations

import json
import re
from pathlib import Path

from hpcstage.errors import BadInput
from hpcstage.slurm import LaunchError, SlurmError

_JOB_ID = re.compile(r"\d+(_\d+)?")


def resolve_after(values: list[str]) -> list[list[str]]:
    """--after values as groups of job ids: a job id is a group of one; an experiment folder is its last
    job (every attempt of it: any one succeeding satisfies the dependency)."""
    groups = []
    for value in values:
        if _JOB_ID.fullmatch(value):
            groups.append([value])
            continue
        jobs_file = Path(value).expanduser() / "jobs.json"
        if not jobs_file.is_file():
            raise BadInput(f"--after {value!r} is not a Slurm job id nor an experiment folder (one with jobs.json)")
        try:
            records = [r for r in json.loads(jobs_file.read_text())["jobs"] if r.get("job_id")]
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            raise BadInput(f"--after {value}: {jobs_file} is unreadable; name a job id instead") from None
        if not records:
            raise BadInput(f"--after {value}: nothing of that experiment was submitted (a dry run?); launch it first")
        last = records[-1]["key"]
        groups.append([str(r["job_id"]) for r in records if r["key"] == last])
    if len(groups) > 1 and any(len(g) > 1 for g in groups):
        raise BadInput(
            "--after: an experiment whose last job has restarts cannot be combined with another --after; name one"
        )
    return groups


def check_after(values: list[str], groups: list[list[str]]) -> None:
    """Each --after names jobs Slurm knows, and not all of a group have failed (afterok would never be met)."""
    from hpcstage.slurm.jobs import belongs, job_states

    ids = [i for g in groups for i in g]
    if not ids:
        return
    try:
        states = job_states(ids)
    except SlurmError as e:
        raise LaunchError(f"cannot check --after: {e}") from None
    for value, group in zip(values, groups, strict=False):
        mine = {i: [s for s in states.values() if belongs(s, i)] for i in group}
        unknown = [i for i, found in mine.items() if not found]
        if len(unknown) == len(group):
            raise BadInput(
                f"--after {value}: job {', '.join(unknown)} is unknown to squeue and sacct (a typo?); "
                "`squeue --me` lists your jobs"
            )
        failed = {
            i: next((s for s in found if s.never_runs or (s.done and s.state != "COMPLETED")), None)
            for i, found in mine.items()
            if found
        }
        if failed and all(failed.values()):
            s = next(s for s in failed.values() if s is not None)
            how = f"is PENDING ({s.reason}) and will never start" if s.never_runs else f"ended {s.state}"
            raise BadInput(
                f"--after {value}: job {s.job_id} {how}, so a job after it would never start; "
                "launch after a job that can still succeed, or without --after"
            )
