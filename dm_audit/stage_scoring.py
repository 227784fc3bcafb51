"""Scoring stage: every row scored out of sample by the audit model that never saw it.

Fold k's rows are scored by model k (`dm_audit.scoring` computes the per-row columns); above
`STREAM_THRESHOLD` rows the scores and embeddings stream to Parquet files chunk by chunk. A
feature table also gets the linear reference model's out-of-sample probabilities
(`dm_audit.linear_reference`).
"""

from __future__ import annotations

import shutil
import tempfile
import weakref
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import torch

from dm_audit import linear_reference, neighbours
from dm_audit.batches import RowSubset, check_inputs
from dm_audit.config import AuditConfig
from dm_audit.crossfit import audited
from dm_audit.dataset import AuditDataset
from dm_audit.emphasis import create_weighting
from dm_audit.losses import create_loss
from dm_audit.memory import release_unused_memory
from dm_audit.progress import announce
from dm_audit.scoring import (
    SCORES_SCHEMA,
    STREAM_THRESHOLD,
    score_columns,
    write_scores_stream,
)
from dm_audit.stage_results import AuditFit, CrossFit, ExampleScores, emphasis_in_force
from dm_audit.training import FitResult, predict_proba


def score_examples(
    dataset: AuditDataset,
    audit_fit: AuditFit,
    config: AuditConfig,
    *,
    chunk_rows: int | None = None,
    scores_path: str | Path | None = None,
) -> ExampleScores:
    """Score every row out of sample: fold k's rows under model k, which never saw them.

    The per-row table holds what `dm_audit.scoring.score` computes (p_i, emphasis weight,
    prediction, entropy, margin) under the out-of-sample model, and the in-sample
    training-dynamics summary (mean p_i over epochs, the epoch an example was first learned,
    ...) under the model that trained on the row.

    Above `dm_audit.scoring.STREAM_THRESHOLD` rows, or when `chunk_rows` or `scores_path` is
    given, each fold's scoring streams chunk by chunk to a scores Parquet file (next to
    `scores_path` with the fold in its name, else a temporary one) and
    ``ExampleScores.embeddings`` reads it back chunk by chunk, so neither this stage nor the
    flags hold every embedding at once.
    """
    data = audited(dataset)
    labels = data.label_codes()
    inputs = check_inputs(data.inputs())  # once: each fold's rows are read from this array
    models = audit_fit.models
    stream = chunk_rows is not None or scores_path is not None or len(labels) > STREAM_THRESHOLD
    n, c = len(labels), data.n_classes
    probs = np.zeros((n, c), dtype=np.float32)
    columns: dict[str, np.ndarray] = {}
    embeddings: list[np.ndarray | neighbours.EmbeddingChunks] = []
    targets = (
        np.zeros((n, c), dtype=np.float64) if config.correction_source == "proselflc" else None
    )
    for k, f in enumerate(models.fits):
        rows = np.flatnonzero(models.folds == k)
        # Fold k's rows get the emphasis weight of model k's own curve (the collapse guard may
        # have softened one fold's emphasis and not the other's).
        choice = emphasis_in_force(audit_fit.choice, CrossFit([f], models.folds))
        weighting = create_weighting("dm", lam=choice.lam, beta=choice.beta)
        path = None
        if scores_path is not None:
            base = Path(scores_path)
            path = base.with_name(f"{base.stem}_fold{k}{base.suffix}")
        fold_columns, fold_probs, fold_embeddings = _score_pass(
            f.model,
            RowSubset(inputs, rows),  # gathered chunk by chunk, not copied
            labels[rows],
            weighting,
            config,
            batch_size=1024,
            stream=stream,
            example_ids=data.example_ids[rows],
            chunk_rows=chunk_rows,
            scores_path=path,
        )
        probs[rows] = fold_probs
        for name, values in fold_columns.items():
            if name not in columns:
                columns[name] = np.zeros(n, dtype=np.asarray(values).dtype)
            columns[name][rows] = values
        embeddings.append(fold_embeddings)
        if targets is not None:
            targets[rows] = proselflc_targets(f, fold_probs, labels[rows])
    table = pd.DataFrame({"example_id": list(data.example_ids), "fold": models.folds, **columns})
    table = table.rename(columns={"label": "given", "predicted_label": "predicted"})
    dynamics = models.in_sample_summary(n)
    for column in dynamics.columns:
        table[column] = dynamics[column].to_numpy()
    reference, skipped = _reference_probs(data, labels, config)
    # The eval passes' batches and the streamed file's Arrow buffers are garbage now.
    release_unused_memory()
    return ExampleScores(
        table, probs, embeddings, targets, audit_fit.probe_probs, reference, skipped
    )


