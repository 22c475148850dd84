"""Submitting and cancelling batch jobs (``sbatch --parsable``, ``scancel``)."""

from __future__ import annotations

import os
import re
from collections.abc import Iterable, Mapping, Sequence

from hpcstage.slurm import SlurmError, run_command

_JOB_ID = re.compile(r"\d+")


class SubmitError(SlurmError):
    """sbatch refused the job (bad partition, account, limits...); ``stderr`` says why."""


def parse_sbatch_parsable(text: str) -> str:
    """The job id from ``sbatch --parsable`` output: ``123`` or ``123;cluster``."""
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    job_id = lines[-1].split(";", 1)[0] if lines else ""
    if not _JOB_ID.fullmatch(job_id):
        raise SubmitError(f"cannot read a job id from sbatch output {text!r}")
    return job_id


def submit(
    script_path: str | os.PathLike[str],
    *,
    extra_args: Sequence[str] = (),
    env: Mapping[str, str] | None = None,
) -> str:
    """Submit a batch script and return its job id.

    ``env`` is the whole environment of sbatch (None: this process's). sbatch exports it
    into the job by default, so a caller that must keep a variable out of the job removes it here.
    """
    argv = ["sbatch", "--parsable", *extra_args, os.fspath(script_path)]
    proc = run_command(argv, env=env)
    if proc.returncode != 0:
        detail = proc.stderr.strip() or f"exit status {proc.returncode}"
        raise SubmitError(f"sbatch failed: {detail}", argv=argv, stderr=proc.stderr)
    return parse_sbatch_parsable(proc.stdout)


def cancel(job_ids: Iterable[str]) -> None:
    """Cancel jobs; ids that already ended or that Slurm forgot are not an error."""
    ids = [str(job_id) for job_id in job_ids]
    if not ids:
        return
    argv = ["scancel", *ids]
    proc = run_command(argv)
    if proc.returncode != 0:
        raise SlurmError(f"scancel failed: {proc.stderr.strip()}", argv=argv, stderr=proc.stderr)


def release(job_ids: Iterable[str]) -> None:
    """Release held jobs (submitted with ``--hold``) so the scheduler may start them."""
    ids = [str(job_id) for job_id in job_ids]
    if not ids:
        return
    argv = ["scontrol", "release", ",".join(ids)]
    proc = run_command(argv)
    if proc.returncode != 0:
        raise SlurmError(f"scontrol release failed: {proc.stderr.strip()}", argv=argv, stderr=proc.stderr)
