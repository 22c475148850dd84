"""Staging as a Slurm job array: N workers share one planned manifest through the leases.

The submitting node plans once (commits and file lists into `hpcstage.lock`, each commit's trees JSON
into the cache), so workers send no metadata request. Each array task runs `hpcstage pull -f M --worker`:
it takes work units largest first (a large file, or a batch of small files, each under a lease) and
moves on from any unit another worker holds, coming back to it later; a worker that dies (scancel, node
failure) leaves its units to the others once its leases expire, and its partial pieces are continued.
Then `finish` (afterany on the whole array) pulls whatever is still missing (nothing, when the workers
did their job), which also writes refs and the ledger, and verifies every hash; `report` (afterany on
finish) prints the status whatever happened. Slurm is the engine; nothing here schedules.

The jobs get the environment a launched `run` job gets (slurm/environment.py): the cluster's activation line
and env file for `run`, and the user's secrets file sourced at run time, which is where a worker finds HF_TOKEN
for gated or private repos. sbatch exports an explicit list without credentials: the token is never in an
sbatch argv or environment (Slurm stores that with the job), a rendered script or a record.
"""

from __future__ import annotations

import json
import os
import shlex
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from hpcstage import safefs
from hpcstage.errors import BadInput, HpcstageError
from hpcstage.manifest import Manifest, load_lock
from hpcstage.slurm import SlurmError, environment
from hpcstage.slurm.clusters import Cluster
from hpcstage.slurm.jobs import job_states
from hpcstage.slurm.render import Shell, render, sbatch_directives
from hpcstage.slurm.submit import submit

PASSED_ENV = ("HF_ENDPOINT", "HF_HOME", "HF_HUB_CACHE")  # not secrets: written into the scripts


class NeverRunsError(HpcstageError):
    """A job of the array is pending for a reason that never clears (PartitionTimeLimit...)."""


@dataclass(frozen=True)
class WorkerEnvironment:
    """What the array's jobs run with: their activation, env files and secrets file (a path), and sbatch's own
    environment (credentials withheld, the rest listed in SBATCH_EXPORT)."""

    jobenv: environment.JobEnvironment
    sbatch_env: dict[str, str]
    warnings: list[str] = field(default_factory=list)


def worker_environment(cluster: Cluster, environ: dict[str, str] | os._Environ = os.environ) -> WorkerEnvironment:
    """The jobs' environment on ``cluster``; a secrets file others can read is refused (BadInput)."""
    secrets = environment.secrets_file(cluster, environ)
    names = environment.secret_names(secrets[0]) if secrets else []
    jobenv = environment.for_job(cluster, "run", None, [], secrets[0] if secrets else None)
    withheld = environment.withheld(environ, names)
    missing = environment.not_passed(environ, withheld, names)
    proxies = [n for n in missing if environment.is_proxy(n)]
    if proxies:  # the workers' whole job is to download: without the site proxy each one would fail in the queue
        raise BadInput(
            f"{proxies[0]} carries a password, which Slurm would store with the jobs, and the array workers need "
            f"it to reach the Hub: add {proxies[0]}=... to your secrets file (a private file, chmod 600, named by "
            f"${environment.SECRETS_ENV} or secrets_file in clusters.toml) and run again"
        )
    warnings = [environment.not_passed_warning(n, "the array workers") for n in missing]
    return WorkerEnvironment(jobenv, environment.sbatch_environment(environ, withheld), warnings)


@dataclass
class ArrayRun:
    folder: Path  # scripts, logs and jobs.json
    workers: int
    array_id: str
    finish_id: str
    report_id: str


def _script(
    folder: Path,
    name: str,
    cluster: Cluster,
    jobenv: environment.JobEnvironment,
    commands: list[list[str]],
    time_limit: str,
    array: str | None = None,
) -> Path:
    """One job script: `hpcstage` sub-commands run with the job's Python, one after the other."""
    python = cluster.python or sys.executable
    directives = sbatch_directives(
        cluster,
        name=f"hpcstage-{name}",
        nodes=1,
        gpus=0,
        cpus=2,
        time_limit=time_limit,
        output=str(folder / f"{name}-%A_%a.out" if array else folder / f"{name}-%j.out"),
        array=array,
    )
    text = render(
        "run",
        {
            "job": {"directives": directives, "description": f"hpcstage staging: {name}"},
            "cluster": cluster,
            "experiment_dir": str(folder),
            "python": python,
            "chain_file": None,
            "jobenv": jobenv,
            "env": {k: os.environ[k] for k in PASSED_ENV if os.environ.get(k)},
            "command": Shell(
                " && ".join(" ".join(['"$HPCSTAGE_PYTHON" -m hpcstage', *map(shlex.quote, c)]) for c in commands)
            ),
        },
    )
    path = folder / f"{name}.sbatch"
    safefs.write_atomic(folder, path, text.encode(), mode=0o755)
    return path


