"""Data entries (`url:`, `local:`, `repo:` + `file:` under `datasets:`), staged as plain folders.

Each entry lands in `data_dir/<dest>`. `data_dir` is the manifest key, else `hpcstage-data` beside the hub
cache (`<hub cache>/../hpcstage-data`: on the same filesystem, so renames and hardlinks work). Inside it:

    <dest>/                                 the staged folder, replaced only whole
    .<dest>.<random>.hpcstage-build/        a folder being built (extracted or copied), renamed to <dest>
    .hpcstage/downloads/                    URL partials (+ .ranges) and complete downloads (keep_archive)
    .hpcstage/locks/<dest>.hpcstage-lease   one builder per dest, across processes and nodes
    .hpcstage/staged/<dest>.json            the record of a dest whose expectations passed

An entry counts as staged only when its `expect:` passed: then its record goes to the lockfile and the
`staged/` folder. A failed expectation leaves the data in place for inspection and records nothing, so the
next pull builds it again. A later pull with the record and every file in place (sizes) does nothing: no
request, no copy.

Why one module of about 680 lines: the three sources (url, local, a Hub file) share one build protocol
(lease on the dest, private build folder, extract or copy, `expect:`, rename into place, record), and that
protocol is only safe as a whole; the sources' own transfers are in sources/, the archive rules in
archive.py.
"""

from __future__ import annotations

import fnmatch
import glob
import os
import secrets
import shlex
import shutil
import stat
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote

from hpcstage import archive, safefs
from hpcstage.errors import BadInput, HashMismatch, HpcstageError, TransferError
from hpcstage.hfcache import default_cache_dir, digest_file
from hpcstage.layout import BUILD_SUFFIX, LEASE_SUFFIX, LEASE_TTL, OLD_SUFFIX
from hpcstage.layout import DATA_STATE as STATE
from hpcstage.locks import Lease
from hpcstage.manifest import (
    DataEntry,
    HubFileEntry,
    LocalEntry,
    LockedData,
    LockedEntry,
    Lockfile,
    Manifest,
    Update,
    UrlEntry,
)
from hpcstage.options import refuse_offline, wants_update
from hpcstage.progress import Progress, human_bytes


def default_data_dir(cache_dir: Path | None = None) -> Path:
    """`hpcstage-data` beside the hub cache."""
    return (Path(cache_dir) if cache_dir else default_cache_dir()).absolute().parent / "hpcstage-data"


def data_dir_of(manifest: Manifest, cache_dir: Path | None = None) -> Path:
    return manifest.data_dir or default_data_dir(cache_dir or manifest.cache_dir)


@dataclass
class DataResult:
    dest: Path
    kind: str
    files: int
    bytes: int
    downloaded_bytes: int = 0
    copied_bytes: int = 0
    skipped: bool = False  # already in place: nothing done
    how: str = ""  # local: reflink/hardlink/copy counts


def _quoted(dest: str) -> str:
    return quote(dest, safe="")


def builder_lease(data_dir: Path, dest: str) -> Path:
    """The lease of whoever builds `dest` (one builder at a time, across processes and nodes)."""
    return Path(data_dir) / STATE / "locks" / f"{_quoted(dest)}{LEASE_SUFFIX}"


def lease_folders(data_dir: Path) -> list[Path]:
    """Where data entries' leases live: the URL downloads' and the builders' (for cleanup)."""
    from hpcstage.sources import url

    return [url.downloads_dir(data_dir), Path(data_dir) / STATE / "locks"]


def unfinished_builds(data_dir: Path) -> list[tuple[Path, Path]]:
    """Build and replaced folders (`.<dest>.<hex>.hpcstage-build`/`-old`) anywhere below `data_dir`, each with
    the builder lease that guards it (for cleanup: none a live builder holds is removed)."""
    found = []
    for suffix in (BUILD_SUFFIX, OLD_SUFFIX):
        for build in safefs.walk_names(Path(data_dir), f".*{suffix}"):
            dest = build.name[1:].removesuffix(suffix).rsplit(".", 1)[0]
            found.append((build, builder_lease(data_dir, (build.parent / dest).relative_to(data_dir).as_posix())))
    return found


