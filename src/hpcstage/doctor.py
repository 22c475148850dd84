"""`hpcstage doctor`: what on this node would make a pull or a job fail, found in seconds, with the fix.

`run_checks()` returns one `Check` per name below, always all of them and always in this order (a check
that cannot apply here says so with status "ok" and a "skipped: ..." detail). The JSON form printed by
`hpcstage doctor --json` is this list, each item `{"name", "status", "detail", "fix"}` with status one of
"ok", "warn", "fail" and `fix` "" when there is nothing to do. Exit code 1 when any check fails.

  space       free bytes on the cache's filesystem against the bytes the lockfile says are still to fetch
  inodes      free inodes there against the files (blobs and snapshot links) still to create
  quota       `lfs quota -u USER MOUNT` on Lustre, `quota -s` elsewhere; warns above 90% of a limit
  memory      available memory (psutil); warns under 2 GiB
  filesystem  the cache's filesystem type from /proc/self/mountinfo (longest mount point that contains it)
  flock       whether fcntl.flock works on this node (huggingface_hub's locks need it, and whether it excludes
              other nodes depends on the mount; hpcstage's leases do not rely on it)
  write       create and delete a probe file in the cache folder (or the parent that would hold it)
  sharing     a group-shared cache (manifest `shared_group`, or a folder owned by a non-primary group)
              needs setgid and group-writable folders
  xet_store   whether the cache-wide Xet blob store (xetstore.py) is on and usable: the switch, hf_xet,
              symlinks (a probe link made and removed), the store folder's marker and write access
  hf_home     HF_HOME (default ~/.cache/huggingface) under $HOME on a small filesystem or quota
  token       a token (HF_TOKEN or the token file) and whether the endpoint accepts it (whoami-v2)
  endpoint    HF_ENDPOINT answers HTTP within the timeout (any status proves it is reachable)
  offline     HF_HUB_OFFLINE / HF_DATASETS_OFFLINE / TRANSFORMERS_OFFLINE set outside a Slurm job
  cpu_limit   a finite per-process CPU time limit (`ulimit -t`) that kills long downloads on login nodes

Nothing here prints, and nothing is written but the probe file and probe link. The plan comes from
`hpcstage.lock` and the cache, never from the network; the two network checks run concurrently in daemon
threads under one deadline, so a hung DNS lookup or a black-holed endpoint cannot hold the whole report past it.

Why one module of about 1,000 lines: fifteen checks, each a short function with its own fix text, sharing
one context (`_Context`: the manifest, the cache folder, its mount and free space, whether this is a Slurm
job) and one order (CHECK_NAMES); the parsers of `/proc/self/mountinfo` and `quota` output sit beside the
checks that use them, as pure functions tests call directly. Split per check, the context and the order
would be spread over as many files.
"""

from __future__ import annotations

import errno
import fcntl
import grp
import json
import os
import pwd
import re
import resource
import secrets
import shutil
import stat
import subprocess
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from hpcstage.errors import HpcstageError
from hpcstage.hfcache import RepoCache, default_cache_dir, default_datasets_cache_dir, hf_home
from hpcstage.manifest import Manifest, load_lock
from hpcstage.progress import human_bytes

CHECK_NAMES = (
    "space",
    "inodes",
    "quota",
    "memory",
    "filesystem",
    "flock",
    "write",
    "sharing",
    "xet_store",
    "hf_home",
    "token",
    "proxy",
    "endpoint",
    "offline",
    "cpu_limit",
)
STATUSES = ("ok", "warn", "fail")

GiB = 2**30
MIN_MEMORY = 2 * GiB
SMALL_HOME = 100 * GiB  # an HF_HOME filesystem (or quota) below this fills up with one large model
QUOTA_WARN = 0.90
SHARED_FS = {
    "lustre": "Lustre",
    "gpfs": "GPFS",
    "nfs": "NFS",
    "nfs4": "NFS",
    "beegfs": "BeeGFS",
    "ceph": "CephFS",
    "cifs": "SMB",
    "smb3": "SMB",
    "wekafs": "WekaFS",
    "panfs": "PanFS",
    "fuse.gpfs": "GPFS",
    "fuse.sshfs": "SSHFS",
    "fuse.juicefs": "JuiceFS",
}
MEMORY_FS = {"tmpfs", "ramfs"}
OFFLINE_VARS = ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE")
PROBE_PREFIX = ".hpcstage-probe-"  # the prefix locks.py uses for its probes: leftovers are recognisable
WHOAMI_PROBE = "/api/whoami-v2"


@dataclass(frozen=True)
class Check:
    name: str
    status: str  # ok | warn | fail
    detail: str
    fix: str = ""

    def as_dict(self) -> dict:
        return asdict(self)


def as_json(checks: list[Check]) -> str:
    return json.dumps([c.as_dict() for c in checks], indent=1)


def exit_code(checks: list[Check]) -> int:
    return 1 if any(c.status == "fail" for c in checks) else 0


