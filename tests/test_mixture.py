"""Mixtures of TFRecord sets: the choice sequence, config parsing, the mixed stream and its resume."""

import dataclasses
import json
import os
import shutil

import ml_collections
import numpy as np
import pytest
import tensorflow as tf

from imagerag_jax.data import mixture, input_stream, tfrecords

SYNTH = tfrecords.Schema(latent_shape=(4, 4, 2), embed_shape=(3, 8), pooled_dim=8, k=2, has_noise=True)
REAL = dataclasses.replace(SYNTH, has_noise=False)
N_SYNTH, N_REAL = 40, 12


def _write(out, schema, ids, index=None):
    examples = (tfrecords.random_example(schema, np.random.default_rng(i), example_id=i) for i in ids)
    tfrecords.write_examples(out, "train", examples, schema, 3, source="test")
    if index is not None:  # what precompute records about the neighbours' origin
        path = os.path.join(out, tfrecords.MANIFEST)
        with open(path) as f:
            m = json.load(f)
        m["index"] = index
        with open(path, "w") as f:
            json.dump(m, f)
    return out


INDEX = {"path": "/idx", "database": {"path": "/db"}}


@pytest.fixture(scope="module")
def sets(tmp_path_factory):
    root = tmp_path_factory.mktemp("mixture")
    synth = _write(str(root / "synth"), SYNTH, range(N_SYNTH), INDEX)
    real = _write(str(root / "real"), REAL, range(1000, 1000 + N_REAL), INDEX)
    return synth, real


def test_choice_counts_match_the_sequence_and_the_weights():
    c = mixture.Choice([3, 1], seed=0)
    e = np.arange(5000)
    seq = c.numpy(e)
    assert set(np.unique(seq)) == {0, 1}
    # Counts of any prefix equal the sequence's, also across the numpy chunk boundary.
    for n in (0, 1, 7, 4096, 5000):
        assert c.counts(n) == np.bincount(seq[:n], minlength=2).tolist()
    # Low discrepancy: every window of 64 holds 48 +- 3 from the 0.75 set.
    windows = seq[: 64 * 70].reshape(70, 64)
    assert np.all(np.abs((windows == 0).sum(1) - 48) <= 3)
    # TensorFlow computes the same sets, also past 2^31 (the period) and near int64 limits.
    big = np.array([0, 1, 2**31 - 1, 2**31, 2**31 + 5, 2**40 + 3, 2**62], np.int64)
    probe = np.concatenate([e[:300], big])
    assert [int(c.tf(tf.constant(x, tf.int64))) for x in probe] == c.numpy(probe).tolist()
    # Another seed, another sequence with the same proportions.
    other = mixture.Choice([3, 1], seed=1).numpy(e)
    assert not np.array_equal(other, seq) and abs((other == 0).mean() - 0.75) < 0.01
    three = mixture.Choice([0.2, 0.3, 0.5], seed=4).counts(10_000)
    assert np.allclose(three, [2000, 3000, 5000], atol=10)


@pytest.mark.parametrize("weights", [[], [1, 0], [1, -2], [1, float("nan")]])
def test_choice_refuses_bad_weights(weights):
    with pytest.raises(mixture.MixtureError, match="positive"):
        mixture.Choice(weights, 0)


def test_config_sets():
    cfg = ml_collections.ConfigDict(dict(data_dir=None, data_mixture=()))
    assert mixture.config_sets(cfg, "/w") == [("/w/data", 1.0)]
    with pytest.raises(mixture.MixtureError, match="names no data"):
        mixture.config_sets(cfg)
    cfg.data_dir = "/d"
    assert mixture.config_sets(cfg, "/w") == [("/d", 1.0)]
    cfg.data_mixture = (("/a", 3), ("/b", 1))
    with pytest.raises(mixture.MixtureError, match="not both"):
        mixture.config_sets(cfg, "/w")
    cfg.data_dir = None
    assert mixture.config_sets(cfg, "/w") == [("/a", 3.0), ("/b", 1.0)]
    # A config read back from a checkpoint's JSON holds lists.
    assert mixture.config_sets({"data_mixture": [["/a", 1]], "data_dir": None}) == [("/a", 1.0)]
    for bad, match in [((("/a",),), "pairs"), ((("", 1),), "not a data directory"),
                       ((("/a", "x"),), "not a number"), ((("/a", 0),), "must be > 0"),
                       ((("/a", 1), ("/a", 2)), "twice")]:
        with pytest.raises(mixture.MixtureError, match=match):
            mixture.parse_sets(bad)


def _ids(it, n):
    return [next(it)["example_id"].tolist() for _ in range(n)]


