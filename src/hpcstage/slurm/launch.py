"""Launch: a job type and its options become rendered batch scripts, submitted with their dependencies.

    request ──► cluster (registry) ──► artifacts (stage on the login node when compute nodes are offline)
            ──► jobs (what each runs) ──► scripts (render.py) ──► sbatch (submit.py) ──► <experiment>/

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
import shlex
import shutil
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from hpcstage import __version__, policy, safefs
from hpcstage.errors import BadInput, HpcstageError
from hpcstage.slurm import JOB_TYPES, SlurmError, environment
from hpcstage.slurm.clusters import (
    Cluster,
    RegistryError,
    detect,
    is_here,
    live_max_time,
    load_registry,
    slurm_time_seconds,
)
from hpcstage.slurm.render import Shell, render, sbatch_directives
from hpcstage.slurm.submit import cancel, release, submit
from hpcstage.yamlfile import read_yaml

DEFAULT_TRAIN_COMMAND = ("llamafactory-cli", "train")  # multi-node through FORCE_TORCHRUN/NNODES/NODE_RANK
MASTER_PORT = 29500
TOKEN_VARIABLES = environment.TOKEN_VARIABLES
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")
PYTHON = Shell('"$HPCSTAGE_PYTHON"')
EVAL_TIME_LIMIT = "04:00:00"  # an lm_eval run's default, capped at the partition's limit
ACCOUNT_ENV = ("SBATCH_ACCOUNT", "SLURM_ACCOUNT")  # sbatch takes the account from these too
# llama-factory keys naming files or folders: relative ones are resolved against the config's folder.
CONFIG_PATH_KEYS = (
    "model_name_or_path",
    "adapter_name_or_path",
    "dataset_dir",
    "deepspeed",
    "tokenized_path",
    "media_dir",
    "output_dir",
)


class LaunchError(HpcstageError):
    """Staging, the offline check or a submission failed; nothing is left queued by this launch."""


@dataclass
class LaunchRequest:
    """Everything ``hpcstage launch`` accepts; options of other job types must stay unset."""

    job_type: str
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
    # train
    train_config: Path | None = None
    train_command: str | None = None  # default: llamafactory-cli train
    train_extra_args: str | None = None
    eval_tasks: list[str] = field(default_factory=list)
    eval_command: str | None = None  # default: $HPCSTAGE_PYTHON -m lm_eval
    eval_gpus: int | None = None  # default 1: lm_eval --model hf runs on one GPU
    eval_time_limit: str | None = None  # default: EVAL_TIME_LIMIT, capped at the partition's limit
    # datagen
    datagen_script: Path | None = None
    datagen_extra_args: str | None = None
    datagen_engine: str | None = None
    trace_input_path: Path | None = None
    chunk_size: int | None = None
    max_parallel: int | None = None
    datagen_target_repo: str | None = None  # dataset repo the job uploads its output folder to (-chunk-<i>)
    # consolidate
    checkpoint_dir: Path | None = None
    # run
    command: str | None = None


_OWN_OPTIONS = {
    "train": ("train_config", "train_command", "train_extra_args"),
    "eval": ("eval_command", "eval_gpus", "eval_time_limit"),
    "datagen": (
        "datagen_script",
        "datagen_extra_args",
        "datagen_engine",
        "trace_input_path",
        "chunk_size",
        "max_parallel",
        "datagen_target_repo",
    ),
    "consolidate": ("checkpoint_dir",),
    "run": ("command",),
}


@dataclass
class Artifact:
    """A model or dataset a job names, and where the job finds it."""

    role: str  # model | dataset | eval (a dataset an --eval-tasks task loads)
    source: str  # repo id or local path, as given
    repo_type: str | None = None  # None: a local path
    revision: str | None = None
    include: list[str] | None = None
    exclude: list[str] | None = None
    state: str = ""  # local | online | staged | fetched | would fetch
    commit: str | None = None
    path: str | None = None  # the local snapshot (or folder) the job reads
    loads: list[dict] | None = None  # eval: the load_dataset calls its tasks make (prebuilt and checked)
    tasks: list[str] | None = None  # eval: the tasks that load it

    def env_value(self, cache_folder: str) -> str:
        if self.path:
            return self.path
        if self.state == "would fetch":  # dry run: the snapshot the ref will name once staged
            return Shell(
                f'"$HF_HUB_CACHE/{cache_folder}/snapshots/$(cat "$HF_HUB_CACHE/{cache_folder}/refs/{self.revision}")"'
            )
        return self.source  # online: the repo id, fetched by the job


@dataclass
class Job:
    """One batch script and how it is submitted."""

    key: str  # train, eval, datagen, consolidate, run
    description: str
    nodes: int
    gpus: int
    cpus: int
    time_limit: str
    context: dict[str, Any]
    array: str | None = None
    after: list[str] = field(default_factory=list)  # external job ids (afterok)
    after_job: str | None = None  # key of a job of this launch (afterok on any of its attempts)
    restarts: int = 0
    partition: str | None = None  # default: the cluster's
    script: Path | None = None
    tools: tuple[str, ...] = ()  # programs the job runs from its environment (the interpreter's folder, PATH)
    modules: tuple[str, ...] = ()  # modules it runs with `$HPCSTAGE_PYTHON -m`
    imports: tuple[str, ...] = ()  # modules its script's own Python code imports (the datagen upload)
    env: environment.JobEnvironment = field(default_factory=environment.JobEnvironment)
    python: str | None = None  # its interpreter; None: the `python` its activation puts first on PATH
    shim: Path | None = None  # with an activation: that interpreter as the job starts it, for the login node's checks
    ids: list[str] = field(default_factory=list)  # one per attempt, once submitted
    sbatch: list[list[str]] = field(default_factory=list)


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
        out = []
        for job in self.jobs:
            for attempt, argv in enumerate(job.sbatch):
                out.append(
                    {
                        "key": job.key,
                        "attempt": attempt,
                        "job_id": job.ids[attempt] if attempt < len(job.ids) else None,
                        "script": job.script.name if job.script else None,
                        "array": job.array,
                        "dependency": next((a.split("=", 1)[1] for a in argv if a.startswith("--dependency=")), None),
                        "sbatch": argv,
                    }
                )
        return out


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


def partition_limit(cluster: Cluster, partition: str | None, live: bool) -> tuple[bool, str | None, str]:
    """(known, longest time or None for no limit, where that came from) for a partition of ``cluster``:
    ``scontrol show partition`` when ``live`` (this machine is on the cluster), else the registry."""
    if live and partition:
        known, most = live_max_time(partition)
        if known:
            return True, most, f"`scontrol show partition {partition}`"
    most = cluster.partition_max_time(partition)
    return most is not None, most, f"the {cluster.name} registry"


def preflight_time(
    cluster: Cluster,
    partition: str | None,
    limit: str | None,
    option: str,
    live: bool | None = None,
    default: str | None = None,
) -> str:
    """The time limit to ask for: ``limit`` if the partition accepts it, else BadInput naming the fix;
    unset, ``default`` capped at the partition's limit (no default: the partition's limit)."""
    if live is None:
        live = is_here(cluster)
    known, most, source = partition_limit(cluster, partition, live)
    fallback = most or cluster.partition_max_time(partition) or cluster.max_time
    if limit is None:
        if default is not None and (most is None or slurm_time_seconds(default) <= slurm_time_seconds(most)):
            return default
        return fallback
    try:
        seconds = slurm_time_seconds(limit)
    except ValueError as e:
        raise BadInput(f"{option}: {e}") from None
    if most is not None and seconds > slurm_time_seconds(most):
        where = f"partition {partition}" if partition else cluster.name
        raise BadInput(
            f"{option} {limit} is over {where}'s limit of {most} (from {source}); "
            f"ask for {most} or less, or pick a partition with a longer limit (--partition)"
        )
    return limit


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


# --- artifacts and staging --------------------------------------------------------------------


def _is_local(value: str) -> bool:
    return value.startswith(("/", "./", "../", "~")) or os.path.exists(value)


def staged_snapshot(
    cache_dir: Path,
    repo_type: str,
    repo: str,
    revision: str,
    include: list[str] | None = None,
    exclude: list[str] | None = None,
) -> tuple[str, Path] | None:
    """(commit, snapshot) when the cache holds every selected file of the revision; no network."""
    from hpcstage.hfcache import RepoCache
    from hpcstage.sources.hub import select

    cache = RepoCache(cache_dir, repo_type, repo)
    commit = revision if policy.is_commit(revision) else cache.read_ref(revision)
    if not commit:
        return None
    listing = cache.read_tree(commit)
    if listing is None:
        return None
    snapshot = cache.snapshot(commit)
    if not all((snapshot / f.path).exists() for f in select(listing, include, exclude)):
        return None
    return commit, snapshot


def read_train_config(request: LaunchRequest) -> tuple[Path, dict[str, Any]] | None:
    """The train job's llama-factory config (path, mapping), or None for other job types."""
    if request.job_type != "train":
        return None
    source = _existing_file(request.train_config, "--train-config")
    config = read_yaml(source, "--train-config", BadInput, "pass a llama-factory YAML config")[0] or {}
    if not isinstance(config, dict):
        raise BadInput(f"--train-config {source}: a llama-factory config is a YAML mapping")
    return source, config


