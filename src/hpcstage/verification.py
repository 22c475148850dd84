"""`verify`: prove, offline, that every staged file holds the bytes the lockfile or `trees/<commit>.json` name.

What is expected comes from the lockfile beside a manifest (`hpcstage.lock`: the files each entry needs)
and from `trees/<commit>.json` (the full listing hpcstage, `hf download` and `snapshot_download` write).
LFS files are checked by sha256, the others by their git blob sha1 (`sha1(b"blob <size>\\0" + content)`).

Hashing runs in a thread pool: each large file (1 MiB and up) is one task read in 8 MiB pieces (hashlib
releases the GIL on large updates, so each core hashes at about `sha256sum` speed); small files go in
batches of up to 256, each file read with one call, so 20,000 small files cost a few hundred tasks, not
20,000 futures. A blob is hashed once however many snapshots point at it.

Nothing here touches the network except `--repair`, which removes only the bad files (never anything
outside the repo's own folders) and fetches exactly those again through `hub.pull.pull`.

The library call is `hpcstage.verify(...)` (hpcstage.api); the CLI's is `hpcstage verify`.

Why one module of about 1,000 lines: its four sections (hashing, what is expected, checking, repair: the
`# --` headers below) are the steps of one `verify` call; checking and repair work on the private plan the
second section builds (`_Plan`) and report `Problem`s in one `VerifyReport`. From outside only `verify`
and `VerifyReport` are used.
"""

from __future__ import annotations

import glob
import json
import logging
import os
import re
import shlex
import stat
import statistics
import time
from collections import defaultdict
from collections.abc import Iterable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from hpcstage import policy
from hpcstage.errors import BadInput, HpcstageError, PolicyError
from hpcstage.hfcache import CachedFile, RepoCache, default_cache_dir, digest_file, new_hasher, share_cache
from hpcstage.layout import LEASE_TTL, repo_of_folder
from hpcstage.safefs import Sharing
from hpcstage.xetstore import XetStore

if TYPE_CHECKING:  # the manifest (pydantic, yaml) is imported only when one is used
    from hpcstage.manifest import HubEntry, Manifest
    from hpcstage.options import Options

logger = logging.getLogger(__name__)

_RAW_COMMIT = re.compile(rb"[0-9a-f]{40}")

# Kinds of problem, each with its path. All make `verify` fail (exit 1).
MISSING = "missing"  # a file the lockfile lists is not in the snapshot
CORRUPT = "corrupt"  # wrong size or hash
BROKEN_LINK = "broken_link"  # the snapshot's symlink points at a blob that is gone
BAD_LINK = "bad_link"  # the symlink points outside the repo's blobs/ folder
BAD_REF = "bad_ref"  # refs/<name> not exactly 40 hex, trailing newline, no such snapshot, or not the locked commit
EXTRA = "extra"  # a file in the snapshot that neither the listing nor the lockfile knows
BAD_PATH = "bad_path"  # a listing or lockfile path that would escape its folder (never touched)
UNVERIFIABLE = "unverifiable"  # a snapshot with neither trees/<commit>.json nor a lockfile entry
UNREADABLE = "unreadable"  # permission or I/O error
NOT_STAGED = "not_staged"  # a requested repo, revision or manifest entry is not in the cache at all
# a repo blob linked into the shared Xet store that the entry's `.refs` manifest does not name: huggingface_hub's
# cache deletion would take the content from under it (repaired offline: the line is added)
UNLISTED = "unlisted_in_store"
REPAIRABLE = frozenset({MISSING, CORRUPT, BROKEN_LINK, BAD_LINK})


@dataclass(frozen=True)
class Problem:
    kind: str
    repo_type: str
    repo_id: str
    commit: str | None
    path: str  # the file's path in the repo, or the ref's name
    where: str  # what on disk is wrong (snapshot entry, blob, ref file)
    detail: str

    def __str__(self) -> str:
        at = f"@{self.commit[:12]}" if self.commit else ""
        name = f" {self.path}:" if self.path else ":"
        return f"{self.kind}: {self.repo_type} {self.repo_id}{at}{name} {self.detail} [{self.where}]"

    @property
    def key(self) -> tuple:
        return self.kind, self.repo_type, self.repo_id, self.commit, self.path

    def as_dict(self) -> dict:
        return dict(self.__dict__)


@dataclass
class VerifyReport:
    cache_dir: Path
    repos: int = 0
    snapshots: int = 0
    files: int = 0
    blobs_hashed: int = 0
    bytes_hashed: int = 0
    seconds: float = 0.0
    problems: list[Problem] = field(default_factory=list)
    repaired: list[Problem] = field(default_factory=list)  # found, then fixed by --repair

    @property
    def ok(self) -> bool:
        return not self.problems

    def as_dict(self) -> dict:
        return {
            "ok": self.ok,
            "cache_dir": str(self.cache_dir),
            "repos": self.repos,
            "snapshots": self.snapshots,
            "files": self.files,
            "blobs_hashed": self.blobs_hashed,
            "bytes_hashed": self.bytes_hashed,
            "seconds": round(self.seconds, 3),
            "problems": [p.as_dict() for p in self.problems],
            "repaired": [p.as_dict() for p in self.repaired],
        }


