"""The cache-wide Xet blob store (huggingface_hub 2.4's layout): one copy per content across repos.

A base model and its fine-tune share a 64 MiB file. The emulator lists real `xetHash` values (hf_xet); the
checks are huggingface_hub's own store functions and cache tools, and its offline loads, in fresh processes.
"""
from __future__ import annotations

import json
import re
import os
import random
import subprocess
import sys
import threading
import threading
from pathlib import Path

import pytest

from hpcstage.testing.hub import FaultRule, HubServer
from helpers import client_env, hpcstage, run_python, sha256, wait_for, wait_for

BASE, TUNED = "demo-org/base-model", "demo-org/base-model-tuned"
SHARED_SIZE = 64 << 20
FOLDER = {BASE: "models--demo-org--base-model", TUNED: "models--demo-org--base-model-tuned"}


@pytest.fixture(scope="session")
def twins_root(tmp_path_factory):
    """A base model and a fine-tune: the same 64 MiB weights file (a link in the served folder, one copy
    on disk here), different configs, and a small LFS adapter only the fine-tune has."""
    root = tmp_path_factory.mktemp("twins")
    base, tuned = root / "models" / BASE, root / "models" / TUNED
    base.mkdir(parents=True)
    tuned.mkdir(parents=True)
    (base / "config.json").write_text('{"model_type": "llama"}\n')
    (tuned / "config.json").write_text('{"model_type": "llama", "tuned": true}\n')
    with open(base / "model.safetensors", "wb") as f:
        f.write(random.Random(5).randbytes(SHARED_SIZE))
    (tuned / "model.safetensors").symlink_to(base / "model.safetensors")
    (tuned / "adapter.safetensors").write_bytes(random.Random(6).randbytes(3000))
    return root


@pytest.fixture
def twins(twins_root):
    with HubServer(twins_root) as server:
        server.xet = True
        yield server


def weights(server, repo: str = BASE):
    return server.files_of("model", repo)["model.safetensors"]


def store_files(cache: Path) -> list[Path]:
    """The content files in the store (not the marker, the `.refs` manifests or prefix folders)."""
    top = cache / "blobs"
    return sorted(p for p in top.glob("??/*") if len(p.name) == 64) if top.is_dir() else []


def hf_env(server, cache: Path, **extra) -> dict:
    """huggingface_hub in a child, shared blobs on (HF_HUB_DISABLE_XET unset: its store functions need it),
    offline: nothing here may talk to a Hub."""
    env = client_env(server, cache.parent / "hf-client", HF_HUB_CACHE=str(cache), HF_HUB_OFFLINE="1", **extra)
    env.pop("HF_HUB_DISABLE_XET")
    return env


def hf(server, cache: Path, code: str) -> dict:
    r = run_python("import json, sys, pathlib\n" + code, hf_env(server, cache))
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout.strip().splitlines()[-1])


STORE_VIEW = """
from huggingface_hub.utils import _shared_blobs as sb
cache = pathlib.Path(sys.argv[1] if len(sys.argv) > 1 else {cache!r})
links = {links!r}
print(json.dumps({{
    "marked": sb.is_shared_blobs_dir(cache / "blobs"),
    "has": sb.has_shared_blob(xet_hash={h!r}, cache_dir=cache, expected_size={size}),
    "targets": [str(sb.shared_blob_target(cache / l, cache)) for l in links],
    "unreferenced": [str(p) for p in sb.unreferenced_shared_blobs(cache)],
}}))
"""