def config_model(request: LaunchRequest) -> str | None:
    """The Hub repo id the train config's model_name_or_path names (staged like --model), or None. Read once
    per launch (`launch`), then passed on."""
    found = None if request.model else read_train_config(request)
    return _config_repo(*found) if found is not None else None


def _config_repo(source: Path, config: dict[str, Any]) -> str | None:
    value = config.get("model_name_or_path")
    if not isinstance(value, str) or _is_local(value) or (source.parent / value).exists():
        return None
    try:
        policy.check_repo_id(value)
    except BadInput:
        return None
    return value


def _artifacts(request: LaunchRequest, manifest, model: str | None) -> list[Artifact]:
    """What the job names: the manifest's entries, then `model` (--model, else the train config's repo id)
    and --dataset."""
    out = []
    if manifest is not None:
        for e in manifest.entries:
            out.append(
                Artifact(
                    "model" if e.repo_type == "model" else "dataset",
                    e.repo,
                    e.repo_type,
                    e.revision,
                    e.include,
                    e.exclude,
                )
            )
    for role, value in (("model", model), ("dataset", request.dataset)):
        if not value:
            continue
        if _is_local(value):
            path = Path(value).expanduser().resolve()
            if not path.exists():
                raise BadInput(f"--{role} {value}: no such file or folder")
            out.append(Artifact(role, value, state="local", path=str(path)))
        elif not any(a.source == value and a.role == role for a in out):
            try:
                policy.check_repo_id(value)
            except BadInput as e:
                raise BadInput(f"--{role}: {e}") from None
            out.append(Artifact(role, value, role, "main"))
    return out


