"""Progress of long work: a bar on a terminal, plain log lines anywhere else.

A progress bar redraws its line about ten times a second with carriage returns; written to a
file (a scheduled job's log, Dagster's captured output) that is thousands of unreadable lines.
`progress_bar` therefore returns a tqdm bar only when stderr is a terminal, and otherwise an
object with the same small interface that prints one plain, timestamped line when the work
starts, one every `LOG_INTERVAL_S` seconds and one when it ends::

    2026-11-30 14:02:11 train dm: 1200/5000 it (24%), 85.1 it/s, ETA 45 s, loss=0.412
"""

from __future__ import annotations

import sys
import time
from datetime import datetime
from typing import IO, Any

__all__ = ["LOG_INTERVAL_S", "LogProgress", "announce", "duration", "progress_bar"]

# One line every 30 s: a 20-minute training writes 40 lines, enough to see it move and to
# estimate its end, few enough to read.
LOG_INTERVAL_S = 30.0


def duration(seconds: float) -> str:
    """A duration as people read it: seconds, minutes or hours."""
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 5400:
        return f"{seconds / 60:.1f} min"
    return f"{seconds / 3600:.1f} h"


class LogProgress:
    """tqdm's interface (`update`, `set_postfix`, `n`, `refresh`, `close`), written as lines.

    Parameters
    ----------
    total : int or None
    desc : str
    unit : str
    initial : int
        Work already done (a resumed training).
    disable : bool
        Write nothing.
    interval_s : float
        Seconds between lines.
    file : text stream, optional
        Default: ``sys.stderr`` at the time of each write.
    delay : float
        Work that ends within this many seconds writes nothing (tqdm's ``delay``).
    """

    def __init__(
        self,
        total: int | None = None,
        desc: str = "",
        unit: str = "it",
        initial: int = 0,
        disable: bool = False,
        interval_s: float = LOG_INTERVAL_S,
        file: IO[str] | None = None,
        delay: float = 0.0,
        **_ignored: Any,
    ) -> None:
        self.total = total
        self.desc = desc
        self.unit = unit
        self.n = initial
        self.disable = disable
        self.interval_s = interval_s
        self.file = file
        self.delay = delay
        self.postfix = ""
        self._start_n = initial
        self._start = time.monotonic()
        self._last = self._start
        self._closed = False
        if delay <= 0:
            # A line when the work starts: a log shows at once what runs and how big it is.
            self._write(self._start, started=True)

    def update(self, n: int = 1) -> None:
        self.n += n
        now = time.monotonic()
        if now - self._last >= self.interval_s:
            self._last = now
            self._write(now)

    def set_postfix(
        self, ordered_dict: dict[str, Any] | None = None, refresh: bool = True, **kwargs: Any
    ) -> None:
        items = {**(ordered_dict or {}), **kwargs}
        self.postfix = ", ".join(f"{k}={v}" for k, v in items.items())

    def refresh(self) -> None:
        """Nothing to redraw: the next line shows the new position."""

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            now = time.monotonic()
            if now - self._start >= self.delay:
                self._write(now, final=True)

    def line(self, now: float, *, final: bool = False, started: bool = False) -> str:
        """The text of one progress line."""
        stamp = datetime.now().strftime("%Y-%m-%d %H:%M:%S")
        if started:
            size = f"{self.total} {self.unit}" if self.total else "unknown size"
            return f"{stamp} {self.desc}: started ({size})"
        elapsed = max(now - self._start, 1e-9)
        rate = (self.n - self._start_n) / elapsed
        done = f"{self.n}/{self.total}" if self.total else f"{self.n}"
        parts = [f"{done} {self.unit}"]
        if self.total:
            parts[0] += f" ({100.0 * self.n / self.total:.0f}%)"
        parts.append(f"{rate:.1f} {self.unit}/s")
        if final:
            parts.append(f"done in {duration(elapsed)}")
        elif self.total and rate > 0:
            parts.append(f"ETA {duration((self.total - self.n) / rate)}")
        if self.postfix:
            parts.append(self.postfix)
        return f"{stamp} {self.desc}: {', '.join(parts)}"

    def _write(self, now: float, *, final: bool = False, started: bool = False) -> None:
        if self.disable:
            return
        stream = self.file or sys.stderr
        print(self.line(now, final=final, started=started), file=stream, flush=True)

    def __enter__(self) -> LogProgress:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _is_terminal(stream: IO[str]) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):  # a closed or replaced stream
        return False


def progress_bar(**options: Any) -> Any:
    """A tqdm bar when stderr is a terminal, else a `LogProgress` (same options).

    Parameters
    ----------
    **options
        tqdm's: ``total``, ``desc``, ``unit``, ``initial``, ``disable``, ...
    """
    if _is_terminal(sys.stderr):
        from tqdm.auto import tqdm

        return tqdm(**options)
    return LogProgress(**options)


def announce(text: str, stream: IO[str] | None = None) -> None:
    """One timestamped line on stderr (or `stream`), like the plain progress lines."""
    out = sys.stderr if stream is None else stream
    print(f"{datetime.now():%Y-%m-%d %H:%M:%S} dm-audit: {text}", file=out, flush=True)
