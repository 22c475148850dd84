"""Hub repos: resolve a revision to a commit and list its files, over the transfer engine's client.

The three metadata calls are made here rather than through `HfApi` because `HfApi.list_repo_tree` passes
no timeout (FACTS.md: a stalled server hangs it forever) and retries differently from content requests;
huggingface_hub still provides the endpoint, token, headers and pattern rules.
"""
from __future__ import annotations

import functools
import json
import os
from dataclasses import dataclass
from urllib.parse import quote, urlsplit

from hpcstage import __version__, policy
from hpcstage.errors import BadInput, HubError, TransferError
from hpcstage.hfcache import CachedFile
from hpcstage.transfer import Http

DEFAULT_ENDPOINT = "https://huggingface.co"


def endpoint() -> str:
    """HF_ENDPOINT as huggingface_hub honours it, read now (not at import). Checked here because
    huggingface_hub parses it at import time and a bad one would end in its traceback."""
    value = os.environ.get("HF_ENDPOINT", DEFAULT_ENDPOINT).rstrip("/")
    try:
        parts = urlsplit(value)
        parts.port  # noqa: B018 - raises ValueError for a bad port
    except ValueError as e:
        raise BadInput(f"HF_ENDPOINT={value!r} is not a URL ({e}); fix it, or unset it for huggingface.co") from None
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise BadInput(f"HF_ENDPOINT={value!r} is not an http(s) URL; fix it, or unset it for huggingface.co")
    return value


def hub_headers(token: str | None) -> dict[str, str]:
    """User agent plus Authorization when a token is known (HF_TOKEN or the token file)."""
    from huggingface_hub.utils import build_hf_headers

    return build_hf_headers(token=token or False, library_name="hpcstage", library_version=__version__)


@dataclass(frozen=True)
class RepoRef:
    repo_type: str
    repo_id: str

    @functools.cached_property
    def endpoint(self) -> str:
        """Read (and checked) once per repo, not once per file; lazily, so a warm pull never needs it."""
        return endpoint()

    @property
    def api(self) -> str:
        return f"{self.endpoint}/api/{self.repo_type}s/{self.repo_id}"

    def file_url(self, commit: str, path: str) -> str:
        prefix = "" if self.repo_type == "model" else f"{self.repo_type}s/"
        return f"{self.endpoint}/{prefix}{self.repo_id}/resolve/{commit}/{quote(path)}"


def _json(http: Http, url: str, ref: RepoRef, revision: str, what: str):
    resp = http.request("GET", url, what=what)
    try:
        body = resp.read()
    finally:
        resp.release_conn()
    if resp.status == 200:
        try:
            return json.loads(body), resp.headers
        except ValueError:
            raise TransferError(f"{what}: the endpoint answered 200 with something that is not JSON; is HF_ENDPOINT ({endpoint()}) a Hub?") from None
    code = resp.headers.get("X-Error-Code", "")
    if code == "RepoNotFound" or resp.status == 401:
        raise HubError(
            f"{ref.repo_type} repo {ref.repo_id} not found at {endpoint()} "
            "(check the id and --repo-type; private or gated repos need HF_TOKEN)"
        )
    if code == "RevisionNotFound":
        raise HubError(f"revision {revision!r} not found in {ref.repo_type} repo {ref.repo_id}; check --revision")
    if code == "GatedRepo" or resp.status == 403:
        raise HubError(f"access to {ref.repo_id} denied ({resp.status}); accept its terms on the Hub and set HF_TOKEN")
    raise HubError(f"{what}: the Hub answered {resp.status} {code}".rstrip())


def resolve(http: Http, ref: RepoRef, revision: str) -> str:
    """The 40-hex commit a branch, tag or sha names now."""
    url = f"{ref.api}/revision/{quote(revision, safe='')}"
    info, _ = _json(http, url, ref, revision, f"resolve {ref.repo_id}@{revision}")
    sha = info.get("sha") if isinstance(info, dict) else None
    if not isinstance(sha, str) or not policy.is_commit(sha):
        raise HubError(f"resolve {ref.repo_id}@{revision}: the Hub sent no commit sha")
    return sha


def list_files(http: Http, ref: RepoRef, commit: str) -> list[CachedFile]:
    """Every file at `commit`, following the `Link: rel=next` pages. Paths are checked: a hostile listing
    (absolute, `..`) fails here, before anything is written."""
    url: str | None = f"{ref.api}/tree/{commit}?recursive=true&expand=false"
    files: list[CachedFile] = []
    while url:
        page, headers = _json(http, url, ref, commit, f"list {ref.repo_id}@{commit[:12]}")
        if not isinstance(page, list):
            raise HubError(f"list {ref.repo_id}@{commit[:12]}: the listing is not a list; is HF_ENDPOINT a Hub?")
        for item in page:
            if not isinstance(item, dict) or item.get("type") != "file":
                continue
            path = policy.check_relative_path(item.get("path", ""), f"path from the {ref.repo_id} listing")
            try:
                lfs = item.get("lfs")
                files.append(CachedFile(path, int(item["size"]), item["oid"], lfs["oid"] if lfs else None))
            except (KeyError, TypeError, ValueError) as e:
                raise HubError(f"list {ref.repo_id}@{commit[:12]}: malformed entry for {path!r} ({e}); "
                               "nothing was written") from None
        url = _next_link(headers.get("Link", ""))
    return files


def _next_link(header: str) -> str | None:
    for part in header.split(","):
        if 'rel="next"' in part:
            return part.split(";")[0].strip().strip("<>")
    return None


def select(files: list[CachedFile], include: list[str] | None, exclude: list[str] | None) -> list[CachedFile]:
    """The same pattern rules as `snapshot_download(allow_patterns, ignore_patterns)`, so the offline
    completeness check agrees with what was staged."""
    from huggingface_hub.utils import filter_repo_objects

    return list(filter_repo_objects(files, allow_patterns=include, ignore_patterns=exclude, key=lambda f: f.path))
