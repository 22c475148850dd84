"""A shared cache is not a weapon: links another group member planted where hpcstage writes next are
never written through (issue 19). Links are planted owned by another uid (root can lchown), at every
name a pull, a data-entry pull, a prebuild and a launch write; the outside files and folders they point
at must not change, and every run ends in success or one line naming the link and its owner."""
from __future__ import annotations

import grp
import hashlib
import io
import json
import os
import secrets
import shutil
import subprocess
import tarfile
import tempfile
from pathlib import Path

import pytest

from conftest import MID_MODEL, MID_SIZE
from helpers import client_env, hpcstage, python_for, sha256
from hpcstage.testing.hub import HubServer

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="planting links owned by another uid needs root")

OTHER = 4321  # "another member of the group": owns the planted links
REPO = MID_MODEL
REPO_DIR = "models--demo-org--mid-model"
SIZE = MID_SIZE
PRECIOUS = b"precious: must never change\n"


def plant(link: Path, target: Path, uid: int = OTHER) -> None:
    link.parent.mkdir(parents=True, exist_ok=True)
    os.symlink(target, link)
    os.lchown(link, uid, -1)


def snapshot_of(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): (b"->" + os.readlink(p).encode() if p.is_symlink() else
                                                p.read_bytes() if p.is_file() else b"<dir>")
            for p in sorted(folder.rglob("*"))}


@pytest.fixture
def outside(tmp_path):
    """What a planted link points at: a file and an empty folder, both outside the cache."""
    out = tmp_path / "outside"
    (out / "folder").mkdir(parents=True)
    (out / "precious").write_bytes(PRECIOUS)
    before = snapshot_of(out)
    yield out
    assert snapshot_of(out) == before, "a write went through a planted link"


def _names(mid_hub) -> dict[str, str]:
    commit = mid_hub.commit_of("model", REPO)
    files = mid_hub.files_of("model", REPO)
    big = files["model.safetensors"]
    config = (Path(files["config.json"].local)).read_bytes()
    small = hashlib.sha1(b"blob %d\0" % len(config) + config).hexdigest()
    return {"commit": commit, "big": big.sha256, "small": small}


def one_line_refusal(r: subprocess.CompletedProcess, link: Path) -> None:
    assert r.returncode == 1, r.stdout + r.stderr
    assert "Traceback" not in r.stderr
    lines = [x for x in r.stderr.splitlines() if "is a link owned by" in x]
    assert lines and str(link) in lines[0] and f"uid {OTHER}" in lines[0] and "not following it" in lines[0], r.stderr


def pulled_ok(cache: Path, mid_hub) -> None:
    snap = cache / REPO_DIR / "snapshots" / mid_hub.commit_of("model", REPO)
    for path, info in mid_hub.files_of("model", REPO).items():
        assert sha256(snap / path) == sha256(info.local), path


FILE_LINKS = {
    "partial": "{repo}/blobs/{big}.hpcstage-partial",
    "ranges record": "{repo}/blobs/{big}.hpcstage-partial.ranges",
    "blob lease": "{repo}/blobs/{big}.hpcstage-lease",
    "large blob": "{repo}/blobs/{big}",
    "small blob": "{repo}/blobs/{small}",
    "ref": "{repo}/refs/main",
    "trees file": "{repo}/trees/{commit}.json",
    "snapshot link": "{repo}/snapshots/{commit}/config.json",
    "ledger record": ".locks/hpcstage/ledger/models--demo-org--mid-model@main.json",
}


@pytest.mark.parametrize("where", list(FILE_LINKS))
def test_a_planted_file_link_is_replaced_not_written_through(mid_hub, tmp_path, outside, where):
    cache = tmp_path / "cache"
    link = cache / FILE_LINKS[where].format(repo=REPO_DIR, **_names(mid_hub))
    plant(link, outside / "precious")
    r = hpcstage("pull", REPO, "--cache-dir", str(cache), "-q", env=client_env(mid_hub, tmp_path / "h"))
    assert r.returncode == 0, r.stderr
    pulled_ok(cache, mid_hub)
    if where == "snapshot link":
        assert os.readlink(link).startswith("../../blobs/")
    elif where in ("large blob", "small blob", "ref", "trees file", "ledger record"):
        assert not link.is_symlink() and link.is_file()
    else:  # transient: removed and made anew, gone after a clean run
        assert not os.path.lexists(link)
    r = hpcstage("verify", REPO, "--cache-dir", str(cache), env=client_env(mid_hub, tmp_path / "h"))
    assert r.returncode == 0, r.stdout + r.stderr


