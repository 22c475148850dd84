"""Lease locks with real processes: exclusion, dead and expired holders, heartbeat, loss, takeover races."""
from __future__ import annotations

import contextlib
import json
import os
import socket
import subprocess
import sys
import textwrap
import time
from functools import partial
from pathlib import Path

import helpers
import pytest

from hpcstage import locks
from hpcstage import safefs
from hpcstage.locks import Lease, LeaseLost, LockTimeout, break_expired, fs_now, read_lease

pytestmark = pytest.mark.timeout(60)
wait_for = partial(helpers.wait_for, interval=0.005)  # lease timings here are sub-second


def spawn(code: str, *args) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", textwrap.dedent(code), *map(str, args)],
                            stdout=subprocess.PIPE, text=True)


def age_file(path: Path, seconds: float) -> None:
    """Make `path` look last touched `seconds` ago by the filesystem's clock (instead of sleeping)."""
    t = fs_now(path.parent) - seconds
    os.utime(path, (t, t))


def dead_pid() -> int:
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


def write_foreign(path: Path, ttl: float, token: str = "foreign") -> None:
    """A lease owned by a process on another node. Its pid is dead *here*, which must not matter."""
    path.write_text(json.dumps({"host": "node-elsewhere-17", "boot": "x", "pidns": "pid:[1]",
                                "pid": dead_pid(), "start": 1.0, "token": token,
                                "created": time.time(), "ttl": ttl}))


def replace_json(path: Path, **changes) -> None:
    """Rewrite the lock file atomically (a reader never sees it half-written)."""
    meta = json.loads(path.read_text())
    tmp = path.with_name("rewrite.tmp")
    tmp.write_text(json.dumps({**meta, **changes}))
    os.replace(tmp, path)


HOLDER = """
    import sys, time
    from hpcstage.locks import Lease
    Lease(sys.argv[1], ttl=60).acquire(timeout=10)
    print("held", flush=True)
    time.sleep(120)
"""


def test_mutual_exclusion_across_processes(tmp_path):
    workers, rounds = 8, 25
    lock, counter, busy, log = (tmp_path / n for n in ("x.lock", "counter", "busy", "log"))
    counter.write_text("0")
    code = """
        import os, sys, time
        from hpcstage.locks import Lease
        lock, counter, busy, log, rounds = sys.argv[1:]
        lease = Lease(lock, ttl=10)
        for _ in range(int(rounds)):
            lease.acquire(timeout=30, poll=0.005)
            try:
                overlap = False
                try:
                    os.close(os.open(busy, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
                except FileExistsError:
                    overlap = True
                t0 = time.time()
                value = int(open(counter).read())
                time.sleep(0.001)
                with open(counter, "w") as f:
                    f.write(str(value + 1))
                t1 = time.time()
                if not overlap:
                    os.unlink(busy)
            finally:
                lease.release()
            fd = os.open(log, os.O_WRONLY | os.O_APPEND | os.O_CREAT)
            os.write(fd, f"{'OVERLAP' if overlap else 'ok'} {t0!r} {t1!r}\\n".encode())
            os.close(fd)
    """
    procs = [spawn(code, lock, counter, busy, log, rounds) for _ in range(workers)]
    assert [p.wait(timeout=50) for p in procs] == [0] * workers
    assert int(counter.read_text()) == workers * rounds
    lines = [line.split() for line in log.read_text().splitlines()]
    assert len(lines) == workers * rounds
    assert all(kind == "ok" for kind, _, _ in lines)
    spans = sorted((float(a), float(b)) for _, a, b in lines)
    assert all(prev[1] <= nxt[0] for prev, nxt in zip(spans, spans[1:])), "critical sections overlapped"
    assert not lock.exists()


