"""Data entries end to end through the real CLI: `url:` (served by the Hub emulator, LFS-suffixed files via
its CDN redirect), `repo:` + `file:`, `local:`; extraction, `expect:`, the lockfile, kill -9 resume."""
from __future__ import annotations

import hashlib
import io
import json
import os
import signal
import subprocess
import sys
import tarfile
import time
import zipfile
from pathlib import Path

import pytest

from conftest import GIB_MODEL
from helpers import client_env, pieces_done
from hpcstage.testing.hub import FaultRule, HubServer
from hpcstage.transfer import PIECE

REPO = "demo-org/websight-archives"
IMAGES = 6
FILES = {
    "websight/prompts.jsonl": b"".join(json.dumps({"prompt": f"page {i}", "image": f"images/{i}.png"}).encode() + b"\n"
                                       for i in range(IMAGES)),
    **{f"websight/images/{i}.png": b"\x89PNG\r\n\x1a\n" + os.urandom(20_000 + i) for i in range(IMAGES)},
}
EXPECT = ('{files: [websight/prompts.jsonl], dirs: [websight/images], jsonl: {websight/prompts.jsonl: %d}, '
          'count: {"websight/images/*.png": %d}}' % (IMAGES, IMAGES))


def write_tgz(path: Path, files: dict[str, bytes]) -> None:
    with tarfile.open(path, "w:gz") as tf:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))


def write_zip(path: Path, files: dict[str, bytes]) -> None:
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as zf:
        for name, data in files.items():
            zf.writestr(name, data)


@pytest.fixture(scope="module")
def archive_root(tmp_path_factory):
    """A dataset repo holding the archives: complete ones, one missing an image, a hostile one."""
    root = tmp_path_factory.mktemp("archives")
    repo = root / "datasets" / REPO
    repo.mkdir(parents=True)
    write_tgz(repo / "websight.tar.gz", FILES)
    write_zip(repo / "websight.zip", FILES)
    write_tgz(repo / "websight-short.tar.gz", {k: v for k, v in FILES.items() if not k.endswith("/5.png")})
    hostile = repo / "hostile.tar.gz"
    with tarfile.open(hostile, "w:gz") as tf:
        for name, kind, link in [("ok.txt", tarfile.REGTYPE, ""), ("../escaped.txt", tarfile.REGTYPE, ""),
                                 ("/tmp/hpcstage-abs.txt", tarfile.REGTYPE, ""), ("etc", tarfile.SYMTYPE, "/etc"),
                                 ("etc/hpcstage-pwned", tarfile.REGTYPE, "")]:
            info = tarfile.TarInfo(name)
            info.type, info.linkname = kind, link
            data = b"x" if kind == tarfile.REGTYPE else None
            info.size = len(data or b"")
            tf.addfile(info, io.BytesIO(data) if data else None)
    (repo / "plain.bin").write_bytes(os.urandom(100_000))  # not LFS-suffixed: served by the hub itself
    return root


@pytest.fixture
def ahub(archive_root):
    with HubServer(archive_root) as server:
        yield server


def resolve_url(server, name: str, repo: str = REPO, kind: str = "datasets/") -> str:
    return f"{server.url}/{kind}{repo}/resolve/main/{name}"


def pull(manifest: Path, server, *extra: str, **env) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "hpcstage", "pull", "-f", str(manifest), "-q", *extra],
                          env=client_env(server, manifest.parent / "cache", HF_TOKEN="hf_secret_token", **env),
                          capture_output=True, text=True, timeout=180)


def manifest_at(folder: Path, body: str) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "hpcstage.yaml"
    path.write_text("cache_dir: cache\ndata_dir: data\ndatasets:\n" + body)
    return path


