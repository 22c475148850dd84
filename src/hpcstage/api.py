"""The library calls: one per step of the flow, keyword-only, typed, silent unless asked.

A thin layer over the modules the CLI uses (staging, verify, prebuild, offline, slurm.launch): the same
work and the same typed errors (`hpcstage.errors`), but values returned instead of lines printed, no
progress bars (pass `progress=` to follow a pull), and paths or manifest files accepted where the CLI
takes `-f`. Shaped like huggingface_hub's `snapshot_download`: `stage` returns the snapshot folder.
"""

from __future__ import annotations

import difflib
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from hpcstage.errors import BadInput

if TYPE_CHECKING:
    from hpcstage.arrowcache import PrebuildSummary
    from hpcstage.hub.pull import PullSummary
    from hpcstage.manifest import Manifest
    from hpcstage.offline import CheckReport
    from hpcstage.options import Options
    from hpcstage.progress import ProgressCallback
    from hpcstage.slurm.launch import Launch
    from hpcstage.verification import VerifyReport

PathLike = str | os.PathLike


def _manifest(manifest: PathLike | Manifest) -> Manifest:
    from hpcstage.manifest import Manifest, load_manifest

    return manifest if isinstance(manifest, Manifest) else load_manifest(Path(manifest))


def _patterns(value: str | Sequence[str] | None, name: str) -> list[str] | None:
    if value is None:
        return None
    if isinstance(value, str):
        return [value]
    if not all(isinstance(v, str) for v in value):
        raise BadInput(f"{name}: give a glob or a list of globs, e.g. {name}=['*.json']")
    return list(value)


def stage(
    repo_id: str,
    *,
    repo_type: str = "model",
    revision: str = "main",
    include: str | Sequence[str] | None = None,
    exclude: str | Sequence[str] | None = None,
    cache_dir: PathLike | None = None,
    token: str | None = None,
    workers: int = 8,
    progress: ProgressCallback | None = None,
) -> Path:
    """Stage one Hub repo into the standard hub cache and return its snapshot folder.

    The same pull as `hpcstage pull REPO_ID`: hash-checked, resumable, safe with other processes and nodes
    staging into the same cache; files already in place cost nothing. The folder then loads offline with
    huggingface_hub (`snapshot_download(repo_id, local_files_only=True)` with the same patterns) and
    transformers (`from_pretrained(<folder>)`).

    Args:
        repo_id: `ORG/NAME`.
        repo_type: "model" or "dataset".
        revision: branch, tag or 40-hex commit; a branch or tag gets its `refs/` file.
        include: glob(s) of the files to stage (default: every file).
        exclude: glob(s) of files to leave out.
        cache_dir: the hub cache (default: `HF_HUB_CACHE`, else `HF_HOME/hub`, read now).
        token: Hub token (default: `HF_TOKEN`, else the token file); sent only to `HF_ENDPOINT`.
        workers: files fetched at once.
        progress: called as `progress(bytes_done, bytes_total, files_done, files_total)` from worker
            threads as bytes arrive, and once at the end (also when nothing needed fetching).

    Returns:
        The snapshot folder, `<cache_dir>/<models|datasets>--ORG--NAME/snapshots/<commit>`.

    Raises:
        BadInput: a malformed repo id, revision or pattern, `workers` < 1, a cache path that is a file,
            `HF_HUB_OFFLINE=1` (a branch or tag is resolved on the Hub each time, and files are fetched; a
            manifest's lockfile lets `stage_manifest` run warm offline); before any request.
        RepoNotFound, RevisionNotFound, GatedRepo, InvalidToken, DisabledRepo: the Hub refused the repo
            (`err.repo`, `err.status`, `err.hint` say which and what to do).
        TransferError: files failed after retries (`HashMismatch`: wrong bytes, discarded; `ProxyError`);
            finished files are kept and the same call continues the rest.
    """
    from hpcstage.hub.pull import pull
    from hpcstage.manifest import hub_entry

    if workers < 1:
        raise BadInput(f"workers={workers}: at least 1 file at a time")
    entry = hub_entry(
        repo=repo_id,
        repo_type=repo_type,
        revision=revision,
        include=_patterns(include, "include"),
        exclude=_patterns(exclude, "exclude"),
    )
    opts = _silent_options(cache_dir, workers, token, progress)
    summary, _ = pull([entry], opts)
    return Path(os.path.abspath(summary.repos[0].snapshot))


