"""Training engine on scikit-learn's digits: accuracy, noise robustness, resume, collapse guard."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from sklearn.datasets import load_digits
from sklearn.metrics import roc_auc_score
from sklearn.model_selection import train_test_split

from dm_audit.batches import RowSubset, augmentation, check_inputs
from dm_audit.collapse_guard import CollapseGuard
from dm_audit.errors import ConfigError, DataError
from dm_audit.inference import predict_class_probs
from dm_audit.losses import create_loss
from dm_audit.metrics import balanced_accuracy_vs_chance
from dm_audit.noise import inject_symmetric
from dm_audit.training import (
    CHECKPOINT_NAME,
    CHECKPOINT_SECONDS_ENV,
    DEFAULT_CHECKPOINT_SECONDS,
    MLP_DECAY_ROWS,
    MLP_WEIGHT_DECAY,
    FitResult,
    TrainConfig,
    checkpoint_interval,
    fit,
    predict_proba,
    resolve_device,
)


@pytest.fixture(scope="module")
def digits() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Digits features / 16, 70/30 stratified split (seed 0): x_train, x_test, y_train, y_test."""
    data = load_digits()
    x = (data.data / 16.0).astype(np.float32)
    y = data.target.astype(np.int64)
    return tuple(train_test_split(x, y, test_size=0.3, stratify=y, random_state=0))


def _fit(digits, *, labels=None, true_labels=None, **options) -> FitResult:
    x_train, x_test, y_train, y_test = digits
    options.setdefault("progress", False)
    config = TrainConfig(model="mlp", **options)
    return fit(
        x_train,
        y_train if labels is None else labels,
        config,
        num_classes=10,
        eval_inputs=x_test,
        eval_labels=y_test,
        true_labels=true_labels,
    )


# ------------------------------------------------------------------------------ configuration


@pytest.mark.parametrize(
    ("options", "field"),
    [
        ({"epochs": 0}, "epochs"),
        ({"batch_size": 1}, "batch_size"),
        ({"optimizer": "rmsprop"}, "optimizer"),
        ({"lr": -1.0}, "lr"),
        ({"weight_decay": -0.1}, "weight_decay"),
        ({"schedule": "linear"}, "schedule"),
        ({"emphasis_ramp": 1.5}, "emphasis_ramp"),
        ({"device": "gpu"}, "device"),
        ({"amp": "fp8"}, "amp"),
        ({"model": "vgg"}, "model"),
        ({"augment": "mixup"}, "augment"),
        ({"collapse_share": 0.3}, "collapse_share"),
        ({"step_milestones": (0.75, 0.5)}, "step_milestones"),
        ({"progress": "yes"}, "progress"),
        ({"loss_params": {"ramp": 0.5}}, "emphasis_ramp"),
    ],
)
def test_config_rejects_bad_values(options, field):
    with pytest.raises(ConfigError, match=field):
        TrainConfig(**options)


def test_config_round_trips_through_dict():
    config = TrainConfig(loss="dm", loss_params={"lam": 1.0, "beta": 16.0}, step_milestones=(0.3,))
    again = TrainConfig.from_dict(config.to_dict())
    assert again == config
    with pytest.raises(ConfigError, match="unknown TrainConfig field"):
        TrainConfig.from_dict({"epochz": 3})


def test_mlp_weight_decay_shrinks_with_the_table_size():
    from dm_audit.models import create_model

    mlp = create_model("mlp", num_classes=10, input_shape=(64,))
    resnet = create_model("resnet20", num_classes=10, input_shape=(32, 32, 3))
    config = TrainConfig()
    # Full strength up to MLP_DECAY_ROWS examples (digits, wine), then as 1/N.
    assert config.resolved_weight_decay(mlp, 1_257) == MLP_WEIGHT_DECAY == 2e-2
    assert config.resolved_weight_decay(mlp, MLP_DECAY_ROWS) == 2e-2
    assert config.resolved_weight_decay(mlp, 50_000) == pytest.approx(2e-3)
    assert config.resolved_weight_decay(mlp, 1_000_000) == pytest.approx(1e-4)
    # A user's value and the other families' recipes do not depend on the size.
    assert TrainConfig(weight_decay=0.05).resolved_weight_decay(mlp, 1_000_000) == 0.05
    assert config.resolved_weight_decay(resnet, 1_000_000) == 5e-4


def test_recipe_defaults_resolve_per_model_family(digits):
    result = _fit(digits, loss="cce", epochs=1)
    assert result.recipe == {
        "model": "mlp",
        "device": "cpu",
        "amp": "off",
        "optimizer": "sgd",
        "lr": 0.1,
        "weight_decay": 0.02,
        "epochs": 1,
        "batch_size": 128,
        "iterations": 10,  # 1257 examples: 9 batches of 128 and one of 105
    }