def test_base_and_finetune_share_one_stored_copy_that_huggingface_hub_accepts_and_deletes(twins, tmp_path):
    cache = tmp_path / "cache"
    r = hpcstage("pull", BASE, TUNED, "--cache-dir", str(cache), "-q", env=client_env(twins, tmp_path))
    assert r.returncode == 0, r.stderr
    w = weights(twins)
    # moved once: one GET of the weights from the CDN, whole
    gets = [rec for rec in twins.log if rec.server == "cdn" and rec.method == "GET" and w.sha256 in rec.path]
    assert sum(rec.bytes_sent for rec in gets) == SHARED_SIZE
    # stored once: one content file, both repos' blobs are links to it (one inode)
    import hf_xet

    adapter = twins.files_of("model", TUNED)["adapter.safetensors"]
    h, ha = (x.hash for x in hf_xet.hash_files([str(w.local), str(adapter.local)]))
    assert store_files(cache) == sorted([cache / "blobs" / h[:2] / h, cache / "blobs" / ha[:2] / ha])
    links = [f"{FOLDER[repo]}/blobs/{w.sha256}" for repo in (BASE, TUNED)]
    for link in links:
        assert os.readlink(cache / link) == f"../../blobs/{h[:2]}/{h}"
    inodes = {os.stat(cache / FOLDER[repo] / "snapshots" / twins.commit_of("model", repo) / "model.safetensors").st_ino
              for repo in (BASE, TUNED)}
    assert inodes == {os.stat(cache / "blobs" / h[:2] / h).st_ino}
    assert sha256(cache / "blobs" / h[:2] / h) == w.sha256
    # the small LFS adapter went to the store too, the configs (not LFS, no xetHash) stay per-repo blobs
    assert os.readlink(cache / FOLDER[TUNED] / "blobs" / adapter.sha256) == f"../../blobs/{ha[:2]}/{ha}"
    assert not os.path.islink(cache / FOLDER[BASE] / "blobs" / twins.files_of("model", BASE)["config.json"].oid)
    # trees/<commit>.json carries xet_hash as huggingface_hub writes it, and huggingface_hub reads it back
    commit = twins.commit_of("model", BASE)
    tree = json.loads((cache / FOLDER[BASE] / "trees" / f"{commit}.json").read_text())
    assert tree["files"]["model.safetensors"]["xet_hash"] == h and "xet_hash" not in tree["files"]["config.json"]

    # huggingface_hub's own store functions accept the layout
    view = hf(twins, cache, STORE_VIEW.format(cache=str(cache), links=links, h=h, size=SHARED_SIZE))
    assert view == {"marked": True, "has": True, "targets": [str(cache / "blobs" / h[:2] / h)] * 2, "unreferenced": []}
    r = hpcstage("verify", BASE, TUNED, "--cache-dir", str(cache), env=client_env(twins, tmp_path))
    assert r.returncode == 0 and r.stdout.startswith("ok: "), r.stdout + r.stderr

    # huggingface_hub's cache tools: scan_cache_dir counts the shared file once for the whole cache ...
    sizes = hf(twins, cache, f"""
from huggingface_hub import scan_cache_dir
info = scan_cache_dir(pathlib.Path({str(cache)!r}))
assert not info.warnings, info.warnings
print(json.dumps({{"total": info.size_on_disk, "repos": sorted(r.size_on_disk for r in info.repos)}}))
""")
    assert SHARED_SIZE <= sizes["total"] < 2 * SHARED_SIZE and min(sizes["repos"]) >= SHARED_SIZE
    # ... and `hf cache rm` of the base leaves the fine-tune loadable offline, its weights kept
    hf_cli = [str(Path(sys.executable).with_name("hf")), "cache", "rm", f"model/{BASE}", "--cache-dir", str(cache), "-y"]
    r = subprocess.run(hf_cli, env={**hf_env(twins, cache), "HF_HUB_DISABLE_UPDATE_CHECK": "1"}, capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr
    assert not (cache / FOLDER[BASE]).exists() and (cache / "blobs" / h[:2] / h).is_file()
    loaded = hf(twins, cache, f"""
import hashlib
from huggingface_hub import snapshot_download
root = pathlib.Path(snapshot_download({TUNED!r}))
print(json.dumps({{p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in root.iterdir()}}))
""")
    assert loaded == {name: sha256(f.local) for name, f in twins.files_of("model", TUNED).items()}
    # and deleting the fine-tune too collects the entry: the `.refs` manifest named its links right
    hf(twins, cache, f"""
from huggingface_hub import scan_cache_dir
info = scan_cache_dir(pathlib.Path({str(cache)!r}))
info.delete_revisions(*[rev.commit_hash for r in info.repos for rev in r.revisions]).execute()
print("{{}}")
""")
    assert store_files(cache) == []


def test_listing_whose_xet_hash_does_not_match_the_content_publishes_nothing(twins, tmp_path):
    cache = tmp_path / "cache"
    w = weights(twins)
    twins.listed_xet[w.sha256] = "0" * 64
    r = hpcstage("pull", BASE, "--cache-dir", str(cache), "-q", env=client_env(twins, tmp_path))
    assert r.returncode == 1 and "xetHash" in r.stderr and "Traceback" not in r.stderr, r.stderr
    # the content's and the listed hash, as far as a reader needs to compare them
    assert re.search(r"\([0-9a-f]{12}… instead of 0{12}…\)", r.stderr), r.stderr
    assert store_files(cache) == []
    blobs = cache / FOLDER[BASE] / "blobs"
    assert sorted(p.name for p in blobs.iterdir()) == [twins.files_of("model", BASE)["config.json"].oid]
    assert not (cache / FOLDER[BASE] / "snapshots" / twins.commit_of("model", BASE) / "model.safetensors").exists()
    # the wrong hash was the listing's fault: the content itself arrived intact once, and was dropped
    assert any(rec.server == "cdn" and w.sha256 in rec.path for rec in twins.log)


def test_masked_xet_hash_keeps_the_file_a_per_repo_blob(twins, tmp_path):
    cache = tmp_path / "cache"
    w = weights(twins)
    twins.listed_xet[w.sha256] = "*" * 64
    r = hpcstage("pull", BASE, "--cache-dir", str(cache), "-q", env=client_env(twins, tmp_path))
    assert r.returncode == 0, r.stderr
    assert store_files(cache) == []
    blob = cache / FOLDER[BASE] / "blobs" / w.sha256
    assert blob.is_file() and not blob.is_symlink() and sha256(blob) == w.sha256
    commit = twins.commit_of("model", BASE)
    tree = json.loads((cache / FOLDER[BASE] / "trees" / f"{commit}.json").read_text())
    assert "xet_hash" not in tree["files"]["model.safetensors"]  # huggingface_hub would reject the whole tree
    ok = hf(twins, cache, f"""
from huggingface_hub._tree_cache import read_tree_cache
print(json.dumps(read_tree_cache({str(cache / FOLDER[BASE])!r}, {commit!r}) is not None))
""")
    assert ok is True


def test_shared_blobs_disabled_by_env_keeps_per_repo_blobs(twins, tmp_path):
    cache = tmp_path / "cache"
    r = hpcstage("pull", BASE, TUNED, "--cache-dir", str(cache), "-q",
                 env=client_env(twins, tmp_path, HF_HUB_DISABLE_SHARED_BLOBS="1"))
    assert r.returncode == 0, r.stderr
    assert not (cache / "blobs").exists()
    for repo in (BASE, TUNED):
        blob = cache / FOLDER[repo] / "blobs" / weights(twins).sha256
        assert blob.is_file() and not blob.is_symlink()


ANOTHER_NODE = (
    "import sys, hpcstage.locks as locks\n"
    "locks._HOST, locks._BOOT = 'node-elsewhere-42', 'another-boot'  # its leases look like another node's\n"
    "from hpcstage.cli import main\n"
    "sys.exit(main(sys.argv[1:]))\n"
)


def test_two_nodes_publishing_the_same_content_at_once_leave_one_entry_and_two_links(twins, tmp_path):
    cache = tmp_path / "cache"
    env = client_env(twins, tmp_path)
    w = weights(twins)
    # Whoever takes the entry's lease first has its download of the shared weights held until the other pull
    # has fetched its other files; its large file was queued first, so by then it has met the lease. The two
    # overlap however slowly either starts (no throttled window to outrun on a loaded machine).
    go = threading.Event()
    twins.add_fault(FaultRule(path=w.sha256, server="cdn", method="GET", hold=go))
    argv = ["pull", "--cache-dir", str(cache), "-q"]
    procs = [subprocess.Popen([sys.executable, "-m", "hpcstage", *argv, BASE], env=env, stderr=subprocess.PIPE, text=True),
             subprocess.Popen([sys.executable, "-c", ANOTHER_NODE, *argv, TUNED], env=env, stderr=subprocess.PIPE,
                              text=True)]
    others = {BASE: [f"/{BASE}/resolve/{twins.commit_of('model', BASE)}/config.json"],
              TUNED: [f"/{TUNED}/resolve/{twins.commit_of('model', TUNED)}/config.json",
                      twins.files_of("model", TUNED)["adapter.safetensors"].etag]}

    def other_pull_got_its_other_files() -> bool:
        paths = [rec.path for rec in twins.log if rec.method == "GET"]
        holder = [r for r in (BASE, TUNED) if any(p.startswith(f"/{r}/resolve/") and "model.safetensors" in p
                                                    for p in paths)]
        other = {BASE: TUNED, TUNED: BASE}[holder[0]] if len(holder) == 1 else None
        return (other is not None and all(any(o in p for p in paths) for o in others[other])) or any(
            p.poll() is not None for p in procs)

    wait_for(other_pull_got_its_other_files, timeout=120, what="the second pull to fetch its other files")
    go.set()
    for p in procs:
        assert p.wait(timeout=120) == 0, p.stderr.read()
    import hf_xet

    adapter = twins.files_of("model", TUNED)["adapter.safetensors"]
    h, ha = (x.hash for x in hf_xet.hash_files([str(w.local), str(adapter.local)]))
    assert store_files(cache) == sorted([cache / "blobs" / h[:2] / h, cache / "blobs" / ha[:2] / ha])
    links = [f"{FOLDER[repo]}/blobs/{w.sha256}" for repo in (BASE, TUNED)]
    refs = (cache / "blobs" / h[:2] / f"{h}.refs").read_text().splitlines()
    assert sorted(refs) == sorted(links), (refs, [p.stderr.read() for p in procs])
    view = hf(twins, cache, STORE_VIEW.format(cache=str(cache), links=links, h=h, size=SHARED_SIZE))
    assert view["targets"] == [str(cache / "blobs" / h[:2] / h)] * 2 and view["unreferenced"] == []
    gets = [rec for rec in twins.log if rec.server == "cdn" and rec.method == "GET" and w.sha256 in rec.path]
    assert sum(rec.bytes_sent for rec in gets) == SHARED_SIZE  # the second waited on the lease, then linked
    r = hpcstage("verify", BASE, TUNED, "--cache-dir", str(cache), env=env)
    assert r.returncode == 0, r.stdout + r.stderr


def pulled(twins, tmp_path, *repos: str, **env) -> Path:
    cache = tmp_path / "cache"
    r = hpcstage("pull", *(repos or (BASE, TUNED)), "--cache-dir", str(cache), "-q", env=client_env(twins, tmp_path, **env))
    assert r.returncode == 0, r.stderr
    return cache


def store_entry(twins, cache: Path) -> Path:
    import hf_xet

    h = hf_xet.hash_files([str(weights(twins).local)])[0].hash
    return cache / "blobs" / h[:2] / h


def test_verify_finds_and_repair_refetches_wrong_bytes_in_the_store_for_both_repos(twins, tmp_path):
    cache = pulled(twins, tmp_path)
    entry = store_entry(twins, cache)
    entry.chmod(0o600)
    with open(entry, "r+b") as f:
        f.seek(12345)
        f.write(b"\0wrong\0")
    env = client_env(twins, tmp_path)
    r = hpcstage("verify", BASE, TUNED, "--cache-dir", str(cache), env=env)
    assert r.returncode == 1 and r.stdout.count("corrupt:") == 2 and str(entry) in r.stdout, r.stdout + r.stderr
    twins.clear_log()
    r = hpcstage("verify", BASE, TUNED, "--cache-dir", str(cache), "--repair", env=env)
    assert r.returncode == 0, r.stdout + r.stderr
    assert sha256(entry) == weights(twins).sha256 and store_files(cache).count(entry) == 1
    gets = [rec for rec in twins.log if rec.server == "cdn" and weights(twins).sha256 in rec.path]
    assert sum(rec.bytes_sent for rec in gets) == SHARED_SIZE  # fetched again once, for both repos
    view = hf(twins, cache, STORE_VIEW.format(cache=str(cache), h=entry.name, size=SHARED_SIZE,
                                              links=[f"{FOLDER[r]}/blobs/{weights(twins).sha256}" for r in (BASE, TUNED)]))
    assert view["targets"] == [str(entry)] * 2 and view["unreferenced"] == []


def test_a_store_link_missing_from_the_refs_manifest_is_reported_and_named_again_offline(twins, tmp_path):
    cache = pulled(twins, tmp_path)
    entry = store_entry(twins, cache)
    refs = entry.with_name(entry.name + ".refs")
    refs.write_text(f"{FOLDER[BASE]}/blobs/{weights(twins).sha256}\n")  # the fine-tune's line lost
    env = client_env(twins, tmp_path, HF_HUB_OFFLINE="1")
    r = hpcstage("verify", TUNED, "--cache-dir", str(cache), env=env)
    assert r.returncode == 1 and "unlisted_in_store:" in r.stdout and "model.safetensors" in r.stdout, r.stdout
    r = hpcstage("verify", TUNED, "--cache-dir", str(cache), "--repair", env=env)  # offline: only a line to add
    assert r.returncode == 0, r.stdout + r.stderr
    assert sorted(refs.read_text().splitlines()) == sorted(f"{FOLDER[x]}/blobs/{weights(twins).sha256}" for x in (BASE, TUNED))


def test_status_shows_the_bytes_the_store_saved_and_cleanup_removes_content_no_repo_links_to(twins, tmp_path):
    cache = pulled(twins, tmp_path)
    env = client_env(twins, tmp_path)
    r = hpcstage("status", "--cache-dir", str(cache), env=env)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "xet store\t2 contents, 67.1 MB stored, 67.1 MB saved (3 links)" in r.stdout, r.stdout
    import shutil

    shutil.rmtree(cache / FOLDER[TUNED])  # removed by hand (not through huggingface_hub): its links are gone
    r = hpcstage("status", "--cache-dir", str(cache), env=env)
    assert "0 B saved (1 links); 1 unreferenced: `hpcstage cleanup --cache-dir" in r.stdout, r.stdout
    adapter = twins.files_of("model", TUNED)["adapter.safetensors"]
    import re
    import shlex

    fix = shlex.split(re.search(r"`hpcstage ([^`]+)`", r.stdout)[1])  # the command status proposes, as given
    r = hpcstage(*fix, env=env)
    assert r.returncode == 0 and "shared Xet blob no repo links to" in r.stdout, r.stdout + r.stderr
    assert store_files(cache) == [store_entry(twins, cache)]  # the base's weights stay, linked
    r = hpcstage("verify", BASE, "--cache-dir", str(cache), env=env)
    assert r.returncode == 0, r.stdout + r.stderr
    assert adapter.sha256 not in " ".join(str(p) for p in cache.rglob("*"))


def test_doctor_reports_whether_the_store_is_on_and_usable(twins, tmp_path):
    cache = tmp_path / "cache"
    env = client_env(twins, tmp_path)

    def check(**extra) -> dict:
        r = hpcstage("doctor", "--cache-dir", str(cache), "--json", env={**env, **extra})
        return next(c for c in json.loads(r.stdout) if c["name"] == "xet_store")

    assert check()["status"] == "ok" and "created by the first pull" in check()["detail"]
    pulled(twins, tmp_path)
    c = check()
    assert c["status"] == "ok" and c["detail"].startswith("on: 2 contents") and "67.1 MB saved" in c["detail"], c
    c = check(HF_HUB_DISABLE_SHARED_BLOBS="1")
    assert c["status"] == "ok" and c["detail"].startswith("off: HF_HUB_DISABLE_SHARED_BLOBS"), c
    other = tmp_path / "other"
    (other / "blobs").mkdir(parents=True)
    (other / "blobs" / "notes.txt").write_text("someone's files\n")
    r = hpcstage("doctor", "--cache-dir", str(other), "--json", env=env)
    c = next(c for c in json.loads(r.stdout) if c["name"] == "xet_store")
    assert c["status"] == "warn" and "without huggingface_hub's marker" in c["detail"], c
    # and a pull there leaves that folder alone: per-repo blobs
    r = hpcstage("pull", BASE, "--cache-dir", str(other), "-q", env=env)
    assert r.returncode == 0 and "not used" in r.stderr, r.stderr
    assert sorted(p.name for p in (other / "blobs").iterdir()) == ["notes.txt"]
    assert not (other / FOLDER[BASE] / "blobs" / weights(twins).sha256).is_symlink()


def test_huggingface_hub_and_hpcstage_reuse_each_others_store_entries(twins, tmp_path):
    cache = tmp_path / "cache"
    w = weights(twins)
    h = store_entry(twins, cache).name
    # huggingface_hub publishes the weights for the base (as after its own Xet download) ...
    hf(twins, cache, f"""
import shutil
from huggingface_hub.utils import _shared_blobs as sb
cache = pathlib.Path({str(cache)!r})
blob = cache / {FOLDER[BASE]!r} / "blobs" / {w.sha256!r}
blob.parent.mkdir(parents=True)
shutil.copyfile({str(w.local)!r}, blob)
print(json.dumps(sb.publish_blob_to_shared_store(blob_path=str(blob), xet_hash={h!r}, cache_dir=cache,
                                                 expected_size={SHARED_SIZE})))
""")
    assert store_files(cache) == [store_entry(twins, cache)]
    # ... hpcstage pulls the fine-tune: the weights come from that entry, not from the network
    twins.clear_log()
    pulled(twins, tmp_path, TUNED)
    assert not [rec for rec in twins.log if rec.server == "cdn" and w.sha256 in rec.path]
    assert os.readlink(cache / FOLDER[TUNED] / "blobs" / w.sha256) == f"../../blobs/{h[:2]}/{h}"
    # and huggingface_hub links a third repo to what is there, through its own reuse call
    reused = hf(twins, cache, f"""
from huggingface_hub.utils import _shared_blobs as sb
cache = pathlib.Path({str(cache)!r})
blob = cache / "models--demo-org--third" / "blobs" / {w.sha256!r}
blob.parent.mkdir(parents=True)
print(json.dumps(sb.try_link_from_shared_store(blob_path=str(blob), xet_hash={h!r}, cache_dir=cache,
                                               expected_size={SHARED_SIZE})))
""")
    assert reused is True
    refs = (cache / "blobs" / h[:2] / f"{h}.refs").read_text().splitlines()
    assert sorted(refs) == sorted(f"{folder}/blobs/{w.sha256}" for folder in
                                  (FOLDER[BASE], FOLDER[TUNED], "models--demo-org--third"))


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to create a second user and a group")
def test_two_users_of_a_shared_group_cache_share_one_copy(twins, tmp_path):
    import grp
    import secrets
    import shutil
    import tempfile

    from helpers import python_for

    suffix = secrets.token_hex(3)
    group, user = f"hpcxg{suffix}", f"hpcxu{suffix}"
    base = Path(tempfile.mkdtemp(prefix="hpcstage-xet-", dir="/tmp"))  # pytest's tmp is 0700: others can't enter
    subprocess.run(["groupadd", group], check=True)
    try:
        subprocess.run(["useradd", "-M", "-N", "-G", group, "-d", str(base / "home"), "-s", "/bin/sh", user], check=True)
        os.chmod(base, 0o755)
        gid = grp.getgrnam(group).gr_gid
        cache = base / "shared"
        r = hpcstage("pull", BASE, "--cache-dir", str(cache), "-q", "--shared-group", group,
                     env=client_env(twins, base / "root"), umask=0o077)
        assert r.returncode == 0, r.stderr
        entry = store_entry(twins, cache)
        # the store follows shared_group like the rest: folders setgid and group-writable, content group-readable
        for folder in (cache / "blobs", entry.parent, cache / ".locks" / "hpcstage" / "xet"):
            st = folder.stat()
            assert st.st_gid == gid and st.st_mode & 0o2070 == 0o2070, (folder, oct(st.st_mode))
        for f in (entry, cache / "blobs" / ".huggingface-shared-blobs"):
            st = f.stat()
            assert st.st_gid == gid and st.st_mode & 0o040, (f, oct(st.st_mode))

        home = base / "home"
        home.mkdir()
        shutil.chown(home, user)
        python, pythonpath = python_for(user)
        user_env = {**client_env(twins, home), "PATH": os.environ["PATH"], "HOME": str(home), **pythonpath}
        twins.clear_log()
        cmd = ["runuser", "-u", user, "--", "env", "-i", *[f"{k}={v}" for k, v in user_env.items()], python, "-m",
               "hpcstage", "pull", TUNED, "--cache-dir", str(cache), "-q", "--shared-group", group]
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=home)
        assert r.returncode == 0, r.stderr
        w = weights(twins)
        assert not [rec for rec in twins.log if rec.server == "cdn" and w.sha256 in rec.path]  # not fetched again
        link = cache / FOLDER[TUNED] / "blobs" / w.sha256
        assert link.lstat().st_uid != 0 and os.readlink(link) == f"../../blobs/{entry.parent.name}/{entry.name}"
        assert [p for p in store_files(cache) if p.name == entry.name] == [entry]
        assert sorted(entry.with_name(entry.name + ".refs").read_text().splitlines()) == sorted(
            f"{FOLDER[x]}/blobs/{w.sha256}" for x in (BASE, TUNED))
        r = hpcstage("verify", BASE, TUNED, "--cache-dir", str(cache), env=client_env(twins, base / "root"))
        assert r.returncode == 0, r.stdout + r.stderr
    finally:
        subprocess.run(["userdel", user], capture_output=True)
        subprocess.run(["groupdel", group], capture_output=True)
        shutil.rmtree(base, ignore_errors=True)