def record_path(data_dir: Path, dest: str) -> Path:
    return Path(data_dir) / STATE / "staged" / f"{_quoted(dest)}.json"


def read_record(data_dir: Path, dest: str) -> LockedData | None:
    try:
        return LockedData.model_validate_json(record_path(data_dir, dest).read_bytes())
    except (OSError, ValueError):
        return None


def in_place(data_dir: Path, record: LockedData) -> bool:
    """Every recorded file is under dest with its recorded size (stat only, no hashing)."""
    root = Path(data_dir) / record.dest
    try:
        return root.is_dir() and all((root / f["path"]).stat().st_size == f["size"] for f in record.files)
    except OSError:
        return False


@contextmanager
def building(data_dir: Path, dest: Path) -> Iterator[safefs.Dir]:
    """A temporary folder beside `dest`; renamed to `dest` (replacing the old one) only when the block
    finishes, removed when it fails. An interruption never leaves a partial tree under `dest`.

    The folder is 0700 while it is filled, so no other user can plant a link inside it, and callers reach
    it through `Dir.proc_path` (its descriptor), so a link planted above it cannot redirect their writes
    either; path-based code (extraction, copies) is then safe in it. It gets its normal mode at the end."""
    parent = safefs.opendir(data_dir, dest.parent)
    name, tmp = parent.private_child(f".{dest.name}.", BUILD_SUFFIX)
    try:
        yield tmp
        st = os.fstat(tmp.fd)
        os.fchmod(tmp.fd, (0o777 & ~safefs.umask()) | (st.st_mode & stat.S_ISGID))
    except BaseException:
        shutil.rmtree(parent.proc_path / name, ignore_errors=True)
        raise
    if parent.exists(dest.name):
        old = f".{dest.name}.{secrets.token_hex(4)}{OLD_SUFFIX}"
        parent.rename(dest.name, old)
        parent.rename(name, dest.name)
        shutil.rmtree(parent.proc_path / old, ignore_errors=True)
    else:
        parent.rename(name, dest.name)


def _remove_leftovers(data_dir: Path, dest: Path) -> None:
    """Build folders of dead runs for this dest (we hold its lease, so no live builder owns them)."""
    parent = safefs.opendir(data_dir, dest.parent)
    for suffix in (BUILD_SUFFIX, OLD_SUFFIX):
        pattern = f".{glob.escape(dest.name)}.{'[0-9a-f]' * 8}{suffix}"  # not `.foo.bar.*` of dest foo
        for name in fnmatch.filter(os.listdir(parent.fd), pattern):
            shutil.rmtree(parent.proc_path / name, ignore_errors=True)


def _check_space(folder: Path, need: int, what: str) -> None:
    if need <= 0:
        return
    folder.mkdir(parents=True, exist_ok=True)
    free = shutil.disk_usage(folder).free
    margin = (16 << 20) + need // 50
    if need + margin > free:
        raise TransferError(
            f"not enough space in {folder} for {what}: need {human_bytes(need)} "
            f"(+{human_bytes(margin)} margin), {human_bytes(free)} free; free space or set "
            "`data_dir:` on a larger filesystem"
        )


