"""Job states, from squeue while the controller remembers a job and from sacct after.

squeue knows pending and running jobs, and finished ones for ``MinJobAge`` (300 s by default),
with their array task ids and exit status. sacct knows every finished job: from slurmdbd where
there is one, else (``sacct -c``) from the job completion file, which names array tasks by
their raw job ids only.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from hpcstage.slurm import SlurmError, run_command

TERMINAL_STATES = frozenset(
    {
        "BOOT_FAIL",
        "CANCELLED",
        "COMPLETED",
        "DEADLINE",
        "FAILED",
        "NODE_FAIL",
        "OUT_OF_MEMORY",
        "PREEMPTED",
        "REVOKED",
        "TIMEOUT",
    }
)
# Pending for one of these reasons means the job will never start unless someone changes it (scontrol update)
# or a limit: why, and what to do. Reasons that clear by themselves are left out on purpose: AssocGrpCpuLimit,
# AssocGrpGRES, QOSGrpCpuLimit... mean the group's running jobs use its whole share now, and clear when they end;
# PartitionConfig is what squeue shows for a moment before a job's first scheduling pass.
NEVER_RUNS: dict[str, str] = {
    "DependencyNeverSatisfied": "a job it depends on failed or was cancelled; fix that job and launch again",
    "PartitionTimeLimit": "its --time is over the partition's MaxTime (`scontrol show partition`); "
    "cancel it and ask for less time (--time-limit, or --time for pull)",
    "PartitionNodeLimit": "it asks for more nodes than the partition allows; cancel it and ask for fewer",
    "AssocMaxWallDurationPerJobLimit": "its --time is over your account's per-job limit; cancel it and ask for less",
    "QOSMaxWallDurationPerJobLimit": "its --time is over the QOS's per-job limit; cancel it and ask for less",
    "AssocMaxNodesPerJobLimit": "it asks for more nodes than your account allows per job",
    "QOSMaxNodePerJobLimit": "it asks for more nodes than the QOS allows per job",
    "AssocMaxCpuPerJobLimit": "it asks for more CPUs than your account allows per job",
    "QOSMaxCpuPerJobLimit": "it asks for more CPUs than the QOS allows per job",
    "AssocMaxGRESPerJob": "it asks for more GPUs than your account allows per job",
    "QOSMaxGRESPerJob": "it asks for more GPUs than the QOS allows per job",
    "AssocGrpCPUMinutesLimit": "the account's CPU-minutes budget is used up; use another --account",
    "AssocGrpBillingMinutes": "the account's budget is used up; use another --account",
    "AssocGrpGRESMinutes": "the account's GPU-minutes budget is used up; use another --account",
    "InvalidAccount": "the account is not valid here; pass a valid --account",
    "InvalidQOS": "the QOS is not valid for this account; fix qos in the cluster registry",
    "BadConstraints": "no node matches its constraints; fix constraint in the cluster registry",
}
NEVER_RUNS_REASONS = frozenset(NEVER_RUNS)

SQUEUE_FORMAT = "JobArrayID:|,JobID:|,State:|,Reason:|,exit_code:|"
SACCT_FIELDS = "JobID,JobIDRaw,State,ExitCode"


@dataclass(frozen=True)
class JobState:
    """One job or array task as Slurm reports it."""

    job_id: str  # as users see it: "123", or "123_4" for an array task
    raw_id: str  # Slurm's own record id; an array task gets its own once it starts
    state: str  # PENDING, RUNNING, COMPLETED, FAILED, CANCELLED, ...
    reason: str | None = None  # why it is pending (or how it ended), from squeue
    exit_code: int | None = None  # the batch script's exit status, once ended
    signal: int | None = None  # the signal that ended it, 0 if none

    @property
    def never_runs(self) -> bool:
        return self.state == "PENDING" and self.reason in NEVER_RUNS_REASONS

    def why_never(self) -> str | None:
        """One line: why this job will never start and what to do; None while it may still start."""
        if not self.never_runs or self.reason is None:
            return None
        return f"job {self.job_id} is PENDING ({self.reason}) and will never start: {NEVER_RUNS[self.reason]}"

    @property
    def done(self) -> bool:
        """Nothing more will happen to this job without someone's intervention."""
        return self.state in TERMINAL_STATES or self.never_runs


class WaitTimeout(SlurmError):
    """Jobs still running when ``wait`` gave up; ``states`` is the last look at them."""

    def __init__(self, message: str, states: dict[str, JobState]) -> None:
        super().__init__(message)
        self.states = states


def parse_squeue(text: str) -> dict[str, JobState]:
    """Parse ``squeue --noheader --array -O SQUEUE_FORMAT`` output, keyed by job id."""
    jobs = {}
    for line in text.splitlines():
        if not line.strip():
            continue
        job_id, raw_id, state, reason, status = (field.strip() for field in line.split("|")[:5])
        ended = state in TERMINAL_STATES
        wait_status = int(status) if ended and status.isdigit() else None
        jobs[job_id] = JobState(
            job_id=job_id,
            raw_id=raw_id,
            state=state,
            reason=None if reason in ("", "None") else reason,
            # squeue gives the raw wait(2) status: exit code in bits 8-15, signal in 0-6.
            exit_code=None if wait_status is None else (wait_status >> 8) & 0xFF,
            signal=None if wait_status is None else wait_status & 0x7F,
        )
    return jobs


