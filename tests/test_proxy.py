"""Behind a site proxy: the Hub's host name resolves only at the proxy, https goes through a CONNECT tunnel with
the proxy's credentials, the Hub's certificate is signed by a site CA named in REQUESTS_CA_BUNDLE. The proxy
is a real one (tests/proxy.py); the client is the real CLI."""
from __future__ import annotations

import json
import os
import shutil
import socket
import ssl
import subprocess
from pathlib import Path

import pytest

from helpers import client_env, hpcstage, run_python, sha256
from hpcstage.testing.hub import HubServer
from proxy import ForwardProxy

MODEL, DATASET = "demo-org/tiny-model", "demo-org/tiny-dataset"
HOST = "hub.test"  # resolvable by the proxy only
USER, PASSWORD = "alice", "s3cret:p@ss"  # quoted in the URL: ':' and '@' inside a password
QUOTED = "s3cret%3Ap%40ss"


@pytest.fixture(scope="module")
def site_ca(tmp_path_factory) -> Path:
    """A site CA and a certificate it signed for hub.test (what a site's TLS-inspecting setup looks like)."""
    if not shutil.which("openssl"):
        pytest.skip("openssl CLI not installed")
    d = tmp_path_factory.mktemp("site-ca")
    run = lambda *args: subprocess.run(["openssl", *args], check=True, capture_output=True, cwd=d)  # noqa: E731
    run("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-keyout", "ca.key", "-out", "ca.pem",
        "-subj", "/CN=Test Site CA", "-addext", "basicConstraints=critical,CA:TRUE",
        "-addext", "keyUsage=critical,keyCertSign,cRLSign")
    run("req", "-newkey", "rsa:2048", "-nodes", "-keyout", "key.pem", "-out", "hub.csr", "-subj", f"/CN={HOST}")
    (d / "ext.cnf").write_text(f"subjectAltName=DNS:{HOST}\nbasicConstraints=CA:FALSE\n"
                               "keyUsage=digitalSignature,keyEncipherment\nextendedKeyUsage=serverAuth\n"
                               "authorityKeyIdentifier=keyid\n")
    run("x509", "-req", "-in", "hub.csr", "-CA", "ca.pem", "-CAkey", "ca.key", "-CAcreateserial", "-days", "1",
        "-out", "cert.pem", "-extfile", "ext.cnf")
    return d


@pytest.fixture
def tls_hub(sample_root, site_ca):
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(site_ca / "cert.pem", site_ca / "key.pem")
    with HubServer(sample_root, tls={"hub": ctx, "cdn": ctx}) as server:
        yield server


def proxied_env(server: HubServer, cache: Path, proxy_url: str, site_ca: Path, **extra: str) -> dict:
    port = server.url.rsplit(":", 1)[1]
    return client_env(server, cache, HF_ENDPOINT=f"https://{HOST}:{port}", HTTPS_PROXY=proxy_url,
                      REQUESTS_CA_BUNDLE=str(site_ca / "ca.pem"), **extra)


def test_the_hub_name_resolves_only_at_the_proxy():
    with pytest.raises(socket.gaierror):
        socket.getaddrinfo(HOST, 443)


