"""``--job-type train``: llama-factory on N nodes from a YAML config (copied into the experiment), and with
--eval-tasks an eval job chained after it on its own resources."""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hpcstage import policy
from hpcstage.errors import BadInput
from hpcstage.slurm.artifacts import is_local
from hpcstage.slurm.jobtypes import eval as evaluation
from hpcstage.slurm.jobtypes.base import Job, Site, existing_file, split_words
from hpcstage.slurm.render import Shell
from hpcstage.yamlfile import read_yaml

DEFAULT_TRAIN_COMMAND = ("llamafactory-cli", "train")  # multi-node through FORCE_TORCHRUN/NNODES/NODE_RANK
MASTER_PORT = 29500
CHAINS = ("eval",)  # its --eval-* options are the chained eval job's
# llama-factory keys naming files or folders: relative ones are resolved against the config's folder.
CONFIG_PATH_KEYS = (
    "model_name_or_path",
    "adapter_name_or_path",
    "dataset_dir",
    "deepspeed",
    "tokenized_path",
    "media_dir",
    "output_dir",
)


@dataclass(frozen=True)
class Options(evaluation.Options):
    train_config: Path | None = None
    train_command: str | None = None  # default: llamafactory-cli train
    train_extra_args: str | None = None


offline_artifacts = evaluation.offline_artifacts  # the chained eval's task data


def read_config(options: Options) -> tuple[Path, dict[str, Any]]:
    """The llama-factory config: (path, mapping)."""
    source = existing_file(options.train_config, "--train-config")
    config = read_yaml(source, "--train-config", BadInput, "pass a llama-factory YAML config")[0] or {}
    if not isinstance(config, dict):
        raise BadInput(f"--train-config {source}: a llama-factory config is a YAML mapping")
    return source, config


def model(options: Options) -> str | None:
    """The Hub repo id the config's model_name_or_path names (staged like --model), or None."""
    return _config_repo(*read_config(options))


def _config_repo(source: Path, config: dict[str, Any]) -> str | None:
    value = config.get("model_name_or_path")
    if not isinstance(value, str) or is_local(value) or (source.parent / value).exists():
        return None
    try:
        policy.check_repo_id(value)
    except BadInput:
        return None
    return value


def jobs(options: Options, site: Site) -> list[Job]:
    request, exp = site.request, site.exp
    source, config = read_config(options)
    shutil.copyfile(source, exp / "train_config.yaml")  # the job reads the copy: later edits don't leak in
    paths = _config_overrides(source, config, site.warnings)
    if not config.get("output_dir"):
        paths["output_dir"] = str(exp / "checkpoints")
    output_dir = paths.get("output_dir", config.get("output_dir"))
    overrides: list[Any] = [
        f"{key}={value}" for key, value in paths.items() if not (key == "model_name_or_path" and request.model)
    ]
    if request.model or _config_repo(source, config):
        overrides.insert(0, Shell('"model_name_or_path=$HPCSTAGE_MODEL"'))
    if request.max_restarts and config.get("overwrite_output_dir") is True:
        site.warnings.append(
            f"--max-restarts {request.max_restarts} with overwrite_output_dir: true in "
            f"{source.name}: each restart trains from scratch; drop overwrite_output_dir (llama-factory "
            "then resumes from the last checkpoint in output_dir) or set resume_from_checkpoint"
        )
    argv = [
        *(split_words(options.train_command) or DEFAULT_TRAIN_COMMAND),
        str(exp / "train_config.yaml"),
        *overrides,
        *split_words(options.train_extra_args),
    ]
    nodes = request.num_nodes
    out = [
        Job(
            "train",
            f"train: {source.name} on {nodes} node(s)",
            nodes,
            **site.resources(site.node_gpus(), time_limit=request.time_limit),
            context={"train_argv": argv, "master_port": MASTER_PORT},
            tools=() if options.train_command else DEFAULT_TRAIN_COMMAND[:1],
        )
    ]
    if options.eval_tasks:
        out.append(evaluation.eval_job(options, site, output_dir, "train", 1))
    return out


def _config_overrides(source: Path, config: dict[str, Any], warnings: list[str]) -> dict[str, str]:
    """key -> absolute path for the config's relative paths (its folder first, then the launch folder)."""
    out = {}
    for key in CONFIG_PATH_KEYS:
        value = config.get(key)
        if not isinstance(value, str) or not value or Path(value).expanduser().is_absolute():
            continue
        if (
            key in ("model_name_or_path", "adapter_name_or_path")
            and not is_local(value)
            and not (source.parent / value).exists()
        ):
            continue  # a Hub repo id
        here, there = source.parent / value, Path.cwd() / value
        if key == "output_dir" or here.exists():
            out[key] = str(here.resolve())
        elif there.exists():
            out[key] = str(there.resolve())
        else:
            warnings.append(
                f"--train-config {source.name}: {key}: {value} exists neither beside the config "
                f"({source.parent}) nor here ({Path.cwd()}); the job will look for it in {Path.cwd()}"
            )
    return out
