"""Slurm plumbing.

- ``clusters``: which cluster this is and how it wants jobs asked for (bundled ``clusters.toml``
  plus site and user overrides).
- ``submit``: ``sbatch`` and ``scancel``.
- ``jobs``: job states from ``squeue`` and ``sacct``; waiting for jobs to end.
- ``launch``: the generic launcher; ``jobtypes``: one module per ``--job-type``; ``artifacts``: what the jobs
  name and its staging; ``limits``: partition time limits; ``environment``: activation, env and secrets files;
  ``render``: templates; ``stage_array``: ``pull --slurm-array``; ``commands``: the CLI of launch and clusters.

Every Slurm command runs from an argument list, never through a shell, and with a timeout:
a controller that does not answer must not hang a launch forever.
"""

from __future__ import annotations

import subprocess
from collections.abc import Mapping, Sequence

from hpcstage.errors import HpcstageError

COMMAND_TIMEOUT = 60.0
JOB_TYPES = ("train", "datagen", "consolidate", "eval", "run")  # what `hpcstage launch --job-type` renders


class SlurmError(HpcstageError):
    """A Slurm command could not run or failed; ``stderr`` holds what it said."""

    def __init__(self, message: str, *, argv: Sequence[str] = (), stderr: str = "", hint: str | None = None) -> None:
        super().__init__(message, hint=hint)
        self.argv = list(argv)
        self.stderr = stderr


class LaunchError(HpcstageError):
    """Staging, the offline check or a submission failed; nothing is left queued by this launch."""


def run_command(
    argv: Sequence[str],
    *,
    env: Mapping[str, str] | None = None,
    timeout: float = COMMAND_TIMEOUT,
) -> subprocess.CompletedProcess[str]:
    """Run one Slurm client command; the caller judges its exit status."""
    try:
        return subprocess.run(
            list(argv),
            env=None if env is None else dict(env),
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
            stdin=subprocess.DEVNULL,
        )
    except FileNotFoundError as exc:
        raise SlurmError(f"{argv[0]} not found: is this a Slurm login node?", argv=argv) from exc
    except subprocess.TimeoutExpired as exc:
        raise SlurmError(f"{argv[0]} gave no answer within {timeout:g} s (is slurmctld up?)", argv=argv) from exc
