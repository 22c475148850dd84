"""The cluster registry: bundled facts, anchored detection, overrides and their errors."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from hpcstage.slurm import clusters
from hpcstage.slurm.clusters import (
    RegistryError,
    UnknownClusterError,
    detect,
    load_registry,
    slurm_time_seconds,
)

SITES = [
    "alpha", "capella", "claix", "jupiter", "jureca", "juwels", "leonardo", "lonestar",
    "lrz", "nyugreene", "nyutorch", "oumi", "perlmutter", "vista",
]  # fmt: skip


@pytest.fixture(autouse=True)
def no_overrides(tmp_path, monkeypatch):
    """Each test sees the bundled file only, unless it writes overrides itself."""
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "config"))
    monkeypatch.delenv(clusters.SITE_ENV, raising=False)


@pytest.fixture(scope="module")
def registry():
    return load_registry()


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def user_file(tmp_path: Path) -> Path:
    return tmp_path / "config" / "hpcstage" / "clusters.toml"


def test_bundled_registry_has_the_fourteen_sites_and_local(registry):
    assert registry.names() == sorted([*SITES, "local"])
    for cluster in registry:
        assert cluster.max_time_seconds > 0
        assert cluster.hostname or cluster.slurm_cluster, cluster.name


@pytest.mark.parametrize(
    ("hostname", "expected"),
    [
        ("jrlogin05.jureca", "jureca"),
        ("jrc0441.jureca", "jureca"),
        ("jrc0441", "jureca"),
        ("jpbl-s01-01", "jupiter"),
        ("jpbo-021-27.jupiter.internal", "jupiter"),
        ("jwlogin22.juwels", "juwels"),
        ("jwb0059.juwels", "juwels"),
        ("lrdn1234.leonardo.local", "leonardo"),
        ("login05-ext.leonardo.cineca.it", "leonardo"),
        ("c63", "capella"),
        ("c63.capella.hpc.tu-dresden.de", "capella"),
        ("login1.capella.hpc.tu-dresden.de", "capella"),
        ("login1.alpha.hpc.tu-dresden.de", "alpha"),
        ("login23-g-1.hpc.itc.rwth-aachen.de", "claix"),
        ("n23g0001", "claix"),
        ("login1.ls6.tacc.utexas.edu", "lonestar"),
        ("c610-021.vista.tacc.utexas.edu", "vista"),
        ("login1.vista.tacc.utexas.edu", "vista"),
        ("log-2.hpc.nyu.edu", "nyugreene"),
        ("torch-login-2.hpc.nyu.edu", "nyutorch"),
        ("oumi-login1", "oumi"),
        ("login31.perlmutter.nersc.gov", "perlmutter"),
        ("login.ai.lrz.de", "lrz"),
        ("lrz-hgx-h100-001", "lrz"),
        ("JRC0441.JURECA", "jureca"),
    ],
)
def test_detect_by_hostname(registry, hostname, expected):
    assert detect(hostname, registry=registry).name == expected


@pytest.mark.parametrize(
    "hostname",
    [
        "c610-021",  # a Vista (or Lonestar) compute node by its short name: not Capella
        "c301-005.ls6",  # partial names of TACC nodes
        "xc63",
        "c63.example.org",
        "myjrc0441.jureca",
        "jrc0441.jureca-evil",
        "nid001234",  # Perlmutter without NERSC_HOST: too generic to claim
        "login31",
        "log-2.hpc.nyu.edu.example.org",
        "oumi-login1x",
        "vm",
    ],
)
def test_patterns_match_whole_names_only(registry, hostname):
    assert detect(hostname, registry=registry) is None


def test_detect_by_site_environment(registry):
    assert detect("nid001234", registry=registry, environ={"NERSC_HOST": "perlmutter"}).name == (
        "perlmutter"
    )
    assert detect("c610-021", registry=registry, environ={"TACC_SYSTEM": "vista"}).name == "vista"
    assert detect("c301-005", registry=registry, environ={"TACC_SYSTEM": "ls6"}).name == "lonestar"


def test_explicit_hostname_never_asks_slurm(registry, monkeypatch):
    monkeypatch.setattr(clusters, "slurm_cluster_name", lambda: pytest.fail("asked Slurm"))
    assert detect("unknown-host", registry=registry) is None


def test_this_machine_falls_back_to_the_slurm_cluster_name(registry, monkeypatch):
    monkeypatch.setattr(clusters.socket, "gethostname", lambda: "vm")
    monkeypatch.setattr(clusters.socket, "getfqdn", lambda: "vm")
    monkeypatch.setattr(clusters, "slurm_cluster_name", lambda: "hpcstage")
    assert detect(registry=registry, environ={}).name == "local"
    monkeypatch.setattr(clusters, "slurm_cluster_name", lambda: None)
    assert detect(registry=registry, environ={}) is None


def test_this_machine_by_hostname_first(registry, monkeypatch):
    monkeypatch.setattr(clusters.socket, "gethostname", lambda: "jrlogin05")
    monkeypatch.setattr(clusters.socket, "getfqdn", lambda: "jrlogin05.jureca")
    monkeypatch.setattr(clusters, "slurm_cluster_name", lambda: pytest.fail("asked Slurm"))
    assert detect(registry=registry, environ={}).name == "jureca"


def test_overlapping_patterns_are_an_error(tmp_path, monkeypatch):
    write(user_file(tmp_path), "[mine]\nhostname = 'c\\d+'\n" + _minimal_cluster())
    with pytest.raises(RegistryError, match="several clusters: capella, mine"):
        detect("c63", registry=load_registry())


def test_local_cluster_is_the_test_script_cluster(registry):
    script = Path(__file__).parents[1] / "scripts" / "slurm-test-cluster.sh"
    name = re.search(r"^readonly CLUSTER=(\S+)$", script.read_text(), re.MULTILINE).group(1)
    assert registry.get("local").slurm_cluster == name


def test_sbatch_options_follow_each_site(registry):
    assert registry.get("jureca").sbatch_options() == ["--partition=dc-gpu", "--gres=gpu:4"]
    assert registry.get("perlmutter").sbatch_options(2) == [
        "--qos=regular",
        "--constraint=gpu&hbm80g",
        "--gpus-per-node=2",
    ]  # and no --mem: Perlmutter rejects memory requests
    assert registry.get("vista").sbatch_options() == ["--partition=gh"]
    assert registry.get("nyutorch").sbatch_options(1)[-1] == "--gres=gpu:h200:1"
    assert registry.get("capella").sbatch_options(0) == [
        "--partition=capella",
        "--licenses=walrus:1,octopus:1,narwhal:1,cat:1",
        "--mem=710G",
    ]
    with pytest.raises(RegistryError, match="vista has 1 GPUs per node; 2 were asked for"):
        registry.get("vista").sbatch_options(2)


def test_unknown_cluster_name_lists_the_valid_ones(registry):
    with pytest.raises(UnknownClusterError, match=r"'jurecaa' \(did you mean 'jureca'\?\)") as err:
        registry.get("jurecaa")
    assert "known clusters: alpha, capella," in str(err.value)


def test_user_file_overrides_key_by_key(tmp_path):
    write(user_file(tmp_path), '[jureca]\naccount = "myproject"\npartition = "dc-gpu"\n')
    jureca = load_registry().get("jureca")
    assert (jureca.account, jureca.partition, jureca.gpus_per_node) == ("myproject", "dc-gpu", 4)


def test_precedence_bundled_site_user_extra(tmp_path, monkeypatch):
    site = write(tmp_path / "site.toml", '[leonardo]\naccount = "site"\nqos = "normal"\n')
    monkeypatch.setenv(clusters.SITE_ENV, str(site))
    write(user_file(tmp_path), '[leonardo]\naccount = "user"\n')
    extra = write(tmp_path / "extra.toml", '[leonardo]\nexclude = "lrdn0001"\n')
    registry = load_registry([extra])
    leonardo = registry.get("leonardo")
    assert (leonardo.account, leonardo.qos, leonardo.exclude) == ("user", "normal", "lrdn0001")
    assert registry.sources[1:] == (str(site), str(user_file(tmp_path)), str(extra))


def test_tables_merge_deeply_and_empty_strings_unset(tmp_path):
    write(
        user_file(tmp_path),
        '[perlmutter]\ndetect_env = { NERSC_SITE = "nersc" }\n[capella]\nmem = ""\n',
    )
    registry = load_registry()
    assert registry.get("perlmutter").detect_env == {
        "NERSC_HOST": "perlmutter",
        "NERSC_SITE": "nersc",
    }
    assert registry.get("capella").mem is None


def test_new_cluster_from_override(tmp_path):
    write(user_file(tmp_path), "[mine]\nhostname = 'node\\d+\\.mine'\n" + _minimal_cluster())
    registry = load_registry()
    assert detect("node7.mine", registry=registry).name == "mine"
    assert registry.get("mine").sbatch_options() == ["--gres=gpu:2"]


def test_unknown_key_names_file_cluster_and_nearest_key(tmp_path):
    path = write(user_file(tmp_path), '[jureca]\nacount = "myproject"\n')
    with pytest.raises(RegistryError) as err:
        load_registry()
    message = str(err.value)
    assert message.startswith(f"{path}: cluster 'jureca': unknown key 'acount'")
    assert "(did you mean 'account'?)" in message


def test_incomplete_new_cluster_names_the_missing_keys(tmp_path):
    path = write(user_file(tmp_path), "[mine]\ninternet = true\n")
    with pytest.raises(
        RegistryError, match=r"cluster 'mine' \(from .*\): gpus_per_node: Field required"
    ) as err:
        load_registry()
    assert str(path) in str(err.value)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ('[jureca]\nmax_time = "two days"\n', "not a Slurm time limit: 'two days'"),
        ('[jureca]\nmem = "lots"\n', "'lots' is not a Slurm memory size"),
        ("[jureca]\nhostname = 'jr(['\n", "bad regular expression"),
        ('[jureca]\ngpu_directive = "gpus"\n', "gpu_directive: Input should be 'gres'"),
        ('jureca = "dc-gpu"\n', "'jureca' must be a table: [jureca]"),
        ("[jureca\n", "clusters.toml: "),
    ],
)
def test_bad_values_are_errors_naming_the_cluster(tmp_path, text, expected):
    write(user_file(tmp_path), text)
    with pytest.raises(RegistryError, match=re.escape(expected)):
        load_registry()


def test_named_files_must_exist(tmp_path, monkeypatch):
    monkeypatch.setenv(clusters.SITE_ENV, str(tmp_path / "missing.toml"))
    with pytest.raises(RegistryError, match=r"missing\.toml does not exist"):
        load_registry()


@pytest.mark.parametrize(
    ("text", "seconds"),
    [
        ("30", 1800),
        ("30:15", 1815),
        ("48:00:00", 172800),
        ("2-00:00:00", 172800),
        ("1-12", 129600),
        ("7-00:30", 606600),
    ],
)
def test_slurm_time_formats(text, seconds):
    assert slurm_time_seconds(text) == seconds


def _minimal_cluster() -> str:
    return (
        'internet = false\ngpus_per_node = 2\ngpu_type = "L40S"\ncpus_per_node = 16\n'
        'gpu_directive = "gres"\nmax_time = "12:00:00"\n'
    )
