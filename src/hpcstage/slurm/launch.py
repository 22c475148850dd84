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

Secrets stay out: scripts and records hold paths and repo ids only, and on offline clusters the
token is also removed from the environment sbatch exports into the job (the job has no use for it).
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any


from hpcstage import __version__, policy, safefs
from hpcstage.errors import BadInput, HpcstageError
from hpcstage.slurm import JOB_TYPES, SlurmError
from hpcstage.slurm.clusters import Cluster, RegistryError, detect, load_registry, slurm_time_seconds
from hpcstage.slurm.render import Shell, render, sbatch_directives
from hpcstage.slurm.submit import cancel, release, submit
from hpcstage.yamlfile import read_yaml

DEFAULT_TRAIN_COMMAND = ("llamafactory-cli", "train")  # multi-node through FORCE_TORCHRUN/NNODES/NODE_RANK
MASTER_PORT = 29500
TOKEN_VARIABLES = ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN")
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")
PYTHON = Shell('"$HPCSTAGE_PYTHON"')


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
    # train
    train_config: Path | None = None
    train_command: str | None = None  # default: llamafactory-cli train
    train_extra_args: str | None = None
    eval_tasks: list[str] = field(default_factory=list)
    eval_command: str | None = None  # default: $HPCSTAGE_PYTHON -m lm_eval
    # datagen
    datagen_script: Path | None = None
    datagen_extra_args: str | None = None
    datagen_engine: str | None = None
    trace_input_path: Path | None = None
    chunk_size: int | None = None
    max_parallel: int | None = None
    # consolidate
    checkpoint_dir: Path | None = None
    # run
    command: str | None = None


_OWN_OPTIONS = {
    "train": ("train_config", "train_command", "train_extra_args"),
    "eval": ("eval_command",),
    "datagen": ("datagen_script", "datagen_extra_args", "datagen_engine", "trace_input_path", "chunk_size",
                "max_parallel"),
    "consolidate": ("checkpoint_dir",),
    "run": ("command",),
}


@dataclass
class Artifact:
    """A model or dataset a job names, and where the job finds it."""

    role: str  # model | dataset
    source: str  # repo id or local path, as given
    repo_type: str | None = None  # None: a local path
    revision: str | None = None
    include: list[str] | None = None
    exclude: list[str] | None = None
    state: str = ""  # local | online | staged | fetched | would fetch
    commit: str | None = None
    path: str | None = None  # the local snapshot (or folder) the job reads

    def env_value(self, cache_folder: str) -> str:
        if self.path:
            return self.path
        if self.state == "would fetch":  # dry run: the snapshot the ref will name once staged
            return Shell(f'"$HF_HUB_CACHE/{cache_folder}/snapshots/$(cat "$HF_HUB_CACHE/{cache_folder}/refs/'
                         f'{self.revision}")"')
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
    script: Path | None = None
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

    def records(self) -> list[dict[str, Any]]:
        """jobs.json's job list: one record per submitted attempt."""
        out = []
        for job in self.jobs:
            for attempt, argv in enumerate(job.sbatch):
                out.append({
                    "key": job.key,
                    "attempt": attempt,
                    "job_id": job.ids[attempt] if attempt < len(job.ids) else None,
                    "script": job.script.name if job.script else None,
                    "array": job.array,
                    "dependency": next((a.split("=", 1)[1] for a in argv if a.startswith("--dependency=")), None),
                    "sbatch": argv,
                })
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


# --- artifacts and staging --------------------------------------------------------------------


def _is_local(value: str) -> bool:
    return value.startswith(("/", "./", "../", "~")) or os.path.exists(value)


def staged_snapshot(cache_dir: Path, repo_type: str, repo: str, revision: str,
                    include: list[str] | None = None, exclude: list[str] | None = None) -> tuple[str, Path] | None:
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


def _artifacts(request: LaunchRequest, manifest) -> list[Artifact]:
    out = []
    if manifest is not None:
        for e in manifest.entries:
            out.append(Artifact("model" if e.repo_type == "model" else "dataset", e.repo, e.repo_type, e.revision,
                                e.include, e.exclude))
    for role, value in (("model", request.model), ("dataset", request.dataset)):
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
        if missing:
            names = ", ".join(f"{a.repo_type} {a.source}@{a.revision}" for a in missing)
            raise LaunchError(f"not staged in {cache_dir}: {names}; run `hpcstage pull` first or drop --no-stage")
        return
    from hpcstage.manifest import hub_entry
    from hpcstage.staging import Options, pull, pull_manifest

    opts = Options(cache_dir=cache_dir, quiet=request.quiet)
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

    extra = [hub_entry(repo=a.source, repo_type=a.repo_type, revision=a.revision)
             for a in artifacts if a.repo_type and not _in_manifest(a, manifest)]
    models = [e for e in extra if e.repo_type == "model"]
    datasets = [e for e in extra if e.repo_type == "dataset"]
    if manifest is None:
        return Manifest(cache_dir=cache_dir, models=models, datasets=datasets)
    return manifest.model_copy(update={"cache_dir": cache_dir, "models": [*manifest.models, *models],
                                       "datasets": [*manifest.datasets, *datasets]})