# -- hashing


SMALL_HASH = 1 << 20  # files below this are hashed in batches, each read in one call
BATCH_FILES = 256  # at most this many small files per task
BATCH_BYTES = 64 << 20  # ... and at most this many of their bytes
SLOW_OPEN = 200e-6  # seconds per small file: a network filesystem's round trip (the page cache: ~20 us)


def hash_files(items: Iterable[tuple[str, str]], workers: int | None = None) -> dict[tuple[str, str], str | OSError]:
    """Hash each distinct `(path, algo)` once, in parallel, biggest first. Values are hex digests, or the
    OSError that stopped the read. Benchmarks can time this directly against `sha256sum`."""
    keys = list(dict.fromkeys(items))

    def size(key):
        try:
            return os.stat(key[0]).st_size
        except OSError:
            return 0

    hasher = _Hasher(workers or default_workers())
    try:
        for path, algo in keys:
            hasher.add(path, algo, size((path, algo)))
        return hasher.results()
    finally:
        hasher.close()


class _Hasher:
    """Hashes while the caller is still finding files: each batch of small files is hashed as soon as it is
    full, so hashing overlaps the walk over the snapshots; large files are queued at the end, biggest first.
    Each `(path, algo)` is hashed once.

    Large files (SMALL_HASH and up) are one pool task each: hashlib releases the GIL on their 8 MiB updates,
    so they hash in parallel. Small ones go in batches of BATCH_FILES, each file read with one `read` (a
    future, a wake-up and an 8 MiB buffer per 1 kB file cost 25x `sha1sum` at 20,000 files). Where a small
    file answers fast (the page cache, a local disk) the batch is hashed right here: threads then only fight
    over the GIL (20,000 x 1 kB: 0.97 s in one thread, 1.7-2.0 s with 2-8). Once a batch shows the round
    trip of a shared filesystem (a median of SLOW_OPEN per file and up), the later batches go to the pool,
    where the opens overlap."""

    def __init__(self, workers: int):
        self._pool = (
            ThreadPoolExecutor(max_workers=workers, thread_name_prefix="hpcstage-hash") if workers > 1 else None
        )
        self._slow = False  # set by the first batch whose median file took SLOW_OPEN; then it stays
        self._seen: set[tuple[str, str]] = set()
        self._batch: list[tuple[str, str, int]] = []
        self._held = 0
        self._large: list[tuple[str, str, int]] = []
        self._tasks: list[tuple[list[tuple[str, str, int]], Future | list[str | OSError]]] = []

    def add(self, path: str, algo: str, size: int) -> None:
        if (path, algo) in self._seen:
            return
        self._seen.add((path, algo))
        if size >= SMALL_HASH:
            self._large.append((path, algo, size))
            return
        if self._batch and (len(self._batch) >= BATCH_FILES or self._held + size > BATCH_BYTES):
            self._start_small(self._batch)
            self._batch, self._held = [], 0
        self._batch.append((path, algo, size))
        self._held += size

    def _start_small(self, task: list[tuple[str, str, int]]) -> None:
        if self._pool is None or self._slow:
            self._start(task)
            return
        took: list[float] = []
        self._tasks.append((task, _hash_task(task, took)))
        self._slow = statistics.median(took) > SLOW_OPEN  # the median: a busy CPU delays a few files, not most

    def _start(self, task: list[tuple[str, str, int]]) -> None:
        self._tasks.append((task, self._pool.submit(_hash_task, task) if self._pool else _hash_task(task)))

    def results(self) -> dict[tuple[str, str], str | OSError]:
        """Every digest (or the OSError that stopped the read), once all tasks are done."""
        if self._batch:
            self._start_small(self._batch)
            self._batch = []
        for job in sorted(self._large, key=lambda j: -j[2]):
            self._start([job])
        self._large = []
        out: dict[tuple[str, str], str | OSError] = {}
        for task, done in self._tasks:
            digests = done.result() if isinstance(done, Future) else done
            for (path, algo, _), digest in zip(task, digests, strict=True):
                out[(path, algo)] = digest
        return out

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(cancel_futures=True)


def _hash_task(task: list[tuple[str, str, int]], took: list[float] | None = None) -> list[str | OSError]:
    """Each file's digest or OSError; `took`, when given, gets each file's seconds."""
    out: list[str | OSError] = []
    for path, algo, n in task:
        started = time.perf_counter()
        try:
            out.append(_digest_small(path, algo, n) if n < SMALL_HASH else digest_file(path, algo))
        except OSError as e:
            out.append(e)
        if took is not None:
            took.append(time.perf_counter() - started)
    return out