def test_emulator_lists_real_xet_hashes_and_answers_x_xet_hash_only_when_asked(twins_root):
    import hf_xet
    import urllib.request

    with HubServer(twins_root) as server:
        w = weights(server)
        url = f"{server.url}/api/models/{BASE}/tree/main?recursive=true"
        entries = lambda: {e["path"]: e for e in json.load(urllib.request.urlopen(url))}  # noqa: E731
        assert "xetHash" not in entries()["model.safetensors"]  # off by default: clients would switch to Xet
        server.xet = True
        listed = entries()
        assert listed["model.safetensors"]["xetHash"] == hf_xet.hash_files([str(w.local)])[0].hash
        assert "xetHash" not in listed["config.json"]  # not LFS: no Xet hash, as on the Hub
        head = urllib.request.Request(f"{server.url}/{BASE}/resolve/main/model.safetensors", method="HEAD")

        class NoRedirect(urllib.request.HTTPRedirectHandler):
            def redirect_request(self, *args, **kwargs):
                return None

        try:
            urllib.request.build_opener(NoRedirect).open(head)
        except urllib.error.HTTPError as e:
            assert e.code == 302 and e.headers["X-Xet-Hash"] == listed["model.safetensors"]["xetHash"]
        else:
            raise AssertionError("resolve did not redirect")
        server.listed_xet[w.sha256] = "*" * 64
        assert entries()["model.safetensors"]["xetHash"] == "*" * 64


