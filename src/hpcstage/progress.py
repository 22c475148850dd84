"""Progress for people and for logs: rich bars on a terminal, plain timestamped lines otherwise.

Slurm captures stdout/stderr into files where bars turn into megabytes of carriage returns, so off a
terminal we print one line every `interval` seconds instead.
"""

from __future__ import annotations

import sys
import threading
import time
from collections.abc import Callable
from datetime import datetime
from typing import TextIO

# The library's progress callback: (bytes done, bytes in all, files done, files in all), from worker threads.
ProgressCallback = Callable[[int, int, int, int], None]


def human_bytes(n: float) -> str:
    for unit in ("B", "kB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} TB"


def stamp() -> str:
    return datetime.now().strftime("[%Y-%m-%d %H:%M:%S]")


class Progress:
    """Thread-safe counters of bytes and files; workers call `add` and `file_done`. `callback` (the library's
    `progress=`) is told the counts after each change and once more on close, drawn or not."""

    def __init__(
        self,
        total_bytes: int,
        total_files: int,
        *,
        label: str = "pull",
        quiet: bool = False,
        stream: TextIO | None = None,
        interval: float = 10.0,
        callback: ProgressCallback | None = None,
    ):
        self.total_bytes, self.total_files, self.label = total_bytes, total_files, label
        self.bytes = self.files = 0
        self._note = ""  # what the run waits for, e.g. "rate-limited by the Hub: resuming in 40 s (...)"
        self.started = time.monotonic()
        self._lock = threading.Lock()
        self._stream = stream or sys.stderr
        self._stop = threading.Event()
        self._bar = self._thread = None
        self._callback = callback
        if quiet:
            return
        if self._stream.isatty():
            from rich.console import Console
            from rich.progress import BarColumn, DownloadColumn, TextColumn, TimeRemainingColumn, TransferSpeedColumn
            from rich.progress import Progress as Bars

            self._bar = Bars(
                TextColumn("{task.description}"),
                BarColumn(),
                DownloadColumn(),
                TransferSpeedColumn(),
                TextColumn("{task.fields[files]}"),
                TimeRemainingColumn(),
                console=Console(file=self._stream),
                transient=False,
            )
            self._task = self._bar.add_task(label, total=total_bytes, files=self._files_text())
            self._bar.start()
        else:
            self._thread = threading.Thread(target=self._log_loop, args=(interval,), daemon=True)
            self._thread.start()

    def _files_text(self) -> str:
        return f"{self.files}/{self.total_files} files"

    def add(self, n: int) -> None:
        with self._lock:
            self.bytes += n
        self._tell()
        if self._bar is not None:
            self._bar.update(self._task, advance=n)

    def file_done(self) -> None:
        with self._lock:
            self.files += 1
        self._tell()
        if self._bar is not None:
            self._bar.update(self._task, files=self._files_text())

    def _tell(self) -> None:
        if self._callback is not None:
            self._callback(self.bytes, self.total_bytes, self.files, self.total_files)

    def relabel(self, label: str) -> None:
        """Change what the bar (or log line) is called: e.g. what the work is waiting for."""
        self.label = label
        if self._bar is not None:
            self._bar.update(self._task, description=label)

    def note(self, text: str | None) -> None:
        """Shown on the bar and in the next progress line until cleared with None."""
        self._note = text or ""
        if self._bar is not None:
            self._bar.update(self._task, description=f"{self.label}: {text}" if text else self.label)

    def line(self) -> str:
        elapsed = max(time.monotonic() - self.started, 1e-9)
        rate = self.bytes / elapsed
        left = self.total_bytes - self.bytes
        eta = f", ETA {left / rate:.0f}s" if rate > 0 and left > 0 else ""
        return (
            f"{stamp()} {self.label}: {self._files_text()}, {human_bytes(self.bytes)}/{human_bytes(self.total_bytes)}, "
            f"{human_bytes(rate)}/s{eta}" + (f"; {self._note}" if self._note else "")
        )

    def _log_loop(self, interval: float) -> None:
        while not self._stop.wait(interval):
            print(self.line(), file=self._stream, flush=True)

    def close(self) -> None:
        self._tell()
        self._stop.set()
        if self._bar is not None:
            self._bar.stop()
        elif self._thread is not None:
            self._thread.join()
            print(self.line(), file=self._stream, flush=True)

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
