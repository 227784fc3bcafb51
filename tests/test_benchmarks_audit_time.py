"""The time-breakdown benchmark's clock and instrumentation (not its figures)."""

from __future__ import annotations

import pytest
import torch

from dm_audit import engine, inference
from dm_audit.audit import AuditConfig, run_audit
from tests.conftest import load_benchmark


@pytest.fixture(scope="module")
def audit_time():
    yield from load_benchmark("audit_time")


def test_a_nested_phase_is_counted_once_in_the_inner_phase(audit_time, monkeypatch) -> None:
    now = iter([0.0, 1.0, 4.0, 10.0])  # outer enters, inner enters, inner leaves, outer leaves
    monkeypatch.setattr(audit_time.time, "perf_counter", lambda: next(now))
    clock = audit_time.PhaseClock()
    clock.enter("outer")
    clock.enter("inner")
    assert clock.current == "inner"
    clock.leave()
    clock.leave()
    assert dict(clock.seconds) == {"outer": 7.0, "inner": 3.0}
    assert dict(clock.calls) == {"outer": 1, "inner": 1}
    assert clock.current is None


def test_within_times_a_call_only_directly_inside_that_phase(audit_time) -> None:
    clock = audit_time.PhaseClock()
    inner = clock.timed("inner", lambda: 1, within="step")
    assert inner() == 1 and "inner" not in clock.calls
    clock.enter("step")
    assert inner() == 1
    clock.leave()
    assert clock.calls["inner"] == 1


def test_an_audit_is_timed_by_phase_and_everything_is_restored(audit_time, blobs_dataset) -> None:
    originals = (engine._step, engine._EpochTally.add, inference.forward_all, torch.Tensor.backward)
    clock = audit_time.PhaseClock()
    with audit_time.instrumented(clock):
        assert engine._step is not originals[0]
        run_audit(
            blobs_dataset,
            AuditConfig(seed=0, epochs=3, probe_epochs=2, progress=False, device="cpu"),
        )
    assert (engine._step, engine._EpochTally.add, inference.forward_all, torch.Tensor.backward) == (
        originals
    )
    steps = clock.calls[audit_time.STEP]
    assert steps > 0
    # Every optimisation step has one timed forward, loss, backward and optimiser step.
    for phase in ("forward", "loss with its DM weighting", "backward", "optimiser step"):
        assert clock.calls[phase] == steps, phase
        assert clock.seconds[phase] > 0.0
    assert clock.calls["per-epoch evaluation and scoring passes"] > 0
    assert clock.calls["neighbour search (faiss)"] > 0
    assert clock.calls["report: tables and plots"] == 1
    assert all(seconds >= 0.0 for seconds in clock.seconds.values())


def test_the_results_table_lists_every_part_and_what_no_phase_claims(audit_time, tmp_path) -> None:
    result = {
        "rows": 100,
        "seed": 0,
        "start_up": 1.0,
        "loading": 0.5,
        "audit": 10.0,
        "to_flags": 6.0,
        "stages": {"probe": 2.0, "audit": 4.0, "report": 4.0},
        "phases": {"forward": 3.0, "backward": 5.0},
        "calls": {"forward": 7, "backward": 7},
        "f1": 0.9,
        "cleanlab_train": 2.0,
        "cleanlab_find": 0.1,
    }
    text = audit_time.write(tmp_path, result, (0.5, 0.4, 0.3)).read_text()
    assert "| **total** | **11.5** | |" in text
    assert "| backward | 5.00 | 50% | 7 |" in text
    assert text.index("| backward |") < text.index("| forward |")  # largest first
    assert "| other | 2.00 | 20% | |" in text
    assert "2.1 s (every core)" in text
