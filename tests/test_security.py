"""Security: site allowlist, hostile listings and links, tokens that never leak, group-shared caches."""
from __future__ import annotations

import grp
import hashlib
import json
import os
import secrets
import shutil
import subprocess
import tempfile
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from hpcstage import policy
from hpcstage.errors import PolicyError
from helpers import client_env, hpcstage, python_for as _python_for, sha256

MODEL, DATASET = "demo-org/tiny-model", "demo-org/tiny-dataset"
MODEL_DIR = "models--demo-org--tiny-model"
MANIFEST = "cache_dir: cache\nmodels:\n  - repo: demo-org/tiny-model\ndatasets:\n  - repo: demo-org/tiny-dataset\n"


def files_under(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): (os.readlink(p).encode() if p.is_symlink() else p.read_bytes())
            for p in folder.rglob("*") if p.is_symlink() or p.is_file()}


# -- allowlists: the manifest's and the site's, both checked before any request


def test_site_policy_refuses_with_exit_2_before_any_request(hub, tmp_path):
    site = tmp_path / "policy.yaml"
    site.write_text("allow: ['other-org/*']\n")
    env = client_env(hub, tmp_path / "c", HPCSTAGE_POLICY=str(site))
    r = hpcstage("pull", MODEL, "--cache-dir", str(tmp_path / "c"), env=env)
    assert r.returncode == 2 and f"site policy {site}" in r.stderr and "Traceback" not in r.stderr
    manifest = tmp_path / "hpcstage.yaml"
    manifest.write_text("allow: ['demo-org/*']\nmodels:\n  - repo: demo-org/tiny-model\n")
    r = hpcstage("pull", "-f", str(manifest), env=env)  # the manifest allows it, the site does not
    assert r.returncode == 2 and "site policy" in r.stderr
    site.write_text("allow: ['demo-org/*']\n")
    manifest.write_text("allow: ['other-org/*']\nmodels:\n  - repo: demo-org/tiny-model\n")
    r = hpcstage("pull", "-f", str(manifest), env=env)  # the site allows it, the manifest does not
    assert r.returncode == 2 and "manifest" in r.stderr
    assert hub.log == [] and not (tmp_path / "c").exists()
    manifest.write_text("allow: ['demo-org/tiny-*']\ncache_dir: c\nmodels:\n  - repo: demo-org/tiny-model\n")
    r = hpcstage("pull", "-f", str(manifest), "-q", env=env)  # both allow it
    assert r.returncode == 0, r.stderr
    assert hub.log


@pytest.mark.parametrize("text, says", [("allow: demo-org/*\n", "list of glob"), ("alow: []\n", "one key"),
                                        ("allow: [\n", "not valid YAML"), (None, "cannot read")])
def test_bad_site_policy_is_exit_2_naming_the_file(hub, tmp_path, text, says):
    site = tmp_path / "policy.yaml"
    if text is not None:
        site.write_text(text)
    env = client_env(hub, tmp_path / "c", HPCSTAGE_POLICY=str(site))
    r = hpcstage("pull", MODEL, "--cache-dir", str(tmp_path / "c"), env=env)
    assert r.returncode == 2 and str(site) in r.stderr and says in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1 and hub.log == []


def test_default_site_policy_is_read_at_call_time(tmp_path, monkeypatch):
    monkeypatch.delenv(policy.POLICY_ENV, raising=False)
    monkeypatch.setattr(policy, "SITE_POLICY", tmp_path / "etc" / "policy.yaml")
    policy.Allowlist(None).check("anything/goes")  # no site file: no site rule
    (tmp_path / "etc").mkdir()
    policy.SITE_POLICY.write_text("allow: ['Qwen/*']\n")
    with pytest.raises(PolicyError, match="site policy"):
        policy.Allowlist(None).check("anything/goes")
    policy.Allowlist(["Qwen/*", "anything/*"]).check("Qwen/Qwen2.5-7B")  # passes both lists
    with pytest.raises(PolicyError, match="site policy"):
        policy.Allowlist(["Qwen/*", "anything/*"]).check("anything/goes")
    with pytest.raises(PolicyError, match="manifest"):
        policy.Allowlist(["anything/*"]).check("Qwen/Qwen2.5-7B")
    policy.SITE_POLICY.write_text("allow: ['anything/*']\n")
    policy.Allowlist(None).check("anything/goes")


# -- hostile input from a server or a cache