def stage_manifest(
    path: PathLike,
    *,
    update: bool | Sequence[str] = False,
    cache_dir: PathLike | None = None,
    token: str | None = None,
    workers: int = 8,
    progress: ProgressCallback | None = None,
) -> PullSummary:
    """Stage every entry of a manifest (`hpcstage pull -f PATH`) and write `hpcstage.lock` beside it.

    Hub repos come first (commits pinned by the lockfile, so a warm call sends no request), then the
    `url:`, `local:` and `repo:`+`file:` data entries, each recorded once staged and its `expect:` met.

    Args:
        path: the manifest (hpcstage.yaml).
        update: True re-resolves every branch and asks `url:` sources whether they changed; names (repo ids,
            data `dest`s or URLs) do it for those entries only.
        cache_dir: the hub cache (default: the manifest's `cache_dir:`, else HF rules).
        token: Hub token (default: `HF_TOKEN`, else the token file).
        workers: files fetched at once.
        progress: as for `stage`, for the Hub repos' files.

    Returns:
        A `PullSummary`: `repos` (each with its `snapshot` folder and `commit`), `files`, `bytes`,
        `downloaded_files`, `downloaded_bytes`, `seconds`.

    Raises:
        ManifestError (a `BadInput`): the manifest's `file:line`, the key and the fix.
        PolicyError (a `BadInput`): a repo the allowlist refuses, before any request.
        RepoRefused subclasses, TransferError: as for `stage`; the error's `summary` says what did get staged.
    """
    from hpcstage.options import entry_names
    from hpcstage.staging import pull_manifest

    if workers < 1:
        raise BadInput(f"workers={workers}: at least 1 file at a time")
    manifest = _manifest(path)
    if not manifest.entries and not manifest.data_entries:
        raise BadInput(
            f"{path} lists no models: or datasets: entries, so there is nothing to stage; add entries "
            "(see the Manifest section of the README)"
        )
    if not isinstance(update, bool):
        names = [update] if isinstance(update, str) else list(update)
        known = {n for e in [*manifest.entries, *manifest.data_entries] for n in entry_names(e)}
        unknown = [n for n in names if n not in known]
        if unknown:
            raise BadInput(f"update={unknown[0]!r}: no such entry in {path}; name one of {', '.join(sorted(known))}")
        update = names
    opts = _silent_options(cache_dir, workers, token, progress)
    return pull_manifest(manifest, opts, update=update)


def verify(
    repo_id: str | None = None,
    *,
    manifest: PathLike | None = None,
    repo_type: str | None = None,
    revision: str | None = None,
    cache_dir: PathLike | None = None,
    workers: int | None = None,
    repair: bool = False,
    token: str | None = None,
) -> VerifyReport:
    """Hash staged files offline against the lockfile (with `manifest`) or `trees/<commit>.json`.

    Args:
        repo_id: one repo (all its snapshots, or the one `revision` names); with neither this nor
            `manifest`, every model and dataset repo in the cache.
        manifest: check that manifest's entries against the `hpcstage.lock` beside it (data entries too).
        repo_type: "model" or "dataset" (default: model for `repo_id`, both for the whole cache).
        revision: branch, tag or commit of `repo_id`.
        cache_dir: the hub cache (default: the manifest's, else HF rules).
        workers: threads hashing large files (default: CPUs + 2, at most 32).
        repair: delete what is bad, fetch exactly those files again (the only network use), verify again.
        token: Hub token for the repair's fetches (default: `HF_TOKEN`, else the token file).

    Returns:
        A `VerifyReport`: `ok`, `problems` (each with `kind`, `repo_id`, `commit`, `path`, `where`, and a
        `detail` naming the fix), `repaired`, and counts (`files`, `blobs_hashed`, `bytes_hashed`, `seconds`).
        Problems are findings, not exceptions.

    Raises:
        BadInput: `revision` without `repo_id`, both `repo_id` and `manifest`, a bad repo id or
            revision, no hub cache at `cache_dir`, a malformed manifest.
        HpcstageError: the cache cannot be read (permission denied), or a repair's pull failed.
    """
    from hpcstage.verification import verify as run

    options = None
    if repair:  # staging (pydantic, the network code) only for a repair
        from hpcstage.options import Options

        options = Options(token=token)
    return run(
        [repo_id] if repo_id is not None else None,
        manifest=_manifest(manifest) if manifest else None,
        repo_type=repo_type,
        revision=revision,
        cache_dir=Path(cache_dir) if cache_dir else None,
        workers=workers,
        repair=repair,
        quiet=True,
        options=options,
    )


