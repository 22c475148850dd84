"""The cluster registry: what each cluster is, how to recognise it, how it wants jobs asked for.

The bundled ``clusters.toml`` is overridden, key by key, by a site file (``$HPCSTAGE_CLUSTERS``),
then the user's (``~/.config/hpcstage/clusters.toml``), then files named by the caller.
A typo in an override is an error naming the file, the cluster and the nearest valid key:
a silently ignored ``acount`` would submit jobs to the wrong account.
"""

from __future__ import annotations

import difflib
import os
import re
import socket
from collections.abc import Iterable, Iterator, Mapping
from importlib import resources
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib

from hpcstage.errors import BadInput
from hpcstage.slurm import JOB_TYPES, SlurmError, run_command

SITE_ENV = "HPCSTAGE_CLUSTERS"
_TIME = re.compile(r"(?:(\d+)-)?(\d+)(?::(\d+))?(?::(\d+))?")
_MEM = re.compile(r"\d+[KMGT]?")
# Optional keys an override can clear with "": TOML has no null.
_UNSETTABLE = (
    "hostname", "slurm_cluster", "mem", "partition", "account", "qos", "constraint", "licenses",
    "exclude", "gres_name", "python", "cpu_partition", "rendezvous_suffix", "socket_ifname", "home_quota",
    "activate", "env_file", "secrets_file",
)  # fmt: skip
PerJobType = str | dict[str, str] | None  # one value for every job type, or {train = ..., default = ...}


class RegistryError(BadInput, ValueError):
    """The cluster configuration is wrong, or names a cluster that does not exist (bad input: exit 2)."""


class UnknownClusterError(RegistryError):
    """A cluster name not in the registry; the message lists the valid ones."""


def slurm_time_seconds(text: str) -> int:
    """Seconds in a Slurm time limit: M, M:S, H:M:S, D-H, D-H:M, D-H:M:S."""
    match = _TIME.fullmatch(text.strip())
    if not match:
        raise ValueError(f"not a Slurm time limit: {text!r} (e.g. 48:00:00 or 2-00:00:00)")
    given = match.groups()
    days, first, second, third = (int(g) if g else 0 for g in given)
    if given[0]:  # D-H[:M[:S]]
        return ((days * 24 + first) * 60 + second) * 60 + third
    if given[3]:  # H:M:S
        return (first * 60 + second) * 60 + third
    return first * 60 + second  # M[:S]