def _digest_small(path: str, algo: str, size: int) -> str:
    """`digest_file` for a small file of `size` bytes (as listed): one open and one `read` of size + 1, whose
    answer of exactly `size` bytes is the end of the file; any other answer (the file changed, a filesystem
    that reads short) is read on to the end."""
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        chunks = [os.read(fd, size + 1)]
        if len(chunks[0]) != size:
            while chunk := os.read(fd, 1 << 16):
                chunks.append(chunk)
    finally:
        os.close(fd)
    data = b"".join(chunks)  # one chunk: the very object, no copy
    h = new_hasher(algo == "sha256", len(data))
    h.update(data)
    return h.hexdigest()


def default_workers() -> int:
    return min(32, (os.cpu_count() or 4) + 2)


def throughput(paths: Iterable[str | os.PathLike], workers: int | None = None, algo: str = "sha256") -> dict:
    """Hash `paths` the way verify does and return {bytes, seconds, bytes_per_second} (for bench/)."""
    keys = [(str(p), algo) for p in paths]
    total = sum(os.stat(p).st_size for p, _ in dict.fromkeys(keys))
    started = time.perf_counter()
    results = hash_files(keys, workers)
    seconds = time.perf_counter() - started
    errors = [e for e in results.values() if isinstance(e, OSError)]
    if errors:
        raise errors[0]
    return {"bytes": total, "seconds": seconds, "bytes_per_second": total / seconds if seconds else 0.0}


# -- what is expected


@dataclass
class _Snapshot:
    cache: RepoCache
    commit: str
    expected: dict[str, CachedFile] = field(default_factory=dict)  # lockfile entries, then the listing
    required: set[str] = field(default_factory=set)  # the lockfile's files: must be present
    locked: bool = False
    listed: bool = False


class _Hints:
    """The commands a problem's fix names, in the context verify ran in: the same manifest, cache folder and
    repo type, so that running the hint fixes what was found (not the default cache)."""

    def __init__(self, manifest: Manifest | None, cache_flag: Path | None):
        self.manifest = manifest
        self.cache = f" --cache-dir {_q(cache_flag)}" if cache_flag is not None else ""

    def repair(self, cache: RepoCache | None = None) -> str:
        """(`cache`: the repo, needed without a manifest.)"""
        if self.manifest is not None:
            return f"hpcstage verify -f {_q(self.manifest.path)} --repair{self.cache}"
        assert cache is not None
        return f"hpcstage verify {cache.repo_id}{_type_flag(cache.repo_type)} --repair{self.cache}"

    def pull(self, cache: RepoCache | None = None, revision: str = "main") -> str:
        if self.manifest is not None:
            return f"hpcstage pull -f {_q(self.manifest.path)}{self.cache}"
        assert cache is not None
        return f"hpcstage pull {cache.repo_id}{_type_flag(cache.repo_type)} --revision {revision}{self.cache}"


def _q(path) -> str:
    return shlex.quote(str(path))


def _type_flag(repo_type: str) -> str:
    return "" if repo_type == "model" else f" --repo-type {repo_type}"


class _Plan:
    def __init__(self, cache_dir: Path, hints: _Hints | None = None):
        self.cache_dir = cache_dir
        self.hints = hints or _Hints(None, None)
        self.snapshots: dict[tuple[Path, str], _Snapshot] = {}
        self.repos: dict[Path, RepoCache] = {}
        self.ref_expect: dict[tuple[Path, str], str] = {}  # (repo root, ref) -> the locked commit
        self.problems: list[Problem] = []

    def problem(self, kind: str, cache: RepoCache, commit: str | None, path: str, where, detail: str) -> None:
        self.problems.append(Problem(kind, cache.repo_type, cache.repo_id, commit, path, str(where), detail))

    def repo(self, repo_type: str, repo_id: str) -> RepoCache:
        cache = RepoCache(self.cache_dir, repo_type, repo_id)
        return self.repos.setdefault(cache.root, cache)

    def snapshot(self, cache: RepoCache, commit: str) -> _Snapshot:
        key = (cache.root, commit)
        if key not in self.snapshots:
            self.snapshots[key] = snap = _Snapshot(cache, commit)
            self._add_listing(snap)
        return self.snapshots[key]

    def _add_listing(self, snap: _Snapshot) -> None:
        tree = snap.cache.tree_path(snap.commit)
        try:
            data = json.loads(tree.read_bytes())
        except FileNotFoundError:
            return
        except (OSError, ValueError) as e:
            self.problem(
                UNREADABLE,
                snap.cache,
                snap.commit,
                "",
                tree,
                f"cannot read the listing ({getattr(e, 'strerror', None) or e}); "
                f"delete it and run `{self.hints.pull(snap.cache, snap.commit)}`",
            )
            return
        files = data.get("files") if isinstance(data, dict) else None
        if not isinstance(files, dict):
            self.problem(UNREADABLE, snap.cache, snap.commit, "", tree, "not a trees/<commit>.json listing")
            return
        snap.listed = True
        for path, info in files.items():
            try:
                policy.check_relative_path(path, "listing path")
                f = CachedFile(path, int(info["size"]), str(info["blob_id"]), info.get("lfs_sha256"))
            except PolicyError as e:
                self.problem(BAD_PATH, snap.cache, snap.commit, path, tree, f"{e}; it was not touched")
                continue
            except (KeyError, TypeError, ValueError):
                self.problem(UNREADABLE, snap.cache, snap.commit, path, tree, "listing entry without size/blob_id")
                continue
            snap.expected.setdefault(path, f)

    def add_locked(self, cache: RepoCache, commit: str, files: list[CachedFile], where: Path) -> None:
        snap = self.snapshot(cache, commit)
        snap.locked = True
        for f in files:
            try:
                policy.check_relative_path(f.path, "lockfile path")
            except PolicyError as e:
                self.problem(BAD_PATH, cache, commit, f.path, where, f"{e}; it was not touched")
                continue
            snap.expected[f.path] = f  # the lockfile wins over the listing
            snap.required.add(f.path)


