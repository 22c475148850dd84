"""The engine over https: certificates checked against the system store or SSL_CERT_FILE, and never a
redirect from https down to plain http. The emulator serves TLS with a throwaway self-signed certificate."""
from __future__ import annotations

import shutil
import ssl
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import client_env, sha256

from hpcstage.testing.hub import HubServer

MODEL = "demo-org/tiny-model"


@pytest.fixture(scope="module")
def certificate(tmp_path_factory) -> Path:
    """cert.pem and key.pem for 127.0.0.1 (an IP subjectAltName, as hostname checking needs)."""
    if not shutil.which("openssl"):
        pytest.skip("openssl CLI not installed")
    folder = tmp_path_factory.mktemp("tls")
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
                    "-keyout", str(folder / "key.pem"), "-out", str(folder / "cert.pem"),
                    "-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1"],
                   check=True, capture_output=True)
    return folder


def server_context(certificate: Path) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(certificate / "cert.pem", certificate / "key.pem")
    return ctx


def pull(server: HubServer, cache: Path, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "hpcstage", "pull", MODEL, "--cache-dir", str(cache), "-q",
                           "--retry-budget", "5"], env=client_env(server, cache, **env),
                          capture_output=True, text=True, timeout=120)


def test_a_pull_over_https_with_the_site_ca_bundle(sample_root, certificate, tmp_path):
    ctx = server_context(certificate)
    with HubServer(sample_root, tls={"hub": ctx, "cdn": ctx}) as server:
        assert server.url.startswith("https://") and server.cdn_url.startswith("https://")
        r = pull(server, tmp_path / "cache", SSL_CERT_FILE=str(certificate / "cert.pem"))
        assert r.returncode == 0, r.stderr
        files = server.files_of("model", MODEL)
        assert any(rec.server == "cdn" for rec in server.log)  # the LFS file came over https from the CDN
    snapshot = next((tmp_path / "cache" / "models--demo-org--tiny-model" / "snapshots").iterdir())
    for path, info in files.items():
        assert sha256(snapshot / path) == sha256(info.local), path


def test_an_untrusted_certificate_fails_at_once_and_names_the_fix(sample_root, certificate, tmp_path):
    ctx = server_context(certificate)
    with HubServer(sample_root, tls={"hub": ctx, "cdn": ctx}) as server:
        r = pull(server, tmp_path / "cache")
    assert r.returncode == 1 and "certificate is not trusted" in r.stderr and "SSL_CERT_FILE" in r.stderr, r.stderr
    assert len(r.stderr.strip().splitlines()) == 1 and "gave up" not in r.stderr  # not retried


def test_a_redirect_from_https_to_plain_http_is_refused(sample_root, certificate, tmp_path):
    ctx = server_context(certificate)
    with HubServer(sample_root, tls={"hub": ctx}) as server:  # the CDN listener stays on http
        r = pull(server, tmp_path / "cache", SSL_CERT_FILE=str(certificate / "cert.pem"))
        cdn_requests = [rec for rec in server.log if rec.server == "cdn"]
    assert r.returncode == 1 and "refused a redirect from https to http" in r.stderr, r.stderr
    assert cdn_requests == []  # nothing, not even the request line, went out in the clear
