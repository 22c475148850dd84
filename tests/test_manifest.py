"""Manifest and policy errors: each names file:line (or the value) and the fix."""
from __future__ import annotations

import pytest

from hpcstage import policy
from hpcstage.errors import ManifestError, PolicyError
from hpcstage.manifest import load_manifest


def load(tmp_path, text):
    path = tmp_path / "hpcstage.yaml"
    path.write_text(text)
    return path, lambda: load_manifest(path)


@pytest.mark.parametrize(
    "text, line, words",
    [
        ("models:\n  - repo: org/a\n    revison: main\n", 3, ["unknown key 'revison'", "did you mean 'revision'"]),
        ("cache_dir: /x\nmodles: []\n", 2, ["unknown key 'modles'", "did you mean 'models'"]),
        ("models:\n  - repo: org/a\n  - repo: 'bad id'\n", 3, ["invalid repo id"]),
        ("models:\n  - revision: main\n", 2, ["models[0].repo is required"]),
        ("models:\n  - repo: org/a\n    revision: 'a..b'\n", 3, ["invalid revision"]),
        ("models:\n  - repo: org/a\n    include: [x\n", 4, ["not valid YAML"]),
        ("datasets:\n  - url: http://example.org/x.tar\n    dest: x\n", 2, ["http:// is not encrypted", "allow_http"]),
        ("datasets:\n  - url: https://example.org/x.tar\n", 2, ["datasets[0].dest is required"]),
        ("datasets:\n  - local: /x\n    dest: ../up\n", 3, ["refused dest '../up'"]),
        ("datasets:\n  - url: https://e.org/x\n    dest: x\n    extrct: true\n", 4, ["did you mean 'extract'"]),
        ("datasets:\n  - repo: org/d\n    file: a.zip\n    dest: x\n    expect: {files: [/etc/passwd]}\n", 5,
         ["refused expect path"]),
        ("models:\n  - repo: org/a\n    load: {split: train}\n", 3, ["`load:` is for datasets"]),
    ],
)
def test_manifest_errors_name_file_line_and_fix(tmp_path, text, line, words):
    path, go = load(tmp_path, text)
    with pytest.raises(ManifestError) as err:
        go()
    msg = str(err.value)
    assert msg.startswith(f"{path}:{line}:"), msg
    for w in words:
        assert w in msg


def test_manifest_entries_defaults_and_relative_cache_dir(tmp_path):
    path, go = load(tmp_path, "cache_dir: hub\nmodels:\n  - repo: org/m\ndatasets:\n  - repo: org/d\n    revision: v1\n")
    m = go()
    assert m.cache_dir == tmp_path / "hub"
    assert [(e.repo_type, e.repo, e.revision) for e in m.entries] == [("model", "org/m", "main"), ("dataset", "org/d", "v1")]
    assert m.lock_path == tmp_path / "hpcstage.lock"


def test_duplicate_entry_is_refused(tmp_path):
    _, go = load(tmp_path, "models:\n  - repo: org/m\n  - repo: org/m\n")
    with pytest.raises(ManifestError, match="listed twice"):
        go()


@pytest.mark.parametrize("path", ["../x", "/etc/passwd", "a/../../x", "a//b", "", "a\\b", "./a"])
def test_paths_from_outside_must_stay_inside(path):
    with pytest.raises(PolicyError):
        policy.check_relative_path(path)


def test_allowlist_globs():
    allow = policy.Allowlist(["Qwen/*", "org/exact"])
    allow.check("Qwen/Qwen2.5-7B")
    allow.check("org/exact")
    with pytest.raises(PolicyError, match="allowlist"):
        allow.check("org/other")
    policy.Allowlist(None).check("anything/goes")
