"""`hpcstage doctor`: the real CLI in a subprocess (HF_* variables are read at import time), against the
Hub emulator, a small tmpfs, a dead endpoint, offline flags and a CPU time limit."""
from __future__ import annotations

import errno
import json
import os
import secrets
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from helpers import client_env
from hpcstage import doctor
from hpcstage.hfcache import CachedFile
from hpcstage.manifest import Lockfile, entry_lock, load_manifest, save_lock

NAMES = ["space", "inodes", "quota", "memory", "filesystem", "flock", "write", "sharing", "xet_store", "hf_home",
         "token", "proxy", "endpoint", "offline", "cpu_limit"]
DEAD = "http://127.0.0.1:9"  # discard port: nothing listens, connection refused
MiB = 2**20


def doctor_cli(*args: str, env: dict, prefix: tuple[str, ...] = (), timeout: float = 60):
    started = time.monotonic()
    r = subprocess.run([*prefix, sys.executable, "-m", "hpcstage", "doctor", *args], env=env, capture_output=True,
                       text=True, timeout=timeout)
    return r, time.monotonic() - started


def env_for(tmp_path: Path, endpoint: str, **extra: str) -> dict:
    """Clean HF environment: caches and HOME under tmp_path, no token file, no offline flags."""
    class Endpoint:
        url = endpoint

    env = client_env(Endpoint, tmp_path / "hf", **{"HOME": str(tmp_path / "home"), **extra})
    for name in ("SLURM_JOB_ID", "HUGGING_FACE_HUB_TOKEN", "HF_TOKEN"):
        env.pop(name, None)
    env.update(extra)
    return env


def by_name(stdout: str) -> dict[str, dict]:
    checks = json.loads(stdout)
    return {c["name"]: c for c in checks}


def test_json_names_order_and_shape_are_stable_and_fast(hub, tmp_path):
    r, took = doctor_cli("--json", env=env_for(tmp_path, hub.url))
    checks = json.loads(r.stdout)
    assert [c["name"] for c in checks] == NAMES == list(doctor.CHECK_NAMES)
    for c in checks:
        assert list(c) == ["name", "status", "detail", "fix"]
        assert c["status"] in ("ok", "warn", "fail") and isinstance(c["detail"], str) and isinstance(c["fix"], str)
        assert c["detail"]
        assert c["status"] == "ok" or c["fix"] or c["name"] == "token", c
    assert r.returncode == (1 if any(c["status"] == "fail" for c in checks) else 0), r.stderr
    assert took < 15, f"doctor took {took:.1f}s"


def test_token_against_emulator_without_whoami_is_checked_honestly_and_never_printed(hub, tmp_path):
    canary = "hf_canary" + secrets.token_hex(12)
    env = env_for(tmp_path, hub.url, HF_TOKEN=canary)
    r, _ = doctor_cli("--json", env=env)
    assert r.returncode == 0, r.stdout + r.stderr
    checks = by_name(r.stdout)
    assert checks["token"]["status"] == "warn"
    assert "endpoint has no whoami; token not checked" in checks["token"]["detail"]
    assert "HF_TOKEN" in checks["token"]["detail"]
    assert checks["endpoint"]["status"] == "ok" and hub.url in checks["endpoint"]["detail"]
    whoami = [rec for rec in hub.log if rec.path.startswith("/api/whoami-v2")]
    assert whoami and all(rec.has_auth for rec in whoami)  # the token was sent, to the endpoint only
    plain, _ = doctor_cli(env=env)
    assert "token not checked" in plain.stdout
    for out in (r.stdout, r.stderr, plain.stdout, plain.stderr):
        assert canary not in out and canary[-12:] not in out


def test_no_token_warns_that_only_public_repos_work(hub, tmp_path):
    r, _ = doctor_cli("--json", env=env_for(tmp_path, hub.url))
    assert r.returncode == 0, r.stdout + r.stderr
    checks = by_name(r.stdout)
    assert checks["token"]["status"] == "warn" and "no token" in checks["token"]["detail"]
    assert "public repos work" in checks["token"]["detail"]
    assert checks["endpoint"]["status"] == "ok"
    assert checks["offline"]["status"] == "ok" and checks["cpu_limit"]["status"] == "ok"


