"""Raw download rate of one big file from the served CDN URL to disk, sha256 hashed as bytes arrive,
with each candidate HTTP stack for hpcstage's transfer engine.

    .venv/bin/python bench/http_stacks.py [--size-mb 1024] [--rounds 3] [--only urllib3-read,...]

Each measurement runs in a fresh child process (`--one STACK URL OUT`) that times only the transfer
(imports and connection set-up excluded from nothing: the connect is inside the timed region, the import
is not), and reports wall seconds, CPU seconds (user+system of that process) and peak RSS. Stacks are
interleaved round by round. `requests` and `pycurl` are not hpcstage dependencies: they are installed with
`pip install --target bench/work/pylib requests pycurl` (done by this script when missing) and appended to
sys.path, so the project's venv is left as it is.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import HUB, WORK, Server, big_repo, make_big, python, run_timed, vm_hwm_mb  # noqa: E402

PYLIB = WORK / "pylib"
MIB = 1 << 20


def _open(path: str) -> int:
    return os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)


def _readinto_loop(readinto, fd: int, chunk: int) -> str:
    """Read the body with `readinto` into one reused buffer, write and hash each slice; closes fd."""
    buf = bytearray(chunk)
    view = memoryview(buf)
    h = hashlib.sha256()
    while n := readinto(buf):
        os.write(fd, view[:n])
        h.update(view[:n])
    os.close(fd)
    return h.hexdigest()


# -- one stack each; every function downloads url into out and returns the sha256 hex ---------------


def s_urllib3_read(url: str, out: str, chunk: int = MIB) -> str:
    """What transfer.py did first: resp.read(1 MiB) -> new bytes object each call, os.pwrite."""
    import urllib3

    pool = urllib3.PoolManager(retries=False)
    h, fd, off = hashlib.sha256(), _open(out), 0
    resp = pool.request("GET", url, preload_content=False, decode_content=False, redirect=False)
    while True:
        data = resp.read(chunk)
        if not data:
            break
        os.pwrite(fd, data, off)
        h.update(data)
        off += len(data)
    resp.release_conn()
    os.close(fd)
    return h.hexdigest()


def s_urllib3_readinto(url: str, out: str, chunk: int = MIB) -> str:
    """urllib3's public readinto: reused buffer on our side, but urllib3 still builds a bytes and copies."""
    import urllib3

    pool = urllib3.PoolManager(retries=False)
    resp = pool.request("GET", url, preload_content=False, decode_content=False, redirect=False)
    digest = _readinto_loop(resp.readinto, _open(out), chunk)
    resp.release_conn()
    return digest


def s_urllib3_fp_readinto(url: str, out: str, chunk: int = 4 * MIB) -> str:
    """urllib3 for the pool/timeouts, body read from its http.client response (resp._fp) with readinto:
    no per-chunk allocation. Valid only with decode_content=False and no Content-Encoding."""
    import urllib3

    pool = urllib3.PoolManager(retries=False)
    resp = pool.request("GET", url, preload_content=False, decode_content=False, redirect=False)
    digest = _readinto_loop(resp._fp.readinto, _open(out), chunk)
    resp.release_conn()
    return digest


def _httpclient(url: str, out: str, chunk: int) -> str:
    conn, resp, _ = _httpclient_open(url)
    digest = _readinto_loop(resp.readinto, _open(out), chunk)
    conn.close()
    return digest


def s_httpclient_1m(url: str, out: str) -> str:
    """stdlib http.client, readinto a reused 1 MiB buffer."""
    return _httpclient(url, out, MIB)


def s_httpclient_4m(url: str, out: str) -> str:
    """stdlib http.client, readinto a reused 4 MiB buffer."""
    return _httpclient(url, out, 4 * MIB)


def _httpclient_open(url: str):
    import http.client
    from urllib.parse import urlsplit

    u = urlsplit(url)
    conn = http.client.HTTPConnection(u.hostname, u.port, timeout=30)
    conn.request("GET", u.path + ("?" + u.query if u.query else ""))
    resp = conn.getresponse()
    assert resp.status == 200, resp.status
    return conn, resp, int(resp.headers["Content-Length"])


def s_httpclient_4m_fallocate(url: str, out: str) -> str:
    """As httpclient-readinto-4m, with posix_fallocate of the whole size first (ext4 allocates blocks once)."""
    conn, resp, size = _httpclient_open(url)
    fd = _open(out)
    if out != "/dev/null":
        os.posix_fallocate(fd, 0, size)
    digest = _readinto_loop(resp.readinto, fd, 4 * MIB)
    conn.close()
    return digest