def test_a_pull_from_the_lockfile_links_from_the_store_without_a_download(twins, tmp_path):
    m = tmp_path / "hpcstage.yaml"
    m.write_text(f"cache_dir: cache\nmodels:\n  - repo: {BASE}\n  - repo: {TUNED}\n")
    env = client_env(twins, tmp_path)
    r = hpcstage("pull", "-f", str(m), "-q", env=env)
    assert r.returncode == 0, r.stderr
    w = weights(twins)
    locked = json.loads((tmp_path / "hpcstage.lock").read_text())["entries"]
    xet = {f["path"]: f.get("xet_hash") for e in locked.values() for f in e["files"] if e["repo"] == TUNED}
    entry = store_entry(twins, tmp_path / "cache")
    assert xet["model.safetensors"] == entry.name and xet["config.json"] is None
    import shutil

    shutil.rmtree(tmp_path / "cache" / FOLDER[TUNED])
    twins.clear_log()
    r = hpcstage("pull", "-f", str(m), "-q", env=env)
    assert r.returncode == 0, r.stderr
    assert not [rec for rec in twins.log if w.sha256 in rec.path]  # the weights came from the store
    assert os.readlink(tmp_path / "cache" / FOLDER[TUNED] / "blobs" / w.sha256).endswith(entry.name)


