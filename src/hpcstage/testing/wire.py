"""The Hub's wire shapes that both sides of the emulator use: the read side (hub.py) and the write side
(uploads.py). Kept apart so that neither imports the other's module back: repo kinds and names, error and
JSON answers, git blob ids, and repo paths taken from URL segments.
"""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path
from typing import NamedTuple
from urllib.parse import unquote

_KINDS = {"model": "models", "dataset": "datasets"}
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")  # org, repo name and revision folder names
INVALID_CREDENTIALS = "Invalid credentials in Authorization header"  # the real Hub's X-Error-Message


class _HubError(Exception):
    """An error answer in the Hub's shape: status, `X-Error-Code`, JSON `{"error": ...}`."""

    def __init__(self, status: int, code: str | None, message: str, headers: dict | None = None):
        super().__init__(message)
        self.status, self.code, self.headers = status, code, headers or {}


class _FileSlice(NamedTuple):
    path: Path
    offset: int
    length: int


class _Response(NamedTuple):
    status: int
    headers: dict[str, str]
    body: bytes | _FileSlice


def _json_response(status: int, obj, headers: dict | None = None) -> _Response:
    return _Response(
        status, {"Content-Type": "application/json; charset=utf-8", **(headers or {})}, json.dumps(obj).encode()
    )


def _error_response(error: _HubError) -> _Response:
    headers = dict(error.headers)
    if error.code:
        headers["X-Error-Code"] = error.code
    headers["X-Error-Message"] = str(error).encode("ascii", "backslashreplace").decode()  # headers are latin-1
    return _json_response(error.status, {"error": str(error)}, headers)


def _git_oid(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def _repo_path(segments: list[str]) -> str:
    """A path inside a repo from URL segments; refuses anything that could leave the repo folder."""
    path = "/".join(unquote(s) for s in segments).rstrip("/")
    if "\0" in path or "\\" in path or (path and any(p in ("", ".", "..") for p in path.split("/"))):
        raise _HubError(400, None, f"Invalid path {path!r}")
    return path
