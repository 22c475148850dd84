"""Batch scripts from Jinja2 templates: how Slurm spells a job, for one cluster.

The bundled templates (``templates/<job type>.sbatch.j2``, all extending ``base.sbatch.j2``) are
looked up after a user folder (``--templates DIR``), so a site replaces one job type, or only the
base, by dropping a file of the same name there. Rendering is strict: a variable a template names
and the launcher does not give is an error, never an empty string in a script.

Values are shell-quoted by the ``sh`` filter; a ``Shell`` value is already shell syntax (it expands
a variable at run time) and is written as is.
"""

from __future__ import annotations

import os
import shlex
from collections.abc import Mapping
from pathlib import Path, PurePath
from typing import Any

import jinja2

from hpcstage.slurm.clusters import Cluster

TEMPLATE_SUFFIX = ".sbatch.j2"


class Shell(str):
    """A string that is shell syntax already (``"${HPCSTAGE_MODEL}"``): the ``sh`` filter keeps it."""


def sh(value: Any) -> str:
    """Quote one word for bash, unless it is ``Shell`` syntax."""
    if isinstance(value, Shell):
        return str(value)
    return shlex.quote(os.fspath(value) if isinstance(value, os.PathLike) else str(value))


def environment(templates: str | os.PathLike[str] | None = None) -> jinja2.Environment:
    """The Jinja2 environment: the user's folder first, then the bundled templates."""
    loaders: list[jinja2.BaseLoader] = []
    if templates is not None:
        folder = Path(templates)
        if not folder.is_dir():
            raise FileNotFoundError(f"templates folder {folder} does not exist")
        loaders.append(jinja2.FileSystemLoader(os.fspath(folder)))
    loaders.append(jinja2.PackageLoader("hpcstage.slurm", "templates"))
    env = jinja2.Environment(
        loader=jinja2.ChoiceLoader(loaders),
        undefined=jinja2.StrictUndefined,
        autoescape=False,
        trim_blocks=True,
        lstrip_blocks=True,
        keep_trailing_newline=True,
    )
    env.filters["sh"] = sh
    env.filters["parent"] = lambda path: str(PurePath(path).parent)
    env.filters["argv"] = lambda words: " ".join(sh(word) for word in words)
    return env


def sbatch_directives(
    cluster: Cluster,
    *,
    name: str,
    nodes: int,
    gpus: int,
    cpus: int,
    time_limit: str,
    output: str,
    array: str | None = None,
    extra: Mapping[str, str] | None = None,
) -> list[str]:
    """The ``#SBATCH`` options of one job on ``cluster`` (without the ``#SBATCH`` prefix)."""
    options = [
        f"--job-name={name}",
        f"--nodes={nodes}",
        "--ntasks-per-node=1",
        f"--cpus-per-task={cpus}",
        f"--time={time_limit}",
        f"--output={output}",
    ]
    if array:
        options.append(f"--array={array}")
    options += cluster.sbatch_options(gpus)
    options += [f"--{key}={value}" for key, value in (extra or {}).items()]
    return options


def render(job_type: str, context: Mapping[str, Any], templates: str | os.PathLike[str] | None = None) -> str:
    """Render ``<job_type>.sbatch.j2`` with ``context``; undefined names raise ``jinja2.UndefinedError``."""
    return environment(templates).get_template(job_type + TEMPLATE_SUFFIX).render(**context)