class Partition(BaseModel):
    """What the registry knows of one partition (keys documented in clusters.toml)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    max_time: str
    cpus_per_node: int | None = Field(default=None, ge=1)
    gpus_per_node: int | None = Field(default=None, ge=0)

    @field_validator("max_time")
    @classmethod
    def _valid_time(cls, value: str) -> str:
        slurm_time_seconds(value)
        return value


class Cluster(BaseModel):
    """One cluster's facts and sbatch conventions (keys documented in clusters.toml)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str
    description: str = ""
    hostname: str | None = None
    detect_env: dict[str, str] = Field(default_factory=dict)
    slurm_cluster: str | None = None
    internet: bool
    gpus_per_node: int = Field(ge=0)
    gpu_type: str
    cpus_per_node: int = Field(ge=1)
    mem: str | None = None
    partition: str | None = None
    account: str | None = None
    qos: str | None = None
    constraint: str | None = None
    licenses: str | None = None
    exclude: str | None = None
    gpu_directive: Literal["gres", "gpus-per-node", "none"]
    gres_name: str | None = None
    modules: list[str] = Field(default_factory=list)
    max_time: str
    python: str | None = None
    partitions: dict[str, Partition] = Field(default_factory=dict)
    cpu_partition: str | None = None
    account_required: bool = False
    rendezvous_suffix: str | None = None
    socket_ifname: str | None = None
    home_quota: str | None = None  # the site's default per-user $HOME quota (doctor warns about caches there)
    activate: PerJobType = None  # the shell line that enters the job's environment (slurm/environment.py)
    env_file: PerJobType = None  # KEY=value lines exported into the job
    secrets_file: str | None = None  # sourced by the job at run time; never read into a script or record

    @field_validator("activate", "env_file")
    @classmethod
    def _per_job_type(cls, value: PerJobType) -> PerJobType:
        if isinstance(value, dict):
            unknown = sorted(set(value) - {*JOB_TYPES, "default"})
            if unknown:
                raise ValueError(f"unknown job type {', '.join(unknown)}; use {', '.join(JOB_TYPES)} or default")
        return value

    def for_job(self, key: str, job_type: str) -> str | None:
        """The value of a per-job-type key (`activate`, `env_file`) for one job type: its own, else `default`."""
        value = getattr(self, key)
        return value.get(job_type, value.get("default")) if isinstance(value, dict) else value

    @field_validator(*_UNSETTABLE, mode="before")
    @classmethod
    def _empty_is_unset(cls, value: Any) -> Any:
        return None if value == "" else value

    @field_validator("hostname")
    @classmethod
    def _valid_regex(cls, value: str | None) -> str | None:
        if value is not None:
            try:
                re.compile(value)
            except re.error as exc:
                raise ValueError(f"bad regular expression {value!r}: {exc}") from exc
        return value

    @field_validator("mem", "home_quota")
    @classmethod
    def _valid_mem(cls, value: str | None) -> str | None:
        if value is not None and not _MEM.fullmatch(value):
            raise ValueError(f"{value!r} is not a Slurm memory size such as 500G")
        return value

    @field_validator("max_time")
    @classmethod
    def _valid_time(cls, value: str) -> str:
        slurm_time_seconds(value)
        return value

    @property
    def max_time_seconds(self) -> int:
        return slurm_time_seconds(self.max_time)

    @property
    def home_quota_bytes(self) -> int | None:
        if self.home_quota is None:
            return None
        unit = {"K": 1, "M": 2, "G": 3, "T": 4}.get(self.home_quota[-1], 0)
        return int(self.home_quota.rstrip("KMGT")) * 1024**unit

    def partition_max_time(self, partition: str | None) -> str | None:
        """The registry's time limit of a partition: its own entry, else the cluster's for its default
        partition; None for a partition the registry does not know."""
        if partition and partition in self.partitions:
            return self.partitions[partition].max_time
        if partition is None or partition == self.partition:
            return self.max_time
        return None

    def node_shape(self, partition: str | None) -> tuple[int, int]:
        """(CPUs, GPUs) per node of a partition: its own entry where it says, else the cluster's."""
        info = self.partitions.get(partition or "")
        cpus = info.cpus_per_node if info and info.cpus_per_node else self.cpus_per_node
        gpus = info.gpus_per_node if info and info.gpus_per_node is not None else self.gpus_per_node
        return cpus, gpus

    def matches(self, hostnames: Iterable[str], environ: Mapping[str, str]) -> bool:
        """Whether a whole host name matches, or the environment names this cluster."""
        if self.hostname and any(re.fullmatch(self.hostname, host, re.IGNORECASE) for host in hostnames):
            return True
        return bool(self.detect_env) and all(environ.get(key) == value for key, value in self.detect_env.items())

    def sbatch_options(self, gpus: int | None = None) -> list[str]:
        """sbatch options for one node of this cluster with ``gpus`` GPUs (default: all)."""
        most = self.node_shape(self.partition)[1]
        gpus = most if gpus is None else gpus
        if not 0 <= gpus <= most:
            raise RegistryError(f"{self.name} has {most} GPUs per node; {gpus} were asked for")
        options = [
            f"--{key}={value}"
            for key, value in (
                ("partition", self.partition),
                ("account", self.account),
                ("qos", self.qos),
                ("constraint", self.constraint),
                ("licenses", self.licenses),
                ("exclude", self.exclude),
                ("mem", self.mem),
            )
            if value
        ]
        if gpus and self.gpu_directive == "gres":
            options.append(f"--gres=gpu:{self.gres_name + ':' if self.gres_name else ''}{gpus}")
        elif gpus and self.gpu_directive == "gpus-per-node":
            options.append(f"--gpus-per-node={gpus}")
        return options


class Registry:
    """All known clusters, by name, and the files they were read from."""

    def __init__(self, clusters: Mapping[str, Cluster], sources: Iterable[str]) -> None:
        self._clusters = dict(clusters)
        self.sources = tuple(sources)

    def __iter__(self) -> Iterator[Cluster]:
        return iter(self._clusters.values())

    def names(self) -> list[str]:
        return sorted(self._clusters)

    def get(self, name: str) -> Cluster:
        try:
            return self._clusters[name]
        except KeyError:
            raise UnknownClusterError(
                f"unknown cluster {name!r}{_did_you_mean(name, self._clusters)}; "
                f"known clusters: {', '.join(self.names())}"
            ) from None


