"""The miniature text encoder's per-side loss: hand-checked InfoNCE, padding masked, a clear error."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from imagerag_jax.miniature import compose, stages
from imagerag_jax.models.clip_text import Tokenizer
from imagerag_jax.weights import random_pipeline


def test_infonce_with_several_positives_against_hand_values():
    logits = np.array([[2.0, 1.0, 0.0], [0.5, 1.5, 0.5], [0.0, 0.0, 3.0]], np.float32)
    same = np.array([[1, 1, 0], [1, 1, 0], [0, 0, 1]], np.float32)  # rows 0 and 1 show the same

    def ce(lg):
        out = []
        for i in range(3):
            lse = np.log(np.exp(lg[i]).sum())
            positives = np.nonzero(same[i])[0]
            out.append(lse - lg[i, positives].mean())
        return np.mean(out)

    want = 0.5 * (ce(logits) + ce(logits.T))
    got = float(stages._symmetric_infonce(jnp.asarray(logits), jnp.asarray(same)))
    np.testing.assert_allclose(got, want, rtol=1e-6)
    # One positive per row is CLIP's loss.
    eye = stages._symmetric_infonce(jnp.asarray(logits), jnp.eye(3))
    diag = 0.5 * sum(np.mean([np.log(np.exp(m[i]).sum()) - m[i, i] for i in range(3)])
                     for m in (logits, logits.T))
    np.testing.assert_allclose(float(eye), diag, rtol=1e-6)


def test_side_queries_ignore_padding_after_the_end_token():
    queries = stages.SideQueries(dim=8, sides=2)
    hidden = jax.random.normal(jax.random.PRNGKey(0), (2, 6, 16))
    mask = jnp.array([[1, 1, 1, 0, 0, 0], [1, 1, 1, 1, 1, 0]], bool)
    params = queries.init(jax.random.PRNGKey(1), hidden, mask)
    out = queries.apply(params, hidden, mask)
    changed = hidden.at[:, 5].set(100.0).at[0, 3:].set(-50.0)
    assert out.shape == (2, 2, 8)
    np.testing.assert_allclose(queries.apply(params, changed, mask), out, atol=1e-6)
    assert not np.allclose(queries.apply(params, hidden.at[0, 0].add(1.0), mask)[0], out[0])


def test_side_loss_trains_and_needs_side_labels(tmp_path):
    splits = compose.make_splits(0, train=64, eval_per_class=4, database_per_composition=1)
    tr = splits["train"]
    tokenizer = Tokenizer.from_pretrained(random_pipeline.write_byte_tokenizer(str(tmp_path / "tok")))
    table = stages.CaptionTable(tokenizer, compose.all_captions())
    images = compose.as_float(tr.images)
    cfg = dict(hidden=16, layers=1, heads=2, lr=1e-3, warmup=0, batch=16, colour=True, steps=2, sides=1.0)
    with pytest.raises(ValueError, match="side_labels"):
        stages.train_text(str(tmp_path / "a"), cfg, table, images, tr.compositions, seed=0, progress=False)
    _, params, stats = stages.train_text(str(tmp_path / "b"), cfg, table, images, tr.compositions, seed=0,
                                         side_labels=compose.side_labels(tr.compositions), progress=False)
    assert {"acc", "side_acc"} <= set(stats["final"]) and 0.0 <= stats["final"]["side_acc"] <= 1.0
    # Only the text encoder comes back: the same tree as without the per-side loss.
    _, plain, plain_stats = stages.train_text(str(tmp_path / "c"), {**cfg, "sides": 0.0}, table, images,
                                              tr.compositions, seed=0, progress=False)
    assert jax.tree.structure(params) == jax.tree.structure(plain)
    assert "side_acc" not in plain_stats["final"]