def test_resolve_device():
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device("auto").type in ("cpu", "cuda", "mps")
    with pytest.raises(ConfigError, match="device"):
        resolve_device("tpu")
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match="CUDA is not available"):
            resolve_device("cuda:0")


def test_bad_inputs_are_named(digits):
    x_train, _, y_train, _ = digits
    config = TrainConfig(model="mlp", loss="cce", epochs=1, progress=False)
    bad = x_train.copy()
    bad[7, 3] = np.nan
    with pytest.raises(DataError, match="row 7, column 3"):
        fit(bad, y_train, config, num_classes=10)
    labels = y_train.copy()
    labels[5] = 10
    with pytest.raises(DataError, match="row 5 has label 10"):
        fit(x_train, labels, config, num_classes=10)
    with pytest.raises(DataError, match="true_labels"):
        fit(x_train, y_train, config, num_classes=10, true_labels=y_train[:-1])
    with pytest.raises(ConfigError, match="unknown loss"):
        fit(x_train, y_train, TrainConfig(model="mlp", loss="hinge"), num_classes=10)


# ------------------------------------------------------------------------------ learning


@pytest.mark.parametrize(
    ("loss", "params"),
    [("cce", {}), ("dm", {}), ("dm", {"lam": 1.0, "beta": 16.0})],
)
def test_clean_digits_reach_95_percent(digits, loss, params):
    result = _fit(digits, loss=loss, loss_params=params, epochs=30)
    last = result.history[-1]
    assert last["eval_acc"] >= 0.95
    assert last["train_acc"] >= 0.97
    assert result.events == []
    assert [h["epoch"] for h in result.history] == list(range(1, 31))
    assert result.model.training is False
    if loss == "dm":
        assert last["emphasis_scale"] == 1.0  # the ramp (20% of training) is over
        # Set before each step: the epoch's last step (iteration 9) of a 60-iteration ramp.
        assert result.history[0]["emphasis_scale"] == pytest.approx(9 / 60)
    else:
        assert last["emphasis_scale"] is None
    # The cosine schedule ends near zero.
    assert last["lr"] < 1e-3 < result.history[0]["lr"]


@pytest.mark.parametrize(
    ("loss", "params", "ramped"),
    [
        ("imae", {"T": 8.0}, True),
        ("proselflc", {"dm_lam": 0.5, "dm_beta": 8.0}, True),
        ("proselflc", {}, False),
        ("gce", {"q": 0.7}, False),
        ("ls", {"eps": 0.1}, False),
    ],
)
def test_every_loss_family_trains(digits, loss, params, ramped):
    result = _fit(digits, loss=loss, loss_params=params, epochs=5)
    first, last = result.history[0], result.history[-1]
    assert last["eval_acc"] >= 0.85
    if ramped:  # the emphasis ramp (one epoch of five) reaches the DM weighting
        assert first["emphasis_scale"] == pytest.approx(9 / 10) and last["emphasis_scale"] == 1.0
    else:
        assert last["emphasis_scale"] is None or last["emphasis_scale"] == 1.0


@pytest.mark.slow
def test_noisy_digits_dm_does_not_memorise_where_cce_does(digits):
    """The product's acceptance target on 40% symmetric noise with the default recipe."""
    _, _, y_train, _ = digits
    noisy = inject_symmetric(y_train, 10, 0.4, seed=0)
    assert (noisy != y_train).sum() == int(0.4 * len(y_train))
    cce = _fit(digits, labels=noisy, true_labels=y_train, loss="cce")
    dm = _fit(
        digits, labels=noisy, true_labels=y_train, loss="dm", loss_params={"lam": 1.0, "beta": 16.0}
    )
    c, d = cce.history[-1], dm.history[-1]
    assert cce.events == dm.events == []  # no false collapse alarm
    # Measured: CCE test 0.65 / noisy fit 1.00 / clean fit 1.00; DM 0.89 / 0.14 / 0.99.
    assert c["noisy_fit"] >= 0.9
    assert d["noisy_fit"] <= 0.2
    assert d["test_acc"] >= c["test_acc"] + 0.15
    assert d["clean_fit"] >= 0.95
    assert d["noisy_correction"] >= 0.7  # the noisy examples are predicted as their true class
    assert d["entropy_noisy"] > d["entropy_clean"]
    assert d["n_noisy"] == int(0.4 * len(y_train)) and d["n_open_set"] == 0
    # The DM model's p_i curves separate the noisy examples from the clean ones.
    summary = dm.dynamics.summary()
    is_noisy = noisy != y_train
    assert roc_auc_score(is_noisy, -summary["mean_p"]) > 0.95
    assert summary["first_learned_epoch"][is_noisy].eq(-1).mean() > 0.8