def _snapshot_commits(cache: RepoCache) -> list[str]:
    try:
        return sorted(p.name for p in (cache.root / "snapshots").iterdir() if p.is_dir())
    except OSError:
        return []


def _plan(
    cache_dir: Path,
    repo_ids: list[str] | None,
    manifest: Manifest | None,
    repo_type: str | None,
    revision: str | None,
    hints: _Hints | None = None,
) -> _Plan:
    plan = _Plan(cache_dir, hints)
    if manifest is not None:
        lock_path = manifest.lock_path
        from hpcstage.manifest import load_lock

        lock = load_lock(lock_path, manifest.path)
        for entry in manifest.entries:
            cache = plan.repo(entry.repo_type, entry.repo)
            locked = lock.entries.get(entry.key)
            if locked is None:
                plan.problem(
                    NOT_STAGED,
                    cache,
                    None,
                    "",
                    lock_path,
                    f"{entry.repo}@{entry.revision} has no entry in the lockfile; "
                    f"run `{plan.hints.pull(cache, entry.revision)}`",
                )
                continue
            plan.add_locked(cache, locked.commit, locked.cached_files(), lock_path)
            if not policy.is_commit(entry.revision):
                plan.ref_expect[(cache.root, entry.revision)] = locked.commit
        return plan
    if repo_ids:
        kind = repo_type or "model"
        for repo_id in repo_ids:
            # A staged repo's folder is proof enough, and safe whatever the id (its `/` becomes `--`, so the
            # name stays one folder in the cache); the Hub's rules (huggingface_hub's validator, ~0.15 s to
            # import) are asked only for an id not found, to say which rule it breaks.
            cache = RepoCache(plan.cache_dir, kind, repo_id)
            if not cache.root.is_dir():
                policy.check_repo_id(repo_id)
            cache = plan.repo(kind, repo_id)
            if not cache.root.is_dir():
                other = (
                    []
                    if repo_type
                    else [k for k in ("dataset", "space") if RepoCache(cache.cache_dir, k, repo_id).root.is_dir()]
                )
                fix = (
                    f"it is staged as a {other[0]}: pass --repo-type {other[0]}"
                    if other
                    else f"run `{plan.hints.pull(cache, 'main')}` or pass the --cache-dir it was pulled into"
                )
                plan.problem(NOT_STAGED, cache, None, "", cache.root, f"not in the cache {cache_dir}; {fix}")
                continue
            if revision is None:
                for commit in _snapshot_commits(cache):
                    plan.snapshot(cache, commit)
                continue
            commit = revision if policy.is_commit(revision) else (cache.read_ref(revision) or "").strip()
            if not policy.is_commit(commit):
                plan.problem(
                    NOT_STAGED,
                    cache,
                    None,
                    revision,
                    cache.root / "refs" / revision,
                    f"revision {revision!r} is not staged; run `{plan.hints.pull(cache, revision)}`",
                )
            elif not cache.snapshot(commit).is_dir():
                plan.problem(
                    NOT_STAGED,
                    cache,
                    commit,
                    "",
                    cache.snapshot(commit),
                    f"no snapshot; run `{plan.hints.pull(cache, revision)}`",
                )
            else:
                plan.snapshot(cache, commit)
        return plan
    try:
        folders = sorted(p.name for p in cache_dir.iterdir() if p.is_dir())
    except FileNotFoundError:
        raise BadInput(f"no hub cache at {cache_dir}; pass --cache-dir or set HF_HUB_CACHE") from None
    for name in folders:
        parsed = repo_of_folder(name)
        if parsed is None or (repo_type and parsed[0] != repo_type):
            continue
        cache = plan.repo(*parsed)
        for commit in _snapshot_commits(cache):
            plan.snapshot(cache, commit)
    return plan


def _add_pulled(plan: _Plan) -> None:
    """Without a lockfile: the files hpcstage's own pulls selected (the ledger records their patterns) must
    be in the snapshot, so a deleted file is missing, not silently absent. Snapshots made by other tools
    (no record) are checked file by file against their listing only."""
    from hpcstage import ledger

    records = ledger.read_all(plan.cache_dir)
    for snap in plan.snapshots.values():
        if snap.locked or not snap.listed:
            continue
        for rec in records:
            if (rec.repo_type, rec.repo, rec.commit) != (snap.cache.repo_type, snap.cache.repo_id, snap.commit):
                continue
            selected = rec.selected(list(snap.expected.values()))  # None: a record from before patterns were kept
            snap.required.update(f.path for f in selected or [])