def s_httpclient_mmap(url: str, out: str) -> str:
    """http.client readinto straight into an mmap of the output file: one kernel copy (socket -> page cache),
    no write(); hashing reads the mapped pages."""
    import mmap

    if out == "/dev/null":
        return s_httpclient_4m(url, out)
    conn, resp, size = _httpclient_open(url)
    fd = os.open(out, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
    os.ftruncate(fd, size)
    m = mmap.mmap(fd, size)
    view = memoryview(m)
    h, off = hashlib.sha256(), 0
    while off < size:
        n = resp.readinto(view[off:off + 4 * MIB])
        if not n:
            break
        h.update(view[off:off + n])
        off += n
    view.release()
    m.close()
    os.close(fd)
    conn.close()
    return h.hexdigest()


def s_httpclient_hash_thread(url: str, out: str) -> str:
    """http.client readinto + write in this thread, sha256 in another (hashlib drops the GIL on big updates):
    a ring of 4 x 4 MiB buffers, so receiving/writing and hashing overlap on two cores."""
    import queue
    import threading

    conn, resp, size = _httpclient_open(url)
    fd = _open(out)
    free: queue.Queue = queue.Queue()
    full: queue.Queue = queue.Queue()
    for _ in range(4):
        free.put(bytearray(4 * MIB))
    h = hashlib.sha256()

    def hasher():
        while (item := full.get()) is not None:
            buf, n = item
            h.update(memoryview(buf)[:n])
            free.put(buf)

    t = threading.Thread(target=hasher)
    t.start()
    while True:
        buf = free.get()
        n = resp.readinto(buf)
        if not n:
            break
        os.write(fd, memoryview(buf)[:n])
        full.put((buf, n))
    full.put(None)
    t.join()
    os.close(fd)
    conn.close()
    return h.hexdigest()


def s_httpx2(url: str, out: str) -> str:
    """httpx2 (huggingface_hub 2.x's stack), stream + iter_raw(1 MiB)."""
    import httpx2

    h, fd = hashlib.sha256(), _open(out)
    with httpx2.Client(timeout=30, follow_redirects=False) as client:
        with client.stream("GET", url) as resp:
            for data in resp.iter_raw(MIB):
                os.write(fd, data)
                h.update(data)
    os.close(fd)
    return h.hexdigest()


def s_requests(url: str, out: str) -> str:
    """requests, stream=True + iter_content(1 MiB)."""
    import requests

    h, fd = hashlib.sha256(), _open(out)
    with requests.Session() as s:
        with s.get(url, stream=True, timeout=30, allow_redirects=False) as resp:
            for data in resp.iter_content(MIB):
                os.write(fd, data)
                h.update(data)
    os.close(fd)
    return h.hexdigest()


def s_pycurl(url: str, out: str) -> str:
    """pycurl (libcurl), WRITEFUNCTION callback, CURLOPT_BUFFERSIZE 1 MiB (libcurl's maximum is 10 MiB)."""
    import pycurl

    h, fd = hashlib.sha256(), _open(out)

    def write(data: bytes) -> None:
        os.write(fd, data)
        h.update(data)

    c = pycurl.Curl()
    c.setopt(pycurl.URL, url)
    c.setopt(pycurl.WRITEFUNCTION, write)
    c.setopt(pycurl.BUFFERSIZE, MIB)
    c.perform()
    assert c.getinfo(pycurl.RESPONSE_CODE) == 200
    c.close()
    os.close(fd)
    return h.hexdigest()


def s_sha256_only(url: str, out: str) -> str:
    """Not a stack: sha256 of the same number of bytes from memory (the CPU floor of hashing)."""
    size = int(os.environ["BENCH_SIZE"])
    buf = os.urandom(4 * MIB)
    h = hashlib.sha256()
    for _ in range(size // len(buf)):
        h.update(buf)
    return h.hexdigest()


STACKS = {
    "urllib3-read": s_urllib3_read,
    "urllib3-readinto": s_urllib3_readinto,
    "urllib3-fp-readinto": s_urllib3_fp_readinto,
    "httpclient-readinto-1m": s_httpclient_1m,
    "httpclient-readinto-4m": s_httpclient_4m,
    "httpclient-4m-fallocate": s_httpclient_4m_fallocate,
    "httpclient-mmap": s_httpclient_mmap,
    "httpclient-4m-hash-thread": s_httpclient_hash_thread,
    "httpx2": s_httpx2,
    "requests": s_requests,
    "pycurl": s_pycurl,
    "sha256-only": s_sha256_only,
}
IMPORTS = {"urllib3-read": "urllib3", "urllib3-readinto": "urllib3", "urllib3-fp-readinto": "urllib3",
           "httpx2": "httpx2", "requests": "requests", "pycurl": "pycurl"}


def one(stack: str, url: str, out: str) -> None:
    """Child mode: import, then time the transfer alone; print one JSON line."""
    if stack in IMPORTS:
        __import__(IMPORTS[stack])
    r0, t0 = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
    digest = STACKS[stack](url, out)
    t1, r1 = time.perf_counter(), resource.getrusage(resource.RUSAGE_SELF)
    cpu = (r1.ru_utime - r0.ru_utime) + (r1.ru_stime - r0.ru_stime)
    print(json.dumps({"stack": stack, "seconds": t1 - t0, "cpu": cpu, "user": r1.ru_utime - r0.ru_utime,
                      "sys": r1.ru_stime - r0.ru_stime, "rss_mb": vm_hwm_mb("self"), "sha256": digest}))


def ensure_extras() -> list[str]:
    """requests and pycurl into bench/work/pylib (not the project venv); returns what could not be had."""
    missing = []
    env = dict(os.environ, PYTHONPATH=str(PYLIB))
    for mod, pkg in (("requests", "requests"), ("pycurl", "pycurl")):
        if subprocess.run([python(), "-c", f"import {mod}"], env=env, capture_output=True).returncode == 0:
            continue
        r = subprocess.run([python(), "-m", "pip", "install", "-q", "--target", str(PYLIB), pkg], capture_output=True)
        if r.returncode or subprocess.run([python(), "-c", f"import {mod}"], env=env, capture_output=True).returncode:
            missing.append(pkg)
    return missing


def curl_cli(url: str, out: str) -> dict:
    r = run_timed(["curl", "-sS", "-o", out, url])
    return {"stack": "curl-cli (no hash)", "seconds": r.seconds, "cpu": r.cpu, "user": r.user, "sys": r.sys,
            "rss_mb": r.rss_mb, "sha256": None}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size-mb", type=int, default=1024)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--only", help="comma-separated stacks: " + ", ".join(STACKS))
    ap.add_argument("--sink", default="null,disk",
                    help="comma-separated: null (/dev/null: the stack and hashing alone), shm (/dev/shm, page copy "
                         "without a filesystem's block allocation), disk (bench/work, what a pull does); default null,disk")
    ap.add_argument("--one", nargs=3, metavar=("STACK", "URL", "OUT"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.one:
        sys.path.append(str(PYLIB))
        one(*args.one)
        return 0

    WORK.mkdir(parents=True, exist_ok=True)
    stacks = args.only.split(",") if args.only else list(STACKS)
    missing = ensure_extras()
    path = make_big(args.size_mb)
    with open(path, "rb") as f:
        expected = hashlib.file_digest(f, "sha256").hexdigest()
    env = dict(os.environ, BENCH_SIZE=str(args.size_mb << 20))
    sinks = {"null": Path("/dev/null"), "shm": Path("/dev/shm/hpcstage-bench-stack.bin"),
             "disk": WORK / "stack-download.bin"}
    results: dict[tuple[str, str], list[dict]] = {}
    with Server(HUB, WORK / "stacks-server.jsonl") as server:
        server.warm(big_repo(args.size_mb))
        url = server.cdn_url(big_repo(args.size_mb), "model.safetensors")
        for sink in args.sink.split(","):
            out = sinks[sink]
            for rnd in range(args.rounds + 1):  # round 0: untimed warm-up (page cache, server threads)
                k = rnd % (len(stacks) + 1)
                order = (stacks + ["curl-cli"])[k:] + (stacks + ["curl-cli"])[:k]
                for stack in order:
                    if stack == "sha256-only" and sink != "null":
                        continue
                    if stack == "curl-cli":
                        rec = curl_cli(url, str(out))
                    else:
                        p = subprocess.run([python(), __file__, "--one", stack, url, str(out)], env=env,
                                           capture_output=True, text=True)
                        if p.returncode:
                            reason = (p.stderr.strip().splitlines() or ["?"])[-1]
                            results.setdefault((sink, stack), []).append({"error": reason})
                            continue
                        rec = json.loads(p.stdout.strip().splitlines()[-1])
                        if stack != "sha256-only" and rec["sha256"] != expected:
                            rec = {"error": "sha256 mismatch"}
                    if sink != "null":
                        out.unlink(missing_ok=True)
                    if rnd:
                        results.setdefault((sink, stack), []).append(rec)

    size_mb = args.size_mb * MIB / 1e6
    print(f"{args.size_mb} MiB from the CDN listener of `hpcstage serve` on 127.0.0.1, sha256-hashed as it "
          f"arrives (curl-cli: no hash); median of {args.rounds} rounds, order rotated each round")
    if missing:
        print(f"not measured (could not install): {', '.join(missing)}")
    for sink in args.sink.split(","):
        print(f"\nsink: {sink} ({sinks[sink]})")
        print("| stack | median s | MB/s | CPU s (user+sys) | CPU s per GB | peak RSS MB | each round (s) |")
        print("|---|---:|---:|---:|---:|---:|---|")
        for (sk, stack), recs in results.items():
            if sk != sink:
                continue
            if any("error" in r for r in recs):
                print(f"| {stack} | failed: {next(r['error'] for r in recs if 'error' in r)} | | | | | |")
                continue
            med = lambda key: statistics.median(r[key] for r in recs)  # noqa: E731
            secs, cpu = med("seconds"), med("cpu")
            each = ", ".join("%.2f" % r["seconds"] for r in recs)
            print(f"| {stack} | {secs:.2f} | {size_mb / secs:,.0f} | {cpu:.2f} ({med('user'):.2f}+{med('sys'):.2f}) | "
                  f"{cpu / (size_mb / 1000):.2f} | {max(r['rss_mb'] for r in recs):.0f} | {each} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
