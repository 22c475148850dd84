"""Typed errors. The library raises these; the CLI turns each into one line and an exit code.

Exit codes (DESIGN.md): 1 = the work failed (network, hub, hash, disk), 2 = bad input (usage, manifest, policy).

Every error a user or a library caller can see is an `HpcstageError`, with the fields `repo`, `path`,
`status` (the HTTP status that caused it, if any) and `hint` (the fix, also part of the message). Callers
tell errors apart by class and fields, never by their text.
"""

from __future__ import annotations


class HpcstageError(Exception):
    """Base class: `str(err)` is the one line the user sees; it names the thing and the fix."""

    exit_code = 1
    # Whether running the same command again can help (a network failure can pass, a gate does not).
    rerun_helps = False

    def __init__(
        self,
        message: str = "",
        *,
        repo: str | None = None,
        path: str | None = None,
        status: int | None = None,
        hint: str | None = None,
    ):
        super().__init__(message)
        self.repo, self.path, self.status, self.hint = repo, path, status, hint


class BadInput(HpcstageError):
    """Usage, manifest or policy errors: nothing was fetched or written."""

    exit_code = 2


class ManifestError(BadInput):
    pass


class PolicyError(BadInput):
    pass


class HubError(HpcstageError):
    """The Hub answered with a reason (repo or revision not found, access denied)."""


class EntryNotFound(HubError):
    """`X-Error-Code: EntryNotFound`: one file is missing at that commit; the repo's other files go on."""


class RepoRefused(HubError):
    """The Hub refuses the whole repo (gate, token, disabled, gone): every other file of it would get the
    same answer, so a pull stops that repo's remaining files at once and does not retry."""


class RepoNotFound(RepoRefused):
    """`X-Error-Code: RepoNotFound` (also what the Hub says for a private repo without access)."""


class RevisionNotFound(RepoRefused):
    """`X-Error-Code: RevisionNotFound`."""


class GatedRepo(RepoRefused):
    """`X-Error-Code: GatedRepo`: 401 without a token, 403 with a token that has no access (yet)."""


class InvalidToken(RepoRefused):
    """401 "Invalid credentials in Authorization header": the token itself is stale or wrong."""


class DisabledRepo(RepoRefused):
    """ "Access to this resource is disabled."."""


class TransferError(HpcstageError):
    """A download failed after retries, or a file's bytes did not match their hash."""

    rerun_helps = True


class HashMismatch(TransferError):
    """The bytes that arrived do not hash to what the listing promised (they were discarded)."""


class ProxyError(TransferError):
    """The proxy refused the tunnel (407 authentication required, 403 forbidden): the proxy settings or
    credentials must change, a rerun alone does not help."""

    rerun_helps = False
