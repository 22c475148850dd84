"""The emulator's write API: what huggingface_hub 2.x's `create_repo` and `upload_folder` send.

- ``POST /api/repos/create`` (JSON ``name``, ``organization``, ``type``): creates the repo folder under the served
  root; 409 when it exists (the client's ``exist_ok`` accepts that).
- ``POST /api/{type}s/{repo}/preupload/{rev}`` (JSON ``files``: path, size, sample): every file is answered
  ``uploadMode: regular`` (sent inline in the commit), with the remote ``oid`` so unchanged files are skipped.
  The real Hub sends large and binary files to LFS/Xet storage instead, which this emulator does not speak:
  keep test uploads small.
- ``POST /api/{type}s/{repo}/commit/{rev}`` (NDJSON: a ``header``, then ``file`` with base64 content,
  ``deletedFile``, ``deletedFolder``): applied to the repo folder on ``main``; the answer names the new commit,
  which later reads (``hf download``, ``hpcstage pull``) see at once.

Every write needs a token (401 otherwise), and HubServer's `tokens` set, when given, limits which.
"""

from __future__ import annotations

import base64
import binascii
import json
import os
import shutil
import tempfile
import threading
from pathlib import Path

from hpcstage.testing.wire import (
    _KINDS,
    _NAME,
    INVALID_CREDENTIALS,
    _git_oid,
    _HubError,
    _json_response,
    _repo_path,
    _Response,
)

_WRITE = threading.Lock()  # one write at a time: commits to one repo from parallel jobs apply in turn


def _require_token(owner, headers) -> None:
    token = (headers.get("Authorization") or "").removeprefix("Bearer ").strip()
    if not token:
        raise _HubError(401, None, "Invalid username or password.")  # the Hub's answer to an anonymous write
    if owner.tokens is not None and token not in owner.tokens:
        raise _HubError(401, None, INVALID_CREDENTIALS)


def _prefix(kind: str) -> str:
    return "datasets/" if kind == "datasets" else ""


def create_repo(owner, headers, body: bytes) -> _Response:
    _require_token(owner, headers)
    try:
        request = json.loads(body or b"{}")
        kind = _KINDS[request.get("type") or "model"]
        org, name = request["organization"], request["name"]
    except (ValueError, KeyError, TypeError):
        raise _HubError(400, None, "Expected JSON with name, organization and type model or dataset") from None
    if not (isinstance(org, str) and isinstance(name, str) and _NAME.fullmatch(org) and _NAME.fullmatch(name)):
        raise _HubError(400, None, "Invalid repo name (this emulator needs an organization: no user namespaces)")
    folder = owner.root / kind / org / name
    url = f"{owner.url}/{_prefix(kind)}{org}/{name}"
    with _WRITE:
        if folder.exists():
            return _json_response(409, {"error": f"You already created this {kind[:-1]} repo", "url": url})
        folder.mkdir(parents=True)
    owner.refresh()
    return _json_response(200, {"url": url, "name": f"{org}/{name}"})


def preupload(owner, kind: str, repo_id: str, revision: str, headers, body: bytes) -> _Response:
    _require_token(owner, headers)
    current = owner._repos.revision(kind, repo_id, revision)
    try:
        paths = [f["path"] for f in json.loads(body)["files"]]
    except (ValueError, KeyError, TypeError):
        raise _HubError(400, None, "Expected JSON with files: [{path, size, sample}]") from None
    answer = []
    for path in paths:
        existing = current.files.get(_repo_path(str(path).split("/")))
        # a regular file's oid is its git blob sha1 (what the client compares), also where reads serve it as LFS
        oid = existing and (_git_oid(existing.local.read_bytes()) if existing.sha256 else existing.oid)
        answer.append({"path": path, "uploadMode": "regular", "shouldIgnore": False, "oid": oid or None})
    return _json_response(200, {"files": answer, "commitOid": current.commit})


def commit(owner, kind: str, repo_id: str, revision: str, headers, body: bytes) -> _Response:
    _require_token(owner, headers)
    if revision != "main":
        raise _HubError(400, None, "This emulator commits to main only")
    current = owner._repos.revision(kind, repo_id, "main")
    try:
        lines = [json.loads(line) for line in body.splitlines() if line.strip()]
    except ValueError:
        raise _HubError(400, None, "Expected NDJSON") from None
    if not lines or lines[0].get("key") != "header":
        raise _HubError(400, None, "The first line must be the commit header")
    parent = lines[0].get("value", {}).get("parentCommit")
    if parent and parent != current.commit:
        raise _HubError(412, None, f"A commit has happened since {parent}; pull and commit again")
    writes: dict[str, bytes] = {}
    deletes: list[tuple[str, bool]] = []
    for line in lines[1:]:
        key, value = line.get("key"), line.get("value") or {}
        path = _repo_path(str(value.get("path", "")).split("/"))
        if not path:
            raise _HubError(400, None, "Empty path in commit")
        if key == "file" and value.get("encoding") == "base64":
            try:
                writes[path] = base64.b64decode(value.get("content", ""), validate=True)
            except (binascii.Error, ValueError):
                raise _HubError(400, None, f"Invalid base64 content for {path!r}") from None
        elif key in ("deletedFile", "deletedFolder"):
            deletes.append((path, key == "deletedFolder"))
        elif key == "lfsFile":
            raise _HubError(422, None, "This emulator takes files inline only (preupload says regular), not LFS")
        else:
            raise _HubError(400, None, f"Unknown commit operation {key!r}")
    folder = owner.root / kind / repo_id
    with _WRITE:
        for path, is_folder in deletes:
            target = folder / path
            if is_folder and target.is_dir() and not target.is_symlink():
                shutil.rmtree(target)
            elif target.is_file() or target.is_symlink():
                target.unlink()
        for path, data in writes.items():
            _write(folder, path, data)
    owner.refresh()
    new = owner._repos.revision(kind, repo_id, "main").commit
    return _json_response(
        200,
        {
            "success": True,
            "commitOid": new,
            "pullRequestUrl": None,
            "commitUrl": f"{owner.url}/{_prefix(kind)}{repo_id}/commit/{new}",
        },
    )


def _write(folder: Path, path: str, data: bytes) -> None:
    """Atomically, and never through a link out of the repo folder."""
    target = folder / path
    target.parent.mkdir(parents=True, exist_ok=True)
    if not Path(os.path.realpath(target.parent)).is_relative_to(os.path.realpath(folder)) or target.is_symlink():
        raise _HubError(400, None, f"Invalid path {path!r}")
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=".upload-")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, target)
    except BaseException:
        os.unlink(tmp)
        raise
