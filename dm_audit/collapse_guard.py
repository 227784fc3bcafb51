"""Collapse guard: detect a training run that has given up on classes, and retry it gentler.

A large emphasis can make a network give up on whole classes or predict one class for
everything: examples whose p_i is near 0 weigh e^{beta/4}-fold less than those near the emphasis
mode, so a class that falls behind early never catches up. After every epoch the training-pass
predictions are checked: a non-finite loss; one class taking more than ``collapse_share`` of the
predictions while the labels are far more spread and the predictions tell the classes apart no
better than chance; and, once the emphasis ramp is over and from the second epoch on, classes
holding >= 20% of the labels that the network has given up on (it almost never predicts them and
gives their examples less than half the uniform probability), or a balanced accuracy (mean
per-class recall on the given labels) no better than chance, which is 1/C for any predictor that
ignores its input, however imbalanced the labels (see
:func:`dm_audit.metrics.balanced_accuracy_vs_chance`). A symptom that persists for two
consecutive epochs is a collapse (divergence counts at once).

With ``TrainConfig.collapse_guard`` the run then rolls back to the last epoch that passed every
check (the initial weights if none did), halves the emphasis parameters (lambda, beta, T; the
learning rate for a loss without any), doubles the ramp (at least 0.25) and goes on, at most
``collapse_retries`` times. Every detection is recorded in ``FitResult.events`` and in the
history (``collapsed`` / ``discarded`` flags).
"""

from __future__ import annotations

import copy
import logging
import math
from typing import Any, Literal

from torch import nn

from dm_audit import distributed
from dm_audit.checkpoints import plain
from dm_audit.train_config import TrainConfig

__all__ = [
    "DEAD_CLASS_SHARE",
    "EMPHASIS_KEYS",
    "CollapseGuard",
    "Verdict",
    "with_emphasis_defaults",
]

log = logging.getLogger(__name__)

# Emphasis parameters a collapse recovery halves (dm/normal/exponential: beta, lam/psi; imae: T;
# ProSelfLC combined with DM: dm_lam, dm_beta).
EMPHASIS_KEYS = ("lam", "beta", "psi", "T", "dm_lam", "dm_beta")
# A collapse: classes the network (almost) never predicts hold at least this share of the labels.
DEAD_CLASS_SHARE = 0.2

# What one epoch's checks conclude: a collapse; every check passed (the epoch may serve as a
# rollback target); or neither (a passing symptom, or checks that do not apply yet).
Verdict = Literal["collapse", "passed", "pending"]


def with_emphasis_defaults(name: str, params: dict[str, Any], loss: nn.Module) -> dict[str, Any]:
    """``params`` plus the defaults ``loss`` filled in for its emphasis parameters.

    A recovery halves the parameters in force, including those the user left to the loss.
    """
    out = dict(params)
    weighting = getattr(loss, "weighting", None)
    if weighting is not None and getattr(weighting, "params", None) is not None:
        for key, value in weighting.params.items():
            target = f"dm_{key}" if name == "proselflc" else key
            if key in EMPHASIS_KEYS:
                out.setdefault(target, float(value))
    return out


