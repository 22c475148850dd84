"""Bad input found in review: each is one line naming the thing and the fix, exit 2, no traceback, and
nothing written."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest


def hpcstage(*argv: str, cwd: Path, env: dict | None = None) -> subprocess.CompletedProcess:
    import os

    full = {**os.environ, "HF_HOME": str(cwd / "hf-home"), **(env or {})}
    return subprocess.run([sys.executable, "-m", "hpcstage", *argv], cwd=cwd, env=full, capture_output=True,
                          text=True, timeout=60)


def one_line_bad_input(r: subprocess.CompletedProcess, *words: str) -> None:
    assert r.returncode == 2, r.stdout + r.stderr
    assert "Traceback" not in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr
    for w in words:
        assert w in r.stderr, r.stderr


def test_manifest_that_is_not_utf8(tmp_path):
    (tmp_path / "m.yaml").write_bytes(b"\xff\xfemodels: []\n")
    one_line_bad_input(hpcstage("pull", "-f", "m.yaml", cwd=tmp_path), "not UTF-8")


def test_error_in_a_hub_dataset_after_data_entries_names_its_own_line(tmp_path):
    (tmp_path / "src").mkdir()
    (tmp_path / "m.yaml").write_text(
        "datasets:\n  - local: src\n    dest: a\n  - local: src\n    dest: b\n  - repo: org/d\n    revison: main\n")
    one_line_bad_input(hpcstage("pull", "-f", "m.yaml", cwd=tmp_path), "m.yaml:7:", "datasets[2]", "'revision'")


def test_typo_inside_expect_names_the_expect_keys(tmp_path):
    (tmp_path / "src").mkdir()
    (tmp_path / "m.yaml").write_text("datasets:\n  - local: src\n    dest: a\n    expect: {filez: [x]}\n")
    one_line_bad_input(hpcstage("pull", "-f", "m.yaml", cwd=tmp_path), "did you mean 'files'")


@pytest.mark.parametrize("value", ["0", "-1"])
def test_timeout_must_be_positive(tmp_path, value):
    one_line_bad_input(hpcstage("pull", "org/m", "--timeout", value, "--cache-dir", "c", cwd=tmp_path), "--timeout")


@pytest.mark.parametrize("endpoint", ["http://127.0.0.1:99999", "http://[::1", "ftp://host"])
def test_malformed_hf_endpoint(tmp_path, endpoint):
    r = hpcstage("pull", "org/m", "--cache-dir", "c", cwd=tmp_path, env={"HF_ENDPOINT": endpoint})
    one_line_bad_input(r, "HF_ENDPOINT")


def test_launch_with_a_broken_train_config_leaves_no_experiment(tmp_path):
    (tmp_path / "t.yaml").write_text("a: [\n")
    r = hpcstage("launch", "--job-type", "train", "--cluster", "local", "--dry-run", "--train-config", "t.yaml",
                 "--name", "x", cwd=tmp_path)
    one_line_bad_input(r, "--train-config")
    assert not (tmp_path / "experiments" / "x").exists()


def test_launch_with_unbalanced_quotes_in_extra_args(tmp_path):
    (tmp_path / "t.yaml").write_text("a: 1\n")
    r = hpcstage("launch", "--job-type", "train", "--cluster", "local", "--dry-run", "--train-config", "t.yaml",
                 "--train-extra-args", "a='b", "--name", "y", cwd=tmp_path)
    one_line_bad_input(r, "balance the quotes")
    assert not (tmp_path / "experiments" / "y").exists()


def test_a_newline_in_a_file_name_stays_inside_the_script_comment(tmp_path):
    name = "cfg\ntouch PWNED\n.yaml"
    (tmp_path / name).write_text("a: 1\n")
    r = hpcstage("launch", "--job-type", "train", "--cluster", "local", "--dry-run", "--train-config", name,
                 "--name", "z", "-q", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    script = (tmp_path / "experiments" / "z" / "train.sbatch").read_text()
    assert "\ntouch PWNED" not in script
    assert subprocess.run(["bash", "-n", str(tmp_path / "experiments" / "z" / "train.sbatch")]).returncode == 0


def test_slurm_array_bad_options_are_refused_before_planning(tmp_path):
    (tmp_path / "m.yaml").write_text("models:\n  - repo: org/m\n")
    env = {"HF_ENDPOINT": "http://127.0.0.1:9"}  # planning would fail on the network: it must not be reached
    one_line_bad_input(hpcstage("pull", "-f", "m.yaml", "--slurm-array", "0", "--cluster", "local", cwd=tmp_path,
                                env=env), "at least 1 worker")
    (tmp_path / "site.toml").write_text("[local]\ninternet = true\n")  # array workers need online nodes
    env["HPCSTAGE_CLUSTERS"] = str(tmp_path / "site.toml")
    one_line_bad_input(hpcstage("pull", "-f", "m.yaml", "--slurm-array", "2", "--cluster", "local", "--time", "bogus",
                                cwd=tmp_path, env=env), "--time")
    assert not (tmp_path / "hpcstage.lock").exists()


def test_dest_may_not_be_hpcstages_own_state_folder(tmp_path):
    (tmp_path / "src").mkdir()
    (tmp_path / "m.yaml").write_text("datasets:\n  - local: src\n    dest: .hpcstage\n")
    one_line_bad_input(hpcstage("pull", "-f", "m.yaml", cwd=tmp_path), "state")


def test_an_encoded_slash_in_a_url_stays_one_file_name():
    from hpcstage.sources.url import file_name

    assert file_name("https://example.org/files/a%2Fb.bin") == "a_b.bin"


def test_leftovers_of_dest_foo_do_not_include_the_live_build_of_foo_bar(tmp_path):
    from hpcstage.datadir import _remove_leftovers

    mine = tmp_path / ".foo.0a1b2c3d.hpcstage-build"
    other = tmp_path / ".foo.bar.4e5f6a7b.hpcstage-build"
    mine.mkdir()
    other.mkdir()
    _remove_leftovers(tmp_path, tmp_path / "foo")
    assert not mine.exists() and other.exists()


def test_a_zip_with_a_broken_deflate_stream_is_a_clear_archive_error(tmp_path):
    import zipfile

    from hpcstage.archive import ArchiveError, extract_into

    path = tmp_path / "a.zip"
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("x.txt", b"hello world " * 5000)
    data = bytearray(path.read_bytes())
    start = data.index(b"x.txt") + len(b"x.txt")  # the compressed bytes follow the local header's name
    for i in range(start + 10, start + 60):
        data[i] ^= 0xFF
    path.write_bytes(bytes(data))
    (tmp_path / "out").mkdir()
    with pytest.raises(ArchiveError, match="damaged"):
        extract_into(path, tmp_path / "out", quiet=True)


def test_negative_archive_limits_are_refused(tmp_path):
    (tmp_path / "src").mkdir()
    (tmp_path / "m.yaml").write_text("datasets:\n  - local: src\n    dest: a\n    max_ratio: -1\n")
    one_line_bad_input(hpcstage("pull", "-f", "m.yaml", cwd=tmp_path), "max_ratio", "0 or more")


@pytest.mark.parametrize("jobs", ["[]", '{"jobs": [{"key": "x"}]}', '{"jobs": 3}'])
def test_status_of_a_broken_experiment_record(tmp_path, jobs):
    (tmp_path / "exp").mkdir()
    (tmp_path / "exp" / "jobs.json").write_text(jobs)
    one_line_bad_input(hpcstage("status", "--experiment", "exp", cwd=tmp_path), "jobs.json")


def test_doctor_timeout_must_be_positive(tmp_path):
    one_line_bad_input(hpcstage("doctor", "--timeout", "0", cwd=tmp_path), "--timeout")


@pytest.mark.parametrize("argv, env", [
    (("prebuild", "--from-experiment", "bad.yaml"), {}),
    (("pull", "demo-org/x", "--cache-dir", "c"), {"HPCSTAGE_POLICY": "bad.yaml"}),
])
def test_a_non_utf8_experiment_summary_or_site_policy(tmp_path, argv, env):
    (tmp_path / "bad.yaml").write_bytes(b"evaluation:\n  tasks: [\xff\xfe]\n")
    env = {k: str(tmp_path / v) if k == "HPCSTAGE_POLICY" else v for k, v in env.items()}
    one_line_bad_input(hpcstage(*argv, cwd=tmp_path, env=env), "bad.yaml", "not UTF-8")
    assert not (tmp_path / "c").exists()
