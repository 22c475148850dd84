"""Which datasets lm_eval tasks load, asked of lm_eval's own task registry in the llamafactory job stack
(lm_eval 0.4.13): task names, groups, task YAML files; refusals for what hpcstage cannot stage. Offline and
without building any task: nothing here can reach a Hub."""

from __future__ import annotations

from pathlib import Path

import pytest

from helpers import job_stack
from hpcstage import evaltasks
from hpcstage.errors import BadInput

EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "lm_eval" / "tiny_boolq.yaml"


@pytest.fixture(scope="module")
def python():
    return job_stack("llamafactory")["python"]


@pytest.mark.timeout(1800)
def test_names_groups_and_yaml_files_resolve_to_the_datasets_their_tasks_load(python, tmp_path):
    local = tmp_path / "local.yaml"  # a task on a local json file: read from disk, nothing to stage
    local.write_text(f"task: local_json\ndataset_path: json\ndataset_kwargs:\n  data_files: {tmp_path}/d.json\n"
                     "output_type: multiple_choice\ntest_split: train\ndoc_to_text: q\ndoc_to_target: 0\n"
                     "doc_to_choice: ['a', 'b']\n")
    found = evaltasks.resolve([str(EXAMPLE), "ai2_arc", "boolq", str(local)], python)
    by_repo = {d.repo: d for d in found}
    assert sorted(by_repo) == ["allenai/ai2_arc", "aps/super_glue", "demo-org/tiny-boolq"]
    tiny = by_repo["demo-org/tiny-boolq"]
    assert (tiny.revision, tiny.loads, tiny.tasks, tiny.splits) == ("main", [{}], ["tiny_boolq"],
                                                                  ["train", "validation"])
    arc = by_repo["allenai/ai2_arc"]  # a group: one repo, a load per config
    assert sorted(map(str, arc.loads)) == ["{'name': 'ARC-Challenge'}", "{'name': 'ARC-Easy'}"]
    assert sorted(arc.tasks) == ["arc_challenge", "arc_easy"]
    assert by_repo["aps/super_glue"].loads == [{"name": "boolq"}]


@pytest.mark.timeout(1800)
@pytest.mark.parametrize("case", ["custom", "not_a_repo"])
def test_a_task_whose_data_hpcstage_cannot_stage_is_refused_naming_it(python, tmp_path, case):
    yaml = tmp_path / f"{case}.yaml"
    body = "output_type: multiple_choice\ntest_split: test\ndoc_to_text: q\ndoc_to_target: 0\ndoc_to_choice: ['a']\n"
    if case == "custom":
        (tmp_path / "made.py").write_text("def make(**kwargs):\n    raise RuntimeError('never called')\n")
        yaml.write_text("task: made_in_python\ncustom_dataset: !function made.make\n" + body)
        expected = "task made_in_python builds its dataset in Python (custom_dataset), which hpcstage cannot stage"
    else:
        yaml.write_text("task: bad_path\ndataset_path: ../not/a/repo\n" + body)
        expected = "task bad_path loads dataset_path '../not/a/repo' (revision main), which is neither a Hub dataset"
    with pytest.raises(BadInput) as e:
        evaltasks.resolve([str(yaml)], python)
    assert str(e.value).startswith(f"--eval-tasks {yaml}: {expected}"), str(e.value)