def test_a_store_another_process_is_marking_right_now_is_shared_and_its_temps_left_alone(tmp_path):
    from hpcstage.xetstore import MARKER, XetStore

    blobs = tmp_path / "cache" / "blobs"
    blobs.mkdir(parents=True)
    theirs = [blobs / f"{MARKER}.0123abcd.tmp", blobs / ".probe.89abcdef.hpcstage-tmp"]  # mid-way through marking
    theirs[0].write_bytes(b"1")
    theirs[1].symlink_to(MARKER)
    assert XetStore(tmp_path / "cache").usable() is None
    assert (blobs / MARKER).read_bytes() == b"1\n" and all(p.is_symlink() or p.is_file() for p in theirs)


RACE_TO_MARK = """
import sys, time
from pathlib import Path
from hpcstage.xetstore import XetStore

me, n, gates, caches = sys.argv[1], int(sys.argv[2]), Path(sys.argv[3]), sys.argv[4:]
for i, cache in enumerate(caches):  # all n processes at the same cache at once: a barrier made of files
    (gates / f"{i}-{me}").touch()
    deadline = time.monotonic() + 120
    while len(list(gates.glob(f"{i}-*"))) < n:
        assert time.monotonic() < deadline, f"the others never reached cache {i}"
        time.sleep(0.001)
    print(XetStore(cache).usable())
"""


def test_workers_marking_a_fresh_store_at_once_all_get_to_use_it(tmp_path):
    """An array's workers starting on a fresh cache: none may judge the store foreign because of another's
    temp files (each would then keep a per-repo copy of the content)."""
    caches = [str(tmp_path / f"cache{i}") for i in range(30)]
    gates = tmp_path / "gates"
    gates.mkdir()
    procs = [subprocess.Popen([sys.executable, "-c", RACE_TO_MARK, str(k), "4", str(gates), *caches],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for k in range(4)]
    for proc in procs:
        out, err = proc.communicate(timeout=240)
        assert proc.returncode == 0, err
        assert out.splitlines() == ["None"] * len(caches), out