def prebuild(
    manifest: PathLike,
    *,
    python: PathLike | None = None,
    cache_dir: PathLike | None = None,
    datasets_cache_dir: PathLike | None = None,
    force: bool = False,
    on_event: Callable[[str, str], None] | None = None,
) -> PrebuildSummary:
    """Build the `datasets` Arrow caches the manifest's `load:` and `prebuild:` entries name, once each, in
    the jobs' interpreter, and prove each by loading it again offline (`hpcstage prebuild -f`).

    Args:
        manifest: the manifest (hpcstage.yaml).
        python: the jobs' interpreter (default: the manifest's `python:`, else HPCSTAGE_PYTHON, else this one).
        cache_dir: the hub cache (default: the manifest's, else HF rules).
        datasets_cache_dir: the Arrow cache (default: the manifest's, else HF_DATASETS_CACHE rules).
        force: build and prove again where a finished build is recorded.
        on_event: called as `on_event(kind, text)`; kind is "start", "stack", "built", "skipped",
            "missing" or "failed".

    Returns:
        A `PrebuildSummary`: `ok`, `results` (each with `label`, `status` built/skipped/missing/failed,
        `error`, `cache_dir`), `warnings`, `stack` (the interpreter's versions).

    Raises:
        BadInput: a malformed manifest; an interpreter that does not run or has no `datasets`.
    """
    from hpcstage.arrowcache import builds_from_manifest
    from hpcstage.arrowcache import prebuild as run

    m = _manifest(manifest)
    return run(
        builds_from_manifest(m),
        manifest=m,
        python=python,
        cache_dir=Path(cache_dir) if cache_dir else None,
        datasets_cache_dir=Path(datasets_cache_dir) if datasets_cache_dir else None,
        on_event=on_event,
        force=force,
    )


def check_offline(
    manifest: PathLike,
    *,
    python: PathLike | None = None,
    cache_dir: PathLike | None = None,
    datasets_cache_dir: PathLike | None = None,
) -> CheckReport:
    """Load every entry of the manifest as a job would, in a child of the jobs' interpreter with the offline
    flags set and the network off (`hpcstage check -f`).

    Args:
        manifest: the manifest (hpcstage.yaml).
        python: the jobs' interpreter (default: the manifest's `python:`, else HPCSTAGE_PYTHON, else this one).
        cache_dir: the hub cache (default: the manifest's, else HF rules).
        datasets_cache_dir: the Arrow cache (default: the manifest's, else HF_DATASETS_CACHE rules).

    Returns:
        A `CheckReport`: `ok`, `entries` (each with `entry`, `ok`, `problems` and the `fix` command),
        `isolation` (how the network was off), `stack` (the interpreter's versions).

    Raises:
        BadInput: a malformed manifest; an interpreter that does not run or has no `datasets`.
        HpcstageError: the check's child process itself could not run.
    """
    from hpcstage.offline import check

    return check(
        _manifest(manifest),
        python=python,
        cache_dir=Path(cache_dir) if cache_dir else None,
        datasets_cache_dir=Path(datasets_cache_dir) if datasets_cache_dir else None,
    )


