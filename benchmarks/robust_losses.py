"""Test accuracy and fitting of the noisy and the clean subset, per loss (the seeds' table).

Digits with 40 % symmetric label noise (exactly ⌊0.4 N⌋ training labels flipped to another
class), the same MLP and training recipe for every loss, mean ± std over seeds. Columns follow
METHOD.md §4: test accuracy, accuracy on the noisy subset against its *noisy* labels (how much
noise was memorised: lower is better) and accuracy on the clean subset.

    uv run python benchmarks/robust_losses.py            # full grid, 3 seeds
    uv run python benchmarks/robust_losses.py --quick    # a few losses, 1 seed

The same table for digits as 8x8 grayscale images and the CIFAR ResNet-20 (the seeds train
ResNets on CIFAR with pad-crop augmentation, where memorising noise is much slower)::

    uv run python benchmarks/robust_losses.py --images --augment none --epochs 60 \
        --seeds 0 --only cce imae dm-1-16
    uv run python benchmarks/robust_losses.py --images --augment auto --epochs 60 \
        --seeds 0 --only cce imae dm-1-16
"""

from __future__ import annotations

import argparse
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch

from dm_audit.noise import add_noise
from dm_audit.sources import load_source
from dm_audit.training import TrainConfig, fit

RESULTS = Path(__file__).parent / "results"

# (label, loss name, loss parameters): the seeds' baselines and their DM (λ, β) grid.
BASELINES = [
    ("CCE", "cce", {}),
    ("MAE", "mae", {}),
    ("GCE (q=0.7)", "gce", {"q": 0.7}),
    ("IMAE (T=8)", "imae", {"T": 8.0}),
]
DM_GRID = {0.0: (0.5, 1, 2, 4), 0.5: (4, 8, 12, 16), 1.0: (8, 12, 16, 20), 2.0: (12, 16, 20, 24)}


def _key(loss: str, params: dict) -> str:
    """A short command-line name of a method: ``cce``, ``imae``, ``dm-1-16``."""
    if loss == "dm":
        return f"dm-{params['lam']:g}-{params['beta']:g}"
    return loss


def methods(quick: bool) -> list[tuple[str, str, dict]]:
    grid = [
        (f"DM (λ={lam:g}, β={beta:g})", "dm", {"lam": lam, "beta": float(beta)})
        for lam, betas in DM_GRID.items()
        for beta in betas
    ]
    if quick:
        grid = [g for g in grid if g[2] in ({"lam": 1.0, "beta": 16.0}, {"lam": 0.5, "beta": 8.0})]
    return BASELINES + grid


def _as_images(features: np.ndarray) -> np.ndarray:
    """Digits' 64 features in [0, 1] -> uint8 images of shape (n, 8, 8, 1)."""
    return np.clip(np.rint(features * 255), 0, 255).astype(np.uint8).reshape(-1, 8, 8, 1)


def run_one(
    loss: str, params: dict, seed: int, epochs: int, *, images: bool = False, augment: str = "auto"
) -> dict[str, float]:
    dataset = add_noise(
        load_source("digits", test_size=0.3, seed=seed), kind="symmetric", rate=0.4, seed=seed
    )
    train, test = dataset.train(), dataset.test()
    x_train, x_test = train.inputs(), test.inputs()
    if images:
        x_train, x_test = _as_images(x_train), _as_images(x_test)
    config = TrainConfig(
        model="resnet20" if images else "auto",
        loss=loss,
        loss_params=params,
        epochs=epochs,
        seed=seed,
        augment=augment,
        progress=False,
    )
    start = time.perf_counter()
    result = fit(
        x_train,
        train.label_codes(),
        config,
        num_classes=dataset.n_classes,
        eval_inputs=x_test,
        eval_labels=test.label_codes(),
        true_labels=train.true_label_codes(),
    )
    last = result.history[-1]
    return {
        "test": last["test_acc"],
        "noisy_fit": last["noisy_fit"],
        "clean_fit": last["clean_fit"],
        "seconds": time.perf_counter() - start,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a few losses, one seed")
    parser.add_argument("--seeds", type=int, nargs="+", default=None)
    parser.add_argument("--epochs", type=int, default=None, help="default: TrainConfig's")
    parser.add_argument(
        "--images", action="store_true", help="digits as 8x8 images, CIFAR ResNet-20"
    )
    parser.add_argument(
        "--augment", default="auto", choices=("auto", "none"), help="image augmentation"
    )
    parser.add_argument("--only", nargs="+", default=None, help="methods, e.g. cce imae dm-1-16")
    args = parser.parse_args()
    seeds = args.seeds or ([0] if args.quick else [0, 1, 2])
    epochs = args.epochs or TrainConfig().epochs
    chosen = methods(args.quick)
    if args.only:
        chosen = [m for m in chosen if _key(m[1], m[2]) in args.only]
        if not chosen:
            parser.error(
                f"--only matched no method (names: {[_key(m[1], m[2]) for m in methods(False)]})"
            )
    rows = []
    for label, loss, params in chosen:
        runs = [
            run_one(loss, params, seed, epochs, images=args.images, augment=args.augment)
            for seed in seeds
        ]
        stats = {k: (np.mean([r[k] for r in runs]), np.std([r[k] for r in runs])) for k in runs[0]}
        rows.append((label, stats))
        print(
            f"{label:<22} test {stats['test'][0]:.3f}  noisy fit {stats['noisy_fit'][0]:.3f}  "
            f"clean fit {stats['clean_fit'][0]:.3f}  ({stats['seconds'][0]:.1f} s/run)",
            flush=True,
        )
    RESULTS.mkdir(parents=True, exist_ok=True)
    command = " ".join(["uv run python benchmarks/robust_losses.py", *sys.argv[1:]])
    name = "robust_losses_quick.md" if args.quick else "robust_losses.md"
    if args.only or args.epochs:
        # A partial grid or another budget never replaces the full table.
        name = f"robust_losses_{epochs}_epochs_{'_'.join(args.only or ['all'])}.md"
    setting = "MLP on the 64 features"
    if args.images:
        name = f"robust_losses_images_augment_{args.augment}.md"
        augmentation = "pad-4 random crop" if args.augment == "auto" else "no augmentation"
        setting = f"ResNet-20 on 8x8 grayscale images, {augmentation}"
    lines = [
        "# Robust losses on digits, 40 % symmetric noise",
        "",
        f"Command: `{command}`. "
        f"Seeds {seeds}, {epochs} epochs, {setting}, TrainConfig defaults; mean ± std. "
        "Noisy fit = accuracy on the flipped examples against their noisy labels (memorisation, "
        "lower is better); clean fit = accuracy on the unflipped ones.",
        "",
        f"Machine: {platform.platform()}, {torch.get_num_threads()} torch threads, "
        f"Python {sys.version.split()[0]}, torch {torch.__version__}.",
        "",
        "| loss | test accuracy | noisy-subset fit | clean-subset fit | s / run |",
        "|---|---|---|---|---|",
    ]
    for label, s in rows:
        cells = [
            f"{100 * s[k][0]:.1f} ± {100 * s[k][1]:.1f}" for k in ("test", "noisy_fit", "clean_fit")
        ]
        lines.append(f"| {label} | {' | '.join(cells)} | {s['seconds'][0]:.1f} |")
    (RESULTS / name).write_text("\n".join(lines) + "\n")
    print(f"wrote {RESULTS / name}")


if __name__ == "__main__":
    main()
