"""Index: ScaNN recall vs exact, save/load, fallback without ScaNN, self-exclusion, BM25."""

import logging
import sys

import ml_collections
import numpy as np
import pytest
from ml_collections import config_dict

from imagerag_jax.retrieval import index as index_lib
from imagerag_jax.retrieval.index import Index


def _normalise(x):
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def _clustered(n, d, rng, n_clusters=200, noise=0.35):
    """Embedding-like vectors: random cluster centres plus isotropic noise, normalised."""
    centres = _normalise(rng.standard_normal((n_clusters, d)))
    x = centres[rng.integers(0, n_clusters, n)] + noise * rng.standard_normal((n, d)) / np.sqrt(d)
    return _normalise(x)


@pytest.fixture(scope="module")
def data():
    rng = np.random.default_rng(0)
    x = _clustered(20_200, 64, rng)
    return x[:20_000], x[20_000:]


@pytest.fixture(scope="module")
def scann_index(data):
    pytest.importorskip("scann")
    return Index.build(data[0], {"kind": "scann"})


def test_exact_search_matches_argsort():
    rng = np.random.default_rng(1)
    x, q = _normalise(rng.standard_normal((1000, 16))), _normalise(rng.standard_normal((7, 16)))
    rows, scores = index_lib.exact_search(x, q, 5, block_size=128, query_block=3)
    ref = np.argsort(-(q @ x.T), axis=1)[:, :5]
    np.testing.assert_array_equal(rows, ref)
    np.testing.assert_allclose(scores, np.take_along_axis(q @ x.T, ref, 1), rtol=1e-5)


def test_scann_recall_vs_exact(data, scann_index):
    x, q = data
    assert scann_index.kind == "scann"
    assert scann_index.config["num_leaves"] == 141  # ~ sqrt(N)
    exact = Index.build(x, {"kind": "exact"})
    exact_ids, exact_scores = exact.search(q, 10)
    ids, scores = scann_index.search(q, 10)
    assert ids.shape == (200, 10) and ids.dtype == np.int64
    assert index_lib.recall_at_k(ids, exact_ids) >= 0.9
    assert np.all(np.diff(scores, axis=1) <= 1e-6)
    # Scores are dot products: the reordered top-1 matches the exact one.
    np.testing.assert_allclose(scores[:, 0], exact_scores[:, 0], atol=1e-3)
    one_ids, _ = scann_index.search(q[0], 10)
    assert one_ids.shape == (10,)


def test_save_load_roundtrip(tmp_path, data, scann_index):
    x, q = data
    ids = np.arange(len(x)) + 1000
    for cfg in ({"kind": "exact"}, None):
        idx = scann_index if cfg is None else Index.build(x, cfg, ids=ids)
        idx.save(str(tmp_path / idx.kind))
        loaded = Index.load(str(tmp_path / idx.kind))
        assert type(loaded) is type(idx)
        a, sa = idx.search(q[:20], 5)
        b, sb = loaded.search(q[:20], 5)
        np.testing.assert_array_equal(a, b)
        np.testing.assert_allclose(sa, sb)
    assert Index.load(str(tmp_path / "exact")).search(q[:3], 2)[0].min() >= 1000