class Stager:
    """Stages data entries for one pull; `opts` is options.Options (workers, timeout, retry, quiet)."""

    def __init__(
        self,
        data_dir: Path,
        opts,
        update: Update = False,
        *,
        rebuild: bool = False,
        manifest_path: Path | None = None,
        cache_flag: Path | None = None,
    ):
        self.data_dir = Path(data_dir)
        self.opts = opts
        self.updates = update  # True/False, or the names given to `--update NAME` (options.wants_update)
        self.update = bool(update)  # for the entry being staged
        self.rebuild = rebuild  # `verify --repair`: build again even when the source is unchanged (the copy is bad)
        self.manifest_path, self.cache_flag = manifest_path, cache_flag  # for the commands that fix a failure
        self._http = None

    @property
    def http(self):
        if self._http is None:
            from hpcstage.sources import url

            refuse_offline()

            self._http = url.client(
                workers=self.opts.workers,
                timeout=self.opts.timeout,
                retry=self.opts.retry,
                max_connections=self.opts.max_connections,
            )
        return self._http

    def stage(self, entry: DataEntry, locked: LockedData | None) -> tuple[LockedData, DataResult]:
        """Stage one entry; returns its lock record. ExpectationFailed leaves the data and records nothing."""
        self.update = wants_update(self.updates, entry)
        dest = self.data_dir / entry.dest
        known = locked if locked is not None and locked.matches(entry) else None
        if known is None:
            rec = read_record(self.data_dir, entry.dest)
            known = rec if rec is not None and rec.matches(entry) else None
        if known is not None and not self.update and self._unchanged(entry, known):
            return known, DataResult(dest, entry.kind, len(known.files), _total(known), skipped=True)
        if (
            known is not None
            and self.update
            and not self.rebuild
            and isinstance(entry, UrlEntry)
            and known.fingerprint
            and in_place(self.data_dir, known)
        ):
            from hpcstage.sources import url

            refuse_offline()
            if url.unchanged(self.http, entry.url, known.fingerprint):  # one conditional request, no body
                return known, DataResult(dest, entry.kind, len(known.files), _total(known), skipped=True)
        lease = Lease(builder_lease(self.data_dir, entry.dest), ttl=LEASE_TTL, root=self.data_dir)
        lease.acquire()
        try:
            rec = read_record(self.data_dir, entry.dest)  # another process may have built it while we waited
            if rec is not None and rec.matches(entry) and not self.update and self._unchanged(entry, rec):
                return rec, DataResult(dest, entry.kind, len(rec.files), _total(rec), skipped=True)
            _remove_leftovers(self.data_dir, dest)
            folder, name = safefs.parent_of(self.data_dir, record_path(self.data_dir, entry.dest))
            folder.unlink(name)
            if isinstance(entry, UrlEntry):
                record, result = self._url(entry, known or locked, dest, lease)
            elif isinstance(entry, LocalEntry):
                record, result = self._local(entry, known, dest, lease)
            else:
                record, result = self._hub_file(entry, known, dest, lease)
            problems = archive.check_expect(dest, entry.expect.model_dump() if entry.expect else None)
            if problems:
                raise archive.ExpectationFailed(
                    f"{entry.dest} ({entry.source}): {'; '.join(problems)}; the data is left in {dest}: inspect it, "
                    "then fix the source or the entry's `expect:` (pulling again fetches the same data)"
                )
            lease.check()
            safefs.write_atomic(
                self.data_dir, record_path(self.data_dir, entry.dest), record.model_dump_json(indent=1).encode()
            )
            return record, result
        finally:
            lease.release()

    def fix_command(self, extra: str = "") -> str:
        m = shlex.quote(str(self.manifest_path)) if self.manifest_path else "MANIFEST"
        cache = f" --cache-dir {shlex.quote(str(self.cache_flag))}" if self.cache_flag else ""
        return f"hpcstage pull -f {m}{cache}" + (f" {extra}" if extra else "")

    def _unchanged(self, entry: DataEntry, record: LockedData) -> bool:
        if not in_place(self.data_dir, record):
            return False
        if isinstance(entry, LocalEntry):  # the source is local: a look (stat only) tells if it changed
            from hpcstage.sources import local

            return local.fingerprint(local.scan(entry.local)) == record.fingerprint
        return True

    def _progress(self, total: int, files: int, label: str) -> Progress:
        return Progress(total, files, label=label, quiet=self.opts.quiet)

    # -- url ----------------------------------------------------------------------------------------

    def _url(
        self, entry: UrlEntry, locked: LockedData | None, dest: Path, lease: Lease
    ) -> tuple[LockedData, DataResult]:
        from hpcstage.sources import url

        # The hash is pinned by the manifest, else by the lockfile after the first pull (unless --update).
        pinned = entry.sha256 or (
            locked.sha256 if locked is not None and locked.source == entry.url and not self.update else None
        )
        name = url.file_name(entry.url)

        def space(p: url.Probe) -> None:
            if p.size is None:
                return
            prog.total_bytes = p.size
            kind = archive.kind_from_name(name) or "tar.gz"
            unpacked = int(p.size * archive.EXPANSION.get(kind, 3.0)) if entry.extract else 0
            _check_space(
                self.data_dir,
                p.size + unpacked,
                f"{name} ({human_bytes(p.size)}" + (f" + about {human_bytes(unpacked)} unpacked)" if unpacked else ")"),
            )

        with self._progress(0, 1, f"download {name}") as prog:  # total set once the server told the size

            def on_bytes(n: int) -> None:
                if lease.lost:
                    raise TransferError(
                        f"{entry.dest}: lost the lease on its folder to another process; run pull again"
                    )
                prog.add(n)

            try:
                got = url.download(
                    self.http, entry.url, self.data_dir, sha256=pinned, on_bytes=on_bytes, before_fetch=space
                )
            except TransferError as e:
                if pinned and not entry.sha256 and isinstance(e, HashMismatch):
                    raise TransferError(
                        f"{entry.url} changed since it was locked (sha256 {pinned[:12]}... in "
                        f"hpcstage.lock); run `{self.fix_command(f'--update {entry.dest}')}` to "
                        "accept the new content"
                    ) from None
                raise
        result = DataResult(dest, "url", 0, 0, downloaded_bytes=got.fetched)
        kept = None
        if entry.extract:
            files = self._extract(got.path, dest, entry, lease, name)
            if entry.keep_archive:
                kept = str(got.path)
            else:
                got.path.unlink(missing_ok=True)
        else:
            with building(self.data_dir, dest) as tmp:
                safefs.opendir(self.data_dir, got.path.parent).replace(got.path.name, name, dst_dir=tmp)
                lease.check()
            files = [archive.FileRecord(name, got.size, got.sha256)]
        result.files, result.bytes = len(files), sum(f.size for f in files)
        record = LockedData(
            kind="url",
            source=entry.url,
            dest=entry.dest,
            extract=entry.extract,
            strip_components=entry.strip_components,
            sha256=got.sha256,
            size=got.size,
            fingerprint=got.fingerprint,
            archive=kept,
            files=[f.as_dict() for f in files],
        )
        return record, result

    def _extract(self, path: Path, dest: Path, entry: DataEntry, lease: Lease, name: str) -> list[archive.FileRecord]:
        kind = archive.detect(path, name)
        _check_space(dest.parent, archive.estimate_unpacked(path, kind), f"unpacking {name}")
        with building(self.data_dir, dest) as tmp:
            out = archive.extract_into(
                path,
                tmp.proc_path,
                limits=entry.limits(),
                strip_components=entry.strip_components,
                quiet=self.opts.quiet,
                name=name,
            )
            lease.check()
        return out.files

    # -- local --------------------------------------------------------------------------------------

    def _local(
        self, entry: LocalEntry, known: LockedData | None, dest: Path, lease: Lease
    ) -> tuple[LockedData, DataResult]:
        from hpcstage.sources import local

        files = local.scan(entry.local)
        fp = local.fingerprint(files)
        result = DataResult(dest, "local", 0, 0)
        if entry.extract:
            if len(files) != 1 or files[0].path != entry.local:
                raise BadInput(
                    f"{entry.dest}: `extract: true` needs `local:` to be an archive file, not the folder {entry.local}"
                )
            records = self._extract(entry.local, dest, entry, lease, entry.local.name)
        else:
            # Unchanged files are linked from the current dest (same size and mtime as the source), the
            # rest placed from the source; a different filesystem needs the bytes free.
            old = {f["path"]: f for f in known.files} if known is not None else {}
            same_fs = _same_fs(entry.local, self.data_dir)
            _check_space(self.data_dir, 0 if same_fs else sum(f.size for f in files), f"a copy of {entry.local}")
            records = []
            hows: dict[str, int] = {}
            with (
                self._progress(sum(f.size for f in files), len(files), f"copy {entry.dest}") as prog,
                building(self.data_dir, dest) as build,
            ):
                tmp = build.proc_path
                for f in files:
                    target = tmp / f.rel
                    target.parent.mkdir(parents=True, exist_ok=True)
                    current = dest / f.rel
                    prev = old.get(f.rel)
                    if prev is not None and _same_stat(current, f):
                        how, digest, copied = local.place(current, target, prog.add)
                        if digest != prev["sha256"]:  # the old copy was damaged: copy the source again
                            target.unlink()
                            how, digest, copied = local.place(f.path, target, prog.add)
                    else:
                        how, digest, copied = local.place(f.path, target, prog.add)
                    hows[how] = hows.get(how, 0) + 1
                    result.copied_bytes += copied
                    records.append(archive.FileRecord(f.rel, f.size, digest))
                    prog.file_done()
                    if lease.lost:
                        lease.check()
                lease.check()
            result.how = ", ".join(f"{n} {how}" for how, n in sorted(hows.items()))
        result.files, result.bytes = len(records), sum(r.size for r in records)
        record = LockedData(
            kind="local",
            source=str(entry.local),
            dest=entry.dest,
            extract=entry.extract,
            strip_components=entry.strip_components,
            fingerprint=fp,
            files=[r.as_dict() for r in records],
        )
        return record, result

    # -- one file of a Hub repo ---------------------------------------------------------------------

    def _hub_file(
        self, entry: HubFileEntry, known: LockedData | None, dest: Path, lease: Lease
    ) -> tuple[LockedData, DataResult]:
        from hpcstage.hub.pull import pull
        from hpcstage.sources import local

        hub_entry = entry.hub_entry()
        hub_lock = Lockfile()
        if known is not None and known.commit and known.blob_id and not self.update:
            file = {
                "path": entry.file,
                "size": known.size,
                "blob_id": known.blob_id,
                **({"sha256": known.sha256} if known.lfs else {}),
            }
            hub_lock = Lockfile(
                entries={
                    hub_entry.key: LockedEntry(
                        repo_type=entry.repo_type,
                        repo=entry.repo,
                        revision=entry.revision,
                        commit=known.commit,
                        include=[entry.file],
                        files=[file],
                    )
                }
            )
        summary, new_lock = pull([hub_entry], self.opts, hub_lock, self.update)
        locked = new_lock.entries[hub_entry.key]
        match = [f for f in locked.files if f["path"] == entry.file]
        if not match:
            raise BadInput(
                f"{entry.file} is not a file of {entry.repo_type} {entry.repo}@{entry.revision}; fix "
                "`file:` in the manifest"
            )
        f = match[0]
        path = summary.repos[0].snapshot / entry.file
        result = DataResult(dest, "hub-file", 0, 0, downloaded_bytes=summary.downloaded_bytes)
        if entry.extract:
            files = self._extract(path.resolve(), dest, entry, lease, f"{entry.repo}/{entry.file}")
            sha = f.get("sha256") or digest_file(path)
        else:
            with building(self.data_dir, dest) as tmp:
                # a copy (or copy-on-write reflink), never a hardlink: editing it must not alter the hub blob
                _, sha, result.copied_bytes = local.place(
                    path.resolve(), tmp.proc_path / Path(entry.file).name, lambda n: None, allow_hardlink=False
                )
            files = [archive.FileRecord(Path(entry.file).name, f["size"], sha)]
        result.files, result.bytes = len(files), sum(x.size for x in files)
        record = LockedData(
            kind="hub-file",
            source=entry.source,
            dest=entry.dest,
            extract=entry.extract,
            strip_components=entry.strip_components,
            sha256=f.get("sha256") or sha,
            size=f["size"],
            commit=locked.commit,
            blob_id=f["blob_id"],
            lfs=bool(f.get("sha256")),
            files=[x.as_dict() for x in files],
        )
        return record, result