class HostileHub:
    """A tiny Hub that resolves `main` and lists a tree with the given paths; it logs every request and
    serves any file as b"pwned" so a client that did fetch would write something."""

    COMMIT = "c0ffee" + "0" * 34

    def __init__(self, paths: list[str], oid: str = "1" * 40, lfs_oid: str | None = None, size: int = 5):
        self.paths, self.requests = paths, []
        hub = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self):
                hub.requests.append(self.path)
                if "/revision/" in self.path:
                    body = json.dumps({"id": "evil-org/repo", "sha": hub.COMMIT}).encode()
                elif "/tree/" in self.path:
                    body = json.dumps([{"type": "file", "path": p, "size": size, "oid": oid,
                                        **({"lfs": {"oid": lfs_oid, "size": size}} if lfs_oid else {})}
                                       for p in hub.paths]).encode()
                else:
                    body = b"pwned"
                self.send_response(200)
                self.send_header("Content-Length", str(len(body)))
                self.send_header("X-Repo-Commit", hub.COMMIT)
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_port}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self):
        self.server.shutdown()
        self.server.server_close()


@pytest.mark.parametrize("bad", ["../../x", "../../../../x", "/ABS/x", "a/../../../x", "a\\..\\..\\x", "./x"])
def test_hostile_tree_entries_are_refused_and_nothing_is_written_outside_the_cache(hub, tmp_path, bad):
    bad = bad.replace("/ABS", str(tmp_path / "outside"))
    evil = HostileHub(["ok.txt", bad])
    try:
        cache = tmp_path / "deep" / "cache"
        cache.mkdir(parents=True)
        (tmp_path / "keep.txt").write_text("untouched")
        before = files_under(tmp_path)
        env = client_env(hub, tmp_path / "home", HF_ENDPOINT=evil.url)
        r = hpcstage("pull", "evil-org/repo", "--cache-dir", str(cache), "-v", env=env, cwd=tmp_path)
        assert r.returncode == 2, r.stdout + r.stderr
        assert f"refused path from the evil-org/repo listing {bad!r}" in r.stderr and "Traceback" not in r.stderr
        assert not any("/resolve/" in p for p in evil.requests)  # nothing was fetched
        assert files_under(tmp_path) == before
        snapshot = cache / "models--evil-org--repo" / "snapshots" / HostileHub.COMMIT
        assert not os.path.lexists(os.path.normpath(os.path.join(snapshot, bad)))
    finally:
        evil.close()


@pytest.mark.parametrize("oid, lfs_oid", [("../" * 8 + "tmp/ESCAPED", None), ("1" * 40, "../../../ESCAPED" + "0" * 48)])
def test_hostile_blob_ids_in_the_listing_are_refused_before_any_write(hub, tmp_path, oid, lfs_oid):
    evil = HostileHub(["model.safetensors"], oid=oid, lfs_oid=lfs_oid, size=9 << 20)
    try:
        cache = tmp_path / "deep" / "cache"
        cache.mkdir(parents=True)
        before = files_under(tmp_path)
        env = client_env(hub, tmp_path / "home", HF_ENDPOINT=evil.url)
        r = hpcstage("pull", "evil-org/repo", "--cache-dir", str(cache), env=env, cwd=tmp_path)
        assert r.returncode == 1 and "invalid blob id" in r.stderr and "Traceback" not in r.stderr, r.stderr
        assert not any("/resolve/" in p for p in evil.requests)
        assert files_under(tmp_path) == before
    finally:
        evil.close()


def test_hostile_listing_in_the_cache_is_reported_and_never_touched(hub, tmp_path):
    cache = tmp_path / "cache"
    env = client_env(hub, cache)
    assert hpcstage("pull", MODEL, "--cache-dir", str(cache), "-q", env=env).returncode == 0
    victim = tmp_path / "victim.txt"
    victim.write_text("precious")
    commit = hub.commit_of("model", MODEL)
    tree = cache / MODEL_DIR / "trees" / f"{commit}.json"
    data = json.loads(tree.read_text())
    data["files"]["../../../../victim.txt"] = {"size": 1, "blob_id": "0" * 40}
    tree.write_text(json.dumps(data))
    r = hpcstage("verify", MODEL, "--cache-dir", str(cache), "--repair", "--json", env=env)
    assert r.returncode == 1
    assert [(p["kind"], p["path"]) for p in json.loads(r.stdout)["problems"]] == [("bad_path", "../../../../victim.txt")]
    assert victim.read_text() == "precious"


def test_snapshot_link_to_a_file_outside_the_cache_is_replaced_and_the_file_kept(hub, tmp_path):
    cache = tmp_path / "cache"
    env = client_env(hub, cache)
    assert hpcstage("pull", MODEL, "--cache-dir", str(cache), "-q", env=env).returncode == 0
    victim = tmp_path / "victim.json"
    victim.write_text('{"not": "the config"}')
    link = cache / MODEL_DIR / "snapshots" / hub.commit_of("model", MODEL) / "config.json"
    link.unlink()
    link.symlink_to(victim)
    r = hpcstage("verify", MODEL, "--cache-dir", str(cache), "--json", env=env)
    assert r.returncode == 1
    assert [(p["kind"], p["path"]) for p in json.loads(r.stdout)["problems"]] == [("bad_link", "config.json")]
    r = hpcstage("verify", MODEL, "--cache-dir", str(cache), "--repair", env=env)
    assert r.returncode == 0, r.stdout + r.stderr
    assert victim.read_text() == '{"not": "the config"}'
    assert sha256(link) == sha256(hub.files_of("model", MODEL)["config.json"].local)
    assert not os.path.isabs(os.readlink(link))


