"""Progress output: a bar on a terminal, plain periodic lines in logs."""

from __future__ import annotations

import io
import sys

import pytest

from dm_audit.progress import LogProgress, progress_bar


class _Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_lines_are_written_once_per_interval_and_at_the_end(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    clock = _Clock()
    monkeypatch.setattr("dm_audit.progress.time.monotonic", clock)
    out = io.StringIO()
    bar = LogProgress(total=100, desc="train dm", unit="it", interval_s=30.0, file=out)
    assert out.getvalue().endswith("train dm: started (100 it)\n")
    for _ in range(50):  # 50 updates in 10 s: no other line yet
        clock.now += 0.2
        bar.update(1)
    assert len(out.getvalue().splitlines()) == 1
    clock.now += 20.0
    bar.set_postfix(loss="0.41")
    bar.update(10)
    clock.now += 10.0
    bar.update(40)
    bar.close()
    bar.close()  # closing twice writes one final line
    lines = out.getvalue().splitlines()[1:]
    assert len(lines) == 2
    assert "\r" not in out.getvalue()
    assert lines[0].endswith("train dm: 60/100 it (60%), 2.0 it/s, ETA 20 s, loss=0.41")
    assert "train dm: 100/100 it (100%), 2.5 it/s, done in 40 s, loss=0.41" in lines[1]


def test_a_disabled_progress_writes_nothing() -> None:
    out = io.StringIO()
    bar = LogProgress(total=3, desc="x", disable=True, interval_s=0.0, file=out)
    bar.update(3)
    bar.close()
    assert out.getvalue() == ""


def test_a_resumed_count_starts_from_initial(monkeypatch: pytest.MonkeyPatch) -> None:
    clock = _Clock()
    monkeypatch.setattr("dm_audit.progress.time.monotonic", clock)
    bar = LogProgress(total=10, desc="x", initial=6, file=io.StringIO())
    clock.now += 2.0
    bar.update(2)
    assert "8/10 it (80%), 1.0 it/s, ETA 2 s" in bar.line(clock.now)


def test_bars_only_on_a_terminal(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sys, "stderr", io.StringIO())
    assert isinstance(progress_bar(total=5, desc="x", disable=True), LogProgress)

    class _Terminal(io.StringIO):
        def isatty(self) -> bool:
            return True

    monkeypatch.setattr(sys, "stderr", _Terminal())
    bar = progress_bar(total=5, desc="x", disable=True)
    assert not isinstance(bar, LogProgress)
    bar.close()


def test_work_shorter_than_the_delay_writes_nothing(monkeypatch: pytest.MonkeyPatch) -> None:
    clock = _Clock()
    monkeypatch.setattr("dm_audit.progress.time.monotonic", clock)
    out = io.StringIO()
    bar = LogProgress(total=10, desc="x", delay=2.0, file=out)
    clock.now += 1.0
    bar.update(10)
    bar.close()
    assert out.getvalue() == ""
    slow = LogProgress(total=10, desc="x", delay=2.0, file=out)
    clock.now += 3.0
    slow.update(10)
    slow.close()
    assert "done in 3 s" in out.getvalue()