def _stage(request: LaunchRequest, artifacts: list[Artifact], manifest, offline: bool, cache_dir: Path) -> None:
    """Fill in each artifact's state and path: staged on the login node when the job runs offline."""
    hub = [a for a in artifacts if a.repo_type]
    if not offline:
        for a in hub:
            a.state = "online"
        return
    lock = _lock(manifest)
    for a in hub:
        assert a.repo_type is not None and a.revision is not None  # Hub artifacts have both
        locked = lock.entries.get(f"{a.repo_type}:{a.source}@{a.revision}") if lock else None
        revision = locked.commit if locked else a.revision  # the lockfile pins what a pull would stage
        found = staged_snapshot(cache_dir, a.repo_type, a.source, revision, a.include, a.exclude)
        if found:
            a.commit, a.path, a.state = found[0], str(found[1]), "staged"
        else:
            a.state = "would fetch"
    if request.dry_run:
        return
    if not request.stage:
        missing = [a for a in hub if a.state != "staged"]
        for a in (a for a in missing if a.role == "eval"):
            revision = f" --revision {shlex.quote(a.revision)}" if a.revision and a.revision != "main" else ""
            raise LaunchError(
                f"eval task {', '.join(a.tasks or [])} loads dataset {a.source}@{a.revision}, which is not "
                f"staged in {cache_dir}: run `hpcstage pull --cache-dir {shlex.quote(str(cache_dir))} "
                f"--repo-type dataset {shlex.quote(a.source)}{revision}` (launch prebuilds it) or drop "
                "--no-stage; nothing submitted"
            )
        if missing:
            names = ", ".join(f"{a.repo_type} {a.source}@{a.revision}" for a in missing)
            raise LaunchError(f"not staged in {cache_dir}: {names}; run `hpcstage pull` first or drop --no-stage")
        return
    from hpcstage.manifest import hub_entry
    from hpcstage.staging import Options, manifest_options, pull, pull_manifest

    opts = Options(cache_dir=cache_dir, quiet=request.quiet)
    if manifest is not None:  # the extra repos below are held to the manifest's allowlist too
        opts = manifest_options(manifest, opts)
    try:
        staged = []
        if manifest is not None:  # the lockfile makes a warm pull network-free
            staged += pull_manifest(manifest, opts).repos
        extra = [a for a in hub if a.state != "staged" and not _in_manifest(a, manifest)]
        if extra:
            entries = [hub_entry(repo=a.source, repo_type=a.repo_type, revision=a.revision) for a in extra]
            staged += pull(entries, opts)[0].repos
    except BadInput:
        raise  # policy (allowlist) and manifest problems keep their exit code 2
    except HpcstageError as e:
        raise LaunchError(f"staging failed, nothing submitted: {e}") from None
    for r in staged:
        for a in hub:
            if (a.repo_type, a.source, a.revision) == (r.repo_type, r.repo_id, r.revision):
                fetched = a.state != "staged"
                a.commit, a.path = r.commit, str(r.snapshot)
                a.state = "fetched" if fetched else "staged"


def _lock(manifest):
    from hpcstage.manifest import load_lock

    return load_lock(manifest.lock_path) if manifest is not None and manifest.path else None


def _in_manifest(a: Artifact, manifest) -> bool:
    return manifest is not None and any(
        (e.repo_type, e.repo, e.revision) == (a.repo_type, a.source, a.revision) for e in manifest.entries
    )


def _job_manifest(artifacts: list[Artifact], manifest, cache_dir: Path):
    """The manifest plus the Hub repos named by --model/--dataset: what prebuild and check look at."""
    from hpcstage.manifest import Manifest, hub_entry

    extra = [
        hub_entry(repo=a.source, repo_type=a.repo_type, revision=a.revision, load=load)
        for a in artifacts
        if a.repo_type and not _in_manifest(a, manifest)
        for load in (a.loads or (None,))
    ]
    models = [e for e in extra if e.repo_type == "model"]
    datasets = [e for e in extra if e.repo_type == "dataset"]
    if manifest is None:
        return Manifest(cache_dir=cache_dir, models=models, datasets=datasets)
    return manifest.model_copy(
        update={
            "cache_dir": cache_dir,
            "models": [*manifest.models, *models],
            "datasets": [*manifest.datasets, *datasets],
        }
    )


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


