"""What a caller chooses for a pull (`Options`), which entries `--update` re-resolves, and the environment's
one veto (HF_HUB_OFFLINE). Its own module because every stager reads it: Hub entries (hub/), data entries
(datadir.py), `verify --repair`, the CLI, the library API and Slurm array workers.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

from hpcstage.errors import BadInput
from hpcstage.manifest import Update
from hpcstage.progress import ProgressCallback
from hpcstage.transfer import MAX_CONNECTIONS, RetryPolicy


@dataclass(frozen=True)
class Options:
    """What a caller chooses for a pull. Frozen: a manifest's settings or a repair come in as a changed copy
    (`dataclasses.replace`), never written into the caller's object."""

    cache_dir: Path | None = None
    workers: int = 8
    max_connections: int = MAX_CONNECTIONS  # range requests at once for all large files (transfer.Streams)
    token: str | None = None
    timeout: float = 30.0
    retry: RetryPolicy = field(default_factory=RetryPolicy)
    quiet: bool = False
    allow: list[str] | None = None
    shared_group: str | None = None  # a group-shared cache: setgid folders, group-readable files
    manifest_path: Path | None = None  # entries come from this manifest: hints name its keys, not flags
    progress: ProgressCallback | None = None  # the library's callback (bytes, total bytes, files, total files)


def entry_names(entry) -> set[str]:
    """What `--update NAME` may call an entry: its repo id, its lockfile key, a data entry's dest or source."""
    names = {entry.key, getattr(entry, "repo", None), getattr(entry, "dest", None), getattr(entry, "source", None)}
    return {n for n in names if n}


def wants_update(update: Update, entry) -> bool:
    """`update` is True/False (every entry or none) or the names given to `--update NAME`."""
    if isinstance(update, bool) or update is None:
        return bool(update)
    return bool(entry_names(entry) & set(update))


def refuse_offline() -> None:
    """huggingface_hub refuses to use the network with HF_HUB_OFFLINE=1 set; so does pull (a warm pull,
    which needs no request, still works)."""
    value = os.environ.get("HF_HUB_OFFLINE", "")
    if value.strip().upper() in ("1", "ON", "YES", "TRUE"):
        raise BadInput(
            f"HF_HUB_OFFLINE={value} is set, so pull does not use the network (as huggingface_hub); "
            "`unset HF_HUB_OFFLINE`, then run the same command again"
        )
