"""layout.py owns every on-disk name: they must be the names huggingface_hub and earlier runs use, and the
resume record one module writes must be the one status reads."""

from __future__ import annotations

import pytest
from huggingface_hub.file_download import repo_folder_name as hf_repo_folder_name

from hpcstage import layout, safefs
from hpcstage.hfcache import RepoCache
from hpcstage.transfer import PIECE
from hpcstage.transfer.ranged import _Pieces


@pytest.mark.parametrize("repo_type,repo_id", [("model", "demo-org/tiny-model"), ("dataset", "a-b/c_d.e")])
def test_repo_folder_names_are_huggingface_hubs_and_read_back(tmp_path, repo_type, repo_id):
    name = layout.repo_folder_name(repo_type, repo_id)
    assert name == hf_repo_folder_name(repo_id=repo_id, repo_type=repo_type)
    assert RepoCache(tmp_path, repo_type, repo_id).root == tmp_path / name
    assert layout.repo_of_folder(name) == (repo_type, repo_id)
    assert layout.repo_of_folder("spaces--a--b") is None and layout.repo_of_folder(".locks") is None
    record = layout.ledger_name(repo_type, "org/name", "refs/pr/1")
    assert record == f"{repo_type}s--org--name@refs%2Fpr%2F1.json"
    assert layout.artifact_of_ledger_name(record) == (repo_type, "org/name", "refs/pr/1")


def test_the_resume_record_transfer_writes_is_the_one_status_and_cleanup_read(tmp_path):
    size = 3 * PIECE + 5
    partial = tmp_path / f"{'a' * 64}{layout.PARTIAL_SUFFIX}"
    partial.write_bytes(b"")
    pieces = _Pieces(safefs.opendir(tmp_path), layout.ranges_record(partial.name), size)
    for i in (0, 3):
        pieces.add(i)
    pieces.save()
    record = tmp_path / f"{'a' * 64}.hpcstage-partial.ranges"  # the name earlier runs left on disk
    assert record.is_file() and layout.pieces_done(record) == 2
    assert layout.partial_progress(partial) == (PIECE + 5, size)
    assert RepoCache.partial_guard(partial) == tmp_path / f"{'a' * 64}.hpcstage-lease"
