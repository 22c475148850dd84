"""Launch: a job type and its options become rendered batch scripts, submitted with their dependencies.

    request ──► cluster (registry) ──► jobs (the job type's module, jobtypes/) ──► artifacts (artifacts.py: staged
            on the login node when compute nodes are offline) ──► scripts (render.py) ──► sbatch (submit.py)
            ──► <experiment>/

This module is the generic part (submitit's shape): a job type says only which jobs it renders and with what
(``jobtypes/<type>.py``: an ``Options`` dataclass and ``jobs()``); checks (``--after``: after.py), environments,
rendering, dependencies, restart chains, submission and records (records.py) are the same for all of them here.

Everything a launch decided is written to ``<experiments-dir>/<name>/``: the scripts, ``jobs.json`` (job
ids, dependencies, the sbatch argument lists) and ``config.json`` (the resolved request, cluster and
artifacts). ``dry_run`` writes the same files with no job ids, stages nothing and submits nothing.

Dependencies and restarts are sbatch options given at submission (the scripts stay the same whatever
the job ids): ``--after`` and a train job's eval are ``afterok``; ``max_restarts`` N submits N more
attempts of the same script, each ``afternotok`` on the one before, the first one held until the
whole chain is known. An attempt that succeeds cancels the attempts queued after it, and they carry
``--kill-on-invalid-dep=yes`` besides (the only mechanism for arrays, whose afternotok waits for every
task), so no attempt is left PENDING forever.

Secrets stay out: scripts and records hold paths and repo ids only; sbatch exports an explicit list of
variables without credentials, and a job gets its secrets by sourcing the user's secrets file at run time
(slurm/environment.py, which also owns activation lines and env files).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import sys
import time
from dataclasses import fields, replace
from pathlib import Path
from typing import Any

from hpcstage import safefs
from hpcstage.errors import BadInput
from hpcstage.slurm import LaunchError, SlurmError, environment, jobtypes
from hpcstage.slurm.after import check_after, resolve_after
from hpcstage.slurm.artifacts import Artifact, artifacts_of, is_local, job_env, prebuild_and_check, stage
from hpcstage.slurm.clusters import Cluster, RegistryError, detect, is_here, load_registry
from hpcstage.slurm.jobtypes.base import Attempt, Job, Site
from hpcstage.slurm.limits import partition_limit, preflight_time
from hpcstage.slurm.records import Launch, write_records
from hpcstage.slurm.render import render, sbatch_directives
from hpcstage.slurm.request import LaunchRequest, Preflight
from hpcstage.slurm.submit import cancel, release, submit
from hpcstage.slurm.toolcheck import missing_tools

__all__ = [
    "Artifact",
    "Job",
    "Launch",
    "LaunchError",
    "LaunchRequest",
    "Preflight",
    "launch",
    "make_request",
    "partition_limit",
    "preflight_time",
    "resolve_cluster",
]

_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")
ACCOUNT_ENV = ("SBATCH_ACCOUNT", "SLURM_ACCOUNT")  # sbatch takes the account from these too


def option_names() -> set[str]:
    """Every name ``make_request`` takes besides ``job_type``: the generic ones and every job type's."""
    return ({f.name for f in fields(LaunchRequest)} - {"job_type", "options"}) | jobtypes.option_names()


def make_request(job_type: str, **values: Any) -> LaunchRequest:
    """A request from flat option names (the CLI's flags with ``_``): the generic ones, and the job type's own
    (refused when they belong to another job type)."""
    generic = {f.name for f in fields(LaunchRequest)} - {"job_type", "options"}
    unknown = sorted(set(values) - generic - jobtypes.option_names())
    if unknown:
        raise BadInput(f"launch: unknown option {unknown[0]!r}")
    options = jobtypes.options(job_type, {k: v for k, v in values.items() if k not in generic})
    return LaunchRequest(job_type, options, **{k: v for k, v in values.items() if k in generic})


# --- the cluster ----------------------------------------------------------------------------