def test_unreachable_endpoint_fails_quickly(tmp_path):
    r, took = doctor_cli("--json", env=env_for(tmp_path, DEAD, HF_TOKEN="hf_x" + secrets.token_hex(8)))
    assert r.returncode == 1, r.stdout + r.stderr
    checks = by_name(r.stdout)
    assert checks["endpoint"]["status"] == "fail"
    assert DEAD in checks["endpoint"]["detail"] and "connection refused" in checks["endpoint"]["detail"]
    assert checks["token"]["status"] == "warn" and "not checked" in checks["token"]["detail"]
    assert [name for name, c in checks.items() if c["status"] == "fail"] == ["endpoint"]
    assert took < 15
    plain, _ = doctor_cli(env=env_for(tmp_path, DEAD))
    assert plain.returncode == 1
    assert any(line.startswith("fail\tendpoint\t") and "fix: " in line for line in plain.stdout.splitlines())
    assert plain.stdout.splitlines()[-1].endswith(" warn, 1 fail")


def test_endpoint_that_accepts_but_never_answers_fails_within_the_deadline(tmp_path):
    import socket

    with socket.socket() as silent:  # listens, never accepts: connect succeeds, no answer ever comes
        silent.bind(("127.0.0.1", 0))
        silent.listen(8)
        url = f"http://127.0.0.1:{silent.getsockname()[1]}"
        r, took = doctor_cli("--json", "--timeout", "1", env=env_for(tmp_path, url, HF_TOKEN="hf_x" + secrets.token_hex(8)))
    assert r.returncode == 1, r.stdout + r.stderr
    checks = by_name(r.stdout)
    assert checks["endpoint"]["status"] == "fail" and url in checks["endpoint"]["detail"]
    assert checks["token"]["status"] == "warn" and "not checked" in checks["token"]["detail"]
    assert took < 15, f"doctor took {took:.1f}s against a silent endpoint"


def test_offline_flag_on_login_node_warns_and_unreachable_endpoint_is_no_failure(tmp_path):
    r, _ = doctor_cli("--json", env=env_for(tmp_path, DEAD, HF_HUB_OFFLINE="1"))
    assert r.returncode == 0, r.stdout
    checks = by_name(r.stdout)
    assert checks["offline"]["status"] == "warn"
    assert "`hpcstage pull` refuses to fetch while HF_HUB_OFFLINE is set" in checks["offline"]["detail"]
    assert "unset" in checks["offline"]["fix"] and "login node" in checks["offline"]["fix"]
    assert checks["endpoint"]["status"] == "warn"
    # Inside a Slurm job the same flags are what a job should have.
    r, _ = doctor_cli("--json", env=env_for(tmp_path, DEAD, HF_HUB_OFFLINE="1", SLURM_JOB_ID="42"))
    checks = by_name(r.stdout)
    assert checks["offline"]["status"] == "ok" and checks["endpoint"]["status"] == "ok"


@pytest.mark.skipif(not shutil.which("prlimit"), reason="needs prlimit (util-linux)")
def test_cpu_time_limit_warns_with_the_way_out(hub, tmp_path):
    r, _ = doctor_cli("--json", env=env_for(tmp_path, hub.url), prefix=("prlimit", "--cpu=3600"))
    assert r.returncode == 0, r.stdout + r.stderr
    cpu = by_name(r.stdout)["cpu_limit"]
    assert cpu["status"] == "warn" and "3600" in cpu["detail"]
    assert "--slurm-array" in cpu["fix"] and "tmux" in cpu["fix"]


def test_quota_tool_near_its_limit_warns(hub, tmp_path):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    fake = bin_dir / "quota"
    fake.write_text("#!/bin/sh\ncat <<'EOF'\n" + QUOTA_S + "EOF\n")
    fake.chmod(0o755)
    env = env_for(tmp_path, hub.url, PATH=f"{bin_dir}:{os.environ['PATH']}")
    r, _ = doctor_cli("--json", env=env)
    quota = by_name(r.stdout)["quota"]
    assert quota["status"] == "warn", quota
    assert "nfs01:/export/home" in quota["detail"] and "96%" in quota["detail"]
    assert "/dev/sda1" not in quota["detail"]


# -- the quota tools' output, parsed ------------------------------------------------------------------

QUOTA_S = """\
Disk quotas for user alice (uid 1000):
     Filesystem   space   quota   limit   grace   files   quota   limit   grace
      /dev/sda1  10000M  20480M  25600M            1234       0       0
nfs01:/export/home
                 48128M* 46080M  50000M   6days   100k    200k    250k
"""

LFS_QUOTA = """\
Disk quotas for usr alice (uid 1000):
     Filesystem  kbytes   quota   limit   grace   files   quota   limit   grace
    /p/scratch  1048576       0 2097152       -    5000       0   10000       -
"""


