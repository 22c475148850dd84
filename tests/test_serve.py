"""The Hub emulator against the real clients (huggingface_hub, the `hf` CLI, datasets) and raw HTTP."""

from __future__ import annotations

import hashlib
import http.client
import json
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

import hpcstage.testing.hub as serve
from hpcstage.testing.samples import DATASET_ID, DATASET_SPLITS, MODEL_ID, MODEL_TAG, make_samples
from hpcstage.testing.hub import FaultRule, HubServer
from helpers import client_env, hpcstage, run_python, wait_for

TOKEN = "hf_testtoken_never_leaves_the_hub"


def client(code: str, env: dict) -> object:
    """Run client code in a subprocess; it prints one JSON value on its last stdout line."""
    result = run_python(code, env)
    assert result.returncode == 0, result.stderr[-4000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


def request(server_url: str, method: str, path: str, headers: dict | None = None, body: bytes | None = None,
            timeout: float = 10) -> tuple[int, dict, bytes]:
    """One raw HTTP request (the path is sent exactly as given)."""
    host, port = server_url.removeprefix("http://").split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=timeout)
    try:
        conn.request(method, path, body=body, headers=headers or {})
        response = conn.getresponse()
        return response.status, dict(response.getheaders()), response.read()
    finally:
        conn.close()


def assert_snapshot_matches(snapshot: Path, hub: HubServer, repo_type: str, repo_id: str, revision: str) -> None:
    files = hub.files_of(repo_type, repo_id, revision)
    on_disk = {p.relative_to(snapshot).as_posix() for p in snapshot.rglob("*") if p.is_file()}
    assert on_disk == set(files)
    for path, info in files.items():
        assert (snapshot / path).read_bytes() == info.local.read_bytes(), path
    assert snapshot.name == hub.commit_of(repo_type, repo_id, revision)


# -- real clients -----------------------------------------------------------------------------------

def test_snapshot_download_both_revisions_lfs_from_cdn_without_token(hub, tmp_path):
    env = client_env(hub, tmp_path, HF_TOKEN=TOKEN)
    paths = client(f"""
import json
from huggingface_hub import snapshot_download
print(json.dumps([snapshot_download({MODEL_ID!r}), snapshot_download({MODEL_ID!r}, revision={MODEL_TAG!r})]))
""", env)
    assert_snapshot_matches(Path(paths[0]), hub, "model", MODEL_ID, "main")
    assert_snapshot_matches(Path(paths[1]), hub, "model", MODEL_ID, MODEL_TAG)
    assert hub.commit_of("model", MODEL_ID, "main") != hub.commit_of("model", MODEL_ID, MODEL_TAG)

    lfs = {f.sha256 for rev in ("main", MODEL_TAG) for f in hub.files_of("model", MODEL_ID, rev).values() if f.sha256}
    assert len(lfs) == 2
    cdn = [r for r in hub.log if r.server == "cdn"]
    assert {r.path.removeprefix("/lfs/") for r in cdn if r.status == 200} == lfs
    assert not any(r.has_auth for r in cdn)
    assert all(r.has_auth for r in hub.log if r.server == "hub")
    refs = tmp_path / "hub" / "models--demo-org--tiny-model" / "refs"
    assert (refs / "main").read_text() == hub.commit_of("model", MODEL_ID)


def test_hf_cli_download(hub, tmp_path):
    hf = Path(sys.executable).with_name("hf")
    if not hf.exists():
        pytest.skip("no `hf` CLI beside the interpreter")
    result = subprocess.run(
        [str(hf), "download", MODEL_ID, "--revision", MODEL_TAG, "--cache-dir", str(tmp_path / "cli"), "--quiet"],
        env=client_env(hub, tmp_path), capture_output=True, text=True, timeout=120,
    )
    assert result.returncode == 0, result.stderr
    assert_snapshot_matches(Path(result.stdout.strip().splitlines()[-1]), hub, "model", MODEL_ID, MODEL_TAG)