def _job_python(request: LaunchRequest, manifest, cluster: Cluster) -> tuple[str, str | None]:
    """(the interpreter the job script runs Python with, the one prebuild and check are told to use): --python,
    else the manifest's `python:`, else HPCSTAGE_PYTHON, else the registry's `python`, else this interpreter.
    The job is checked in the interpreter it runs in."""
    from hpcstage import offline as offline_env

    if request.python:
        return request.python, request.python
    path, origin = offline_env.job_python(manifest)
    if origin != offline_env.OWN_PYTHON:
        return path, None  # prebuild and check find the same one themselves (and name where it came from)
    if cluster.python:
        return cluster.python, cluster.python
    return sys.executable, None


def _prebuild_and_check(artifacts: list[Artifact], manifest, cache_dir: Path, python: str | None = None) -> None:
    """Build the Arrow caches the job's manifest names in the job's interpreter, then refuse unless everything
    loads offline there."""
    from hpcstage import offline, prebuild

    if not any(a.repo_type for a in artifacts) and (manifest is None or not manifest.prebuild):
        return
    combined = _job_manifest(artifacts, manifest, cache_dir)
    try:
        builds = prebuild.builds_from_manifest(combined)
        if builds:
            summary = prebuild.prebuild(builds, manifest=combined, cache_dir=cache_dir, python=python)
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


def _resources(request: LaunchRequest, cluster: Cluster, gpus_default: int) -> dict[str, Any]:
    gpus = gpus_default if request.gpus_per_node is None else request.gpus_per_node
    if not 0 <= gpus <= cluster.gpus_per_node:
        raise BadInput(f"{cluster.name} has {cluster.gpus_per_node} GPUs per node; --gpus-per-node {gpus} asked")
    share = cluster.cpus_per_node // max(cluster.gpus_per_node, 1)
    cpus = request.cpus_per_task if request.cpus_per_task is not None else (share * gpus if gpus else share) or 1
    if not 1 <= cpus <= cluster.cpus_per_node:
        raise BadInput(f"{cluster.name} has {cluster.cpus_per_node} CPUs per node; --cpus-per-task {cpus} asked")
    limit = request.time_limit or cluster.max_time
    try:
        seconds = slurm_time_seconds(limit)
    except ValueError as e:
        raise BadInput(f"--time-limit: {e}") from None
    if seconds > cluster.max_time_seconds:
        raise BadInput(f"--time-limit {limit} is over {cluster.name}'s limit of {cluster.max_time}")
    return {"gpus": gpus, "cpus": cpus, "time_limit": limit}


def _existing_file(path: Path | None, option: str) -> Path:
    if path is None:
        raise BadInput(f"{option} is required for this job type")
    path = Path(path).expanduser().resolve()
    if not path.is_file():
        raise BadInput(f"{option} {path}: no such file")
    return path


def _eval_job(request: LaunchRequest, cluster: Cluster, exp: Path, model: Any, after_job: str | None) -> Job:
    tasks = ",".join(request.eval_tasks)
    head = _split(request.eval_command) or [PYTHON, "-m", "lm_eval"]
    argv = [*head, "--model", "hf", "--model_args", Shell('"pretrained=$HPCSTAGE_EVAL_MODEL"'), "--tasks", tasks,
            "--output_path", str(exp / "eval"), "--batch_size", "auto"]
    return Job("eval", f"eval: lm_eval tasks {tasks}", 1, **_resources(request, cluster, cluster.gpus_per_node),
               context={"eval_model": model, "eval_argv": argv}, after_job=after_job)