# -- checking


@dataclass
class _Pending:
    snap: _Snapshot
    file: CachedFile
    data: str  # the path whose bytes are hashed (the blob, or a plain file in the snapshot)
    algo: str
    digest: str


def _check_refs(plan: _Plan) -> None:
    for root, cache in plan.repos.items():
        refs = root / "refs"
        if not refs.is_dir():
            continue
        for ref_file in sorted(p for p in refs.rglob("*") if not p.is_dir()):
            name = ref_file.relative_to(refs).as_posix()
            try:
                raw = ref_file.read_bytes()
            except OSError as e:
                plan.problem(UNREADABLE, cache, None, f"refs/{name}", ref_file, f"cannot read ({e.strerror})")
                continue
            if not _RAW_COMMIT.fullmatch(raw):
                locked = plan.ref_expect.get((root, name))
                fix = (
                    f"a trailing newline/whitespace, so offline loads fail; run `{plan.hints.repair(cache)}`"
                    if _RAW_COMMIT.fullmatch(raw.strip()) or locked
                    else f"not a 40-hex commit; run `{plan.hints.pull(cache, name)}`"
                )
                if locked and not _RAW_COMMIT.fullmatch(raw.strip()):
                    fix = f"not a 40-hex commit; the lockfile pins {locked[:12]}: run `{plan.hints.repair(cache)}`"
                plan.problem(BAD_REF, cache, None, f"refs/{name}", ref_file, fix)
                continue
            commit = raw.decode()
            if not cache.snapshot(commit).is_dir():
                fix = plan.hints.repair(cache) if plan.ref_expect.get((root, name)) else plan.hints.pull(cache, name)
                plan.problem(
                    BAD_REF,
                    cache,
                    commit,
                    f"refs/{name}",
                    ref_file,
                    f"points at {commit[:12]}, which has no snapshot; run `{fix}`",
                )
        for (r, name), locked in plan.ref_expect.items():
            if r != root:
                continue
            current = cache.read_ref(name)
            if current is None:
                why = f"missing, so offline loads of {name!r} fail; run `{plan.hints.repair(cache)}`"
            elif current.strip() != locked and policy.is_commit(current.strip()):
                why = (
                    f"points at {current.strip()[:12]}, the lockfile at {locked[:12]}: offline loads of {name!r} "
                    f"get other files; pass the commit as revision or run `{plan.hints.pull(cache, name)}`"
                )
            else:
                continue
            plan.problem(BAD_REF, cache, locked, f"refs/{name}", refs / name, why)


def _walk_snapshot(folder: Path | str) -> dict[str, bool]:
    """Every non-folder below `folder` (links to folders included, never followed): path -> is a symlink.
    scandir's file types, so no stat per entry (os.walk stats each link to learn whether it is a folder)."""
    found: dict[str, bool] = {}
    todo = [(str(folder), "")]
    while todo:
        here, rel = todo.pop()
        try:
            entries = list(os.scandir(here))
        except OSError:  # as os.walk: an unreadable folder is skipped (its files are then missing)
            continue
        for e in entries:
            name = f"{rel}{e.name}"
            if e.is_dir(follow_symlinks=False):
                todo.append((e.path, f"{name}/"))
            else:
                found[name] = e.is_symlink()
    return found


def _check_file(
    plan: _Plan,
    snap: _Snapshot,
    path: str,
    f: CachedFile,
    pending: list[_Pending],
    hasher: _Hasher,
    is_link: bool,
    folder: str,
    blobs: str,
    blobs_real: str,
) -> None:
    """One snapshot entry: a link into the repo's blobs (or a plain file) of the right size, queued for its
    hash. Strings, not pathlib, and one system call besides readlink for the usual link: this runs once
    per file (20,000+ in a large repo)."""
    cache, commit = snap.cache, snap.commit
    entry = f"{folder}/{path}"
    try:
        target = os.readlink(entry) if is_link else None
        st = None if is_link else os.lstat(entry)
    except OSError as e:
        plan.problem(UNREADABLE, cache, commit, path, entry, f"cannot stat ({e.strerror})")
        return
    if target is not None:
        # What pulls write: `../` once per folder level up to the repo, then blobs/<name>; else the general way.
        up = "../" * (path.count("/") + 2) + "blobs/"
        name = target[len(up) :] if target.startswith(up) else ""
        if name and "/" not in name and name not in (".", ".."):
            data = f"{blobs}/{name}"
        else:
            data = os.path.normpath(os.path.join(os.path.dirname(entry), target))
            name = os.path.basename(data)
            if os.path.isabs(target) or os.path.dirname(data) != blobs:
                plan.problem(
                    BAD_LINK,
                    cache,
                    commit,
                    path,
                    entry,
                    f"symlink points outside the repo's blobs folder ({target}); run `{plan.hints.repair(cache)}`",
                )
                return
        try:
            blob = os.lstat(data)
            real = f"{blobs_real}/{name}"
            if stat.S_ISLNK(blob.st_mode):  # the shared Xet blob store: the blob links on
                if not _store_link_ok(plan, cache, commit, path, data):
                    return
                blob, real = os.stat(data), os.path.realpath(data)
        except FileNotFoundError:
            plan.problem(
                BROKEN_LINK, cache, commit, path, entry, f"its blob {name} is missing; run `{plan.hints.repair(cache)}`"
            )
            return
        except OSError as e:
            plan.problem(UNREADABLE, cache, commit, path, data, f"cannot stat the blob ({e.strerror})")
            return
        size = blob.st_size
    elif st is not None and stat.S_ISREG(st.st_mode):
        data, size = entry, st.st_size
        real = os.path.realpath(entry)
    else:
        plan.problem(CORRUPT, cache, commit, path, entry, "not a file or a symlink to a blob")
        return
    if size != f.size:
        plan.problem(
            CORRUPT, cache, commit, path, data, f"size {size}, expected {f.size}; run `{plan.hints.repair(cache)}`"
        )
        return
    algo, digest = ("sha256", f.sha256) if f.sha256 else ("git", f.blob_id)
    pending.append(_Pending(snap, f, real, algo, digest))
    hasher.add(real, algo, size)


