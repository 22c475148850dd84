#!/usr/bin/env python3
"""Build the job stacks the tests run prebuild, check and offline jobs in: real virtualenvs with the
datasets / huggingface_hub / transformers versions that training frameworks pin, not hpcstage's own.

    python scripts/job-stacks.py build [NAME...]     # build what is missing (all stacks by default)
    python scripts/job-stacks.py list                # name, state, interpreter, pins
    python scripts/job-stacks.py path NAME           # the stack's interpreter (builds it if missing)

Stacks live outside the repo, in $HPCSTAGE_STACKS_DIR, else /var/cache/hpcstage-stacks when writable, else
~/.cache/hpcstage-stacks, one folder per stack named by a hash of its pinned requirements and the Python
version: a cached stack is reused as long as its pins do not change; a changed pin builds a new folder.
A stack is built in its folder under a lock file, so two test runs never build the same stack at once,
and counts as built only once its record (hpcstage-stack.json, written last, after its imports answered)
is there: a killed build's folder is removed and built again.
No torch in the data stacks: tokenizers and configs load without it (transformers only warns). The
`llamafactory` stack is the training one: CPU torch, llamafactory and lm-eval, whose console scripts
(llamafactory-cli, torchrun, lm_eval) jobs run from its bin/.
"""
from __future__ import annotations

import fcntl
import hashlib
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

FORMAT = 1  # bump to rebuild every stack (a change in how stacks are made, not in what they pin)

# name -> pinned requirements. Each pins the three clients exactly; the rest is what pip resolves for them.
STACKS: dict[str, list[str]] = {
    # llamafactory 0.9.5's range: datasets<=4.0.0, transformers>=4.55,<=5.6 (so huggingface_hub 0.36)
    "ds4.0": ["datasets==4.0.0", "huggingface_hub==0.36.0", "transformers==4.57.6"],
    # an older stack: datasets 2.21 with huggingface_hub 0.24 and the transformers of that summer
    "ds2.21": ["datasets==2.21.0", "huggingface_hub==0.24.7", "transformers==4.44.2",
               "numpy==1.26.4", "pyarrow==17.0.0", "pandas==2.2.3"],
    # the current releases (as of this pin)
    "current": ["datasets==5.2.0", "huggingface_hub==2.4.0", "transformers==5.24.0"],
    # the training stack of the train and eval jobs: llamafactory 0.9.5 with the newest versions its pins
    # allow, on the CPU torch wheel (PyPI's default torch is a CUDA build of several GB); lm-eval for the
    # eval job; deepspeed built without its C++/CUDA ops (DS_BUILD_OPS=0) for the consolidate job
    "llamafactory": ["llamafactory==0.9.5", "torch==2.13.0", "lm-eval==0.4.13", "deepspeed==0.19.8",
                     "datasets==4.0.0", "huggingface_hub==1.33.0", "transformers==5.6.0", "peft==0.18.1",
                     "trl==0.24.0", "accelerate==1.11.0"],
}

# llamafactory 0.9.5 requires torchvision and torchaudio, but PyPI's builds of both link against the CUDA torch
# (several GB), not the CPU wheel. Beside CPU torch 2.13, torchvision fails on import ("operator torchvision::nms
# does not exist") and takes transformers' model imports down with it: it goes (llamafactory does not import it
# for text). torchaudio's C++ libraries fail to load (libc10_cuda.so), yet llamafactory imports torchaudio in every
# run (data/mm_plugin.py): its compiled libraries go, and torchaudio then imports as it does when built without
# its extension (audio inputs would fail; text training never calls it).
REMOVE: dict[str, list[str]] = {"llamafactory": ["torchvision"]}
COMPILED_LIBS_OFF: dict[str, list[str]] = {"llamafactory": ["torchaudio"]}
BUILD_ENV: dict[str, dict[str, str]] = {"llamafactory": {"DS_BUILD_OPS": "0"}}  # deepspeed: no compiled ops

PROBE = ("import json, datasets, huggingface_hub, transformers; print(json.dumps({m.__name__: m.__version__ "
         "for m in (datasets, huggingface_hub, transformers)}))")
# the training stack must also import what its jobs run (llamafactory imports torchaudio on every run)
PROBES = {"llamafactory": "import torch, torchaudio, transformers.models.llama, llamafactory.train.tuner, lm_eval, "
                          "deepspeed"}


def stacks_dir() -> Path:
    if os.environ.get("HPCSTAGE_STACKS_DIR"):
        return Path(os.environ["HPCSTAGE_STACKS_DIR"])
    system = Path("/var/cache/hpcstage-stacks")
    try:
        system.mkdir(parents=True, exist_ok=True)
        if os.access(system, os.W_OK):
            return system
    except OSError:
        pass
    return Path.home() / ".cache" / "hpcstage-stacks"


