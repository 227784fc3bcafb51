"""Training dynamics: every example's p_i (probability of its given label) at every epoch.

The premise of the method (METHOD.md §5) is that mislabelled and out-of-distribution examples
keep a small p_i during training while clean ones rise early; the per-example curve therefore
carries more signal than the last epoch alone.

Storage is one preallocated float16 matrix of shape ``(epochs, N)`` (an epoch's row is
contiguous, so the scattered per-batch writes of one epoch touch one region) plus a boolean
matrix of "predicted class == given label". Above ``memory_limit_bytes`` both live in
``np.memmap`` files in a temporary folder that is removed when the object is closed or
garbage-collected.
"""

from __future__ import annotations

import shutil
import tempfile
import weakref
from pathlib import Path

import numpy as np
import pandas as pd
import torch

__all__ = ["DEFAULT_MEMORY_LIMIT", "TrainingDynamics"]

DEFAULT_MEMORY_LIMIT = 512 * 1024**2
_SUMMARY_CHUNK = 65536


class TrainingDynamics:
    """Per-epoch p_i of every training example.

    Parameters
    ----------
    n_examples : int
        Number of training examples ``N``.
    n_epochs : int
        Capacity in epochs ``E``.
    source : {"train", "eval"}
        Where the values come from: ``"train"`` = the training forward passes themselves (free:
        train mode, augmented inputs, weights changing within the epoch); ``"eval"`` = a
        separate eval-mode pass over the training set after each epoch.
    memory_limit_bytes : int
        Above this many bytes (``3 * N * E``) the matrices are memory-mapped files.
    directory : path, optional
        Where to put the memory-mapped files (default: the system temporary folder).

    Attributes
    ----------
    n_recorded : int
        Number of completed epochs stored (rows ``0 .. n_recorded - 1``).
    """

    def __init__(
        self,
        n_examples: int,
        n_epochs: int,
        *,
        source: str = "train",
        memory_limit_bytes: int = DEFAULT_MEMORY_LIMIT,
        directory: str | Path | None = None,
    ) -> None:
        if n_examples < 0 or n_epochs < 1:
            raise ValueError(
                f"need n_examples >= 0 and n_epochs >= 1, got {n_examples}, {n_epochs}"
            )
        if source not in ("train", "eval"):
            raise ValueError(f"source must be 'train' or 'eval', got {source!r}")
        self.n_examples = int(n_examples)
        self.n_epochs = int(n_epochs)
        self.source = source
        self.n_recorded = 0
        shape = (self.n_epochs, self.n_examples)
        self._tmpdir: Path | None = None
        if 3 * self.n_examples * self.n_epochs > memory_limit_bytes:
            self._tmpdir = Path(tempfile.mkdtemp(prefix="dm_audit_dynamics_", dir=directory))
            self._p = np.memmap(self._tmpdir / "p.f16", dtype=np.float16, mode="w+", shape=shape)
            self._correct = np.memmap(
                self._tmpdir / "correct.bool", dtype=np.bool_, mode="w+", shape=shape
            )
            self._p[:] = np.nan
            self._finalizer = weakref.finalize(self, shutil.rmtree, self._tmpdir, True)
        else:
            self._p = np.full(shape, np.nan, dtype=np.float16)
            self._correct = np.zeros(shape, dtype=np.bool_)
            self._finalizer = None

    @property
    def memory_mapped(self) -> bool:
        """Whether the matrices live in files rather than in memory."""
        return self._tmpdir is not None

    def record(
        self,
        epoch: int,
        indices: np.ndarray | torch.Tensor,
        p_given: np.ndarray | torch.Tensor,
        correct: np.ndarray | torch.Tensor,
    ) -> None:
        """Store one batch of epoch ``epoch`` (0-based).

        Parameters
        ----------
        epoch : int
            0-based epoch index, ``< n_epochs``.
        indices : array (B,) int
            Positions of the batch's examples in the training set.
        p_given : array (B,) float
            Probability of the given label.
        correct : array (B,) bool
            Whether the predicted class equals the given label.
        """
        if not 0 <= epoch < self.n_epochs:
            raise IndexError(f"epoch {epoch} outside 0..{self.n_epochs - 1}")
        idx = _numpy(indices).astype(np.int64, copy=False)
        self._p[epoch, idx] = _numpy(p_given).astype(np.float16)
        self._correct[epoch, idx] = _numpy(correct).astype(np.bool_)

    def end_epoch(self, epoch: int) -> None:
        """Mark epochs ``0 .. epoch`` as complete."""
        self.n_recorded = max(self.n_recorded, epoch + 1)

    def truncate(self, n_epochs: int) -> None:
        """Forget every epoch from ``n_epochs`` on (used when training rolls back)."""
        if n_epochs < self.n_recorded:
            self._p[n_epochs : self.n_recorded] = np.nan
            self._correct[n_epochs : self.n_recorded] = False
            self.n_recorded = n_epochs

    def p_matrix(self) -> np.ndarray:
        """Recorded p_i, float16 ``(N, n_recorded)`` (a transposed view; NaN = not seen)."""
        return self._p[: self.n_recorded].T

    def correct_matrix(self) -> np.ndarray:
        """Recorded "predicted == given", bool ``(N, n_recorded)`` (a transposed view)."""
        return self._correct[: self.n_recorded].T

    def summary(self) -> pd.DataFrame:
        """Per-example statistics of the recorded epochs.

        Returns
        -------
        pandas.DataFrame
            ``N`` rows (row ``i`` = training example ``i``) with columns

            - ``mean_p``, ``std_p``, ``min_p``, ``max_p``, ``last_p`` (float32): statistics of
              p_i over the recorded epochs;
            - ``auc_p`` (float32): area under the p_i curve (trapezoid, one unit per epoch)
              divided by ``n_recorded - 1``, so it lies in [0, 1] (equals p_i for one epoch);
            - ``first_learned_epoch`` (int64): the first epoch (1-based) from which the
              prediction equals the given label in every later epoch; ``-1`` if the last epoch
              is still wrong;
            - ``forgetting_events`` (int64): number of correct -> wrong transitions between
              consecutive epochs.
        """
        n, e = self.n_examples, self.n_recorded
        cols: dict[str, np.ndarray] = {
            name: np.full(n, np.nan, dtype=np.float32)
            for name in ("mean_p", "std_p", "min_p", "max_p", "last_p", "auc_p")
        }
        first = np.full(n, -1, dtype=np.int64)
        forgetting = np.zeros(n, dtype=np.int64)
        if e > 0:
            # Chunks over examples bound the float32 working copy for memory-mapped matrices.
            for start in range(0, n, _SUMMARY_CHUNK):
                sl = slice(start, min(n, start + _SUMMARY_CHUNK))
                p = np.asarray(self._p[:e, sl], dtype=np.float32)
                ok = np.asarray(self._correct[:e, sl])
                seen = ~np.isnan(p)
                any_seen = seen.any(axis=0)
                with np.errstate(invalid="ignore", divide="ignore"):
                    count = seen.sum(axis=0)
                    total = np.where(seen, p, 0.0).sum(axis=0)
                    mean = total / np.maximum(count, 1)
                    var = np.where(seen, (p - mean) ** 2, 0.0).sum(axis=0) / np.maximum(count, 1)
                    cols["mean_p"][sl] = np.where(any_seen, mean, np.nan)
                    cols["std_p"][sl] = np.where(any_seen, np.sqrt(var), np.nan)
                    cols["min_p"][sl] = np.where(any_seen, np.where(seen, p, np.inf).min(0), np.nan)
                    cols["max_p"][sl] = np.where(
                        any_seen, np.where(seen, p, -np.inf).max(0), np.nan
                    )
                cols["last_p"][sl] = p[-1]
                if e == 1:
                    cols["auc_p"][sl] = p[0]
                else:
                    area = (p[1:] + p[:-1]).sum(axis=0) / 2.0
                    cols["auc_p"][sl] = area / (e - 1)
                forgetting[sl] = (ok[:-1] & ~ok[1:]).sum(axis=0)
                # Index of the last wrong epoch; learned from the epoch after it.
                wrong = ~ok
                last_wrong = np.where(wrong.any(axis=0), e - 1 - np.argmax(wrong[::-1], axis=0), -1)
                first[sl] = np.where(last_wrong == e - 1, -1, last_wrong + 2)
        return pd.DataFrame(
            {
                **{k: cols[k] for k in ("mean_p", "std_p", "min_p", "max_p", "last_p", "auc_p")},
                "first_learned_epoch": first,
                "forgetting_events": forgetting,
            }
        )

    def state_dict(self) -> dict[str, object]:
        """Tensors and ints only, so a checkpoint loads with ``torch.load(weights_only=True)``."""
        return {
            "n_examples": self.n_examples,
            "n_epochs": self.n_epochs,
            "n_recorded": self.n_recorded,
            "source": self.source,
            "p": torch.from_numpy(np.array(self._p[: self.n_recorded])),
            "correct": torch.from_numpy(np.array(self._correct[: self.n_recorded])),
        }

    def load_state_dict(self, state: dict[str, object]) -> None:
        """Restore what :meth:`state_dict` returned (same ``N`` and capacity)."""
        if (state["n_examples"], state["n_epochs"]) != (self.n_examples, self.n_epochs):
            raise ValueError(
                f"dynamics state for {state['n_examples']} examples x {state['n_epochs']} epochs "
                f"does not fit {self.n_examples} x {self.n_epochs}"
            )
        k = int(state["n_recorded"])  # type: ignore[call-overload]
        self._p[:] = np.nan
        self._correct[:] = False
        self._p[:k] = state["p"].numpy()  # type: ignore[union-attr]
        self._correct[:k] = state["correct"].numpy()  # type: ignore[union-attr]
        self.n_recorded = k

    def close(self) -> None:
        """Release the memory-mapped files (the object must not be used afterwards)."""
        if self._finalizer is not None:
            self._p = np.empty((0, 0), dtype=np.float16)
            self._correct = np.empty((0, 0), dtype=np.bool_)
            self._finalizer()

    def __repr__(self) -> str:
        where = "memmap" if self.memory_mapped else "memory"
        return (
            f"TrainingDynamics(N={self.n_examples}, epochs={self.n_recorded}/{self.n_epochs}, "
            f"source={self.source!r}, {where})"
        )


def _numpy(x: np.ndarray | torch.Tensor) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        return x.detach().to("cpu").numpy()
    return np.asarray(x)
