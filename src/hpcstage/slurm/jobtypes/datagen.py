"""``--job-type datagen``: a Python script generating data, one job or an array over chunks of task folders,
optionally uploading each chunk's output to its own dataset repo."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from hpcstage import policy, safefs
from hpcstage.errors import BadInput
from hpcstage.slurm import environment
from hpcstage.slurm.jobtypes.base import PYTHON, Job, Site, at_least, existing_file, split_words

if TYPE_CHECKING:
    from hpcstage.slurm.request import Preflight


@dataclass(frozen=True)
class Options:
    datagen_script: Path | None = None
    datagen_extra_args: str | None = None
    datagen_engine: str | None = None
    trace_input_path: Path | None = None
    chunk_size: int | None = None
    max_parallel: int | None = None
    datagen_target_repo: str | None = None  # dataset repo the job uploads its output folder to (-chunk-<i>)

    def __post_init__(self) -> None:
        at_least("--chunk-size", self.chunk_size, 1)
        at_least("--max-parallel", self.max_parallel, 1)


def preflight(options: Options, at: Preflight) -> None:
    """--datagen-target-repo needs compute nodes with internet and a token in the secrets file."""
    repo = options.datagen_target_repo
    if not repo:
        return
    try:
        policy.check_repo_id(repo)
    except BadInput as e:
        raise BadInput(f"--datagen-target-repo: {e}") from None
    if at.offline:
        why = "--offline was given" if at.offline_given else f"{at.cluster.name}'s compute nodes have no internet"
        raise BadInput(
            f"--datagen-target-repo: {why}, so the job cannot upload; launch on a cluster with internet, "
            f"or upload the experiment's output/ folder from the login node afterwards "
            f"(`hf upload --repo-type dataset {repo} EXPERIMENT/output`)"
        )
    if not at.secrets or not set(at.secret_names) & set(environment.TOKEN_VARIABLES):
        where = f"{at.secrets} names no HF_TOKEN" if at.secrets else "no secrets file is set"
        raise BadInput(
            f"--datagen-target-repo: the job uploads with HF_TOKEN from your secrets file, and {where}; "
            f"add a line HF_TOKEN=hf_... to a private file (chmod 600) named by ${environment.SECRETS_ENV} "
            "or by secrets_file in ~/.config/hpcstage/clusters.toml"
        )


def jobs(options: Options, site: Site) -> list[Job]:
    script = existing_file(options.datagen_script, "--datagen-script")
    argv = [PYTHON, str(script)]
    argv += ["--engine", options.datagen_engine] if options.datagen_engine else []
    argv += split_words(options.datagen_extra_args)
    context: dict[str, Any] = {"datagen_argv": argv, "chunk_map": None, "target_repo": options.datagen_target_repo}
    array = None
    if (options.trace_input_path is None) != (options.chunk_size is None):
        raise BadInput("--trace-input-path and --chunk-size go together")
    if options.trace_input_path is not None:
        array, context["chunk_map"] = _chunk_map(options, site.exp)
    return [
        Job(
            "datagen",
            f"datagen: {script.name}",
            site.request.num_nodes,
            **site.resources(site.node_gpus(), time_limit=site.request.time_limit),
            context=context,
            array=array,
            imports=("huggingface_hub",) if options.datagen_target_repo else (),
        )
    ]


def _chunk_map(options: Options, exp: Path) -> tuple[str, str]:
    """Split the task folders into chunks listed in chunk_map.json (folders are never copied or moved)."""
    assert options.trace_input_path is not None and options.chunk_size is not None  # checked by the caller
    root = Path(options.trace_input_path).expanduser().resolve()
    if not root.is_dir():
        raise BadInput(f"--trace-input-path {root}: no such folder")
    folders = sorted(str(p) for p in root.iterdir() if p.is_dir())
    if not folders:
        raise BadInput(f"--trace-input-path {root} has no task folders")
    size = options.chunk_size
    chunks = [folders[i : i + size] for i in range(0, len(folders), size)]
    path = exp / "chunk_map.json"
    record = {"input": str(root), "chunk_size": size, "tasks": len(folders), "chunks": chunks}
    safefs.write_atomic(exp, path, (json.dumps(record, indent=1) + "\n").encode())
    array = f"0-{len(chunks) - 1}"
    if options.max_parallel is not None:
        array += f"%{options.max_parallel}"
    return array, str(path)