def _prebuild_and_check(artifacts: list[Artifact], manifest, cache_dir: Path, python: str | None = None) -> None:
    """Build the Arrow caches the job's manifest names in the job's interpreter, then refuse unless everything
    loads offline there."""
    from hpcstage import arrowcache, offline

    if not any(a.repo_type for a in artifacts) and (manifest is None or not manifest.prebuild):
        return
    combined = _job_manifest(artifacts, manifest, cache_dir)
    try:
        builds = arrowcache.builds_from_manifest(combined)
        if builds:
            summary = arrowcache.prebuild(builds, manifest=combined, cache_dir=cache_dir, python=python)
            failed = [f"{r.label}: {r.error}" for r in summary.results if r.status == "failed"]
            if failed:
                raise LaunchError(f"prebuild failed, nothing submitted: {'; '.join(failed)}")
        report = offline.check(combined, cache_dir=cache_dir, python=python)
    except LaunchError:
        raise
    except HpcstageError as e:
        raise LaunchError(f"offline readiness check could not run, nothing submitted: {e}") from None
    if not report.ok:
        bad = "; ".join(f"{e.entry}: {', '.join(e.problems)} (fix: {e.fix})" for e in report.entries if not e.ok)
        raise LaunchError(f"offline check failed, nothing submitted: {bad}")


# --- jobs ---------------------------------------------------------------------------------------


def _split(text: str | None) -> list[str]:
    try:
        return shlex.split(text) if text else []
    except ValueError as e:
        raise BadInput(f"cannot split {text!r} into words ({e}); balance the quotes") from None


def _resources(
    request: LaunchRequest,
    cluster: Cluster,
    gpus_default: int,
    *,
    partition: str | None = None,
    gpus: int | None = None,
    gpus_option: str = "--gpus-per-node",
    time_limit: str | None = None,
    time_option: str = "--time-limit",
    time_default: str | None = None,
    live: bool = False,
) -> dict[str, Any]:
    """GPUs, CPUs, time limit and partition of one job, each checked against the partition's node and limit."""
    partition = partition or cluster.partition
    node_cpus, node_gpus = cluster.node_shape(partition)
    where = f"{cluster.name} partition {partition}" if partition else cluster.name
    if gpus is None:
        gpus = gpus_default if request.gpus_per_node is None else request.gpus_per_node
    if not 0 <= gpus <= node_gpus:
        raise BadInput(f"{where} has {node_gpus} GPUs per node; {gpus_option} {gpus} asked")
    share = node_cpus // max(node_gpus, 1)
    cpus = request.cpus_per_task if request.cpus_per_task is not None else (share * gpus if gpus else share) or 1
    if not 1 <= cpus <= node_cpus:
        raise BadInput(f"{where} has {node_cpus} CPUs per node; --cpus-per-task {cpus} asked")
    limit = preflight_time(cluster, partition, time_limit, time_option, live=live, default=time_default)
    return {"gpus": gpus, "cpus": cpus, "time_limit": limit, "partition": partition}


def _existing_file(path: Path | None, option: str) -> Path:
    if path is None:
        raise BadInput(f"{option} is required for this job type")
    path = Path(path).expanduser().resolve()
    if not path.is_file():
        raise BadInput(f"{option} {path}: no such file")
    return path


def _eval_job(
    request: LaunchRequest, cluster: Cluster, exp: Path, model: Any, after_job: str | None, live: bool
) -> Job:
    """lm_eval on its own resources: --eval-gpus (default 1) and --eval-time-limit, not the train job's."""
    from hpcstage.evaltasks import task_spec

    tasks = ",".join(task_spec(t) for t in request.eval_tasks)
    gpus = request.eval_gpus
    if gpus is None:
        gpus = request.gpus_per_node if request.job_type == "eval" and request.gpus_per_node is not None else 1
    head = _split(request.eval_command) or [PYTHON, "-m", "lm_eval"]
    model_args = '"pretrained=$HPCSTAGE_EVAL_MODEL' + (',parallelize=True"' if gpus > 1 else '"')
    argv = [
        *head,
        "--model",
        "hf",
        "--model_args",
        Shell(model_args),
        "--tasks",
        tasks,
        "--output_path",
        str(exp / "eval"),
        "--batch_size",
        "auto",
    ]
    resources = _resources(
        request,
        cluster,
        1,
        gpus=gpus,
        gpus_option="--eval-gpus",
        time_limit=request.eval_time_limit,
        time_option="--eval-time-limit",
        time_default=EVAL_TIME_LIMIT,
        live=live,
    )
    return Job(
        "eval",
        f"eval: lm_eval tasks {tasks}",
        1,
        **resources,
        context={"eval_model": model, "eval_argv": argv},
        after_job=after_job,
        modules=() if request.eval_command else ("lm_eval",),
    )