# -- the filesystem a path lives on -----------------------------------------------------------------


@dataclass(frozen=True)
class Mount:
    mountpoint: str
    fstype: str
    source: str
    options: str  # per-mount and superblock options, comma-separated

    @property
    def shared(self) -> bool:
        return self.fstype in SHARED_FS

    @property
    def label(self) -> str:
        kind = SHARED_FS.get(self.fstype)
        return f"{self.fstype} ({kind}, shared)" if kind else self.fstype


def _unescape(field: str) -> str:
    """mountinfo writes space, tab, newline and backslash in paths as octal escapes (\\040)."""
    return re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), field)


def parse_mountinfo(text: str) -> list[Mount]:
    """The mounts in /proc/self/mountinfo: `id parent dev root mountpoint opts [tags] - fstype source superopts`."""
    mounts = []
    for line in text.splitlines():
        left, sep, right = line.partition(" - ")
        if not sep:
            continue
        lf, rf = left.split(), right.split()
        if len(lf) < 6 or len(rf) < 2:
            continue
        mounts.append(Mount(_unescape(lf[4]), rf[0], _unescape(rf[1]), ",".join([lf[5], *rf[2:3]])))
    return mounts


def mount_of(path: Path, mounts: list[Mount]) -> Mount | None:
    """The mount that contains `path` (resolved): the longest mount point that is a prefix of it; for
    a point mounted twice, the later one (it hides the earlier)."""
    target = str(path)
    best: Mount | None = None
    for m in mounts:
        mp = m.mountpoint.rstrip("/") or "/"
        if target == mp or target.startswith(mp if mp == "/" else mp + "/"):
            if best is None or len(mp) >= len(best.mountpoint.rstrip("/") or "/"):
                best = m
    return best


def _mounts() -> list[Mount]:
    try:
        return parse_mountinfo(Path("/proc/self/mountinfo").read_text())
    except OSError:
        import psutil

        return [Mount(p.mountpoint, p.fstype, p.device, p.opts) for p in psutil.disk_partitions(all=True)]


def existing(path: Path) -> Path:
    """`path` resolved, or its nearest existing parent when it does not exist yet (pull will create it)."""
    path = Path(os.path.abspath(path))
    while not path.exists() and path != path.parent:
        path = path.parent
    return path.resolve()


# -- the quota tools ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Quota:
    filesystem: str  # as the tool names it: a mount point (lfs) or a device / server:/export (quota)
    used: int  # bytes
    limit: int  # bytes; the hard limit, else the soft quota; 0 = none
    files: int
    files_limit: int

    def over(self, share: float) -> list[str]:
        out = []
        if self.limit and self.used > share * self.limit:
            out.append(f"{human_bytes(self.used)} of {human_bytes(self.limit)} ({100 * self.used / self.limit:.0f}%)")
        if self.files_limit and self.files > share * self.files_limit:
            out.append(f"{self.files} of {self.files_limit} files ({100 * self.files / self.files_limit:.0f}%)")
        return out


_UNITS = {"": 1, "K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40, "P": 2**50}
_NUMBER = re.compile(r"(\d+(?:\.\d+)?)([KMGTPkmgtp]?)\*?")  # `1234`, `1234*` (over quota), `20G`, `10k`


def _amount(token: str, unit: int, files: bool = False) -> int:
    m = _NUMBER.fullmatch(token)
    assert m, token
    number, suffix = float(m.group(1)), m.group(2).upper()
    if files:  # file counts: k, m, ... are powers of 1000
        return int(number * 1000 ** " KMGTP".index(suffix or " "))
    return int(number * (_UNITS[suffix] if suffix else unit))


def parse_quota(text: str, unit: int = 1024) -> list[Quota]:
    """Rows of `quota -s` or `lfs quota -u USER MOUNT` output: `fs used quota limit [grace] files quota limit
    [grace]`. Grace columns are empty, `-` or text (`6days`, `none`), never a bare number, so the numbers in
    order are the space triple then the files triple. A long fs name may sit alone on its own line. Bare
    space numbers are `unit` bytes (both tools count 1 KiB blocks); suffixed ones (quota -s) carry theirs."""
    rows: list[Quota] = []
    pending: str | None = None
    for line in text.splitlines():
        parts = line.split()
        if not parts or parts[0] in ("Disk", "Filesystem"):
            continue
        if len(parts) == 1 and not _NUMBER.fullmatch(parts[0]):
            pending = parts[0]
            continue
        if pending is not None and _NUMBER.fullmatch(parts[0]):
            parts = [pending, *parts]
        pending = None
        nums = [v for v in parts[1:] if _NUMBER.fullmatch(v)]
        if len(nums) < 3:
            continue
        used, soft, hard = (_amount(v, unit) for v in nums[:3])
        files = [_amount(v, unit, files=True) for v in nums[3:6]] + [0, 0, 0]
        rows.append(Quota(parts[0], used, hard or soft, files[0], files[2] or files[1]))
    return rows


def _user() -> str:
    try:
        return pwd.getpwuid(os.getuid()).pw_name
    except KeyError:
        return os.environ.get("USER") or str(os.getuid())


def _run_quota(mount: Mount | None, timeout: float) -> tuple[list[str], list[Quota] | None, str]:
    """(argv, rows or None when no tool ran, why not)."""
    if mount is not None and mount.fstype == "lustre" and shutil.which("lfs"):
        argv = ["lfs", "quota", "-u", _user(), mount.mountpoint]
    elif shutil.which("quota"):
        argv = ["quota", "-s"]
    else:
        return (
            [],
            None,
            "no `quota`" + (" or `lfs`" if mount is not None and mount.fstype == "lustre" else "") + " on PATH",
        )
    try:
        r = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL)
    except subprocess.TimeoutExpired:
        return argv, None, f"`{' '.join(argv)}` gave no answer in {timeout:g}s"
    except OSError as e:
        return argv, None, f"`{argv[0]}` could not run: {e.strerror}"
    return argv, parse_quota(r.stdout), (r.stderr.strip().splitlines() or [""])[-1]


