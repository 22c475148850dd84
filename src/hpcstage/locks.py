"""Lease locks that hold across processes and nodes on shared filesystems (Lustre, GPFS, NFS).

Why not a library: filelock's UnixFileLock (like huggingface_hub's locks) is `flock`, which raises ENOSYS
on Lustre mounted without `flock` and is node-local on some NFS/GPFS setups, so two nodes both "hold" it.
filelock's SoftFileLock (an O_EXCL file) works everywhere but never expires a dead holder's file: one
SIGKILLed job blocks everyone until a human deletes it.

A lease is a lock file created with O_CREAT|O_EXCL (atomic on NFSv3+, Lustre, GPFS) holding a small JSON
that names its owner: host, boot id, pid namespace, pid, process start time, a random token, created
time, ttl. While held, a heartbeat thread bumps the file's mtime every ttl/3 (after checking the file
still carries our token; if not, the lease is `lost`). A lease is stale when

* its owner is provably dead: same hostname, boot id and pid namespace as us, and the pid is gone, a
  zombie, or a different process (its start, in clock ticks since boot, differs: a count the wall clock
  never moves, where a start in wall time shifts whenever the clock is stepped). Judged at once, no
  waiting for the ttl; or
* `fs_now - mtime > ttl` (the owner's ttl), where fs_now is the mtime of a probe file touched now in the
  same directory. Both times come from the filesystem, so clock skew between nodes cancels where the
  server stamps times (NFS). Where clients stamp times, skew eats into the ttl: keep ttl far above it.

Every change to a lock file's name (create, takeover, release) happens under a guard, `<lock>.guard`,
another O_EXCL file held for a few metadata operations (stale when its local owner is dead or after
GUARD_TTL). Why: `rename` and `unlink` act on whatever is at the name at that moment. Without the guard,
a contender B that judged lease X stale could stall while C takes X over and creates a fresh lease; B
then moves C's fresh lease away, and if D creates on the free name before B can put it back, C and D
both hold. Under the guard nobody else creates or removes the name, so B's view can only change by the
holder's heartbeat, which the claim step below catches.

Claim step (`_claim`): rename the file to a unique name (atomic: of racing renamers exactly one succeeds,
the others get ENOENT), then judge what was actually moved. If it is still the file judged stale (same
inode, same bytes, still stale by a fresh fs clock) delete it. If not (its holder heartbeated in
between, or a second guard holder after a guard break raced us) put it back with `link`, which fails
with EEXIST instead of clobbering a newer lease; if it cannot go back, its holder's next heartbeat finds
its token gone and sets `lost`. So a holder that stalls past its ttl can lose the lease while it still
runs: check `lost` (or call `check()`) before committing work.

Files in a lock's directory: `<lock>`, `<lock>.guard`, `<lock>.claim-<hex>` (left only if a claimer dies
mid-claim) and `.hpcstage-probe-<hex>` (fs clock probes, same). Reads use open+fstat, not stat: NFS
revalidates attributes on open (close-to-open consistency), a bare stat may answer from its cache.

On a group-shared cache another member could plant a link at a lock's name or folder. Every operation
works by descriptor in the lock's folder, opened from a trusted `root` by safefs's link rule, and never
through a link at the name: a link found there reads as an expired lease of nobody and is removed.

Why one module of about 500 lines: the lease, its guard, the claim step and the filesystem clock are one
protocol (above); each part is correct only together with the others, so they are read and changed together.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import random
import secrets
import socket
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import psutil

from hpcstage import safefs
from hpcstage.errors import HpcstageError

DEFAULT_TTL = 60.0  # for lock files whose JSON is missing or unreadable (a creator died mid-write)
GUARD_TTL = 10.0  # a guard lives for milliseconds; one older than this belongs to a crashed process
_OFFSET_MAX_AGE = 30.0  # how long a measured fs-vs-local clock offset serves the no-guard fast path


class LeaseLost(HpcstageError):
    """Another process took the lease over (we stalled past the ttl) or it vanished: work done under it
    may have overlapped with someone else's, so do not commit it."""


