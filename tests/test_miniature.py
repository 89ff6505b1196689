"""The digits miniature: its training loop resumes exactly, its data are deterministic, and the
whole `run` (every stage through the production build-db/precompute/train, then the evaluation)
writes its results on a smoke config."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from imagerag_jax.miniature import data as data_lib
from imagerag_jax.miniature import fit as fit_lib
from imagerag_jax.miniature import stages

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _problem():
    rng = np.random.default_rng(0)
    xs = rng.standard_normal((40, 3)).astype(np.float32)
    ys = xs @ np.asarray([1.0, -2.0, 0.5], np.float32) + 0.3

    def loss(p, batch, key):
        noise = 0.01 * jax.random.normal(key, batch["y"].shape)  # uses the step's rng
        pred = batch["x"] @ p["w"] + p["b"]
        return jnp.mean(jnp.square(pred - batch["y"] - noise)), {"abs": jnp.mean(jnp.abs(pred - batch["y"]))}

    batch_fn = lambda step: {k: v[data_lib.batch_indices(40, 8, step, 3)] for k, v in (("x", xs), ("y", ys))}
    return {"w": np.zeros(3, np.float32), "b": np.zeros((), np.float32)}, loss, batch_fn


def test_fit_learns_and_resumes_bit_for_bit(tmp_path):
    init, loss, batch_fn = _problem()
    tx = fit_lib.adam(0.05)
    full, stats = fit_lib.fit(str(tmp_path / "a"), init, loss, batch_fn, 60, tx, progress=False)
    assert stats["final"]["loss"] < 0.05 and stats["resumed_from"] == 0
    fit_lib.fit(str(tmp_path / "b"), init, loss, batch_fn, 25, tx, progress=False, checkpoint_every=5)
    resumed, stats = fit_lib.fit(str(tmp_path / "b"), init, loss, batch_fn, 60, tx, progress=False)
    assert stats["resumed_from"] == 25
    for a, b in zip(jax.tree.leaves(full), jax.tree.leaves(resumed)):
        np.testing.assert_array_equal(a, b)


def test_fit_stops_on_nan_and_keeps_last_good_state(tmp_path):
    init, loss, batch_fn = _problem()
    bad = lambda step: {k: v * (np.nan if step >= 50 else 1.0) for k, v in batch_fn(step).items()}
    with pytest.raises(FloatingPointError, match="non-finite loss at step 51;"):
        fit_lib.fit(str(tmp_path), init, loss, bad, 60, fit_lib.adam(0.05), progress=False,
                    checkpoint_every=10)
    # The checkpoint (step 50: before the first bad step) holds the state from before the bad step, not NaNs.
    from flax import serialization
    with open(tmp_path / fit_lib.STATE_FILE, "rb") as f:
        state = serialization.msgpack_restore(f.read())
    assert np.all(np.isfinite(state["params"]["w"]))


def test_ema_update_matches_hand_computation():
    out = fit_lib.ema_update({"a": jnp.asarray(1.0)}, {"a": jnp.asarray(3.0)}, 0.9)
    assert float(out["a"]) == pytest.approx(0.9 * 1.0 + 0.1 * 3.0)


def test_batches_are_a_pure_function_of_the_step():
    a = [data_lib.batch_indices(50, 16, s, 0) for s in range(7)]
    b = [data_lib.batch_indices(50, 16, s, 0) for s in range(7)]
    assert all(np.array_equal(x, y) for x, y in zip(a, b))
    assert all(len(x) == 16 for x in a)
    epoch = np.concatenate(a[:3])
    assert len(set(epoch.tolist())) == 48  # no repeats within an epoch


def test_eval_prompts_are_class_balanced_and_held_out():
    ev = data_lib.load_split("eval", 16)
    train = data_lib.load_split("train", 16)
    prompts, labels, ids = data_lib.eval_prompts(ev, 30)
    assert np.bincount(labels, minlength=10).tolist() == [3] * 10
    assert not set(ids.tolist()) & set(train.ids.tolist())
    assert all(isinstance(p, str) and p for p in prompts)
    assert ev.images.min() >= -1 and ev.images.max() <= 1 and ev.images.shape[1:] == (16, 16, 3)


def test_stage_refuses_a_different_config(tmp_path):
    stage = stages.Stage(str(tmp_path), "vae", {"steps": 3})
    stage.finish({"w": np.ones(2)}, {"seconds": 1})
    assert stage.done
    with pytest.raises(ValueError, match="another config"):
        _ = stages.Stage(str(tmp_path), "vae", {"steps": 4}).done


def test_digits_run_end_to_end_smoke(tmp_path):
    """`main run` on the smoke config: every stage, results.json/md and grids."""
    env = {**os.environ, "PYTHONPATH": REPO + os.pathsep + os.environ.get("PYTHONPATH", "")}
    cmd = [sys.executable, "-m", "imagerag_jax.main", "run", "--config",
           os.path.join(REPO, "configs", "digits.py") + ":smoke", "--workdir", str(tmp_path)]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads((tmp_path / "results.json").read_text())
    rows = results["rows"]
    for name in ("teacher", "turbo", "direct_w", "direct_best_w", "imagerag", "real", "vae"):
        assert 0.0 <= rows[name]["fidelity"] <= 1.0 and np.isfinite(rows[name]["frechet"])
    assert rows["real"]["frechet"] == pytest.approx(0.0, abs=1e-6)
    assert rows["turbo"]["nfe"] == 1 and rows["teacher"]["nfe"] == 4
    assert results["num_prompts"] == 20 and results["retrieval"]["k"] == 2
    assert sum(results["best_w_histogram"].values()) == 20
    md = (tmp_path / "results.md").read_text()
    assert "ImageRAGTurbo, 1 step" in md and "Prompt fidelity" in md
    for name in ("samples.png", "grids/teacher.png", "grids/imagerag.png"):
        assert (tmp_path / name).stat().st_size > 0
    for name in ("vae", "text", "teacher", "student"):
        assert (tmp_path / "stages" / name / "done.json").exists()