def lock_data(manifest: Path) -> dict:
    lock = manifest.parent / "hpcstage.lock"
    return json.loads(lock.read_text())["data"] if lock.exists() else {}


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def tree(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_tar_gz_and_zip_urls_extract_pass_expect_and_never_see_the_token(ahub, tmp_path):
    m = manifest_at(tmp_path, f"""
  - url: {resolve_url(ahub, "websight.tar.gz")}
    allow_http: true
    extract: true
    dest: websight-tgz
    expect: {EXPECT}
  - url: {resolve_url(ahub, "websight.zip")}
    allow_http: true
    extract: true
    dest: websight-zip
    expect: {EXPECT}
""")
    r = pull(m, ahub)
    assert r.returncode == 0, r.stderr
    data = tmp_path / "data"
    for dest in ("websight-tgz", "websight-zip"):
        assert tree(data / dest) == FILES
    lock = lock_data(m)
    repo = archive_dir(ahub)
    assert lock["data:websight-tgz"]["sha256"] == sha((repo / "websight.tar.gz").read_bytes())
    assert {f["path"]: f["sha256"] for f in lock["data:websight-zip"]["files"]} == {k: sha(v) for k, v in FILES.items()}
    assert not list((data / ".hpcstage" / "downloads").iterdir())  # archives deleted after extraction
    assert not list(data.glob(".*.hpcstage-build"))
    assert any(rec.server == "cdn" for rec in ahub.log)  # .gz/.zip went through the redirect
    assert not any(rec.has_auth for rec in ahub.log)  # HF_TOKEN is set but never sent to a URL
    # a second pull with everything in place makes no request and changes nothing
    ahub.clear_log()
    before = (tmp_path / "hpcstage.lock").read_bytes()
    r = pull(m, ahub)
    assert r.returncode == 0, r.stderr
    assert ahub.log == [] and (tmp_path / "hpcstage.lock").read_bytes() == before


def archive_dir(server) -> Path:
    return Path(server.root) / "datasets" / REPO


def test_missing_image_fails_its_count_expectation_and_is_not_marked_staged(ahub, tmp_path):
    m = manifest_at(tmp_path, f"""
  - url: {resolve_url(ahub, "websight-short.tar.gz")}
    allow_http: true
    extract: true
    dest: websight
    expect: {EXPECT}
""")
    r = pull(m, ahub)
    assert r.returncode == 1, r.stderr
    assert "websight/images/*.png matches 5 files, expected 6" in r.stderr and "Traceback" not in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1
    assert (tmp_path / "data" / "websight" / "websight" / "prompts.jsonl").exists()  # kept for inspection
    assert lock_data(m) == {}
    assert not (tmp_path / "data" / ".hpcstage" / "staged" / "websight.json").exists()
    chk = subprocess.run([sys.executable, "-m", "hpcstage", "check", "-f", str(m), "--isolation", "guard"],
                         env=client_env(ahub, tmp_path / "cache"), capture_output=True, text=True, timeout=120)
    # the data is there but fails `expect:`: check proposes inspecting it, not a pull that fails the same way
    assert chk.returncode == 1 and "failed its `expect:`" in chk.stdout, chk.stdout + chk.stderr
    assert "fix: inspect the data" in chk.stdout and "hpcstage pull" not in chk.stdout


def test_hostile_archive_is_refused_with_nothing_outside_and_no_dest(ahub, tmp_path):
    m = manifest_at(tmp_path, f"""
  - url: {resolve_url(ahub, "hostile.tar.gz")}
    allow_http: true
    extract: true
    dest: evil
""")
    r = pull(m, ahub)
    assert r.returncode == 1 and "refused" in r.stderr and "climbs out" in r.stderr, r.stderr
    data = tmp_path / "data"
    assert not (data / "evil").exists() and not list(data.glob(".evil*"))
    assert not (tmp_path / "escaped.txt").exists() and not (data / "escaped.txt").exists()
    assert not Path("/tmp/hpcstage-abs.txt").exists() and not Path("/etc/hpcstage-pwned").exists()
    assert lock_data(m) == {}


def test_url_without_extract_is_pinned_by_sha256_in_the_lock(ahub, tmp_path):
    body = f"""
  - url: {resolve_url(ahub, "plain.bin")}
    allow_http: true
    dest: plain
"""
    m = manifest_at(tmp_path, body)
    assert pull(m, ahub).returncode == 0
    content = (archive_dir(ahub) / "plain.bin").read_bytes()
    assert (tmp_path / "data" / "plain" / "plain.bin").read_bytes() == content
    assert lock_data(m)["data:plain"]["sha256"] == sha(content)
    # the data goes missing and the source changes: the locked hash refuses the new bytes
    (tmp_path / "data" / "plain" / "plain.bin").unlink()
    (archive_dir(ahub) / "plain.bin").write_bytes(os.urandom(100_000))
    ahub.refresh()
    try:
        r = pull(m, ahub)
        assert r.returncode == 1 and "changed since it was locked" in r.stderr and "--update" in r.stderr, r.stderr
        assert not (tmp_path / "data" / "plain" / "plain.bin").exists()
        r = pull(m, ahub, "--update")
        assert r.returncode == 0, r.stderr
        new = (archive_dir(ahub) / "plain.bin").read_bytes()
        assert lock_data(m)["data:plain"]["sha256"] == sha(new)
    finally:
        (archive_dir(ahub) / "plain.bin").write_bytes(content)
        ahub.refresh()


def test_http_url_is_refused_unless_allowed(ahub, tmp_path):
    m = manifest_at(tmp_path, f"  - url: {resolve_url(ahub, 'plain.bin')}\n    dest: x\n")
    r = pull(m, ahub)
    assert r.returncode == 2 and "allow_http" in r.stderr and ahub.log == [], r.stderr


def test_a_wrong_manifest_sha256_discards_the_bytes(ahub, tmp_path):
    m = manifest_at(tmp_path, f"""
  - url: {resolve_url(ahub, "websight.zip")}
    allow_http: true
    sha256: "{"0" * 64}"
    dest: w
""")
    r = pull(m, ahub)
    assert r.returncode == 1 and "hash mismatch" in r.stderr, r.stderr
    assert not (tmp_path / "data" / "w").exists()
    assert not [p for p in (tmp_path / "data" / ".hpcstage" / "downloads").iterdir() if not p.name.endswith("-lease")]


def test_hub_file_is_staged_through_the_hub_cache_then_extracted(ahub, tmp_path):
    m = manifest_at(tmp_path, f"""
  - repo: {REPO}
    file: websight.zip
    extract: true
    strip_components: 1
    dest: ws
    expect: {{files: [prompts.jsonl], count: {{"*.png": {IMAGES}}}}}
""")
    r = pull(m, ahub)
    assert r.returncode == 0, r.stderr
    assert tree(tmp_path / "data" / "ws") == {k.removeprefix("websight/"): v for k, v in FILES.items()}
    snap = next((tmp_path / "cache" / f"datasets--{REPO.replace('/', '--')}" / "snapshots").iterdir())
    assert (snap / "websight.zip").read_bytes() == (archive_dir(ahub) / "websight.zip").read_bytes()
    rec = lock_data(m)["data:ws"]
    assert rec["commit"] == ahub.commit_of("dataset", REPO) and rec["lfs"] is True
    ahub.clear_log()
    assert pull(m, ahub).returncode == 0 and ahub.log == []


def test_local_folder_copies_verify_by_hash_and_a_second_run_copies_nothing(ahub, tmp_path):
    src = tmp_path / "src"
    for name, data in FILES.items():
        (src / name).parent.mkdir(parents=True, exist_ok=True)
        (src / name).write_bytes(data)
    m = manifest_at(tmp_path / "proj", f"""
  - local: ../src/websight
    dest: copy
    expect: {{files: [prompts.jsonl], count: {{"images/*.png": {IMAGES}}}}}
""")
    r = pull(m, ahub, "--json")
    assert r.returncode == 0, r.stderr
    dest = tmp_path / "proj" / "data" / "copy"
    want = {k.removeprefix("websight/"): v for k, v in FILES.items()}
    assert tree(dest) == want
    rec = lock_data(m)["data:copy"]
    assert {f["path"]: f["sha256"] for f in rec["files"]} == {k: sha(v) for k, v in want.items()}
    assert rec["source"] == str(src / "websight")
    inodes = {p: p.stat().st_ino for p in dest.rglob("*")}
    dest_ino = dest.stat().st_ino
    before = (tmp_path / "proj" / "hpcstage.lock").read_bytes()
    r = pull(m, ahub, "--json")
    assert r.returncode == 0, r.stderr
    assert dest.stat().st_ino == dest_ino and {p: p.stat().st_ino for p in dest.rglob("*")} == inodes
    assert json.loads(r.stdout)["downloaded_bytes"] == 0
    assert (tmp_path / "proj" / "hpcstage.lock").read_bytes() == before
    # a changed source file is picked up; unchanged ones are linked from the current copy. The source is
    # replaced (a new inode), not edited in place: on one filesystem the staged file is a hardlink of the
    # old one, so an in-place edit would show in it whatever hpcstage did.
    new = src / "websight" / "prompts.jsonl.new"
    new.write_bytes(FILES["websight/prompts.jsonl"] + b'{"prompt": "new"}\n')
    os.replace(new, src / "websight" / "prompts.jsonl")
    r = pull(m, ahub)
    assert r.returncode == 0, r.stderr
    assert (dest / "prompts.jsonl").read_bytes().endswith(b'"new"}\n')
    assert lock_data(m)["data:copy"]["fingerprint"] != rec["fingerprint"]


def test_local_archive_file_extracts_and_is_never_deleted(ahub, tmp_path):
    src = tmp_path / "websight.tar.gz"
    write_tgz(src, FILES)
    m = manifest_at(tmp_path, f"  - local: {src}\n    extract: true\n    dest: ws\n    expect: {EXPECT}\n")
    r = pull(m, ahub)
    assert r.returncode == 0, r.stderr
    assert tree(tmp_path / "data" / "ws") == FILES and src.exists()


def test_kill_9_during_a_1_gib_url_download_resumes_without_refetching(gib_hub, tmp_path):
    info = gib_hub.files_of("model", GIB_MODEL)["model.safetensors"]
    url = f"{gib_hub.url}/{GIB_MODEL}/resolve/main/model.safetensors"
    m = manifest_at(tmp_path, f"  - url: {url}\n    allow_http: true\n    dest: weights\n")
    downloads = tmp_path / "data" / ".hpcstage" / "downloads"
    gib_hub.add_fault(FaultRule(path=r"/lfs/", server="cdn", rate=60_000_000))
    env = client_env(gib_hub, tmp_path / "cache")
    proc = subprocess.Popen([sys.executable, "-m", "hpcstage", "pull", "-f", str(m), "-q"], env=env)
    total = -(-info.size // PIECE)
    deadline = time.monotonic() + 120
    while not any(pieces_done(r) >= total // 2 for r in downloads.glob("*.ranges")):
        assert time.monotonic() < deadline and proc.poll() is None, "no progress"
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    gib_hub.clear_faults()
    since = time.time()
    r = subprocess.run([sys.executable, "-m", "hpcstage", "pull", "-f", str(m), "-q"], env=env,
                       capture_output=True, text=True, timeout=180)
    assert r.returncode == 0, r.stderr
    second = sum(rec.bytes_sent for rec in gib_hub.log if rec.server == "cdn" and rec.method == "GET" and rec.time >= since)
    assert 0 < second <= 0.6 * info.size, second
    assert lock_data(m)["data:weights"]["sha256"] == info.sha256
    h = hashlib.sha256()
    with open(tmp_path / "data" / "weights" / "model.safetensors", "rb") as f:
        while chunk := f.read(8 << 20):
            h.update(chunk)
    assert h.hexdigest() == info.sha256
    assert not [p for p in downloads.iterdir() if "partial" in p.name]


def test_not_enough_space_for_archive_plus_unpacked_is_refused_before_any_content(ahub, tmp_path, monkeypatch):
    """The space check: archive size plus an unpacking estimate against the free space, before any byte."""
    import shutil as _shutil
    from collections import namedtuple

    from hpcstage.datadir import Stager
    from hpcstage.errors import TransferError
    from hpcstage.manifest import load_manifest
    from hpcstage.options import Options

    m = manifest_at(tmp_path, f"""
  - url: {resolve_url(ahub, "websight.tar.gz")}
    allow_http: true
    extract: true
    dest: ws
""")
    manifest = load_manifest(m)
    size = (archive_dir(ahub) / "websight.tar.gz").stat().st_size
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(_shutil, "disk_usage", lambda p: usage(1 << 40, 0, 16 << 20))  # under the 16 MiB margin
    with pytest.raises(TransferError, match="not enough space .* free; free space or set `data_dir:`"):
        Stager(tmp_path / "data", Options(quiet=True)).stage(manifest.data_entries[0], None)
    assert [rec.method for rec in ahub.log] == ["HEAD", "HEAD"]  # hub + CDN: the probe only, no content
    assert size and not (tmp_path / "data" / "ws").exists()


def test_job_environment_names_the_data_dir_of_data_entries(tmp_path):
    from hpcstage.manifest import load_manifest
    from hpcstage.offline import env

    (tmp_path / "src").mkdir()
    (tmp_path / "m.yaml").write_text("cache_dir: hub\ndata_dir: data\ndatasets:\n  - local: src\n    dest: copy\n")
    got = env(load_manifest(tmp_path / "m.yaml"))
    assert got["HPCSTAGE_DATA_DIR"] == str((tmp_path / "data").resolve())
    (tmp_path / "n.yaml").write_text("models:\n  - repo: org/m\n")
    assert "HPCSTAGE_DATA_DIR" not in env(load_manifest(tmp_path / "n.yaml"))


def test_verify_names_bad_data_files_and_repair_restages_only_that_entry(ahub, tmp_path):
    m = manifest_at(tmp_path, f"""
  - url: {resolve_url(ahub, "websight.tar.gz")}
    allow_http: true
    extract: true
    dest: websight-tgz
  - url: {resolve_url(ahub, "websight.zip")}
    allow_http: true
    extract: true
    dest: websight-zip
""")
    assert pull(m, ahub).returncode == 0
    data = tmp_path / "data" / "websight-tgz" / "websight"
    flipped = bytearray((data / "images" / "1.png").read_bytes())
    flipped[100] ^= 0xFF
    (data / "images" / "1.png").write_bytes(bytes(flipped))
    (data / "prompts.jsonl").unlink()
    env = client_env(ahub, tmp_path / "cache")
    verify = [sys.executable, "-m", "hpcstage", "verify", "-f", str(m)]
    r = subprocess.run(verify, env=env, capture_output=True, text=True)
    assert r.returncode == 1, r.stdout + r.stderr
    named = {line.split(": ", 1)[0] + ":" + line.split("websight-tgz", 1)[1].split(":")[0].strip()
             for line in (r.stdout + r.stderr).splitlines() if "websight-tgz" in line and line.startswith(("corrupt", "missing"))}
    assert named == {"corrupt:websight/images/1.png", "missing:websight/prompts.jsonl"}, r.stdout
    ahub.clear_log()
    r = subprocess.run([*verify, "--repair"], env=env, capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr
    fetched = {rec.path.rsplit("/", 1)[-1] for rec in ahub.log if rec.server == "cdn" and rec.method == "GET"}
    repo = archive_dir(ahub)
    assert fetched == {sha((repo / "websight.tar.gz").read_bytes())}  # the bad entry's archive, not the zip
    assert tree(tmp_path / "data" / "websight-tgz") == FILES
    assert subprocess.run(verify, env=env, capture_output=True, text=True).returncode == 0


def test_status_lists_data_entries(ahub, tmp_path):
    m = manifest_at(tmp_path, f"""
  - url: {resolve_url(ahub, "websight.zip")}
    allow_http: true
    extract: true
    dest: websight-zip
""")
    env = client_env(ahub, tmp_path / "cache")
    status = [sys.executable, "-m", "hpcstage", "status", "-f", str(m), "--json"]
    r = subprocess.run(status, env=env, capture_output=True, text=True)
    assert r.returncode == 1 and json.loads(r.stdout)[0]["state"] == "missing", r.stdout + r.stderr
    assert pull(m, ahub).returncode == 0
    r = subprocess.run(status, env=env, capture_output=True, text=True)
    (row,) = json.loads(r.stdout)
    assert r.returncode == 0 and row["state"] == "staged" and row["files"] == row["staged_files"] == len(FILES)