def test_hf_hub_download_by_name_and_by_commit(hub, tmp_path):
    tag_commit = hub.commit_of("model", MODEL_ID, MODEL_TAG)
    paths = client(f"""
import json
from huggingface_hub import hf_hub_download
print(json.dumps([hf_hub_download({MODEL_ID!r}, "config.json"),
                  hf_hub_download({MODEL_ID!r}, "config.json", revision={tag_commit!r})]))
""", client_env(hub, tmp_path))
    main_file = hub.files_of("model", MODEL_ID)["config.json"]
    tag_file = hub.files_of("model", MODEL_ID, MODEL_TAG)["config.json"]
    assert Path(paths[0]).read_bytes() == main_file.local.read_bytes()
    assert Path(paths[1]).read_bytes() == tag_file.local.read_bytes() != main_file.local.read_bytes()
    assert Path(paths[0]).resolve().name == main_file.oid  # the cache blob is named by the ETag
    assert f"/resolve/{tag_commit}/config.json" in {r.path.split(MODEL_ID)[-1] for r in hub.log}


def test_tree_pagination_with_real_client(sample_root, tmp_path):
    with HubServer(sample_root, page_size=2) as hub:
        entries = client(f"""
import json
from huggingface_hub import HfApi
tree = HfApi().list_repo_tree({DATASET_ID!r}, repo_type="dataset", recursive=True)
print(json.dumps([[type(e).__name__, e.path] for e in tree]))
""", client_env(hub, tmp_path))
        files = hub.files_of("dataset", DATASET_ID)
        assert sorted(p for kind, p in entries if kind == "RepoFile") == sorted(files)
        assert [p for kind, p in entries if kind == "RepoFolder"] == ["data"]
        pages = [r for r in hub.log if "/tree/" in r.path]
        assert len(pages) == 3 and all(r.status == 200 for r in pages)
        assert ["cursor=" in r.query for r in pages] == [False, True, True]


def test_load_dataset_online(hub, tmp_path):
    rows = client(f"""
import json
from datasets import load_dataset
ds = load_dataset({DATASET_ID!r}, split="train")
print(json.dumps([len(ds), ds.column_names]))
""", client_env(hub, tmp_path))
    assert rows == [DATASET_SPLITS["train"], ["id", "text", "label"]]
    assert any(r.server == "cdn" and r.status == 200 for r in hub.log)  # parquet files are LFS


def test_client_errors(hub, tmp_path):
    errors = client(f"""
import json
from huggingface_hub import hf_hub_download, snapshot_download
from huggingface_hub.errors import EntryNotFoundError, RepositoryNotFoundError, RevisionNotFoundError
calls = {{
    "RepositoryNotFoundError": lambda: snapshot_download("demo-org/nope"),
    "RevisionNotFoundError": lambda: snapshot_download({MODEL_ID!r}, revision="nope"),
    "EntryNotFoundError": lambda: hf_hub_download({MODEL_ID!r}, "nope.json"),
}}
caught = {{}}
for expected, call in calls.items():
    try:
        call()
        caught[expected] = "no error"
    except Exception as error:
        caught[expected] = [c.__name__ for c in type(error).__mro__]
print(json.dumps(caught))
""", client_env(hub, tmp_path))
    for expected, mro in errors.items():
        assert expected in mro, (expected, mro)
    no_exist = tmp_path / "hub" / "models--demo-org--tiny-model" / ".no_exist" / hub.commit_of("model", MODEL_ID)
    assert (no_exist / "nope.json").exists()  # the 404 carried X-Repo-Commit


# -- protocol details -------------------------------------------------------------------------------

