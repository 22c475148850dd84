"""In-flight control of large files: how many range requests one client runs at once (`Streams`), and the
piece buffers all of a process's large files share (`BUFFER_BUDGET`, the memory bound).

The stream count adapts: as many streams as raise the throughput. Why: one TCP stream over a long path, or
from a CDN that caps each connection, carries a small part of a login node's uplink, so a fixed count leaves
most of the pipe empty exactly where a pull is long (hundreds of GB over the WAN); over a fast link more
streams only add overhead. Nothing in huggingface_hub or the standard library decides this for plain HTTP
ranges (hf_xet adapts its own protocol's fetches), hence this small controller, in the manner of TCP's slow
start and AIMD but on the aggregate byte rate of all large files of the client:

- start at START streams; after a change, let a piece's time pass (new streams connect and ask), then
  measure the rate over a window (at least MIN_WINDOW, and at least one piece's time, so that every
  stream is counted over a whole request and its wait);
- while each step up raises the rate by at least GAIN of what the new streams would add if each carried
  what the old ones did, double (growing); when a step does not, go back to the count that proved itself
  and, one window later, try a quarter more (the count that fills the pipe may lie between);
- after a step of a quarter more that paid off, take the next one; after one that did not, hold, and try
  again every PROBE_EVERY windows (the link may have freed up);
- on trouble (a dropped connection, a retried 5xx, a 429) halve at once, at most once per window, and
  grow again only by probing;
- a window in which no file's hasher had to wait for its next piece is CPU-bound, not link-bound: the bytes
  already arrive faster than sha256 on one core takes them (loopback, a fast LAN), so more streams cannot
  raise the rate and only cost CPU (threads, requests, wake-ups); such a window grows nothing and counts
  as "no better" for a step up.

The count is bounded by `most` (--max-connections) and by the piece buffers (`buffers`: the memory
budget; every stream holds one, and each file two more for in-order hashing). Several large files share
the count fairly: each gets an equal part (`share`).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

MAX_CONNECTIONS = 32  # range requests at once for all large files of a client (--max-connections)
BUFFERS = 32  # PIECE buffers for all large files of a process at once: 128 MiB (peak RSS <= 200 MB)
BUFFER_BUDGET = threading.BoundedSemaphore(BUFFERS)  # taken per buffer by `ranged`, whatever --workers is
START = 4  # streams before anything is measured (the fixed count of earlier versions: right on loopback)
# A step up must add at least this fraction of its proportional gain: each new stream a quarter of what an old
# one carries. Low, because too few streams on a capped link cost far more than a few too many on a fast one,
# and a busy machine's noise (+-50% between windows here) fools any threshold now and then.
GAIN = 0.25
MIN_WINDOW = 0.2  # seconds: shortest measurement window (shorter ones measure the neighbours' load)
SETTLE = 0.05  # seconds at least between a change and its window: new streams connect and ask
PROBE_EVERY = 8  # windows held before one step up is tried again
logger = logging.getLogger(__name__)


class Streams:
    """The range-stream count of one client (see the module docstring). Files `join` and `leave`; their
    range threads report bytes (`moved`), finished pieces (`piece_done`) and `trouble`; `share` is how
    many streams a file may run now, and a file's `wake` callback hears when that may have changed."""

    def __init__(self, most: int, buffers: int, clock: Callable[[], float] = time.monotonic):
        self.most = max(1, most)
        self.buffers = buffers
        self.clock = clock
        self.limit = min(START, self.most)  # streams wanted now, all files together
        self.growing = True  # doubling until a step does not pay off
        self.proven: tuple[int, float] | None = None  # (count, bytes/s) of the last count that proved itself
        self.piece_time = 0.0  # seconds a piece takes, smoothed: the measurement window follows it
        self._files: list[object] = []
        self._wakers: dict[int, Callable[[], None]] = {}
        self._lock = threading.Lock()
        self._bytes = 0
        self._settle_until = 0.0  # new streams are still connecting: their bytes are not measured yet
        self._mark: tuple[float, int] | None = None  # (time, bytes) where the current window began
        self._held = 0  # windows measured at the held count since the last probe
        self._calm_until = 0.0  # trouble before this does not halve again
        self._hashed = 0  # pieces the files' hashers took in the current window
        self._hash_waits = 0  # ... of which a hasher had to wait for (the link is behind the CPU)

    # -- the files ----------------------------------------------------------------------------------

    def join(self, file: object, wake: Callable[[], None]) -> None:
        with self._lock:
            self._files.append(file)
            self._wakers[id(file)] = wake
        self._wake()

    def leave(self, file: object) -> None:
        with self._lock:
            if file in self._files:
                self._files.remove(file)
                self._wakers.pop(id(file), None)
        self._wake()

    def cap(self) -> int:
        """What the count may reach: --max-connections, and the buffers left once every file has its two."""
        return max(1, min(self.most, self.buffers - 2 * max(1, len(self._files))))

    def share(self, file: object) -> int:
        """The streams `file` may run now: an equal part of the count (earlier files get the remainder)."""
        with self._lock:
            n = len(self._files) or 1
            k = self._files.index(file) if file in self._files else n - 1
            total = min(self.limit, self.cap())
            return max(1, total // n + (1 if k < total % n else 0))

    # -- what the range threads report --------------------------------------------------------------

    def moved(self, n: int) -> None:
        """`n` bytes arrived for a large file."""
        with self._lock:
            self._bytes += n
            changed = self._tick(self.clock())
        if changed:
            self._wake()

    def piece_done(self, seconds: float) -> None:
        """A piece took `seconds` from its request to its last byte."""
        with self._lock:
            if not self.piece_time:  # the first piece: the others are under way now, measure from here
                self._settle_until = self.clock() + max(SETTLE, seconds / 2)
            self.piece_time = seconds if not self.piece_time else 0.8 * self.piece_time + 0.2 * seconds

    def hashed(self, waited: bool) -> None:
        """A file's hasher took its next piece, `waited` for it to arrive or found it already there."""
        with self._lock:
            self._hashed += 1
            self._hash_waits += waited

    def trouble(self) -> None:
        """A connection dropped or a request was retried (5xx, 429): fewer streams, now."""
        with self._lock:
            now = self.clock()
            if now < self._calm_until or self.limit == 1:
                return
            self.growing, self.proven = False, None
            self._set(max(1, self.limit // 2), now)
            self._calm_until = self._settle_until + self._window()
            logger.info("range streams: a drop or a retry, down to %d", self.limit)
        self._wake()

    # -- deciding -----------------------------------------------------------------------------------

    def _window(self) -> float:
        return max(MIN_WINDOW, self.piece_time)

    def _set(self, count: int, now: float) -> None:
        count = max(1, min(count, self.cap()))
        if count == self.limit:
            return
        self.limit = count
        self._settle_until = now + max(SETTLE, self.piece_time)  # every stream is on a piece of the new count
        self._mark = None

    def _tick(self, now: float) -> bool:
        """Close the measurement window when it is over; True when the count changed."""
        if now < self._settle_until or not self.piece_time:  # a window spans at least one piece's time
            return False
        if self._mark is None:
            self._mark = (now, self._bytes)
            self._hashed = self._hash_waits = 0
            return False
        began, at = self._mark
        if now - began < self._window():
            return False
        before = self.limit
        cpu_bound = self._hashed > 0 and not self._hash_waits
        self._hashed = self._hash_waits = 0
        self.judge((self._bytes - at) / (now - began), now, cpu_bound)
        return self.limit != before

    def judge(self, rate: float, now: float, cpu_bound: bool = False) -> None:
        """One window's rate (bytes/s) at the current count: grow, hold, or go back. `cpu_bound`: the hashers
        never waited for a piece in this window, so the link was not what limited the rate."""
        n = self.limit
        self._mark = (now, self._bytes)
        if cpu_bound:  # hold here (or go back to what proved itself): more streams would only cost CPU
            self.growing, self._held = False, 0
            if self.proven is None or self.proven[0] >= n:
                self.proven = (n, rate)
            self._set(self.proven[0], now)
        elif self.proven is None or self.proven[0] == n:  # the first window, or the held count again
            self.proven = (n, rate)
            self._held += 1
            if self.growing:
                self._set(n * 2, now)
            elif self._held >= PROBE_EVERY:
                self._held = 0
                self._set(n + max(1, n // 4), now)
        elif n > self.proven[0] and rate >= self.proven[1] * (1 + GAIN * (n / self.proven[0] - 1)):
            self.proven, self._held = (n, rate), 0  # the new streams paid off
            self._set(n * 2 if self.growing else n + max(1, n // 4), now)
        else:  # no better (or worse): back to what proved itself; at the end of the doubling, try a
            # quarter more after one window there (between n/2 and n may lie the count that fills the pipe)
            self._held = PROBE_EVERY - 1 if self.growing else 0
            self.growing = False
            self._set(self.proven[0], now)
        logger.log(
            logging.INFO if self.limit != n else logging.DEBUG,
            "range streams: %d at %.0f MB/s -> %d",
            n,
            rate / 1e6,
            self.limit,
        )

    def _wake(self) -> None:
        with self._lock:
            wakers = list(self._wakers.values())
        for wake in wakers:
            wake()