FOLDER_LINKS = ["{repo}", "{repo}/blobs", "{repo}/snapshots", "{repo}/snapshots/{commit}", "{repo}/refs",
                "{repo}/trees", ".locks", ".locks/hpcstage", ".locks/hpcstage/ledger"]


@pytest.mark.parametrize("where", FOLDER_LINKS)
def test_a_planted_folder_link_is_refused_in_one_line(mid_hub, tmp_path, outside, where):
    cache = tmp_path / "cache"
    cache.mkdir()
    link = cache / where.format(repo=REPO_DIR, **_names(mid_hub))
    plant(link, outside / "folder")
    r = hpcstage("pull", REPO, "--cache-dir", str(cache), "-q", env=client_env(mid_hub, tmp_path / "h"))
    one_line_refusal(r, link)


def test_the_users_own_links_and_a_linked_cache_root_still_work(mid_hub, tmp_path):
    real = tmp_path / "scratch" / "hub"
    real.mkdir(parents=True)
    cache = tmp_path / "home-cache"
    cache.symlink_to(real)  # `~/.cache/huggingface/hub -> /scratch/...`, the user's choice
    blobs = tmp_path / "scratch" / "blobs-elsewhere"
    blobs.mkdir()
    (real / REPO_DIR).mkdir()
    (real / REPO_DIR / "blobs").symlink_to(blobs)  # the user's own folder link, below the root
    r = hpcstage("pull", REPO, "--cache-dir", str(cache), "-q", env=client_env(mid_hub, tmp_path / "h"))
    assert r.returncode == 0, r.stderr
    pulled_ok(cache, mid_hub)
    assert (blobs / _names(mid_hub)["big"]).stat().st_size == SIZE
    # a link belonging to the owner of the folder holding it is refused too: in a shared cache that owner is
    # whoever staged the repo first (the kernel's protected_symlinks would trust them)
    other = tmp_path / "other"
    (other / REPO_DIR).mkdir(parents=True)
    os.chown(other / REPO_DIR, OTHER, -1)
    theirs = tmp_path / "theirs"
    theirs.mkdir()
    plant(other / REPO_DIR / "refs", theirs)
    r = hpcstage("pull", REPO, "--cache-dir", str(other), "-q", env=client_env(mid_hub, tmp_path / "h"))
    one_line_refusal(r, other / REPO_DIR / "refs")
    assert list(theirs.iterdir()) == []


# -- data entries: url (extracted), local, file; prebuild; launch records


@pytest.fixture
def data_hub(tmp_path_factory):
    root = tmp_path_factory.mktemp("datahub")
    repo = root / "datasets" / "org" / "d"
    repo.mkdir(parents=True)
    with tarfile.open(repo / "pages.tar.gz", "w:gz") as tf:
        for name, data in {"pages/a.txt": b"a" * 1000, "pages/b.txt": b"b" * 2000}.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    (repo / "eval.json").write_text(json.dumps({"test": [{"q": i} for i in range(5)]}))
    with HubServer(root) as server:
        yield server


def _data_manifest(folder: Path, server) -> tuple[Path, str]:
    url = f"{server.url}/datasets/org/d/resolve/main/pages.tar.gz"
    src = folder / "src"
    src.mkdir(parents=True)
    (src / "notes.txt").write_text("local copy\n")
    m = folder / "hpcstage.yaml"
    m.write_text(f"cache_dir: cache\ndata_dir: data\ndatasets:\n"
                 f"  - url: {url}\n    allow_http: true\n    extract: true\n    dest: pages\n"
                 f"  - local: src\n    dest: notes\n"
                 f"  - repo: org/d\n    file: eval.json\n    dest: evalfile\n")
    return m, url


def _url_partial(url: str) -> str:
    from hpcstage.sources import url as u

    p = u.probe(u.client(), url)
    key = hashlib.sha256(url.encode()).hexdigest()[:32]
    return f"{key}-{hashlib.sha256(p.fingerprint.encode()).hexdigest()[:16]}.hpcstage-partial"


DATA_FILE_LINKS = ["data/.hpcstage/downloads/{partial}", "data/.hpcstage/locks/pages.hpcstage-lease",
                   "data/.hpcstage/staged/pages.json", "data/.hpcstage/staged/notes.json", "data/pages",
                   "data/notes"]
REFUSED = ["data/.hpcstage", "data/.hpcstage/downloads", "data/.hpcstage/locks", "data/.hpcstage/staged",
           "hpcstage.lock"]  # folders, and the lockfile (read before anything: another's link is not the lock)