# -- tokens


def test_canary_token_appears_in_no_output_file_or_cdn_request(hub, tmp_path):
    canary = "hf_CANARY" + secrets.token_hex(16)
    (tmp_path / "hpcstage.yaml").write_text(MANIFEST)
    manifest = str(tmp_path / "hpcstage.yaml")
    env = client_env(hub, tmp_path / "home", HF_TOKEN=canary)
    out = []
    for args in (["pull", "-f", manifest, "-v"], ["verify", "-f", manifest, "-v"]):
        r = hpcstage(*args, env=env)
        assert r.returncode == 0, r.stderr
        out.append(r.stdout + r.stderr)
    weights = hub.files_of("model", MODEL)["model.safetensors"]
    (tmp_path / "cache" / MODEL_DIR / "blobs" / weights.etag).write_bytes(b"x" * weights.size)
    for args in (["verify", "-f", manifest, "--repair", "-v"], ["verify", "-f", manifest, "--json", "-v"]):
        r = hpcstage(*args, env=env)
        assert r.returncode == 0, r.stdout + r.stderr
        out.append(r.stdout + r.stderr)
    assert all(canary not in text for text in out)
    assert sha256(tmp_path / "cache" / MODEL_DIR / "blobs" / weights.etag) == weights.sha256
    hub_records = [rec for rec in hub.log if rec.server == "hub"]
    cdn_records = [rec for rec in hub.log if rec.server == "cdn"]
    assert hub_records and all(rec.has_auth for rec in hub_records)
    assert len(cdn_records) >= 4 and not any(rec.has_auth for rec in cdn_records)  # 3 LFS files + the repair
    written = files_under(tmp_path)
    assert "hpcstage.lock" in written and any(name.startswith("cache/") for name in written)
    assert [name for name, data in written.items() if canary.encode() in data] == []


def test_token_file_in_hf_home_is_sent_to_the_hub_only(hub, tmp_path):
    canary = "hf_CANARY" + secrets.token_hex(16)
    env = client_env(hub, tmp_path / "c")
    r = hpcstage("pull", MODEL, "--include", "*.json", "--cache-dir", str(tmp_path / "c1"), env=env)
    assert r.returncode == 0, r.stderr
    assert hub.log and not any(rec.has_auth for rec in hub.log)  # control: no token, no Authorization
    hub.clear_log()
    token = tmp_path / "c" / "home" / "token"
    token.parent.mkdir(parents=True)
    token.write_text(canary)
    r = hpcstage("pull", MODEL, "--cache-dir", str(tmp_path / "c2"), "-v", env=env)
    assert r.returncode == 0, r.stderr
    assert canary not in r.stdout + r.stderr
    assert all(rec.has_auth for rec in hub.log if rec.server == "hub")
    assert [rec for rec in hub.log if rec.server == "cdn"] and not any(rec.has_auth for rec in hub.log if rec.server == "cdn")


# -- group-shared caches


