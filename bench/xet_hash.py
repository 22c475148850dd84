"""What the Xet hash check costs per GiB (xetstore.py publishes content only after it), next to the sha256 check
every LFS file gets anyway, measured in the same run on the same file.

    .venv/bin/python bench/xet_hash.py                # 1 GiB, 3 rounds
    .venv/bin/python bench/xet_hash.py --size-mb 256 --rounds 1

The file (random bytes) is written under bench/work/ once and read once before timing, so both hashes read
from the page cache: the numbers are CPU cost, the part a fast parallel filesystem does not hide.
"""
from __future__ import annotations

import argparse
import os
import statistics
import time
from pathlib import Path

import hf_xet

from hpcstage.hfcache import digest_file

WORK = Path(__file__).resolve().parent / "work"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size-mb", type=int, default=1024)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    size = args.size_mb << 20
    path = WORK / f"xet-{args.size_mb}m.bin"
    if not path.exists() or path.stat().st_size != size:
        WORK.mkdir(exist_ok=True)
        with open(path, "wb") as f:
            for start in range(0, size, 64 << 20):
                f.write(os.urandom(min(64 << 20, size - start)))
    digest_file(path)  # into the page cache
    gib = size / 2**30
    for name, run in (("sha256 (hashlib)", lambda: digest_file(path)),
                      ("xet hash (hf_xet.hash_files)", lambda: hf_xet.hash_files([str(path)])[0].hash)):
        times = []
        for _ in range(args.rounds):
            started, cpu = time.perf_counter(), time.process_time()
            run()
            times.append((time.perf_counter() - started, time.process_time() - cpu))
        wall = statistics.median(t for t, _ in times)
        cpu = statistics.median(c for _, c in times)
        print(f"{name:30s} {wall / gib:6.2f} s/GiB wall, {cpu / gib:6.2f} s/GiB CPU "
              f"(median of {args.rounds}, {args.size_mb} MiB, {os.cpu_count()} cores)")


if __name__ == "__main__":
    main()
