"""What the real Hub does that a plain emulator did not (FACTS.md "The real Hub"): gated repos, stale tokens,
disabled and renamed repos, the resolver rate limit, signed LFS URLs that expire, revisions with '/', and
mirrors that ignore Range. Each test drives the real CLI against the emulator in that mode and asserts the
bytes on disk and the emulator's request log."""
from __future__ import annotations

import json
import random
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import BIG_MODEL
from helpers import client_env, run_python, sha256
from hpcstage.testing.hub import FaultRule, HubServer

MODEL = "demo-org/tiny-model"


def pull(server, cache: Path, *args: str, timeout: float = 300, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "hpcstage", "pull", *args, "--cache-dir", str(cache), "-q"],
                          env=client_env(server, cache, **env), capture_output=True, text=True, timeout=timeout)


def snapshot_of(cache: Path, repo_id: str, kind: str = "models") -> Path:
    return next((cache / f"{kind}--{repo_id.replace('/', '--')}" / "snapshots").iterdir())


def assert_byte_exact(server: HubServer, cache: Path, repo_id: str, revision: str = "main", kind: str = "model"):
    snapshot = snapshot_of(cache, repo_id, kind + "s")
    files = server.files_of(kind, repo_id, revision)
    assert files
    for path, info in files.items():
        assert sha256(snapshot / path) == sha256(info.local), path


def resolves(server: HubServer, repo_id: str) -> list:
    return [r for r in server.log if r.server == "hub" and "/resolve" in r.path and repo_id in r.path]


@pytest.fixture(scope="module")
def many_root(tmp_path_factory):
    """demo-org/many-files: 30 small files (half regular, half LFS by suffix) and one 9 MiB LFS file."""
    root = tmp_path_factory.mktemp("many")
    repo = root / "models" / "demo-org" / "many-files"
    repo.mkdir(parents=True)
    rng = random.Random(3)
    for i in range(15):
        (repo / f"part-{i:02d}.json").write_text(json.dumps({"i": i, "pad": "x" * rng.randrange(100, 3000)}))
        (repo / f"shard-{i:02d}.bin").write_bytes(rng.randbytes(rng.randrange(1000, 50_000)))
    (repo / "model.safetensors").write_bytes(rng.randbytes(9 << 20))
    return root


@pytest.fixture
def many_hub(many_root):
    with HubServer(many_root) as server:
        yield server


# -- gated repos, tokens, disabled and renamed repos ----------------------------------------------------


def _refusal_checks(server: HubServer, repo_id: str, r: subprocess.CompletedProcess, status: int) -> str:
    assert r.returncode == 1, r.stderr
    line = r.stderr.strip().splitlines()[-1]
    assert "run the same pull again" not in r.stderr and "Traceback" not in r.stderr, r.stderr
    log = resolves(server, repo_id)
    refusals = [rec for rec in log if rec.status == status]
    assert refusals, [(rec.path, rec.status) for rec in log]
    first = min(refusals, key=lambda rec: rec.time + rec.duration)
    answered = first.time + first.duration
    after = [rec for rec in log if rec.time > answered]
    assert len(after) <= 1, [(rec.path, rec.status) for rec in after]  # the repo stops at once, no retries
    print(f"resolve requests {len(log)}, after the first refusal {len(after)}")
    assert all(rec.status != 200 for rec in log)
    return line


def test_a_gated_repo_without_a_token_stops_at_once_and_says_where_to_ask(many_hub, tmp_path):
    many_hub.gate("demo-org/many-files", granted=("hf_granted",))
    r = pull(many_hub, tmp_path / "cache", "demo-org/many-files")
    line = _refusal_checks(many_hub, "demo-org/many-files", r, 401)
    assert f"demo-org/many-files is gated: log in (`hf auth login` or HF_TOKEN) and request access at " \
           f"{many_hub.url}/demo-org/many-files" in line, line
    # warned at plan time (the API's "gated"), before any download
    assert "is gated and no token is set" in r.stderr.splitlines()[0], r.stderr
    assert "files not fetched" in line