def test_tree_folders_paths_info_and_info(hub):
    commit = hub.commit_of("dataset", DATASET_ID)
    status, _, body = request(hub.url, "GET", f"/api/datasets/{DATASET_ID}/tree/{commit}/data?recursive=false")
    entries = json.loads(body)
    assert status == 200 and all(e["path"].startswith("data/") and e["lfs"]["size"] == e["size"] for e in entries)
    for e in entries:  # as on the Hub, an LFS file's git oid is the one of its pointer file
        pointer = f"version https://git-lfs.github.com/spec/v1\noid sha256:{e['lfs']['oid']}\nsize {e['size']}\n"
        assert e["lfs"]["pointerSize"] == len(pointer)
        assert e["oid"] == hashlib.sha1(f"blob {len(pointer)}\0{pointer}".encode()).hexdigest()
    assert "xetHash" not in body.decode()
    assert request(hub.url, "GET", f"/api/datasets/{DATASET_ID}/tree/main/nope")[1]["X-Error-Code"] == "EntryNotFound"
    status, _, body = request(hub.url, "GET", f"/api/datasets/{DATASET_ID}/tree/main")
    assert {(e["type"], e["path"]) for e in json.loads(body)} == {("file", "README.md"), ("directory", "data")}

    form = b"paths=data&paths=README.md&paths=missing.txt"
    status, _, body = request(hub.url, "POST", f"/api/datasets/{DATASET_ID}/paths-info/main", body=form,
                              headers={"Content-Type": "application/x-www-form-urlencoded"})
    assert status == 200 and [(e["type"], e["path"]) for e in json.loads(body)] == [
        ("directory", "data"), ("file", "README.md")]
    status, _, body = request(hub.url, "POST", f"/api/datasets/{DATASET_ID}/paths-info/{commit}",
                              body=json.dumps({"paths": ["README.md"]}).encode(),
                              headers={"Content-Type": "application/json"})
    assert [e["path"] for e in json.loads(body)] == ["README.md"]

    status, _, body = request(hub.url, "GET", f"/api/models/{MODEL_ID}/revision/{MODEL_TAG}")
    info = json.loads(body)
    assert info["sha"] == hub.commit_of("model", MODEL_ID, MODEL_TAG) and info["private"] is False
    assert sorted(s["rfilename"] for s in info["siblings"]) == sorted(hub.files_of("model", MODEL_ID, MODEL_TAG))
    assert request(hub.url, "GET", "/api/models/demo-org/nope")[0] == 401
    assert request(hub.url, "GET", "/api/whatever")[0] == 404


def test_resolve_headers_and_ranges(hub):
    config = hub.files_of("model", MODEL_ID)["config.json"]
    content = config.local.read_bytes()
    assert config.oid == hashlib.sha1(b"blob %d\0" % len(content) + content).hexdigest() and config.sha256 is None
    status, headers, _ = request(hub.url, "HEAD", f"/{MODEL_ID}/resolve/main/config.json")
    commit = hub.commit_of("model", MODEL_ID)
    # as the real Hub: a regular file is a 307 with a relative Location into the resolve cache
    assert status == 307 and headers["X-Repo-Commit"] == commit and headers["ETag"] == f'"{config.oid}"'
    base = headers["Location"]
    assert base.startswith(f"/api/resolve-cache/models/{MODEL_ID}/{commit}/config.json?")
    status, headers, body = request(hub.url, "HEAD", base)
    assert status == 200 and body == b""
    assert headers["ETag"] == f'"{config.oid}"' and headers["Content-Length"] == str(len(content))
    assert headers["X-Repo-Commit"] == hub.commit_of("model", MODEL_ID) and headers["Accept-Ranges"] == "bytes"
    assert "Content-Encoding" not in headers
    for spec, expected in (("bytes=0-9", content[:10]), ("bytes=100-", content[100:]), ("bytes=-7", content[-7:]),
                           (f"bytes=5-{10**9}", content[5:])):
        status, headers, body = request(hub.url, "GET", base, {"Range": spec})
        assert (status, body) == (206, expected), spec
        assert headers["Content-Range"].endswith(f"/{len(content)}")
    status, headers, _ = request(hub.url, "GET", base, {"Range": f"bytes={len(content)}-"})
    assert status == 416 and headers["Content-Range"] == f"bytes */{len(content)}"

    weights = hub.files_of("model", MODEL_ID)["model.safetensors"]
    assert weights.sha256 == hashlib.sha256(weights.local.read_bytes()).hexdigest()
    status, headers, _ = request(hub.url, "GET", f"/{MODEL_ID}/resolve/main/model.safetensors")
    assert status == 302 and headers["X-Linked-Size"] == str(weights.size)
    assert headers["X-Linked-Etag"] == headers["ETag"] == f'"{weights.sha256}"' and "X-Repo-Commit" in headers
    location = headers["Location"]
    assert location.startswith(hub.cdn_url + "/")
    status, headers, body = request(hub.cdn_url, "GET", location.removeprefix(hub.cdn_url), {"Range": "bytes=8-15"})
    assert (status, body) == (206, weights.local.read_bytes()[8:16]) and headers["ETag"] == f'"{weights.sha256}"'

    missing = request(hub.url, "HEAD", f"/datasets/{DATASET_ID}/resolve/main/nope.py")
    assert missing[0] == 404 and missing[1]["X-Error-Code"] == "EntryNotFound" and "X-Repo-Commit" in missing[1]