def stack_key(name: str) -> str:
    text = json.dumps({"format": FORMAT, "python": list(sys.version_info[:2]), "pins": sorted(STACKS[name])})
    return hashlib.sha256(text.encode()).hexdigest()[:12]


def stack_folder(name: str) -> Path:
    return stacks_dir() / f"{name}-{stack_key(name)}"


def python_of(name: str) -> Path:
    return stack_folder(name) / "bin" / "python"


def info(name: str) -> dict | None:
    """The stack's record (versions, build seconds) if it is built, else None."""
    try:
        return json.loads((stack_folder(name) / "hpcstage-stack.json").read_text())
    except (OSError, ValueError):
        return None


def build(name: str, log=print) -> dict:
    """Build the stack unless it is there; returns its record (with `cached`: whether it was)."""
    if name not in STACKS:
        raise SystemExit(f"job-stacks: unknown stack {name!r}; known: {', '.join(STACKS)}")
    folder = stack_folder(name)
    folder.parent.mkdir(parents=True, exist_ok=True)
    with open(folder.parent / f".{folder.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # local disk: flock is fine here
        record = info(name)
        if record is not None:
            return {**record, "cached": True}
        started = time.monotonic()
        # Built where it will live: pip writes the folder into the console scripts' shebangs, and jobs run
        # those (llamafactory-cli, torchrun, lm_eval). The record is written last: a folder without it is a
        # killed build, removed and built again.
        shutil.rmtree(folder, ignore_errors=True)
        log(f"job-stacks: building {name} ({' '.join(STACKS[name])}) in {folder}")
        subprocess.run([sys.executable, "-m", "venv", str(folder)], check=True)
        py = folder / "bin" / "python"
        pip = [str(py), "-m", "pip", "--disable-pip-version-check"]
        subprocess.run(pip + ["install", "-q", *STACKS[name]], check=True, env={**os.environ, **BUILD_ENV.get(name, {})})
        if REMOVE.get(name):
            subprocess.run(pip + ["uninstall", "-q", "-y", *REMOVE[name]], check=True)
        for package in COMPILED_LIBS_OFF.get(name, []):
            where = subprocess.run([str(py), "-c", f"import importlib.util; print(importlib.util.find_spec("
                                    f"{package!r}).submodule_search_locations[0])"],
                                   check=True, capture_output=True, text=True).stdout.strip()
            for lib in Path(where, "lib").glob("*.so"):
                lib.unlink()
        if name in PROBES:
            subprocess.run([str(py), "-c", PROBES[name]], check=True)
        out = subprocess.run([str(py), "-c", PROBE], check=True, capture_output=True, text=True).stdout
        versions = json.loads(out.strip().splitlines()[-1])
        record = {"name": name, "pins": STACKS[name], "versions": versions, "key": stack_key(name),
                  "python": f"{sys.version_info[0]}.{sys.version_info[1]}",
                  "build_seconds": round(time.monotonic() - started, 1), "built_at": time.time(),
                  "disk_bytes": sum(f.stat().st_size for f in folder.rglob("*") if f.is_file() and not f.is_symlink())}
        (folder / ".hpcstage-stack.json.tmp").write_text(json.dumps(record, indent=1))
        os.rename(folder / ".hpcstage-stack.json.tmp", folder / "hpcstage-stack.json")
        log(f"job-stacks: built {name} in {record['build_seconds']:.0f}s, {record['disk_bytes'] / 2**30:.1f} GiB: "
            f"{versions}")
        return {**record, "cached": False}


def main(argv: list[str]) -> int:
    cmd, names = (argv[0], argv[1:]) if argv else ("build", [])
    names = names or list(STACKS)
    unknown = [n for n in names if n not in STACKS]
    if unknown:
        print(f"job-stacks: unknown stack {unknown[0]!r}; known: {', '.join(STACKS)}", file=sys.stderr)
        return 2
    if cmd == "build":
        started = time.monotonic()
        for n in names:
            r = build(n)
            print(f"{n}\t{'cached' if r['cached'] else 'built'}\t{python_of(n)}\t{json.dumps(r['versions'])}")
        print(f"job-stacks: {len(names)} stacks ready in {time.monotonic() - started:.1f}s")
        return 0
    if cmd == "list":
        for n in names:
            r = info(n)
            print(f"{n}\t{'built' if r else 'missing'}\t{python_of(n)}\t{' '.join(STACKS[n])}")
        return 0
    if cmd == "path" and len(names) == 1:
        build(names[0], log=lambda s: print(s, file=sys.stderr))
        print(python_of(names[0]))
        return 0
    print("usage: job-stacks.py build [NAME...] | list [NAME...] | path NAME", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