def test_pull_through_a_connect_proxy_with_a_site_ca_is_byte_exact_and_loads_offline(tls_hub, site_ca, tmp_path):
    cache = tmp_path / "cache"
    with ForwardProxy({HOST: "127.0.0.1"}, USER, PASSWORD) as proxy:
        env = proxied_env(tls_hub, cache, proxy.url(USER, QUOTED), site_ca)
        for repo, kind in ((MODEL, "model"), (DATASET, "dataset")):
            r = hpcstage("pull", repo, "--repo-type", kind, "--cache-dir", str(cache), "-q", env=env)
            assert r.returncode == 0, r.stderr
            assert PASSWORD not in r.stderr + r.stdout and QUOTED not in r.stderr + r.stdout
        tunnels = [rec for rec in proxy.log if rec.method == "CONNECT"]
    hub_port, cdn_port = tls_hub.url.rsplit(":", 1)[1], tls_hub.cdn_url.rsplit(":", 1)[1]
    assert {rec.target for rec in tunnels} == {f"{HOST}:{hub_port}", f"{HOST}:{cdn_port}"}  # Hub and CDN
    assert all(rec.status == 200 and rec.authorized for rec in tunnels)
    assert len(tunnels) <= 20  # keep-alive: tunnels are reused, not one per request
    for repo, kind in ((MODEL, "model"), (DATASET, "dataset")):
        snapshot = next((cache / f"{kind}s--{repo.replace('/', '--')}" / "snapshots").iterdir())
        for path, info in tls_hub.files_of(kind, repo).items():
            assert sha256(snapshot / path) == sha256(info.local), path
    # loads with the network off (the proxy is gone too) through the real clients
    env = client_env(tls_hub, tmp_path / "x", HF_HUB_CACHE=str(cache), HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1")
    out = run_python(f"""
import json
import os
from huggingface_hub import snapshot_download
from datasets import load_dataset
model = snapshot_download({MODEL!r}, local_files_only=True)
data = snapshot_download({DATASET!r}, repo_type="dataset", local_files_only=True)
print(json.dumps([model, load_dataset(data, split="train").num_rows]))
""", env, timeout=300)
    assert out.returncode == 0, out.stderr
    model, rows = json.loads(out.stdout.strip().splitlines()[-1])
    assert Path(model).is_dir() and rows > 0


def test_a_407_gives_one_line_naming_the_proxy_and_never_the_password(tls_hub, site_ca, tmp_path):
    with ForwardProxy({HOST: "127.0.0.1"}, USER, PASSWORD) as proxy:
        env = proxied_env(tls_hub, tmp_path / "cache", proxy.url(USER, "wrong%40pw"), site_ca)
        r = hpcstage("pull", MODEL, "--cache-dir", str(tmp_path / "cache"), "-q", "--retry-budget", "30", env=env)
        refused = [rec for rec in proxy.log if rec.status == 407]
    port = tls_hub.url.rsplit(":", 1)[1]
    assert r.returncode == 1, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1, r.stderr
    assert (f"proxy http://127.0.0.1:{proxy.port} (HTTPS_PROXY) refused CONNECT to {HOST}:{port}: "
            "407 proxy authentication required") in lines[0], lines[0]
    assert "wrong" not in r.stderr and USER not in r.stderr
    assert len(refused) == 1  # not retried: a 407 does not pass by itself


def test_no_proxy_is_honoured_and_plain_http_goes_through_the_proxy(hub, tmp_path):
    with ForwardProxy({}) as proxy:
        for name, no_proxy in (("direct", "127.0.0.1"), ("proxied", "")):
            cache = tmp_path / name
            env = client_env(hub, cache, HTTP_PROXY=proxy.url(), HTTPS_PROXY=proxy.url())
            env["NO_PROXY"] = env["no_proxy"] = no_proxy
            before = len(proxy.log)
            r = hpcstage("pull", MODEL, "--cache-dir", str(cache), "-q", env=env)
            assert r.returncode == 0, r.stderr
            seen = proxy.log[before:]
            if name == "direct":
                assert seen == []  # NO_PROXY: the proxy saw nothing
            else:
                assert seen and all(rec.method == "GET" and rec.target.startswith("http://127.0.0.1:") for rec in seen)
            snapshot = next((cache / "models--demo-org--tiny-model" / "snapshots").iterdir())
            for path, info in hub.files_of("model", MODEL).items():
                assert sha256(snapshot / path) == sha256(info.local), path


def test_doctor_reports_the_proxy_and_whether_the_tunnel_opens(tls_hub, site_ca, tmp_path):
    with ForwardProxy({HOST: "127.0.0.1"}, USER, PASSWORD) as proxy:
        good = proxied_env(tls_hub, tmp_path / "c", proxy.url(USER, QUOTED), site_ca, HOME=str(tmp_path))
        bad = proxied_env(tls_hub, tmp_path / "c", proxy.url(USER, "nope"), site_ca, HOME=str(tmp_path))
        checks = {name: {c["name"]: c for c in json.loads(hpcstage("doctor", "--json", env=env).stdout)}
                  for name, env in (("good", good), ("bad", bad))}
    port = tls_hub.url.rsplit(":", 1)[1]
    proxy_ok, proxy_bad = checks["good"]["proxy"], checks["bad"]["proxy"]
    assert proxy_ok["status"] == "ok", proxy_ok
    assert proxy_ok["detail"] == (f"HTTPS_PROXY http://127.0.0.1:{proxy.port} applies to https://{HOST}:{port}; "
                                  "the CONNECT tunnel opens")
    assert checks["good"]["endpoint"]["status"] == "ok", checks["good"]["endpoint"]
    assert proxy_bad["status"] == "fail" and "407" in proxy_bad["detail"] and "nope" not in json.dumps(checks)


def test_a_bad_ca_bundle_variable_is_bad_input(hub, tmp_path):
    env = client_env(hub, tmp_path / "cache", REQUESTS_CA_BUNDLE=str(tmp_path / "missing.pem"),
                     HF_ENDPOINT=hub.url.replace("http://", "https://"))
    r = hpcstage("pull", MODEL, "--cache-dir", str(tmp_path / "cache"), "-q", env=env)
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert "REQUESTS_CA_BUNDLE=" in r.stderr and "unset it" in r.stderr


@pytest.mark.parametrize("no_proxy, host, direct", [
    ("", "huggingface.co", False),
    ("*", "huggingface.co", True),
    ("huggingface.co", "huggingface.co", True),
    (".hf.co", "cas-bridge.xethub.hf.co", True),
    ("hf.co", "cas-bridge.xethub.hf.co", True),  # a bare domain covers its sub-domains too (curl, requests)
    ("example.org, 10.1.2.3", "10.1.2.3", True),
    ("example.org", "huggingface.co", False),
    ("huggingface.co:8443", "huggingface.co", False),  # another port
])
def test_no_proxy_rules_are_the_standard_librarys(monkeypatch, no_proxy, host, direct):
    from hpcstage.transfer import Proxies

    for name in ("https_proxy", "http_proxy", "all_proxy", "no_proxy", "HTTP_PROXY", "ALL_PROXY"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HTTPS_PROXY", "http://bob:pw@proxy.site:3128")
    monkeypatch.setenv("NO_PROXY", no_proxy)
    proxy = Proxies().for_origin("https", host, None)
    assert (proxy is None) == direct
    if proxy is not None:
        assert proxy.name == "http://proxy.site:3128" and proxy.variable == "HTTPS_PROXY"
        assert proxy.headers == {"Proxy-Authorization": "Basic Ym9iOnB3"}  # bob:pw


def test_all_proxy_applies_when_no_scheme_proxy_is_set_and_odd_proxies_are_bad_input(monkeypatch):
    from hpcstage.errors import BadInput
    from hpcstage.transfer import Proxies

    for name in ("https_proxy", "http_proxy", "all_proxy", "no_proxy", "HTTPS_PROXY", "HTTP_PROXY", "NO_PROXY"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("ALL_PROXY", "proxy.site:8080")
    proxy = Proxies().for_origin("https", "huggingface.co", None)
    assert proxy is not None and (proxy.host, proxy.port, proxy.auth) == ("proxy.site", 8080, None)
    monkeypatch.setenv("ALL_PROXY", "socks5://u:secret@proxy.site:1080")
    with pytest.raises(BadInput, match="ALL_PROXY=socks5://proxy.site") as e:
        Proxies().for_origin("https", "huggingface.co", None)
    assert "secret" not in str(e.value)


def test_the_progress_line_says_the_run_is_waiting():
    import io

    from hpcstage.progress import Progress

    stream = io.StringIO()
    with Progress(100, 2, stream=stream, interval=3600) as progress:
        progress.note("rate-limited by the Hub: resuming in 40 s (quota 3000 per 300 s)")
        assert progress.line().endswith("; rate-limited by the Hub: resuming in 40 s (quota 3000 per 300 s)")
        progress.note(None)
        assert "rate-limited" not in progress.line()


def _url_manifest(server: HubServer, folder: Path) -> tuple[Path, str]:
    """A manifest with one `url:` entry on the Hub's host name (reachable through the proxy only)."""
    port = server.url.rsplit(":", 1)[1]
    name = "data/test-00000-of-00001.parquet"
    manifest = folder / "hpcstage.yaml"
    manifest.write_text(f"cache_dir: cache\ndata_dir: data\ndatasets:\n"
                        f"  - url: https://{HOST}:{port}/datasets/{DATASET}/resolve/main/{name}\n    dest: parquet\n")
    return manifest, name


def test_a_url_source_goes_through_the_proxy_too(tls_hub, site_ca, tmp_path):
    port = tls_hub.url.rsplit(":", 1)[1]
    manifest, name = _url_manifest(tls_hub, tmp_path)
    with ForwardProxy({HOST: "127.0.0.1"}, USER, PASSWORD) as proxy:
        env = proxied_env(tls_hub, tmp_path / "cache", proxy.url(USER, QUOTED), site_ca)
        r = hpcstage("pull", "-f", str(manifest), "-q", env=env)
        tunnels = {rec.target for rec in proxy.log if rec.method == "CONNECT" and rec.status == 200}
    assert r.returncode == 0, r.stderr
    assert f"{HOST}:{port}" in tunnels
    got = next((tmp_path / "data" / "parquet").rglob("*.parquet"))
    assert sha256(got) == sha256(tls_hub.files_of("dataset", DATASET)[name].local)


def test_update_asks_an_unchanged_url_source_conditionally_through_the_proxy(tls_hub, site_ca, tmp_path):
    manifest, _ = _url_manifest(tls_hub, tmp_path)
    with ForwardProxy({HOST: "127.0.0.1"}, USER, PASSWORD) as proxy:
        env = proxied_env(tls_hub, tmp_path / "cache", proxy.url(USER, QUOTED), site_ca)
        assert hpcstage("pull", "-f", str(manifest), "-q", env=env).returncode == 0
        lock = (tmp_path / "hpcstage.lock").read_bytes()
        tls_hub.clear_log()
        before = len(proxy.log)
        r = hpcstage("pull", "-f", str(manifest), "-q", "--update", env=env)
        tunnels = [rec for rec in proxy.log[before:] if rec.method == "CONNECT"]
    assert r.returncode == 0, r.stderr
    seen = tls_hub.log
    assert seen and tunnels and all(rec.status == 200 for rec in tunnels)  # it went through the proxy
    assert all(rec.method == "HEAD" and rec.bytes_sent == 0 for rec in seen), seen  # conditional, no body
    assert 304 in {rec.status for rec in seen}
    assert (tmp_path / "hpcstage.lock").read_bytes() == lock


def test_withheld_names_cover_urls_with_a_password_and_the_secrets_file_fills_them():
    """What sbatch must not export (slurmctld keeps it with the job): a proxy URL with a password, whatever
    its name; a proxy without one is exported as before. Set by the secrets file, nothing is missing."""
    from hpcstage.slurm import environment

    environ = {"HTTPS_PROXY": f"http://{USER}:{QUOTED}@proxy.site:3128", "http_proxy": "http://proxy.site:3128",
               "PIP_INDEX_URL": "https://bob:pw@pypi.site/simple", "HF_TOKEN": "hf_x", "PATH": "/usr/bin"}
    withheld = environment.withheld(environ, [])
    assert withheld == ["HF_TOKEN", "HTTPS_PROXY", "PIP_INDEX_URL"]
    assert environment.not_passed(environ, withheld, []) == ["HF_TOKEN", "HTTPS_PROXY", "PIP_INDEX_URL"]
    assert environment.not_passed(environ, withheld, ["HF_TOKEN", "HTTPS_PROXY"]) == ["PIP_INDEX_URL"]
    both = {**environ, "https_proxy": environ["HTTPS_PROXY"]}  # sites often set both cases
    assert environment.not_passed(both, environment.withheld(both, ["https_proxy"]), ["https_proxy"]) == [
        "HF_TOKEN", "PIP_INDEX_URL"]
    sbatch = environment.sbatch_environment(environ, withheld)
    assert QUOTED not in repr(sbatch) and "pw@" not in repr(sbatch)
    assert sbatch["SBATCH_EXPORT"] == "PATH,http_proxy"


def _array_manifest(folder: Path) -> Path:
    folder.mkdir()
    manifest = folder / "hpcstage.yaml"
    manifest.write_text(f"cache_dir: cache\nmodels:\n  - repo: {MODEL}\n")
    return manifest


def test_array_workers_reach_the_hub_through_a_proxy_whose_password_slurm_never_holds(cluster, tls_hub, site_ca,
                                                                                      tmp_path):
    """`pull --slurm-array` behind a proxy with a password: without a secrets file setting the proxy it stops
    before planning or submitting, in one line naming the variable and the fix; with one, the workers tunnel
    through the authenticating proxy and neither slurmctld's saved environment nor a script or record holds
    the password."""
    from helpers import online_nodes, slurm_saved_environments
    from hpcstage.slurm.jobs import wait

    with ForwardProxy({HOST: "127.0.0.1"}, USER, PASSWORD) as proxy:
        env = online_nodes(tmp_path, proxied_env(tls_hub, tmp_path / "unused", proxy.url(USER, QUOTED), site_ca))
        bare = _array_manifest(tmp_path / "bare")
        r = hpcstage("pull", "-f", str(bare), "--slurm-array", "2", "--cluster", "local", env=env)
        assert r.returncode == 2, r.stdout + r.stderr  # bad input
        assert r.stderr.count("\n") == 1 and "HTTPS_PROXY carries a password" in r.stderr, r.stderr
        assert "add HTTPS_PROXY=... to your secrets file" in r.stderr and QUOTED not in r.stderr
        assert sorted(p.name for p in bare.parent.iterdir()) == ["hpcstage.yaml"]  # nothing planned or written
        assert proxy.log == []

        secrets = tmp_path / "secrets.env"
        fd = os.open(secrets, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        os.write(fd, f"HTTPS_PROXY={proxy.url(USER, QUOTED)}\n".encode())
        os.close(fd)
        env["HPCSTAGE_SECRETS_FILE"] = str(secrets)
        manifest = _array_manifest(tmp_path / "array")
        r = hpcstage("pull", "-f", str(manifest), "--slurm-array", "2", "--cluster", "local", env=env)
        assert r.returncode == 0, r.stdout + r.stderr
        assert "warning" not in r.stderr, r.stderr
        jobs = json.loads(next((manifest.parent / "hpcstage-array").glob("*/jobs.json")).read_text())
        saved = slurm_saved_environments(jobs["report_id"])  # pending until the workers and finish are done
        assert saved, "slurmctld's copy of the report job's environment was not found"
        saved_env = saved[0].read_text(errors="replace")
        states = wait([jobs["array_id"], jobs["finish_id"], jobs["report_id"]], timeout=240, poll=0.5)
        tunnels = [rec for rec in proxy.log if rec.method == "CONNECT"]
    assert states[jobs["finish_id"]].state == "COMPLETED", states
    assert f"HF_ENDPOINT=https://{HOST}:" in saved_env and "REQUESTS_CA_BUNDLE=" in saved_env  # the right file
    assert "HTTPS_PROXY" not in saved_env and QUOTED not in saved_env
    assert tunnels and all(rec.status == 200 and rec.authorized for rec in tunnels)
    cdn_port = tls_hub.cdn_url.rsplit(":", 1)[1]
    assert f"{HOST}:{cdn_port}" in {rec.target for rec in tunnels}  # content: fetched by the jobs, not the planner
    cache = manifest.parent / "cache"
    snapshot = next((cache / f"models--{MODEL.replace('/', '--')}" / "snapshots").iterdir())
    for path, info in tls_hub.files_of("model", MODEL).items():
        assert sha256(snapshot / path) == sha256(info.local), path
    texts = {str(p): p.read_text(errors="replace") for p in manifest.parent.rglob("*") if p.is_file()
             and "cache" not in p.relative_to(manifest.parent).parts}
    assert [where for where, text in texts.items() if QUOTED in text or PASSWORD in text] == []