def resolve_cluster(name: str | None, partition: str | None = None, account: str | None = None) -> Cluster:
    """The named (else detected) cluster with the user's partition and account; bad names are BadInput."""
    try:
        registry = load_registry()
        cluster = registry.get(name) if name else detect(registry=registry)
    except RegistryError as e:
        raise BadInput(str(e)) from None
    if cluster is None:
        raise BadInput(f"this machine matches no known cluster; pass --cluster NAME ({', '.join(registry.names())})")
    update = {k: v for k, v in (("partition", partition), ("account", account)) if v}
    return cluster.model_copy(update=update) if update else cluster


# --- checks before anything is submitted ------------------------------------------------------------


def check_account(cluster: Cluster) -> None:
    """A cluster that charges jobs to a budget gets one: --account, the registry, or SBATCH_ACCOUNT."""
    if cluster.account_required and not cluster.account and not any(os.environ.get(v) for v in ACCOUNT_ENV):
        raise BadInput(
            f"{cluster.name} charges every job to a project budget: pass --account BUDGET (or export "
            f"SBATCH_ACCOUNT=BUDGET, or set account under [{cluster.name}] in "
            "~/.config/hpcstage/clusters.toml)"
        )


# --- the launch -----------------------------------------------------------------------------------


def _validate(request: LaunchRequest) -> None:
    for name in ("num_nodes", "cpus_per_task"):
        value = getattr(request, name)
        if value is not None and value < 1:  # 0 must not mean "the default"
            raise BadInput(f"--{name.replace('_', '-')} must be at least 1 (got {value})")
    if request.max_restarts < 0:
        raise BadInput("--max-restarts must be 0 or more")
    if request.name is not None and not _NAME.fullmatch(request.name):
        raise BadInput(f"--name {request.name!r}: use letters, digits, '.', '_' and '-'")


def launch(request: LaunchRequest) -> Launch:
    """Stage, render, record and (unless dry) submit; returns what was done."""
    from hpcstage.manifest import load_manifest

    module = jobtypes.get(request.job_type)
    if request.options is None:
        request = replace(request, options=module.Options())
    elif not isinstance(request.options, module.Options):
        raise BadInput(f"launch: the options of a {request.job_type} job are {module.__name__}.Options")
    _validate(request)
    cluster = resolve_cluster(request.cluster, request.partition, request.account)
    # Checks before anything is written or submitted; Slurm is asked only on the cluster itself.
    live = is_here(cluster)
    check_account(cluster)
    after = resolve_after(request.after)
    if live:
        check_after(request.after, after)
    offline = (not cluster.internet) if request.offline is None else request.offline
    secrets = environment.secrets_file(cluster)  # refused here when others can read it
    names = environment.secret_names(secrets[0]) if secrets else []
    if hasattr(module, "preflight"):
        at = Preflight(cluster, offline, request.offline is not None, secrets[0] if secrets else None, names)
        module.preflight(request.options, at)
    manifest = load_manifest(request.manifest) if request.manifest else None
    model = request.model or (module.model(request.options) if hasattr(module, "model") else None)
    artifacts = artifacts_of(request, manifest, model)
    exp, fresh = _experiment_dir(request)
    site = Site(request, cluster, exp, live)
    try:
        return _launch_into(site, module, offline, manifest, artifacts, model, after, secrets, names)
    except BadInput:
        if fresh:  # refused: leave nothing behind
            shutil.rmtree(exp, ignore_errors=True)
        raise


def _job_environments(
    request: LaunchRequest, cluster: Cluster, jobs: list[Job], exp: Path, python: str | None, secrets: Path | None
) -> None:
    """Each job's activation, env files and secrets file; with an activation, the job's interpreter is the one the
    activation provides (unless one was named) and the login node's checks run through `<exp>/<job>.python`."""
    for job in jobs:
        job.env = environment.for_job(cluster, job.key, request.activate, [Path(f) for f in request.env_files], secrets)
        job.python = python if python or job.env.activate else sys.executable
        if job.env.activate:
            job.shim = exp / f"{job.key}.python"
            text = environment.interpreter_shim(cluster.modules, job.env, python)
            safefs.write_atomic(exp, job.shim, text.encode(), mode=0o755)