def test_six_metrics_count_open_set_examples_apart(digits):
    _, _, y_train, _ = digits
    truth = y_train.copy()
    truth[:50] = -1  # pretend the first 50 are inputs of no known class
    result = _fit(digits, loss="cce", epochs=2, true_labels=truth)
    entry = result.history[-1]
    assert entry["n_open_set"] == 50
    assert entry["n_clean"] == len(y_train) - 50 and entry["n_noisy"] == 0
    assert np.isnan(entry["noisy_fit"]) and 0.0 <= entry["open_set_fit"] <= 1.0
    assert entry["test_acc"] == entry["eval_acc"]


# ------------------------------------------------------------------------------ predictions


def test_predict_proba_shapes_and_mode(digits):
    x_train, x_test, _, _ = digits
    result = _fit(digits, loss="cce", epochs=2)
    model = result.model.train()
    probs, emb = predict_proba(model, x_test, "cpu", batch_size=100)
    assert probs.shape == (len(x_test), 10) and probs.dtype == np.float32
    assert emb.shape == (len(x_test), 256) and emb.dtype == np.float32
    np.testing.assert_allclose(probs.sum(axis=1), 1.0, atol=1e-5)
    assert model.training  # restored
    again, _ = predict_proba(model, x_test, "cpu", batch_size=7)
    np.testing.assert_allclose(again, probs, atol=1e-5)  # eval mode: batch-independent
    with pytest.raises(DataError, match="per example"):
        predict_proba(model, x_train[:, :10], "cpu")


def test_dynamics_from_an_eval_pass_match_the_final_model(digits):
    x_train, _, y_train, _ = digits
    result = _fit(digits, loss="cce", epochs=3, dynamics_source="eval")
    assert result.dynamics.n_recorded == 3 and result.dynamics.source == "eval"
    probs, _ = predict_proba(result.model, x_train, "cpu")
    last = result.dynamics.p_matrix()[:, -1].astype(np.float32)
    np.testing.assert_allclose(last, probs[np.arange(len(y_train)), y_train], atol=1e-3)


# ------------------------------------------------------------------------------ checkpoints


class _Stop(Exception):
    pass


def _stop_after(epochs: int):
    def callback(entry: dict) -> None:
        if entry["epoch"] == epochs:
            raise _Stop

    return callback


