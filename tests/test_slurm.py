"""Slurm plumbing: parsers against recorded output, then real jobs on the test cluster.

The live tests need ``scripts/slurm-test-cluster.sh start`` (root). Without a running cluster they
are skipped, or fail when ``HPCSTAGE_REQUIRE_SLURM=1`` (CI sets it, so they cannot go quiet).
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

from hpcstage.slurm import SlurmError
from hpcstage.slurm.clusters import detect, load_registry, parse_scontrol_partition, slurm_cluster_name
from hpcstage.slurm.jobs import (
    JobState,
    WaitTimeout,
    job_states,
    parse_sacct,
    parse_squeue,
    query_sacct,
    wait,
)
from hpcstage.slurm.submit import SubmitError, cancel, parse_sbatch_parsable, submit
from helpers import two_of_the_nodes_gpus

GOLDEN = Path(__file__).parent / "golden" / "slurm"
POLL = 0.2


def golden(name: str) -> str:
    return (GOLDEN / name).read_text()


# --- recorded output (see golden/slurm/README.md) -------------------------------------------


def test_parse_squeue_while_running():
    jobs = parse_squeue(golden("squeue-running.txt"))
    assert jobs["15"] == JobState("15", "15", "FAILED", "NonZeroExitCode", exit_code=3, signal=0)
    assert jobs["16"].never_runs and jobs["16"].done and jobs["16"].exit_code is None
    assert jobs["17_1"] == JobState("17_1", "20", "RUNNING")
    assert jobs["17_3"] == JobState("17_3", "17", "PENDING", "JobArrayTaskLimit")
    assert not jobs["17_3"].done
    assert sorted(jobs) == ["14", "15", "16", "17_1", "17_2", "17_3", "17_4", "18", "19"]


def test_parse_squeue_when_done():
    jobs = parse_squeue(golden("squeue-done.txt"))
    assert jobs["18"] == JobState("18", "18", "CANCELLED", exit_code=0, signal=15)
    assert [jobs[f"17_{i}"].raw_id for i in range(1, 5)] == ["20", "21", "22", "17"]
    assert all(job.done for job in jobs.values())
    assert {job.state for job in jobs.values()} == {"CANCELLED", "COMPLETED", "FAILED", "PENDING"}


def test_parse_sacct_completion_file():
    jobs = parse_sacct(golden("sacct-completion.txt"))
    assert jobs["15"] == JobState("15", "15", "FAILED", exit_code=3, signal=0)
    assert jobs["18"].state == "CANCELLED"
    assert sorted(jobs) == ["14", "15", "17", "18", "19"]


def test_parse_sacct_with_slurmdbd_forms():
    # slurmdbd names array tasks and who cancelled; not recordable without slurmdbd here.
    jobs = parse_sacct(
        "123_4|130|CANCELLED by 1000|0:15\n124|124|TIMEOUT|0:0\n125|125|RUNNING|0:0\n"
    )
    assert jobs["123_4"] == JobState("123_4", "130", "CANCELLED", exit_code=0, signal=15)
    assert jobs["124"].done
    assert jobs["125"] == JobState("125", "125", "RUNNING")  # no exit code before the end


def test_parse_squeue_pending_past_the_partitions_time_limit_never_runs():
    job = parse_squeue(golden("squeue-partition-time-limit.txt"))["17"]
    assert (job.state, job.reason, job.never_runs, job.done) == ("PENDING", "PartitionTimeLimit", True, True)
    assert job.why_never() == (
        "job 17 is PENDING (PartitionTimeLimit) and will never start: its --time is over the partition's MaxTime "
        "(`scontrol show partition`); cancel it and ask for less time (--time-limit, or --time for pull)")


def test_parse_scontrol_show_partition():
    partitions = parse_scontrol_partition(golden("scontrol-show-partition.txt"))
    assert sorted(partitions) == ["debug", "short"]
    assert (partitions["debug"]["MaxTime"], partitions["short"]["MaxTime"]) == ("UNLIMITED", "00:10:00")
    assert partitions["short"]["Nodes"] == "node1"


def test_parse_sbatch_parsable():
    assert parse_sbatch_parsable(golden("sbatch-parsable.txt")) == "23"
    assert parse_sbatch_parsable("4242;jureca\n") == "4242"
    with pytest.raises(SubmitError, match="cannot read a job id"):
        parse_sbatch_parsable("sbatch: error: nope\n")


def test_recorded_stderr_matches_what_the_code_looks_for():
    assert "accounting storage is disabled" in golden("sacct-no-slurmdbd.stderr")
    assert "Invalid job id" in golden("squeue-unknown-id.stderr")


# --- the real cluster -----------------------------------------------------------------------


def write_script(tmp_path: Path, body: str) -> Path:
    script = tmp_path / f"job-{time.monotonic_ns()}.sh"
    script.write_text(f"#!/bin/bash\n{body}\n")
    return script


def batch(tmp_path: Path, body: str, *args: str) -> str:
    """Submit ``body`` as a batch script whose output lands in tmp_path."""
    output = "slurm-%A_%a.out" if any(a.startswith("--array") for a in args) else "slurm-%j.out"
    return submit(
        write_script(tmp_path, body),
        extra_args=[f"--chdir={tmp_path}", f"--output={tmp_path / output}", *args],
    )


def test_trivial_job_completes_and_writes_its_output(cluster, tmp_path):
    job = batch(tmp_path, "echo hello from $SLURM_JOB_ID")
    states = wait([job], timeout=20, poll=POLL)
    assert states[job].state == "COMPLETED" and states[job].exit_code == 0
    assert (tmp_path / f"slurm-{job}.out").read_text() == f"hello from {job}\n"
    # Accounting (here the job completion file, through the sacct -c fallback) agrees.
    assert query_sacct([job])[job].state == "COMPLETED"


def test_failing_job_reports_its_exit_code(cluster, tmp_path):
    job = batch(tmp_path, "exit 3")
    state = wait([job], timeout=20, poll=POLL)[job]
    assert (state.state, state.exit_code, state.reason) == ("FAILED", 3, "NonZeroExitCode")
    assert query_sacct([job])[job].exit_code == 3


def test_dependency_on_a_failed_job_never_runs(cluster, tmp_path):
    failed = batch(tmp_path, "exit 1")
    dependent = batch(tmp_path, "echo should not run", f"--dependency=afterok:{failed}")
    try:
        states = wait([failed, dependent], timeout=20, poll=POLL)
        assert states[failed].state == "FAILED"
        assert states[dependent].state == "PENDING"
        assert states[dependent].reason == "DependencyNeverSatisfied"
    finally:
        cancel([dependent])
    assert wait([dependent], timeout=10, poll=POLL)[dependent].state == "CANCELLED"
    assert not (tmp_path / f"slurm-{dependent}.out").exists()


def test_throttled_array_completes_every_task(cluster, tmp_path):
    array = batch(tmp_path, "sleep 0.5; echo task $SLURM_ARRAY_TASK_ID", "--array=1-4%2")
    running = []  # how many tasks ran at each look: %2 allows two at a time
    deadline = time.monotonic() + 30
    while not ((states := job_states([array])) and all(s.done for s in states.values())):
        running.append(sum(s.state == "RUNNING" for s in states.values()))
        assert time.monotonic() < deadline, states
        time.sleep(POLL)
    assert sorted(states) == [f"{array}_{i}" for i in range(1, 5)]
    assert {s.state for s in states.values()} == {"COMPLETED"}
    assert 0 < max(running) <= 2
    for i in range(1, 5):
        assert (tmp_path / f"slurm-{array}_{i}.out").read_text() == f"task {i}\n"


def test_gres_request_sets_cuda_visible_devices(cluster, tmp_path):
    job = batch(tmp_path, 'echo "$CUDA_VISIBLE_DEVICES"', "--gres=gpu:2")
    assert wait([job], timeout=20, poll=POLL)[job].state == "COMPLETED"
    assert two_of_the_nodes_gpus((tmp_path / f"slurm-{job}.out").read_text().strip())


def test_sbatch_refusal_is_a_submit_error(cluster, tmp_path):
    with pytest.raises(SubmitError, match="Invalid partition name") as err:
        batch(tmp_path, "true", "--partition=nope")
    assert "invalid partition specified: nope" in err.value.stderr


def test_submit_passes_only_the_given_environment(cluster, tmp_path, monkeypatch):
    env = dict(os.environ)
    monkeypatch.setenv("HPCSTAGE_SECRET", "leaked")
    job = submit(
        write_script(tmp_path, 'echo "secret=${HPCSTAGE_SECRET:-none}"'),
        extra_args=[f"--output={tmp_path}/env.out"],
        env=env,
    )
    wait([job], timeout=20, poll=POLL)
    assert (tmp_path / "env.out").read_text() == "secret=none\n"


def test_wait_gives_up_at_its_timeout(cluster, tmp_path):
    job = batch(tmp_path, "sleep 60")
    try:
        with pytest.raises(WaitTimeout, match=f"not done after 0.5 s: {job} ") as err:
            wait([job], timeout=0.5, poll=POLL)
        assert err.value.states[job].state in ("PENDING", "RUNNING")
    finally:
        cancel([job])


def test_wait_refuses_unknown_jobs(cluster):
    with pytest.raises(SlurmError, match="unknown to squeue and sacct: job 99999999"):
        wait(["99999999"], timeout=5, poll=POLL)


def test_this_machine_is_detected_as_the_local_cluster(cluster):
    local = load_registry().get("local")
    assert slurm_cluster_name() == local.slurm_cluster
    assert detect() == local


def test_wait_on_a_job_stuck_in_partition_time_limit_ends_at_the_first_poll_that_sees_it(cluster, tmp_path):
    job = batch(tmp_path, "true", "--partition=short", "--time=1:00:00")
    try:
        deadline = time.monotonic() + 30  # the reason is PartitionConfig for a moment after sbatch
        while job_states([job])[job].reason != "PartitionTimeLimit":
            assert time.monotonic() < deadline
            time.sleep(POLL)
        polls = []
        states = wait([job], timeout=600, poll=600, on_poll=polls.append)  # a second poll would take 10 minutes
        assert len(polls) == 1
        assert (states[job].state, states[job].reason) == ("PENDING", "PartitionTimeLimit")
        assert states[job].why_never().startswith(f"job {job} is PENDING (PartitionTimeLimit) and will never start")
    finally:
        cancel([job])
