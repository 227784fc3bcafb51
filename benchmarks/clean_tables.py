"""What the audit does to clean data: scikit-learn's built-in tables, labels as published.

Every flag on these tables is a false alarm (up to the few genuinely doubtful labels they may
hold): the share flagged as label issues, the rows set aside as out-of-distribution, and the
labels changed automatically. Defaults only.

    uv run python benchmarks/clean_tables.py     # about 1 minute on two cores
"""

from __future__ import annotations

import os
import platform
import sys
from pathlib import Path

import numpy as np
from sklearn.datasets import load_breast_cancer, load_digits, load_iris, load_wine

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from dm_audit.audit import AuditConfig, run_audit  # noqa: E402
from dm_audit.dataset import AuditDataset  # noqa: E402

TABLES = {
    "breast-cancer": load_breast_cancer,
    "wine": load_wine,
    "iris": load_iris,
    "digits": load_digits,
}


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
    out = ROOT / "benchmarks" / "results" / "clean_tables.md"
    out.write_text("\n".join(lines) + "\n", encoding="utf-8")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