def job_env(
    manifest: PathLike | None = None,
    *,
    cache_dir: PathLike | None = None,
    datasets_cache_dir: PathLike | None = None,
) -> dict[str, str]:
    """The variables an offline job needs: `HF_HUB_OFFLINE=1`, `HF_DATASETS_OFFLINE=1`,
    `TRANSFORMERS_OFFLINE=1`, absolute `HF_HUB_CACHE` and `HF_DATASETS_CACHE` (and `HPCSTAGE_DATA_DIR`
    when the manifest has data entries). Add them to the job's environment: `{**os.environ, **job_env(m)}`.

    Args:
        manifest: take the cache folders from this manifest.
        cache_dir: the hub cache (default: the manifest's, else HF rules, read now).
        datasets_cache_dir: the Arrow cache (default: the manifest's, else HF_DATASETS_CACHE rules).

    Returns:
        Variable name to value; nothing is read from or written to disk but the manifest.

    Raises:
        BadInput: a malformed manifest.
    """
    from hpcstage.offline import env

    return env(
        _manifest(manifest) if manifest else None,
        cache_dir=Path(cache_dir) if cache_dir else None,
        datasets_cache_dir=Path(datasets_cache_dir) if datasets_cache_dir else None,
    )


def launch(job_type: str, *, dry_run: bool = False, **options: Any) -> Launch:
    """Stage what the job names, render its script from the cluster registry, record it and submit it with
    `sbatch` (`hpcstage launch`); silent (the CLI prints the result).

    Args:
        job_type: "train", "datagen", "consolidate", "eval" or "run".
        dry_run: write and return everything, stage and submit nothing.
        **options: the CLI's flags with `_` for `-` (`hpcstage.slurm.launch.option_names()`),
            e.g. `cluster="local", partition="debug", command="python train.py", time_limit="00:10:00",
            experiments_dir="experiments", manifest="hpcstage.yaml"`.

    Returns:
        A `Launch`: `experiment_dir`, `jobs` (each with `key`, `ids` (Slurm job ids), `script`), `env`,
        `warnings`.

    Raises:
        BadInput: an unknown option (the nearest valid one named), options of another job type, a time
            limit over the partition's, a missing account, GPUs or CPUs the partition lacks; nothing is
            written or submitted.
        SlurmError: `sbatch` refused a job (nothing of this launch is left queued).
        HpcstageError: staging or the offline check failed.
    """
    from hpcstage.slurm.launch import launch as run
    from hpcstage.slurm.launch import make_request, option_names

    valid = option_names() - {"dry_run", "quiet"}
    for name in options:
        if name not in valid:
            near = difflib.get_close_matches(name, sorted(valid), n=1)
            hint = f"did you mean {near[0]!r}?" if near else f"valid options: {', '.join(sorted(valid))}"
            raise BadInput(f"launch: unknown option {name!r}; {hint}", hint=hint)
    for name in (
        "experiments_dir",
        "manifest",
        "templates",
        "cache_dir",
        "train_config",
        "datagen_script",
        "trace_input_path",
        "checkpoint_dir",
    ):
        if options.get(name) is not None:
            options[name] = Path(options[name])
    if isinstance(options.get("after"), str):
        options["after"] = [options["after"]]
    return run(make_request(job_type, dry_run=dry_run, quiet=True, **options))


def _silent_options(
    cache_dir: PathLike | None, workers: int, token: str | None, progress: ProgressCallback | None
) -> Options:
    """The pull options of a library call: no bars or lines of its own (progress goes to the callback)."""
    from hpcstage.options import Options

    return Options(
        cache_dir=Path(cache_dir) if cache_dir is not None else None,
        workers=workers,
        token=token,
        quiet=True,
        progress=progress,
    )