@pytest.mark.parametrize("path", [
    f"/{MODEL_ID}/resolve/main/../../../etc/passwd",
    f"/{MODEL_ID}/resolve/main/%2e%2e/%2e%2e/tiny-model@v1.0/config.json",
    f"/{MODEL_ID}/resolve/main/config.json%00",
    f"/{MODEL_ID}/resolve/main//etc/passwd",
    f"/{MODEL_ID}/resolve/..%2F..%2F/config.json",
    f"/api/models/{MODEL_ID}/tree/main/%2e%2e",
    "/api/models/../models/demo-org/tiny-model",
    "/demo-org/%2e%2e/resolve/main/config.json",
])
def test_paths_never_escape_root(hub, path):
    status, _, body = request(hub.url, "GET", path)
    assert status in (400, 401, 404) and b"root:" not in body


def test_keep_alive_and_request_log(sample_root, tmp_path):
    log_file = tmp_path / "requests.jsonl"
    with HubServer(sample_root, log_file=log_file, resolve_cache=False) as hub:
        host, port = hub.url.removeprefix("http://").split(":")
        conn = http.client.HTTPConnection(host, int(port), timeout=5)
        for _ in range(3):
            conn.request("GET", f"/{MODEL_ID}/resolve/main/README.md", headers={"Authorization": "Bearer x"})
            assert conn.getresponse().read()
        conn.close()
        records = hub.log
    assert len(records) == 3 and all(r.has_auth and r.status == 200 and r.bytes_sent > 0 for r in records)
    lines = [json.loads(line) for line in log_file.read_text().splitlines()]
    assert [line["path"] for line in lines] == [r.path for r in records]


def test_each_file_hashed_once_under_concurrency(sample_root, monkeypatch):
    calls: list[Path] = []
    real_digest = serve._digest

    def slow_digest(path, lfs):
        calls.append(path)
        time.sleep(0.05)
        return real_digest(path, lfs)

    monkeypatch.setattr(serve, "_digest", slow_digest)
    with HubServer(sample_root, resolve_cache=False) as hub:
        threads = [threading.Thread(target=request, args=(hub.url, "HEAD", f"/{MODEL_ID}/resolve/main/config.json"))
                   for _ in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert all(r.status == 200 for r in hub.log) and len(hub.log) == 8
    assert len(calls) == len(set(calls)) == len(hub.files_of("model", MODEL_ID))


def test_commits_are_stable_and_follow_content(sample_root, tmp_path):
    with HubServer(sample_root) as first, HubServer(sample_root) as second:
        assert first.commit_of("model", MODEL_ID) == second.commit_of("model", MODEL_ID)
    root = tmp_path / "copy"
    shutil.copytree(sample_root, root)
    assert make_samples(root)["model"] == MODEL_ID  # idempotent: nothing rewritten
    with HubServer(root) as hub:
        assert hub.commit_of("model", MODEL_ID) == first.commit_of("model", MODEL_ID)
        before = hub.commit_of("dataset", DATASET_ID)
        (root / "datasets" / DATASET_ID / "data" / "extra.parquet").write_bytes(b"PAR1")
        assert hub.commit_of("dataset", DATASET_ID) == before  # listings are cached until refresh()
        hub.refresh()
        assert hub.commit_of("dataset", DATASET_ID) != before
        assert hub.files_of("dataset", DATASET_ID)["data/extra.parquet"].sha256 is not None
        with pytest.raises(LookupError):
            hub.commit_of("model", MODEL_ID, "nope")


def test_serve_forever_prints_url_and_stops_on_sigterm(sample_root):
    proc = subprocess.Popen(
        [sys.executable, "-c", f"from hpcstage.testing.hub import serve_forever; serve_forever({str(sample_root)!r})"],
        stdout=subprocess.PIPE, text=True,
    )
    try:
        url = proc.stdout.readline().split()[0]
        assert request(url, "GET", f"/api/models/{MODEL_ID}")[0] == 200
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=10) == 0
    finally:
        proc.kill()


