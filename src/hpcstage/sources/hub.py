"""Hub repos: resolve a revision to a commit and list its files, over the transfer engine's client.

The three metadata calls are made here rather than through `HfApi` because `HfApi.list_repo_tree` passes
no timeout (FACTS.md: a stalled server hangs it forever) and retries differently from content requests;
huggingface_hub still provides the endpoint, token, headers and pattern rules.
"""

from __future__ import annotations

import functools
import json
import logging
import os
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote, unquote, urlsplit

from hpcstage import __version__, policy
from hpcstage.errors import (
    BadInput,
    DisabledRepo,
    EntryNotFound,
    GatedRepo,
    HpcstageError,
    HubError,
    InvalidToken,
    RepoNotFound,
    RevisionNotFound,
    TransferError,
)
from hpcstage.hfcache import CachedFile, listed_xet_hash
from hpcstage.transfer import Http, Response

logger = logging.getLogger(__name__)

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
        return f"{self.endpoint}/{self.prefix}{self.repo_id}/resolve/{commit}/{quote(path)}"

    @property
    def prefix(self) -> str:
        return "" if self.repo_type == "model" else f"{self.repo_type}s/"

    @property
    def page(self) -> str:
        """The repo's page, where a gated repo's access is requested."""
        return f"{self.endpoint}/{self.prefix}{self.repo_id}"


def parse_hub_url(url: str) -> tuple[RepoRef, str | None, str | None] | None:
    """(repo, revision, path) from an API or resolve URL of the endpoint, None for any other URL."""
    base = endpoint() + "/"
    if not url.startswith(base):
        return None
    segments = urlsplit(url).path[len(urlsplit(base).path) :].split("/")
    if segments[:1] == ["api"] and segments[1:2] in (["models"], ["datasets"]) and len(segments) >= 4:
        repo_type, rest = segments[1][:-1], segments[2:]
        revision = unquote(rest[3]) if len(rest) >= 4 and rest[2] in ("revision", "tree") else None
        path = None
    else:
        repo_type, rest = ("dataset", segments[1:]) if segments[:1] == ["datasets"] else ("model", segments)
        if len(rest) < 5 or rest[2] != "resolve":
            return None
        revision, path = unquote(rest[3]), unquote("/".join(rest[4:]))
    return RepoRef(repo_type, f"{unquote(rest[0])}/{unquote(rest[1])}"), revision, path


def _hf_error(resp: Response, url: str) -> Exception | None:
    """huggingface_hub's own reading of an error answer (X-Error-Code, X-Error-Message, its 401 rules), so
    that hpcstage names a refusal as `hf download` would."""
    import httpx2
    from huggingface_hub.utils import hf_raise_for_status

    answer = httpx2.Response(resp.status, headers=list(resp.headers.items()), request=httpx2.Request("GET", url))
    try:
        hf_raise_for_status(answer)
    except Exception as e:  # noqa: BLE001 - its classes are what we map below
        return e
    return None


