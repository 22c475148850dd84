"""Every name hpcstage gives things on disk, in one place, so that the writer, status, verify and cleanup
agree on them (they are a contract with earlier runs and other nodes: change none without a migration).

In the hub cache (`<cache>`, huggingface_hub's layout, FACTS.md):

    <type>s--org--name/                            a repo, as huggingface_hub's `repo_folder_name` spells it
    <repo>/blobs/<etag>.hpcstage-partial           a large blob being fetched in place
    <repo>/blobs/<etag>.hpcstage-partial.ranges    its resume record: the pieces done (format below)
    <repo>/blobs/<etag>.hpcstage-lease             the lease of whoever fetches that blob
    .locks/hpcstage/ledger/<type>s--org--name@<revision>.json   the last pull's record of a repo@revision
    .locks/hpcstage/batches/<name>.hpcstage-lease  array workers' leases on batches of small files
    .locks/hpcstage/xet/<xet hash>.hpcstage-lease  the lease on a shared Xet blob store entry

Everything of ours sits inside huggingface_hub's own `.locks/` (which `scan_cache_dir` skips) or beside a
blob under a `.hpcstage-*` name no other tool uses. Data folders (datadir.py) keep their state in
`<data_dir>/.hpcstage/`; the datasets Arrow cache (arrowcache.py) in `.hpcstage-locks/` and
`.hpcstage-prebuild/`. Which leftovers of a dead run each owner may remove is its own module's to say
(`cleanup` asks them); the names are here.
"""

from __future__ import annotations

import json
from pathlib import Path
from urllib.parse import quote, unquote

# Leases (locks.py) are renewed every TTL/3 and broken by others only after TTL without a beat.
LEASE_TTL = 60.0

PARTIAL_SUFFIX = ".hpcstage-partial"
LEASE_SUFFIX = ".hpcstage-lease"
RANGES_SUFFIX = ".ranges"  # after the partial's own name: `<etag>.hpcstage-partial.ranges`
TMP_SUFFIX = ".hpcstage-tmp"  # `.<name>.<random>.hpcstage-tmp`: a file written whole, then renamed (safefs)

OUR_LOCKS = Path(".locks") / "hpcstage"  # inside huggingface_hub's .locks: scan_cache_dir skips it
LEDGER_DIR = OUR_LOCKS / "ledger"
BATCH_LEASES = OUR_LOCKS / "batches"
XET_LEASES = OUR_LOCKS / "xet"

DATA_STATE = ".hpcstage"  # <data_dir>/.hpcstage/{downloads,locks,staged}
BUILD_SUFFIX = ".hpcstage-build"  # `.<dest>.<random>.hpcstage-build/`: a data folder being built
OLD_SUFFIX = ".hpcstage-old"  # `.<dest>.<random>.hpcstage-old/`: the folder a rebuild replaced

ARROW_LOCK_DIR = ".hpcstage-locks"  # <datasets cache>/.hpcstage-locks/<key>.lease
ARROW_LEASE_SUFFIX = ".lease"
ARROW_MARKER_DIR = ".hpcstage-prebuild"

_REPO_TYPES = ("model", "dataset")


def repo_folder_name(repo_type: str, repo_id: str) -> str:
    """`models--org--name`, as huggingface_hub's `repo_folder_name` spells it."""
    return "--".join([f"{repo_type}s", *repo_id.split("/")])


def repo_of_folder(name: str) -> tuple[str, str] | None:
    """(repo_type, repo_id) of a model or dataset repo folder's name; None for any other name."""
    kind, sep, rest = name.partition("s--")
    if not sep or kind not in _REPO_TYPES or not rest:
        return None
    return kind, rest.replace("--", "/")


def ledger_name(repo_type: str, repo_id: str, revision: str) -> str:
    """The ledger record's file name of repo@revision (the revision quoted: a branch may hold `/`)."""
    return f"{repo_folder_name(repo_type, repo_id)}@{quote(revision, safe='')}.json"


def artifact_of_ledger_name(name: str) -> tuple[str, str, str] | None:
    """(repo_type, repo_id, revision) from a ledger record's file name, when it has that form."""
    head, sep, revision = name.removesuffix(".json").partition("@")
    kind, sep2, rest = head.partition("s--")
    if not (sep and sep2) or kind not in _REPO_TYPES or "--" not in rest:
        return None
    return kind, rest.replace("--", "/", 1), unquote(revision)


def ranges_record(partial_name: str) -> str:
    """The resume record's name beside a partial file."""
    return partial_name + RANGES_SUFFIX


def ranges_payload(size: int, segment: int, done: list[int]) -> bytes:
    """The resume record transfer/ranged.py writes: the file's size, the piece size, and the pieces complete."""
    return json.dumps({"size": size, "segment": segment, "done": done}).encode()


def partial_progress(partial: Path) -> tuple[int, int]:
    """(bytes done, size) of a partial file, from its resume record; (0, 0) when there is none."""
    try:
        data = json.loads(partial.with_name(ranges_record(partial.name)).read_text())
        size, segment = int(data["size"]), int(data["segment"])
        return sum(min(size, (i + 1) * segment) - i * segment for i in data["done"]), size
    except (OSError, ValueError, KeyError, TypeError):
        return 0, 0


def pieces_done(record: Path) -> int:
    """Pieces a resume record lists as complete (0 while there is none or it is unreadable)."""
    try:
        return len(json.loads(record.read_text())["done"])
    except (OSError, ValueError, KeyError, TypeError):
        return 0