def test_sigkilled_holder_is_taken_over_at_once_on_same_host(tmp_path):
    lock = tmp_path / "x.lock"
    holder = spawn(HOLDER, lock)
    try:
        assert holder.stdout.readline().strip() == "held"
        info = read_lease(lock)
        assert (info.host, info.pid, info.expired) == (socket.gethostname(), holder.pid, False)
        other = Lease(lock, ttl=60)
        assert not other.try_acquire()
        holder.kill()  # SIGKILL, and not reaped yet: a zombie holder counts as dead too
        t0 = time.monotonic()
        wait_for(other.try_acquire, 2.0, "takeover of the killed holder's lease")
        assert time.monotonic() - t0 < 2.0  # far below the 60 s ttl
        assert read_lease(lock).pid == os.getpid()
        other.release()
        assert not lock.exists()
    finally:
        holder.kill()
        holder.wait()


def test_foreign_host_lease_waits_for_its_ttl_by_fs_clock(tmp_path):
    lock = tmp_path / "x.lock"
    write_foreign(lock, ttl=2)
    contender = Lease(lock, ttl=30)  # the owner's ttl (2 s) decides, not ours
    assert not contender.try_acquire()
    age_file(lock, 1.5)
    assert not contender.try_acquire()
    info = read_lease(lock)
    assert info.host == "node-elsewhere-17" and not info.expired and 1.4 < info.age < 2.0
    with pytest.raises(LockTimeout, match="node-elsewhere-17"):
        contender.acquire(timeout=0.1, poll=0.02)
    age_file(lock, 2.5)
    assert read_lease(lock).expired
    assert contender.try_acquire()
    assert read_lease(lock).host == socket.gethostname()
    contender.release()


def test_heartbeat_keeps_lease_alive_past_several_ttls(tmp_path):
    lock = tmp_path / "x.lock"
    with Lease(lock, ttl=2.0, heartbeat=0.1) as lease:  # a beat may be late by 1.9 s on a loaded machine
        # Pretend the owner is on another node: only the heartbeat's mtime keeps it alive now.
        replace_json(lock, host="node-elsewhere-17")
        contender = Lease(lock, ttl=2.0)
        ages, t_end = [], time.monotonic() + 6.5
        while time.monotonic() < t_end:
            info = read_lease(lock)
            ages.append(info.age)
            assert not info.expired
            assert not contender.try_acquire()
            time.sleep(0.1)
        assert max(ages) < 2.0 and len(ages) > 20
        assert lease.held and not lease.lost
    assert not lock.exists()


def test_holder_sees_lost_when_taken_over(tmp_path):
    lock = tmp_path / "x.lock"
    lease = Lease(lock, ttl=1.5, heartbeat=0.1)
    lease.acquire(timeout=5)
    lease.check()
    replace_json(lock, token="intruder")
    wait_for(lambda: lease.lost, 1.0, "lost")
    assert not lease.held
    with pytest.raises(LeaseLost):
        lease.check()
    lease.release()
    assert read_lease(lock).token == "intruder"

    other = tmp_path / "y.lock"
    with pytest.raises(LeaseLost):
        with Lease(other, ttl=1.5, heartbeat=0.1) as held:
            replace_json(other, token="intruder")
            wait_for(lambda: held.lost, 1.0, "lost")
    assert read_lease(other).token == "intruder"


def test_release_never_deletes_someone_elses_lease(tmp_path):
    lock = tmp_path / "x.lock"
    a = Lease(lock, ttl=30)
    a.acquire(timeout=5)
    age_file(lock, 60)  # a stalled past its ttl (alive, so only the ttl can expire it)
    b = Lease(lock, ttl=30)
    assert b.try_acquire()
    a.release()
    assert a.lost and b.held
    info = read_lease(lock)
    assert info is not None and not info.expired
    Lease(lock).release()  # never acquired: a no-op
    assert read_lease(lock).token == info.token
    b.release()
    assert not lock.exists()