def _total(record: LockedData) -> int:
    return sum(f["size"] for f in record.files)


def _same_fs(a: Path, b: Path) -> bool:
    b.mkdir(parents=True, exist_ok=True)
    try:
        return a.stat().st_dev == b.stat().st_dev
    except OSError:
        return False


def _same_stat(current: Path, f) -> bool:
    try:
        st = current.stat()
    except OSError:
        return False
    return st.st_size == f.size and st.st_mtime_ns == f.mtime_ns


def stage_all(
    manifest: Manifest, opts, lock: Lockfile, update: Update = False
) -> tuple[dict[str, LockedData], list[DataResult], list[HpcstageError]]:
    """Stage every data entry of `manifest`: (lock records of the staged ones, results, failures). One
    failing entry does not stop the others; the caller reports the failures."""
    # given with --cache-dir: the fix names it too
    flag = opts.cache_dir if opts.cache_dir and opts.cache_dir != manifest.cache_dir else None
    stager = Stager(data_dir_of(manifest, opts.cache_dir), opts, update, manifest_path=manifest.path, cache_flag=flag)
    records: dict[str, LockedData] = {}
    results: list[DataResult] = []
    failures: list[HpcstageError] = []
    for entry in manifest.data_entries:
        try:
            record, result = stager.stage(entry, lock.data.get(entry.key))
        except HpcstageError as e:
            e.entry_key = entry.key  # type: ignore[attr-defined]
            failures.append(e)
            continue
        records[entry.key] = record
        results.append(result)
    return records, results, failures


