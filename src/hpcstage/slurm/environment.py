"""What a job's shell holds before its command runs: the activation line, env files, the secrets file.

Users of the seeds' launcher keep, per cluster, a line that enters the job's environment (a conda or venv
`activate`; `PATH` alone cannot enter a conda environment), non-secret `KEY=value` files, and a private env
file with their API keys. Here:

- ``activate``: a shell line per cluster and job type (clusters.toml) or ``--activate``; the script runs it
  after the module loads, under ``set -e`` (a failing activation stops the job there). The login node's
  checks of the job's environment (tools, prebuild, check) run through the same lines (`interpreter_shim`).
- env files: ``KEY=value`` lines, read at launch, written into the script and ``config.json`` (not secret).
- the secrets file (``secrets_file`` or ``$HPCSTAGE_SECRETS_FILE``): must be the user's own and private; the
  script sources it at run time with tracing off. hpcstage reads only its variable NAMES (to keep them out of
  what sbatch exports); no value reaches a script, a record, a log line or an argv.
- `sbatch_environment`: sbatch stores the environment it exports with the job (slurmctld's state files, shown
  to admins), so it gets an explicit ``--export`` list (as ``SBATCH_EXPORT``) without credentials.
"""

from __future__ import annotations

import os
import re
import shlex
import stat
from dataclasses import dataclass, field
from pathlib import Path

from hpcstage.errors import BadInput
from hpcstage.slurm.clusters import Cluster

SECRETS_ENV = "HPCSTAGE_SECRETS_FILE"
TOKEN_VARIABLES = ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN")
# Names that hold credentials by convention (HF_TOKEN, WANDB_API_KEY, AWS_SECRET_ACCESS_KEY, GITHUB_TOKEN...):
# never exported by sbatch, never accepted in a non-secret env file. HF_TOKEN_PATH and the like are paths.
CREDENTIAL = re.compile(r"(^|_)(TOKEN|SECRET|PASSWORD|PASSWD|KEY|CREDENTIALS?)$|API_KEY|SECRET", re.IGNORECASE)
_URL_PASSWORD = re.compile(r"://[^/?#@\s]*:[^/?#\s]*@")  # scheme://user:password@host
_NAME = r"[A-Za-z_][A-Za-z0-9_]*"
_LINE = re.compile(rf"\s*(?:export\s+)?({_NAME})=(.*)")
_ASSIGNED = re.compile(rf"^\s*(?:export\s+)?({_NAME})=", re.MULTILINE)


def is_credential(name: str) -> bool:
    """Whether a variable name says it holds a credential (a name ending in _FILE, _PATH or _DIR names a place)."""
    return bool(CREDENTIAL.search(name)) and not re.search(r"_(FILE|PATH|DIR)$", name, re.IGNORECASE)


@dataclass
class JobEnvironment:
    """One job's activation line, env-file variables and secrets file (a path, never its content)."""

    activate: str | None = None
    activate_from: str | None = None  # where the line came from, for the script's comment and errors
    env: dict[str, str] = field(default_factory=dict)
    env_files: list[str] = field(default_factory=list)
    secrets_file: str | None = None