def _store_link_ok(plan: _Plan, cache: RepoCache, commit: str, path: str, blob: str) -> bool:
    """A repo blob that is a link must point into the shared Xet store (`../../blobs/<h[:2]>/<h>`), and the
    store entry's `.refs` manifest must name it. False when the link is wrong (a problem is recorded)."""
    try:
        target = os.readlink(blob)
    except OSError:
        return True  # a regular blob (or none: reported as a broken link)
    store = XetStore(plan.cache_dir)
    h = os.path.basename(target)
    if not re.fullmatch(r"[0-9a-f]{64}", h) or target != store.link_target(h):
        plan.problem(
            BAD_LINK,
            cache,
            commit,
            path,
            blob,
            f"its blob is a link to {target}, not into the shared Xet store; run `{plan.hints.repair(cache)}`",
        )
        return False
    if os.path.lexists(store.path(h)) and Path(blob) not in store.links_of(h):
        plan.problem(
            UNLISTED,
            cache,
            commit,
            path,
            store.refs_path(h),
            "its blob links into the shared Xet store but the store's .refs manifest does not name it, so "
            f"huggingface_hub's cache deletion could remove the content; run `{plan.hints.repair(cache)}`",
        )
    return True


def _check(plan: _Plan, workers: int, report: VerifyReport) -> set[str]:
    """Run every check; returns the blobs (real paths) whose bytes were proven right."""
    _check_refs(plan)
    pending: list[_Pending] = []
    hasher = _Hasher(workers)  # hashes while the snapshots are walked
    try:
        for snap in plan.snapshots.values():
            _check_snapshot(plan, snap, report, pending, hasher)
        results = hasher.results()
    finally:
        hasher.close()
    report.blobs_hashed = len(results)
    report.bytes_hashed = sum(p.file.size for p in {(p.data, p.algo): p for p in pending}.values())
    good: set[str] = set()
    for p in pending:
        got = results[(p.data, p.algo)]
        cache, commit = p.snap.cache, p.snap.commit
        if isinstance(got, OSError):
            plan.problem(UNREADABLE, cache, commit, p.file.path, p.data, f"cannot read ({got.strerror or got})")
        elif got != p.digest:
            name = "sha256" if p.algo == "sha256" else "git blob sha1"
            plan.problem(
                CORRUPT,
                cache,
                commit,
                p.file.path,
                p.data,
                f"{name} {got[:12]}…, expected {p.digest[:12]}…; run `{plan.hints.repair(cache)}`",
            )
        else:
            good.add(p.data)
    return good


def _check_snapshot(
    plan: _Plan, snap: _Snapshot, report: VerifyReport, pending: list[_Pending], hasher: _Hasher
) -> None:
    cache, commit = snap.cache, snap.commit
    report.snapshots += 1
    folder = cache.snapshot(commit)
    if not snap.locked and not snap.listed:
        plan.problem(
            UNVERIFIABLE,
            cache,
            commit,
            "",
            cache.tree_path(commit),
            f"no listing and no lockfile entry to check against; run `{plan.hints.pull(cache, commit)}` "
            "to record one, or verify with -f MANIFEST",
        )
        return
    present = _walk_snapshot(folder) if folder.is_dir() else {}
    blobs = os.path.normpath(cache.root / "blobs")
    where = (str(folder), blobs, os.path.realpath(blobs))
    for path in sorted(snap.required.difference(present)):
        source = "the lockfile" if snap.locked else f"trees/{commit}.json and was pulled"
        plan.problem(
            MISSING,
            cache,
            commit,
            path,
            folder / path,
            f"listed in {source} but not in the snapshot; run `{plan.hints.repair(cache)}`",
        )
    for path in sorted(present):
        f = snap.expected.get(path)
        if f is None:
            plan.problem(
                EXTRA,
                cache,
                commit,
                path,
                folder / path,
                "not in the listing or the lockfile; delete it if nothing needs it",
            )
            continue
        report.files += 1
        _check_file(plan, snap, path, f, pending, hasher, present[path], *where)


