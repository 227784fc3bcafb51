"""Where a default audit's time goes, phase by phase, beside what a cleanlab user pays.

One default audit (`run_audit` with an output folder, as the CLI runs it: checkpoints, the
work folder, the report files) of a seeded synthetic table with 20 % symmetric noise, every
core, timed three ways:

* **start-up**: a fresh interpreter importing what an audit needs (`dm_audit.audit`, torch),
  less a bare interpreter's start; **loading**: `load_source` of the table written as CSV;
* **stages**: wall time from `run_audit`'s stage hook (probe, audit training, scoring, flags,
  corrections, retrain, report);
* **phases**: exclusive time of the functions that do each kind of work, measured by wrapping
  them for this run (a phase called inside another is counted once, in the inner one): the
  model's forward pass, the loss with its DM weighting, backward, the optimiser step, the rest
  of each step, the epoch loop (batch gathering, progress), per-example bookkeeping, per-epoch
  evaluation and scoring passes, checkpoints and the collapse guard's snapshots, the work
  folder's stage files, the linear reference, neighbour searches, the report tables, page and
  files. What no phase claims is "other" (the flags' and corrections' array work, noise
  estimates, Python between the calls).

The wrappers and torch's global module hooks add a little Python per call, so the phases sum to
slightly more than an unwrapped run; the stage times are the wrapped run's. "calls" counts the
entries into a phase (a phase entered inside itself, as `evaluate` calls `forward_all`, counts
twice). The phases are timed on the CPU, where every operation has finished when its function
returns; on a GPU they would need a synchronisation each, so the script runs on the CPU.

Beside it, on the same table and cores: scikit-learn's `MLPClassifier(early_stopping=True)`
under 5-fold `cross_val_predict`, then cleanlab's `find_label_issues` (what a cleanlab user runs).

    uv run --group bench python benchmarks/audit_time.py              # 20,000 x 40 rows
    uv run --group bench python benchmarks/audit_time.py --rows 2000  # 2,000 x 40 rows

Each run appends a section to results/audit_time.md; it records the checkpoint interval in force
(`DM_AUDIT_CHECKPOINT_SECONDS`, 0: a checkpoint after every epoch).
"""

from __future__ import annotations

import argparse
import functools
import os
import platform
import subprocess
import sys
import tempfile
import time
from collections import Counter, defaultdict
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

RESULTS = Path(__file__).parent / "results"
NOISE_RATE = 0.2
FEATURES = 40
CLASSES = 8
STEP = "optimisation step: the rest (zero_grad, scheduler, autocast, batch to device)"
STAGES = ("probe", "audit", "scores", "flags", "corrections", "retrain", "report")


class PhaseClock:
    """Exclusive seconds per phase: time spent in a nested phase is taken off its parent."""

    def __init__(self) -> None:
        self.seconds: defaultdict[str, float] = defaultdict(float)
        self.calls: Counter[str] = Counter()
        self._stack: list[list[Any]] = []  # [phase, start, seconds of nested phases]

    @property
    def current(self) -> str | None:
        return self._stack[-1][0] if self._stack else None

    def enter(self, phase: str) -> None:
        self._stack.append([phase, time.perf_counter(), 0.0])

    def leave(self) -> None:
        phase, start, nested = self._stack.pop()
        elapsed = time.perf_counter() - start
        self.seconds[phase] += elapsed - nested
        self.calls[phase] += 1
        if self._stack:
            self._stack[-1][2] += elapsed

    def timed(
        self, phase: str, fn: Callable[..., Any], within: str | None = None
    ) -> Callable[..., Any]:
        """`fn` timed as `phase`; with `within`, only when called directly inside that phase."""

        @functools.wraps(fn)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            if within is not None and self.current != within:
                return fn(*args, **kwargs)
            self.enter(phase)
            try:
                return fn(*args, **kwargs)
            finally:
                self.leave()

        return wrapper


