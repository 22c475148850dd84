"""What may be pulled, and which names from outside are safe to use as paths.

Everything here runs before any request: an allowlist refusal or a bad name never touches the network.
"""
from __future__ import annotations

import fnmatch
import os
import re
from pathlib import PurePosixPath

from huggingface_hub.utils import HFValidationError, validate_repo_id

from hpcstage.errors import PolicyError

REPO_TYPES = ("model", "dataset")
_COMMIT_RE = re.compile(r"^[0-9a-f]{40}$")
# git ref names: no "..", no control chars, none of ~^:?*[\ and no leading/trailing "/" or ".lock".
_BAD_REVISION = re.compile(r"(\.\.|[\x00-\x20\x7f~^:?*\[\\]|^/|/$|//|\.lock$|^-|@\{)")


def is_commit(revision: str) -> bool:
    return bool(_COMMIT_RE.match(revision))


def check_repo_id(repo_id: str) -> str:
    """Validate by the Hub's rules (huggingface_hub's validator); the error names the rule."""
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


def check_relative_path(path: str, what: str = "path") -> str:
    """A path from outside (tree entry, archive member, manifest dest) that must stay inside its folder."""
    parts = PurePosixPath(path).parts
    if (
        not path
        or "\x00" in path
        or "\\" in path
        or path.startswith("/")
        or os.path.isabs(path)
        or any(p in ("..", ".", "") for p in path.split("/"))
        or not parts
    ):
        raise PolicyError(f"refused {what} {path!r}: it must be a relative path that stays inside its folder")
    return path


class Allowlist:
    """`allow:` globs from the manifest (or a site policy): when present, anything else is refused."""

    def __init__(self, patterns: list[str] | None):
        self.patterns = list(patterns) if patterns is not None else None

    def check(self, repo_id: str) -> None:
        if self.patterns is None:
            return
        if not any(fnmatch.fnmatchcase(repo_id, p) for p in self.patterns):
            raise PolicyError(
                f"{repo_id} is not allowed by the allowlist ({', '.join(self.patterns) or 'empty'}): "
                "add a matching pattern to `allow:` or remove the entry"
            )