def _launch_into(
    site: Site,
    module: Any,
    offline: bool,
    manifest,
    artifacts: list[Artifact],
    model: str | None,
    after: list[list[str]],
    secrets: tuple[Path, str] | None,
    secret_names: list[str],
) -> Launch:
    from hpcstage import offline as offline_env

    request, cluster, exp, warnings = site.request, site.cluster, site.exp, site.warnings
    jobs: list[Job] = module.jobs(request.options, site)  # resources and limits are checked before staging
    loads = {e.repo for e in manifest.datasets if e.load is not None} if manifest is not None else set()
    if offline and request.dataset and not is_local(request.dataset) and request.dataset not in loads:
        warnings.append(
            f"--dataset {request.dataset} has no `load:` entry, so no load_dataset call was prebuilt or "
            f"checked: offline, load_dataset({request.dataset!r}, ...) fails in the job; load "
            "$HPCSTAGE_DATASET (the snapshot folder) instead, or name it in a manifest with "
            "`load: {split: ...}` (-f)"
        )
    python, check_python = _job_python(request, manifest, cluster)
    _job_environments(request, cluster, jobs, exp, python, secrets[0] if secrets else None)
    if jobs[0].shim:  # prebuild and check run in the job's interpreter as its activation sets it up
        check_python = str(jobs[0].shim)
    withheld = environment.withheld(os.environ, secret_names)
    if not offline:
        missing = environment.not_passed(os.environ, withheld, secret_names)
        warnings += [environment.not_passed_warning(n, "the job") for n in missing]
    problems = missing_tools(jobs, python or sys.executable)
    if problems:
        text = (
            f"{'; '.join(problems)}: install what is missing into the job's environment (or fix its "
            "activation), or pass --python of the environment that has them"
        )
        if not request.dry_run:
            raise BadInput(text)  # before anything is staged or submitted
        warnings.append(text)
    elif offline and hasattr(module, "offline_artifacts"):  # asked through the job's activation when it has one
        artifacts = [*artifacts, *module.offline_artifacts(request.options, jobs, python)]
    cache_dir = Path(offline_env.env(manifest, cache_dir=request.cache_dir)["HF_HUB_CACHE"])
    stage(request, artifacts, manifest, offline, cache_dir)
    env = job_env(artifacts, offline, manifest, request, model)
    if offline and not request.dry_run:
        prebuild_and_check(artifacts, manifest, cache_dir, check_python)

    jobs[0].after = ["?".join(group) for group in after]
    jobs[0].restarts = request.max_restarts
    for job in jobs:
        _render(job, site, env)

    result = Launch(exp, cluster, offline, request.dry_run, artifacts, jobs, env, warnings, withheld)
    by_key = {job.key: job for job in jobs}
    if request.dry_run:
        for job in jobs:
            dependency = _dependency(job, by_key, symbolic=True)
            job.attempts = [_attempt(job, n, dependency, f"{{{job.key}#{n - 1}}}") for n in range(job.restarts + 1)]
    else:
        _submit_all(jobs, by_key, withheld, exp)
    write_records(result, request)
    return result


def _render(job: Job, site: Site, env: dict[str, str]) -> None:
    """Write ``<exp>/<key>.sbatch`` from the job type's template: the same directives and variables for all."""
    cluster, exp = site.cluster, site.exp
    name = f"{exp.name}-{job.key}"
    output = str(exp / "logs" / ("%x-%A_%a.out" if job.array else "%x-%j.out"))
    directives = sbatch_directives(
        cluster.model_copy(update={"partition": job.partition}),
        name=name,
        nodes=job.nodes,
        gpus=job.gpus,
        cpus=job.cpus,
        time_limit=job.time_limit,
        output=output,
        array=job.array,
    )
    context = {
        "job": {
            "key": job.key,
            "name": name,
            "description": job.description,
            "nodes": job.nodes,
            "gpus": job.gpus,
            "cpus": job.cpus,
            "time_limit": job.time_limit,
            "array": job.array,
            "directives": directives,
        },
        "cluster": cluster,
        "experiment_dir": str(exp),
        "python": job.python,
        "jobenv": job.env,
        "env": env,
        # An array's afternotok waits for all its tasks, so one task's success must not cancel the next
        # attempt: arrays rely on --kill-on-invalid-dep alone.
        "chain_file": str(exp / f"restarts-{job.key}.ids") if job.restarts and not job.array else None,
        **job.context,
    }
    try:
        text = render(job.key, context, site.request.templates)
    except Exception as e:  # jinja2's errors (undefined variable, missing or broken template)
        raise BadInput(f"template {job.key}.sbatch.j2: {type(e).__name__}: {e}") from None
    job.script = exp / f"{job.key}.sbatch"
    safefs.write_atomic(exp, job.script, text.encode(), mode=0o755)