RACER = """
    import os, sys, time
    from pathlib import Path
    from hpcstage.locks import Lease
    lock, sync, me, rounds = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3], int(sys.argv[4])
    (sync / f"ready-{me}").touch()
    for r in range(rounds):
        while not (sync / f"go-{r}").exists():
            time.sleep(0.0005)
        lease = Lease(lock, ttl=30)
        won = lease.try_acquire()
        (sync / f"tmp-{me}").write_text("win" if won else "lose")
        os.replace(sync / f"tmp-{me}", sync / f"res-{r}-{me}")
        if won:
            while not (sync / f"end-{r}").exists():
                time.sleep(0.002)
            lease.release()
"""


def test_takeover_race_has_exactly_one_winner(tmp_path):
    n, rounds = 12, 4
    lock, sync = tmp_path / "x.lock", tmp_path / "sync"
    sync.mkdir()
    procs = [spawn(RACER, lock, sync, i, rounds) for i in range(n)]
    try:
        wait_for(lambda: len(list(sync.glob("ready-*"))) == n, 30, "racers to start")
        for r in range(rounds):
            if r % 2:  # a holder SIGKILLed on this host
                holder = spawn(HOLDER, lock)
                assert holder.stdout.readline().strip() == "held"
                holder.kill()
                holder.wait()
            else:  # a lease from another node, past its ttl
                write_foreign(lock, ttl=1)
                age_file(lock, 5)
            (sync / f"go-{r}").touch()
            wait_for(lambda: len(list(sync.glob(f"res-{r}-*"))) == n, 20, "race results")
            results = [p.read_text() for p in sync.glob(f"res-{r}-*")]
            assert results.count("win") == 1, f"round {r}: {results.count('win')} winners"
            (sync / f"end-{r}").touch()
            wait_for(lambda: not lock.exists(), 5, "the winner's release")
        assert [p.wait(timeout=10) for p in procs] == [0] * n
    finally:
        for p in procs:
            p.kill()
            p.wait()
    assert not [p.name for p in tmp_path.iterdir() if p.name not in ("sync",)]  # no guard/claim/probe left


def test_files_parents_modes_and_cleanup_helpers(tmp_path):
    lock = tmp_path / "a" / "b" / "x.lock"
    assert read_lease(lock) is None and not break_expired(lock)
    old = os.umask(0o002)
    try:
        lease = Lease(lock, ttl=5, heartbeat=0.05)
        assert lease.try_acquire()
    finally:
        os.umask(old)
    assert lock.stat().st_mode & 0o777 == 0o664
    meta = json.loads(lock.read_text())
    assert (meta["host"], meta["pid"], meta["ttl"]) == (socket.gethostname(), os.getpid(), 5)
    with pytest.raises(RuntimeError):
        lease.try_acquire()
    assert not break_expired(lock)  # live
    age_file(lock, 10)
    assert break_expired(lock) and not lock.exists()
    wait_for(lambda: lease.lost, 5, "lost after cleanup broke the lease")
    lease.release()
    with pytest.raises(ValueError):
        Lease(lock, ttl=1, heartbeat=2)