@pytest.mark.parametrize("where", DATA_FILE_LINKS + REFUSED)
def test_data_entries_never_write_through_a_planted_link(data_hub, tmp_path, outside, where):
    m, url = _data_manifest(tmp_path / "proj", data_hub)
    link = m.parent / where.format(partial=_url_partial(url))
    plant(link, outside / ("precious" if where in DATA_FILE_LINKS + ["hpcstage.lock"] else "folder"))
    r = hpcstage("pull", "-f", str(m), "-q", env=client_env(data_hub, tmp_path / "h"))
    if where in REFUSED:
        one_line_refusal(r, link)
        return
    assert r.returncode == 0, r.stderr
    data = m.parent / "data"
    assert (data / "pages" / "pages" / "b.txt").read_bytes() == b"b" * 2000
    assert (data / "notes" / "notes.txt").read_text() == "local copy\n"
    assert json.loads((data / "evalfile" / "eval.json").read_text())["test"][4] == {"q": 4}
    assert not (data / "pages").is_symlink() and not (data / "notes").is_symlink()


def test_a_build_folder_is_private_until_it_is_published(tmp_path):
    from hpcstage.datadir import building

    data = tmp_path / "data"
    with building(data, data / "dest") as tmp:
        st = os.fstat(tmp.fd)
        assert st.st_mode & 0o777 == 0o700  # nobody else can plant anything inside while it is filled
        (tmp.proc_path / "f").write_text("x")
    mask = os.umask(0)
    os.umask(mask)
    assert (data / "dest").stat().st_mode & 0o777 == 0o777 & ~mask
    assert (data / "dest" / "f").read_text() == "x"


@pytest.mark.parametrize("where", ["marker", "marker folder", "lease"])
def test_prebuild_records_are_never_written_through_a_planted_link(tmp_path, outside, where):
    from hpcstage import arrowbuilds, arrowcache

    from hpcstage.manifest import load_manifest

    ds = tmp_path / "datasets"
    (tmp_path / "eval.json").write_text(json.dumps({"test": [{"q": i} for i in range(3)]}))
    m = tmp_path / "hpcstage.yaml"
    m.write_text(f"datasets_cache_dir: {ds}\nprebuild:\n  - {{path: json, data_files: {tmp_path / 'eval.json'}, "
                 "field: test, split: train}\n")
    [build] = arrowcache.builds_from_manifest(load_manifest(m))
    from importlib.metadata import version

    # markers are per datasets version of the job's interpreter (here hpcstage's own: no python:)
    link = {"marker": arrowbuilds.marker_path(ds, build, version("datasets")), "marker folder": ds / arrowbuilds.MARKER_DIR,
            "lease": arrowcache.lease_path(ds, build)}[where]
    plant(link, outside / ("folder" if where == "marker folder" else "precious"))
    r = hpcstage("prebuild", "-f", str(m), env=client_env(_NoHub(), tmp_path / "h"))
    if where == "marker folder":
        one_line_refusal(r, link)
    else:
        assert r.returncode == 0, r.stdout + r.stderr


class _NoHub:
    url = "http://127.0.0.1:9"


@pytest.mark.parametrize("where", ["jobs.json", "config.json", "run.sbatch", "logs"])
def test_launch_records_are_never_written_through_a_planted_link(tmp_path, outside, where):
    exps = tmp_path / "experiments"
    link = exps / "exp1" / where
    plant(link, outside / ("folder" if where == "logs" else "precious"))
    env = {k: v for k, v in os.environ.items() if not k.startswith("HF_")}
    r = hpcstage("launch", "--job-type", "run", "--command", "echo hi", "--cluster", "local", "--name", "exp1",
                 "--experiments-dir", str(exps), "--dry-run", env=env)
    if where == "logs":
        one_line_refusal(r, link)
        return
    assert r.returncode == 0, r.stdout + r.stderr
    assert not link.is_symlink() and link.is_file()


# -- two real users sharing one group cache


