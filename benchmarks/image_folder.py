"""A default audit of an image folder on the machine at hand, timed end to end through the CLI.

The folder: scikit-learn's 8x8 digits drawn twice as large at a random offset on a 28x28
canvas with Gaussian pixel noise, `--per-class` images per digit as PNG files, one sub-folder
per given label. A share `--noise` of the images is filed under another digit at random
(symmetric noise); with `--open-set`, digit 9 is no class of the folder and 8 % of the folder
are 9s filed under random digits. The truth stays outside the folder, in the work directory.

The audit is the command a user runs, ``dm-audit audit --input FOLDER --out OUT`` with its
defaults; measured are its wall time (from the command's start to its exit, imports included),
the stage times of ``summary.json``, and against the truth the detection F1 of the flags and the
OOD AUROC of ``ood_score`` for the 9s.

    uv run python benchmarks/image_folder.py                     # 5,000 images, 30 % noise
    uv run python benchmarks/image_folder.py --open-set          # 4,500 + 8 % 9s

Appends a section to ``results/image_folder.md``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image
from sklearn.datasets import load_digits
from sklearn.metrics import f1_score, precision_score, recall_score, roc_auc_score

RESULTS = Path(__file__).parent / "results" / "image_folder.md"
SIDE = 28
# The 8x8 digits drawn at twice their size leave 12 pixels of the canvas to move them in.
SCALE = 2
PIXEL_NOISE = 20.0
OPEN_FRACTION = 0.08
OPEN_DIGIT = 9


def draw(digit: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """One 28x28 uint8 image: the 8x8 digit (values 0-16) scaled up at a random offset."""
    big = np.kron(digit * (255.0 / 16.0), np.ones((SCALE, SCALE)))
    canvas = np.zeros((SIDE, SIDE))
    top, left = rng.integers(0, SIDE - big.shape[0] + 1, size=2)
    canvas[top : top + big.shape[0], left : left + big.shape[1]] = big
    canvas += rng.normal(scale=PIXEL_NOISE, size=canvas.shape)
    return np.clip(canvas, 0, 255).astype(np.uint8)


def build_folder(
    root: Path, per_class: int, noise: float, open_set: bool, seed: int
) -> pd.DataFrame:
    """Write the folder; return the truth (file, given, true, noisy, open)."""
    rng = np.random.default_rng(seed)
    digits = load_digits()
    known = [d for d in range(10) if not (open_set and d == OPEN_DIGIT)]
    rows = []
    for d in known:
        pool = np.flatnonzero(digits.target == d)
        rows += [(d, i) for i in rng.choice(pool, size=per_class, replace=True)]
    n_open = int(OPEN_FRACTION / (1 - OPEN_FRACTION) * len(rows)) if open_set else 0
    pool = np.flatnonzero(digits.target == OPEN_DIGIT)
    rows += [(-1, i) for i in rng.choice(pool, size=n_open, replace=True)]
    true = np.array([d for d, _ in rows])
    given = true.copy()
    inside = np.flatnonzero(true >= 0)
    flip = rng.choice(inside, size=int(noise * inside.size), replace=False)
    for r in flip:
        given[r] = rng.choice([d for d in known if d != true[r]])
    given[true < 0] = rng.choice(known, size=n_open)
    records = []
    for k, ((_, image_row), label) in enumerate(zip(rows, given, strict=True)):
        folder = root / str(label)
        folder.mkdir(parents=True, exist_ok=True)
        name = f"img{k:05d}.png"
        Image.fromarray(draw(digits.images[image_row], rng)).save(folder / name)
        records.append({"file": f"{label}/{name}", "given": str(label), "true": int(true[k])})
    truth = pd.DataFrame(records)
    truth["noisy"] = (truth["true"] >= 0) & (truth["given"] != truth["true"].astype(str))
    truth["open"] = truth["true"] < 0
    return truth


def audit(folder: Path, out: Path) -> tuple[float, int]:
    """Run the CLI's default audit; its wall seconds and exit code (0, or 3 when it warns that
    the retrained model lost to the audit model; anything else stops the benchmark)."""
    start = time.perf_counter()
    done = subprocess.run(
        ["dm-audit", "audit", "--input", str(folder), "--out", str(out), "--quiet"], check=False
    )
    if done.returncode not in (0, 3):
        raise SystemExit(f"dm-audit audit failed with exit code {done.returncode}")
    return time.perf_counter() - start, done.returncode


def measure(out: Path, truth: pd.DataFrame) -> dict[str, float]:
    """Detection against the truth, joined on the file path (the folder's example ids)."""
    examples = pd.read_parquet(out / "examples.parquet")
    ids = examples["example_id"].astype(str).str.replace("\\", "/")
    merged = truth.assign(key=truth["file"]).merge(
        examples.assign(key=ids), on="key", how="left", validate="one_to_one"
    )
    if merged["is_label_issue"].isna().any():
        raise SystemExit("examples.parquet misses rows of the folder; ids do not match files")
    inside = ~merged["open"]
    y, flags = merged["noisy"][inside], merged["is_label_issue"][inside].astype(bool)
    out_ = {
        "precision": float(precision_score(y, flags)),
        "recall": float(recall_score(y, flags)),
        "f1": float(f1_score(y, flags)),
        "auroc": float(roc_auc_score(y, merged["label_issue_score"][inside])),
    }
    if merged["open"].any():
        out_["ood_auroc"] = float(roc_auc_score(merged["open"], merged["ood_score"]))
    return out_


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--per-class", type=int, default=500)
    parser.add_argument("--noise", type=float, default=0.3)
    parser.add_argument("--open-set", action="store_true")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--results", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    load_start = " ".join(f"{v:.2f}" for v in os.getloadavg())
    with tempfile.TemporaryDirectory(prefix="dm-audit-image-folder-") as tmp:
        folder, out = Path(tmp) / "images", Path(tmp) / "audit"
        truth = build_folder(folder, args.per_class, args.noise, args.open_set, args.seed)
        seconds, exit_code = audit(folder, out)
        summary = json.loads((out / "summary.json").read_text())
        quality = measure(out, truth)
    load_end = " ".join(f"{v:.2f}" for v in os.getloadavg())
    stages = summary.get("seconds", {}).get("stages", {})
    to_flags = summary.get("seconds", {}).get("to_flags", float("nan"))
    command = "uv run python benchmarks/image_folder.py " + " ".join(
        sys.argv[1:] if argv is None else argv
    )
    lines = [
        f"## {len(truth):,} images, {args.noise:.0%} symmetric noise"
        + (f", {OPEN_FRACTION:.0%} of them an unseen digit" if args.open_set else ""),
        "",
        f"Command: `{command.strip()}` (seed {args.seed}); {time.strftime('%Y-%m-%d %H:%M UTC')}; "
        f"{os.cpu_count()} cores, {platform.platform()}; load average {load_start} before and "
        f"{load_end} after.",
        "",
        "| measure | value |",
        "|---|---:|",
        f"| wall time of `dm-audit audit` (s) | {seconds:.1f} |",
        f"| exit code | {exit_code} |",
        *(f"| stage {name} (s) | {value:.1f} |" for name, value in stages.items()),
        f"| flags ready after (s) | {to_flags:.1f} |",
        *(f"| {name} | {value:.3f} |" for name, value in quality.items()),
        "",
    ]
    args.results.parent.mkdir(parents=True, exist_ok=True)
    if not args.results.exists():
        args.results.write_text(f"# {(__doc__ or '').splitlines()[0]}\n\n")
    with args.results.open("a") as handle:
        handle.write("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