def test_parse_quota_s_with_wrapped_name_and_over_quota_star():
    rows = doctor.parse_quota(QUOTA_S)
    assert [q.filesystem for q in rows] == ["/dev/sda1", "nfs01:/export/home"]
    sda, home = rows
    assert (sda.used, sda.limit, sda.files, sda.files_limit) == (10000 * MiB, 25600 * MiB, 1234, 0)
    assert (home.used, home.limit, home.files, home.files_limit) == (48128 * MiB, 50000 * MiB, 100_000, 250_000)
    assert home.over(0.9) and not sda.over(0.9)


def test_parse_lfs_quota_counts_kib():
    (row,) = doctor.parse_quota(LFS_QUOTA)
    assert (row.filesystem, row.used, row.limit, row.files, row.files_limit) == ("/p/scratch", 2**30, 2**31, 5000, 10000)
    assert doctor.parse_quota("Disk quotas for user bob (uid 1001): none\n") == []


def test_mount_of_picks_the_longest_containing_mount_point():
    text = ("22 1 0:1 / / rw - ext4 /dev/vda rw\n"
            "30 22 0:40 / /p/scratch rw,relatime shared:5 - lustre 10.0.0.1@o2ib:/scratch rw,flock\n"
            "31 22 0:41 / /p/scratch2 rw - nfs4 srv:/x rw\n"
            "32 22 0:42 / /mnt/with\\040space rw - tmpfs tmpfs rw\n")
    mounts = doctor.parse_mountinfo(text)
    assert doctor.mount_of(Path("/p/scratch/proj/hf"), mounts).fstype == "lustre"
    assert doctor.mount_of(Path("/p/scratch2/a"), mounts).fstype == "nfs4"
    assert doctor.mount_of(Path("/p/scratchy"), mounts).fstype == "ext4"
    assert doctor.mount_of(Path("/mnt/with space/x"), mounts).fstype == "tmpfs"
    assert doctor.mount_of(Path("/p/scratch"), mounts).shared


def test_flock_that_does_not_work_warns_and_says_leases_do_not_need_it(tmp_path, monkeypatch):
    def no_flock(fd, op):
        raise OSError(errno.ENOSYS, "Function not implemented")

    monkeypatch.setattr(doctor.fcntl, "flock", no_flock)
    checks = {c.name: c for c in doctor.run_checks(None, tmp_path / "cache", endpoint=DEAD, token="", timeout=1)}
    assert checks["flock"].status == "warn"
    assert "flock does not work here: huggingface_hub's own locks fail; hpcstage's leases do not need it (ENOSYS" in (
        checks["flock"].detail)
    assert checks["write"].status == "ok"


def test_group_owned_cache_without_setgid_warns(tmp_path):
    if os.geteuid() != 0:
        pytest.skip("needs root to chown a folder to another group")
    import grp

    cache = tmp_path / "cache"
    cache.mkdir()
    other = next(g for g in grp.getgrall() if g.gr_gid != os.getgid())
    os.chown(cache, -1, other.gr_gid)
    cache.chmod(0o755)
    sharing = {c.name: c for c in doctor.run_checks(None, cache, endpoint=DEAD, token="", timeout=1)}["sharing"]
    assert sharing.status == "warn" and "setgid" in sharing.detail and other.gr_name in sharing.fix
    cache.chmod(0o2775)
    sharing = {c.name: c for c in doctor.run_checks(None, cache, endpoint=DEAD, token="", timeout=1)}["sharing"]
    assert sharing.status == "ok", sharing


# -- a small filesystem (root: a 20 MiB tmpfs) ---------------------------------------------------------


@pytest.fixture
def small_fs(tmp_path):
    if os.geteuid() != 0:
        pytest.skip("mounting a small tmpfs needs root")
    mnt = tmp_path / "small"
    mnt.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=20m,nr_inodes=2000", "tmpfs", str(mnt)],
                       capture_output=True, text=True)
    if r.returncode != 0:
        pytest.skip(f"cannot mount tmpfs here: {r.stderr.strip()}")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


def _manifest_with_lock(folder: Path, cache: Path, sizes: list[int]) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "hpcstage.yaml"
    path.write_text(f"cache_dir: {cache}\nmodels:\n  - repo: demo-org/huge-model\n")
    entry = load_manifest(path).entries[0]
    files = [CachedFile(f"model-{i}.safetensors", size, f"{i:040x}", f"{i:064x}") for i, size in enumerate(sizes)]
    save_lock(folder / "hpcstage.lock", Lockfile(entries={entry.key: entry_lock(entry, "a" * 40, files)}))
    return path


