"""One YAML file read, with every way it can fail (missing, unreadable, not UTF-8, not YAML) as one line that
names the file, the line when YAML knows it, and the fix: the manifest, the site policy, an experiment
summary and a training config all come through here."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from hpcstage.errors import HpcstageError


def read_yaml(path: Path, what: str, error: type[HpcstageError], fix: str) -> tuple[Any, str]:
    """(the parsed document, its text). `what` names the file's role ("manifest", "site policy"), `error`
    is the error type the caller raises, `fix` what the user should do."""
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as e:
        raise error(f"cannot read {what} {path} ({e.strerror}); {fix}") from None
    except UnicodeDecodeError as e:
        raise error(f"{path}: {what} is not UTF-8 text ({e.reason} at byte {e.start}); save it as UTF-8") from None
    try:
        return yaml.safe_load(text), text
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"{path}:{mark.line + 1}" if mark else str(path)
        raise error(f"{where}: {what} is not valid YAML ({getattr(e, 'problem', e)}); {fix}") from None