class CollapseGuard:
    """Collapse checks of every epoch, and the emphasis and rollback target of the next try.

    Parameters
    ----------
    config : TrainConfig
        Supplies ``collapse_guard``, ``collapse_retries``, ``collapse_share``, the initial
        ``loss_params`` and ``emphasis_ramp``.
    label_share : float
        Share of the labels in the most frequent class.
    total_iters : int
        Optimisation steps of the whole run (the ramp is a fraction of them).

    Attributes
    ----------
    attempt : int
        Recoveries so far.
    loss_params : dict
        The loss parameters in force (reduced by every recovery).
    ramp : float
        The emphasis ramp in force (a fraction of training).
    lr_scale : float
        Factor on the learning-rate schedule: halved by a recovery of a loss without emphasis
        parameters.
    snapshot : dict or None
        The rollback target: the trajectory's state (see `dm_audit.checkpoints.state_of`) at the
        last epoch boundary that passed every check.
    """

    def __init__(self, config: TrainConfig, *, label_share: float, total_iters: int) -> None:
        self.enabled = config.collapse_guard
        self.retries = config.collapse_retries
        self.max_share = config.collapse_share
        self.label_share = float(label_share)
        self.total_iters = total_iters
        self.attempt = 0
        self.loss_params: dict[str, Any] = dict(config.loss_params)
        self.ramp = float(config.emphasis_ramp)
        self.lr_scale = 1.0
        self.snapshot: dict[str, Any] | None = None

    # ---------------------------------------------------------------- checkpointed state

    def state_dict(self) -> dict[str, Any]:
        """The emphasis in force and the retries used (the snapshot travels apart)."""
        return plain(
            {
                "attempt": self.attempt,
                "loss_params": self.loss_params,
                "ramp": self.ramp,
                "lr_scale": self.lr_scale,
            }
        )

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.attempt = int(state["attempt"])
        self.loss_params = dict(state["loss_params"])
        self.ramp = float(state["ramp"])
        self.lr_scale = float(state["lr_scale"])

    def snapshot_entry(self, epoch: int, global_iter: int) -> dict[str, Any] | str | None:
        """The rollback target as a checkpoint stores it.

        The target travels with the checkpoint so that a resumed run recovers from a later
        collapse exactly as the uninterrupted run would. Usually it is the state being saved,
        at ``(epoch, global_iter)``: then the string "current" stands for it.
        """
        snap = self.snapshot
        if snap is None:
            return None
        if snap["epoch"] == epoch and snap["global_iter"] == global_iter:
            return "current"
        return snap

    # ---------------------------------------------------------------- checks

    def checks_complete(self, epoch: int, global_iter: int) -> bool:
        """Whether every check applies after ``epoch`` completed epochs.

        The class-coverage and accuracy checks wait until the emphasis ramp is over and a first
        epoch is done: before that, predictions may legitimately be unbalanced or near chance.
        """
        return epoch >= 1 and global_iter >= self.ramp * self.total_iters

    def diagnose(self, entry: dict[str, Any], *, all_checks: bool) -> str | None:
        """Symptom of a collapse in the epoch whose history entry is ``entry``, or None.

        ``all_checks``: whether the checks that wait for the ramp apply (`checks_complete`).
        """
        if not math.isfinite(entry["loss"]):
            return "diverged"
        # Balanced accuracy rather than accuracy: under imbalance, answering the majority class
        # for everything scores the majority share, and a model that learns every class cannot
        # score much more (see metrics.balanced_accuracy_vs_chance). None: fewer than two classes
        # in the labels.
        balanced = entry.get("balanced_acc")
        at_chance = balanced is not None and balanced <= entry["balanced_acc_chance"]
        # Predictions far more concentrated than the labels are a collapse only if they carry
        # no information about the labels: a noise-robust model on imbalanced data predicts the
        # majority class more often than the noisy labels give it, and tells the classes apart.
        share = entry["pred_share"]
        if share > self.max_share and share - self.label_share >= 0.2 and at_chance:
            return "one_class"
        if not all_checks:
            return None
        # Classes the network has given up on: a large emphasis can leave every example of some
        # classes at p_i ~ 0, where w(p) is e^{beta/4}-fold below the peak, so they never recover.
        if entry["dead_class_share"] >= DEAD_CLASS_SHARE:
            return "dead_classes"
        # No better than a predictor that ignores the input.
        if at_chance:
            return "chance_accuracy"
        return None

    def assess(
        self, entry: dict[str, Any], previous: dict[str, Any] | None, epoch: int, global_iter: int
    ) -> Verdict:
        """Check the epoch just trained (``epoch`` completed before it); sets ``entry["alarm"]``.

        ``previous`` is the history entry before ``entry`` (None for the first).
        """
        complete = self.checks_complete(epoch, global_iter)
        alarm = self.diagnose(entry, all_checks=complete)
        entry["alarm"] = alarm
        if alarm is None:
            return "passed" if complete else "pending"
        # Early training can show any symptom for an epoch and grow out of it: a collapse is a
        # symptom that persists for two epochs (divergence at once).
        persists = (
            previous is not None and not previous["discarded"] and previous.get("alarm") is not None
        )
        return "collapse" if alarm == "diverged" or persists else "pending"

    # ---------------------------------------------------------------- recovery

    def recover(
        self, entry: dict[str, Any], history: list[dict[str, Any]], events: list[dict[str, Any]]
    ) -> dict[str, Any] | None:
        """Record the collapse of ``entry``'s epoch; reduce the emphasis if a retry is left.

        Returns the state to roll back to (a copy of the snapshot), after marking the history
        entries it undoes ``discarded``; None when the run goes on as it is.
        """
        reason = entry["alarm"]
        event: dict[str, Any] = {
            "event": "collapse",
            "epoch": entry["epoch"],
            "attempt": self.attempt,
            "reason": reason,
            "pred_share": entry["pred_share"],
            "train_acc": entry["train_acc"],
            "balanced_acc": entry.get("balanced_acc"),
            "balanced_acc_chance": entry.get("balanced_acc_chance"),
            "majority_share": self.label_share,
            "loss_params": dict(self.loss_params),
            "emphasis_ramp": self.ramp,
        }
        entry["collapsed"] = True
        if not self.enabled or self.attempt >= self.retries or self.snapshot is None:
            self._report_unrecovered(event, entry, history, events)
            return None
        params = dict(self.loss_params)
        reduced = {k: float(v) * 0.5 for k, v in params.items() if k in EMPHASIS_KEYS}
        if reduced:
            params.update(reduced)
        else:
            self.lr_scale = float(self.lr_scale) * 0.5
        self.attempt += 1
        self.loss_params = params
        self.ramp = min(1.0, max(2.0 * self.ramp, 0.25))
        target = copy.deepcopy(self.snapshot)
        back_to = int(target["epoch"])
        for h in history:
            if h["epoch"] > back_to:
                h["discarded"] = True
        entry["discarded"] = True
        event.update(
            action="rollback",
            rollback_to_epoch=back_to,
            new_loss_params=params,
            new_emphasis_ramp=self.ramp,
            lr_scale=self.lr_scale,
        )
        events.append(plain(event))
        if distributed.is_main():  # every rank rolls back alike; one says so
            log.warning(
                "training collapsed at epoch %d (%s); rolled back to epoch %d with %s, ramp %.2f",
                entry["epoch"],
                reason,
                back_to,
                params,
                self.ramp,
            )
        return target

    def _report_unrecovered(
        self,
        event: dict[str, Any],
        entry: dict[str, Any],
        history: list[dict[str, Any]],
        events: list[dict[str, Any]],
    ) -> None:
        # Nothing to do: report the start of a collapsed stretch once, not every epoch.
        previous = history[-2] if len(history) >= 2 else None
        if previous is not None and not previous["discarded"] and previous["collapsed"]:
            return
        event["action"] = "none" if not self.enabled else "gave_up"
        events.append(plain(event))
        if distributed.is_main():  # every rank decides alike; one says so
            log.warning(
                "training collapsed at epoch %d (%s); %s",
                entry["epoch"],
                entry["alarm"],
                "the collapse guard is off" if event["action"] == "none" else "no retries left",
            )