def test_a_refused_large_file_is_asked_for_once_however_many_streams_wait(many_hub, tmp_path):
    """Its range streams wait for the first request through the Hub; when that one is refused, none of them
    asks again (each would be one more refusal, and one more resolver request of the Hub's rate limit)."""
    many_hub.gate("demo-org/many-files", granted=("hf_granted",))
    r = pull(many_hub, tmp_path / "cache", "demo-org/many-files", "--include", "model.safetensors")
    assert r.returncode == 1 and "is gated" in r.stderr, r.stderr
    assert [(rec.path.rsplit("/", 1)[-1], rec.status) for rec in resolves(many_hub, "demo-org/many-files")] == [
        ("model.safetensors", 401)]


def test_a_token_without_access_to_a_gated_repo_is_told_to_request_it(many_hub, tmp_path):
    many_hub.gate("demo-org/many-files", granted=("hf_granted",))
    many_hub.tokens.add("hf_someone_else")
    r = pull(many_hub, tmp_path / "cache", "demo-org/many-files", HF_TOKEN="hf_someone_else")
    line = _refusal_checks(many_hub, "demo-org/many-files", r, 403)
    assert f"your token has no access to demo-org/many-files yet: request it at {many_hub.url}/demo-org/many-files" \
           in line, line
    assert "is gated and no token" not in r.stderr  # a token is set: no plan-time warning


def test_a_granted_token_pulls_a_gated_repo_byte_exact(hub, tmp_path):
    hub.gate(MODEL, granted=("hf_granted",))
    r = pull(hub, tmp_path / "cache", MODEL, HF_TOKEN="hf_granted")
    assert r.returncode == 0, r.stderr
    assert_byte_exact(hub, tmp_path / "cache", MODEL)
    assert any(rec.status == 302 for rec in resolves(hub, MODEL))  # the LFS file came through the CDN
    assert not any(rec.has_auth for rec in hub.log if rec.server == "cdn")  # the token never left the Hub