def _config_overrides(source: Path, config: dict[str, Any], exp: Path, warnings: list[str]) -> dict[str, str]:
    """key -> absolute path for the config's relative paths (its folder first, then the launch folder)."""
    out = {}
    for key in CONFIG_PATH_KEYS:
        value = config.get(key)
        if not isinstance(value, str) or not value or Path(value).expanduser().is_absolute():
            continue
        if (
            key in ("model_name_or_path", "adapter_name_or_path")
            and not _is_local(value)
            and not (source.parent / value).exists()
        ):
            continue  # a Hub repo id
        here, there = source.parent / value, Path.cwd() / value
        if key == "output_dir" or here.exists():
            out[key] = str(here.resolve())
        elif there.exists():
            out[key] = str(there.resolve())
        else:
            warnings.append(
                f"--train-config {source.name}: {key}: {value} exists neither beside the config "
                f"({source.parent}) nor here ({Path.cwd()}); the job will look for it in {Path.cwd()}"
            )
    return out


def build_jobs(
    request: LaunchRequest, cluster: Cluster, exp: Path, live: bool = False, warnings: list[str] | None = None
) -> list[Job]:
    """The jobs of a launch, in submission order (files they need are written into ``exp``)."""
    kind = request.job_type
    nodes = request.num_nodes
    warnings = [] if warnings is None else warnings
    own: dict[str, Any] = {"time_limit": request.time_limit, "live": live}
    if kind == "train":
        read = read_train_config(request)
        assert read is not None  # a train job has one
        source, config = read
        shutil.copyfile(source, exp / "train_config.yaml")  # the job reads the copy: later edits don't leak in
        paths = _config_overrides(source, config, exp, warnings)
        if not config.get("output_dir"):
            paths["output_dir"] = str(exp / "checkpoints")
        output_dir = paths.get("output_dir", config.get("output_dir"))
        overrides: list[Any] = [
            f"{key}={value}" for key, value in paths.items() if not (key == "model_name_or_path" and request.model)
        ]
        if request.model or _config_repo(source, config):
            overrides.insert(0, Shell('"model_name_or_path=$HPCSTAGE_MODEL"'))
        if request.max_restarts and config.get("overwrite_output_dir") is True:
            warnings.append(
                f"--max-restarts {request.max_restarts} with overwrite_output_dir: true in "
                f"{source.name}: each restart trains from scratch; drop overwrite_output_dir (llama-factory "
                "then resumes from the last checkpoint in output_dir) or set resume_from_checkpoint"
            )
        argv = [
            *(_split(request.train_command) or DEFAULT_TRAIN_COMMAND),
            str(exp / "train_config.yaml"),
            *overrides,
            *_split(request.train_extra_args),
        ]
        jobs = [
            Job(
                "train",
                f"train: {source.name} on {nodes} node(s)",
                nodes,
                **_resources(request, cluster, cluster.node_shape(request.partition or cluster.partition)[1], **own),
                context={"train_argv": argv, "master_port": MASTER_PORT},
                tools=() if request.train_command else DEFAULT_TRAIN_COMMAND[:1],
            )
        ]
        if request.eval_tasks:
            jobs.append(_eval_job(request, cluster, exp, output_dir, "train", live))
        return jobs
    if kind == "eval":
        if not request.eval_tasks or not request.model:
            raise BadInput("--job-type eval needs --model and --eval-tasks")
        return [_eval_job(request, cluster, exp, Shell('"$HPCSTAGE_MODEL"'), None, live)]
    if kind == "datagen":
        script = _existing_file(request.datagen_script, "--datagen-script")
        argv = [PYTHON, str(script)]
        argv += ["--engine", request.datagen_engine] if request.datagen_engine else []
        argv += _split(request.datagen_extra_args)
        context: dict[str, Any] = {"datagen_argv": argv, "chunk_map": None, "target_repo": request.datagen_target_repo}
        array = None
        if (request.trace_input_path is None) != (request.chunk_size is None):
            raise BadInput("--trace-input-path and --chunk-size go together")
        if request.trace_input_path is not None:
            array, context["chunk_map"] = _chunk_map(request, exp)
        return [
            Job(
                "datagen",
                f"datagen: {script.name}",
                nodes,
                **_resources(request, cluster, cluster.node_shape(request.partition or cluster.partition)[1], **own),
                context=context,
                array=array,
                imports=("huggingface_hub",) if request.datagen_target_repo else (),
            )
        ]
    if kind == "consolidate":
        if request.checkpoint_dir is None:
            raise BadInput("--job-type consolidate needs --checkpoint-dir")
        ckpt = Path(request.checkpoint_dir).expanduser().resolve()
        # CPU work: the registry's CPU partition where it names one (a GPU partition charges the GPUs too).
        partition = request.partition or cluster.cpu_partition or cluster.partition
        return [
            Job(
                "consolidate",
                f"consolidate: ZeRO shards of {ckpt.name} to fp32",
                1,
                **_resources(request, cluster, 0, partition=partition, **own),
                context={"checkpoint_dir": str(ckpt), "output_dir": str(ckpt / "fp32")},
            )
        ]
    if kind == "run":
        if not request.command:
            raise BadInput('--job-type run needs --command "..."')
        return [
            Job(
                "run",
                "run: a command",
                nodes,
                **_resources(request, cluster, 0, **own),
                context={"command": request.command},
            )
        ]
    raise BadInput(f"unknown job type {kind!r}; choose one of {', '.join(JOB_TYPES)}")