def test_stale_guard_is_broken_fresh_guard_is_respected(tmp_path):
    lock = tmp_path / "x.lock"
    guard = tmp_path / "x.lock.guard"
    write_foreign(guard, ttl=locks.GUARD_TTL)
    lease = Lease(lock, ttl=5)
    assert not lease.try_acquire()  # someone on another node is mid-acquire
    age_file(guard, locks.GUARD_TTL + 1)  # ...and crashed there
    assert lease.try_acquire()
    assert not guard.exists()
    lease.release()
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def test_claim_puts_back_what_is_not_the_stale_lease(tmp_path, monkeypatch):
    """The takeover's re-check, driven step by step (internals): contender B judges a lease stale, then
    stalls; whatever it moves later must go back unless it is still that very stale file."""
    lock = tmp_path / "x.lock"
    d = safefs.opendir(tmp_path)
    write_foreign(lock, ttl=1)
    age_file(lock, 5)
    judged = locks._read(d, "x.lock")  # B: stale
    c = Lease(lock, ttl=30, heartbeat=0.05)
    assert c.try_acquire()  # C takes over while B stalls
    token = json.loads(lock.read_text())["token"]
    assert not locks._claim(d, "x.lock", locks._still_stale(judged, d, 30))  # B moves C's lease...
    assert json.loads(lock.read_text())["token"] == token  # ...and puts it back
    time.sleep(0.2)
    assert c.held and not c.lost  # C's heartbeat never noticed
    c.release()

    h = Lease(lock, ttl=2, heartbeat=0.5)
    assert h.try_acquire()
    age_file(lock, 5)
    judged = locks._read(d, "x.lock")  # stale: h looks stalled...
    os.utime(lock)  # ...but heartbeats before B's claim
    assert not locks._claim(d, "x.lock", locks._still_stale(judged, d, 2))
    assert lock.exists() and h.held
    h.release()
    assert not lock.exists()

    # Put-back impossible because a newer lease took the name meanwhile: the newer one stays, and the
    # holder of the moved one finds out through its heartbeat.
    m = Lease(lock, ttl=2, heartbeat=0.05)
    assert m.try_acquire()
    judged = locks._read(d, "x.lock")
    real_read = locks._read

    def read_then_intrude(folder, name):
        seen = real_read(folder, name)
        if ".claim-" in name:
            write_foreign(lock, ttl=30, token="newer")
        return seen

    monkeypatch.setattr(locks, "_read", read_then_intrude)
    assert not locks._claim(d, "x.lock", lambda s: False)
    monkeypatch.setattr(locks, "_read", real_read)
    assert read_lease(lock).token == "newer"
    wait_for(lambda: m.lost, 1.0, "lost")
    m.release()
    assert read_lease(lock).token == "newer"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["x.lock"]


def test_a_container_with_the_same_host_name_is_not_judged_dead_by_pid(tmp_path):
    """Two containers (or nodes) may share a host name: a pid means something only with the same boot id
    and pid namespace, so such a holder waits for its ttl instead of being taken over at once."""
    lock = tmp_path / "x.lock"
    same_host_other_ns = {"host": socket.gethostname(), "boot": locks._BOOT, "pidns": "pid:[4026599999]",
                          "pid": dead_pid(), "start": 1.0, "token": "theirs", "created": time.time(), "ttl": 30}
    lock.write_text(json.dumps(same_host_other_ns))
    assert not Lease(lock, ttl=30).try_acquire()
    assert read_lease(lock).expired is False
    lock.write_text(json.dumps({**same_host_other_ns, "boot": "another-boot", "pidns": locks._PIDNS}))
    assert not Lease(lock, ttl=30).try_acquire()  # rebooted machine of the same name: same answer
    # control: same host, boot and namespace, dead pid: provably dead, taken over at once
    lock.write_text(json.dumps({**same_host_other_ns, "pidns": locks._PIDNS}))
    lease = Lease(lock, ttl=30)
    assert lease.try_acquire()
    lease.release()


def test_lease_age_follows_the_filesystems_clock_not_this_nodes(tmp_path, monkeypatch):
    """A node whose clock runs 1000 s ahead (or behind) judges a live lease by the filesystem's clock:
    neither expired (ahead) nor kept alive past its ttl (behind)."""
    lock = tmp_path / "x.lock"
    write_foreign(lock, ttl=30)
    real = time.time
    for skew in (1000.0, -1000.0):
        monkeypatch.setattr(locks.time, "time", lambda: real() + skew)
        locks._offsets.clear()
        info = read_lease(lock)
        assert info.expired is False and info.age < 30, (skew, info)
        assert not Lease(lock, ttl=30).try_acquire()
    monkeypatch.setattr(locks.time, "time", real)
    age_file(lock, 31)  # by the filesystem's clock, silent past its ttl
    for skew in (1000.0, -1000.0):
        monkeypatch.setattr(locks.time, "time", lambda: real() + skew)
        locks._offsets.clear()
        assert read_lease(lock).expired is True, skew
    lease = Lease(lock, ttl=30)
    assert lease.try_acquire()
    lease.release()