# -- fault injection ----------------------------------------------------------------------------------

def test_status_fault_is_retried_by_client(hub, tmp_path):
    hub.add_fault(FaultRule(r"/resolve/.*/config\.json$", method="HEAD", status=503, times=1))
    hub.add_fault(FaultRule(r"^/lfs/", server="cdn", status=429, retry_after=0, times=1))
    paths = client(f"""
import json
from huggingface_hub import hf_hub_download
print(json.dumps([hf_hub_download({MODEL_ID!r}, "config.json"), hf_hub_download({MODEL_ID!r}, "model.safetensors")]))
""", client_env(hub, tmp_path))
    files = hub.files_of("model", MODEL_ID)
    assert Path(paths[0]).read_bytes() == files["config.json"].local.read_bytes()
    assert Path(paths[1]).read_bytes() == files["model.safetensors"].local.read_bytes()
    heads = [r.status for r in hub.log if r.method == "HEAD" and r.path.endswith("/config.json")]
    assert heads == [503, 307, 200]  # retried, then the 307 into the resolve cache and its answer
    assert [r.status for r in hub.log if r.server == "cdn"] == [429, 200]


def test_drop_after_short_read_and_client_retries(hub, tmp_path):
    hub.resolve_cache = False  # README.md answered directly, not through a 307
    hub.add_fault(FaultRule(r"README\.md$", method="GET", drop_after=50, times=1))
    with pytest.raises(http.client.IncompleteRead) as short:
        request(hub.url, "GET", f"/{MODEL_ID}/resolve/main/README.md")
    assert len(short.value.partial) == 50 and hub.log[-1].bytes_sent == 50

    hub.add_fault(FaultRule(r"^/lfs/", server="cdn", drop_after=100_000, times=1))
    path = client(f"""
import json
from huggingface_hub import hf_hub_download
print(json.dumps(hf_hub_download({MODEL_ID!r}, "model.safetensors")))
""", client_env(hub, tmp_path))
    assert Path(path).read_bytes() == hub.files_of("model", MODEL_ID)["model.safetensors"].local.read_bytes()
    # huggingface_hub keeps received data in 10 MiB chunks: below that, a retry starts again from byte 0
    cdn = [r for r in hub.log if r.server == "cdn"]
    assert [(r.range, r.bytes_sent) for r in cdn] == [(None, 100_000), (None, 296_896)]


def test_reset_closes_before_any_header(hub):
    hub.resolve_cache = False
    hub.add_fault(FaultRule(r"config\.json$", reset=True, times=1))
    with pytest.raises(ConnectionResetError):
        request(hub.url, "GET", f"/{MODEL_ID}/resolve/main/config.json")
    assert request(hub.url, "GET", f"/{MODEL_ID}/resolve/main/config.json")[0] == 200  # times=1
    assert [r.status for r in hub.log] == [None, 200]