def test_fallback_without_scann(tmp_path, data, scann_index, monkeypatch, caplog):
    x, q = data
    scann_index.save(str(tmp_path / "s"))
    for name in [m for m in sys.modules if m == "scann" or m.startswith("scann.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "scann", None)  # `import scann...` now raises ImportError.
    monkeypatch.setattr(index_lib, "_warned_no_scann", False)
    with caplog.at_level(logging.WARNING):
        idx = Index.build(x[:3000], {"kind": "scann"})
    assert idx.kind == "exact"
    assert sum("ScaNN is not importable" in r.getMessage() for r in caplog.records) == 1
    # A saved ScaNN index still loads (exact search over its stored dataset).
    loaded = Index.load(str(tmp_path / "s"))
    assert loaded.kind == "exact"
    exact_ids, _ = Index.build(x, {"kind": "exact"}).search(q[:10], 5)
    np.testing.assert_array_equal(loaded.search(q[:10], 5)[0], exact_ids)


def test_auto_kind_small_n():
    x = _normalise(np.random.default_rng(2).standard_normal((50, 8)))
    assert Index.build(x).kind == "exact"
    assert Index.build(x, {"kind": "scann"}).kind == "exact"  # too small for AH codebooks
    # ConfigDicts work; unset placeholders fall back to the defaults.
    cfg = ml_collections.ConfigDict({"kind": "exact", "num_leaves": config_dict.placeholder(int)})
    assert Index.build(x, cfg).config["exact_below"] == index_lib.DEFAULTS["exact_below"]
    ids, scores = Index.build(x).search(x[:2], 100)  # k > N pads
    assert ids.shape == (2, 100) and (ids[:, 50:] == -1).all() and np.isneginf(scores[:, 50:]).all()


@pytest.mark.parametrize("kind", ["exact", "scann"])
def test_self_exclusion(kind, data, scann_index):
    x, _ = data
    idx = scann_index if kind == "scann" else Index.build(x, {"kind": "exact"})
    q = x[:50]  # queries that are in the database
    ids, _ = idx.search(q, 4)
    assert (ids[:, 0] == np.arange(50)).mean() > 0.95
    ids, scores = idx.search(q, 4, exclude_ids=np.arange(50))
    assert ids.shape == (50, 4) and not (ids == np.arange(50)[:, None]).any()
    assert (ids >= 0).all() and np.isfinite(scores).all()
    # Exclude several ids per query ([Q, m], -1 padding) and exact duplicates by score.
    first, _ = idx.search(q, 3, exclude_ids=np.arange(50))
    excl = np.concatenate([np.arange(50)[:, None], first[:, :1], -np.ones((50, 1), int)], 1)
    ids2, _ = idx.search(q, 3, exclude_ids=excl)
    np.testing.assert_array_equal(ids2[:, :2], first[:, 1:])
    ids3, s3 = idx.search(q, 3, drop_score_above=1 - 1e-4)
    assert not (ids3 == np.arange(50)[:, None]).any() and (s3 < 1 - 1e-4).all()


def test_exclusion_with_duplicate_entries():
    rng = np.random.default_rng(3)
    x = _normalise(rng.standard_normal((100, 8)))
    x = np.concatenate([x, np.repeat(x[:1], 10, 0)])  # ten exact duplicates of entry 0
    ids, scores = Index.build(x, {"kind": "exact"}).search(x[0], 3, drop_score_above=0.9999)
    assert not np.isin(ids, [0] + list(range(100, 110))).any()
    assert (scores < 0.9999).all() and (ids >= 0).all()


def test_bm25_basic(tmp_path):
    pytest.importorskip("bm25s")
    captions = ["a handwritten digit seven", "the number 3 written by hand", "a red car on a road",
                "a cat sitting on a mat", "a dog running in the park", "a handwritten digit one"]
    idx = Index.build(captions, {"kind": "bm25"}, ids=np.arange(6) + 100)
    ids, scores = idx.search(["dog in a park", "digit seven"], 2)
    assert ids[0, 0] == 104 and ids[1, 0] == 100
    assert scores[0, 0] > scores[0, 1]
    ids, _ = idx.search(["digit seven"], 1, exclude_ids=[100])
    assert ids[0, 0] == 105
    idx.save(str(tmp_path / "bm25"))
    loaded = Index.load(str(tmp_path / "bm25"))
    queries = ["dog in a park", "digit"]
    for a, b in zip(loaded.search(queries, 3), idx.search(queries, 3)):
        np.testing.assert_array_equal(a, b)


def test_recall_at_k():
    assert index_lib.recall_at_k([[1, 2, 3]], [[3, 2, 9]]) == pytest.approx(2 / 3)
    assert index_lib.recall_at_k([[1, 2, 3], [4, 5, 6]], [[1, 9, 9], [4, 5, 6]], k=1) == 1.0
