"""What a launch's jobs name (models and datasets: the manifest's, --model, --dataset, eval task data) and where
each job finds them: staged into the Hub cache on the login node when compute nodes are offline, then prebuilt
and checked to load with the network off; online, named by repo id and fetched by the job."""

from __future__ import annotations

import os
import shlex
from dataclasses import dataclass
from pathlib import Path

from hpcstage import policy
from hpcstage.errors import BadInput, HpcstageError
from hpcstage.slurm import LaunchError
from hpcstage.slurm.render import Shell
from hpcstage.slurm.request import LaunchRequest


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


def is_local(value: str) -> bool:
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


def artifacts_of(request: LaunchRequest, manifest, model: str | None) -> list[Artifact]:
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
        if is_local(value):
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


def stage(request: LaunchRequest, artifacts: list[Artifact], manifest, offline: bool, cache_dir: Path) -> None:
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
    from hpcstage.hub.pull import pull
    from hpcstage.manifest import hub_entry
    from hpcstage.options import Options
    from hpcstage.staging import manifest_options, pull_manifest

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


def prebuild_and_check(artifacts: list[Artifact], manifest, cache_dir: Path, python: str | None = None) -> None:
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


def job_env(
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
