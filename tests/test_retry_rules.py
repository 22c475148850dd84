"""The rules behind retries, taken one at a time (the end-to-end waits are in test_guarantees.py): how long
a Retry-After or a RateLimit header says to wait, how backoff grows, and which Content-Range a 206 must
carry. Pure functions: these tests assert the values, so every rule has a test that fails when it breaks."""
from __future__ import annotations

import email.utils
import http.client
import time

import pytest

from hpcstage.errors import TransferError
from hpcstage.transfer import RetryPolicy, parse_retry_after, ratelimit_wait
from hpcstage.transfer.ranged import _check_content_range


def _headers(**fields: str) -> http.client.HTTPMessage:
    msg = http.client.HTTPMessage()  # what the server's response carries: case-insensitive names
    for name, value in fields.items():
        msg[name.replace("_", "-")] = value
    return msg


@pytest.mark.parametrize("value, seconds", [("7", 7.0), (" 12 ", 12.0), ("0", 0.0), (None, None), ("", None),
                                            ("soon", None), ("-3", None), ("1.5", None)])
def test_retry_after_in_seconds(value, seconds):
    assert parse_retry_after(value) == seconds


def test_retry_after_as_an_http_date_counts_from_now_and_never_below_zero():
    ahead = parse_retry_after(email.utils.formatdate(time.time() + 120, usegmt=True))
    assert ahead is not None and 100 <= ahead <= 121  # a date, not a number of seconds: the time until it
    assert parse_retry_after(email.utils.formatdate(time.time() - 3600, usegmt=True)) == 0.0


def test_a_servers_hint_replaces_backoff_and_backoff_doubles_up_to_the_cap():
    policy = RetryPolicy()  # the defaults: 1 s, doubling, at most 16 s
    assert policy.delay(5, "3") == 3.0
    for attempt, full in [(0, 1.0), (1, 2.0), (2, 4.0), (3, 8.0), (4, 16.0), (6, 16.0)]:
        waits = [policy.delay(attempt, None) for _ in range(50)]
        assert all(full * 0.5 <= w <= full for w in waits), (attempt, min(waits), max(waits))
        assert max(waits) > full * 0.75 and min(waits) < full * 0.75  # jitter spreads over half to all of it
    assert RetryPolicy(base=0.5, cap=3.0).delay(1, None) <= 1.0  # base scales it
    assert RetryPolicy(base=1.0, cap=3.0).delay(4, None) <= 3.0  # the cap bounds it


def test_the_default_tries_and_budget_are_the_documented_ones():
    """README: errors are retried (6 tries) within --retry-budget (default 900), for library callers too."""
    assert (RetryPolicy().attempts, RetryPolicy().budget) == (6, 900.0)


def test_a_429s_wait_is_the_larger_of_retry_after_and_the_windows_reset_plus_one():
    window = '"fixed window";"resolvers";q=3000;w=300'
    assert ratelimit_wait(_headers(RateLimit='"resolvers";r=0;t=40', RateLimit_Policy=window)) == 41.0
    assert ratelimit_wait(_headers(RateLimit='"resolvers";r=0;t=0', RateLimit_Policy=window)) == 1.0
    assert ratelimit_wait(_headers(RateLimit='"resolvers";r=0;t=40', Retry_After="60")) == 60.0
    assert ratelimit_wait(_headers(RateLimit='"resolvers";r=0;t=40', Retry_After="5")) == 41.0
    assert ratelimit_wait(_headers(Retry_After="9")) == 9.0
    # requests left in the window: the reset is no reason to wait
    assert ratelimit_wait(_headers(RateLimit='"resolvers";r=7;t=40', Retry_After="2")) == 2.0
    assert ratelimit_wait(_headers(RateLimit='"resolvers";r=7;t=40')) is None
    assert ratelimit_wait(_headers()) is None
    assert ratelimit_wait(_headers(ratelimit='"resolvers";r=0;t=4')) == 5.0  # header names in any case


@pytest.mark.parametrize("value", [None, "bytes 100-199/1000", "bytes 100-199/*", " bytes 100-199/1000 "])
def test_a_206_with_the_bytes_asked_for_passes(value):
    _check_content_range(value, 100, 200, 1000, "f")


def test_a_206_for_a_piece_gigabytes_into_the_file_passes():
    """Offsets as large as real pieces have (compared by value: large ints are distinct objects)."""
    start, end, size = 5 * 2**30, 5 * 2**30 + 4 * 2**20, 6 * 2**30
    _check_content_range(f"bytes {start}-{end - 1}/{size}", start, end, size, "f")


@pytest.mark.parametrize("value", ["bytes 101-199/1000", "bytes 100-200/1000", "bytes 100-198/1000",
                                   "bytes 100-199/999", "items 100-199/1000", "byte 100-199/1000",
                                   "bytes 100-199/1001", "bytes 100-199/", "bytes 99-199/1000", "bytes 100-x/1000", "bytes",
                                   "bytes 0-999/1000"])
def test_a_206_with_other_bytes_is_refused_naming_what_came(value):
    with pytest.raises(TransferError) as e:
        _check_content_range(value, 100, 200, 1000, "f")
    assert "asked for bytes 100-199 of 1000" in str(e.value) and repr(value) in str(e.value)
