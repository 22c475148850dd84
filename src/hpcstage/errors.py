"""Typed errors. The library raises these; the CLI turns each into one line and an exit code.

Exit codes (DESIGN.md): 1 = the work failed (network, hub, hash, disk), 2 = bad input (usage, manifest, policy).
"""
from __future__ import annotations


class HpcstageError(Exception):
    """Base class: `str(err)` is the one line the user sees; it names the thing and the fix."""

    exit_code = 1


class BadInput(HpcstageError):
    """Usage, manifest or policy errors: nothing was fetched or written."""

    exit_code = 2


class ManifestError(BadInput):
    pass


class PolicyError(BadInput):
    pass


class HubError(HpcstageError):
    """The Hub answered with a reason (repo or revision not found, access denied)."""


class TransferError(HpcstageError):
    """A download failed after retries, or a file's bytes did not match their hash."""