class LockTimeout(HpcstageError):
    """`acquire(timeout=...)` ran out while a live owner held the lease."""


@dataclass(frozen=True)
class LeaseInfo:
    """A lock file as judged now. `created` is the owner's wall clock at creation (informational);
    `age` is seconds since the last heartbeat by the filesystem's clock; `ttl` is the owner's."""

    host: str
    pid: int
    token: str
    created: float
    age: float
    expired: bool
    ttl: float


def _read_text(path: str) -> str:
    try:
        return Path(path).read_text().strip()
    except OSError:
        return ""


_HOST = socket.gethostname()
_BOOT = _read_text("/proc/sys/kernel/random/boot_id")
try:
    _PIDNS = os.readlink("/proc/self/ns/pid")
except OSError:
    _PIDNS = ""
_me_cache: dict[int, dict] = {}


def _start_ticks(pid: int) -> int | None:
    """When `pid` started, in clock ticks since boot (field 22 of /proc/<pid>/stat); None where unreadable.
    psutil's create_time adds the boot time the kernel derives from the wall clock: one clock step (a VM's
    time sync) moves it for every process, and a live holder would look like another process on its pid."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            fields = f.read().rsplit(b")", 1)[1].split()  # the name before ")" may hold spaces
        return int(fields[19])
    except (OSError, IndexError, ValueError):
        return None


def _me() -> dict:
    """Who we are, for the lock file. Cached per pid (a forked child is someone else). `start` (wall time)
    stays for readers of earlier versions; `ticks` is what this version compares."""
    pid = os.getpid()
    if pid not in _me_cache:
        _me_cache.clear()
        start = psutil.Process(pid).create_time()
        me = {"host": _HOST, "boot": _BOOT, "pidns": _PIDNS, "pid": pid, "start": start, "ticks": _start_ticks(pid)}
        _me_cache[pid] = me
    return _me_cache[pid]


def _record(token: str, ttl: float) -> bytes:
    return json.dumps({**_me(), "token": token, "created": time.time(), "ttl": ttl}).encode()


def _num(meta: dict, key: str, default: float) -> float:
    value = meta.get(key)
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else default


def _dead_local(meta: dict) -> bool:
    """True only when the owner provably is gone. A pid means something only on the same host, boot and
    pid namespace (containers share hostnames); anything uncertain counts as alive."""
    if (meta.get("host"), meta.get("boot"), meta.get("pidns")) != (_HOST, _BOOT, _PIDNS):
        return False
    pid = int(_num(meta, "pid", 0))
    if pid <= 0:
        return False
    try:
        proc = psutil.Process(pid)
        if proc.status() == psutil.STATUS_ZOMBIE:  # killed, not yet reaped: it will never heartbeat
            return True
        ticks, now = meta.get("ticks"), _start_ticks(pid)
        if type(ticks) is int and now is not None:  # pid reused: another process started on it
            return ticks != now
        # a lease of an earlier version: its start in wall time, within a second
        return abs(proc.create_time() - _num(meta, "start", proc.create_time())) > 1.0
    except psutil.NoSuchProcess:  # includes ZombieProcess
        return True
    except psutil.Error:  # access denied and the like: cannot tell
        return False


def fs_now(directory: str | Path | safefs.Dir) -> float:
    """The filesystem's current time: the mtime of a probe file touched now in `directory`.

    Lock mtimes are stamped by the filesystem too, so comparing against this instead of time.time()
    keeps a node with a wrong clock from expiring live leases early (or dead ones never)."""
    d = directory if isinstance(directory, safefs.Dir) else safefs.opendir(directory, create=False)
    probe = f".hpcstage-probe-{secrets.token_hex(6)}"
    fd = d.create(probe, 0o600)
    try:
        os.utime(fd)  # "now" as the filesystem stamps it (NFS: the server's clock)
        return os.fstat(fd).st_mtime
    finally:
        os.close(fd)
        with contextlib.suppress(OSError):
            d.unlink(probe)


_offsets: dict[str, tuple[float, float]] = {}  # directory -> (monotonic when measured, fs - local)


def _fs_clock(directory: safefs.Dir, fresh: bool) -> float:
    """fs_now, or (fresh=False) local time plus a recently measured offset: good enough to skip the
    guard when a lease is clearly live; every takeover decision re-checks with fresh=True."""
    key = str(directory.path)
    hit = _offsets.get(key)
    if fresh or hit is None or time.monotonic() - hit[0] > _OFFSET_MAX_AGE:
        try:
            now = fs_now(directory)
        except OSError:  # read-only directory (e.g. `status` by another user): the local clock it is
            return time.time()
        _offsets[key] = (time.monotonic(), now - time.time())
        return now
    return time.time() + hit[1]


@dataclass(frozen=True)
class _Seen:
    """One read of a lock file: bytes, identity, mtime, parsed JSON ({} if empty or garbled)."""

    raw: bytes
    ino: tuple[int, int]
    mtime: float
    meta: dict


def _read(d: safefs.Dir, name: str) -> _Seen | None:
    try:
        fd = d.open(name, os.O_RDONLY | os.O_NONBLOCK)
    except FileNotFoundError:
        return None
    except OSError as e:
        if e.errno != errno.ELOOP:
            raise
        try:  # a link planted at the name: an expired lease of nobody, removed by the next claim
            st = d.lstat(name)
        except FileNotFoundError:
            return None
        return _Seen(b"", (st.st_dev, st.st_ino), 0.0, {})
    try:
        st = os.fstat(fd)
        raw = os.read(fd, 1 << 16)
    finally:
        os.close(fd)
    try:
        meta = json.loads(raw)
    except ValueError:
        meta = {}
    return _Seen(raw, (st.st_dev, st.st_ino), st.st_mtime, meta if isinstance(meta, dict) else {})


def _stale(seen: _Seen, directory: safefs.Dir, default_ttl: float, fresh: bool) -> bool:
    if _dead_local(seen.meta):
        return True
    return _fs_clock(directory, fresh) - seen.mtime > _num(seen.meta, "ttl", default_ttl)


def _still_stale(seen: _Seen, directory: safefs.Dir, default_ttl: float) -> Callable[[_Seen], bool]:
    """Claim predicate: the moved file is the very one judged stale, and it is still stale."""
    return lambda moved: moved.ino == seen.ino and moved.raw == seen.raw and _stale(moved, directory, default_ttl, True)


def _create(d: safefs.Dir, name: str, data: bytes) -> bool:
    """O_EXCL-create `name` holding `data`; False if it exists. 0o664 (minus umask): group-readable."""
    try:
        fd = d.create(name, 0o664)
    except FileExistsError:
        return False
    try:
        os.write(fd, data)
    except BaseException:
        os.close(fd)
        with contextlib.suppress(OSError):
            d.unlink(name)
        raise
    os.close(fd)
    return True


def _claim(d: safefs.Dir, name: str, ok: Callable[[_Seen], bool]) -> bool:
    """Remove `name` if the file there passes `ok`; True if removed. See the module docstring: rename
    first (only one racer gets the file), judge what was moved, put it back if it was not ours to take."""
    moved = f"{name}.claim-{secrets.token_hex(6)}"
    try:
        d.rename(name, moved)
    except FileNotFoundError:
        return False
    seen = _read(d, moved)
    if seen is not None and ok(seen):
        d.unlink(moved)
        return True
    try:
        d.link(moved, name)  # EEXIST rather than clobber a lease created meanwhile
    except FileExistsError:
        pass  # the moved lease's holder will see its token gone and set `lost`
    except FileNotFoundError:
        return False  # the moved file vanished (a careless cleanup): nothing to put back
    except OSError:  # no hard links on this filesystem; under the guard nobody creates the name
        if not d.exists(name):
            d.rename(moved, name)
            return False
    d.unlink(moved)
    return False


def _take_guard(d: safefs.Dir, lock: str) -> str | None:
    """One try (breaking a stale guard on the way) at `<lock>.guard`; its token, or None if busy."""
    guard = lock + ".guard"
    for _ in range(2):
        token = secrets.token_hex(8)
        if _create(d, guard, _record(token, GUARD_TTL)):
            return token
        seen = _read(d, guard)
        if seen is not None:
            if not _stale(seen, d, GUARD_TTL, fresh=False):
                return None
            _claim(d, guard, _still_stale(seen, d, GUARD_TTL))
    return None


@contextlib.contextmanager
def _guarded(d: safefs.Dir, lock: str, wait: float) -> Iterator[bool]:
    """Hold the guard for the block (yields False if it stayed busy for `wait` seconds)."""
    deadline = time.monotonic() + wait
    while (token := _take_guard(d, lock)) is None and time.monotonic() < deadline:
        time.sleep(random.uniform(0.002, 0.02))
    try:
        yield token is not None
    finally:
        if token is not None:
            with contextlib.suppress(OSError):  # if this fails the guard simply expires
                _claim(d, lock + ".guard", lambda s: s.meta.get("token") == token)


class Lease:
    """A lease on `path`: exclusive across processes and nodes while held and not `lost`.

    Not reentrant. Use as a context manager, or try_acquire() to do other work while someone else holds
    it. A SIGKILLed holder's lease is taken over at once on its own host, after `ttl` from elsewhere.
    """

    def __init__(
        self, path: str | Path, ttl: float = 60.0, heartbeat: float | None = None, root: str | Path | None = None
    ):
        self.path = Path(path).absolute()
        # the trusted folder the lock lives below (a shared cache): no other user's link below it is followed
        self.root = Path(root).absolute() if root is not None else self.path.parent
        self._dir: safefs.Dir | None = None
        self.ttl = float(ttl)
        self.heartbeat = self.ttl / 3 if heartbeat is None else float(heartbeat)
        if not 0 < self.heartbeat < self.ttl:
            raise ValueError(f"need 0 < heartbeat < ttl, got heartbeat={self.heartbeat}, ttl={self.ttl}")
        self._token: str | None = None
        self._pid = 0
        self._lost = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    @property
    def held(self) -> bool:
        return self._token is not None and not self._lost.is_set()

    @property
    def lost(self) -> bool:
        """Set when the heartbeat (or release) found the lock file no longer ours."""
        return self._lost.is_set()

    def check(self) -> None:
        """Raise LeaseLost if the lease was lost: call before committing work done under it."""
        if self._lost.is_set():
            raise LeaseLost(
                f"lease {self.path} was lost: another process took it over after this one "
                f"stalled past ttl={self.ttl:g}s; redo the work under a new lease"
            )

    def try_acquire(self) -> bool:
        """Take the lease if it is free, expired or its owner is dead; never blocks."""
        if self._token is not None:
            raise RuntimeError(f"{self.path}: this Lease is held or lost; release() it first (not reentrant)")
        directory = self._dir = safefs.opendir(self.root, self.path.parent)
        name = self.path.name
        seen = _read(directory, name)
        if seen is not None and not _stale(seen, directory, self.ttl, fresh=False):
            return False  # a live owner: cheap answer, no guard traffic from waiters
        with _guarded(directory, name, wait=0) as ok:
            if not ok:
                return False  # someone else is acquiring or releasing right now
            for _ in range(3):
                token = secrets.token_hex(16)
                if _create(directory, name, _record(token, self.ttl)):
                    self._start(token)
                    return True
                seen = _read(directory, name)
                if seen is not None:
                    if not _stale(seen, directory, self.ttl, fresh=True):
                        return False
                    _claim(directory, name, _still_stale(seen, directory, self.ttl))
        return False

    def acquire(self, timeout: float | None = None, poll: float = 0.2) -> None:
        """Wait until the lease is ours; LockTimeout after `timeout` seconds (None: forever)."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while not self.try_acquire():
            left = None if deadline is None else deadline - time.monotonic()
            if left is not None and left <= 0:
                info = read_lease(self.path)
                owner = f"{info.host} pid {info.pid}, last heartbeat {info.age:.1f}s ago" if info else "?"
                raise LockTimeout(f"{self.path}: still held after {timeout:g}s by {owner}")
            nap = poll * random.uniform(0.5, 1.5)  # jitter: waiters on many nodes do not poll in step
            time.sleep(nap if left is None else min(nap, left))

    def release(self) -> None:
        """Stop the heartbeat; delete the lock file only if it still carries our token."""
        token, self._token = self._token, None
        if token is None:
            return
        self._stop.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join()
        self._thread = None
        if os.getpid() != self._pid:
            return  # a forked child's copy: the parent's lease is not ours to remove
        d, name = self._dir, self.path.name
        assert d is not None
        seen = _read(d, name)
        if seen is None or seen.meta.get("token") != token:
            self._lost.set()
            return
        with _guarded(d, name, wait=GUARD_TTL * 1.5):  # on a stuck guard, the claim alone is still safe
            if not _claim(d, name, lambda s: s.meta.get("token") == token):
                self._lost.set()

    def __enter__(self) -> Lease:
        self.acquire()
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self.release()
        if exc_type is None:
            self.check()

    def _start(self, token: str) -> None:
        self._token, self._pid = token, os.getpid()
        self._lost.clear()
        self._stop.clear()
        self._thread = threading.Thread(target=self._beat_loop, name=f"lease {self.path.name}", daemon=True)
        self._thread.start()

    def _beat_loop(self) -> None:
        last_ok = time.monotonic()
        while not self._stop.wait(self.heartbeat):
            state = self._beat()
            if state:
                last_ok = time.monotonic()
            elif state is False or time.monotonic() - last_ok > self.ttl:  # unrefreshed past ttl: expired
                self._lost.set()
                return

    def _beat(self) -> bool | None:
        """Touch the lock file if it still carries our token. True: refreshed; False: not ours any more;
        None: I/O error, try again next beat."""
        assert self._dir is not None
        for attempt in range(2):
            try:
                fd = self._dir.open(self.path.name, os.O_RDONLY | os.O_NONBLOCK)
            except FileNotFoundError:
                if attempt == 0:  # a claimer may be putting it back this very moment
                    time.sleep(0.05)
                    continue
                return False
            except OSError:
                return None
            try:
                try:
                    meta = json.loads(os.read(fd, 1 << 16))
                except ValueError:
                    return False  # being rewritten: by someone else, never by us
                if not isinstance(meta, dict) or meta.get("token") != self._token:
                    return False
                os.utime(fd)  # on the inode we just checked, stamped by the filesystem
                return True
            except OSError:
                return None
            finally:
                os.close(fd)
        return False


