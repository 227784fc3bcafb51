"""The family-weights benchmark's tables, its scoring of cached evidence and its results table
(nothing is trained)."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from dm_audit import stage_results
from tests.conftest import load_benchmark


@pytest.fixture(scope="module")
def family_weights():
    yield from load_benchmark("family_weights")


def test_the_small_tables_are_seeded_and_shaped(family_weights) -> None:
    for shape in family_weights.SMALL_SHAPES:
        for clusters in (1, 2):
            x, y = family_weights.small_table(shape, clusters, seed=3)
            assert x.shape == (shape[0], shape[1]) and np.unique(y).size == shape[2]
            np.testing.assert_array_equal(family_weights.small_table(shape, clusters, 3)[0], x)


def test_every_job_is_a_development_table(family_weights) -> None:
    jobs = family_weights.jobs(seed=0)
    groups = {group for group, *_ in jobs}
    assert groups == {"dev datasets", "small, one cluster", "small, two clusters"}
    dev = {spec.name for group, spec, *_ in jobs if group == "dev datasets"}
    assert "digits" in dev and "digits-images" not in dev and "wine" not in dev  # test split
    small = [job for job in jobs if job[0] == "small, one cluster"]
    assert len(small) == len(family_weights.SMALL_SHAPES) * family_weights.SMALL_SEEDS * 4


def _evidence() -> dict[str, np.ndarray]:
    # The audit network at chance (one class for every row), the probe right on every row but
    # the wrong label's, the reference right on every row.
    given = np.array([0, 1, 0, 1, 1, 0])
    truth = np.array([0, 1, 0, 1, 0, 0])
    audit = np.tile(np.array([[0.9, 0.1]], dtype=np.float32), (6, 1))
    probe = np.eye(2, dtype=np.float32)[truth] * 0.2 + 0.4
    reference = np.eye(2, dtype=np.float32)[given] * 0.8 + 0.1
    reference[4] = [0.8, 0.2]  # the wrong label: the reference sees the true class
    return {
        "given": given,
        "truth": truth,
        "probs": audit,
        "probe": probe,
        "reference": reference,
        "mean_p": np.zeros(0),
        "p_given": audit[np.arange(6), given],
        "knn": np.ones(6),
        "votes": np.eye(2, dtype=np.float32)[given],
        "issue_weights": np.array([1.0, 0.0, 0.0]),
    }


def test_the_weightings_are_the_audits_and_the_equal_rule(family_weights) -> None:
    ev = _evidence()
    table = pd.DataFrame({"fold": [0, 1] * 3, "given": ev["given"]})
    scores = stage_results.ExampleScores(table, ev["probs"], [], None, ev["probe"], ev["reference"])
    mixed = family_weights.weightings(ev)
    # `skill` is what the audit reads, for the flags and for the suggestions' confidence.
    np.testing.assert_allclose(mixed["skill"][0], scores.ensemble_probs())
    np.testing.assert_allclose(mixed["skill"][1], scores.combined_probs())
    networks = (ev["probs"] + ev["probe"]) / 2
    np.testing.assert_allclose(mixed["equal"][0], (networks + ev["reference"]) / 2, atol=1e-6)
    np.testing.assert_allclose(mixed["equal"][1], (ev["probs"] + ev["reference"]) / 2, atol=1e-6)
    measured = family_weights.measure(ev)
    assert measured["reference_share"] == scores.family_weights.reference_share
    assert set(measured) >= {"f1 skill", "f1 equal", "auroc skill", "flagged equal"}
    assert set(measured) >= {"right after skill", "right after equal"}


def test_the_results_table(family_weights, tmp_path) -> None:
    rows = [
        {"group": "g", "table": "t", "setting": "clean", "seed": 0, "noise": 0.0}
        | {"reference_share": 0.5, "flagged skill": 0.01, "flagged equal": 0.03}
        | {"right after skill": 0.99, "right after equal": 0.97},
        {"group": "g", "table": "t", "setting": "symmetric 20%", "seed": 0, "noise": 0.2}
        | {"reference_share": 0.7, "f1 skill": 0.9, "f1 equal": 0.8, "auroc skill": 0.95}
        | {"auroc equal": 0.93, "flagged skill": 0.2, "flagged equal": 0.25}
        | {"f1 cleanlab + LR": 0.85, "flagged cleanlab + LR": 0.2}
        | {"suggestion skill": 1.0, "suggestion equal": 0.5}
        | {"right after skill": 0.95, "right after equal": 0.93},
    ]
    clock = type("Clock", (), {"load": 0.25, "seconds": lambda self: 60.0})()
    out = tmp_path / "family_weights.md"
    family_weights.write(rows, out, "cmd", 0, clock)
    text = out.read_text()
    assert "`cmd` (seed 0," in text and "load average 0.25" in text
    assert (
        "| g | 2 | 0.9000 | 0.8000 | 0.8500 | 0.9500 | 0.9300 | 0.0100 | 0.0300 | – | 1 / 0 "
        "| 1.0000 / 0.5000 | 0.9700 / 0.9500 |" in text
    )
    assert "| g | t | 0.6000 | 0.9000 | 0.8000 | 0.8500 |" in text
