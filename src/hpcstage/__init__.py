"""hpcstage: stage Hugging Face models and datasets for offline HPC jobs.

The library API (hpcstage.api), one call per step of the flow; keyword-only, silent, typed errors:

    stage(repo_id, *, repo_type, revision, include, exclude, cache_dir, token, workers, progress) -> Path
    stage_manifest(path, *, update=False, ...) -> PullSummary         every entry; writes hpcstage.lock
    verify(repo_id=None, *, manifest=None, repair=False, ...) -> VerifyReport      offline hashes
    prebuild(manifest, *, python=None, ...) -> PrebuildSummary        datasets Arrow caches, proven offline
    check_offline(manifest, *, python=None, ...) -> CheckReport       load everything with the network off
    job_env(manifest=None, *, cache_dir=None, ...) -> dict            the variables an offline job needs
    launch(job_type, *, dry_run=False, **options) -> Launch           render and submit Slurm jobs

Errors are `HpcstageError` subclasses with the fields `repo`, `path`, `status` and `hint`. Each name is
imported on first use, so `import hpcstage` stays cheap (no huggingface_hub, pydantic or rich).
"""

from __future__ import annotations

from importlib import import_module

TYPE_CHECKING = False  # typing.TYPE_CHECKING without importing typing (mypy and pyright read this name as True)

__version__ = "0.1.0"

if TYPE_CHECKING:  # what type checkers and editors see; at run time `__getattr__` imports on first use
    # ruff: noqa: F401  (re-exported: __all__ is built from _API below)
    from hpcstage.api import check_offline, job_env, launch, prebuild, stage, stage_manifest, verify
    from hpcstage.arrowcache import PrebuildSummary
    from hpcstage.errors import (
        BadInput,
        DisabledRepo,
        EntryNotFound,
        GatedRepo,
        HashMismatch,
        HpcstageError,
        HubError,
        InvalidToken,
        ManifestError,
        PolicyError,
        ProxyError,
        RepoNotFound,
        RepoRefused,
        RevisionNotFound,
        TransferError,
    )
    from hpcstage.hub.pull import PullSummary
    from hpcstage.offline import CheckReport
    from hpcstage.slurm import SlurmError
    from hpcstage.slurm.clusters import RegistryError
    from hpcstage.slurm.launch import Launch
    from hpcstage.verification import VerifyReport

_API = {
    **{
        name: "hpcstage.api"
        for name in ("stage", "stage_manifest", "verify", "prebuild", "check_offline", "job_env", "launch")
    },
    # what the calls return
    "PullSummary": "hpcstage.hub.pull",
    "VerifyReport": "hpcstage.verification",
    "PrebuildSummary": "hpcstage.arrowcache",
    "CheckReport": "hpcstage.offline",
    "Launch": "hpcstage.slurm.launch",
    # the error family (hpcstage.errors): fields repo, path, status, hint
    **{
        name: "hpcstage.errors"
        for name in (
            "HpcstageError",
            "BadInput",
            "ManifestError",
            "PolicyError",
            "HubError",
            "RepoRefused",
            "GatedRepo",
            "InvalidToken",
            "DisabledRepo",
            "RepoNotFound",
            "RevisionNotFound",
            "EntryNotFound",
            "TransferError",
            "HashMismatch",
            "ProxyError",
        )
    },
    "SlurmError": "hpcstage.slurm",
    "RegistryError": "hpcstage.slurm.clusters",
}
__all__ = sorted(_API)


def __getattr__(name: str):
    if name in _API:
        return getattr(import_module(_API[name]), name)
    raise AttributeError(f"module 'hpcstage' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted([*globals(), *_API])