def parse_sacct(text: str) -> dict[str, JobState]:
    """Parse ``sacct --noheader --parsable2 --allocations -o SACCT_FIELDS`` output."""
    jobs = {}
    for line in text.splitlines():
        if not line.strip():
            continue
        job_id, raw_id, state, exit_code = line.split("|")[:4]
        state = state.split()[0] if state.strip() else "UNKNOWN"  # "CANCELLED by 1000"
        code, _, signal = exit_code.partition(":") if state in TERMINAL_STATES else ("", "", "")
        jobs[job_id] = JobState(
            job_id=job_id,
            raw_id=raw_id,
            state=state,
            exit_code=int(code) if code.isdigit() else None,
            signal=int(signal) if signal.isdigit() else None,
        )
    return jobs


def query_squeue(job_ids: Iterable[str]) -> dict[str, JobState]:
    """What the controller knows about these jobs (array tasks listed one by one)."""
    ids = ",".join(str(job_id) for job_id in job_ids)
    if not ids:
        return {}
    argv = ["squeue", "--noheader", "--array", "--all", "--states=all", f"--jobs={ids}"]
    argv += ["-O", SQUEUE_FORMAT]
    proc = run_command(argv)
    if proc.returncode != 0:
        if "Invalid job id" in proc.stderr:  # every id asked for has been forgotten
            return {}
        raise SlurmError(f"squeue failed: {proc.stderr.strip()}", argv=argv, stderr=proc.stderr)
    return parse_squeue(proc.stdout)


def query_sacct(job_ids: Iterable[str]) -> dict[str, JobState]:
    """What accounting knows about these jobs; without slurmdbd, the job completion file."""
    ids = ",".join(str(job_id) for job_id in job_ids)
    if not ids:
        return {}
    argv = ["sacct", "--noheader", "--parsable2", "--allocations", f"--jobs={ids}"]
    argv += ["-o", SACCT_FIELDS]
    proc = run_command(argv)
    if proc.returncode != 0 and "accounting storage is disabled" in proc.stderr:
        argv.insert(1, "--completion")
        proc = run_command(argv)
    # sacct -c complains on stderr about fields it does not know (ArrayJobId...) and still answers.
    if proc.returncode != 0:
        raise SlurmError(f"sacct failed: {proc.stderr.strip()}", argv=argv, stderr=proc.stderr)
    return parse_sacct(proc.stdout)


def belongs(state: JobState, job_id: str) -> bool:
    """Whether a reported job is the one asked for, or one of its array tasks."""
    return job_id in (state.job_id, state.raw_id) or state.job_id.startswith(f"{job_id}_")


def job_states(job_ids: Iterable[str]) -> dict[str, JobState]:
    """Current state of each job and array task, keyed by job id ("123", "123_4").

    Ids unknown to both squeue and sacct are left out.
    """
    ids = [str(job_id) for job_id in job_ids]
    states = query_squeue(ids)
    forgotten = [i for i in ids if not any(belongs(s, i) for s in states.values())]
    if forgotten:
        known_raw = {s.raw_id for s in states.values()}
        for job_id, state in query_sacct(forgotten).items():
            if state.raw_id not in known_raw:
                states[job_id] = state
    return states


def wait(
    job_ids: Iterable[str],
    timeout: float,
    poll: float = 1.0,
    on_poll: Callable[[dict[str, JobState]], None] | None = None,
) -> dict[str, JobState]:
    """Block until every job (and every task of an array) is done; return their states.

    A job pending for a reason in ``NEVER_RUNS`` (``DependencyNeverSatisfied``, ``PartitionTimeLimit``...)
    counts as done: it will never run, and the poll that sees it is the last, even while other jobs still
    run (the jobs that wait for it would wait forever); ``JobState.why_never`` says why. ``on_poll`` sees
    every look at the jobs. Raises ``WaitTimeout`` after ``timeout`` seconds, and
    ``SlurmError`` for an id Slurm does not know at all.
    """
    ids = [str(job_id) for job_id in job_ids]
    deadline = time.monotonic() + timeout
    while True:
        states = job_states(ids)
        unknown = [i for i in ids if not any(belongs(s, i) for s in states.values())]
        if unknown:
            raise SlurmError(f"unknown to squeue and sacct: job {', '.join(unknown)}")
        if on_poll is not None:
            on_poll(states)
        if all(s.done for s in states.values()) or any(s.never_runs for s in states.values()):
            return states
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            busy = ", ".join(f"{s.job_id} {s.state}" for s in states.values() if not s.done)
            raise WaitTimeout(f"jobs not done after {timeout:g} s: {busy}", states)
        time.sleep(min(poll, remaining))
