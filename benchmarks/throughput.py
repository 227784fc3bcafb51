"""Training and scoring throughput of the audit's models on this machine, and the FLOP/s achieved.

For the MLP (64 features, 10 classes) and the CIFAR ResNet-20 at 28 x 28 x 1 and 32 x 32 x 3,
with 1 and 2 CPU threads (and CUDA when present), each precision the engine may use there
(float32; bf16 autocast for the conv nets on a CPU that computes it natively):

* **train**: examples/s of full training steps (forward, DM loss, backward, SGD step) at the
  audit's batch size, after warm-up steps;
* **score**: examples/s of the forward pass that scores every row (batch 1,024);
* **GFLOP/s**: the step's floating-point operations counted by `torch.utils.flop_counter`
  (a multiply-add is 2) over its measured time, against the machine's peak fp32 rate estimated
  from its vector units: two FMA units per core (AVX-512: 64 FLOP per cycle; AVX2: 32), as on
  server CPUs (here the one-unit figure is exceeded by the measured float32 rate).

Beside it, what a cleanlab user pays on the same table: scikit-learn's `MLPClassifier` under
5-fold `cross_val_predict`, examples/s of the whole procedure.

    uv run --group bench python benchmarks/throughput.py          # writes results/throughput.md
    uv run --group bench python benchmarks/throughput.py --quick  # fewer steps
"""

from __future__ import annotations

import argparse
import os
import platform
import time
from pathlib import Path
from typing import Any

import torch

from dm_audit.devices import cpu_supports_bf16
from dm_audit.losses import create_loss
from dm_audit.models import create_model

RESULTS = Path(__file__).parent / "results"
BATCH = 128  # the audit's default batch size
SCORE_BATCH = 1_024
SHAPES = {"mlp 64-d": (64,), "resnet20 28x28x1": (28, 28, 1), "resnet20 32x32x3": (32, 32, 3)}


def peak_gflops(threads: int) -> tuple[float, str]:
    """Estimated peak fp32 GFLOP/s of `threads` cores and how it was estimated."""
    flags = set()
    mhz = 0.0
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags") and not flags:
                flags = set(line.split(":", 1)[1].split())
            if line.startswith("cpu MHz") and not mhz:
                mhz = float(line.split(":", 1)[1])
    except OSError:
        return float("nan"), "unknown (no /proc/cpuinfo)"
    # Two FMA units of 16 (AVX-512) or 8 (AVX2) fp32 lanes, 2 FLOP per multiply-add.
    per_cycle = 64 if "avx512f" in flags else 32 if "avx2" in flags and "fma" in flags else 8
    peak = threads * mhz / 1_000 * per_cycle
    return peak, f"{threads} core(s) x {mhz / 1000:.2f} GHz x {per_cycle} FLOP/cycle"


def _batch(shape: tuple[int, ...], n: int, device: torch.device) -> torch.Tensor:
    x = torch.randn(n, *shape, device=device)
    if len(shape) == 3:  # NHWC memory seen as NCHW, as the engine feeds images
        x = x.permute(0, 3, 1, 2)
    return x


