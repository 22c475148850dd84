"""The offline environment a job needs, computed explicitly for a child process.

huggingface_hub, datasets and transformers read their HF_* variables at import time, so setting them in
a running interpreter is too late; jobs and `check` get them in their environment from here.
"""
from __future__ import annotations

from pathlib import Path

from hpcstage.hfcache import default_cache_dir, default_datasets_cache_dir
from hpcstage.manifest import Manifest

OFFLINE_FLAGS = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
QUIET_FLAGS = {"HF_HUB_DISABLE_TELEMETRY": "1", "HF_UPDATE_DOWNLOAD_COUNTS": "0", "HF_HUB_DISABLE_UPDATE_CHECK": "1"}


def env(manifest: Manifest | None = None, *, cache_dir: Path | None = None,
        datasets_cache_dir: Path | None = None) -> dict[str, str]:
    """Offline flags plus absolute cache paths: explicit arguments, else the manifest's, else HF rules."""
    hub = cache_dir or (manifest.cache_dir if manifest else None) or default_cache_dir()
    ds = datasets_cache_dir or (manifest.datasets_cache_dir if manifest else None) or default_datasets_cache_dir()
    return {
        **OFFLINE_FLAGS,
        **QUIET_FLAGS,
        "HF_HUB_CACHE": str(Path(hub).resolve()),
        "HF_DATASETS_CACHE": str(Path(ds).resolve()),
    }
