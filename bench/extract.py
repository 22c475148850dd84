"""Extraction throughput: hpcstage's safe extractor (`archive.extract_into`, which also sha256-hashes every
file) against GNU `tar -xzf` (and `tar -xf` for zip via `unzip` when present) on the same archive, in the
same run, rounds interleaved.

    .venv/bin/python bench/extract.py [--mb 200] [--rounds 3]

The archive mimics a WebSight-like dataset: incompressible "images" (random bytes) plus JSONL text, so
gzip does real work on part of it and passes the rest through.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import resource
import shutil
import subprocess
import sys
import tarfile
import time
import zipfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "src"))

from hpcstage.archive import Limits, extract_into  # noqa: E402

WORK = Path(__file__).resolve().parent / "work" / "extract"


def make(mb: int) -> tuple[Path, Path]:
    tgz, zp = WORK / f"websight-{mb}mb.tar.gz", WORK / f"websight-{mb}mb.zip"
    if tgz.exists() and zp.exists():
        return tgz, zp
    WORK.mkdir(parents=True, exist_ok=True)
    src = WORK / "src"
    shutil.rmtree(src, ignore_errors=True)
    rng = random.Random(5)
    images = int(mb * 0.6 * 1e6) // 150_000
    (src / "websight" / "images").mkdir(parents=True)
    for i in range(images):
        (src / "websight" / "images" / f"{i:05d}.png").write_bytes(rng.randbytes(150_000))
    words = "the page has a header a hero image three cards and a footer with links".split()
    with open(src / "websight" / "prompts.jsonl", "w") as f:
        written, i = 0, 0
        while written < mb * 0.4 * 1e6:
            line = json.dumps({"id": i, "image": f"images/{i % images:05d}.png",
                               "html": " ".join(rng.choice(words) for _ in range(200))}) + "\n"
            f.write(line)
            written += len(line)
            i += 1
    with tarfile.open(tgz, "w:gz") as tf:
        tf.add(src / "websight", arcname="websight")
    with zipfile.ZipFile(zp, "w", zipfile.ZIP_DEFLATED) as zf:
        for p in sorted((src / "websight").rglob("*")):
            zf.write(p, p.relative_to(src).as_posix())
    shutil.rmtree(src)
    return tgz, zp


def timed(fn) -> tuple[float, float]:
    r0 = resource.getrusage(resource.RUSAGE_SELF)
    c0 = resource.getrusage(resource.RUSAGE_CHILDREN)
    t = time.perf_counter()
    fn()
    wall = time.perf_counter() - t
    r1 = resource.getrusage(resource.RUSAGE_SELF)
    c1 = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (r1.ru_utime + r1.ru_stime - r0.ru_utime - r0.ru_stime) + (c1.ru_utime + c1.ru_stime - c0.ru_utime - c0.ru_stime)
    return wall, cpu


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--mb", type=int, default=200)
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    tgz, zp = make(args.mb)
    unpacked = 0
    out = WORK / "out"
    limits = Limits(max_ratio=1e9)

    def fresh() -> Path:
        shutil.rmtree(out, ignore_errors=True)
        out.mkdir(parents=True)
        return out

    runs: dict[str, list[tuple[float, float]]] = {}
    candidates = {
        "tar -xzf (GNU tar + gzip)": lambda: subprocess.run(["tar", "-xzf", str(tgz), "-C", str(fresh())], check=True),
        "hpcstage tar.gz": lambda: extract_into(tgz, fresh(), limits=limits),
        "hpcstage zip": lambda: extract_into(zp, fresh(), limits=limits),
    }
    if shutil.which("unzip"):
        candidates["unzip -q"] = lambda: subprocess.run(["unzip", "-q", str(zp), "-d", str(fresh())], check=True)
    for _ in range(args.rounds):
        for name, fn in candidates.items():
            fresh()
            os.sync()
            runs.setdefault(name, []).append(timed(fn))
            unpacked = sum(p.stat().st_size for p in out.rglob("*") if p.is_file())
    print(f"archive {tgz.name}: {tgz.stat().st_size / 1e6:.0f} MB packed (zip {zp.stat().st_size / 1e6:.0f} MB), "
          f"{unpacked / 1e6:.0f} MB unpacked; best of {args.rounds} (median wall in brackets)")
    base = min(w for w, _ in runs["tar -xzf (GNU tar + gzip)"])
    for name, rs in runs.items():
        best = min(rs)
        med = sorted(w for w, _ in rs)[len(rs) // 2]
        print(f"  {name:28s} {best[0]:6.2f} s [{med:.2f}] {unpacked / best[0] / 1e6:7.0f} MB/s  cpu {best[1]:5.2f} s  "
              f"x{best[0] / base:.2f} of tar")
    shutil.rmtree(out, ignore_errors=True)


if __name__ == "__main__":
    main()
