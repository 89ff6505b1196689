"""The digits miniature's judge (miniature/judge.py): accuracy, fidelity, determinism, save/load."""

from __future__ import annotations

import json
import os

import jax
import numpy as np
import pytest

from imagerag_jax.evaluation import metrics
from imagerag_jax.miniature import data as data_lib
from imagerag_jax.miniature import judge


@pytest.fixture(scope="module")
def digits16():
    """Real train/eval digits at 16 px and a classifier fit on the train split (default epochs)."""
    train, held_out = (data_lib.load_split(s, 16) for s in ("train", "eval"))
    clf = judge.DigitClassifier().fit(train.images, train.labels, seed=0)
    return clf, (train.images, train.labels), (held_out.images, held_out.labels)


def test_classifier_held_out_accuracy(digits16):
    clf, _, (x, y) = digits16
    acc = clf.accuracy(x, y)
    print(f"held-out accuracy {acc:.4f}, fit {clf.info['fit_seconds']:.2f} s")
    assert acc >= 0.95
    proba = clf.predict_proba(x)
    np.testing.assert_allclose(proba.sum(1), 1.0, atol=1e-9)
    np.testing.assert_array_equal(proba.argmax(1), clf.predict(x))
    assert clf.features(x).shape == (len(x), clf.feature_dim)
    # uint8 input is the same image as its [-1, 1] float.
    u8 = np.round((x + 1) * 127.5).astype(np.uint8)
    np.testing.assert_array_equal(clf.predict(u8), clf.predict(x))


def test_prompt_fidelity_and_report(digits16):
    clf, _, (x, y) = digits16
    wrong = (y + 1) % 10
    assert judge.prompt_fidelity(clf, x, y) >= 0.95
    assert judge.prompt_fidelity(clf, x, wrong) <= 0.05
    report = judge.digit_report(clf, x[:90], y[:90], x[90:])
    assert set(report) == {"fidelity", "fd"} and report["fd"] >= 0
    # Real eval images are nearer real images than noise is, in the classifier's feature space.
    noise = np.random.default_rng(0).uniform(-1, 1, x[:90].shape).astype(np.float32)
    assert report["fd"] < metrics.frechet_distance(clf.features(x[90:]), clf.features(noise))


def test_classifier_save_load_round_trip(digits16, tmp_path):
    clf, _, (x, _) = digits16
    path = clf.save(str(tmp_path / "clf"))
    loaded = judge.DigitClassifier.load(path)
    np.testing.assert_array_equal(loaded.predict(x), clf.predict(x))
    np.testing.assert_array_equal(loaded.features(x), clf.features(x))
    assert loaded.image_size == (16, 16)
    assert not any(f.endswith(".pkl") for f in os.listdir(path))


def test_classifier_is_deterministic(digits16):
    _, (x, y), _ = digits16
    fits = [judge.DigitClassifier(epochs=2).fit(x[:256], y[:256], seed=3) for _ in range(2)]
    for a, b in zip(jax.tree_util.tree_leaves(fits[0].params),
                    jax.tree_util.tree_leaves(fits[1].params)):
        np.testing.assert_array_equal(a, b)


def test_classifier_bad_inputs(digits16, tmp_path):
    clf, (x, y), _ = digits16
    with pytest.raises(ValueError, match="trained on 16x16"):
        clf.predict(np.zeros((2, 32, 32, 3), np.float32))
    with pytest.raises(ValueError, match=r"\(B, H, W, C\)"):
        clf.predict(np.zeros((2, 16, 16), np.float32))
    with pytest.raises(ValueError, match="multiples of 8"):
        judge.DigitClassifier().fit(np.zeros((4, 12, 12, 3)), np.zeros(4, np.int64))
    with pytest.raises(ValueError, match="epochs and batch_size must be >= 1"):
        judge.DigitClassifier(epochs=0).fit(x[:4], y[:4])
    with pytest.raises(ValueError, match="digits in 0..9"):
        judge.DigitClassifier().fit(x[:4], np.array([0, 1, 2, 10]))
    with pytest.raises(ValueError, match="shape"):
        judge.prompt_fidelity(clf, x[:4], y[:3])
    with pytest.raises(ValueError, match="not fitted"):
        judge.DigitClassifier().predict(x[:2])
    with pytest.raises(FileNotFoundError, match="not a saved DigitClassifier"):
        judge.DigitClassifier.load(str(tmp_path / "nothing"))


def test_classifier_load_refuses_another_format(digits16, tmp_path):
    clf = digits16[0]
    path = clf.save(str(tmp_path / "clf"))
    cfg_path = os.path.join(path, "classifier.json")
    with open(cfg_path) as f:
        cfg = json.load(f)
    for key, value, match in (("version", 99, "version 99"), ("format", "other", "format 'other'")):
        with open(cfg_path, "w") as f:
            json.dump(dict(cfg, **{key: value}), f)
        with pytest.raises(ValueError, match=match):
            judge.DigitClassifier.load(path)
    with open(cfg_path, "w") as f:
        f.write("{not json")
    with pytest.raises(ValueError, match="not a readable JSON classifier config"):
        judge.DigitClassifier.load(path)


def test_train_digit_classifier_fits_the_train_split():
    clf = judge.train_digit_classifier(16, epochs=1, seed=0)
    train = data_lib.load_split("train", 16)
    assert clf.info["num_train"] == len(train) and clf.image_size == (16, 16)
    direct = judge.DigitClassifier(epochs=1).fit(train.images, train.labels, seed=0)
    for a, b in zip(jax.tree_util.tree_leaves(clf.params), jax.tree_util.tree_leaves(direct.params)):
        np.testing.assert_array_equal(a, b)
