"""The time-breakdown benchmark's clock and instrumentation (not its figures)."""

from __future__ import annotations

import sys

import pytest
import torch
from torch.nn.modules import module as torch_module
from torch.optim import optimizer as torch_optimizer

from dm_audit import engine
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


def _bindings() -> dict[tuple[str, str], object]:
    """Every attribute of every dm_audit module and class, and torch's patched ones."""
    found: dict[tuple[str, str], object] = {}
    for module in list(sys.modules.values()):
        name = getattr(module, "__name__", "")
        if not name.startswith("dm_audit"):
            continue
        for attr, value in list(vars(module).items()):
            found[(name, attr)] = value
            if isinstance(value, type):
                for member, inner in vars(value).items():
                    found[(f"{name}.{attr}", member)] = inner
    found[("torch.Tensor", "backward")] = torch.Tensor.backward
    return found


def _global_hook_counts() -> tuple[int, ...]:
    return (
        len(torch_module._global_forward_pre_hooks),
        len(torch_module._global_forward_hooks),
        len(torch_optimizer._global_optimizer_pre_hooks),
        len(torch_optimizer._global_optimizer_post_hooks),
    )


def test_an_audit_is_timed_by_phase_and_everything_is_restored(audit_time, blobs_dataset) -> None:
    before, hooks = _bindings(), _global_hook_counts()
    clock = audit_time.PhaseClock()
    with audit_time.instrumented(clock):
        assert engine._step is not before[("dm_audit.engine", "_step")]
        assert _global_hook_counts() != hooks
        run_audit(
            blobs_dataset,
            AuditConfig(seed=0, epochs=3, probe_epochs=2, progress=False, device="cpu"),
        )
    after = _bindings()
    changed = [key for key, value in before.items() if after.get(key) is not value]
    assert changed == []
    assert _global_hook_counts() == hooks
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
        "checkpoint_seconds": 0.0,
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
    audit_time.write(tmp_path, result, (0.5, 0.4, 0.3))
    text = audit_time.write(tmp_path, result | {"rows": 200}, (0.5, 0.4, 0.3)).read_text()
    assert text.startswith("# Where a default audit's time goes\n\n## 100 rows, a checkpoint ")
    assert "\n\n## 200 rows, a checkpoint at most every 0 s\n" in text  # appended
    assert "`DM_AUDIT_CHECKPOINT_SECONDS=0 uv run" in text
    assert "| **total** | **11.5** | |" in text
    assert "| backward | 5.00 | 50% | 7 |" in text
    assert text.index("| backward |") < text.index("| forward |")  # largest first
    assert "| other | 2.00 | 20% | |" in text
    assert "2.1 s (every core)" in text