def test_stall_times_out_client_and_stop_stays_prompt(sample_root):
    hub = HubServer(sample_root).start()
    hub.add_fault(FaultRule(r"/tree/", stall=True))
    with pytest.raises(socket.timeout):
        request(hub.url, "GET", f"/api/models/{MODEL_ID}/tree/main", timeout=0.5)
    errors: list[Exception] = []

    def stalled_client():
        try:
            request(hub.url, "GET", f"/api/models/{MODEL_ID}/tree/main", timeout=30)
        except OSError as error:
            errors.append(error)

    stalled = threading.Thread(target=stalled_client)
    stalled.start()
    wait_for(lambda: hub.received == 2, 30, "the second request to reach the server")
    started = time.monotonic()
    hub.stop()
    assert time.monotonic() - started < 10  # stop() closes stalled connections instead of waiting them out
    stalled.join(5)
    assert not stalled.is_alive() and len(errors) == 1  # the connection was closed, not answered
    assert [r.status for r in hub.log] == [None, None]


def test_delay_rate_and_corrupt(hub):
    weights = hub.files_of("model", MODEL_ID)["model.safetensors"]
    content = weights.local.read_bytes()
    cdn_path = hub.cdn_path(weights.sha256)

    hub.add_fault(FaultRule(r"^/lfs/", delay=0.5, times=1))
    started = time.monotonic()
    assert request(hub.cdn_url, "GET", cdn_path)[2] == content
    assert time.monotonic() - started >= 0.5

    hub.add_fault(FaultRule(r"^/lfs/", rate=500_000, times=1))
    started = time.monotonic()
    assert request(hub.cdn_url, "GET", cdn_path)[2] == content
    assert time.monotonic() - started >= 0.5  # 296,896 bytes at 500 kB/s

    hub.add_fault(FaultRule(r"^/lfs/", server="hub", corrupt=True))  # wrong listener: no effect
    hub.add_fault(FaultRule(r"^/lfs/", server="cdn", corrupt=True, times=1))
    status, headers, body = request(hub.cdn_url, "GET", cdn_path)
    assert status == 200 and len(body) == len(content) == int(headers["Content-Length"])
    differing = [i for i, (a, b) in enumerate(zip(body, content)) if a != b]
    assert differing == list(range(0, len(content), serve.CORRUPT_STRIDE))
    hub.clear_faults()
    assert request(hub.cdn_url, "GET", cdn_path)[2] == content


def test_a_repo_changed_while_serving_is_rescanned_as_a_new_commit(tmp_path):
    from helpers import wait_for

    repo = tmp_path / "models" / "demo-org" / "live"
    repo.mkdir(parents=True)
    (repo / "config.json").write_text('{"v": 1}')
    with HubServer(tmp_path, resolve_cache=False) as hub:
        before = hub.commit_of("model", "demo-org/live")
        (repo / "config.json").write_text('{"v": 22}')  # same folder, same name: only the content changed
        (repo / "added.txt").write_text("new")
        wait_for(lambda: hub.commit_of("model", "demo-org/live") != before, 10, "the rescan")
        files = hub.files_of("model", "demo-org/live")
        assert set(files) == {"config.json", "added.txt"}
        status, _, body = request(hub.url, "GET", "/demo-org/live/resolve/main/config.json")
        assert (status, body) == (200, b'{"v": 22}')


