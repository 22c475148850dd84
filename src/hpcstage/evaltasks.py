"""The datasets an lm_eval run loads, found by lm_eval's own task registry in the job's interpreter.

lm_eval fetches each task's dataset when it builds the task (``ConfigurableTask.download`` calls
``datasets.load_dataset(dataset_path, dataset_name, **dataset_kwargs)``), so on a cluster whose nodes are
offline those datasets must be staged and prebuilt before the eval job starts. Which datasets a task
name means (groups and tags expand to many tasks, task YAMLs include others, a path names a YAML file)
only lm_eval knows, in the version the job has: a child of the job's interpreter builds the tasks through
``TaskManager`` with the task constructor replaced by a record of its configuration, so nothing is
fetched and no task definition is parsed here. The child runs with the Hub switched off.
"""

from __future__ import annotations

import json
import os
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

from hpcstage import policy
from hpcstage.errors import BadInput

# Runs in the job's interpreter: one JSON line per task spec, {"spec", "tasks": [...]} or {"spec", "error"}.
_CHILD = r"""
import json, os, sys
from datasets.packaged_modules import _PACKAGED_DATASETS_MODULES
from lm_eval.api import task as task_module
from lm_eval.tasks import TaskManager

FIELDS = task_module.TaskConfig.__dataclass_fields__
found = []

def record(self, data_dir=None, cache_dir=None, download_mode=None, config=None):
    # instead of building the task (and downloading its data): keep what download() would load
    cfg = {**(vars(self.CONFIG) if self.CONFIG is not None else {}), **(config or {})}
    c = task_module.TaskConfig(**{k: v for k, v in cfg.items() if k in FIELDS})
    self._config = c
    path = c.dataset_path
    found.append({"task": str(c.task), "path": path, "name": c.dataset_name,
                  "kwargs": {k: v for k, v in (c.dataset_kwargs or {}).items() if k != "trust_remote_code"},
                  "splits": sorted({s for s in (c.training_split, c.validation_split, c.test_split,
                                                c.fewshot_split) if isinstance(s, str)}),
                  "custom": c.custom_dataset is not None,
                  "local": isinstance(path, str) and (path in _PACKAGED_DATASETS_MODULES or os.path.exists(path))})

task_module.ConfigurableTask.__init__ = record
manager = TaskManager()
for spec in sys.argv[1:]:
    before = len(found)
    try:
        manager.load([spec])
        out = {"spec": spec, "tasks": found[before:]}
    except Exception as e:
        out = {"spec": spec, "error": (str(e).strip().splitlines() or [type(e).__name__])[0]}
    print(json.dumps(out, default=str), flush=True)
"""


@dataclass
class TaskData:
    """One Hub dataset lm_eval's tasks load: the repo at a revision and each load_dataset call on it."""

    repo: str
    revision: str = "main"
    loads: list[dict] = field(default_factory=list)  # load_dataset kwargs besides the repo (name, ...)
    tasks: list[str] = field(default_factory=list)  # the tasks that load it
    splits: list[str] = field(default_factory=list)  # the splits those tasks read


def resolve(specs: list[str], python: str, timeout: float = 600) -> list[TaskData]:
    """The Hub datasets the lm_eval task specs (names, groups, tags, YAML paths) load, in the job's
    interpreter ``python``; an unknown task or one whose data cannot be named is BadInput."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    try:
        r = subprocess.run([python, "-c", _CHILD, *specs], capture_output=True, text=True, env=env, timeout=timeout)
    except (OSError, subprocess.TimeoutExpired) as e:
        raise BadInput(f"--eval-tasks: cannot ask lm_eval in {python} which datasets the tasks load: {e}") from None
    answers = {}
    for line in r.stdout.splitlines():
        try:
            answer = json.loads(line)
        except ValueError:
            continue  # a library's chatter on stdout
        if isinstance(answer, dict) and "spec" in answer:
            answers[answer["spec"]] = answer
    out: dict[tuple[str, str], TaskData] = {}
    for spec in specs:
        answer = answers.get(spec)
        if answer is None:
            last = (r.stderr.strip().splitlines() or ["no answer"])[-1]
            raise BadInput(f"--eval-tasks: lm_eval in {python} could not list the tasks' datasets: {last}")
        if "error" in answer:
            raise BadInput(
                f"--eval-tasks {spec}: lm_eval does not know it ({answer['error']}); "
                f"`{python} -m lm_eval ls tasks` lists the known tasks, or pass a task YAML's path"
            )
        if not answer["tasks"]:
            raise BadInput(f"--eval-tasks {spec}: lm_eval builds no task from it; name a task, group or YAML file")
        for task in answer["tasks"]:
            _add(out, spec, task)
    return list(out.values())


def _add(out: dict[tuple[str, str], TaskData], spec: str, task: dict) -> None:
    where = f"--eval-tasks {spec}: task {task['task']}"
    if task["custom"]:
        raise BadInput(
            f"{where} builds its dataset in Python (custom_dataset), which hpcstage cannot stage; "
            "stage its data yourself and launch with --eval-command"
        )
    if task["local"]:
        return  # a packaged builder or a local folder: read from the file system, nothing to stage
    path, kwargs = task["path"], dict(task["kwargs"])
    revision = str(kwargs.pop("revision", None) or "main")
    try:
        policy.check_repo_id(path if isinstance(path, str) else "")
        policy.check_revision(revision)
    except BadInput:
        raise BadInput(
            f"{where} loads dataset_path {path!r} (revision {revision}), which is neither a Hub dataset "
            "nor a local path; fix its YAML"
        ) from None
    load = ({"name": task["name"]} if task["name"] else {}) | kwargs
    data = out.setdefault((path, revision), TaskData(path, revision))
    if load not in data.loads:
        data.loads.append(load)
    data.tasks += [task["task"]] if task["task"] not in data.tasks else []
    data.splits = sorted(set(data.splits) | set(task["splits"]))


def task_spec(spec: str) -> str:
    """A task spec as the eval job gets it: a YAML file's path made absolute (the job may start elsewhere)."""
    path = Path(spec).expanduser()
    return str(path.resolve()) if spec.endswith((".yaml", ".yml")) and path.is_file() else spec