def _chunk_map(request: LaunchRequest, exp: Path) -> tuple[str, str]:
    """Split the task folders into chunks listed in chunk_map.json (folders are never copied or moved)."""
    assert request.trace_input_path is not None and request.chunk_size is not None  # checked by the caller
    root = Path(request.trace_input_path).expanduser().resolve()
    if not root.is_dir():
        raise BadInput(f"--trace-input-path {root}: no such folder")
    folders = sorted(str(p) for p in root.iterdir() if p.is_dir())
    if not folders:
        raise BadInput(f"--trace-input-path {root} has no task folders")
    size = request.chunk_size
    chunks = [folders[i : i + size] for i in range(0, len(folders), size)]
    path = exp / "chunk_map.json"
    _write_json(path, {"input": str(root), "chunk_size": size, "tasks": len(folders), "chunks": chunks})
    array = f"0-{len(chunks) - 1}"
    if request.max_parallel is not None:
        array += f"%{request.max_parallel}"
    return array, str(path)


# --- the launch -----------------------------------------------------------------------------------


def _validate(request: LaunchRequest) -> None:
    if request.job_type not in JOB_TYPES:
        raise BadInput(f"unknown job type {request.job_type!r}; choose one of {', '.join(JOB_TYPES)}")
    for kind, names in _OWN_OPTIONS.items():
        if kind == request.job_type or (kind == "eval" and request.job_type == "train"):
            continue
        for name in names:
            if getattr(request, name) is not None:
                raise BadInput(f"--{name.replace('_', '-')} is for --job-type {kind}")
    if request.eval_tasks and request.job_type not in ("train", "eval"):
        raise BadInput("--eval-tasks is for --job-type train (a chained eval) or eval")
    for name in ("num_nodes", "cpus_per_task", "chunk_size", "max_parallel", "eval_gpus"):
        value = getattr(request, name)
        if value is not None and value < (0 if name == "eval_gpus" else 1):  # 0 must not mean "the default"
            raise BadInput(
                f"--{name.replace('_', '-')} must be at least {0 if name == 'eval_gpus' else 1} (got {value})"
            )
    if request.max_restarts < 0:
        raise BadInput("--max-restarts must be 0 or more")
    if request.name is not None and not _NAME.fullmatch(request.name):
        raise BadInput(f"--name {request.name!r}: use letters, digits, '.', '_' and '-'")


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


def _job_env(
    artifacts: list[Artifact], offline: bool, manifest, request: LaunchRequest, model: str | None
) -> dict[str, str]:
    from hpcstage import offline as offline_env
    from hpcstage.layout import repo_folder_name

    env: dict[str, str] = {}
    hf = offline_env.env(manifest, cache_dir=request.cache_dir)
    if offline:
        env.update(hf)
    elif request.cache_dir or (manifest is not None and manifest.cache_dir):
        env["HF_HUB_CACHE"] = hf["HF_HUB_CACHE"]
    for role in ("model", "dataset"):
        chosen = model if role == "model" else request.dataset
        candidates = [a for a in artifacts if a.role == role and (chosen is None or a.source == chosen)]
        if chosen or len(candidates) == 1:
            a = candidates[0]
            folder = repo_folder_name(a.repo_type, a.source) if a.repo_type else ""
            env[f"HPCSTAGE_{role.upper()}"] = a.env_value(folder)
    return env


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


def _sbatch_args(job: Job, attempt: int, dependency: str | None, previous: str | None) -> list[str]:
    args = []
    if attempt == 0:
        if dependency:
            args.append(f"--dependency={dependency}")
        if job.restarts:
            args.append("--hold")  # released once the whole chain is queued and written down
    else:
        args += [f"--dependency=afternotok:{previous}", "--kill-on-invalid-dep=yes"]
    return ["sbatch", "--parsable", *args, str(job.script)]


def launch(request: LaunchRequest) -> Launch:
    """Stage, render, record and (unless dry) submit; returns what was done."""
    from hpcstage.manifest import load_manifest

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
    _check_upload(request, cluster, offline, secrets, names)
    manifest = load_manifest(request.manifest) if request.manifest else None
    model = request.model or config_model(request)
    artifacts = _artifacts(request, manifest, model)
    exp, fresh = _experiment_dir(request)
    try:
        return _launch_into(
            request,
            cluster,
            offline,
            manifest,
            artifacts,
            model,
            exp,
            after,
            live,
            secrets[0] if secrets else None,
            names,
        )
    except BadInput:
        if fresh:  # refused: leave nothing behind
            shutil.rmtree(exp, ignore_errors=True)
        raise


