"""The evidence-choices benchmark: its variants on hand-made evidence, and its table."""

from __future__ import annotations

import numpy as np
import pytest

from tests.conftest import load_benchmark


@pytest.fixture(scope="module")
def choices():
    yield from load_benchmark("evidence_choices")


def _evidence(n_per_class: int = 30, wrong: int = 6, seed: int = 0) -> dict[str, np.ndarray]:
    """Three classes; the audit network is sure of every row's true class, the probe less so
    on the correctly labelled rows, the linear reference leans to the true class."""
    rng = np.random.default_rng(seed)
    truth = np.repeat(np.arange(3), n_per_class)
    given = truth.copy()
    flipped = rng.choice(truth.size, size=wrong, replace=False)
    given[flipped] = (truth[flipped] + 1) % 3
    probs = np.full((truth.size, 3), 0.05)
    probs[np.arange(truth.size), truth] = 0.9
    probe = np.full((truth.size, 3), 0.1)
    probe[np.arange(truth.size), truth] = 0.8
    probe[flipped] = probs[flipped]
    reference = np.full((truth.size, 3), 0.2)
    reference[np.arange(truth.size), truth] = 0.6
    votes = np.eye(3)[truth]
    return {
        "given": given,
        "truth": truth,
        "probs": probs,
        "probe": probe,
        "reference": reference,
        "mean_p": np.where(given == truth, 0.9, 0.1),
        "p_given": probs[np.arange(truth.size), given],
        "knn": np.where(given == truth, 1.0, 0.0),
        "votes": votes,
        "issue_weights": np.array([1.0, 2.0, 1.0]),
        # What the audit flagged: here exactly the mislabelled rows.
        "is_issue": given != truth,
    }


def test_the_prediction_sources_average_as_the_audit_does(choices):
    ev = _evidence()
    np.testing.assert_allclose(
        choices.prediction_probs(ev, "combined"), (ev["probs"] + ev["reference"]) / 2
    )
    np.testing.assert_allclose(
        choices.prediction_probs(ev, "ensemble"),
        ((ev["probs"] + ev["probe"]) / 2 + ev["reference"]) / 2,
    )
    # Without a reference (images) the network family stands alone.
    images = ev | {"reference": np.zeros(0)}
    np.testing.assert_allclose(choices.prediction_probs(images, "combined"), ev["probs"])
    with pytest.raises(ValueError, match="unknown source"):
        choices.prediction_probs(ev, "probe")


def test_every_variant_finds_evidence_this_plain(choices):
    ev = _evidence()
    row = choices.measure(ev)
    assert row["noise"] == pytest.approx(6 / 90)
    for source in choices.SOURCES:
        assert row[f"f1 {source}"] == 1.0
        assert row[f"auroc {source}"] == 1.0
    # The network and the neighbours name the true class: every suggestion is right, and the
    # automatic corrections set every label right.
    assert row["suggestion acc allowed"] == row["suggestion acc excluded"] == 1.0
    assert row["suggestion acc excluded combined"] == 1.0
    assert row["suggestion acc all flagged excluded"] == 1.0
    assert row["labels right after excluded"] == 1.0
    # Flags the rule does not reproduce mean the benchmark no longer measures the audit.
    with pytest.raises(SystemExit, match="reproduces"):
        choices.measure(ev | {"is_issue": np.zeros_like(ev["is_issue"])})


def test_the_cache_key_follows_the_code(choices, monkeypatch):
    key = choices.code_key()
    assert len(key) == 12 and key == choices.code_key()
    import torch

    threads = torch.get_num_threads()
    monkeypatch.setattr(torch, "get_num_threads", lambda: threads + 1)
    assert choices.code_key() != key


def test_a_flagged_row_is_not_suggested_its_own_label(choices):
    ev = _evidence()
    flagged = ev["given"] != ev["truth"]
    # Make the evidence of the first flagged row favour its given label.
    row = int(np.flatnonzero(flagged)[0])
    ev["probs"][row] = np.eye(3)[ev["given"][row]] * 0.9 + 0.05 / 1.0
    ev["probs"][row] /= ev["probs"][row].sum()
    ev["votes"][row] = np.eye(3)[ev["given"][row]]
    allowed, _ = choices.suggestions(ev, flagged, exclude_given=False)
    excluded, confidence = choices.suggestions(ev, flagged, exclude_given=True)
    assert allowed[row] == ev["given"][row]
    assert excluded[row] != ev["given"][row]
    assert confidence[row] < 0.8  # too unsure to be corrected automatically


def test_the_table_has_a_row_per_setting_and_the_means(choices):
    rows = [
        {"dataset": "d", "setting": "clean", **choices.measure(_evidence(wrong=0))},
        {"dataset": "d", "setting": "symmetric 20%", **choices.measure(_evidence())},
    ]
    lines = choices.summary(rows)
    assert lines[0].startswith("| dataset | noise |")
    # One row per setting, and the dataset's row of the neighbours' weight table.
    assert sum(line.startswith("| d |") for line in lines) == 3
    assert any(line.startswith("| d | 1.0000 | 1.0000 |") for line in lines)
    assert any(line.startswith("| mean F1, 20-40 % noise | 1.0000 | 1.0000 |") for line in lines)
    assert any(line.startswith("| mean share flagged, clean | 0.0000 |") for line in lines)
    assert any(
        line.startswith("| lowest suggestion accuracy, 20 % noise | 1.0000 | 1.0000 |")
        for line in lines
    )
