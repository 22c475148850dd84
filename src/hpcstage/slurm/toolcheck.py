"""Whether the jobs' environment has what they run, asked on the login node before submitting rather than found
a day later in the queue: programs in the interpreter's folder or on PATH, modules its interpreter imports."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

from hpcstage.slurm.jobtypes.base import Job

_FIND_MODULES = (
    "import importlib.util, sys\nprint(' '.join(m for m in sys.argv[1:] if importlib.util.find_spec(m) is None))"
)
_FIND_TOOLS = "import shutil, sys\nprint(' '.join(t for t in sys.argv[1:] if shutil.which(t) is None))"


def _missing(python: str, code: str, names: tuple[str, ...]) -> tuple[list[str], str]:
    """(the names `code` run by `python` reports missing, else all of them; the child's last error line)."""
    try:
        r = subprocess.run([python, "-c", code, *names], capture_output=True, text=True, timeout=120)
    except (OSError, subprocess.TimeoutExpired) as e:
        return list(names), str(e)
    if r.returncode == 0:
        return r.stdout.split(), ""
    return list(names), (r.stderr.strip().splitlines() or [f"exit status {r.returncode}"])[-1]


def missing_tools(jobs: list[Job], python: str) -> list[str]:
    """What the jobs run that their environment lacks, checked here before submitting rather than found a day
    later in the queue: programs in the interpreter's folder (the job script puts it first on PATH) or on
    PATH, modules importable by that interpreter. A job with an activation is asked through its interpreter
    shim (module loads and activation first), which sees the PATH the job will see."""
    folder = Path(python).parent
    path = os.pathsep.join([str(folder), os.environ.get("PATH", "")])
    problems = []
    for job in jobs:
        if job.shim:
            absent, error = _missing(str(job.shim), _FIND_TOOLS, job.tools or ("true",))
            if error:  # the activation itself fails here: say so rather than blame each tool
                problems.append(f"the {job.key} job's activation ({job.env.activate_from}) fails on this node: {error}")
                continue
            where = "is not on the PATH of its activated environment"
        else:
            absent = [tool for tool in job.tools if shutil.which(tool, path=path) is None]
            where = f"is neither in {folder} nor on PATH"
        problems += [f"the {job.key} job runs `{tool}`, which {where}" for tool in absent]
        runner = str(job.shim) if job.shim else python
        shown = f"{job.python or 'python'} (after its activation)" if job.shim else python
        if job.modules:
            problems += [
                f"the {job.key} job runs `{shown} -m {m}`, which that interpreter cannot import"
                for m in _missing(runner, _FIND_MODULES, job.modules)[0]
            ]
        if job.imports:
            problems += [
                f"the {job.key} job imports {m} in `{shown}`, which cannot import it"
                for m in _missing(runner, _FIND_MODULES, job.imports)[0]
            ]
    return problems