def test_a_live_pid_counts_as_its_holder_only_with_its_start_time(tmp_path):
    """Pids are reused: a live process whose start time differs by more than a second from the one the
    lease names is someone else, and the lease is taken over at once; pids that say nothing (0, negative,
    missing, not a number) count as alive, and the ttl decides."""
    import psutil

    lock = tmp_path / "x.lock"
    started = psutil.Process().create_time()
    ours = {"host": socket.gethostname(), "boot": locks._BOOT, "pidns": locks._PIDNS, "pid": os.getpid(),
            "token": "theirs", "created": time.time(), "ttl": 30}
    for start, dead in [(started, False), (started + 0.5, False), (started - 0.5, False), (None, False),
                        (started + 1.5, True), (started - 1.5, True), (started + 900, True)]:
        lock.write_text(json.dumps({**ours, "start": start} if start is not None else ours))
        assert read_lease(lock).expired is dead, (start - started if start else None, dead)
        assert break_expired(lock) is dead and lock.exists() is not dead
    for pid in (0, -1, "12", True, None):
        lock.write_text(json.dumps({**ours, "pid": pid, "start": 1.0}))
        assert read_lease(lock).expired is False, pid
        assert not break_expired(lock) and lock.exists()
        assert not Lease(lock, ttl=30).try_acquire()


def test_a_live_holder_stays_alive_when_the_wall_clock_is_stepped(tmp_path, monkeypatch):
    """A process's start in wall time (psutil's create_time: boot time + ticks) moves whenever the clock is
    stepped (a VM's time sync), for every process at once: a live holder must not then look like another
    process on its pid (seen in CI: six lease tests of one pytest process failed at once). The start in
    ticks since boot decides; a different tick count on the pid is a reused pid."""
    import psutil

    lock = tmp_path / "x.lock"
    lease = Lease(lock, ttl=30, heartbeat=0.05)
    assert lease.try_acquire()
    stepped = psutil.Process.create_time
    monkeypatch.setattr(psutil.Process, "create_time", lambda self: stepped(self) + 30.0)  # clock stepped 30 s
    assert read_lease(lock).expired is False
    assert not break_expired(lock) and lock.exists()
    assert not Lease(lock, ttl=30).try_acquire()
    lease.release()
    ours = {"host": socket.gethostname(), "boot": locks._BOOT, "pidns": locks._PIDNS, "pid": os.getpid(),
            "start": psutil.Process().create_time(), "token": "theirs", "created": time.time(), "ttl": 30}
    ticks = locks._start_ticks(os.getpid())
    assert isinstance(ticks, int) and ticks > 0
    for other, dead in [(ticks, False), (ticks + 1, True), (ticks - 100, True), ("12", False), (True, False)]:
        lock.write_text(json.dumps({**ours, "ticks": other}))  # a string or bool says nothing: wall time decides
        assert read_lease(lock).expired is dead, other


def test_a_holder_that_cannot_be_inspected_counts_as_alive(tmp_path, monkeypatch):
    """psutil refusing to look at the pid (another user's process under hidepid, say) proves nothing."""
    import psutil

    class Hidden:
        def __init__(self, pid):
            raise psutil.AccessDenied(pid)

    lock = tmp_path / "x.lock"
    lock.write_text(json.dumps({"host": socket.gethostname(), "boot": locks._BOOT, "pidns": locks._PIDNS,
                                "pid": dead_pid(), "start": 1.0, "token": "theirs", "created": time.time(), "ttl": 30}))
    assert read_lease(lock).expired is True  # control: a dead pid of this host is provably gone
    monkeypatch.setattr(locks.psutil, "Process", Hidden)
    assert read_lease(lock).expired is False
    assert not break_expired(lock) and lock.exists()