def read_env_file(path: str | os.PathLike[str], origin: str) -> dict[str, str]:
    """``KEY=value`` lines (``export`` allowed, ``#`` comments, values literal, one pair of quotes removed).
    Hand-written: a bad line must be an error naming file:line, and values must stay literal (no $ expansion),
    which dotenv readers do not both promise."""
    path = Path(path).expanduser()
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise BadInput(f"env file {path} (from {origin}) does not exist; create it or fix {origin}") from None
    except (OSError, UnicodeDecodeError) as e:
        raise BadInput(f"env file {path} (from {origin}) is unreadable: {e}") from None
    values: dict[str, str] = {}
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        match = _LINE.fullmatch(line)
        if not match:
            raise BadInput(f"{path}:{number}: not a KEY=value line; write NAME=value (NAME of letters, digits, _)")
        name, value = match.group(1), match.group(2).strip()
        if is_credential(name):
            raise BadInput(
                f"{path}:{number}: {name} looks like a credential, and env files are copied into job "
                f"scripts and config.json; move it to your secrets file (${SECRETS_ENV}, chmod 600)"
            )
        if name.startswith("HPCSTAGE_") or name == "PATH":
            raise BadInput(f"{path}:{number}: {name} is set by hpcstage itself; remove it (PATH: use `activate`)")
        if value[:1] in ("'", '"'):  # quoted: up to the same quote; after it, only a comment
            end = value.find(value[0], 1)
            rest = value[end + 1 :].strip() if end > 0 else "?"
            if rest and not rest.startswith("#"):
                raise BadInput(f'{path}:{number}: {name}: unbalanced quotes; write {name}="a value"')
            value = value[1:end]
        else:
            value = re.split(r"\s+#", value, maxsplit=1)[0].strip()
        values[name] = value
    return values


def secrets_file(cluster: Cluster, environ: dict[str, str] | os._Environ = os.environ) -> tuple[Path, str] | None:
    """(the secrets file, where it was named) after checking it is private; None when none is set."""
    if environ.get(SECRETS_ENV):
        value, origin = environ[SECRETS_ENV], f"${SECRETS_ENV}"
    elif cluster.secrets_file:
        value, origin = cluster.secrets_file, f"secrets_file of [{cluster.name}] in clusters.toml"
    else:
        return None
    path = Path(os.path.expandvars(value)).expanduser().absolute()
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise BadInput(
            f"secrets file {path} (from {origin}) does not exist; create it with `install -m 600 "
            f"/dev/null {path}` and add KEY=value lines, or unset {origin}"
        ) from None
    except OSError as e:
        raise BadInput(f"secrets file {path} (from {origin}): {e.strerror}") from None
    if not stat.S_ISREG(st.st_mode):
        raise BadInput(f"secrets file {path} (from {origin}) is not a regular file; name a file")
    if st.st_uid != os.geteuid():
        raise BadInput(
            f"secrets file {path} (from {origin}) belongs to uid {st.st_uid}, not to you: whoever owns "
            "it can change what your jobs run; use a file of your own (chmod 600)"
        )
    if st.st_mode & 0o077:
        raise BadInput(
            f"secrets file {path} (from {origin}) is open to others (mode {stat.S_IMODE(st.st_mode):04o}); "
            f"make it private: chmod 600 {shlex.quote(str(path))}"
        )
    return path, origin


def secret_names(path: Path) -> list[str]:
    """The variable names the secrets file assigns (its values are read here and dropped at once)."""
    try:
        return sorted(set(_ASSIGNED.findall(path.read_text(encoding="utf-8", errors="replace"))))
    except OSError as e:
        raise BadInput(f"secrets file {path}: {e.strerror}") from None


def for_job(
    cluster: Cluster, job_type: str, activate: str | None, env_files: list[Path], secrets: Path | None
) -> JobEnvironment:
    """One job's environment: --activate, else the cluster's line for its job type; the cluster's env file for
    the job type, then --env-file ones (later files win per name)."""
    out = JobEnvironment(secrets_file=str(secrets) if secrets else None)
    if activate:
        out.activate, out.activate_from = activate, "--activate"
    elif cluster.for_job("activate", job_type):
        out.activate = cluster.for_job("activate", job_type)
        out.activate_from = f"activate of [{cluster.name}] in clusters.toml"
    named = cluster.for_job("env_file", job_type)
    files = [(Path(os.path.expandvars(named)).expanduser(), f"env_file of [{cluster.name}]")] if named else []
    files += [(Path(f).expanduser(), "--env-file") for f in env_files]
    for path, origin in files:
        out.env.update(read_env_file(path, origin))
        out.env_files.append(str(path.absolute()))
    return out