def _same_weights(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def _strip_timing(history: list[dict]) -> list[dict]:
    return [{k: v for k, v in h.items() if k not in ("seconds", "examples_per_s")} for h in history]


def _run(x, y, config, tmp: Path | None, **kw) -> FitResult:
    return fit(x, y, config, num_classes=10, checkpoint_dir=tmp, **kw)


def test_resume_is_bit_identical(digits, tmp_path):
    x_train, _, y_train, _ = digits
    config = TrainConfig(
        model="mlp",
        model_params={"dropout": 0.1},  # exercises the torch RNG state
        loss="dm",
        loss_params={"lam": 1.0, "beta": 16.0},
        epochs=6,
        progress=False,
    )
    full = _run(x_train, y_train, config, None)
    with pytest.raises(_Stop):
        _run(x_train, y_train, config, tmp_path, on_epoch_end=_stop_after(3))
    state = torch.load(tmp_path / CHECKPOINT_NAME, weights_only=True)
    assert state["epoch"] == 3 and len(state["history"]) == 3
    assert [p.name for p in tmp_path.iterdir()] == [CHECKPOINT_NAME]  # no temporary files
    resumed = _run(x_train, y_train, config, tmp_path, resume=True)
    assert _same_weights(full.model, resumed.model)
    assert _strip_timing(full.history) == _strip_timing(resumed.history)
    np.testing.assert_array_equal(full.dynamics.p_matrix(), resumed.dynamics.p_matrix())
    assert resumed.events == [
        {"event": "resume", "epoch": 3, "checkpoint": str(tmp_path / CHECKPOINT_NAME)}
    ]


def test_resume_with_augmented_images_is_bit_identical(make_colour_images, tmp_path):
    images, labels = make_colour_images(n_per_class=6, size=8)
    config = TrainConfig(
        model="resnet20", loss="cce", epochs=4, batch_size=8, augment="crop_flip", progress=False
    )
    full = fit(images, labels, config, num_classes=3)
    with pytest.raises(_Stop):
        fit(
            images,
            labels,
            config,
            num_classes=3,
            checkpoint_dir=tmp_path,
            on_epoch_end=_stop_after(2),
        )
    resumed = fit(images, labels, config, num_classes=3, checkpoint_dir=tmp_path, resume=True)
    assert _same_weights(full.model, resumed.model)
    probs, emb = predict_proba(resumed.model, images, "cpu")
    assert probs.shape == (18, 3) and emb.shape == (18, 64)
    assert full.recipe["weight_decay"] == 5e-4  # the CIFAR ResNet recipe


def test_checkpoint_of_another_configuration_is_refused(digits, tmp_path):
    x_train, _, y_train, _ = digits
    config = TrainConfig(model="mlp", loss="cce", epochs=1, progress=False)
    _run(x_train, y_train, config, tmp_path)
    other = TrainConfig(model="mlp", loss="cce", epochs=1, lr=0.05, progress=False)
    with pytest.raises(ConfigError, match=r"different training configuration.*lr: checkpoint None"):
        _run(x_train, y_train, other, tmp_path, resume=True)
    with pytest.raises(ConfigError, match="different training data"):
        _run(x_train, (y_train + 1) % 10, config, tmp_path, resume=True)
    # Options that cannot change the weights do not matter.
    quiet = TrainConfig(model="mlp", loss="cce", epochs=1, progress=True, eval_batch_size=7)
    result = _run(x_train, y_train, quiet, tmp_path, resume=True)
    assert result.events[-1]["event"] == "resume" and len(result.history) == 1


def test_resume_without_a_checkpoint_starts_afresh(digits, tmp_path):
    x_train, _, y_train, _ = digits
    config = TrainConfig(model="mlp", loss="cce", epochs=1, progress=False)
    result = _run(x_train, y_train, config, tmp_path / "new", resume=True)
    assert len(result.history) == 1 and (tmp_path / "new" / CHECKPOINT_NAME).is_file()
    with pytest.raises(ConfigError, match="checkpoint_dir"):
        _run(x_train, y_train, config, None, resume=True)


# ------------------------------------------------------------------------------ collapse guard

# On digits with the default recipe, lam=1, beta=64 and no ramp give up on four of the ten
# classes from the first epoch on (their examples sit at p_i ~ 0, where the weight is e^16 times
# below the peak): test accuracy stays near 50%.
COLLAPSING = {"loss": "dm", "loss_params": {"lam": 1.0, "beta": 64.0}, "emphasis_ramp": 0.0}


def test_collapse_without_guard_is_reported(digits):
    result = _fit(digits, epochs=20, collapse_guard=False, **COLLAPSING)
    assert result.history[-1]["eval_acc"] < 0.6
    assert result.history[-1]["dead_class_share"] >= 0.2
    assert len(result.events) == 1  # the start of the collapsed stretch, not every epoch
    event = result.events[0]
    assert (event["event"], event["reason"], event["action"]) == (
        "collapse",
        "dead_classes",
        "none",
    )
    # A symptom from epoch 2 on; a collapse once it persists (epoch 3).
    assert result.history[1]["alarm"] == "dead_classes" and not result.history[1]["collapsed"]
    assert all(h["collapsed"] for h in result.history[2:]) and event["epoch"] == 3
    assert result.loss_params == {"lam": 1.0, "beta": 64.0}


def test_collapse_guard_recovers(digits):
    result = _fit(digits, epochs=20, **COLLAPSING)
    assert result.history[-1]["eval_acc"] >= 0.95
    assert len(result.events) == 1
    event = result.events[0]
    assert event["action"] == "rollback" and event["rollback_to_epoch"] == 0
    assert event["new_loss_params"] == {"lam": 0.5, "beta": 32.0}
    assert event["new_emphasis_ramp"] == 0.25
    assert result.loss_params == {"lam": 0.5, "beta": 32.0}
    kept = [h for h in result.history if not h["discarded"]]
    assert [h["epoch"] for h in kept] == list(range(1, 21))
    assert all(h["attempt"] == 1 for h in kept)
    assert result.dynamics.n_recorded == 20


def test_resume_after_a_recovery_is_bit_identical(digits, tmp_path):
    x_train, _, y_train, _ = digits
    config = TrainConfig(model="mlp", epochs=8, progress=False, **COLLAPSING)
    full = _run(x_train, y_train, config, None)
    with pytest.raises(_Stop):
        _run(x_train, y_train, config, tmp_path, on_epoch_end=_stop_after(4))
    resumed = _run(x_train, y_train, config, tmp_path, resume=True)
    assert _same_weights(full.model, resumed.model)
    assert resumed.loss_params == full.loss_params == {"lam": 0.5, "beta": 32.0}


def test_the_result_reports_the_emphasis_a_recovery_left(digits):
    # The guard halves lambda and beta and doubles the ramp (to at least 0.25): the result
    # reports the weighting that trained the final model, not the configured one.
    x_train, _, y_train, _ = digits
    config = TrainConfig(model="mlp", epochs=8, progress=False, **COLLAPSING)
    result = fit(x_train, y_train, config, num_classes=10)
    assert [e["action"] for e in result.events] == ["rollback"]
    assert result.config.loss_params == {"lam": 1.0, "beta": 64.0}
    assert result.effective_loss_params == {"lam": 0.5, "beta": 32.0, "ramp": 0.25}
    assert result.lr_scale == 1.0
    # The reported parameters rebuild the loss that trained the final model.
    loss = create_loss(config.loss, **result.effective_loss_params)
    assert loss.weighting.params == {"lam": 0.5, "beta": 32.0} and loss.ramp == 0.25


@pytest.mark.parametrize(
    ("loss", "params", "effective"),
    [
        # DM's defaults are filled in; the configured ramp (0.2) is the one in force.
        ("dm", {}, {"lam": 0.5, "beta": 8.0, "ramp": 0.2}),
        ("cce", {}, {}),
    ],
)
def test_without_a_recovery_the_effective_emphasis_is_the_configured_one(
    digits, loss, params, effective
):
    result = _fit(digits, loss=loss, loss_params=params, epochs=1)
    assert result.events == []
    assert result.effective_loss_params == effective and result.lr_scale == 1.0


def test_a_recovery_without_emphasis_parameters_halves_the_learning_rate():
    guard = CollapseGuard(TrainConfig(loss="cce", progress=False), label_share=0.1, total_iters=10)
    guard.snapshot = {"epoch": 1, "global_iter": 2}
    history = [
        {"epoch": 2, "discarded": False, "collapsed": False, "alarm": "dead_classes"},
        {"epoch": 3, "discarded": False, "collapsed": False, "alarm": "dead_classes"},
    ]
    entry = history[-1] | {"pred_share": 0.5, "train_acc": 0.1}
    history[-1] = entry
    events: list[dict] = []
    target = guard.recover(entry, history, events)
    assert target == guard.snapshot and target is not guard.snapshot  # a copy to restore
    assert (guard.attempt, guard.lr_scale, guard.ramp, guard.loss_params) == (1, 0.5, 0.4, {})
    assert all(h["discarded"] for h in history)
    assert events[0]["action"] == "rollback" and events[0]["rollback_to_epoch"] == 1


def _imbalanced_blobs(
    counts: tuple[int, ...] = (980, 10, 10), *, informative: bool = True, seed: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    """Clean labels, ``counts[k]`` rows of class k; features 4 standard deviations apart.

    With ``informative=False`` the features are noise that says nothing about the labels.
    """
    rng = np.random.default_rng(seed)
    y = np.repeat(np.arange(len(counts)), counts)
    noise = rng.normal(0.0, 0.6, size=(len(y), 8))
    x = 4.0 * np.eye(len(counts), 8)[y] + noise if informative else noise
    return x.astype(np.float32), y.astype(np.int64)


def test_balanced_accuracy_and_its_chance_limit():
    counts = np.array([980, 10, 10])
    # Answering the majority class for everything: accuracy 0.98, balanced accuracy 1/3, and
    # with every prediction in one class the null has no spread: the limit is 1/3 + 0.02.
    balanced, chance = balanced_accuracy_vs_chance(
        np.array([980, 0, 0]), counts, np.array([1.0, 0, 0])
    )
    assert balanced == pytest.approx(1 / 3) and chance == pytest.approx(1 / 3 + 0.02)
    assert balanced <= chance
    # Every class learnt: 1.0, far above 1/3 + 3 standard errors.
    q = np.array([0.98, 0.01, 0.01])
    balanced, chance = balanced_accuracy_vs_chance(np.array([980, 10, 10]), counts, q)
    se = np.sqrt(0.98 * 0.02 / 980 + 2 * 0.01 * 0.99 / 10) / 3
    assert balanced == 1.0 and chance == pytest.approx(1 / 3 + 3 * se)
    assert chance < 0.4
    # Balanced labels: balanced accuracy is accuracy, the limit 1/C + 0.02 as for accuracy.
    balanced, chance = balanced_accuracy_vs_chance(
        np.full(10, 12), np.full(10, 1000), np.full(10, 0.1)
    )
    assert balanced == pytest.approx(0.012) and chance == pytest.approx(0.12)
    # Five examples per class: the limit stops halfway to a perfect score (3 SE would pass 1).
    balanced, chance = balanced_accuracy_vs_chance(
        np.array([5, 5]), np.array([5, 5]), np.array([0.5, 0.5])
    )
    assert balanced == 1.0 and chance == pytest.approx(0.75)
    # Classes of fewer than five rows are not judged: 298 rows of one class and 2 of another,
    # all answered with the first, is no evidence of a collapse (the 2 may be mislabelled).
    assert balanced_accuracy_vs_chance(
        np.array([298, 0]), np.array([298, 2]), np.array([1.0, 0.0])
    ) == (None, None)
    balanced, chance = balanced_accuracy_vs_chance(
        np.array([500, 0, 0]), np.array([500, 500, 3]), np.array([1.0, 0.0, 0.0])
    )
    assert balanced == pytest.approx(0.5) and balanced <= chance  # judged on the two big ones
    # Classes without labels are left out; one class alone has no chance level.
    balanced, chance = balanced_accuracy_vs_chance(
        np.array([4, 1, 0]), np.array([5, 5, 0]), np.array([0.7, 0.3, 0.0])
    )
    assert balanced == pytest.approx(0.5) and chance > 0.5
    assert balanced_accuracy_vs_chance(
        np.array([5, 0]), np.array([5, 0]), np.array([1.0, 0.0])
    ) == (
        None,
        None,
    )


def test_a_clean_imbalanced_table_trains_without_a_collapse_alarm():
    # 98% of the labels in one class: accuracy <= majority share + 0.02 holds for any model,
    # so a guard on plain accuracy rolled this run back until the rare classes were lost.
    x, y = _imbalanced_blobs()
    result = fit(x, y, TrainConfig(model="mlp", epochs=20, progress=False), num_classes=3)
    assert result.events == []
    assert all(h["alarm"] is None and not h["discarded"] for h in result.history)
    assert all(h["attempt"] == 0 for h in result.history)  # the emphasis was never reduced
    assert result.history[-1]["balanced_acc"] >= 0.95
    pred = predict_proba(result.model, x, device="cpu")[0].argmax(axis=1)
    for k in (1, 2):
        assert np.mean(pred[y == k] == k) >= 0.9


def test_a_run_that_ignores_its_input_is_caught_on_imbalanced_labels():
    # Features without information: the network answers the majority class for everything,
    # accuracy 0.98 (the majority share) and balanced accuracy exactly 1/3.
    x, y = _imbalanced_blobs(informative=False)
    config = TrainConfig(model="mlp", loss="cce", epochs=6, collapse_guard=False, progress=False)
    result = fit(x, y, config, num_classes=3)
    (event,) = result.events
    assert (event["reason"], event["action"]) == ("chance_accuracy", "none")
    assert event["train_acc"] >= 0.98 and event["balanced_acc"] == pytest.approx(1 / 3)
    assert event["balanced_acc"] <= event["balanced_acc_chance"]


def _diagnose(label_share: float, **entry: float) -> str | None:
    """`CollapseGuard.diagnose` of one epoch's statistics, after the emphasis ramp."""
    guard = CollapseGuard(TrainConfig(progress=False), label_share=label_share, total_iters=1)
    stats = {"loss": 1.0, "dead_class_share": 0.0, **entry}
    return guard.diagnose(stats, all_checks=True)


def test_one_class_predictions_are_a_collapse_only_at_chance():
    # True shares 92/4/4 under 40% symmetric noise: the given labels are 56.8/21.6/21.6. A
    # noise-robust model predicts the true classes, so 92% of its predictions go to class 0,
    # 0.35 above the labels' majority share, yet it recalls 97% of the class-0 labels and 11%
    # of the others, each against a prediction share of 4%.
    counts = np.array([568, 216, 216])
    share = np.array([0.92, 0.04, 0.04])
    hits = np.round(np.array([0.97, 0.11, 0.11]) * counts).astype(int)
    balanced, chance = balanced_accuracy_vs_chance(hits, counts, share)
    healthy = {"pred_share": 0.92, "balanced_acc": balanced, "balanced_acc_chance": chance}
    assert _diagnose(0.568, **healthy) is None
    # The same prediction shares with no information about the labels: a collapse.
    hits = np.round(share * counts).astype(int)
    balanced, chance = balanced_accuracy_vs_chance(hits, counts, share)
    collapsed = {"pred_share": 0.92, "balanced_acc": balanced, "balanced_acc_chance": chance}
    assert _diagnose(0.568, **collapsed) == "one_class"


@pytest.mark.parametrize(("size", "max_shift"), [(8, 1), (16, 2), (32, 4), (64, 4)])
def test_crop_shift_scales_with_small_images(size, max_shift):
    # A bright pixel in the middle of a dark image moves by at most the padding.
    image = torch.zeros((1, size, size), dtype=torch.uint8)
    image[0, size // 2, size // 2] = 255
    transform = augmentation("crop", (size, size, 1))
    torch.manual_seed(0)
    shifts = set()
    for _ in range(200):
        out = transform(image)
        if out.max() == 255:
            row, col = np.argwhere(out[0].numpy() == 255)[0]
            shifts.add((int(row) - size // 2, int(col) - size // 2))
    assert max(max(abs(r), abs(c)) for r, c in shifts) == max_shift


def test_a_detached_snapshot_is_unchanged_by_training_and_restores_it() -> None:
    from types import SimpleNamespace

    from dm_audit.checkpoints import restore_state, state_of
    from dm_audit.models import MLP

    torch.manual_seed(0)
    model = MLP(4, 3)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, nesterov=True)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0 / (1 + step))
    state = SimpleNamespace(
        epoch=1,
        global_iter=1,
        model=model,
        optimizer=optimizer,
        scheduler=scheduler,
        scaler=torch.amp.GradScaler("cpu", enabled=False),
        generator=torch.Generator().manual_seed(0),
    )

    def step() -> None:
        optimizer.zero_grad()
        model(torch.randn(16, 4)).sum().backward()
        optimizer.step()
        scheduler.step()

    step()  # momentum buffers exist from here on
    snapshot = state_of(state, detach=True)
    frozen = {k: v.clone() for k, v in snapshot["model"].items()}
    momentum = [s["momentum_buffer"].clone() for s in snapshot["optimizer"]["state"].values()]
    lr = optimizer.param_groups[0]["lr"]
    weights = {k: v.clone() for k, v in model.state_dict().items()}
    for _ in range(3):
        step()
    # Training went on in place; the snapshot did not move with it.
    for k, v in snapshot["model"].items():
        torch.testing.assert_close(v, frozen[k], rtol=0, atol=0)
    for saved, before in zip(snapshot["optimizer"]["state"].values(), momentum, strict=True):
        torch.testing.assert_close(saved["momentum_buffer"], before, rtol=0, atol=0)
    assert any(not torch.equal(model.state_dict()[k], weights[k]) for k in weights)
    assert hasattr(snapshot["model"], "_metadata")  # the module versions load_state_dict reads
    restore_state(state, snapshot)
    for k, v in model.state_dict().items():
        torch.testing.assert_close(v, weights[k], rtol=0, atol=0)
    assert optimizer.param_groups[0]["lr"] == pytest.approx(lr)


def test_detached_copies_keep_mapping_and_tuple_types() -> None:
    from collections import OrderedDict, defaultdict, namedtuple

    from dm_audit.checkpoints import _detached

    pair = namedtuple("pair", "a b")
    tensor = torch.ones(2)
    ordered = OrderedDict(w=tensor)
    ordered._metadata = {"": {"version": 1}}  # type: ignore[attr-defined]
    value = {"o": ordered, "d": defaultdict(list, x=[tensor]), "p": pair(tensor, 1), "t": (1, 2)}
    out = _detached(value)
    assert type(out["o"]) is OrderedDict and out["o"]._metadata == {"": {"version": 1}}
    assert out["o"]._metadata is not ordered._metadata
    assert type(out["d"]) is defaultdict and out["d"]["new"] == []
    assert type(out["p"]) is pair and out["p"].b == 1 and out["t"] == (1, 2)
    tensor.add_(1)  # the live tensor moves on; the copies do not
    for copied in (out["o"]["w"], out["d"]["x"][0], out["p"].a):
        torch.testing.assert_close(copied, torch.ones(2))


# ------------------------------------------------------------------------------ row subsets


def test_a_row_subset_indexes_like_the_copy_it_stands_for(digits):
    x_train = digits[0]
    rows = np.random.default_rng(0).permutation(len(x_train))[:300]
    subset, copy = RowSubset(x_train, rows), x_train[rows]
    assert len(subset) == 300 and subset.shape == copy.shape
    assert subset.ndim == 2 and subset.dtype == np.float32
    for key in (
        5,
        slice(10, 50),
        slice(None, None, 7),
        np.array([3, 0, 299]),
        torch.tensor([1, 2]),
    ):
        expected = copy[key.numpy() if isinstance(key, torch.Tensor) else key]
        np.testing.assert_array_equal(subset[key], expected)
    np.testing.assert_array_equal(subset.materialise(), copy)
    assert check_inputs(subset) is subset  # checked through its base, not copied


def test_a_row_subset_of_a_subset_points_into_the_array(digits):
    x_train = digits[0]
    inner = RowSubset(x_train, np.arange(100, 200))
    outer = RowSubset(inner, np.array([5, 0, 99]))
    assert outer.base is x_train
    np.testing.assert_array_equal(outer.rows, [105, 100, 199])


def test_training_reads_a_read_only_matrix_in_place_without_a_warning(digits):
    x_train, _, y_train, _ = digits
    frozen = x_train.copy()
    frozen.flags.writeable = False
    rows = np.arange(0, len(x_train), 2)
    config = TrainConfig(model="mlp", loss="cce", epochs=1, progress=False)
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*not writable.*")
        result = fit(RowSubset(frozen, rows), y_train[rows], config, num_classes=10)
    assert result.history and not frozen.flags.writeable


@pytest.mark.parametrize("rows", [np.array([0, 10_000]), np.array([-1]), np.array([[1, 2]])])
def test_a_row_subset_refuses_rows_outside_its_base(digits, rows):
    with pytest.raises(DataError, match="rows"):
        RowSubset(digits[0], rows)


def test_training_on_a_row_subset_is_bit_identical_to_training_on_the_copy(digits, tmp_path):
    x_train, _, y_train, _ = digits
    rows = np.sort(np.random.default_rng(1).permutation(len(x_train))[:800])
    held = np.setdiff1d(np.arange(len(x_train)), rows)
    config = TrainConfig(
        model="mlp",
        model_params={"dropout": 0.1},
        loss="dm",
        loss_params={"lam": 1.0, "beta": 16.0},
        epochs=3,
        progress=False,
    )
    options = dict(num_classes=10, eval_labels=y_train[held], true_labels=y_train[rows])
    copied = fit(x_train[rows], y_train[rows], config, eval_inputs=x_train[held], **options)
    gathered = fit(
        RowSubset(x_train, rows),
        y_train[rows],
        config,
        eval_inputs=RowSubset(x_train, held),
        checkpoint_dir=tmp_path,  # the data fingerprint reads the subset too
        **options,
    )
    assert _same_weights(copied.model, gathered.model)
    # NaN-aware: the metrics of noisy examples are NaN on clean labels.
    np.testing.assert_equal(_strip_timing(copied.history), _strip_timing(gathered.history))
    np.testing.assert_array_equal(copied.dynamics.p_matrix(), gathered.dynamics.p_matrix())


def test_class_probs_of_some_rows_match_predict_proba_of_their_copy(digits):
    x_train, x_test, _, _ = digits
    model = _fit(digits, loss="cce", epochs=1).model
    rows = np.array([7, 3, 3, 400])
    probs, _ = predict_proba(model, x_train[rows], "cpu")
    np.testing.assert_array_equal(predict_class_probs(model, x_train, "cpu", rows=rows), probs)
    # Other batches only change the rounding.
    np.testing.assert_allclose(
        predict_class_probs(model, x_train, "cpu", batch_size=3, rows=rows), probs, atol=1e-6
    )
    np.testing.assert_array_equal(
        predict_class_probs(model, x_test, "cpu"), predict_proba(model, x_test, "cpu")[0]
    )
    with pytest.raises(DataError, match="rows"):
        predict_class_probs(model, x_train, "cpu", rows=np.array([len(x_train)]))


def test_a_non_finite_value_is_named_by_its_row_beyond_the_first_block():
    x = np.zeros((70_000, 3), dtype=np.float32)
    x[66_000, 2] = np.inf
    with pytest.raises(DataError, match="row 66000, column 2"):
        check_inputs(x)


def test_checkpoints_are_written_at_most_every_interval_and_after_the_last_epoch(
    digits, tmp_path, monkeypatch
):
    x_train, _, y_train, _ = digits
    config = TrainConfig(model="mlp", loss="cce", epochs=3, progress=False)
    monkeypatch.delenv(CHECKPOINT_SECONDS_ENV)
    assert checkpoint_interval() == DEFAULT_CHECKPOINT_SECONDS
    monkeypatch.setenv(CHECKPOINT_SECONDS_ENV, "3600")
    with pytest.raises(_Stop):
        _run(x_train, y_train, config, tmp_path / "stopped", on_epoch_end=_stop_after(2))
    # Two quick epochs of three: within the interval, nothing written yet.
    assert not (tmp_path / "stopped" / CHECKPOINT_NAME).exists()
    full = _run(x_train, y_train, config, tmp_path / "full")
    state = torch.load(tmp_path / "full" / CHECKPOINT_NAME, weights_only=True)
    assert state["epoch"] == 3 and len(full.history) == 3
    # Resuming the finished training trains nothing more.
    again = _run(x_train, y_train, config, tmp_path / "full", resume=True)
    assert len(again.history) == 3 and again.events[-1]["event"] == "resume"


@pytest.mark.parametrize("value", ["soon", "-1", "nan", "inf"])
def test_a_bad_checkpoint_interval_is_refused_naming_the_variable(monkeypatch, value):
    monkeypatch.setenv(CHECKPOINT_SECONDS_ENV, value)
    with pytest.raises(ConfigError, match=f"{CHECKPOINT_SECONDS_ENV} must be a number"):
        checkpoint_interval()
