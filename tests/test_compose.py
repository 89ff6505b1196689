"""The compositional miniature's data: captions that bind, disjoint digit images, the long tail."""

import numpy as np
import pytest

from imagerag_jax.data import sources
from imagerag_jax.miniature import compose


@pytest.fixture(scope="module")
def splits():
    return compose.make_splits(0, train=1200, eval_per_class=20)


def test_every_caption_of_every_composition_parses_back():
    for index in range(compose.NUM_COMPOSITIONS):
        comp = compose.Composition.from_index(index)
        assert comp.index == index
        for variant in range(4 * len(compose.TEMPLATES)):
            text = compose.caption(comp, variant)
            assert compose.parse_caption(text) == comp, text
    # Word and numeral forms and both orders occur; a swapped caption is another composition.
    comp = compose.Composition(3, 0, 7, 2)
    texts = {compose.caption(comp, v) for v in range(4 * len(compose.TEMPLATES))}
    assert "a red 3 to the left of a blue 7" in texts and "blue seven on the right, red three on the left" in texts
    assert compose.parse_caption("a blue 7 to the left of a red 3") == compose.Composition(7, 2, 3, 0)
    assert compose.parse_caption("a red 3") is None and compose.parse_caption("a digit") is None


def test_canvas_halves_hold_the_tinted_digits():
    digits, _ = sources.load_digits()
    comp = compose.Composition(4, 1, 9, 3)
    img = compose.canvas(digits[0], digits[5], comp, size=16)
    assert img.shape == (16, 16, 3) and img.dtype == np.uint8
    left, right = img[:, :8], img[:, 8:]
    # Green: only the green channel; yellow: red = green, no blue; intensities follow the digit.
    assert not left[..., [0, 2]].any() and left[..., 1].any()
    assert np.array_equal(right[..., 0], right[..., 1]) and not right[..., 2].any()
    np.testing.assert_array_equal(left[::2, :, 1], np.round(np.clip(digits[0] / 16, 0, 1) * 255).astype(np.uint8))
    assert compose.colour_of(left) == 1 and compose.colour_of(right) == 3
    assert compose.colour_of(np.zeros((16, 8, 3), np.uint8)) == -1
    with pytest.raises(ValueError, match="multiple of 16"):
        compose.canvas(digits[0], digits[1], comp, size=24)


def test_colour_is_recovered_from_every_canvas(splits):
    for s in splits.values():
        for img, index in zip(s.images[:300], s.compositions[:300]):
            comp = compose.Composition.from_index(int(index))
            assert compose.colour_of(img[:, :8]) == comp.left_colour
            assert compose.colour_of(img[:, 8:]) == comp.right_colour
            # The float [-1, 1] form the towers see gives the same colours.
            assert compose.colour_of(img[:, :8].astype(np.float32) / 127.5 - 1) == comp.left_colour


def test_splits_are_deterministic_disjoint_and_long_tailed(splits):
    again = compose.make_splits(0, train=1200, eval_per_class=20)
    for name in splits:
        np.testing.assert_array_equal(splits[name].images, again[name].images)
        assert splits[name].captions == again[name].captions
    other = compose.make_splits(1, train=1200, eval_per_class=20)
    assert not np.array_equal(other["train"].compositions, splits["train"].compositions)
    # No digit image is in two splits.
    used = {n: set(s.left_ids) | set(s.right_ids) for n, s in splits.items()}
    assert not used["train"] & used["database"] and not used["train"] & used["eval"]
    assert not used["database"] & used["eval"]
    # Captions name each canvas's composition; sides hold digit images of the named digits.
    _, labels = sources.load_digits()
    for s in splits.values():
        for index, text, left, right in zip(s.compositions, s.captions, s.left_ids, s.right_ids):
            comp = compose.Composition.from_index(int(index))
            assert compose.parse_caption(text) == comp
            assert labels[left] == comp.left_digit and labels[right] == comp.right_digit
    classes = compose.frequency_classes(0)
    train, db, ev = splits["train"], splits["database"], splits["eval"]
    # The database covers every composition; training never sees an unseen one.
    assert set(db.compositions) == set(range(compose.NUM_COMPOSITIONS))
    assert not np.any(classes[train.compositions] == 2)
    counts = np.bincount(train.compositions, minlength=compose.NUM_COMPOSITIONS)
    freq, rare = counts[classes == 0], counts[classes == 1]
    assert freq.mean() > 10 * rare.mean() and rare.max() < freq.min()
    assert np.bincount(ev.classes, minlength=4).tolist() == [20, 20, 20, 0]
    assert len(set(ev.compositions)) == len(ev)


