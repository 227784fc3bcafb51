"""Training dynamics: storage, per-example summary with hand-computed answers, memmap, state."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from dm_audit.dynamics import TrainingDynamics

# Four examples over four epochs, with p_i and "predicted == given" chosen by hand.
P = np.array(
    [
        [0.1, 0.6, 0.9, 0.95],  # learned at epoch 2, stays
        [0.8, 0.3, 0.7, 0.2],  # forgotten twice, wrong at the end
        [0.05, 0.05, 0.05, 0.05],  # never learned
        [0.9, 0.9, 0.4, 0.9],  # forgotten once, relearned at epoch 4
    ],
    dtype=np.float32,
)
OK = P > 0.5


def _filled(**kwargs) -> TrainingDynamics:
    dyn = TrainingDynamics(4, 5, **kwargs)
    rng = np.random.default_rng(0)
    for epoch in range(4):
        # Batches arrive in a shuffled order, as in training.
        order = rng.permutation(4)
        for batch in (order[:3], order[3:]):
            dyn.record(epoch, batch, P[batch, epoch], OK[batch, epoch])
        dyn.end_epoch(epoch)
    return dyn


def test_summary_matches_hand_computed_values():
    summary = _filled().summary()
    p16 = P.astype(np.float16).astype(np.float32)
    np.testing.assert_allclose(summary["mean_p"], p16.mean(1), rtol=1e-6)
    np.testing.assert_allclose(summary["std_p"], p16.std(1), rtol=1e-5)
    np.testing.assert_allclose(summary["min_p"], p16.min(1))
    np.testing.assert_allclose(summary["max_p"], p16.max(1))
    np.testing.assert_allclose(summary["last_p"], p16[:, -1])
    # Trapezoid area over 3 unit steps, divided by 3.
    expected_auc = ((p16[:, 1:] + p16[:, :-1]) / 2).sum(1) / 3
    np.testing.assert_allclose(summary["auc_p"], expected_auc, rtol=1e-6)
    assert summary["first_learned_epoch"].tolist() == [2, -1, -1, 4]
    assert summary["forgetting_events"].tolist() == [0, 2, 0, 1]
    assert list(summary.columns) == [
        "mean_p",
        "std_p",
        "min_p",
        "max_p",
        "last_p",
        "auc_p",
        "first_learned_epoch",
        "forgetting_events",
    ]


def test_storage_is_float16_and_bounded():
    dyn = _filled()
    assert dyn.p_matrix().dtype == np.float16 and dyn.p_matrix().shape == (4, 4)
    assert dyn.correct_matrix().shape == (4, 4) and not dyn.memory_mapped
    np.testing.assert_array_equal(dyn.correct_matrix(), OK)


def test_memmap_above_the_memory_bound_gives_the_same_answers(tmp_path):
    in_memory = _filled().summary()
    mapped = _filled(memory_limit_bytes=10, directory=tmp_path)
    assert mapped.memory_mapped and len(list(tmp_path.iterdir())) == 1
    assert isinstance(mapped.p_matrix().base, np.memmap) or isinstance(mapped._p, np.memmap)
    assert mapped.summary().equals(in_memory)
    mapped.close()
    assert list(tmp_path.iterdir()) == []  # the temporary folder is gone


def test_truncate_and_state_round_trip():
    dyn = _filled()
    state = dyn.state_dict()
    assert isinstance(state["p"], torch.Tensor) and state["p"].dtype == torch.float16
    other = TrainingDynamics(4, 5)
    other.load_state_dict(state)
    assert other.summary().equals(dyn.summary())
    dyn.truncate(2)
    assert dyn.n_recorded == 2 and dyn.p_matrix().shape == (4, 2)
    assert dyn.summary()["first_learned_epoch"].tolist() == [2, -1, -1, 1]
    with pytest.raises(ValueError, match="does not fit"):
        TrainingDynamics(3, 5).load_state_dict(state)


def test_unseen_examples_and_empty_history():
    dyn = TrainingDynamics(3, 2)
    assert dyn.summary()["mean_p"].isna().all()  # nothing recorded yet
    dyn.record(0, np.array([0, 2]), np.array([0.2, 0.4]), np.array([False, False]))
    dyn.end_epoch(0)
    summary = dyn.summary()
    assert np.isnan(summary["mean_p"][1]) and summary["mean_p"][0] == pytest.approx(0.2, abs=1e-3)
    assert summary["auc_p"][2] == pytest.approx(0.4, abs=1e-3)  # one epoch: the value itself
    with pytest.raises(IndexError):
        dyn.record(2, np.array([0]), np.array([0.1]), np.array([True]))