def error_for(resp: Response, url: str) -> HpcstageError | None:
    """The typed error for an error answer of the Hub (Http's `errors` hook); None for other URLs."""
    from huggingface_hub.errors import (
        DisabledRepoError,
        GatedRepoError,
        RemoteEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    where = parse_hub_url(url)
    if where is None:
        return None
    ref, revision, path = where
    status, message = resp.status, (resp.headers.get("X-Error-Message") or "").strip()
    fields: dict[str, Any] = {"repo": ref.repo_id, "path": path, "status": status}
    if status == 401 and message == "Invalid credentials in Authorization header":  # huggingface_hub's test too
        hint = (
            f"create a read token at {ref.endpoint}/settings/tokens, then `hf auth login` (or export "
            "HF_TOKEN=...); for public repos, unset HF_TOKEN"
        )
        return InvalidToken(
            f"the Hub rejected your token (HF_TOKEN or the token file) as invalid or expired; {hint}",
            hint=hint,
            **fields,
        )
    found = _hf_error(resp, url)
    if isinstance(found, GatedRepoError):
        if resp.sent_auth:
            hint = f"request it at {ref.page}"
            return GatedRepo(f"your token has no access to {ref.repo_id} yet: {hint}", hint=hint, **fields)
        hint = f"log in (`hf auth login` or HF_TOKEN) and request access at {ref.page}"
        return GatedRepo(f"{ref.repo_id} is gated: {hint}", hint=hint, **fields)
    if isinstance(found, DisabledRepoError):
        return DisabledRepo(
            f"{ref.repo_type} repo {ref.repo_id} is disabled on the Hub ({message or 'disabled'}); "
            "nothing can be downloaded from it",
            **fields,
        )
    if isinstance(found, RevisionNotFoundError):
        hint = "check --revision"
        return RevisionNotFound(
            f"revision {revision!r} not found in {ref.repo_type} repo {ref.repo_id}; {hint}", hint=hint, **fields
        )
    if isinstance(found, RemoteEntryNotFoundError):
        return EntryNotFound(
            f"{ref.repo_id}/{path} not found at {revision}: the listing named a file the Hub does not have", **fields
        )
    if isinstance(found, RepositoryNotFoundError):
        hint = "check the id and --repo-type; private or gated repos need HF_TOKEN"
        return RepoNotFound(
            f"{ref.repo_type} repo {ref.repo_id} not found at {ref.endpoint} ({hint})", hint=hint, **fields
        )
    if 400 <= status < 500 and status not in (408, 429):
        detail = resp.headers.get("X-Error-Code") or message
        return HubError(
            f"{ref.repo_id}{'/' + path if path else ''}: the Hub answered {status}"
            + (f" ({detail})" if detail else ""),
            **fields,
        )
    return None


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
            raise TransferError(
                f"{what}: the endpoint answered 200 with something that is not JSON; "
                f"is HF_ENDPOINT ({endpoint()}) a Hub?"
            ) from None
    error = error_for(resp, url)
    raise error or HubError(f"{what}: the Hub answered {resp.status}", repo=ref.repo_id, status=resp.status)


def resolve(http: Http, ref: RepoRef, revision: str) -> str:
    """The 40-hex commit a branch, tag or sha names now."""
    return resolve_info(http, ref, revision)[0]


def resolve_info(http: Http, ref: RepoRef, revision: str) -> tuple[str, dict]:
    """The 40-hex commit a branch, tag or sha names now, and the repo info that came with it (`gated`, ...)."""
    url = f"{ref.api}/revision/{quote(revision, safe='')}"
    info, _ = _json(http, url, ref, revision, f"resolve {ref.repo_id}@{revision}")
    sha = info.get("sha") if isinstance(info, dict) else None
    if not isinstance(sha, str) or not policy.is_commit(sha):
        raise HubError(f"resolve {ref.repo_id}@{revision}: the Hub sent no commit sha", repo=ref.repo_id)
    return sha, info


def warn_if_gated(ref: RepoRef, info: dict, token: str | None) -> bool:
    """At plan time, before any download: a gated repo (the API says so) and no token cannot work."""
    if not info.get("gated") or token:
        return False
    logger.warning(
        "%s is gated and no token is set: its files will be refused; log in (`hf auth login` or "
        "HF_TOKEN) and request access at %s",
        ref.repo_id,
        ref.page,
    )
    return True


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
                files.append(
                    CachedFile(
                        path,
                        int(item["size"]),
                        item["oid"],
                        lfs["oid"] if lfs else None,
                        listed_xet_hash(item.get("xetHash")) if lfs else None,
                    )
                )
            except (KeyError, TypeError, ValueError) as e:
                raise HubError(
                    f"list {ref.repo_id}@{commit[:12]}: malformed entry for {path!r} ({e}); nothing was written"
                ) from None
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