def build_jobs(request: LaunchRequest, cluster: Cluster, exp: Path) -> list[Job]:
    """The jobs of a launch, in submission order (files they need are written into ``exp``)."""
    kind = request.job_type
    nodes = request.num_nodes
    if kind == "train":
        source = _existing_file(request.train_config, "--train-config")
        config = read_yaml(source, "--train-config", BadInput, "pass a llama-factory YAML config")[0] or {}
        if not isinstance(config, dict):
            raise BadInput(f"--train-config {source}: a llama-factory config is a YAML mapping")
        shutil.copyfile(source, exp / "train_config.yaml")  # the job reads the copy: later edits don't leak in
        output_dir = config.get("output_dir") or str(exp / "checkpoints")
        overrides = [] if config.get("output_dir") else [f"output_dir={output_dir}"]
        if request.model:
            overrides.insert(0, Shell('"model_name_or_path=$HPCSTAGE_MODEL"'))
        argv = [*(_split(request.train_command) or DEFAULT_TRAIN_COMMAND), str(exp / "train_config.yaml"),
                *overrides, *_split(request.train_extra_args)]
        jobs = [Job("train", f"train: {source.name} on {nodes} node(s)", nodes,
                    **_resources(request, cluster, cluster.gpus_per_node),
                    context={"train_argv": argv, "master_port": MASTER_PORT})]
        if request.eval_tasks:
            jobs.append(_eval_job(request, cluster, exp, output_dir, "train"))
        return jobs
    if kind == "eval":
        if not request.eval_tasks or not request.model:
            raise BadInput("--job-type eval needs --model and --eval-tasks")
        return [_eval_job(request, cluster, exp, Shell('"$HPCSTAGE_MODEL"'), None)]
    if kind == "datagen":
        script = _existing_file(request.datagen_script, "--datagen-script")
        argv = [PYTHON, str(script)]
        argv += ["--engine", request.datagen_engine] if request.datagen_engine else []
        argv += _split(request.datagen_extra_args)
        context: dict[str, Any] = {"datagen_argv": argv, "chunk_map": None}
        array = None
        if (request.trace_input_path is None) != (request.chunk_size is None):
            raise BadInput("--trace-input-path and --chunk-size go together")
        if request.trace_input_path is not None:
            array, context["chunk_map"] = _chunk_map(request, exp)
        return [Job("datagen", f"datagen: {script.name}", nodes, **_resources(request, cluster, cluster.gpus_per_node),
                    context=context, array=array)]
    if kind == "consolidate":
        if request.checkpoint_dir is None:
            raise BadInput("--job-type consolidate needs --checkpoint-dir")
        ckpt = Path(request.checkpoint_dir).expanduser().resolve()
        return [Job("consolidate", f"consolidate: ZeRO shards of {ckpt.name} to fp32", 1,
                    **_resources(request, cluster, 0),
                    context={"checkpoint_dir": str(ckpt), "output_dir": str(ckpt / "fp32")})]
    if kind == "run":
        if not request.command:
            raise BadInput('--job-type run needs --command "..."')
        return [Job("run", "run: a command", nodes, **_resources(request, cluster, 0),
                    context={"command": request.command})]
    raise BadInput(f"unknown job type {kind!r}; choose one of {', '.join(JOB_TYPES)}")


def _chunk_map(request: LaunchRequest, exp: Path) -> tuple[str, str]:
    """Split the task folders into chunks listed in chunk_map.json (folders are never copied or moved)."""
    root = Path(request.trace_input_path).expanduser().resolve()
    if not root.is_dir():
        raise BadInput(f"--trace-input-path {root}: no such folder")
    folders = sorted(str(p) for p in root.iterdir() if p.is_dir())
    if not folders:
        raise BadInput(f"--trace-input-path {root} has no task folders")
    size = request.chunk_size
    chunks = [folders[i:i + size] for i in range(0, len(folders), size)]
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
    for name in ("num_nodes", "cpus_per_task", "chunk_size", "max_parallel"):
        value = getattr(request, name)
        if value is not None and value < 1:  # 0 would otherwise mean "the default" without a word
            raise BadInput(f"--{name.replace('_', '-')} must be at least 1 (got {value})")
    if request.max_restarts < 0:
        raise BadInput("--max-restarts must be 0 or more")
    for job_id in request.after:
        if not re.fullmatch(r"\d+(_\d+)?", job_id):
            raise BadInput(f"--after {job_id!r} is not a Slurm job id")
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


def _job_env(artifacts: list[Artifact], offline: bool, manifest, request: LaunchRequest) -> dict[str, str]:
    from huggingface_hub.file_download import repo_folder_name

    from hpcstage import offline as offline_env

    env: dict[str, str] = {}
    hf = offline_env.env(manifest, cache_dir=request.cache_dir)
    if offline:
        env.update(hf)
    elif request.cache_dir or (manifest is not None and manifest.cache_dir):
        env["HF_HUB_CACHE"] = hf["HF_HUB_CACHE"]
    for role in ("model", "dataset"):
        chosen = getattr(request, role)
        candidates = [a for a in artifacts if a.role == role and (chosen is None or a.source == chosen)]
        if chosen or len(candidates) == 1:
            a = candidates[0]
            folder = repo_folder_name(repo_id=a.source, repo_type=a.repo_type) if a.repo_type else ""
            env[f"HPCSTAGE_{role.upper()}"] = a.env_value(folder)
    return env


