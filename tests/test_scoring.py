"""Scores table: exact schema, values consistent with the model's probabilities, atomic writes."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from dm_audit.emphasis import create_weighting
from dm_audit.errors import DataError
from dm_audit.scoring import (
    SCORES_SCHEMA,
    SCORES_SCHEMA_VERSION,
    read_scores,
    score,
    scores_from_probs,
    write_scores,
)
from dm_audit.training import TrainConfig, fit, predict_proba


@pytest.fixture(scope="module")
def trained(blobs):
    features, labels = blobs
    config = TrainConfig(model="mlp", loss="cce", epochs=5, batch_size=32, progress=False)
    return fit(features, labels, config, num_classes=3).model, features, labels


@pytest.fixture(scope="module")
def blobs():
    rng = np.random.default_rng(0)
    labels = np.repeat(np.arange(3), 40)
    features = 5.0 * np.eye(3, 4)[labels] + rng.normal(0.0, 0.5, size=(120, 4))
    return features.astype(np.float32), labels.astype(np.int64)


def test_schema_is_stable():
    assert [(f.name, str(f.type), f.nullable) for f in SCORES_SCHEMA] == [
        ("example_id", "string", False),
        ("label", "int64", False),
        ("p_given", "float", False),
        ("emphasis_weight", "float", False),
        ("predicted_label", "int64", False),
        ("predicted_prob", "float", False),
        ("entropy", "float", False),
        ("margin", "float", False),
        ("embedding", "list<element: float>", False),
    ]
    assert SCORES_SCHEMA.metadata == {
        b"dm_audit.schema": b"scores",
        b"dm_audit.schema_version": SCORES_SCHEMA_VERSION.encode(),
    }


def test_scores_agree_with_the_probabilities(trained):
    model, features, labels = trained
    weighting = create_weighting("dm", lam=1.0, beta=16.0)
    ids = [f"ex{i:03d}" for i in range(len(labels))]
    df = score(model, features, labels, weighting=weighting, device="cpu", example_ids=ids)
    probs, emb = predict_proba(model, features, "cpu")
    rows = np.arange(len(labels))
    assert list(df.columns) == [f.name for f in SCORES_SCHEMA]
    assert df["example_id"].tolist() == ids
    np.testing.assert_allclose(df["p_given"], probs[rows, labels], rtol=1e-6)
    np.testing.assert_allclose(
        df["emphasis_weight"], np.exp(16 * df["p_given"] * (1 - df["p_given"])), rtol=1e-5
    )
    assert df["predicted_label"].dtype == np.int64
    np.testing.assert_array_equal(df["predicted_label"], probs.argmax(1))
    np.testing.assert_allclose(df["predicted_prob"], probs.max(1))
    assert ((df["entropy"] >= 0) & (df["entropy"] <= 1)).all()
    # Well-separated blobs: the model is right and confident on every example.
    assert (df["margin"] > 0.5).all() and (df["predicted_label"] == labels).all()
    np.testing.assert_array_equal(np.stack(df["embedding"]), emb)


def test_write_and_read_round_trip(trained, tmp_path):
    model, features, labels = trained
    df = score(model, features, labels, weighting=create_weighting("cce"), device="cpu")
    path = write_scores(df.assign(extra=1), tmp_path / "out" / "scores.parquet")
    assert sorted(p.name for p in path.parent.iterdir()) == ["scores.parquet"]  # no temp files
    assert pq.read_schema(path).equals(SCORES_SCHEMA, check_metadata=True)
    back = read_scores(path)
    assert back.columns.tolist() == [f.name for f in SCORES_SCHEMA]
    pd.testing.assert_frame_equal(back.drop(columns="embedding"), df.drop(columns="embedding"))
    np.testing.assert_array_equal(np.stack(back["embedding"]), np.stack(df["embedding"]))


def test_bad_tables_and_files_are_named(tmp_path):
    probs = np.array([[0.9, 0.1], [0.2, 0.8]], dtype=np.float32)
    emb = np.zeros((2, 3), dtype=np.float32)
    cce = create_weighting("cce")
    with pytest.raises(DataError, match="row 1 has label 2"):
        scores_from_probs(probs, emb, np.array([0, 2]), weighting=cce)
    with pytest.raises(DataError, match="example_ids"):
        scores_from_probs(probs, emb, np.array([0, 1]), weighting=cce, example_ids=["a"])
    df = scores_from_probs(probs, emb, np.array([0, 1]), weighting=cce)
    with pytest.raises(DataError, match="lacks column"):
        write_scores(df.drop(columns="margin"), tmp_path / "s.parquet")
    other = tmp_path / "other.parquet"
    pq.write_table(pa.table({"a": [1]}), other)
    with pytest.raises(DataError, match="not a dm-audit scores file"):
        read_scores(other)