def test_novel_digits_are_in_the_database_and_held_out_prompts_only(splits):
    novel = compose.make_splits(0, train=1200, eval_per_class=20, novel_digits=[9])
    classes = compose.frequency_classes(0, novel_digits=(9,))
    holds_nine = compose.has_digit(np.arange(compose.NUM_COMPOSITIONS), (9,))
    # 1 - (9/10)^2 of the compositions (digit and colour each side) hold a 9: exactly the novel ones.
    assert holds_nine.sum() == 1600 - (9 * 4) ** 2 and np.array_equal(classes == 3, holds_nine)
    assert not compose.has_digit(novel["train"].compositions, (9,)).any()
    assert set(novel["database"].compositions) == set(range(compose.NUM_COMPOSITIONS))
    ev = novel["eval"]
    assert np.bincount(ev.classes, minlength=4).tolist() == [20, 20, 20, 20]
    assert compose.has_digit(ev.compositions[ev.classes == 3], (9,)).all()
    assert not compose.has_digit(ev.compositions[ev.classes != 3], (9,)).any()
    # Without novel digits the ranking is the committed one; with them frequent/unseen keep
    # their sizes; the digits may come as a list (a config read back from JSON) or a tuple.
    assert np.array_equal(compose.frequency_classes(0), compose.frequency_classes(0, 40, 400, ()))
    assert np.bincount(classes).tolist() == [40, 1296 - 440, 400, 304]
    assert compose.make_splits(0, train=1200, eval_per_class=20, novel_digits=(9,)) is novel
    with pytest.raises(ValueError, match="distinct digits 0-9"):
        compose.frequency_classes(0, novel_digits=(10,))
    with pytest.raises(ValueError, match="hold no novel digit"):
        compose.frequency_classes(0, frequent=40, unseen=400, novel_digits=(1, 2, 3, 4, 5, 6))


def test_score_against_a_hand_count():
    comps = np.array([compose.Composition(1, 0, 2, 1).index, compose.Composition(3, 2, 4, 3).index,
                      compose.Composition(5, 1, 6, 0).index])
    pred = {"left_digit": np.array([1, 3, 5]), "left_colour": np.array([0, 2, 0]),
            "right_digit": np.array([2, 9, 6]), "right_colour": np.array([1, 3, 0])}
    out = compose.score(pred, comps, np.array([0, 1, 1]))
    # Canvas 0 all right; canvas 1 wrong right digit; canvas 2 wrong left colour.
    assert out["all_correct"] == pytest.approx(1 / 3)
    assert out["attribute_accuracy"] == pytest.approx(
        {"left_digit": 1.0, "left_colour": 2 / 3, "right_digit": 2 / 3, "right_colour": 1.0})
    assert out["by_class"] == {"frequent": 1.0, "rare": 0.0, "unseen": None, "novel": None}
    assert out["novel_digit_accuracy"] is None
    # Sides that should show a 2 or a 4: canvas 0's right (drawn 2: right), canvas 1's right
    # (drawn 9: wrong); canvas 2 has neither.
    assert compose.score(pred, comps, np.array([0, 1, 1]), (2, 4))["novel_digit_accuracy"] == 0.5
    # Blind digits are counted the same way: sides that should show a 3 or a 5 (both drawn).
    both = compose.score(pred, comps, np.array([0, 1, 1]), (2, 4), (3, 5))
    assert both["novel_digit_accuracy"] == 0.5 and both["blind_digit_accuracy"] == 1.0
    assert out["blind_digit_accuracy"] is None