# -- repair


def _blob_in_repo(cache: RepoCache, path: str) -> bool:
    """Only files directly in this repo's blobs/ are ever deleted (a link may point anywhere)."""
    return os.path.dirname(os.path.realpath(path)) == os.path.realpath(cache.root / "blobs")


def _remove_bad(plan: _Plan, problems: list[Problem], good: set[str]) -> list[HubEntry]:
    """Delete the bad snapshot entries and bad blobs (only inside the repo's own folders) and return one
    pull entry per (repo, commit) naming exactly the bad paths."""
    from hpcstage.manifest import HubEntry

    wanted: dict[tuple, set[str]] = defaultdict(set)
    for p in problems:
        if p.kind not in REPAIRABLE or not p.commit:
            continue
        snap = plan.snapshots.get((RepoCache(plan.cache_dir, p.repo_type, p.repo_id).root, p.commit))
        if snap is None or p.path not in snap.expected:
            continue
        cache, f = snap.cache, snap.expected[p.path]
        entry = cache.snapshot(p.commit) / p.path
        blobs = cache.folder(cache.blob(f.etag).parent)  # another user's link there: refused (safefs)
        for blob in (p.where, str(cache.blob(f.etag))):
            real = os.path.realpath(blob)
            if _blob_in_repo(cache, blob) and real not in good and os.path.lexists(blob):
                logger.info("removing bad blob %s", blob)
                blobs.unlink(os.path.basename(real))
            elif p.kind == CORRUPT and real not in good and _in_store(plan.cache_dir, real):
                _remove_from_store(plan.cache_dir, os.path.basename(real))
        if os.path.islink(cache.blob(f.etag)):  # a link into the store: fetched (and linked) again
            blobs.unlink(f.etag)
        cache.folder(entry.parent).unlink(entry.name)
        wanted[(p.repo_type, p.repo_id, p.commit)].add(p.path)
    return [
        HubEntry(repo=repo_id, repo_type=repo_type, revision=commit, include=sorted(glob.escape(x) for x in paths))
        for (repo_type, repo_id, commit), paths in sorted(wanted.items())
    ]


def _in_store(cache_dir: Path, real: str) -> bool:
    store = XetStore(cache_dir)
    name = os.path.basename(real)
    return bool(re.fullmatch(r"[0-9a-f]{64}", name)) and real == os.path.realpath(store.path(name))


def _remove_from_store(cache_dir: Path, xet_hash: str) -> None:
    """Wrong bytes in the store: removed under the entry's lease, so the repair's pull stores them again (the
    other repos' links to it point at the same name and are whole again after that)."""
    from hpcstage.locks import Lease

    store = XetStore(cache_dir)
    with Lease(store.lease(xet_hash), ttl=LEASE_TTL, root=cache_dir):
        logger.info("removing bad shared blob %s", store.path(xet_hash))
        store.path(xet_hash).unlink(missing_ok=True)


def _repair_store_refs(plan: _Plan, problems: list[Problem]) -> None:
    """Name the unlisted links in their store entry's `.refs` manifest (offline, under the entry's lease)."""
    from hpcstage.locks import Lease

    store = XetStore(plan.cache_dir)
    for p in problems:
        if p.commit is None:
            continue
        snap = plan.snapshots.get((RepoCache(plan.cache_dir, p.repo_type, p.repo_id).root, p.commit))
        if p.kind != UNLISTED or snap is None or p.path not in snap.expected:
            continue
        f = snap.expected[p.path]
        h = os.path.basename(os.readlink(snap.cache.blob(f.etag)))
        with Lease(store.lease(h), ttl=LEASE_TTL, root=plan.cache_dir):
            store.add_ref(h, snap.cache, f.etag)


def _repair_refs(plan: _Plan, problems: list[Problem]) -> None:
    """Refs fixable offline: a valid commit with a trailing newline, or a locked branch's missing ref. A ref
    that names another staged commit is left alone: on a shared cache someone may have pulled it on purpose.
    With a lockfile, a garbage ref (or one naming a commit with no snapshot) is restored to the locked commit."""
    for p in problems:
        cache = plan.repos.get(RepoCache(plan.cache_dir, p.repo_type, p.repo_id).root)
        if p.kind != BAD_REF or cache is None:
            continue
        name = p.path.removeprefix("refs/")
        ref = cache.root / "refs" / name
        try:
            raw = ref.read_bytes()
        except FileNotFoundError:
            raw = None
        except OSError:
            continue
        locked = plan.ref_expect.get((cache.root, name))
        if raw is None:
            commit = locked
        elif raw != raw.strip() and _RAW_COMMIT.fullmatch(raw.strip()):
            commit = raw.strip().decode()
        elif locked and (not _RAW_COMMIT.fullmatch(raw) or not cache.snapshot(raw.decode()).is_dir()):
            commit = locked  # garbage, or a commit with no snapshot: the lockfile knows the right one
        else:
            continue
        if commit and cache.snapshot(commit).is_dir():
            cache.folder(ref.parent).write_atomic(ref.name, commit.encode(), sharing=cache.sharing)