def test_mixed_stream_follows_the_weights_and_fills_noise(sets):
    synth, real = sets
    data = [(synth, 3.0), (real, 1.0)]
    it = input_stream.InputStream(data, "train", 8, seed=2, shuffle_buffer=16)
    assert it.schema == SYNTH and it.is_mixture and len(it.files) == 6
    assert input_stream.data_schema(data, "train") == SYNTH
    batches = [next(it) for _ in range(20)]
    ids = np.concatenate([b["example_id"] for b in batches])
    from_real = ids >= 1000
    assert abs(from_real.sum() - 40) <= 3  # 160 examples at weight 1/4
    # Each set cycles through all of its examples (epochs of its own), the small set several times.
    assert set(ids[~from_real]) == set(range(N_SYNTH)) and set(ids[from_real]) == set(range(1000, 1000 + N_REAL))
    # Stored noise for the teacher pairs; fresh N(0, 1) noise for the real ones, new per epoch.
    noise = np.concatenate([b["noise"] for b in batches])
    stored = {i: tfrecords.random_example(SYNTH, np.random.default_rng(i), i)["noise"] for i in range(N_SYNTH)}
    for i, x in zip(ids[~from_real], noise[~from_real]):
        np.testing.assert_array_equal(x, stored[i].astype(np.float32))
    real_noise = noise[from_real]
    assert abs(real_noise.std() - 1.0) < 0.1 and abs(real_noise.mean()) < 0.1
    first = {int(i): x for i, x in zip(ids[from_real][::-1], real_noise[::-1])}
    last = {int(i): x for i, x in zip(ids[from_real], real_noise)}
    assert all(not np.array_equal(first[i], last[i]) for i in first)
    # The whole stream, noise included, is a function of the seed.
    again = input_stream.InputStream(data, "train", 8, seed=2, shuffle_buffer=16)
    b0 = next(again)
    np.testing.assert_array_equal(b0["noise"], batches[0]["noise"])
    assert _ids(again, 3) == [b["example_id"].tolist() for b in batches[1:4]]
    other = input_stream.InputStream(data, "train", 8, seed=3, shuffle_buffer=16)
    assert _ids(other, 4) != [b["example_id"].tolist() for b in batches[:4]]


def test_mixture_resumes_exactly_and_checks_its_state(sets):
    synth, real = sets
    data = [(synth, 1.0), (real, 1.0)]
    it = input_stream.InputStream(data, "train", 6, seed=0, shuffle_buffer=8)
    _ids(it, 7)
    state = json.loads(json.dumps(it.get_state()))
    assert state["weights"] == [1.0, 1.0] and len(state["files"]) == 2
    expected = [next(it) for _ in range(5)]
    fresh = input_stream.InputStream(data, "train", 6, seed=0, shuffle_buffer=8)
    fresh.set_state(state)
    for want in expected:
        got = next(fresh)
        for key in want:
            np.testing.assert_array_equal(got[key], want[key], err_msg=key)
    reweighted = input_stream.InputStream([(synth, 2.0), (real, 1.0)], "train", 6, seed=0, shuffle_buffer=8)
    with pytest.raises(ValueError, match="weights"):
        reweighted.set_state(state)
    single = input_stream.InputStream(synth, "train", 6, seed=0, shuffle_buffer=8)
    with pytest.raises(ValueError, match="files"):
        single.set_state(state)
    # A single set's own state (no weights) still restores.
    _ids(single, 2)
    own, want = single.get_state(), _ids(single, 2)
    again = input_stream.InputStream(synth, "train", 6, seed=0, shuffle_buffer=8)
    again.set_state(own)
    assert "weights" not in own and _ids(again, 2) == want


def test_sets_that_do_not_fit_are_refused_by_name(sets, tmp_path):
    synth, real = sets
    other_k = _write(str(tmp_path / "k3"), dataclasses.replace(REAL, k=3), range(6), INDEX)
    with pytest.raises(mixture.MixtureError, match=r"differ in k: .*synth has 2, .*k3 has 3"):
        input_stream.InputStream([(synth, 1.0), (other_k, 1.0)], "train", 4)
    other_db = _write(str(tmp_path / "db2"), REAL, range(6), {"path": "/idx2", "database": {"path": "/db2"}})
    with pytest.raises(mixture.MixtureError, match="different databases"):
        input_stream.data_schema([(synth, 1.0), (other_db, 1.0)], "train")
    with pytest.raises(mixture.MixtureError, match="num_epochs"):
        input_stream.InputStream([(synth, 1.0), (real, 1.0)], "train", 4, num_epochs=1)
    with pytest.raises(mixture.MixtureError, match="empty mixture"):
        input_stream.InputStream([], "train", 4)
    # Each set's manifest is validated: a truncated shard of the second set is named.
    broken = str(tmp_path / "broken")
    shutil.copytree(real, broken)
    shard = sorted(f for f in os.listdir(broken) if f.startswith("train"))[0]
    with open(os.path.join(broken, shard), "r+b") as f:
        f.truncate(10)
    with pytest.raises(tfrecords.ManifestError, match=rf"{shard}: 10 bytes"):
        input_stream.InputStream([(synth, 1.0), (broken, 1.0)], "train", 4)