def _check_upload(
    request: LaunchRequest, cluster: Cluster, offline: bool, secrets: tuple[Path, str] | None, names: list[str]
) -> None:
    """--datagen-target-repo needs compute nodes with internet and a token in the secrets file."""
    repo = request.datagen_target_repo
    if not repo:
        return
    try:
        policy.check_repo_id(repo)
    except BadInput as e:
        raise BadInput(f"--datagen-target-repo: {e}") from None
    if offline:
        why = "--offline was given" if request.offline else f"{cluster.name}'s compute nodes have no internet"
        raise BadInput(
            f"--datagen-target-repo: {why}, so the job cannot upload; launch on a cluster with internet, "
            f"or upload the experiment's output/ folder from the login node afterwards "
            f"(`hf upload --repo-type dataset {repo} EXPERIMENT/output`)"
        )
    if not secrets or not set(names) & set(TOKEN_VARIABLES):
        where = f"{secrets[0]} names no HF_TOKEN" if secrets else "no secrets file is set"
        raise BadInput(
            f"--datagen-target-repo: the job uploads with HF_TOKEN from your secrets file, and {where}; "
            f"add a line HF_TOKEN=hf_... to a private file (chmod 600) named by ${environment.SECRETS_ENV} "
            "or by secrets_file in ~/.config/hpcstage/clusters.toml"
        )


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
    request: LaunchRequest,
    cluster: Cluster,
    offline: bool,
    manifest,
    artifacts: list[Artifact],
    model: str | None,
    exp: Path,
    after: list[list[str]],
    live: bool,
    secrets: Path | None = None,
    secret_names: list[str] | None = None,
) -> Launch:
    from hpcstage import offline as offline_env

    warnings: list[str] = []
    jobs = build_jobs(request, cluster, exp, live, warnings)  # resources and limits are checked before staging
    loads = {e.repo for e in manifest.datasets if e.load is not None} if manifest is not None else set()
    if offline and request.dataset and not _is_local(request.dataset) and request.dataset not in loads:
        warnings.append(
            f"--dataset {request.dataset} has no `load:` entry, so no load_dataset call was prebuilt or "
            f"checked: offline, load_dataset({request.dataset!r}, ...) fails in the job; load "
            "$HPCSTAGE_DATASET (the snapshot folder) instead, or name it in a manifest with "
            "`load: {split: ...}` (-f)"
        )
    python, check_python = _job_python(request, manifest, cluster)
    _job_environments(request, cluster, jobs, exp, python, secrets)
    if jobs[0].shim:  # prebuild and check run in the job's interpreter as its activation sets it up
        check_python = str(jobs[0].shim)
    withheld = environment.withheld(os.environ, secret_names or [])
    if (
        not offline
        and any(n in withheld for n in TOKEN_VARIABLES)
        and not set(TOKEN_VARIABLES) & set(secret_names or [])
    ):
        warnings.append(
            "HF_TOKEN of this shell is not passed to the job (Slurm would store it with the job); "
            "a job that needs it gets it from your secrets file: add HF_TOKEN=... to a private file "
            f"named by ${environment.SECRETS_ENV}"
        )
    problems = missing_tools(jobs, python or sys.executable)
    if problems:
        text = (
            f"{'; '.join(problems)}: install what is missing into the job's environment (or fix its "
            "activation), or pass --python of the environment that has them"
        )
        if not request.dry_run:
            raise BadInput(text)  # before anything is staged or submitted
        warnings.append(text)
    elif offline and any(j.key == "eval" for j in jobs) and not request.eval_command:
        evaluation = next(j for j in jobs if j.key == "eval")  # asked through its activation when it has one
        artifacts = [
            *artifacts,
            *eval_artifacts(request.eval_tasks, str(evaluation.shim) if evaluation.shim else python or sys.executable),
        ]
    cache_dir = Path(offline_env.env(manifest, cache_dir=request.cache_dir)["HF_HUB_CACHE"])
    _stage(request, artifacts, manifest, offline, cache_dir)
    env = _job_env(artifacts, offline, manifest, request, model)
    if offline and not request.dry_run:
        _prebuild_and_check(artifacts, manifest, cache_dir, check_python)

    jobs[0].after = ["?".join(group) for group in after]
    jobs[0].restarts = request.max_restarts
    for job in jobs:
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
            text = render(job.key, context, request.templates)
        except Exception as e:  # jinja2's errors (undefined variable, missing or broken template)
            raise BadInput(f"template {job.key}.sbatch.j2: {type(e).__name__}: {e}") from None
        job.script = exp / f"{job.key}.sbatch"
        safefs.write_atomic(exp, job.script, text.encode(), mode=0o755)

    result = Launch(exp, cluster, offline, request.dry_run, artifacts, jobs, env, warnings, withheld)
    by_key = {job.key: job for job in jobs}
    if request.dry_run:
        for job in jobs:
            dependency = _dependency(job, by_key, symbolic=True)
            job.sbatch = [_sbatch_args(job, n, dependency, f"{{{job.key}#{n - 1}}}") for n in range(job.restarts + 1)]
    else:
        _submit_all(jobs, by_key, withheld, exp)
    _write_records(result, request)
    return result