def _reference_probs(
    data: AuditDataset, labels: np.ndarray, config: AuditConfig
) -> tuple[np.ndarray | None, str | None]:
    """The linear reference's out-of-sample probabilities, or None and the reason why not."""
    reason = linear_reference.skip_reason(
        data.input_kind, labels, data.n_classes, config.linear_reference
    )
    if reason is None:
        probs = linear_reference.reference_probs(
            data.features(),
            labels,
            data.n_classes,
            seed=config.seed,
            progress="scores: linear reference" if config.progress else None,
        )
        if probs is not None:
            left = linear_reference.classes_left_out(labels, data.classes)
            if left and config.progress:
                announce(
                    f"scores: the linear reference leaves {len(left)} class(es) of fewer than "
                    f"{linear_reference.MIN_CLASS_ROWS} rows to the networks: {left[:5]}"
                )
            return probs, None
        reason = "a fold's training rows held a single class"
    if config.progress and data.input_kind == "features" and config.linear_reference:
        announce(f"scores: no linear reference: {reason}")
    return None, reason


def _score_pass(
    model: torch.nn.Module,
    inputs: np.ndarray | RowSubset,
    labels: np.ndarray,
    weighting: Any,
    config: AuditConfig,
    *,
    batch_size: int,
    stream: bool = False,
    example_ids: np.ndarray | None = None,
    chunk_rows: int | None = None,
    scores_path: str | Path | None = None,
) -> tuple[dict[str, Any], np.ndarray, np.ndarray | neighbours.EmbeddingChunks]:
    """Score columns, probabilities and embeddings of one eval pass.

    Without `stream` the embeddings stay in memory as an array. With it the pass streams chunk
    by chunk to a scores Parquet file (`scores_path`, else a temporary file removed with the
    returned handle) and the embeddings come back as `neighbours.ParquetEmbeddings`, which the
    flags read chunk by chunk.
    """
    if not stream:
        probs, embeddings = predict_proba(
            model, inputs, device=config.device, batch_size=batch_size
        )
        return score_columns(probs, labels, weighting=weighting), probs, embeddings
    chunk = neighbours.DEFAULT_CHUNK_ROWS if chunk_rows is None else int(chunk_rows)
    folder = None
    if scores_path is None:
        folder = Path(tempfile.mkdtemp(prefix="dm_audit_scores_"))
        scores_path = folder / "scores.parquet"
    try:
        path, probs = write_scores_stream(
            model,
            inputs,
            labels,
            scores_path,
            weighting=weighting,
            device=config.device,
            batch_size=batch_size,
            chunk_rows=chunk,
            example_ids=None if example_ids is None else list(example_ids),
        )
        embeddings = neighbours.ParquetEmbeddings(
            path, chunk_rows=min(chunk, neighbours.PARQUET_READ_ROWS)
        )
    except BaseException:
        if folder is not None:
            shutil.rmtree(folder, ignore_errors=True)
        raise
    if folder is not None:
        # The temporary file lives as long as the handle that reads it.
        weakref.finalize(embeddings, shutil.rmtree, folder, True)
    # The per-example columns were computed chunk by chunk on the way to the file: read them
    # back rather than computing them again over every row.
    names = [f.name for f in SCORES_SCHEMA if f.name not in ("example_id", "embedding")]
    written = pq.read_table(path, columns=names)
    columns = {name: written.column(name).to_numpy() for name in names}
    return columns, probs, embeddings


def streamed_scores_path(dataset: AuditDataset, folder: str | Path) -> Path | None:
    """Where `score_examples` should stream the scores of `dataset` so they outlive the process.

    Above `STREAM_THRESHOLD` rows the scores (embeddings included) live in Parquet files, one
    per fold, that later stages read back; by default they are temporary and go with the
    process. A run that resumes, or a pipeline whose stages run in separate processes, keeps
    them in `folder` instead. None (score in memory) for smaller datasets.
    """
    return Path(folder) / "scores.parquet" if len(dataset) > STREAM_THRESHOLD else None


def proselflc_targets(fit_result: FitResult, probs: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """ProSelfLC's corrected targets q̃ at the end of training, shape (N, C).

    Rebuilds the run's loss at t = Γ and feeds it the final model's log-probabilities (a softmax is
    invariant to the constant that separates them from the logits, so p_T is exact).
    """
    loss = create_loss(fit_result.config.loss, **fit_result.loss_params)
    loss.set_progress(1, 1)
    with torch.no_grad():
        logits = torch.log(torch.as_tensor(probs, dtype=torch.float64).clamp_min(1e-12))
        out = loss(logits, torch.tensor(np.asarray(labels), dtype=torch.int64))
    return out.extras["target"].numpy()
