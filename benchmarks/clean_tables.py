"""What the audit does to clean data: scikit-learn's built-in tables, labels as published.

Every flag on these tables is a false alarm (up to the few genuinely doubtful labels they may
hold): the share flagged as label issues, the rows set aside as out-of-distribution, and the
labels changed automatically. Then small clean image folders written from the same digits
(30 per class as PNGs: 8x8 grayscale, 16x16 grayscale, and a mix of sizes and colour modes),
where a conv net has few images to learn from: also the collapse guard's rollbacks and the
retrained model's out-of-sample accuracy against the audit model's. Defaults only.

    uv run python benchmarks/clean_tables.py     # about 6 minutes on two cores
"""

from __future__ import annotations

import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image
from sklearn.datasets import load_breast_cancer, load_digits, load_iris, load_wine

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from dm_audit.audit import AuditConfig, run_audit  # noqa: E402
from dm_audit.dataset import AuditDataset  # noqa: E402
from dm_audit.image_folder import load_image_folder  # noqa: E402

TABLES = {
    "breast-cancer": load_breast_cancer,
    "wine": load_wine,
    "iris": load_iris,
    "digits": load_digits,
}


IMAGES_PER_CLASS = 30
# 8x8: the digits as scanned; 16x16: upsampled; mixed: sizes 8-16 and L/RGB/RGBA modes, which
# the loader brings to one shape and mode (it says so once).
FOLDER_LAYOUTS = ("8x8", "16x16", "mixed")


def write_digit_folder(root: Path, layout: str) -> Path:
    """A clean image folder of `IMAGES_PER_CLASS` sklearn digits per class (seeded choice)."""
    x, y = load_digits(return_X_y=True)
    rng = np.random.default_rng(0)
    rows = np.concatenate(
        [rng.choice(np.flatnonzero(y == c), IMAGES_PER_CLASS, replace=False) for c in range(10)]
    )
    for position, row in enumerate(rows):
        image = Image.fromarray((x[row].reshape(8, 8) / 16 * 255).astype(np.uint8))
        if layout == "16x16":
            image = image.resize((16, 16), Image.Resampling.BILINEAR)
        elif layout == "mixed":
            size = (8, 12, 16)[position % 3]
            mode = ("L", "RGB", "RGBA")[(position // 3) % 3]
            image = image.resize((size, size), Image.Resampling.BILINEAR).convert(mode)
        folder = root / str(y[row])
        folder.mkdir(parents=True, exist_ok=True)
        image.save(folder / f"{row:04d}.png")
    return root


def main() -> int:
    load = os.getloadavg()[0]
    lines = [
        "# Clean tables: what the audit flags when no label was changed",
        "",
        f"Command: `uv run python benchmarks/clean_tables.py`; seed 0, defaults; "
        f"{platform.machine()}, {os.cpu_count()} cores, load {load:.2f} at the start.",
        "",
        "| table | rows | flagged as label issues | set aside as OOD | labels auto-corrected |",
        "|---|---|---|---|---|",
    ]
    for name, loader in TABLES.items():
        x, y = loader(return_X_y=True)
        data = AuditDataset.from_arrays([str(v) for v in y], features=x.astype(np.float32))
        report = run_audit(data, AuditConfig(seed=0, progress=False))
        examples = report.examples
        flagged = int(examples["is_label_issue"].sum())
        ood = int(examples["is_ood"].sum())
        fixed = report.summary["counts"]["auto_corrected"]
        lines.append(
            f"| {name} | {len(examples)} | {flagged} ({flagged / len(examples):.1%}) | "
            f"{ood} ({ood / len(examples):.1%}) | {fixed} |"
        )
        print(lines[-1], flush=True)
    lines += [
        "",
        "## Clean image folders",
        "",
        f"{IMAGES_PER_CLASS} sklearn digits per class written as PNGs (`write_digit_folder`), "
        "audited with `load_image_folder` and the defaults (ResNet-20). Accuracy: out of "
        "sample, on the rows whose label was kept, audit model -> retrained model.",
        "",
        "| folder | images | flagged as label issues | set aside as OOD "
        "| collapse rollbacks (audit, retrain) | accuracy before -> after | seconds |",
        "|---|---|---|---|---|---|---|",
    ]
    for layout in FOLDER_LAYOUTS:
        with tempfile.TemporaryDirectory() as tmp:
            folder = write_digit_folder(Path(tmp) / layout, layout)
            start = time.perf_counter()
            report = run_audit(load_image_folder(folder), AuditConfig(seed=0, progress=False))
            seconds = time.perf_counter() - start
        examples = report.examples
        n = len(examples)
        flagged = int(examples["is_label_issue"].sum())
        ood = int(examples["is_ood"].sum())
        events = report.summary["training_events"]
        rollbacks = sum(e.get("action") == "rollback" for stage in events.values() for e in stage)
        quality = report.summary["quality"]
        lines.append(
            f"| {layout} | {n} | {flagged} ({flagged / n:.1%}) | {ood} ({ood / n:.1%}) | "
            f"{rollbacks} | {quality['accuracy_before']:.3f} -> {quality['accuracy_after']:.3f} "
            f"| {seconds:.0f} |"
        )
        print(lines[-1], flush=True)
    out = ROOT / "benchmarks" / "results" / "clean_tables.md"
    out.write_text("\n".join(lines) + "\n", encoding="utf-8")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