def lock_with_data(
    lock: Lockfile, manifest: Manifest, records: dict[str, LockedData], failures: list[HpcstageError]
) -> Lockfile:
    """`lock` with the data records of this run; an entry that failed loses its record (its folder may
    have been replaced by data that did not pass), one of another manifest's entries is dropped."""
    keep = {e.key for e in manifest.data_entries} - {getattr(e, "entry_key", None) for e in failures}
    data = {k: v for k, v in lock.data.items() if k in keep}
    data.update(records)
    return lock.model_copy(update={"data": data})


def first_failure(failures: list[HpcstageError]) -> HpcstageError:
    """One error for the CLI's one line naming every failed entry; the first's type keeps the exit code."""
    first = failures[0]
    if len(failures) == 1:
        err = first
    else:
        err = type(first)(f"{len(failures)} data entries failed: " + " | ".join(str(e) for e in failures))
    err.failures = [{"entry": getattr(e, "entry_key", None), "error": str(e)} for e in failures]  # type: ignore[attr-defined]
    return err


def describe(r: DataResult) -> str:
    what = (
        "in place"
        if r.skipped
        else (
            f"downloaded {human_bytes(r.downloaded_bytes)}"
            if r.kind != "local"
            else f"copied {human_bytes(r.copied_bytes)}" + (f" ({r.how})" if r.how else "")
        )
    )
    return f"data {r.kind} -> {r.dest}: {r.files} files, {human_bytes(r.bytes)}; {what}"