def _replace_everywhere(owner: Any, name: str, wrapped: Callable[..., Any], undo: list) -> None:
    """Put `wrapped` wherever ``owner.name`` is bound: on its class, or in every dm_audit
    module that imported the function by name."""
    original = getattr(owner, name)
    if isinstance(owner, type):
        setattr(owner, name, wrapped)
        undo.append((owner, name, original))
        return
    for module in list(sys.modules.values()):
        if not getattr(module, "__name__", "").startswith("dm_audit"):
            continue
        for attr, value in list(vars(module).items()):
            if value is original:
                setattr(module, attr, wrapped)
                undo.append((module, attr, original))


@contextmanager
def instrumented(clock: PhaseClock) -> Iterator[None]:
    """Time the audit's phases into `clock` while the block runs; everything restored after."""
    import torch
    from torch.nn.modules import module as torch_module
    from torch.optim import optimizer as torch_optimizer

    from dm_audit import (
        checkpoints,
        dynamics,
        engine,
        html_report,
        inference,
        linear_reference,
        neighbours,
        report_builder,
        stage_store,
        training,
    )
    from dm_audit.loss_base import LabelLoss

    phases: list[tuple[Any, str, str, str | None]] = [
        (engine, "_step", STEP, None),
        (engine, "train_one_epoch", "epoch loop: batch gathering, progress", None),
        (engine._EpochTally, "add", "per-example bookkeeping", None),
        (engine._EpochTally, "stats", "per-example bookkeeping", None),
        (dynamics.TrainingDynamics, "record", "per-example bookkeeping", None),
        (dynamics.TrainingDynamics, "end_epoch", "per-example bookkeeping", None),
        (engine, "evaluate", "per-epoch evaluation and scoring passes", None),
        (inference, "forward_all", "per-epoch evaluation and scoring passes", None),
        (checkpoints, "state_of", "checkpoints and the collapse guard's snapshots", None),
        (training, "_save_checkpoint", "checkpoints and the collapse guard's snapshots", None),
        (stage_store, "save_stage_folder", "work folder: stage files", None),
        (linear_reference, "reference_probs", "linear reference (scikit-learn)", None),
        (neighbours, "build_index", "neighbour search (faiss)", None),
        (neighbours, "search", "neighbour search (faiss)", None),
        (neighbours, "search_few", "neighbour search (faiss)", None),
        (report_builder, "build_report", "report: tables and plots", None),
        (html_report, "render_report", "report: report.html", None),
        (report_builder, "write_report", "report: files", None),
        (torch.Tensor, "backward", "backward", STEP),
    ]
    undo: list[tuple[Any, str, Any]] = []
    handles = []
    # Which module's forward is timed, so its submodules' calls are not timed again.
    timed_modules: list[Any] = []

    def forward_pre(module: Any, _args: Any) -> None:
        if not timed_modules and clock.current == STEP:
            timed_modules.append(module)
            loss = isinstance(module, LabelLoss)
            clock.enter("loss with its DM weighting" if loss else "forward")

    def forward_post(module: Any, _args: Any, _out: Any) -> None:
        if timed_modules and timed_modules[-1] is module:
            timed_modules.pop()
            clock.leave()

    def step_pre(_opt: Any, _args: Any, _kwargs: Any) -> None:
        if clock.current == STEP:
            clock.enter("optimiser step")

    def step_post(_opt: Any, _args: Any, _kwargs: Any) -> None:
        if clock.current == "optimiser step":
            clock.leave()

    try:
        for owner, name, phase, within in phases:
            wrapped = clock.timed(phase, getattr(owner, name), within)
            _replace_everywhere(owner, name, wrapped, undo)
        handles += [
            torch_module.register_module_forward_pre_hook(forward_pre),
            # Also when a forward raises, so the clock's stack stays whole.
            torch_module.register_module_forward_hook(forward_post, always_call=True),
            torch_optimizer.register_optimizer_step_pre_hook(step_pre),
            torch_optimizer.register_optimizer_step_post_hook(step_post),
        ]
        yield
    finally:
        for handle in handles:
            handle.remove()
        for owner, name, original in reversed(undo):
            setattr(owner, name, original)


