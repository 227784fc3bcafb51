"""Draw the weighting curves of the common losses and of DM (the README's figure).

uv run python benchmarks/weighting_curves.py
"""

from __future__ import annotations

from pathlib import Path

from dm_audit.emphasis import create_weighting, plot_weighting_curves

OUT = Path(__file__).parent / "results" / "weighting_curves.png"


def main() -> None:
    curves = {
        "CCE": create_weighting("cce"),
        "MAE": create_weighting("mae"),
        "MSE": create_weighting("mse"),
        "GCE q=0.7": create_weighting("gce", q=0.7),
        "IMAE T=8": create_weighting("imae", T=8.0),
        "DM λ=0.5, β=8": create_weighting("dm", lam=0.5, beta=8.0),
        "DM λ=1, β=16": create_weighting("dm", lam=1.0, beta=16.0),
        "DM λ=2, β=16": create_weighting("dm", lam=2.0, beta=16.0),
    }
    print(plot_weighting_curves(curves, OUT, normalise=True))


if __name__ == "__main__":
    main()
