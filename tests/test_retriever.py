"""The one retriever: search -> id-to-row lookup -> gather, with self and duplicate exclusion."""

import subprocess
import sys

import numpy as np
import pytest

from imagerag_jax.retrieval import database as db_lib
from imagerag_jax.retrieval import index as index_lib
from imagerag_jax.retrieval import retriever as retriever_lib

N, D, K = 40, 8, 4


@pytest.fixture(scope="module")
def made(tmp_path_factory):
    """A small database with shuffled, non-positional ids and its exact index."""
    path = str(tmp_path_factory.mktemp("retr") / "db")
    rng = np.random.default_rng(0)
    spec = db_lib.DatabaseSpec((2, 2, 4), (3, D), D)
    ids = rng.permutation(1000)[:N].astype(np.int64) + 7
    with db_lib.DatabaseWriter(path, spec, source="test", text_encoder="te", vae="vae",
                               fsync=False) as w:
        w.append([f"caption {i}" for i in ids], rng.standard_normal((N, 2, 2, 4)),
                 rng.standard_normal((N, 3, D)), rng.standard_normal((N, D)), ids)
    db = db_lib.Database(path)
    index = index_lib.Index.build(db.pooled, {"kind": "exact"}, ids=db.ids)
    queries = rng.standard_normal((6, D)).astype(np.float32)
    queries /= np.linalg.norm(queries, axis=1, keepdims=True)
    hashes = rng.integers(0, 5, N).astype(np.uint64)  # many rows share an image hash
    return db, index, queries, hashes


def brute_force(db, queries, k, exclude):
    """Reference: every dot product, excluded ids dropped, best first (ties: lower row first)."""
    pooled, ids = np.asarray(db.pooled, np.float32), np.asarray(db.ids)
    out_ids, out_scores = [], []
    for q, ex in zip(queries, exclude):
        s = pooled @ q
        order = [r for r in np.argsort(-s, kind="stable") if ids[r] not in set(ex.tolist())][:k]
        out_ids.append(ids[order])
        out_scores.append(s[order])
    return np.stack(out_ids), np.stack(out_scores)


def test_retrieve_equals_brute_force_with_self_exclusion(made):
    db, index, queries, _ = made
    retr = retriever_lib.Retriever(db, index)
    own = np.asarray(db.ids)[[0, 5, 9, 13, 21, 39]]
    got = retr.retrieve(queries, K, exclude_ids=retr.exclusions(own))
    want_ids, want_scores = brute_force(db, queries, K, own[:, None])
    np.testing.assert_array_equal(got["ids"], want_ids)
    np.testing.assert_allclose(got["scores"], want_scores, rtol=1e-6)
    rows = db.rows_for_ids(want_ids)
    np.testing.assert_array_equal(got["rows"], rows)
    for name in ("latents", "prompt_embeds", "pooled"):
        np.testing.assert_array_equal(got[name], np.asarray(getattr(db, name))[rows])
    assert all(o not in r for o, r in zip(own, got["ids"]))


def test_retrieve_equals_the_inline_search_gather_it_replaces(made):
    """Bit for bit what the callers did before: index.search, rows_for_ids, gather."""
    db, index, queries, _ = made
    got = retriever_lib.Retriever(db, index).retrieve(queries, K, captions=True)
    ids, scores = index.search(queries, K)
    old = db.gather(db.rows_for_ids(ids))
    np.testing.assert_array_equal(got["ids"], ids)
    np.testing.assert_array_equal(got["scores"], scores)
    for name in ("latents", "prompt_embeds", "pooled", "ids"):
        np.testing.assert_array_equal(got[name], old[name])
    assert got["captions"] == [db.captions(r) for r in db.rows_for_ids(ids)]


def test_duplicate_exclusion(made):
    db, index, queries, hashes = made
    retr = retriever_lib.Retriever(db, index, image_hashes=hashes)
    own = np.asarray(db.ids)[:len(queries)]
    qh = [int(hashes[0]), None, int(hashes[2]), 99, int(hashes[4]), int(hashes[5])]
    excl = retr.exclusions(own, qh)
    ids = np.asarray(db.ids)
    for j, (o, h) in enumerate(zip(own, qh)):
        want = {int(o)} | ({int(i) for i in ids[hashes == np.uint64(h)]} if h is not None else set())
        assert set(excl[j][excl[j] >= 0].tolist()) == want
    got = retr.retrieve(queries, K, exclude_ids=excl)
    want_ids, _ = brute_force(db, queries, K, excl)
    np.testing.assert_array_equal(got["ids"], want_ids)


def test_too_few_neighbours_is_a_clear_user_error(made):
    db, index, queries, hashes = made
    retr = retriever_lib.Retriever(db, index, image_hashes=np.zeros(N, np.uint64))
    # Every row shares hash 0: excluding the duplicates leaves nothing.
    with pytest.raises(retriever_lib.NotEnoughNeighbours, match=r"query 0: only 0 of k=4"):
        retr.retrieve(queries, K, exclude_ids=retr.exclusions(np.asarray(db.ids)[:6], [0] * 6))


def test_open_refuses_an_index_of_another_database(made, tmp_path):
    db, _, _, _ = made
    other = index_lib.Index.build(np.asarray(db.pooled)[:10], {"kind": "exact"},
                                  ids=np.asarray(db.ids)[:10])
    with pytest.raises(db_lib.DatabaseError, match="does not match the database"):
        retriever_lib.Retriever.open(db, other)
    other.save(str(tmp_path / "idx"))
    with pytest.raises(db_lib.DatabaseError, match="rebuild the index"):
        retriever_lib.Retriever.open(db.path, str(tmp_path / "idx"))


def test_importing_the_retriever_needs_numpy_only():
    code = ("import sys, imagerag_jax.retrieval.retriever; "
            "print(sorted(m for m in ('jax', 'tensorflow', 'scann', 'torch') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