def make_table(rows: int, seed: int) -> tuple[pd.DataFrame, np.ndarray]:
    """A seeded 8-class table with 20 % of its labels flipped; the table and the truth mask."""
    from sklearn.datasets import make_classification

    from dm_audit.noise import inject_symmetric

    x, y = make_classification(
        rows,
        FEATURES,
        n_informative=20,
        n_redundant=10,
        n_classes=CLASSES,
        n_clusters_per_class=2,
        class_sep=1.5,
        random_state=seed,
    )
    noisy = inject_symmetric(y, CLASSES, NOISE_RATE, seed)
    frame = pd.DataFrame(x.astype(np.float32), columns=[f"f{j}" for j in range(FEATURES)])
    frame.insert(0, "id", [f"row{i}" for i in range(rows)])
    frame["label"] = [f"class{k}" for k in noisy]
    return frame, noisy != y


def start_up_seconds(repeats: int = 3) -> float:
    """Median seconds a fresh interpreter takes to import an audit's modules, less a bare start."""

    def run(code: str) -> float:
        start = time.perf_counter()
        subprocess.run([sys.executable, "-c", code], check=True)
        return time.perf_counter() - start

    bare = float(np.median([run("pass") for _ in range(repeats)]))
    full = float(np.median([run("import dm_audit.audit, torch") for _ in range(repeats)]))
    return full - bare


def cleanlab_seconds(frame: pd.DataFrame, seed: int) -> tuple[float, float]:
    """Seconds of 5-fold `cross_val_predict` of an early-stopping MLP, and of cleanlab after."""
    from cleanlab.filter import find_label_issues
    from sklearn.model_selection import StratifiedKFold, cross_val_predict
    from sklearn.neural_network import MLPClassifier

    x = frame[[f"f{j}" for j in range(FEATURES)]].to_numpy()
    y = pd.Categorical(frame["label"]).codes.astype(np.int64)
    start = time.perf_counter()
    probs = cross_val_predict(
        MLPClassifier(early_stopping=True, random_state=seed),
        x,
        y,
        cv=StratifiedKFold(5, shuffle=True, random_state=seed),
        method="predict_proba",
    )
    trained = time.perf_counter()
    find_label_issues(y, probs)
    return trained - start, time.perf_counter() - trained


def measure(rows: int, seed: int) -> dict[str, Any]:
    """Start-up, loading, the audit's stages and phases, and the cleanlab user's time."""
    from dm_audit.audit import run_audit
    from dm_audit.config import AuditConfig
    from dm_audit.sources import load_source
    from dm_audit.training import checkpoint_interval

    frame, truth = make_table(rows, seed)
    start_up = start_up_seconds()
    with tempfile.TemporaryDirectory(prefix="dm-audit-time-") as tmp:
        csv = Path(tmp) / "table.csv"
        frame.to_csv(csv, index=False)
        start = time.perf_counter()
        dataset = load_source(str(csv), label_column="label", id_column="id")
        loading = time.perf_counter() - start
        clock = PhaseClock()
        marks: dict[str, float] = {}
        with instrumented(clock):
            start = time.perf_counter()
            report = run_audit(
                dataset,
                AuditConfig(progress=False, seed=seed, device="cpu"),
                Path(tmp) / "out",
                on_stage=lambda name, _result: marks.__setitem__(name, time.perf_counter() - start),
            )
            audit_seconds = time.perf_counter() - start
    ends = [marks.get(name, float("nan")) for name in STAGES]
    stages = dict(zip(STAGES, np.diff([0.0, *ends]), strict=True))
    stages["writing the report files"] = audit_seconds - ends[-1]
    flagged = report.examples["is_label_issue"].to_numpy(dtype=bool)
    by_id = pd.Series(truth, index=frame["id"].to_numpy())
    noisy = by_id.loc[report.examples["example_id"].to_numpy()].to_numpy()
    tp = int((flagged & noisy).sum())
    f1 = 2 * tp / max(1, flagged.sum() + noisy.sum())
    cv_train, cv_find = cleanlab_seconds(frame, seed)
    return {
        "rows": rows,
        "seed": seed,
        "checkpoint_seconds": checkpoint_interval(),
        "start_up": start_up,
        "loading": loading,
        "audit": audit_seconds,
        "to_flags": marks.get("flags", float("nan")),
        "stages": stages,
        "phases": dict(clock.seconds),
        "calls": dict(clock.calls),
        "f1": f1,
        "cleanlab_train": cv_train,
        "cleanlab_find": cv_find,
    }