def test_two_users_share_a_group_cache_and_neither_can_redirect_the_others_writes(mid_hub, tmp_path):
    suffix = secrets.token_hex(3)
    group, alice, mallory = f"hpcsg{suffix}", f"hpcsa{suffix}", f"hpcsm{suffix}"
    base = Path(tempfile.mkdtemp(prefix="hpcstage-two-users-", dir="/tmp"))  # pytest's tmp is 0700
    subprocess.run(["groupadd", group], check=True)
    try:
        for user in (alice, mallory):
            subprocess.run(["useradd", "-m", "-N", "-G", group, "-d", str(base / user), "-s", "/bin/sh", user],
                           check=True)
        os.chmod(base, 0o755)
        for user in (alice, mallory):
            (base / f"hf-{user}").mkdir()
            shutil.chown(base / f"hf-{user}", user)
        cache = base / "shared-cache"
        cache.mkdir()
        shutil.chown(cache, alice, group)
        os.chmod(cache, 0o2775)
        bashrc = base / alice / ".bashrc"
        bashrc.write_bytes(PRECIOUS)
        shutil.chown(bashrc, alice)
        home_before = snapshot_of(base / alice)
        python, pythonpath = python_for(alice)

        def as_user(user: str, *argv: str) -> subprocess.CompletedProcess:
            env = {**client_env(mid_hub, base / f"hf-{user}"), "HOME": str(base / user), **pythonpath}
            cmd = ["runuser", "-u", user, "--", "env", "-i", *[f"{k}={v}" for k, v in env.items()], *argv]
            return subprocess.run(cmd, capture_output=True, text=True, timeout=180, cwd=base / user)

        def pull(user: str) -> subprocess.CompletedProcess:
            return as_user(user, python, "-m", "hpcstage", "pull", REPO, "--cache-dir", str(cache), "-q",
                           "--shared-group", group)

        # mallory stages first (the folders are the group's), then plants links where alice writes next
        r = as_user(mallory, "mkdir", "-p", str(cache / REPO_DIR / "blobs"))
        assert r.returncode == 0, r.stderr
        r = as_user(mallory, python, "-c", "from hpcstage.hfcache import share_cache; "
                    f"share_cache({str(cache)!r}, {group!r})")
        assert r.returncode == 0, r.stderr
        big = _names(mid_hub)["big"]
        for name in (f"{big}.hpcstage-partial", f"{big}.hpcstage-partial.ranges", f"{big}.hpcstage-lease"):
            r = as_user(mallory, "ln", "-s", str(bashrc), str(cache / REPO_DIR / "blobs" / name))
            assert r.returncode == 0, r.stderr
        r = as_user(mallory, "ln", "-s", str(base / alice), str(cache / REPO_DIR / "refs"))
        assert r.returncode == 0, r.stderr

        r = pull(alice)
        assert r.returncode == 1 and "Traceback" not in r.stderr, r.stderr
        assert f"{cache / REPO_DIR / 'refs'} is a link owned by uid" in r.stderr and mallory in r.stderr, r.stderr
        assert snapshot_of(base / alice) == home_before
        assert (cache / REPO_DIR / "blobs" / big).stat().st_size == SIZE  # the blob landed in the cache
        # alice removes the folder link (she may: the folder is the group's); her next pull finishes
        r = as_user(alice, "rm", str(cache / REPO_DIR / "refs"))
        assert r.returncode == 0, r.stderr
        r = pull(alice)
        assert r.returncode == 0, r.stderr
        assert snapshot_of(base / alice) == home_before
        # mallory reuses what alice staged (one copy), and both verify it
        r = pull(mallory)
        assert r.returncode == 0, r.stderr
        for user in (alice, mallory):
            r = as_user(user, python, "-m", "hpcstage", "verify", REPO, "--cache-dir", str(cache))
            assert r.returncode == 0, r.stdout + r.stderr
        pulled_ok(cache, mid_hub)
        gid = grp.getgrnam(group).gr_gid
        assert os.stat(cache / REPO_DIR / "blobs" / big).st_gid == gid
    finally:
        for user in (alice, mallory):
            subprocess.run(["userdel", "-r", user], capture_output=True)
        subprocess.run(["groupdel", group], capture_output=True)
        shutil.rmtree(base, ignore_errors=True)


def test_verify_repair_deletes_nothing_through_a_planted_folder_link(mid_hub, tmp_path):
    cache = tmp_path / "cache"
    env = client_env(mid_hub, tmp_path / "h")
    assert hpcstage("pull", REPO, "--cache-dir", str(cache), "-q", env=env).returncode == 0
    theirs = tmp_path / "theirs-blobs"
    shutil.move(cache / REPO_DIR / "blobs", theirs)  # "their" folder now holds the blobs...
    plant(cache / REPO_DIR / "blobs", theirs)  # ...and the cache's blobs/ is their link to it
    small = theirs / _names(mid_hub)["small"]
    small.write_bytes(b"changed")  # a corrupt blob, seen through the link
    before = snapshot_of(theirs)
    r = hpcstage("verify", REPO, "--cache-dir", str(cache), "--repair", env=env)
    one_line_refusal(r, cache / REPO_DIR / "blobs")
    assert snapshot_of(theirs) == before