def test_plan_larger_than_free_space_fails_naming_the_numbers(hub, tmp_path, small_fs):
    manifest = _manifest_with_lock(tmp_path / "proj", small_fs / "hub", [30 * MiB, 5 * MiB])
    r, _ = doctor_cli("-f", str(manifest), "--json", env=env_for(tmp_path, hub.url))
    assert r.returncode == 1, r.stdout + r.stderr
    checks = by_name(r.stdout)
    space = checks["space"]
    assert space["status"] == "fail"
    assert "36.7 MB still to fetch (2 files)" in space["detail"]  # 35 MiB
    assert "free of 21.0 MB" in space["detail"] and "short by" in space["detail"]
    assert "cache_dir" in space["fix"]
    assert checks["filesystem"]["status"] == "warn" and "tmpfs" in checks["filesystem"]["detail"]
    assert checks["write"]["status"] == "ok" and checks["inodes"]["status"] == "ok"

    fits = _manifest_with_lock(tmp_path / "proj2", small_fs / "hub", [1 * MiB])
    r, _ = doctor_cli("-f", str(fits), "--json", env=env_for(tmp_path, hub.url))
    assert by_name(r.stdout)["space"]["status"] == "ok", r.stdout


def test_manifest_without_lockfile_says_the_plan_is_unknown(hub, tmp_path, small_fs):
    manifest = _manifest_with_lock(tmp_path / "proj", small_fs / "hub", [1])
    (manifest.parent / "hpcstage.lock").unlink()
    r, _ = doctor_cli("-f", str(manifest), "--json", env=env_for(tmp_path, hub.url))
    space = by_name(r.stdout)["space"]
    assert space["status"] == "warn" and "plan unknown" in space["detail"]
    assert space["fix"] == f"run `hpcstage pull -f {manifest}` once on a node with internet, or use --dry-run"
    # The plan never asks the network: the one request is the endpoint check's probe of the first repo.
    assert [rec.path for rec in hub.log] == ["/api/models/demo-org/huge-model"]


def test_read_only_cache_fails_the_write_check(hub, tmp_path, small_fs):
    (small_fs / "hub").mkdir()
    subprocess.run(["mount", "-o", "remount,ro", str(small_fs)], check=True)
    r, _ = doctor_cli("--cache-dir", str(small_fs / "hub"), "--json", env=env_for(tmp_path, hub.url))
    assert r.returncode == 1
    checks = by_name(r.stdout)
    assert checks["write"]["status"] == "fail" and "Read-only file system" in checks["write"]["detail"]
    assert [n for n, c in checks.items() if c["status"] == "fail"] == ["write"]


def test_hf_home_under_a_small_home_warns(hub, tmp_path, small_fs):
    env = env_for(tmp_path, hub.url, HOME=str(small_fs))
    for name in ("HF_HOME", "HF_HUB_CACHE", "HF_DATASETS_CACHE"):
        env.pop(name)
    r, _ = doctor_cli("--json", env=env)
    hf_home = by_name(r.stdout)["hf_home"]
    assert hf_home["status"] == "warn", hf_home
    assert f"{small_fs}/.cache/huggingface" in hf_home["detail"] and "hub cache and datasets cache" in hf_home["detail"]
    assert "HF_HOME=/p/scratch/" in hf_home["fix"]


def test_hf_home_under_home_warns_where_the_registry_knows_a_small_home_quota(hub, tmp_path, cluster):
    """JSC's $HOME quota (10 GB, GPFS) is invisible to `quota`; the registry's home_quota says it."""
    home = tmp_path / "home"
    home.mkdir()
    site = tmp_path / "site.toml"
    site.write_text('[local]\nhome_quota = "10G"\n')  # this machine is the local cluster (its Slurm says so)
    env = env_for(tmp_path, hub.url, HOME=str(home), HPCSTAGE_CLUSTERS=str(site), XDG_CONFIG_HOME=str(tmp_path / "c"))
    for name in ("HF_HOME", "HF_HUB_CACHE", "HF_DATASETS_CACHE"):
        env.pop(name)
    r, _ = doctor_cli("--json", env=env)
    hf_home = by_name(r.stdout)["hf_home"]
    assert hf_home["status"] == "warn", hf_home
    assert "local's $HOME quota is 10.7 GB (cluster registry)" in hf_home["detail"], hf_home
    assert "HF_HOME=/p/scratch/" in hf_home["fix"]
    site.write_text("[local]\n")  # no quota known: a big filesystem is fine
    r, _ = doctor_cli("--json", env=env)
    assert by_name(r.stdout)["hf_home"]["status"] == "ok"
