"""hpcstage: stage Hugging Face models and datasets for offline HPC jobs.

The public API, one call per step of the flow (each imported on first use, so `import hpcstage` and
the CLI start fast; `verify` and `prebuild` are the modules of the same name):

    pull_manifest(manifest, opts)  /  pull(entries, opts)      stage into the hub cache
    verify.verify(...)                                         offline hashes; repair
    prebuild.prebuild(builds, ...)                             datasets Arrow caches
    check(manifest)                                            offline readiness
    launch(LaunchRequest(...))                                 render and submit Slurm jobs
    load_manifest(path), env(manifest)                         the manifest; a job's environment
"""
from importlib import import_module

__version__ = "0.1.0"

_API = {
    "pull": "hpcstage.staging",
    "pull_manifest": "hpcstage.staging",
    "plan_manifest": "hpcstage.staging",
    "Options": "hpcstage.staging",
    "check": "hpcstage.offline",
    "env": "hpcstage.offline",
    "launch": "hpcstage.slurm.launch",
    "LaunchRequest": "hpcstage.slurm.launch",
    "load_manifest": "hpcstage.manifest",
    # the error family (hpcstage.errors): fields repo, path, status, hint
    **{name: "hpcstage.errors" for name in (
        "HpcstageError", "BadInput", "HubError", "RepoRefused", "GatedRepo", "InvalidToken", "DisabledRepo",
        "RepoNotFound", "RevisionNotFound", "EntryNotFound", "TransferError", "HashMismatch", "ProxyError")},
    "SlurmError": "hpcstage.slurm",
}
__all__ = sorted(_API)


def __getattr__(name: str):
    if name in _API:
        return getattr(import_module(_API[name]), name)
    raise AttributeError(f"module 'hpcstage' has no attribute {name!r}")