# -- the plan ---------------------------------------------------------------------------------------


@dataclass
class Plan:
    known: bool  # every entry has a matching lockfile entry
    bytes: int = 0  # still to fetch
    files: int = 0  # blobs still to fetch
    inodes: int = 0  # blobs + links + folders still to create
    unknown: list[str] = field(default_factory=list)
    problem: str = ""


def plan_of(manifest: Manifest, cache_dir: Path) -> Plan:
    """What `pull -f` would still write, from the lockfile and the cache alone (no network). A partial
    download counts by what it has already allocated."""
    try:
        lock = load_lock(manifest.lock_path)
    except HpcstageError as e:
        return Plan(False, unknown=[e.key for e in manifest.entries], problem=str(e))
    plan = Plan(True, unknown=[])
    seen: set[tuple[str, str]] = set()
    for entry in manifest.entries:
        locked = lock.entries.get(entry.key)
        if locked is None or not locked.matches(entry):
            plan.known = False
            plan.unknown.append(entry.key)
            continue
        cache = RepoCache(cache_dir, entry.repo_type, entry.repo)
        new_repo = not cache.root.exists()
        plan.inodes += 8 if new_repo else 0  # repo folder, blobs, snapshots, commit, refs, trees, ...
        for f in locked.cached_files():
            if new_repo or not cache.is_linked(locked.commit, f):
                plan.inodes += 1
            if (cache.folder_name, f.etag) in seen or (not new_repo and cache.has_blob(f)):
                continue
            seen.add((cache.folder_name, f.etag))
            have = 0
            try:
                have = min(f.size, cache.partial(f.etag).stat().st_blocks * 512)
            except OSError:
                pass
            plan.bytes += f.size - have
            plan.files += 1
            plan.inodes += 1
    return plan


# -- the checks -------------------------------------------------------------------------------------


class _Context:
    def __init__(self, manifest: Manifest | None, cache_dir: Path | None):
        self.manifest = manifest
        self.m = str(manifest.path) if manifest is not None and manifest.path else "hpcstage.yaml"
        self.cache_dir = Path(cache_dir or (manifest.cache_dir if manifest else None) or default_cache_dir())
        self.datasets_dir = Path((manifest.datasets_cache_dir if manifest else None) or default_datasets_cache_dir())
        self.at = existing(self.cache_dir)  # the cache, or the folder pull would create it in
        self.mounts = _mounts()
        self.mount = mount_of(self.at, self.mounts)
        self.vfs = os.statvfs(self.at)
        self.in_job = bool(os.environ.get("SLURM_JOB_ID"))
        self.offline = [v for v in OFFLINE_VARS if _truthy(os.environ.get(v))]

    @property
    def where(self) -> str:
        mp = self.mount.mountpoint if self.mount else str(self.at)
        return f"{mp} ({self.mount.fstype})" if self.mount else mp


def _truthy(value: str | None) -> bool:
    return (value or "").strip().upper() in ("1", "ON", "YES", "TRUE")