def check_entries(
    manifest: Manifest, cache_dir: Path | None, lock: Lockfile | None
) -> list[tuple[str, list[str], bool]]:
    """For `check`: each data entry's label, its problems ([] when ready: staged, in place, `expect:` met) and
    whether it is staged and in place (then only `expect:` can fail, and pulling again cannot fix that)."""
    data_dir = data_dir_of(manifest, cache_dir)
    out = []
    for entry in manifest.data_entries:
        label = f"data {entry.dest} ({entry.source})"
        record = (lock.data.get(entry.key) if lock else None) or read_record(data_dir, entry.dest)
        dest = data_dir / entry.dest
        if record is None or not record.matches(entry):
            # a pull that failed `expect:` leaves the data in place unrecorded: pulling again gets the same
            failed = archive.check_expect(dest, entry.expect.model_dump()) if entry.expect and dest.is_dir() else []
            if failed:
                out.append((label, [f"{dest} failed its `expect:`: {p}" for p in failed], True))
            else:
                out.append((label, [f"{dest} is not staged"], False))
            continue
        if not in_place(data_dir, record):
            out.append((label, [f"{dest} is missing files or they changed size since staging"], False))
            continue
        out.append((label, archive.check_expect(dest, entry.expect.model_dump() if entry.expect else None), True))
    return out


