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


def test_the_fix_names_who_can_change_the_allowlist(tmp_path, monkeypatch):
    site = tmp_path / "policy.yaml"
    site.write_text("allow: ['org/*']\n")
    monkeypatch.setenv(policy.POLICY_ENV, str(site))
    with pytest.raises(PolicyError, match=r"add a matching pattern to `allow:` or remove the entry"):
        policy.Allowlist(["mine/*"]).check("other/name")  # the manifest's list: the user can edit it
    with pytest.raises(PolicyError, match=r"ask the site's admins to allow it"):
        policy.Allowlist(["other/*"]).check("other/name")  # passes the manifest, not the site


def test_an_empty_site_policy_allows_everything_and_an_odd_one_is_refused(tmp_path, monkeypatch):
    site = tmp_path / "policy.yaml"
    monkeypatch.setenv(policy.POLICY_ENV, str(site))
    for empty in ("", "{}\n", "allow:\n"):
        site.write_text(empty)
        policy.Allowlist(None).check("any/name")
    site.write_text("deny: ['x/*']\n")
    with pytest.raises(PolicyError, match="must be a mapping with the one key"):
        policy.Allowlist(None)


def test_an_invalid_repo_id_names_the_rule_it_breaks():
    with pytest.raises(PolicyError) as err:
        policy.check_repo_id("a/b/c")
    assert str(err.value).startswith("invalid repo id 'a/b/c': ") and "\n" not in str(err.value)
    assert len(str(err.value)) > len("invalid repo id 'a/b/c': ") + 10