def _space(ctx: _Context, plan: Plan | None) -> Check:
    free = ctx.vfs.f_bavail * ctx.vfs.f_frsize
    total = ctx.vfs.f_blocks * ctx.vfs.f_frsize
    margin = min(GiB, total // 20)
    have = f"{human_bytes(free)} free of {human_bytes(total)} on {ctx.where}"
    if plan is None:
        if free < margin:
            return Check("space", "warn", f"only {have}", "free space there or point --cache-dir elsewhere")
        return Check("space", "ok", f"{have}; no manifest, so no plan to compare (pass -f MANIFEST)")
    if not plan.known:
        why = plan.problem or f"no lockfile entry for {', '.join(plan.unknown)}"
        return Check(
            "space",
            "warn",
            f"{have}; plan unknown: {why}",
            f"run `hpcstage pull -f {ctx.m}` once on a node with internet, or use --dry-run",
        )
    need = f"{human_bytes(plan.bytes)} still to fetch ({plan.files} files)"
    data = len(getattr(ctx.manifest, "data_entries", None) or [])
    if data:  # url/local/file entries: their sizes are not in the Hub plan
        need += f" for the Hub entries ({data} url/local/file entries not counted)"
    if plan.bytes > free:
        return Check(
            "space",
            "fail",
            f"{need} but {have}: short by {human_bytes(plan.bytes - free)}",
            f"free {human_bytes(plan.bytes - free)} there, or set `cache_dir:` in {ctx.m} "
            "(or --cache-dir) to a larger filesystem, e.g. /p/scratch/...",
        )
    if free - plan.bytes < margin:
        return Check(
            "space",
            "warn",
            f"{need}; {have}: under {human_bytes(margin)} would be left",
            "free space there, or move the cache to a larger filesystem",
        )
    return Check("space", "ok", f"{need}; {have}")


def _inodes(ctx: _Context, plan: Plan | None) -> Check:
    total, free = ctx.vfs.f_files, ctx.vfs.f_favail
    if total == 0:
        return Check("inodes", "ok", f"{ctx.where} reports no inode limit")
    have = f"{free} of {total} inodes free on {ctx.where}"
    need = plan.inodes if plan is not None and plan.known else 0
    if need > free:
        return Check(
            "inodes",
            "fail",
            f"about {need} files to create but {have}",
            "delete unused files there (`hpcstage cleanup`, old snapshots) or move the cache",
        )
    if free - need < total // 20:
        return Check(
            "inodes",
            "warn",
            f"{have}" + (f"; about {need} to create" if need else ""),
            "delete unused files there (`hpcstage cleanup`) or move the cache",
        )
    return Check("inodes", "ok", have + (f"; about {need} files to create" if need else ""))


def _quota(ctx: _Context, found: tuple[list[str], list[Quota] | None, str]) -> Check:
    argv, rows, why = found
    if rows is None:
        return Check("quota", "ok", f"skipped: {why}")
    tool = " ".join(argv[:2])
    if not rows:
        return Check("quota", "ok", f"`{tool}` reports no quota" + (f" ({why})" if why else ""))
    high = [(q, q.over(QUOTA_WARN)) for q in rows]
    high = [(q, o) for q, o in high if o]
    if high:
        return Check(
            "quota",
            "warn",
            "; ".join(f"{q.filesystem}: {', '.join(o)}" for q, o in high),
            "delete old snapshots (`hpcstage cleanup`) or ask for a larger quota; keep the cache on scratch",
        )
    return Check(
        "quota",
        "ok",
        "; ".join(
            f"{q.filesystem}: {human_bytes(q.used)} of {human_bytes(q.limit) if q.limit else 'no limit'}" for q in rows
        ),
    )


def _memory() -> Check:
    import psutil

    vm = psutil.virtual_memory()
    text = f"{human_bytes(vm.available)} available of {human_bytes(vm.total)}"
    if vm.available < MIN_MEMORY:
        return Check(
            "memory",
            "warn",
            text + f" (under {human_bytes(MIN_MEMORY)})",
            "hashing and dataset builds need memory: use fewer --workers, or a node with more free memory",
        )
    return Check("memory", "ok", text)


def _filesystem(ctx: _Context) -> Check:
    if ctx.mount is None:
        return Check("filesystem", "ok", f"skipped: no mount found for {ctx.at}")
    m = ctx.mount
    text = f"{ctx.cache_dir} is on {m.label} mounted at {m.mountpoint} from {m.source}"
    if m.fstype in MEMORY_FS:
        return Check(
            "filesystem",
            "warn",
            text + ": memory-backed, gone at reboot, invisible to other nodes",
            "put the cache on a shared filesystem (--cache-dir or the manifest's `cache_dir:`)",
        )
    if not m.shared:
        text += "; local: jobs on other nodes see it only if they mount the same disk"
    return Check("filesystem", "ok", text)


def _probe(ctx: _Context) -> tuple[Check, Check]:
    """(flock, write) from one probe file created, locked and removed in the cache folder."""
    folder = ctx.at
    label = str(folder) + (
        "" if folder == ctx.cache_dir.resolve() else f" (nearest existing parent of {ctx.cache_dir})"
    )
    probe = folder / f"{PROBE_PREFIX}{secrets.token_hex(6)}"
    try:
        fd = os.open(probe, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600)
    except OSError as e:
        fix = (
            "pick a folder you can write (--cache-dir, the manifest's `cache_dir:`), or ask its owner "
            "for write access" + ("; for a group cache: `chmod g+ws` it" if e.errno == errno.EACCES else "")
        )
        return (
            Check("flock", "ok", "skipped: no probe file could be created"),
            Check("write", "fail", f"cannot create a file in {label}: {e.strerror}", fix),
        )
    try:
        flock = _flock_check(ctx, fd)
    finally:
        os.close(fd)
        try:
            os.unlink(probe)
            write = Check("write", "ok", f"created and removed a file in {label}")
        except OSError as e:
            write = Check(
                "write",
                "fail",
                f"created {probe} but cannot remove it: {e.strerror}",
                "check the folder's sticky bit and ownership; remove the probe by hand",
            )
    return flock, write


def _flock_check(ctx: _Context, fd: int) -> Check:
    fs = ctx.mount.fstype if ctx.mount else "this filesystem"
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        fcntl.flock(fd, fcntl.LOCK_UN)
    except OSError as e:
        if e.errno in (errno.ENOSYS, errno.EOPNOTSUPP, errno.ENOTSUP, errno.EINVAL, errno.ENOLCK):
            hint = " (Lustre mounted without the `flock` option)" if fs == "lustre" else ""
            return Check(
                "flock",
                "warn",
                "flock does not work here: huggingface_hub's own locks fail; hpcstage's "
                f"leases do not need it ({errno.errorcode.get(e.errno, e.errno)} on {fs}{hint})",
                f"stage with `hpcstage pull -f {ctx.m}` (not `hf download`); ask admins to mount with `flock`",
            )
        return Check(
            "flock",
            "warn",
            f"flock failed on {fs}: {e.strerror}",
            f"stage with `hpcstage pull -f {ctx.m}`; its leases do not use flock",
        )
    # One node can only see that flock works here; whether it also excludes processes on other nodes depends
    # on the mount (Lustre `flock` vs `localflock`, the NFS lock manager, GPFS), which it cannot test alone.
    opts = ctx.mount.options.split(",") if ctx.mount else []
    if fs == "lustre" and "localflock" in opts:
        return Check(
            "flock",
            "ok",
            "flock works on this node, but Lustre is mounted with `localflock`: it excludes "
            "nobody on other nodes, so huggingface_hub's locks do not either; hpcstage's leases do not rely on "
            "flock",
            f"build datasets caches once (`hpcstage prebuild -f {ctx.m}`) before fanning out jobs",
        )
    if fs in SHARED_FS:
        return Check(
            "flock",
            "ok",
            f"flock works on this node; whether it excludes other nodes depends on how "
            f"{SHARED_FS[fs]} is mounted, which one node cannot test (huggingface_hub's locks rely on it); "
            "hpcstage's leases do not rely on flock",
            f"build datasets caches once (`hpcstage prebuild -f {ctx.m}`) before fanning out jobs",
        )
    return Check(
        "flock",
        "ok",
        f"flock works on this node ({fs}); whether it excludes other nodes depends on the "
        "mount, which one node cannot test; hpcstage's leases do not rely on flock",
    )


def _sharing(ctx: _Context) -> Check:
    want = ctx.manifest.shared_group if ctx.manifest is not None else None
    folder = ctx.cache_dir
    try:
        st = folder.stat()
    except OSError:
        return Check(
            "sharing",
            "ok",
            f"{folder} does not exist yet" + (f"; pull creates it shared with group {want}" if want else ""),
        )
    group = _group_name(st.st_gid)
    if want is None and st.st_gid == os.getgid():
        return Check("sharing", "ok", f"not group-shared (owned by your primary group {group})")
    problems = []
    if want is not None and want not in (group, str(st.st_gid)):
        problems.append(f"owned by group {group}, not {want}")
    if not st.st_mode & stat.S_ISGID:
        problems.append("no setgid bit (new files would not inherit the group)")
    if st.st_mode & 0o070 != 0o070:
        problems.append(f"group cannot write (mode {stat.S_IMODE(st.st_mode):o})")
    target = want or group
    text = f"{folder}: group {group}, mode {stat.S_IMODE(st.st_mode):o}"
    if problems:
        return Check(
            "sharing",
            "warn",
            f"{text}: " + "; ".join(problems),
            f"`hpcstage pull -f {ctx.m} --shared-group {target}` applies the group and bits, "
            f"or `chgrp -R {target} {folder} && chmod g+ws {folder}`",
        )
    return Check("sharing", "ok", f"{text}: shared with group {group} (setgid, group-writable)")


def _xet_store(ctx: _Context) -> Check:
    """The shared Xet blob store: on or off, and if on, whether a pull here can use it (nothing created)."""
    from hpcstage.xetstore import MARKER, XetStore, disabled_by_env, hf_xet_available

    if disabled_by_env():
        return Check("xet_store", "ok", "off: HF_HUB_DISABLE_SHARED_BLOBS is set, so every repo keeps its own copy")
    if not hf_xet_available():
        return Check(
            "xet_store",
            "warn",
            "off: hf_xet is not installed (it checks each Xet hash), so every repo keeps its own copy of shared files",
            "`pip install hf_xet` in hpcstage's environment",
        )
    store = XetStore(ctx.cache_dir)
    probe = ctx.at / f"{PROBE_PREFIX}{secrets.token_hex(6)}"
    try:
        os.symlink(probe.name + "-target", probe)
        os.unlink(probe)
    except OSError as e:
        return Check(
            "xet_store",
            "warn",
            f"off: cannot make a symlink in {ctx.at} ({e.strerror}), so every repo keeps its own copy",
            "put the cache on a filesystem with symlinks (huggingface_hub needs them too)",
        )
    if not store.root.exists():
        return Check("xet_store", "ok", f"on: {store.root} is created by the first pull of a Xet file")
    if not store.is_marked():
        return Check(
            "xet_store",
            "warn",
            f"off: {store.root} exists without huggingface_hub's marker {MARKER}, so neither tool uses it",
            f"move {store.root} out of the cache if it is not a store",
        )
    if not os.access(store.root, os.W_OK | os.X_OK):
        return Check(
            "xet_store",
            "warn",
            f"{store.root} is not writable by you: shared files you pull get their own copy per repo",
            "ask its owner to share it (`hpcstage pull --shared-group GROUP`)",
        )
    s = store.saved()
    return Check(
        "xet_store",
        "ok",
        f"on: {s.contents} contents ({human_bytes(s.stored)}) in {store.root}, {human_bytes(s.saved)} saved",
    )


def _group_name(gid: int) -> str:
    try:
        return grp.getgrgid(gid).gr_name
    except KeyError:
        return str(gid)


def _site_home_quota() -> tuple[str, int] | None:
    """(cluster, bytes) of the $HOME quota the cluster registry gives this machine's cluster, if any."""
    from hpcstage.slurm.clusters import RegistryError, detect

    try:
        cluster = detect()
    except RegistryError:
        return None
    if cluster is None or not cluster.home_quota_bytes:
        return None
    return cluster.name, cluster.home_quota_bytes


def _hf_home(ctx: _Context, quotas: list[Quota] | None) -> Check:
    home_dir = hf_home()
    try:
        user_home = Path.home().resolve()
    except (KeyError, RuntimeError):
        return Check("hf_home", "ok", "skipped: no home folder")
    at = existing(home_dir)
    under = at == user_home or user_home in at.parents
    follows = [
        name
        for name, p in (("hub cache", ctx.cache_dir), ("datasets cache", ctx.datasets_dir))
        if Path(os.path.abspath(p)) == Path(os.path.abspath(home_dir))
        or Path(os.path.abspath(home_dir)) in Path(os.path.abspath(p)).parents
    ]
    source = "HF_HOME" if os.environ.get("HF_HOME") else "HF_HOME (default)"
    text = f"{source}={home_dir}"
    if not under:
        return Check("hf_home", "ok", f"{text} is outside $HOME")
    vfs = os.statvfs(at)
    size = vfs.f_blocks * vfs.f_frsize
    mount = mount_of(at, ctx.mounts)
    limit = 0
    for q in quotas or []:
        if mount is not None and q.filesystem in (mount.mountpoint, mount.source) and q.limit:
            limit = q.limit
    small = [f"its filesystem holds {human_bytes(size)}"] if size < SMALL_HOME else []
    if limit and limit < SMALL_HOME:
        small.append(f"your quota there is {human_bytes(limit)}")
    elif not limit and (site := _site_home_quota()) and site[1] < SMALL_HOME:
        # GPFS quotas (JSC's $HOME) are not what `quota` reports: the registry knows the site's default.
        small.append(f"{site[0]}'s $HOME quota is {human_bytes(site[1])} (cluster registry)")
    if not small:
        return Check("hf_home", "ok", f"{text} is under $HOME on a {human_bytes(size)} filesystem")
    if not follows:
        return Check(
            "hf_home",
            "ok",
            f"{text} is under $HOME and small ({'; '.join(small)}), but the hub and datasets caches are elsewhere",
        )
    return Check(
        "hf_home",
        "warn",
        f"{text} is under $HOME and {'; '.join(small)}; the {' and '.join(follows)} default to it",
        f"export HF_HOME=/p/scratch/<project>/$USER/huggingface (a scratch filesystem), or set `cache_dir:` in {ctx.m}",
    )


# -- the network checks (concurrent, under one deadline) --------------------------------------------


def _http(timeout: float):
    from hpcstage.transfer import Http, RetryPolicy

    return Http(
        {}, pool_size=2, connect_timeout=timeout, read_timeout=timeout, retry=RetryPolicy(attempts=1, budget=timeout)
    )


def _get(http, url: str, headers: dict[str, str]) -> tuple[int, bytes]:
    resp = http.request("GET", url, headers=headers, what=f"GET {url}")
    try:
        return resp.status, resp.read(1 << 16)
    finally:
        resp.release_conn()


def _why(e: BaseException) -> str:
    """A short reason, told by the error's type (the transfer engine chains the network error it gave up on)."""
    import socket
    import ssl

    from hpcstage.errors import ProxyError

    cause = e
    while cause.__cause__ is not None and not isinstance(cause, ProxyError):
        cause = cause.__cause__
    if isinstance(cause, ProxyError):
        return str(cause)
    if isinstance(cause, ssl.SSLCertVerificationError):
        return "TLS certificate not trusted"
    if isinstance(cause, ConnectionRefusedError):
        return "connection refused"
    if isinstance(cause, (TimeoutError, socket.timeout)):
        return "timed out"
    if isinstance(cause, socket.gaierror):
        return "host name not resolvable now" if cause.errno == socket.EAI_AGAIN else "host name not found"
    if isinstance(cause, OSError) and cause.errno == errno.ENETUNREACH:
        return "network unreachable"
    return str(e).split(": ", 1)[-1][:200]


def _proxy_check(endpoint: str, timeout: float) -> Check:
    """Which proxy the environment applies to the endpoint, and whether its tunnel opens."""
    from hpcstage.errors import BadInput
    from hpcstage.transfer import Proxies, open_connection

    try:
        proxy = Proxies().for_url(endpoint)
    except BadInput as e:
        return Check("proxy", "fail", str(e), "set HTTPS_PROXY=http://[user:password@]host:port, or unset it")
    if proxy is None:
        names = [
            n
            for n in ("HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy", "ALL_PROXY", "all_proxy")
            if os.environ.get(n)
        ]
        bypass = " (NO_PROXY excludes it)" if names else ""
        return Check("proxy", "ok", f"no proxy for {endpoint}{bypass}: direct connections")
    way = "CONNECT tunnel" if endpoint.startswith("https:") else "connection"
    try:
        open_connection(endpoint, timeout)
    except Exception as e:  # noqa: BLE001 - any failure to get through is the finding
        return Check(
            "proxy",
            "fail",
            f"{proxy.variable} {proxy.name} applies to {endpoint}; the {way} failed: {_why(e)}",
            "check the proxy's host, port and user:password (http://user:password@host:port), "
            "or ask the site which proxy login nodes use",
        )
    return Check("proxy", "ok", f"{proxy.variable} {proxy.name} applies to {endpoint}; the {way} opens")


def _endpoint_check(ctx: _Context, endpoint: str, timeout: float) -> Check:
    entry = ctx.manifest.entries[0] if ctx.manifest is not None and ctx.manifest.entries else None
    url = f"{endpoint}/api/{entry.repo_type}s/{entry.repo}" if entry else f"{endpoint}/api/models/hpcstage/doctor-probe"
    started = time.monotonic()
    try:
        status, _ = _get(_http(timeout), url, {})
    except Exception as e:  # noqa: BLE001 - any failure to get an answer is the finding
        why = _why(e)
        if ctx.offline:
            state = "ok" if ctx.in_job else "warn"
            return Check(
                "endpoint",
                state,
                f"{endpoint} did not answer ({why}); offline flags are set, so only the staged cache is used",
                "" if ctx.in_job else f"stage on a node with internet: `hpcstage pull -f {ctx.m}`",
            )
        return Check(
            "endpoint",
            "fail",
            f"{endpoint} did not answer: {why}",
            "run pull on a login node with internet; check HF_ENDPOINT"
            + (" (unset it for huggingface.co)" if os.environ.get("HF_ENDPOINT") else "")
            + " and any proxy",
        )
    took = time.monotonic() - started
    return Check("endpoint", "ok", f"{endpoint} answered {status} in {took:.2f}s")


def _token_check(endpoint: str, token: str | None, source: str, timeout: float) -> Check:
    if not token:
        return Check(
            "token",
            "warn",
            "no token (HF_TOKEN or token file): public repos work, gated and private ones fail",
            "`hf auth login` or export HF_TOKEN (a read token) for gated/private repos",
        )
    from hpcstage.sources.hub import hub_headers

    try:
        status, body = _get(_http(timeout), f"{endpoint}{WHOAMI_PROBE}", hub_headers(token))
    except Exception as e:  # noqa: BLE001
        return Check("token", "warn", f"token from {source}; not checked: {endpoint} did not answer ({_why(e)})")
    if status == 200:
        try:
            name = json.loads(body).get("name")
        except (ValueError, AttributeError):
            name = None
        return Check(
            "token", "ok", f"token from {source} accepted" + (f" (user {name})" if isinstance(name, str) else "")
        )
    if status == 404:
        return Check("token", "warn", f"token from {source}; endpoint has no whoami; token not checked", "")
    if status in (401, 403):
        return Check(
            "token",
            "fail",
            f"token from {source} rejected by {endpoint} ({status})",
            "create a new read token and `hf auth login` (or export HF_TOKEN)",
        )
    return Check("token", "warn", f"token from {source}; whoami answered {status}; token not checked", "")


def _token_source() -> tuple[str | None, str]:
    from huggingface_hub import get_token

    token = get_token()
    if os.environ.get("HF_TOKEN"):
        return token, "HF_TOKEN"
    if os.environ.get("HUGGING_FACE_HUB_TOKEN"):
        return token, "HUGGING_FACE_HUB_TOKEN"
    return token, "the token file"


class _Background:
    """Run `fn` in a daemon thread; `result(deadline)` gives its value or `late()` when past the deadline
    (the thread is abandoned: a hung DNS lookup must not hold the report)."""

    def __init__(self, fn: Callable, late: Callable):
        self._value: Any = None
        self._late, self._done = late, threading.Event()
        self._thread = threading.Thread(target=self._run, args=(fn,), daemon=True)
        self._thread.start()

    def _run(self, fn: Callable) -> None:
        try:
            self._value = fn()
        except Exception as e:  # noqa: BLE001 - a bug here must not take the other checks down
            self._value = e
        finally:
            self._done.set()

    def result(self, deadline: float):
        if not self._done.wait(max(0.0, deadline - time.monotonic())):
            return self._late()
        if isinstance(self._value, Exception):
            raise self._value
        return self._value


# -- the rest ---------------------------------------------------------------------------------------


def _offline(ctx: _Context) -> Check:
    if not ctx.offline:
        return Check("offline", "ok", "no offline flags set")
    names = ", ".join(f"{v}={os.environ[v]}" for v in ctx.offline)
    if ctx.in_job:
        return Check(
            "offline", "ok", f"{names} inside Slurm job {os.environ['SLURM_JOB_ID']}: jobs read the staged cache"
        )
    hub = "HF_HUB_OFFLINE" in ctx.offline
    what = (
        "`hpcstage pull` refuses to fetch while HF_HUB_OFFLINE is set (as huggingface_hub does; a warm pull "
        "from the lockfile still works)"
        if hub
        else "prebuild and datasets cannot fetch while it is set"
    )
    return Check(
        "offline",
        "warn",
        f"{names} is set outside a Slurm job: {what}",
        f"unset it on the login node: `unset {' '.join(ctx.offline)}`",
    )


def _cpu_limit(ctx: _Context) -> Check:
    soft, hard = resource.getrlimit(resource.RLIMIT_CPU)
    if soft == resource.RLIM_INFINITY:
        return Check("cpu_limit", "ok", "no CPU time limit (ulimit -t unlimited)")
    return Check(
        "cpu_limit",
        "warn",
        f"processes here are killed after {soft} s of CPU time (ulimit -t {soft}, "
        f"about {soft / 60:.0f} min): a long pull (hashing, many files) can be killed part way",
        f"run the pull in tmux/screen on a node without the limit, or as Slurm jobs: "
        f"`hpcstage pull -f {ctx.m} --slurm-array N`; a killed pull resumes where it stopped",
    )


def run_checks(
    manifest: Manifest | None = None,
    cache_dir: Path | None = None,
    *,
    endpoint: str | None = None,
    token: str | None = None,
    timeout: float = 2.0,
) -> list[Check]:
    """Every check in CHECK_NAMES order. `token=None` finds it as huggingface_hub does (HF_TOKEN, token file);
    `endpoint=None` is HF_ENDPOINT. Network checks and the quota tool share one deadline of `timeout` + 0.5 s."""
    from hpcstage.sources.hub import endpoint as env_endpoint

    ctx = _Context(manifest, cache_dir)
    endpoint = (endpoint or env_endpoint()).rstrip("/")
    source = "the caller"
    if token is None:
        token, source = _token_source()
    deadline = time.monotonic() + timeout + 0.5
    silent = f"gave no answer within {timeout:g}s"

    def late_endpoint() -> Check:
        fix = "" if ctx.offline else "run pull on a login node with internet; check HF_ENDPOINT and any proxy"
        return Check("endpoint", "warn" if ctx.offline else "fail", f"{endpoint} {silent}", fix)

    def late_token() -> Check:
        return Check("token", "warn", f"token from {source}; not checked: {endpoint}{WHOAMI_PROBE} {silent}")

    quota_job = _Background(
        lambda: _run_quota(ctx.mount, timeout), lambda: ([], None, f"the quota tool gave no answer within {timeout:g}s")
    )
    endpoint_job = _Background(lambda: _endpoint_check(ctx, endpoint, timeout), late_endpoint)
    token_job = _Background(lambda: _token_check(endpoint, token, source, timeout), late_token)
    proxy_job = _Background(
        lambda: _proxy_check(endpoint, timeout),
        lambda: Check("proxy", "fail", f"the way to {endpoint} {silent}", "check the proxy"),
    )

    plan = plan_of(manifest, ctx.cache_dir) if manifest is not None else None
    space, inodes, memory, fs = _space(ctx, plan), _inodes(ctx, plan), _memory(), _filesystem(ctx)
    flock, write = _probe(ctx)
    sharing, offline, cpu = _sharing(ctx), _offline(ctx), _cpu_limit(ctx)
    found = quota_job.result(deadline)
    checks = [
        space,
        inodes,
        _quota(ctx, found),
        memory,
        fs,
        flock,
        write,
        sharing,
        _xet_store(ctx),
        _hf_home(ctx, found[1]),
        token_job.result(deadline),
        proxy_job.result(deadline),
        endpoint_job.result(deadline),
        offline,
        cpu,
    ]
    assert tuple(c.name for c in checks) == CHECK_NAMES
    return checks