def carries_password(value: str) -> bool:
    """Whether a value holds a URL with a password in it (`http://user:secret@proxy:3128`)."""
    return bool(_URL_PASSWORD.search(value))


def withheld(environ: dict[str, str] | os._Environ, secret_names: list[str]) -> list[str]:
    """Names of the submitting environment sbatch must not export: credentials, URLs with a password in them
    (a site proxy's) and the secrets file's names. slurmctld keeps what sbatch exports with the job."""
    return sorted(
        n
        for n, v in environ.items()
        if n in TOKEN_VARIABLES or n in secret_names or is_credential(n) or carries_password(v)
    )


def is_proxy(name: str) -> bool:
    """Whether `name` names a proxy: the standard library's rule (`urllib.request.getproxies_environment`,
    which transfer.http and requests follow): any `<scheme>_proxy`, in either case, but `no_proxy`."""
    return name.lower().endswith("_proxy") and name.lower() != "no_proxy"


def _meaning(name: str) -> str:
    """What a variable stands for: HF_TOKEN for both token names, a proxy whatever the case of its name."""
    return "HF_TOKEN" if name in TOKEN_VARIABLES else name.upper() if is_proxy(name) else name


def not_passed(environ: dict[str, str] | os._Environ, withheld_names: list[str], secret_names: list[str]) -> list[str]:
    """What the jobs will lack: HF_TOKEN (one line for its two names) and each URL with a password, withheld
    from sbatch and not set by the secrets file either (by any name with the same meaning)."""
    given = {_meaning(n) for n in secret_names}
    out = [n for n in withheld_names if carries_password(environ[n]) and _meaning(n) not in given]
    if any(n in withheld_names for n in TOKEN_VARIABLES) and "HF_TOKEN" not in given:
        out.insert(0, "HF_TOKEN")
    return out


def not_passed_warning(name: str, to: str) -> str:
    """The line that says `name` stays behind and where the jobs (`to`) get it from."""
    what = "" if name == "HF_TOKEN" else " carries a password and"
    return (
        f"{name} of this shell{what} is not passed to {to} (Slurm would store it with the jobs); if they need "
        f"it, they get it from your secrets file: add {name}=... to a private file (chmod 600) named by "
        f"${SECRETS_ENV}"
    )


def sbatch_environment(environ: dict[str, str] | os._Environ, withheld_names: list[str]) -> dict[str, str]:
    """sbatch's environment: without the withheld names, and with SBATCH_EXPORT (sbatch's --export) listing the
    rest explicitly. The job script sets SLURM_EXPORT_ENV=ALL again, or srun steps would get only that list."""
    env = {k: v for k, v in environ.items() if k not in withheld_names and not k.startswith("SBATCH_EXPORT")}
    names = sorted(n for n in env if "," not in n and "=" not in n and not n.startswith("SLURM_"))
    env["SBATCH_EXPORT"] = ",".join(names) or "NONE"
    return env


def interpreter_shim(modules: list[str], job: JobEnvironment, python: str | None) -> str:
    """A script that starts the job's Python as the job does (module loads, activation; `python` first on PATH,
    else the activated `python`): prebuild, check and the tool check on the login node run it as the job's
    interpreter. What the activation prints goes to stderr: the checks talk to their child over stdout."""
    lines = [
        "#!/bin/bash",
        "# hpcstage: the job's interpreter as its batch script sets it up (written by `hpcstage launch`)",
        "set -eo pipefail",
        "{",
    ]
    lines += [f"module load {shlex.quote(m)}" for m in modules]
    if job.activate:
        lines.append(job.activate)
    lines.append("} >&2")
    if python:
        folder = str(Path(python).parent)
        lines += [f'export PATH={shlex.quote(folder)}:"$PATH"', f'exec {shlex.quote(python)} "$@"']
    else:
        lines.append('exec python "$@"')
    return "\n".join(lines) + "\n"