def test_lfs_is_decided_by_gitattributes_when_the_repo_has_lfs_rules(tmp_path):
    repo = tmp_path / "models" / "demo-org" / "attrs"
    repo.mkdir(parents=True)
    (repo / ".gitattributes").write_text("*.json filter=lfs diff=lfs merge=lfs -text\n"
                                         "weights/*.pt filter=lfs diff=lfs merge=lfs -text\n"
                                         "small.json -filter\n")
    (repo / "config.json").write_text("{}")
    (repo / "small.json").write_text("{}")
    (repo / "model.safetensors").write_bytes(b"\0" * 100)  # an LFS suffix, but no rule names it
    (repo / "weights").mkdir()
    (repo / "weights" / "a.pt").write_bytes(b"\1" * 100)
    (repo / "big.dat").write_bytes(b"\2" * (11 << 20))  # past LFS_MIN_SIZE, but no rule names it
    plain = tmp_path / "models" / "demo-org" / "plain"
    plain.mkdir(parents=True)
    (plain / "model.safetensors").write_bytes(b"\0" * 100)
    with HubServer(tmp_path) as hub:
        lfs = {p for p, f in hub.files_of("model", "demo-org/attrs").items() if f.sha256}
        assert lfs == {"config.json", "weights/a.pt"}
        assert hub.files_of("model", "demo-org/plain")["model.safetensors"].sha256  # no rules: by suffix


UPLOAD = """\
import json, sys
from huggingface_hub import HfApi
api = HfApi()
url = api.create_repo("gen-org/out", repo_type="dataset", private=True, exist_ok=True)
again = api.create_repo("gen-org/out", repo_type="dataset", private=True, exist_ok=True)  # a 409, accepted
first = api.upload_folder(repo_id="gen-org/out", repo_type="dataset", folder_path=sys.argv[1])
second = api.upload_folder(repo_id="gen-org/out", repo_type="dataset", folder_path=sys.argv[1])  # unchanged
print(json.dumps([str(url), str(again), first.oid, second.oid]))
"""


def test_upload_folder_creates_the_repo_and_commits_what_a_later_pull_downloads(tmp_path):
    root, out = tmp_path / "root", tmp_path / "out"
    (root / "datasets").mkdir(parents=True)
    (out / "part").mkdir(parents=True)
    files = {"rows.jsonl": b'{"q": "1+1", "a": "2"}\n', "part/meta.json": b'{"n": 1}', "blob.bin": bytes(range(256))}
    for name, data in files.items():
        (out / name).write_bytes(data)
    with HubServer(root) as hub:
        hub.tokens = {TOKEN}
        env = client_env(hub, tmp_path / "c", HF_TOKEN=TOKEN)
        del env["HF_HUB_DISABLE_XET"]  # the pipelined upload a job runs by default (hf_xet installed)
        url, again, first, second = client(UPLOAD.replace("sys.argv[1]", repr(str(out))), env)
        assert url == again == f"{hub.url}/datasets/gen-org/out"
        assert first == second == hub.commit_of("dataset", "gen-org/out")
        posts = [(r.method, r.path, r.status) for r in hub.log if r.method == "POST"]
        assert posts == [("POST", "/api/repos/create", 200), ("POST", "/api/repos/create", 409),
                         ("POST", "/api/datasets/gen-org/out/preupload/main", 200),
                         ("POST", "/api/datasets/gen-org/out/commit/main", 200),
                         ("POST", "/api/datasets/gen-org/out/preupload/main", 200)]  # nothing changed: no commit
        assert all(r.has_auth for r in hub.log)
        r = hpcstage("pull", "--repo-type", "dataset", "gen-org/out", "--cache-dir", tmp_path / "cache", env=env)
        assert r.returncode == 0, r.stderr
        snapshot = tmp_path / "cache" / "datasets--gen-org--out" / "snapshots" / first
        assert {p.relative_to(snapshot).as_posix(): p.read_bytes() for p in snapshot.rglob("*") if p.is_file()} == files
        # anonymous and unknown tokens write nothing
        status, _, body = request(hub.url, "POST", "/api/datasets/gen-org/out/commit/main",
                                  {"Content-Type": "application/x-ndjson"},
                                  b'{"key": "header", "value": {"summary": "x"}}\n')
        assert status == 401
        status, _, _ = request(hub.url, "POST", "/api/repos/create", {"Authorization": "Bearer hf_other"},
                               b'{"name": "x", "organization": "gen-org", "type": "dataset"}')
        assert status == 401 and not (root / "datasets" / "gen-org" / "x").exists()
        assert hub.commit_of("dataset", "gen-org/out") == first
