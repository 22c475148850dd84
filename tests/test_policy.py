"""The name rules every path, repo type and allowlist from outside passes (pure functions, no network)."""
from __future__ import annotations

import pytest

from hpcstage import policy
from hpcstage.errors import PolicyError


@pytest.mark.parametrize("path", ["", "/etc/passwd", "../x", "a/../../x", "a/./b", "a//b", "a/", ".", "..",
                                  "a\\b", "nul\x00byte", "x/\x00"])
def test_a_path_that_could_leave_its_folder_is_refused(path):
    with pytest.raises(PolicyError, match="must be a relative path that stays inside its folder"):
        policy.check_relative_path(path, "member")


@pytest.mark.parametrize("path", ["a", "a/b.json", "data/train-00000-of-00001.parquet", ".gitattributes", "a..b"])
def test_a_plain_relative_path_passes(path):
    assert policy.check_relative_path(path) == path


def test_only_model_and_dataset_repos():
    assert [policy.check_repo_type(t) for t in ("model", "dataset")] == ["model", "dataset"]
    for bad in ("space", "models", ""):
        with pytest.raises(PolicyError, match="invalid repo type"):
            policy.check_repo_type(bad)


def test_an_empty_allowlist_allows_nothing_and_says_so(monkeypatch):
    monkeypatch.setenv(policy.POLICY_ENV, "")
    monkeypatch.setattr(policy, "SITE_POLICY", policy.Path("/nonexistent/hpcstage-policy.yaml"))
    with pytest.raises(PolicyError, match=r"\(empty\)"):
        policy.Allowlist([]).check("org/name")
    policy.Allowlist(None).check("org/name")  # absent: everything
    with pytest.raises(PolicyError, match=r"\(org/\*\)"):
        policy.Allowlist(["org/*"]).check("other/name")