def _dependency(job: Job, by_key: dict[str, Job], symbolic: bool) -> str | None:
    if job.after_job:
        target = by_key[job.after_job]
        ids = ["{%s#%d}" % (target.key, n) for n in range(target.restarts + 1)] if symbolic else target.ids
        return "?".join(f"afterok:{i}" for i in ids)
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
    offline = (not cluster.internet) if request.offline is None else request.offline
    manifest = load_manifest(request.manifest) if request.manifest else None
    artifacts = _artifacts(request, manifest)
    exp, fresh = _experiment_dir(request)
    try:
        return _launch_into(request, cluster, offline, manifest, artifacts, exp)
    except BadInput:
        if fresh:  # refused: leave nothing behind
            shutil.rmtree(exp, ignore_errors=True)
        raise


def _launch_into(request: LaunchRequest, cluster: Cluster, offline: bool, manifest, artifacts: list[Artifact],
                 exp: Path) -> Launch:
    from hpcstage import offline as offline_env

    cache_dir = Path(offline_env.env(manifest, cache_dir=request.cache_dir)["HF_HUB_CACHE"])
    _stage(request, artifacts, manifest, offline, cache_dir)
    env = _job_env(artifacts, offline, manifest, request)
    python, check_python = _job_python(request, manifest, cluster)
    if offline and not request.dry_run:
        _prebuild_and_check(artifacts, manifest, cache_dir, check_python)

    jobs = build_jobs(request, cluster, exp)
    jobs[0].after = list(request.after)
    jobs[0].restarts = request.max_restarts
    for job in jobs:
        name = f"{exp.name}-{job.key}"
        output = str(exp / "logs" / ("%x-%A_%a.out" if job.array else "%x-%j.out"))
        directives = sbatch_directives(cluster, name=name, nodes=job.nodes, gpus=job.gpus, cpus=job.cpus,
                                       time_limit=job.time_limit, output=output, array=job.array)
        context = {
            "job": {"key": job.key, "name": name, "description": job.description, "nodes": job.nodes,
                    "gpus": job.gpus, "cpus": job.cpus, "time_limit": job.time_limit, "array": job.array,
                    "directives": directives},
            "cluster": cluster,
            "experiment_dir": str(exp),
            "python": python,
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

    result = Launch(exp, cluster, offline, request.dry_run, artifacts, jobs, env)
    by_key = {job.key: job for job in jobs}
    if request.dry_run:
        for job in jobs:
            dependency = _dependency(job, by_key, symbolic=True)
            job.sbatch = [_sbatch_args(job, n, dependency, "{%s#%d}" % (job.key, n - 1))
                          for n in range(job.restarts + 1)]
    else:
        _submit_all(jobs, by_key, offline, exp)
    _write_records(result, request)
    return result


def _submit_all(jobs: list[Job], by_key: dict[str, Job], offline: bool, exp: Path) -> None:
    sbatch_env = dict(os.environ)
    if offline:
        for name in TOKEN_VARIABLES:
            sbatch_env.pop(name, None)
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
    jobs = {"experiment": exp.name, "cluster": result.cluster.name, "dry_run": result.dry_run,
            "jobs": result.records()}
    _write_json(exp / "jobs.json", jobs)
    config = {
        "hpcstage": __version__,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "request": {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(request).items()},
        "cluster": result.cluster.model_dump(),
        "offline": result.offline,
        "artifacts": [asdict(a) for a in result.artifacts],
        "env": dict(result.env),
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
        mine = sorted((s for s in states.values()
                       if job_id and (s.job_id == job_id or s.job_id.startswith(f"{job_id}_"))),
                      key=lambda s: (len(s.job_id), s.job_id))
        base = {"key": r["key"], "attempt": r["attempt"]}
        if not job_id:
            rows.append({**base, "job_id": None, "state": "NOT SUBMITTED (dry run)", "reason": None, "exit_code": None})
        elif not mine:
            rows.append({**base, "job_id": job_id, "state": "UNKNOWN", "reason": "forgotten by Slurm",
                         "exit_code": None})
        for s in mine:
            rows.append({**base, "job_id": s.job_id, "state": s.state, "reason": s.reason, "exit_code": s.exit_code})
    return rows