def test_other_repos_go_on_when_one_is_gated(hub, tmp_path):
    hub.gate(MODEL)
    manifest = tmp_path / "hpcstage.yaml"
    manifest.write_text(f"models:\n  - repo: {MODEL}\ndatasets:\n  - repo: demo-org/tiny-dataset\n")
    r = subprocess.run([sys.executable, "-m", "hpcstage", "pull", "-f", str(manifest), "--cache-dir",
                        str(tmp_path / "cache"), "-q"], env=client_env(hub, tmp_path / "cache"),
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 1 and f"{MODEL} is gated" in r.stderr and "run the same pull again" not in r.stderr
    assert_byte_exact(hub, tmp_path / "cache", "demo-org/tiny-dataset", kind="dataset")


def test_a_stale_token_is_named_as_the_problem_even_for_a_public_repo(hub, tmp_path):
    hub.tokens = {"hf_valid"}
    r = pull(hub, tmp_path / "cache", MODEL, HF_TOKEN="hf_revoked")
    assert r.returncode == 1, r.stderr
    line = r.stderr.strip().splitlines()[-1]
    assert "rejected your token" in line and "hf auth login" in line and "settings/tokens" in line, line
    assert "hf_revoked" not in r.stderr
    assert [rec.status for rec in hub.log] == [401]  # refused at plan time: nothing else was asked


def test_a_disabled_repo_fails_with_one_line(hub, tmp_path):
    hub.disabled.add(MODEL)
    r = pull(hub, tmp_path / "cache", MODEL)
    assert r.returncode == 1 and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert f"model repo {MODEL} is disabled on the Hub" in r.stderr and "run the same" not in r.stderr


def test_a_renamed_repo_is_followed_on_api_and_resolve(sample_root, tmp_path):
    root = tmp_path / "root"
    shutil.copytree(sample_root / "models" / "demo-org" / "tiny-model", root / "models" / "new-org" / "tiny-model")
    with HubServer(root) as server:
        server.renamed[MODEL] = "new-org/tiny-model"
        r = pull(server, tmp_path / "cache", MODEL)
        assert r.returncode == 0, r.stderr
        moved = [rec for rec in server.log if rec.status == 307 and MODEL in rec.path]
        assert any(rec.path.startswith("/api/") for rec in moved) and any("/resolve/" in rec.path for rec in moved)
        snapshot = snapshot_of(tmp_path / "cache", MODEL)
        for path, info in server.files_of("model", "new-org/tiny-model").items():
            assert sha256(snapshot / path) == sha256(info.local), path


# -- the resolve cache, signed URLs, revisions with '/' -------------------------------------------------


def test_regular_files_come_through_the_relative_307_into_the_resolve_cache(hub, tmp_path):
    r = pull(hub, tmp_path / "cache", MODEL)
    assert r.returncode == 0, r.stderr
    assert_byte_exact(hub, tmp_path / "cache", MODEL)
    regular = [p for p, f in hub.files_of("model", MODEL).items() if f.sha256 is None]
    cached = {rec.path.rsplit("/", 1)[-1] for rec in hub.log if rec.path.startswith("/api/resolve-cache/")
              and rec.status == 200}
    assert cached == set(regular)
    assert all(rec.status == 307 for rec in resolves(hub, MODEL) if rec.path.rsplit("/", 1)[-1] in regular
               and "/resolve/" in rec.path)


def test_an_expired_signed_url_goes_back_through_resolve(big_hub, tmp_path):
    big_hub.signed_ttl = 1
    big_hub.add_fault(FaultRule(path=r"/lfs/", server="cdn", rate=10_000_000))  # 4 connections: ~2.5 s
    r = pull(big_hub, tmp_path / "cache", BIG_MODEL)
    assert r.returncode == 0, r.stderr
    assert_byte_exact(big_hub, tmp_path / "cache", BIG_MODEL)
    cdn = [rec for rec in big_hub.log if rec.server == "cdn"]
    assert any(rec.status == 403 for rec in cdn)  # the fault fired: a signed URL expired mid-file
    heavy = [rec for rec in resolves(big_hub, BIG_MODEL) if rec.path.endswith("model.safetensors")]
    assert len(heavy) >= 2  # went back through resolve for a fresh URL


def test_a_revision_with_a_slash_is_pulled_and_loads_offline(sample_root, tmp_path):
    root = tmp_path / "root"
    shutil.copytree(sample_root / "models" / "demo-org" / "tiny-model@v1.0",
                    root / "models" / "demo-org" / "tiny-model@refs%2Fpr%2F1")
    shutil.copytree(sample_root / "models" / "demo-org" / "tiny-model", root / "models" / "demo-org" / "tiny-model")
    cache = tmp_path / "cache"
    with HubServer(root) as server:
        r = pull(server, cache, MODEL, "--revision", "refs/pr/1")
        assert r.returncode == 0, r.stderr
        commit = server.commit_of("model", MODEL, "refs/pr/1")
        assert any("refs%2Fpr%2F1" in rec.path for rec in server.log if rec.path.startswith("/api/"))
        env = client_env(server, cache, HF_HUB_OFFLINE="1", HF_HUB_CACHE=str(cache))
    repo = cache / "models--demo-org--tiny-model"
    assert (repo / "refs" / "refs" / "pr" / "1").read_text() == commit
    out = run_python(f"from huggingface_hub import snapshot_download\n"
                     f"print(snapshot_download({MODEL!r}, revision='refs/pr/1', local_files_only=True))", env)
    assert out.returncode == 0 and out.stdout.strip().endswith(commit), out.stderr


# -- rate limits ------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def forty_root(tmp_path_factory):
    """40 files: 12 regular (2 resolver requests each: resolve + resolve cache), 27 small LFS, one 96 MiB LFS."""
    root = tmp_path_factory.mktemp("forty")
    repo = root / "models" / "demo-org" / "forty-files"
    repo.mkdir(parents=True)
    rng = random.Random(40)
    for i in range(12):
        (repo / f"config-{i:02d}.json").write_text(json.dumps({"i": i, "pad": "y" * rng.randrange(10, 2000)}))
    for i in range(27):
        (repo / f"shard-{i:02d}.bin").write_bytes(rng.randbytes(rng.randrange(1000, 30_000)))
    with open(repo / "model.safetensors", "wb") as f:
        for _ in range(12):
            f.write(rng.randbytes(8 << 20))
    return root


def test_a_fixed_window_rate_limit_with_t_0_is_waited_out_byte_exact(forty_root, tmp_path):
    quota, window = 6, 3
    with HubServer(forty_root) as server:
        server.limit_resolvers(quota, window)
        server.rate_limit_reset = 0  # "t=0" on every answer, while the window runs 3 s
        r = pull(server, tmp_path / "cache", "demo-org/forty-files", "-v", timeout=600)
        assert r.returncode == 0, r.stderr
        assert_byte_exact(server, tmp_path / "cache", "demo-org/forty-files")
        log = [rec for rec in server.log if rec.server == "hub" and "/resolve" in rec.path]
        start = server.rate_window_started
    windows: dict[int, list] = {}
    for rec in log:
        windows.setdefault(int((rec.time - start) // window), []).append(rec.status)
    limited = sum(s.count(429) for s in windows.values())
    assert all(len([s for s in statuses if s != 429]) <= quota for statuses in windows.values())
    assert max(s.count(429) for s in windows.values()) <= 3, windows  # paced: a few 429s per window at most
    assert f"rate-limited by the Hub: resuming in" in r.stderr and f"(quota {quota} per {window} s)" in r.stderr
    print(f"resolver requests {len(log)}, windows {len(windows)}, 429s {limited}")


def test_a_429_waits_for_the_window_and_spends_no_tries(hub, tmp_path):
    """The rate limit said only on 429s: the client waits t + 1 s (not "now") and gets through."""
    hub.limit_resolvers(2, 2)
    hub.rate_limit_on_success = False
    r = pull(hub, tmp_path / "cache", MODEL)
    assert r.returncode == 0, r.stderr
    assert_byte_exact(hub, tmp_path / "cache", MODEL)
    log = [rec for rec in hub.log if rec.server == "hub" and "/resolve" in rec.path]
    limited = [rec for rec in log if rec.status == 429]
    assert limited  # the fault fired; from the 429's RateLimit-Policy on, the client paces itself
    print(f"resolver requests {len(log)}, 429s {len(limited)}")
    for rec in limited:  # after a 429, requests wait for the window's end (one already on its way may not)
        boundary = hub.rate_window_started + (int((rec.time - hub.rate_window_started) // 2) + 1) * 2
        early = [x for x in log if rec.time + rec.duration < x.time < boundary - 0.05]
        assert len(early) <= 1, [(x.path, x.status) for x in early]


def test_rate_limit_waits_spend_the_budget_time_not_tries():
    from hpcstage.errors import TransferError
    from hpcstage.transfer import RetryPolicy
    from hpcstage.transfer.http import Attempts

    attempts = Attempts(RetryPolicy(attempts=2, budget=100), "x")
    for _ in range(20):  # far more 429s than tries
        assert attempts.rate_limited(1.0) == 1.0
    with pytest.raises(TransferError, match="--retry-budget"):
        attempts.rate_limited(301.0)
    assert RetryPolicy().budget > 2 * 301  # the default waits out a 5-minute window more than once


def test_a_wait_past_the_retry_budget_fails_with_one_line(hub, tmp_path):
    hub.limit_resolvers(1, 60)
    r = pull(hub, tmp_path / "cache", MODEL, "--retry-budget", "3")
    assert r.returncode == 1 and "past --retry-budget (3s)" in r.stderr.strip().splitlines()[-1], r.stderr
    # the quota ran out after one request: the pacer (or one 429) knew the wait, and no request was wasted
    assert len([rec for rec in hub.log if "/resolve" in rec.path]) <= 3


# -- mirrors that ignore Range ------------------------------------------------------------------------------


def test_a_server_that_ignores_range_still_gives_byte_exact_large_files(big_hub, tmp_path):
    big_hub.ignore_range = True
    r = pull(big_hub, tmp_path / "cache", BIG_MODEL, "-v")
    assert r.returncode == 0, r.stderr
    assert_byte_exact(big_hub, tmp_path / "cache", BIG_MODEL)
    cdn = [rec for rec in big_hub.log if rec.server == "cdn"]
    assert any(rec.range and rec.status == 200 for rec in cdn)  # the mirror answered a range with everything
    size = big_hub.files_of("model", BIG_MODEL)["model.safetensors"].size
    assert any(rec.range is None and rec.bytes_sent == size for rec in cdn)  # then one whole stream
    assert "ignores Range" in r.stderr


def test_a_wrong_content_range_is_refused(big_hub, tmp_path, monkeypatch):
    """A 206 whose Content-Range is not the bytes asked for never lands in the file."""
    from hpcstage.errors import TransferError
    from hpcstage.transfer import ranged

    with pytest.raises(TransferError, match="Content-Range"):
        ranged._check_content_range("bytes 0-99/1000", 100, 200, 1000, "x")
    ranged._check_content_range("bytes 100-199/1000", 100, 200, 1000, "x")
    ranged._check_content_range("bytes 100-199/*", 100, 200, 1000, "x")


def test_hpcstage_serve_models_a_gated_repo_and_a_rate_limit(tmp_path):
    import http.client

    proc = subprocess.Popen([sys.executable, "-m", "hpcstage", "serve", str(tmp_path / "root"), "--samples",
                             "--port", "0", "--gated", MODEL, "--token", "hf_ok", "--rate-limit", "100/300"],
                            stdout=subprocess.PIPE, text=True)
    try:
        url = proc.stdout.readline().split()[0]
        host, port = url.removeprefix("http://").split(":")

        def get(path: str, token: str | None = None):
            conn = http.client.HTTPConnection(host, int(port), timeout=10)
            conn.request("GET", path, headers={"Authorization": f"Bearer {token}"} if token else {})
            resp = conn.getresponse()
            resp.read()
            conn.close()
            return resp.status, resp.headers

        status, headers = get(f"/{MODEL}/resolve/main/config.json")
        assert status == 401 and headers["X-Error-Code"] == "GatedRepo"
        assert headers["RateLimit"].startswith('"resolvers";r=99;') and "q=100;w=300" in headers["RateLimit-Policy"]
        assert get(f"/{MODEL}/resolve/main/config.json", "hf_ok")[0] == 307
        assert get(f"/api/models/{MODEL}", "hf_bad")[0] == 401
    finally:
        proc.terminate()
        proc.wait(timeout=10)


def test_the_pacer_keeps_an_array_workers_share_and_waits_for_the_window():
    import time

    from huggingface_hub.utils import parse_ratelimit_headers

    from hpcstage.transfer.http import _PastDeadline, _Pacer

    said: list = []
    pacer = _Pacer("https://hub", share=0.25, announce=said.append)  # one of 4 array workers
    info = parse_ratelimit_headers({"RateLimit": '"resolvers";r=8;t=100',
                                    "RateLimit-Policy": '"fixed window";"resolvers";q=10;w=300'})
    pacer.observe(info, 200, None)
    assert pacer.remaining == 2 and (pacer.quota, pacer.window) == (10, 300)
    pacer.before()
    pacer.before()  # its share is used up: the next one waits for the window's end (~101 s), past this deadline
    with pytest.raises(_PastDeadline) as waited:
        pacer.before(deadline=time.monotonic() + 5)
    assert 99 <= waited.value.seconds <= 102
    pacer.observe(None, 429, 30.0)  # a 429 pauses everyone for its wait
    with pytest.raises(_PastDeadline):
        pacer.before(deadline=time.monotonic() + 5)


def test_one_error_family_with_fields(monkeypatch, tmp_path):
    import hpcstage
    from hpcstage.slurm.clusters import RegistryError
    from hpcstage.slurm.jobs import job_states

    for name in ("GatedRepo", "InvalidToken", "DisabledRepo", "RepoNotFound", "ProxyError", "HashMismatch",
                 "SlurmError", "BadInput"):
        assert issubclass(getattr(hpcstage, name), hpcstage.HpcstageError), name
    assert issubclass(RegistryError, hpcstage.BadInput) and RegistryError("x").exit_code == 2
    error = hpcstage.GatedRepo("x", repo="o/n", path="a.bin", status=401, hint="request access")
    assert (error.repo, error.path, error.status, error.hint) == ("o/n", "a.bin", 401, "request access")
    monkeypatch.setenv("PATH", str(tmp_path))  # no squeue: what `pull --slurm-array --wait` met as a traceback
    with pytest.raises(hpcstage.HpcstageError) as failed:
        job_states(["1"])
    assert isinstance(failed.value, hpcstage.SlurmError) and failed.value.exit_code == 1


def test_an_unreachable_proxy_is_named_in_the_error(hub, tmp_path):
    with socket_closed_port() as port:
        r = pull(hub, tmp_path / "cache", MODEL, "--retry-budget", "2",
                 HF_ENDPOINT="http://hub.test:1", HTTP_PROXY=f"http://u:pw@127.0.0.1:{port}")
    assert r.returncode == 1 and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert f"through proxy http://127.0.0.1:{port} (HTTP_PROXY)" in r.stderr and "pw" not in r.stderr


class socket_closed_port:
    """A local port nothing listens on (bound, then closed)."""

    def __enter__(self) -> int:
        import socket

        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            return s.getsockname()[1]

    def __exit__(self, *exc) -> None:
        pass