def _folder(path: Path, root: str | Path | None) -> safefs.Dir | None:
    try:
        return safefs.opendir(Path(root).absolute() if root is not None else path.parent, path.parent, create=False)
    except FileNotFoundError:
        return None


def read_lease(path: str | Path, root: str | Path | None = None) -> LeaseInfo | None:
    """The lease at `path` judged now by the filesystem's clock, or None if there is none."""
    path = Path(path).absolute()
    d = _folder(path, root)
    seen = _read(d, path.name) if d is not None else None
    if d is None or seen is None:
        return None
    meta, ttl = seen.meta, _num(seen.meta, "ttl", DEFAULT_TTL)
    age = _fs_clock(d, fresh=False) - seen.mtime  # cheap enough for `status` over many locks
    return LeaseInfo(
        host=str(meta.get("host", "")),
        pid=int(_num(meta, "pid", 0)),
        token=str(meta.get("token", "")),
        created=_num(meta, "created", seen.mtime),
        age=max(age, 0.0),
        expired=_dead_local(meta) or age > ttl,
        ttl=ttl,
    )


def break_expired(path: str | Path, root: str | Path | None = None) -> bool:
    """Remove the lease at `path` only if it is expired or its owner dead (for `hpcstage cleanup`)."""
    path = Path(path).absolute()
    d = _folder(path, root)
    if d is None:
        return False
    name = path.name
    seen = _read(d, name)
    if seen is None or not _stale(seen, d, DEFAULT_TTL, fresh=True):
        return False
    with _guarded(d, name, wait=1.0) as ok:
        seen = _read(d, name) if ok else None
        if seen is None or not _stale(seen, d, DEFAULT_TTL, fresh=True):
            return False
        return _claim(d, name, _still_stale(seen, d, DEFAULT_TTL))