def _repair_options(
    options: Options | None, folder: Path, workers: int | None, quiet: bool, allow: list[str] | None = None
) -> Options:
    """The caller's settings (token, timeout, retries, ...) with this verify's cache, workers and quiet; the
    manifest's allowlist, when it has one, over the caller's."""
    import dataclasses

    from hpcstage.options import Options

    options = options or Options()
    return dataclasses.replace(
        options,
        cache_dir=folder,
        workers=workers or 8,
        quiet=quiet,
        allow=allow if allow is not None else options.allow,
    )


def verify(
    repo_ids: list[str] | None = None,
    *,
    manifest: Manifest | None = None,
    repo_type: str | None = None,
    revision: str | None = None,
    cache_dir: Path | str | None = None,
    workers: int | None = None,
    repair: bool = False,
    shared_group: str | None = None,
    quiet: bool = True,
    options: Options | None = None,
) -> VerifyReport:
    """Check staged files offline against the lockfile (with `manifest`) or `trees/<commit>.json`.

    Scope: the manifest's entries; else `repo_ids` (all their snapshots, or the one `revision` names);
    else every model and dataset repo in the cache. With `repair`, the bad files are removed and fetched
    again (the only network use), refs with a trailing newline rewritten, then everything re-checked:
    the returned report lists what is still wrong in `problems` and what was fixed in `repaired`.
    `options`: the caller's pull settings (token, timeout, retry, connections, progress) for the repair's
    fetches; its cache folder, workers, quiet and allowlist are this call's.
    """
    if manifest is not None and (repo_ids or revision):
        raise BadInput("give either REPO_ID... or -f MANIFEST, not both")
    if revision is not None and not repo_ids:
        raise BadInput("--revision needs a REPO_ID")
    if repo_type is not None:
        policy.check_repo_type(repo_type)
    if revision is not None:
        policy.check_revision(revision)
    if workers is not None and workers < 1:
        raise BadInput("--workers must be at least 1")
    group = shared_group or (manifest.shared_group if manifest is not None else None)
    sharing = Sharing.for_group(group) if group else None
    folder = Path(cache_dir) if cache_dir else (manifest.cache_dir if manifest and manifest.cache_dir else None)
    folder = folder or default_cache_dir()
    hints = _Hints(manifest, Path(cache_dir) if cache_dir else None)
    started = time.monotonic()

    def run() -> tuple[VerifyReport, _Plan, set[str]]:
        report = VerifyReport(cache_dir=folder)
        plan = _plan(folder, repo_ids, manifest, repo_type, revision, hints)
        if manifest is None:
            _add_pulled(plan)
        good = _check(plan, workers or default_workers(), report)
        report.repos = len(plan.repos)
        report.problems = plan.problems + _data_problems()
        return report, plan, good

    def _data_problems() -> list[Problem]:
        """url:/local:/file: entries: their files against the sha256 recorded when they were staged."""
        if manifest is None or not manifest.data_entries:
            return []
        from hpcstage import datadir
        from hpcstage.manifest import load_lock

        found = datadir.verify_entries(
            manifest, load_lock(manifest.lock_path, manifest.path), folder, workers or default_workers()
        )
        return [
            Problem(
                kind,
                "data",
                entry.dest,
                None,
                path,
                str(where),
                f"{detail}; run `{hints.pull() if kind == NOT_STAGED else hints.repair()}`",
            )
            for entry, kind, path, where, detail in found
        ]

    try:
        report, plan, good = run()
    except PermissionError as e:
        raise HpcstageError(
            f"cannot read {e.filename or folder}: permission denied; run as a member of the cache's "
            "group, or have its owner run `hpcstage pull --shared-group GROUP`"
        ) from None
    if repair and not report.ok:
        before = report.problems
        if any(p.kind in REPAIRABLE or p.repo_type == "data" for p in before):
            from hpcstage.options import refuse_offline

            refuse_offline()  # refetching needs the network: say so before deleting anything
        entries = _remove_bad(plan, before, good)
        _repair_refs(plan, before)
        _repair_store_refs(plan, before)
        bad_data = {p.repo_id for p in before if p.repo_type == "data"}
        if bad_data:
            assert manifest is not None  # data entries come only from a manifest
            from hpcstage import datadir

            datadir.restage(
                manifest,
                [e for e in manifest.data_entries if e.dest in bad_data],
                _repair_options(options, folder, workers, quiet),
            )
        if entries:
            from hpcstage.hub.pull import pull  # the network, only now

            allow = manifest.allow if manifest is not None else None
            pull(entries, _repair_options(options, folder, workers, quiet, allow))
        if sharing is not None:
            share_cache(folder, sharing, [c.root for c in plan.repos.values() if c.root.is_dir()])
        report, plan, good = run()
        still = {p.key for p in report.problems}
        report.repaired = [p for p in before if p.key not in still]
    report.seconds = time.monotonic() - started
    return report
