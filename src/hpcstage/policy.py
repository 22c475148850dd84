"""What may be pulled, and which names from outside are safe to use as paths.

Everything here runs before any request: an allowlist refusal or a bad name never touches the network.
"""

from __future__ import annotations

import fnmatch
import os
import re
from pathlib import Path

from hpcstage.errors import PolicyError
from hpcstage.yamlfile import read_yaml

REPO_TYPES = ("model", "dataset")
_COMMIT_RE = re.compile(r"^[0-9a-f]{40}$")
# git ref names: no "..", no control chars, none of ~^:?*[\ and no leading/trailing "/" or ".lock".
_BAD_REVISION = re.compile(r"(\.\.|[\x00-\x20\x7f~^:?*\[\\]|^/|/$|//|\.lock$|^-|@\{)")


def is_commit(revision: str) -> bool:
    return bool(_COMMIT_RE.match(revision))


def check_repo_id(repo_id: str) -> str:
    """Validate by the Hub's rules (huggingface_hub's validator); the error names the rule."""
    from huggingface_hub.utils import HFValidationError, validate_repo_id  # here: importing it costs ~0.1 s

    try:
        validate_repo_id(repo_id)
    except HFValidationError as e:
        raise PolicyError(f"invalid repo id {repo_id!r}: {str(e).splitlines()[0]}") from None
    return repo_id


def check_repo_type(repo_type: str) -> str:
    if repo_type not in REPO_TYPES:
        raise PolicyError(f"invalid repo type {repo_type!r}: use one of {', '.join(REPO_TYPES)}")
    return repo_type


def check_revision(revision: str) -> str:
    if not revision or _BAD_REVISION.search(revision):
        raise PolicyError(f"invalid revision {revision!r}: use a branch, tag or 40-hex commit sha")
    return revision


# Components that are not empty, `.` or `..`, with no NUL or backslash, joined by single slashes: exactly the
# paths check_relative_path accepts (the checks below decide, and word, every other path).
_SAFE_PATH = re.compile(r"(?!\.\.?(?:/|$))[^/\x00\\]+(?:/(?!\.\.?(?:/|$))[^/\x00\\]+)*")


def check_relative_path(path: str, what: str = "path") -> str:
    """A path from outside (tree entry, archive member, manifest dest) that must stay inside its folder."""
    if _SAFE_PATH.fullmatch(path):  # one C call for the usual path: verify asks once per listed file
        return path
    if (
        not path
        or "\x00" in path
        or "\\" in path
        or path.startswith("/")
        or any(p in ("..", ".", "") for p in path.split("/"))
    ):
        raise PolicyError(f"refused {what} {path!r}: it must be a relative path that stays inside its folder")
    return path


SITE_POLICY = Path("/etc/hpcstage/policy.yaml")
POLICY_ENV = "HPCSTAGE_POLICY"


def site_policy_path() -> Path | None:
    """`HPCSTAGE_POLICY` when set (then the file must exist), else /etc/hpcstage/policy.yaml if present."""
    value = os.environ.get(POLICY_ENV)
    if value:
        return Path(os.path.expanduser(value))
    return SITE_POLICY if SITE_POLICY.exists() else None


def site_allowlist() -> Allowlist:
    """The site policy's `allow:` globs, read now (not at import), so an admin's change applies to the next call."""
    path = site_policy_path()
    if path is None:
        return Allowlist(None, site=False)
    fix = f"fix it or point {POLICY_ENV} at a valid file"
    data, _ = read_yaml(path, "site policy", PolicyError, fix)
    if data is None:
        data = {}
    if not isinstance(data, dict) or set(data) - {"allow"}:
        raise PolicyError(f"site policy {path} must be a mapping with the one key `allow: [GLOB, ...]`; {fix}")
    allow = data.get("allow")
    if allow is not None and (not isinstance(allow, list) or not all(isinstance(p, str) for p in allow)):
        raise PolicyError(f"site policy {path}: `allow:` must be a list of glob strings; {fix}")
    return Allowlist(allow, source=f"the site policy {path}", site=False)


class Allowlist:
    """`allow:` globs from the manifest, plus the site policy (read when the Allowlist is made): a repo must
    pass both; a list that is absent allows everything, an empty list nothing."""

    def __init__(self, patterns: list[str] | None, source: str = "the manifest's `allow:`", site: bool = True):
        self.patterns = list(patterns) if patterns is not None else None
        self.source = source
        self.site = site_allowlist() if site else None

    def check(self, repo_id: str) -> None:
        if self.patterns is not None and not any(fnmatch.fnmatchcase(repo_id, p) for p in self.patterns):
            fix = (
                "add a matching pattern to `allow:` or remove the entry"
                if self.site is not None
                else "ask the site's admins to allow it, or stage another repo"
            )
            raise PolicyError(
                f"{repo_id} is not allowed by the allowlist of {self.source} "
                f"({', '.join(self.patterns) or 'empty'}): {fix}"
            )
        if self.site is not None:
            self.site.check(repo_id)