_FIND_MODULES = (
    "import importlib.util, sys\nprint(' '.join(m for m in sys.argv[1:] if importlib.util.find_spec(m) is None))"
)
_FIND_TOOLS = "import shutil, sys\nprint(' '.join(t for t in sys.argv[1:] if shutil.which(t) is None))"


def _missing(python: str, code: str, names: tuple[str, ...]) -> tuple[list[str], str]:
    """(the names `code` run by `python` reports missing, else all of them; the child's last error line)."""
    try:
        r = subprocess.run([python, "-c", code, *names], capture_output=True, text=True, timeout=120)
    except (OSError, subprocess.TimeoutExpired) as e:
        return list(names), str(e)
    if r.returncode == 0:
        return r.stdout.split(), ""
    return list(names), (r.stderr.strip().splitlines() or [f"exit status {r.returncode}"])[-1]


def eval_artifacts(specs: list[str], python: str) -> list[Artifact]:
    """The Hub datasets lm_eval's tasks load (asked of lm_eval in the job's interpreter): offline, they are
    staged, prebuilt and checked like the job's own."""
    from hpcstage import evaltasks

    return [
        Artifact("eval", d.repo, "dataset", d.revision, loads=d.loads, tasks=d.tasks)
        for d in evaltasks.resolve(specs, python)
    ]


def missing_tools(jobs: list[Job], python: str) -> list[str]:
    """What the jobs run that their environment lacks, checked here before submitting rather than found a day
    later in the queue: programs in the interpreter's folder (the job script puts it first on PATH) or on
    PATH, modules importable by that interpreter. A job with an activation is asked through its interpreter
    shim (module loads and activation first), which sees the PATH the job will see."""
    folder = Path(python).parent
    path = os.pathsep.join([str(folder), os.environ.get("PATH", "")])
    problems = []
    for job in jobs:
        if job.shim:
            absent, error = _missing(str(job.shim), _FIND_TOOLS, job.tools or ("true",))
            if error:  # the activation itself fails here: say so rather than blame each tool
                problems.append(f"the {job.key} job's activation ({job.env.activate_from}) fails on this node: {error}")
                continue
            where = "is not on the PATH of its activated environment"
        else:
            absent = [tool for tool in job.tools if shutil.which(tool, path=path) is None]
            where = f"is neither in {folder} nor on PATH"
        problems += [f"the {job.key} job runs `{tool}`, which {where}" for tool in absent]
        runner = str(job.shim) if job.shim else python
        shown = f"{job.python or 'python'} (after its activation)" if job.shim else python
        if job.modules:
            problems += [
                f"the {job.key} job runs `{shown} -m {m}`, which that interpreter cannot import"
                for m in _missing(runner, _FIND_MODULES, job.modules)[0]
            ]
        if job.imports:
            problems += [
                f"the {job.key} job imports {m} in `{shown}`, which cannot import it"
                for m in _missing(runner, _FIND_MODULES, job.imports)[0]
            ]
    return problems


def _submit_all(jobs: list[Job], by_key: dict[str, Job], withheld: list[str], exp: Path) -> None:
    sbatch_env = environment.sbatch_environment(os.environ, withheld)
    submitted: list[str] = []
    try:
        for job in jobs:
            dependency = _dependency(job, by_key, symbolic=False)
            for attempt in range(job.restarts + 1):
                argv = _sbatch_args(job, attempt, dependency, job.ids[-1] if job.ids else None)
                job.sbatch.append(argv)
                job.ids.append(submit(argv[-1], extra_args=argv[2:-1], env=sbatch_env))
                submitted.append(job.ids[-1])
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


def _write_records(result: Launch, request: LaunchRequest) -> None:
    exp = result.experiment_dir
    jobs = {"experiment": exp.name, "cluster": result.cluster.name, "dry_run": result.dry_run, "jobs": result.records()}
    _write_json(exp / "jobs.json", jobs)
    config = {
        "hpcstage": __version__,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "request": {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(request).items()},
        "cluster": result.cluster.model_dump(),
        "offline": result.offline,
        "artifacts": [asdict(a) for a in result.artifacts],
        "env": dict(result.env),
        "jobs": {job.key: {"python": job.python, **asdict(job.env)} for job in result.jobs},
        "sbatch_withheld": result.withheld,  # names only: sbatch's --export list is the rest of the shell's
    }
    _write_json(exp / "config.json", config)


def _write_json(path: Path, data: Any) -> None:
    safefs.write_atomic(path.parent, path, (json.dumps(data, indent=1) + "\n").encode())


# --- status -----------------------------------------------------------------------------------------


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