def _job_python(request: LaunchRequest, manifest, cluster: Cluster) -> tuple[str | None, str | None]:
    """(the interpreter the job script runs Python with, the one prebuild and check are told to use): --python,
    else the manifest's `python:`, else HPCSTAGE_PYTHON, else the registry's `python`; else None: a job with an
    activation runs the `python` it provides, one without runs this interpreter. The job is checked in the
    interpreter it runs in."""
    from hpcstage import offline as offline_env

    if request.python:
        return request.python, request.python
    path, origin = offline_env.job_python(manifest)
    if origin != offline_env.OWN_PYTHON:
        return path, None  # prebuild and check find the same one themselves (and name where it came from)
    if cluster.python:
        return cluster.python, cluster.python
    return None, None


def _dependency(job: Job, by_key: dict[str, Job], symbolic: bool) -> str | None:
    if job.after_job:
        target = by_key[job.after_job]
        ids = [f"{{{target.key}#{n}}}" for n in range(target.restarts + 1)] if symbolic else target.ids
        return "?".join(f"afterok:{i}" for i in ids)
    if job.after and any("?" in i for i in job.after):  # the attempts of an experiment's last job: any one
        return "?".join(f"afterok:{i}" for i in job.after[0].split("?"))
    if job.after:
        return "afterok:" + ":".join(job.after)
    return None


def _attempt(job: Job, n: int, dependency: str | None, previous: str | None) -> Attempt:
    """Attempt ``n`` of a job: the first waits for ``dependency`` (held until the restart chain is queued);
    each restart runs when the attempt before it failed."""
    if n == 0:
        return Attempt(
            (*([f"--dependency={dependency}"] if dependency else []), *(["--hold"] if job.restarts else [])),
            dependency,
        )
    return Attempt((f"--dependency=afternotok:{previous}", "--kill-on-invalid-dep=yes"), f"afternotok:{previous}")


def _submit_all(jobs: list[Job], by_key: dict[str, Job], withheld: list[str], exp: Path) -> None:
    sbatch_env = environment.sbatch_environment(os.environ, withheld)
    submitted: list[str] = []
    try:
        for job in jobs:
            assert job.script is not None  # rendered
            dependency = _dependency(job, by_key, symbolic=False)
            for n in range(job.restarts + 1):
                attempt = _attempt(job, n, dependency, job.ids[-1] if job.ids else None)
                job.attempts.append(attempt)
                attempt.job_id = submit(job.script, extra_args=attempt.options, env=sbatch_env)
                submitted.append(attempt.job_id)
            if job.restarts:
                safefs.write_atomic(exp, exp / f"restarts-{job.key}.ids", "".join(f"{i}\n" for i in job.ids).encode())
                release(job.ids[:1])
    except SlurmError as e:
        try:
            cancel(submitted)
        except SlurmError:
            pass
        undone = f"; cancelled {', '.join(submitted)} submitted before it" if submitted else ""
        raise LaunchError(f"{e}{undone}") from None


def _experiment_dir(request: LaunchRequest) -> tuple[Path, bool]:
    """The experiment folder, created; and whether this call created it."""
    name = request.name or f"{request.job_type}-{time.strftime('%Y%m%d-%H%M%S')}"
    exp = Path(request.experiments_dir).expanduser().resolve() / name
    fresh = not exp.exists()
    try:
        folder = safefs.opendir(exp.parent, exp)  # no link another user planted in a shared folder is followed
        folder.child("logs")
    except (NotADirectoryError, FileExistsError, safefs.NotAFolder):
        raise BadInput(f"--experiments-dir {request.experiments_dir}: not a folder; name a folder") from None
    raw = folder.read("jobs.json")  # a link there is not a record (and is replaced below)
    if raw is not None:
        try:
            launched = any(j.get("job_id") for j in json.loads(raw).get("jobs", []))
        except (ValueError, AttributeError):
            launched = True
        if launched:
            raise BadInput(f"experiment {exp} was launched already; pick another --name")
    return exp, fresh