def test_judge_ceiling_on_real_held_out_canvases(splits):
    classifier = compose.train_judge(16, epochs=3)
    ev = splits["eval"]
    out = compose.score(compose.judge(classifier, ev.images), ev.compositions, ev.classes)
    acc = out["attribute_accuracy"]
    assert acc["left_colour"] == acc["right_colour"] == 1.0
    assert min(acc["left_digit"], acc["right_digit"]) > 0.85, out
    # Swapping the halves breaks the binding: the judge must see it.
    swapped = np.concatenate([ev.images[:, :, 8:], ev.images[:, :, :8]], axis=2)
    assert compose.score(compose.judge(classifier, swapped), ev.compositions, ev.classes)["all_correct"] < 0.2


def test_compose_source_feeds_the_production_jobs(splits):
    src = sources.make_source({"kind": "imagerag_jax.miniature.compose:ComposeSource", "split": "database", "size": 16, "train": 1200,
                               "eval_per_class": 20})
    items = list(src)
    db = splits["database"]
    assert len(items) == len(src) == len(db)
    ids = [i for i, _, _ in items]
    assert ids[0] == compose.SPLIT_ID_OFFSET["database"] and len(set(ids)) == len(ids)
    np.testing.assert_array_equal(items[5][1], db.images[5])
    assert items[5][2] == db.captions[5]
    with pytest.raises(ValueError, match="unknown compose split"):
        compose.ComposeSource("test")
    with pytest.raises(ValueError, match="cannot import Nope"):
        sources.make_source({"kind": "imagerag_jax.miniature.compose:Nope"})
    with pytest.raises(ValueError, match="not a data.sources.Source subclass"):
        sources.make_source({"kind": "imagerag_jax.miniature.compose:Composition"})


def test_bootstrap_interval_against_hand_values():
    from imagerag_jax.miniature import compose_report

    a, b = np.array([1, 1, 1, 0]), np.array([0, 1, 1, 0])
    out = compose_report.bootstrap_difference(a, b, 4000, 0)
    assert out["mean"] == 0.25 and out["prompts"] == 4
    # Resampled means of a 0/1 difference with one 1 in 4 lie in [0, 1]; the interval holds 0.25.
    assert 0.0 <= out["ci95"][0] <= 0.25 <= out["ci95"][1] <= 0.75
    same = compose_report.bootstrap_difference(a, a, 100, 0)
    assert same["mean"] == 0.0 and same["ci95"] == [0.0, 0.0]


def test_bootstrap_over_seeds_and_prompts():
    from imagerag_jax.miniature import compose_report

    rng = np.random.default_rng(0)
    a, b = rng.integers(0, 2, 40).astype(float), rng.integers(0, 2, 40).astype(float)
    one = compose_report.bootstrap_difference(a, b, 500, 3)
    # Identical seeds: resampling them changes nothing, so the interval is the prompts-only one.
    same = compose_report.bootstrap_difference(np.stack([a, a, a]), np.stack([b, b, b]), 500, 3)
    assert same["ci95"] == one["ci95"] and same["mean"] == one["mean"] and same["seeds"] == 3
    # Seeds that disagree (one far better): wider than the interval over the seed-averaged prompts.
    better = np.stack([a, a, np.ones_like(a)])
    avg = compose_report.bootstrap_difference(better.mean(0), b, 500, 3)
    both = compose_report.bootstrap_difference(better, np.stack([b, b, b]), 500, 3)
    assert both["mean"] == pytest.approx(avg["mean"])
    assert both["ci95"][1] - both["ci95"][0] > 1.5 * (avg["ci95"][1] - avg["ci95"][0])
    # A hand case: 2 seeds x 1 prompt, differences 0 and 1: every draw's mean is 0, 0.5 or 1.
    hand = compose_report.bootstrap_difference(np.array([[1.0], [2.0]]), np.zeros((2, 1)), 2000, 0)
    assert hand["mean"] == 1.5 and hand["ci95"] == [1.0, 2.0]