def _did_you_mean(word: str, choices: Iterable[str]) -> str:
    close = difflib.get_close_matches(word, list(choices), n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


def _user_file() -> Path:
    config_home = os.environ.get("XDG_CONFIG_HOME") or Path.home() / ".config"
    return Path(config_home) / "hpcstage" / "clusters.toml"


def _override_files(extra_files: Iterable[str | os.PathLike[str]]) -> list[Path]:
    """Override files in increasing precedence; named files must exist, the user's may not."""
    files = []
    if os.environ.get(SITE_ENV):
        files.append(Path(os.environ[SITE_ENV]))
    if (user := _user_file()).is_file():
        files.append(user)
    files += [Path(f) for f in extra_files]
    for path in files:
        if not path.is_file():
            raise RegistryError(f"cluster file {path} does not exist")
    return files


def _parse(text: str, source: str) -> dict[str, dict[str, Any]]:
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise RegistryError(f"{source}: {exc}") from exc
    valid = set(Cluster.model_fields) - {"name"}
    for name, table in data.items():
        if not isinstance(table, dict):
            raise RegistryError(f"{source}: {name!r} must be a table: [{name}]")
        for key in table:
            if key not in valid:
                raise RegistryError(
                    f"{source}: cluster {name!r}: unknown key {key!r}"
                    f"{_did_you_mean(key, valid)}; valid keys: {', '.join(sorted(valid))}"
                )
    return data


def _merge(base: dict[str, Any], override: Mapping[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key, value in override.items():
        if isinstance(value, Mapping) and isinstance(merged.get(key), Mapping):
            merged[key] = _merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def load_registry(extra_files: Iterable[str | os.PathLike[str]] = ()) -> Registry:
    """The bundled clusters with site, user and ``extra_files`` overrides applied, in that order."""
    bundled = resources.files("hpcstage.slurm").joinpath("clusters.toml")
    layers = [(bundled.read_text(encoding="utf-8"), str(bundled))]
    for p in _override_files(extra_files):
        try:
            layers.append((p.read_text(encoding="utf-8"), str(p)))
        except UnicodeDecodeError as e:
            raise RegistryError(f"{p}: not UTF-8 text ({e.reason} at byte {e.start}); save it as UTF-8") from None
    tables: dict[str, dict[str, Any]] = {}
    origins: dict[str, list[str]] = {}
    for text, source in layers:
        for name, table in _parse(text, source).items():
            tables[name] = _merge(tables.get(name, {}), table)
            origins.setdefault(name, []).append(source)
    clusters = {}
    for name, table in tables.items():
        try:
            clusters[name] = Cluster(name=name, **table)
        except ValidationError as exc:
            problems = "; ".join(f"{'.'.join(map(str, e['loc'])) or 'cluster'}: {e['msg']}" for e in exc.errors())
            raise RegistryError(f"cluster {name!r} (from {', '.join(origins[name])}): {problems}") from None
    return Registry(clusters, [source for _, source in layers])


def slurm_cluster_name() -> str | None:
    """ClusterName of the Slurm this machine talks to, or None when there is none to ask."""
    try:
        proc = run_command(["scontrol", "show", "config"], timeout=10)
    except SlurmError:
        return None
    for line in proc.stdout.splitlines() if proc.returncode == 0 else ():
        key, _, value = line.partition("=")
        if key.strip() == "ClusterName":
            return value.strip() or None
    return None


def detect(
    hostname: str | None = None,
    *,
    registry: Registry | None = None,
    environ: Mapping[str, str] | None = None,
) -> Cluster | None:
    """The cluster a host belongs to, or None.

    With no ``hostname``, this machine: its short and full names, its environment, and, when
    neither matches, the ClusterName of its Slurm (how the local test cluster is found).
    A name matching two clusters is an error: the registry's patterns must not overlap.
    """
    if registry is None:
        registry = load_registry()
    if hostname is None:
        hostnames = {socket.gethostname(), socket.getfqdn()}
        environ = os.environ if environ is None else environ
    else:
        hostnames = {hostname}
        environ = environ or {}
    found = [cluster for cluster in registry if cluster.matches(hostnames, environ)]
    if not found and hostname is None and any(c.slurm_cluster for c in registry):
        name = slurm_cluster_name()
        found = [cluster for cluster in registry if name and cluster.slurm_cluster == name]
    if len(found) > 1:
        raise RegistryError(
            f"host {' / '.join(sorted(hostnames))} matches several clusters: "
            f"{', '.join(c.name for c in found)}; make their patterns exclusive"
        )
    return found[0] if found else None


def parse_scontrol_partition(text: str) -> dict[str, dict[str, str]]:
    """``scontrol show partition [NAME]`` output (multi-line or ``--oneliner``): fields by partition name."""
    partitions: dict[str, dict[str, str]] = {}
    current: dict[str, str] | None = None
    for word in text.split():
        key, sep, value = word.partition("=")
        if not sep:
            continue
        if key == "PartitionName":
            current = partitions.setdefault(value, {})
        elif current is not None:
            current[key] = value
    return partitions


def live_max_time(partition: str) -> tuple[bool, str | None]:
    """(known, MaxTime) of a partition from this machine's Slurm: (False, None) when Slurm cannot be asked
    or does not know the partition; (True, None) when it has no limit (UNLIMITED)."""
    try:
        proc = run_command(["scontrol", "show", "partition", partition, "--oneliner"], timeout=10)
    except SlurmError:
        return False, None
    fields = parse_scontrol_partition(proc.stdout).get(partition) if proc.returncode == 0 else None
    if fields is None:
        return False, None
    value = fields.get("MaxTime", "UNLIMITED")
    return True, None if value in ("UNLIMITED", "INFINITE", "NONE") else value


def is_here(cluster: Cluster, registry: Registry | None = None) -> bool:
    """Whether this machine belongs to ``cluster`` (so its Slurm can be asked about the cluster's jobs)."""
    try:
        found = detect(registry=registry)
    except RegistryError:
        return False
    return found is not None and found.name == cluster.name