def write(out: Path, result: dict[str, Any], load: tuple[float, float, float]) -> Path:
    """Append this run's section to results/audit_time.md: the stages, the phases and the
    cleanlab user's time."""
    audit = result["audit"]
    phases = sorted(result["phases"].items(), key=lambda kv: -kv[1])
    claimed = sum(result["phases"].values())
    total = result["start_up"] + result["loading"] + audit
    cleanlab = result["cleanlab_train"] + result["cleanlab_find"]
    from dm_audit.training import CHECKPOINT_SECONDS_ENV, DEFAULT_CHECKPOINT_SECONDS

    interval = result["checkpoint_seconds"]
    default = interval == DEFAULT_CHECKPOINT_SECONDS
    setting = "" if default else f"{CHECKPOINT_SECONDS_ENV}={interval:g} "
    lines = [
        f"## {result['rows']:,} rows, a checkpoint at most every {interval:g} s",
        "",
        f"Command: `{setting}uv run --group bench python benchmarks/audit_time.py --rows "
        f"{result['rows']}` (seed {result['seed']}); {platform.machine()}, {os.cpu_count()} "
        f"cores, every core; load average {load[0]:.2f} / {load[1]:.2f} / {load[2]:.2f} at the "
        "start.",
        "",
        f"A {result['rows']:,}-row table of {FEATURES} features and {CLASSES} classes, "
        f"{NOISE_RATE:.0%} of its labels flipped, audited with the defaults into an output "
        f"folder as the CLI does (detection F1 {result['f1']:.3f}).",
        "",
        "| part | seconds | share |",
        "|---|---:|---:|",
        f"| start-up: importing dm_audit.audit and torch | {result['start_up']:.1f} | "
        f"{result['start_up'] / total:.0%} |",
        f"| loading the CSV (`load_source`) | {result['loading']:.1f} | "
        f"{result['loading'] / total:.0%} |",
        f"| the audit (`run_audit`) | {audit:.1f} | {audit / total:.0%} |",
        f"| **total** | **{total:.1f}** | |",
        "",
        f"To the flags: {result['to_flags']:.1f} s. The same table the way a cleanlab user "
        f"audits it: scikit-learn's `MLPClassifier(early_stopping=True)` under 5-fold "
        f"`cross_val_predict` {result['cleanlab_train']:.1f} s, then `find_label_issues` "
        f"{result['cleanlab_find']:.2f} s: {cleanlab:.1f} s (every core).",
        "",
        "The audit's stages (wall time):",
        "",
        "| stage | seconds | share of the audit |",
        "|---|---:|---:|",
    ]
    for name, seconds in result["stages"].items():
        lines.append(f"| {name} | {seconds:.2f} | {seconds / audit:.0%} |")
    lines += [
        "",
        "The audit's time by kind of work (exclusive time of the functions that do it):",
        "",
        "| phase | seconds | share of the audit | calls |",
        "|---|---:|---:|---:|",
    ]
    for name, seconds in phases:
        calls = result["calls"].get(name, 0)
        lines.append(f"| {name} | {seconds:.2f} | {seconds / audit:.0%} | {calls:,} |")
    other = audit - claimed
    lines += [f"| other | {other:.2f} | {other / audit:.0%} | |", ""]
    out.mkdir(parents=True, exist_ok=True)
    path = out / "audit_time.md"
    if not path.exists():
        path.write_text("# Where a default audit's time goes\n\n", encoding="utf-8")
    # A blank line before the heading when prose was added under the previous section.
    separator = "" if path.read_text(encoding="utf-8").endswith("\n\n") else "\n"
    with path.open("a", encoding="utf-8") as handle:
        handle.write(separator + "\n".join(lines) + "\n")
    return path


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--rows", type=int, default=20_000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    load = os.getloadavg()
    result = measure(args.rows, args.seed)
    print(f"wrote {write(args.out, result, load)}", flush=True)


if __name__ == "__main__":
    main()
