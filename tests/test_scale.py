"""Scale paths give the small-data answers: streamed scores, chunked flags, IVF neighbours."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from dm_audit import audit, neighbours
from dm_audit.dataset import AuditDataset
from dm_audit.emphasis import create_weighting
from dm_audit.flags import knn_label_agreement, ood_scores, select_trusted
from dm_audit.neighbours import ArrayEmbeddings, ParquetEmbeddings, build_index, search
from dm_audit.noise import add_noise
from dm_audit.scoring import read_scores, score, write_scores, write_scores_stream
from dm_audit.training import TrainConfig, fit


def _clusters(n: int, dim: int = 16, classes: int = 5, seed: int = 0):
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, classes, size=n)
    centres = rng.normal(0.0, 1.0, size=(classes, dim))
    x = centres[labels] + rng.normal(0.0, 0.6, size=(n, dim))
    return x.astype(np.float32), labels.astype(np.int64)


@pytest.fixture(scope="module")
def trained():
    features, labels = _clusters(300, dim=8, classes=3)
    config = TrainConfig(model="mlp", loss="cce", epochs=3, batch_size=32, progress=False)
    return fit(features, labels, config, num_classes=3).model, features, labels


def test_streamed_scores_equal_one_pass(trained, tmp_path):
    model, features, labels = trained
    weighting = create_weighting("dm", lam=0.5, beta=8.0)
    ids = [f"ex{i:03d}" for i in range(len(labels))]
    whole = write_scores(
        score(model, features, labels, weighting=weighting, device="cpu", example_ids=ids),
        tmp_path / "whole.parquet",
    )
    # 7 rows per chunk, rounded up to the batch of 4: 8-row chunks, the last one partial.
    path, probs = write_scores_stream(
        model,
        features,
        labels,
        tmp_path / "streamed.parquet",
        weighting=weighting,
        device="cpu",
        batch_size=4,
        chunk_rows=7,
        example_ids=ids,
    )
    a, b = read_scores(whole), read_scores(path)
    assert len(b) == 300 and list(b.columns) == list(a.columns)
    # Batches of 4 and of the whole table may take different matrix-multiply kernels: equal up
    # to float32 rounding, not bit for bit.
    pd.testing.assert_frame_equal(
        a.drop(columns="embedding"), b.drop(columns="embedding"), check_exact=False, atol=1e-5
    )
    np.testing.assert_allclose(np.stack(a["embedding"]), np.stack(b["embedding"]), atol=1e-5)
    np.testing.assert_allclose(probs[np.arange(300), labels], b["p_given"], rtol=0, atol=1e-6)
    # Nothing but the finished file is left in the folder.
    assert sorted(p.name for p in tmp_path.iterdir()) == ["streamed.parquet", "whole.parquet"]


def test_parquet_embeddings_read_back_in_chunks(trained, tmp_path):
    model, features, labels = trained
    weighting = create_weighting("cce")
    path, _ = write_scores_stream(
        model, features, labels, tmp_path / "s.parquet", weighting=weighting, device="cpu"
    )
    source = ParquetEmbeddings(path, chunk_rows=64)
    assert (source.n_rows, source.dim) == (300, model.embedding_dim)
    starts = [start for start, _ in source.chunks()]
    assert starts == [0, 64, 128, 192, 256]
    whole = np.concatenate([block for _, block in source.chunks()])
    np.testing.assert_array_equal(whole, np.stack(read_scores(path)["embedding"]))


def _exact_neighbours(x: np.ndarray, k: int) -> np.ndarray:
    unit = x / np.linalg.norm(x, axis=1, keepdims=True)
    sims = unit @ unit.T
    np.fill_diagonal(sims, -np.inf)
    return np.argsort(-sims, axis=1, kind="stable")[:, :k]


def test_ivf_recall_and_exact_when_every_list_is_probed():
    x, _ = _clusters(4000, dim=16, classes=8, seed=1)
    source = ArrayEmbeddings(x, chunk_rows=512)
    own = np.arange(4000)
    flat = build_index(source, kind="flat")
    sims_flat, ids_flat = search(flat, source, 10, self_positions=own)
    truth = _exact_neighbours(x, 10)
    assert (ids_flat == truth).mean() > 0.999  # float ties aside, flat is exact
    # 4 sqrt(N) = 253 lists, capped at N / 39 = 102 (faiss' minimum of 39 points per list).
    nlist = 4000 // 39
    ivf = build_index(source, kind="ivf", nprobe=16, seed=0)
    assert ivf.nlist == nlist and ivf.nprobe == 16
    _, ids_ivf = search(ivf, source, 10, self_positions=own)
    recall = np.mean([len(set(a) & set(b)) / 10 for a, b in zip(ids_ivf, ids_flat, strict=True)])
    # Measured 0.999 on these overlapping clusters with 16 of 102 lists visited (0.958 with 8).
    assert recall >= 0.98
    every = build_index(source, kind="ivf", nprobe=nlist, seed=0)
    sims_all, ids_all = search(every, source, 10, self_positions=own)
    # Probing every list is exact up to the float16 storage: the same similarities within
    # 1e-3 and the same neighbours except where float16 reorders near-ties at the k-th place.
    np.testing.assert_allclose(sims_all, sims_flat, rtol=0, atol=1e-3)
    same = np.mean([len(set(a) & set(b)) / 10 for a, b in zip(ids_all, ids_flat, strict=True)])
    assert same >= 0.995


@pytest.mark.parametrize("index", ["flat", "ivf"])
def test_chunked_flags_equal_in_memory(tmp_path, index):
    x, y = _clusters(1500, dim=12, classes=4, seed=2)
    y_noisy = y.copy()
    y_noisy[:150] = (y[:150] + 1) % 4
    path = tmp_path / "emb.parquet"
    frame = pd.DataFrame({"embedding": list(x)})
    frame.to_parquet(path)
    chunked = ParquetEmbeddings(path, chunk_rows=97)
    opts = {"index": index, "nprobe": 4, "seed": 3}
    a = knn_label_agreement(x, y_noisy, k=10, **opts)
    b = knn_label_agreement(chunked, y_noisy, k=10, **opts)
    np.testing.assert_array_equal(a.indices, b.indices)
    np.testing.assert_array_equal(a.agreement, b.agreement)
    np.testing.assert_array_equal(a.votes, b.votes)
    assert a.agreement[:150].mean() < 0.3 < 0.8 < a.agreement[150:].mean()

    probs = np.full((1500, 4), 0.1, dtype=np.float32)
    probs[np.arange(1500), y] = 0.7
    trusted = select_trusted(probs[np.arange(1500), y_noisy], np.zeros(1500, bool))
    ood_a = ood_scores(probs, x, y_noisy, trusted_mask=trusted, k=1, **opts)
    ood_b = ood_scores(probs, chunked, y_noisy, trusted_mask=trusted, k=1, **opts)
    np.testing.assert_array_equal(ood_a, ood_b)
    per_a = ood_scores(probs, x, y_noisy, trusted_mask=trusted, k=1, per_class=True, **opts)
    per_b = ood_scores(probs, chunked, y_noisy, trusted_mask=trusted, k=1, per_class=True, **opts)
    np.testing.assert_array_equal(per_a, per_b)


def test_audit_stages_stream_to_the_same_flags(tmp_path):
    x, y = _clusters(600, dim=10, classes=4, seed=4)
    clean = AuditDataset.from_arrays(y, features=x, classes=["a", "b", "c", "d"])
    dataset = add_noise(clean, kind="symmetric", rate=0.2, seed=0)
    config = audit.AuditConfig(epochs=4, probe_epochs=2, progress=False, device="cpu")
    probe = audit.probe(dataset, config)
    audit_fit = audit.train_audit_model(dataset, probe, config)
    in_memory = audit.score_examples(dataset, audit_fit, config)
    streamed = audit.score_examples(
        dataset, audit_fit, config, chunk_rows=64, scores_path=tmp_path / "scores.parquet"
    )
    assert all(isinstance(e, np.ndarray) for e in in_memory.embeddings)
    assert all(isinstance(e, neighbours.ParquetEmbeddings) for e in streamed.embeddings)
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "scores_fold0.parquet",
        "scores_fold1.parquet",
    ]
    pd.testing.assert_frame_equal(in_memory.table, streamed.table)
    np.testing.assert_array_equal(in_memory.probs, streamed.probs)
    a = audit.flag_examples(dataset, in_memory, config)
    b = audit.flag_examples(dataset, streamed, config)
    pd.testing.assert_frame_equal(a.table, b.table)
    assert a.label_issue_threshold == b.label_issue_threshold
    assert a.ood_threshold == b.ood_threshold
    truth = dataset.true_label_codes() != dataset.label_codes()
    flagged = a.table["is_label_issue"].to_numpy()
    assert (flagged & truth).sum() / max(flagged.sum(), 1) > 0.6


def _arrow_bytes_while_reading(chunks) -> int:
    """Most bytes Arrow held at any point of a pass, the consumer keeping no chunk."""
    import pyarrow as pa

    most = 0
    for _ in chunks:
        most = max(most, pa.total_allocated_bytes())
    return most


def test_chunked_reads_hold_one_row_group_at_a_time(tmp_path):
    # 48 row groups of 2,000 rows x 64 float32 (0.5 MB each, 24 MB in all). A pre-buffering
    # reader keeps every row group it has read, so Arrow's allocation grows with the file
    # (measured 40 MB); a streaming reader holds the row group it decodes
    # (its compressed and decompressed pages and the decoded column: measured 2.9 MB) whatever
    # the file's length.
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows, width, group = 96_000, 64, 2_000
    x = np.random.default_rng(0).standard_normal((rows, width)).astype(np.float32)
    lists = pa.ListArray.from_arrays(
        pa.array(np.arange(0, rows * width + 1, width, dtype=np.int32)), pa.array(x.ravel())
    )
    path = tmp_path / "emb.parquet"
    pq.write_table(pa.table({"embedding": lists}), path, row_group_size=group)
    group_bytes = group * width * 4
    baseline = pa.total_allocated_bytes()
    source = ParquetEmbeddings(path, chunk_rows=group)
    held = _arrow_bytes_while_reading(block for _, block in source.chunks()) - baseline
    assert held < 8 * group_bytes


def test_search_shows_a_progress_bar_only_when_asked(capsys, monkeypatch):
    monkeypatch.setattr(neighbours, "PROGRESS_DELAY_S", 0.0)  # show it at once
    x, _ = _clusters(500, dim=8)
    source = ArrayEmbeddings(x, chunk_rows=128)
    index = build_index(source, kind="flat")
    own = np.arange(500)
    quiet = search(index, source, 5, self_positions=own, batch_size=100)
    assert capsys.readouterr().err == ""
    shown = search(
        index, source, 5, self_positions=own, batch_size=100, progress="flags: neighbours"
    )
    err = capsys.readouterr().err
    assert "flags: neighbours" in err and "500/500" in err and "query/s" in err
    for a, b in zip(quiet, shown, strict=True):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("metric", ["cosine", "l2"])
def test_search_few_equals_an_exact_index_and_excludes_the_query_itself(metric):
    rng = np.random.default_rng(4)
    x = rng.normal(size=(700, 12)).astype(np.float32)
    source = ArrayEmbeddings(x, chunk_rows=128)  # the base is streamed across chunks
    base = np.sort(rng.choice(700, size=500, replace=False))
    queries = np.sort(rng.choice(700, size=300, replace=False))  # some are base rows
    few = neighbours.search_few(source, base, queries, 4, metric=metric)
    pos = np.full(700, -1)
    pos[base] = np.arange(base.size)
    index = build_index(source, base, kind="flat", metric=metric)
    exact, _ = search(
        index, source, 4, query_rows=queries, self_positions=pos[queries], metric=metric
    )
    np.testing.assert_allclose(few, exact, rtol=1e-4, atol=1e-4)
    # Fewer base rows than k: the missing neighbours are -inf.
    short = neighbours.search_few(source, base[:2], queries[:5], 4, metric=metric)
    assert np.isneginf(short[:, 2:]).all()
    assert neighbours.exact_is_cheap(10, 1_000, 64)
    assert not neighbours.exact_is_cheap(100_000, 1_000_000, 128)


def test_releasing_unused_memory_keeps_live_data_and_imports_nothing():
    import subprocess
    import sys

    code = (
        "import sys\n"
        "from dm_audit.memory import release_unused_memory\n"
        "release_unused_memory(); release_unused_memory()\n"
        "assert 'pyarrow' not in sys.modules, 'imported pyarrow'\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)

    import pyarrow as pa

    from dm_audit.memory import release_unused_memory

    kept = pa.array(np.arange(100_000, dtype=np.float32))
    dropped = pa.array(np.ones(1_000_000, dtype=np.float32))
    del dropped
    release_unused_memory()
    np.testing.assert_array_equal(kept.to_numpy(), np.arange(100_000, dtype=np.float32))


def test_parquet_embeddings_read_across_row_groups_in_small_chunks(tmp_path):
    """The default read (chunks smaller than the written row groups, pages streamed through a
    buffer) yields every row once, in order, with the written values."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    rng = np.random.default_rng(5)
    n = neighbours.PARQUET_READ_ROWS * 2 + 1_000
    x = rng.normal(size=(n, 3)).astype(np.float32)
    column = pa.ListArray.from_arrays(
        pa.array(np.arange(0, 3 * n + 1, 3, dtype=np.int32)), pa.array(x.ravel())
    )
    path = tmp_path / "emb.parquet"
    pq.write_table(pa.table({"embedding": column}), path, row_group_size=20_000)
    source = ParquetEmbeddings(path)
    assert source.chunk_rows == neighbours.PARQUET_READ_ROWS
    starts, blocks = zip(*source.chunks(), strict=True)
    assert list(starts) == list(range(0, n, neighbours.PARQUET_READ_ROWS))
    np.testing.assert_array_equal(np.concatenate(blocks), x)