def test_break_expired_keeps_a_lease_renewed_before_it_took_the_guard(tmp_path, monkeypatch):
    """Judged stale, then renewed by its holder before the guard was ours: the re-check under the guard
    keeps it (cleanup must never remove a live lease)."""
    lock = tmp_path / "x.lock"
    write_foreign(lock, ttl=30, token="holder")
    age_file(lock, 60)
    real_guarded = locks._guarded

    real_time = time.time

    @contextlib.contextmanager
    def renewed_meanwhile(d, name, wait):
        os.utime(lock)  # the holder's heartbeat lands between the first look and the guard ...
        monkeypatch.setattr(locks.time, "time", lambda: real_time() + 1000)  # ... and this node's clock jumps
        with real_guarded(d, name, wait) as ok:
            yield ok

    monkeypatch.setattr(locks, "_guarded", renewed_meanwhile)
    assert break_expired(lock) is False  # judged again under the guard, by the filesystem's clock
    monkeypatch.setattr(locks.time, "time", real_time)
    assert read_lease(lock).token == "holder" and not read_lease(lock).expired
    monkeypatch.setattr(locks, "_guarded", real_guarded)
    age_file(lock, 60)  # control: still expired under the guard, it goes
    assert break_expired(lock) is True and not lock.exists()


def test_break_expired_without_a_lease_or_its_folder_removes_nothing(tmp_path):
    assert break_expired(tmp_path / "none.lock") is False
    assert break_expired(tmp_path / "no-such-folder" / "x.lock") is False
    assert list(tmp_path.iterdir()) == []


def test_a_link_planted_at_a_lease_name_is_an_expired_lease_of_nobody(tmp_path):
    target = tmp_path / "target"
    target.write_text("keep")
    lock = tmp_path / "x.lock"
    lock.symlink_to(target)
    assert break_expired(lock) is True
    assert not lock.is_symlink() and target.read_text() == "keep"


def test_break_expired_judges_by_the_filesystems_clock_even_after_this_nodes_clock_jumps(tmp_path, monkeypatch):
    lock = tmp_path / "x.lock"
    write_foreign(lock, ttl=30)
    age_file(lock, 60)
    assert read_lease(lock).expired  # measures and keeps this node's offset to the filesystem's clock
    real_time = time.time
    monkeypatch.setattr(locks.time, "time", lambda: real_time() - 1000)  # then the local clock jumps back
    assert break_expired(lock) is True and not lock.exists()


def test_a_lease_exactly_its_ttl_old_is_still_live_and_one_gone_meanwhile_is_left_alone(tmp_path, monkeypatch):
    lock = tmp_path / "x.lock"
    write_foreign(lock, ttl=30)
    os.utime(lock, (1_000_000_000, 1_000_000_000))
    monkeypatch.setattr(locks, "fs_now", lambda d: 1_000_000_030.0)  # the filesystem's clock, held still
    locks._offsets.clear()  # measure against the held clock, not an offset kept from before
    info = read_lease(lock)
    assert info.age == 30.0 and not info.expired
    assert break_expired(lock) is False and lock.exists()
    monkeypatch.setattr(locks, "fs_now", lambda d: 1_000_000_030.5)
    real_guarded = locks._guarded

    @contextlib.contextmanager
    def removed_meanwhile(d, name, wait):
        lock.unlink()  # its holder released it between the first look and the guard
        with real_guarded(d, name, wait) as ok:
            yield ok

    monkeypatch.setattr(locks, "_guarded", removed_meanwhile)
    assert break_expired(lock) is False and not lock.exists()


def test_pid_1_is_judged_like_any_other_pid(tmp_path):
    import psutil

    lock = tmp_path / "x.lock"
    meta = {"host": socket.gethostname(), "boot": locks._BOOT, "pidns": locks._PIDNS, "pid": 1,
            "token": "theirs", "created": time.time(), "ttl": 30}
    lock.write_text(json.dumps({**meta, "start": psutil.Process(1).create_time()}))
    assert read_lease(lock).expired is False
    lock.write_text(json.dumps({**meta, "start": psutil.Process(1).create_time() + 60}))
    assert read_lease(lock).expired is True  # pid 1 is alive, but not the process that took the lease