def verify_entries(
    manifest: Manifest, lock: Lockfile, cache_dir: Path | None, workers: int
) -> list[tuple[DataEntry, str, str, Path, str]]:
    """Offline: every file a data entry staged, hashed against its record in the lockfile (else the
    entry's staged record). Returns (entry, kind, path under dest, where, detail) for what is wrong."""
    from concurrent.futures import ThreadPoolExecutor

    data_dir = data_dir_of(manifest, cache_dir)
    found: list[tuple[DataEntry, str, str, Path, str]] = []
    checks: list[tuple[DataEntry, dict, Path]] = []
    for entry in manifest.data_entries:
        record = lock.data.get(entry.key) or read_record(data_dir, entry.dest)
        if record is None:
            found.append((entry, "not_staged", "", data_dir / entry.dest, "not staged"))
            continue
        for f in record.files:
            path = data_dir / entry.dest / f["path"]
            try:
                size = path.stat().st_size
            except OSError:
                found.append((entry, "missing", f["path"], path, "missing"))
                continue
            if size != f["size"]:
                found.append((entry, "corrupt", f["path"], path, f"size {size}, expected {f['size']}"))
            else:
                checks.append((entry, f, path))
    with ThreadPoolExecutor(max_workers=workers) as pool:
        digests = pool.map(lambda c: digest_file(c[2], "sha256"), checks)
        for (entry, f, path), digest in zip(checks, digests, strict=True):
            if digest != f["sha256"]:
                found.append((entry, "corrupt", f["path"], path, "sha256 differs from the lockfile"))
    return found


def restage(manifest: Manifest, entries: list[DataEntry], opts) -> None:
    """`verify --repair`: build these entries again from their sources (network for url/hub-file)."""
    stager = Stager(data_dir_of(manifest, opts.cache_dir), opts, update=True, rebuild=True)
    for entry in entries:
        stager.stage(entry, None)


def data_status(manifest: Manifest, lock: Lockfile, cache_dir: Path | None):
    """`status -f` rows for data entries: staged when its record exists and every file is in place
    (sizes only; `verify` hashes); partial or locked like Hub repos while a download or build is under way
    (a URL's partial file and its pieces, the download and builder leases)."""
    from hpcstage.ledger import ArtifactStatus

    data_dir = data_dir_of(manifest, cache_dir)
    rows = []
    for entry in manifest.data_entries:
        record = lock.data.get(entry.key) or read_record(data_dir, entry.dest)
        root = data_dir / entry.dest
        leases = [builder_lease(data_dir, entry.dest)]
        partials: list[Path] = []
        if isinstance(entry, UrlEntry):
            from hpcstage.sources import url

            leases.append(url.download_lease(data_dir, entry.url))
            partials = url.partials_of(data_dir, entry.url)
        if record is None:
            files = present = 0
        else:
            files = len(record.files)
            present = sum(
                1
                for f in record.files
                if (root / f["path"]).is_file() and (root / f["path"]).stat().st_size == f["size"]
            )
        st = ArtifactStatus("data", entry.dest, "", None, "missing", files, present, reason=entry.source)
        progress = st.look_at(partials, leases)
        if record is not None and present == files:
            st.state = "staged"
        elif st.locked_by:
            st.state = "locked"
        elif progress or present or root.exists():
            st.state = "partial"
        rows.append(st)
    return rows