def _stat_problems(folder: Path, gid: int) -> list[str]:
    bad = []
    for p in [folder, *folder.rglob("*")]:
        st = os.lstat(p)
        if p.is_symlink():
            continue
        want = 0o2070 if p.is_dir() else 0o040
        if st.st_gid != gid or st.st_mode & want != want:
            bad.append(f"{p} {oct(st.st_mode)} gid={st.st_gid}")
    return bad


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to create a second user and a group")
def test_shared_group_cache_is_read_offline_and_verified_by_another_member(hub, tmp_path):
    suffix = secrets.token_hex(3)
    group, user = f"hpcsg{suffix}", f"hpcsu{suffix}"
    base = Path(tempfile.mkdtemp(prefix="hpcstage-shared-", dir="/tmp"))  # pytest's tmp is 0700: others can't enter
    subprocess.run(["groupadd", group], check=True)
    try:
        subprocess.run(["useradd", "-M", "-N", "-G", group, "-d", str(base / "home"), "-s", "/bin/sh", user], check=True)
        os.chmod(base, 0o755)
        gid = grp.getgrnam(group).gr_gid
        env = client_env(hub, base / "root")
        shared, private = base / "shared", base / "private"
        for cache, extra in ((shared, ["--shared-group", group]), (private, [])):
            r = hpcstage("pull", MODEL, "--cache-dir", str(cache), "-q", *extra, env=env, umask=0o077)
            assert r.returncode == 0, r.stderr
        repo = shared / MODEL_DIR
        commit = hub.commit_of("model", MODEL)
        assert _stat_problems(shared, gid) == []
        # a listing written 0600 (as huggingface_hub does) is shared again by the next pull
        (repo / "trees" / f"{commit}.json").chmod(0o600)
        r = hpcstage("pull", MODEL, "--cache-dir", str(shared), "-q", "--shared-group", group, env=env, umask=0o077)
        assert r.returncode == 0, r.stderr
        assert _stat_problems(shared, gid) == []

        home = base / "home"
        home.mkdir()
        shutil.chown(home, user)
        code = (
            "import hashlib, json, sys, pathlib\n"
            "from huggingface_hub import snapshot_download\n"
            f"root = pathlib.Path(snapshot_download({MODEL!r}, local_files_only=True))\n"
            "(root.parent.parent / 'probe').write_text('group-writable'); (root.parent.parent / 'probe').unlink()\n"
            "print(json.dumps({p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in root.iterdir()}))\n"
        )

        python, pythonpath = _python_for(user)

        def as_user(cache: Path, *argv: str) -> subprocess.CompletedProcess:
            user_env = {"PATH": os.environ["PATH"], "HOME": str(home), "HF_HOME": str(home / "hf"),
                        "HF_HUB_CACHE": str(cache), "HF_HUB_OFFLINE": "1", "HF_HUB_DISABLE_TELEMETRY": "1",
                        "HF_ENDPOINT": "http://127.0.0.1:9", **pythonpath}
            cmd = ["runuser", "-u", user, "--", "env", "-i", *[f"{k}={v}" for k, v in user_env.items()], python, *argv]
            return subprocess.run(cmd, capture_output=True, text=True, timeout=120, cwd=home)

        r = as_user(shared, "-c", code)
        assert r.returncode == 0, r.stderr
        want = {name: sha256(info.local) for name, info in hub.files_of("model", MODEL).items()}
        assert json.loads(r.stdout.strip().splitlines()[-1]) == want
        r = as_user(shared, "-m", "hpcstage", "verify", MODEL, "--cache-dir", str(shared))
        assert r.returncode == 0, r.stdout + r.stderr
        assert r.stdout.startswith("ok: ") and f"{len(want)} files" in r.stdout
        r = as_user(private, "-c", code)  # control: the same pull without the group is unreadable to them
        assert r.returncode != 0
        r = as_user(private, "-m", "hpcstage", "verify", MODEL, "--cache-dir", str(private))
        assert r.returncode == 1 and "permission denied" in r.stderr and "Traceback" not in r.stderr
    finally:
        subprocess.run(["userdel", user], capture_output=True)
        subprocess.run(["groupdel", group], capture_output=True)
        shutil.rmtree(base, ignore_errors=True)


def test_repo_cache_writes_carry_the_shared_group_bits_even_under_a_private_umask(tmp_path):
    from hpcstage.hfcache import CachedFile, RepoCache
    from hpcstage.safefs import Sharing

    group = grp.getgrgid(100 if os.geteuid() == 0 else os.getgid()).gr_name
    sharing = Sharing.for_group(group)
    cache = RepoCache(tmp_path / "hub", "model", "org/name", sharing=sharing)
    content = b"{}\n"
    f = CachedFile("sub/dir/config.json", len(content), hashlib.sha1(b"blob 3\0" + content).hexdigest())
    old = os.umask(0o077)
    try:
        (tmp_path / "hub").mkdir()
        sharing.dir(tmp_path / "hub")
        partial = cache.partial(f.etag)
        cache.create_partial(f.etag)
        partial.write_bytes(content)
        cache.commit_blob(partial, f.etag)
        cache.link("a" * 40, f)
        cache.write_ref("main", "a" * 40)
        cache.write_tree("a" * 40, [f])
    finally:
        os.umask(old)
    assert _stat_problems(tmp_path / "hub", sharing.gid) == []
    assert (cache.snapshot("a" * 40) / f.path).read_bytes() == content
    with pytest.raises(Exception, match="unknown group"):
        Sharing.for_group("no-such-group-hpcstage")


def test_manifest_shared_group_applies_to_a_pull_under_a_private_umask(hub, tmp_path):
    group = grp.getgrgid(100 if os.geteuid() == 0 else os.getgid())
    manifest = tmp_path / "hpcstage.yaml"
    manifest.write_text(f"cache_dir: cache\nshared_group: {group.gr_name}\nmodels:\n  - repo: demo-org/tiny-model\n")
    r = hpcstage("pull", "-f", str(manifest), "-q", env=client_env(hub, tmp_path / "h"), umask=0o077)
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "cache" / MODEL_DIR / "trees").is_dir()
    assert _stat_problems(tmp_path / "cache", group.gr_gid) == []
