"""With HPCSTAGE_REQUIRE_ALL=1 (CI sets it) a skipped test fails instead, naming why it would have been
skipped: a machine missing openssl, `unshare`, prlimit, root or tmpfs cannot make the suite quietly
smaller. Loaded by conftest.py (`pytest_plugins`); a plain `pytest` run on a laptop still skips."""
from __future__ import annotations

import os

import pytest

ENV = "HPCSTAGE_REQUIRE_ALL"


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    if os.environ.get(ENV) != "1" or not report.skipped or hasattr(report, "wasxfail"):
        return
    reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
    report.outcome = "failed"
    report.longrepr = f"skipped while {ENV}=1: {reason}; install or allow what it needs (.ci/run)"