def measure(
    shape: tuple[int, ...], device: torch.device, amp: torch.dtype | None, steps: int
) -> dict[str, Any]:
    torch.manual_seed(0)
    model = create_model("auto", num_classes=10, input_shape=shape).to(device)
    if len(shape) == 3:
        model = model.to(memory_format=torch.channels_last)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    loss_fn = create_loss("dm", lam=0.5, beta=8.0)
    x, y = _batch(shape, BATCH, device), torch.randint(0, 10, (BATCH,), device=device)

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        with torch.autocast(device.type, dtype=amp or torch.float32, enabled=amp is not None):
            logits = model(x)
        loss_fn(logits.float(), y).loss.backward()
        optimizer.step()

    from torch.utils.flop_counter import FlopCounterMode

    for _ in range(3):
        step()
    with FlopCounterMode(display=False) as counter:
        step()
    flops = counter.get_total_flops()
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    sync()
    start = time.perf_counter()
    for _ in range(steps):
        step()
    sync()
    train_s = (time.perf_counter() - start) / steps
    model.eval()
    xs = _batch(shape, SCORE_BATCH, device)
    with torch.no_grad(), torch.autocast(device.type, enabled=False):
        model(xs)
        start = time.perf_counter()
        for _ in range(max(2, steps // 4)):
            model(xs)
        sync()
        score_s = (time.perf_counter() - start) / max(2, steps // 4)
    return {
        "train_ex_s": BATCH / train_s,
        "score_ex_s": SCORE_BATCH / score_s,
        "gflops": flops / train_s / 1e9,
    }


def sklearn_mlp_cv(n: int = 5_000) -> float:
    """Examples/s of cleanlab's usual input: 5-fold out-of-sample probabilities of an MLP."""
    from sklearn.datasets import make_classification
    from sklearn.model_selection import StratifiedKFold, cross_val_predict
    from sklearn.neural_network import MLPClassifier

    x, y = make_classification(n, 64, n_informative=32, n_classes=10, random_state=0)
    start = time.perf_counter()
    cross_val_predict(
        MLPClassifier(early_stopping=True, random_state=0),
        x,
        y,
        cv=StratifiedKFold(5, shuffle=True, random_state=0),
        method="predict_proba",
    )
    return n / (time.perf_counter() - start)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer timed steps")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    steps = 5 if args.quick else 20
    load = os.getloadavg()
    rows = []
    devices = [("cpu", t) for t in (1, 2)]
    if torch.cuda.is_available():
        devices.append(("cuda", torch.get_num_threads()))
    for device_name, threads in devices:
        torch.set_num_threads(threads)
        device = torch.device(device_name)
        peak, how = peak_gflops(threads) if device_name == "cpu" else (float("nan"), "")
        for name, shape in SHAPES.items():
            precisions: list[torch.dtype | None] = [None]
            if len(shape) == 3 and (device_name == "cuda" or cpu_supports_bf16()):
                precisions.append(torch.bfloat16)
            for amp in precisions:
                got = measure(shape, device, amp, steps)
                row = {
                    "device": f"{device_name} ({threads} thread{'s' if threads > 1 else ''})",
                    "model": name,
                    "precision": "bf16 autocast" if amp else "float32",
                    **got,
                    "peak_share": got["gflops"] / peak if peak == peak else float("nan"),
                    "peak": how,
                }
                rows.append(row)
                print(row, flush=True)
    torch.set_num_threads(os.cpu_count() or 1)
    cv_rate = sklearn_mlp_cv()
    write(args.out, rows, cv_rate, load, steps)


def write(out: Path, rows: list[dict[str, Any]], cv_rate: float, load: Any, steps: int) -> None:
    lines = [
        "# Training and scoring throughput",
        "",
        f"Command: `uv run --group bench python benchmarks/throughput.py`; {steps} timed steps "
        f"of batch {BATCH}; {platform.machine()}, {os.cpu_count()} cores, torch "
        f"{torch.__version__}; load average {load[0]:.2f} / {load[1]:.2f} / {load[2]:.2f} at "
        f"the start. Peak fp32 rate: {peak_gflops(1)[1]} per core (two FMA units), times the "
        "threads used.",
        "",
        "| device | model | precision | train ex/s | score ex/s | GFLOP/s (train) | "
        "share of fp32 peak |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        share = "–" if r["peak_share"] != r["peak_share"] else f"{r['peak_share']:.0%}"
        lines.append(
            f"| {r['device']} | {r['model']} | {r['precision']} | {r['train_ex_s']:,.0f} | "
            f"{r['score_ex_s']:,.0f} | {r['gflops']:.1f} | {share} |"
        )
    lines += [
        "",
        f"A cleanlab user's usual input on a 5,000-row, 64-feature, 10-class table: "
        f"scikit-learn's `MLPClassifier(early_stopping=True)` under 5-fold `cross_val_predict`, "
        f"{cv_rate:,.0f} rows/s for the whole procedure (every core).",
        "",
        "bf16 runs count the same operations; their share of the fp32 peak can exceed 100 % "
        "on CPUs whose matrix units (AMX) compute bf16 faster than fp32.",
        "",
        "Where a whole audit's time goes (start-up, loading, forward, backward, optimiser, DM "
        "weighting, bookkeeping, evaluation, checkpoints, neighbour search, reports): "
        "`benchmarks/audit_time.py`, results/audit_time.md.",
        "",
    ]
    out.mkdir(parents=True, exist_ok=True)
    (out / "throughput.md").write_text("\n".join(lines), encoding="utf-8")
    print(f"wrote {out / 'throughput.md'}", flush=True)


if __name__ == "__main__":
    main()