def submit_array(
    manifest: Manifest,
    workers: int,
    *,
    cluster: Cluster,
    time_limit: str = "24:00:00",
    cache_dir: Path | None = None,
    env: WorkerEnvironment | None = None,
) -> ArrayRun:
    """Submit the workers, `finish` and `report` for a manifest already planned into its lockfile, in ``env``
    (default: ``worker_environment(cluster)``)."""
    if workers < 1:
        raise BadInput("--slurm-array needs at least 1 worker")
    env = env or worker_environment(cluster)
    folder = manifest.lock_path.parent / "hpcstage-array" / time.strftime("%Y%m%d-%H%M%S")
    safefs.opendir(manifest.lock_path.parent, folder)  # no link another user planted beside the manifest is followed
    assert manifest.path is not None  # planned into its lockfile, so read from a file
    m = str(manifest.path.resolve())
    cache = ["--cache-dir", str(cache_dir)] if cache_dir else []
    jobenv = env.jobenv
    pull = [["pull", "-f", m, "--worker", *cache]]
    worker = _script(folder, "worker", cluster, jobenv, pull, time_limit, array=f"0-{workers - 1}")
    finish = _script(
        folder, "finish", cluster, jobenv, [["pull", "-f", m, *cache], ["verify", "-f", m, *cache]], time_limit
    )
    report = _script(folder, "report", cluster, jobenv, [["status", "-f", m, *cache]], "00:10:00")
    try:
        array_id = submit(worker, env=env.sbatch_env)
        # afterany, not afterok: one cancelled worker fails the whole array for Slurm, yet its units were
        # finished by the others; the finish job's pull fetches only what is still missing (usually nothing).
        finish_id = submit(finish, extra_args=[f"--dependency=afterany:{array_id}"], env=env.sbatch_env)
        report_id = submit(report, extra_args=[f"--dependency=afterany:{finish_id}"], env=env.sbatch_env)
    except SlurmError as e:
        raise HpcstageError(str(e)) from None
    run = ArrayRun(folder, workers, array_id, finish_id, report_id)
    safefs.write_atomic(
        folder, folder / "jobs.json", json.dumps({**asdict(run), "folder": str(folder)}, indent=1).encode()
    )
    return run


def follow(run: ArrayRun, manifest: Manifest, cache_dir: Path, *, quiet: bool = False, poll: float = 2.0) -> bool:
    """`--wait`: a progress bar over the files the workers link, until `finish` ends; True if it succeeded."""
    from hpcstage.hfcache import RepoCache
    from hpcstage.progress import Progress

    lock = load_lock(manifest.lock_path)
    files = [
        (RepoCache(cache_dir, e.repo_type, e.repo), e.commit, f)
        for e in lock.entries.values()
        for f in e.cached_files()
    ]
    left = list(files)
    with Progress(sum(f.size for *_, f in files), len(files), label="array", quiet=quiet) as progress:
        while True:
            still = []
            for item in left:
                cache, commit, f = item
                if cache.is_linked(commit, f):
                    progress.add(f.size)
                    progress.file_done()
                else:
                    still.append(item)
            left = still
            states = job_states([run.array_id, run.finish_id, run.report_id])
            workers = [s for s in states.values() if s.job_id.split("_")[0] == run.array_id]
            pending = sorted({s.reason for s in workers if s.state == "PENDING" and s.reason})
            running = sum(s.state == "RUNNING" for s in workers)
            progress.relabel(f"array: {running} running" + (f", pending ({', '.join(pending)})" if pending else ""))
            stuck = next((s for s in states.values() if s.never_runs), None)
            if stuck is not None:  # the workers' finish (afterany) would wait for it forever
                raise NeverRunsError(f"{stuck.why_never()}; scripts and logs in {run.folder}")
            finish = states.get(run.finish_id)
            report = states.get(run.report_id)
            if finish is not None and report is not None and finish.done and report.done:
                return finish.state == "COMPLETED"
            time.sleep(poll)
