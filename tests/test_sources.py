"""Image-text sources: digits (counts, captions, splits), folders, caption files, local TFDS."""

import importlib.resources
import json
import logging
import os
import sys

import numpy as np
import pytest
from PIL import Image

from imagerag_jax.data import sources


def test_digits_splits_counts_and_captions():
    splits = {s: sources.DigitsSource(s) for s in ("train", "eval", "database")}
    ids = {s: src.ids for s, src in splits.items()}
    assert sum(len(v) for v in ids.values()) == 1797
    assert len(np.unique(np.concatenate(list(ids.values())))) == 1797  # disjoint and covering
    for name, frac in sources.DIGITS_SPLITS.items():
        assert abs(len(ids[name]) / 1797 - frac) < 0.01
        assert set(np.bincount(splits[name].labels, minlength=10) > 0) == {True}  # stratified
    np.testing.assert_array_equal(sources.DigitsSource("train").ids, ids["train"])  # determinism
    assert not np.array_equal(sources.DigitsSource("train", seed=1).ids, ids["train"])

    src = splits["eval"]
    examples = list(src)
    assert len(examples) == len(src)
    templates = set()
    for (example_id, image, caption), label in zip(examples, src.labels):
        assert image.shape == (32, 32, 3) and image.dtype == np.uint8
        assert sources.caption_digit(caption) == label == src.label_of(example_id)
        templates.add(caption.replace(sources.DIGIT_WORDS[label], "W").replace(str(label), "N"))
    assert len(templates) >= 5  # captions vary
    assert examples[0][2] == sources.DigitsSource("eval").caption(examples[0][0])
    assert examples[0][1].max() > 200 and examples[0][1].min() == 0
    assert sources.DigitsSource("all", size=16).image(0).shape == (16, 16, 3)


def test_caption_digit():
    assert sources.caption_digit("a handwritten digit seven") == 7
    assert sources.caption_digit("the number 7 written by hand") == 7
    assert sources.caption_digit("a cat") is None
    assert sources.caption_digit("a three and a 4") is None
    assert all(sources.caption_digit(sources.digit_caption(d, v)) == d
               for d in range(10) for v in range(len(sources.DIGIT_TEMPLATES)))


def _png(path, array):
    Image.fromarray(array).save(path)


def test_folder_source_skips_and_counts(tmp_path, caplog):
    rng = np.random.default_rng(0)
    os.makedirs(tmp_path / "sub")
    _png(tmp_path / "b.png", rng.integers(0, 255, (10, 12, 3), dtype=np.uint8))
    _png(tmp_path / "a.png", rng.integers(0, 255, (8, 8), dtype=np.uint8))  # grayscale
    _png(tmp_path / "sub" / "c.png", rng.integers(0, 255, (9, 9, 4), dtype=np.uint8))  # RGBA
    _png(tmp_path / "nocaption.png", np.zeros((4, 4, 3), np.uint8))
    (tmp_path / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really a png")
    for stem in ("a", "b", "sub/c", "broken"):
        (tmp_path / f"{stem}.txt").write_text(f" caption of {stem}\n")
    src = sources.FolderSource(str(tmp_path))
    with caplog.at_level(logging.WARNING):
        examples = list(src)
    assert [(i, c) for i, _, c in examples] == [
        (0, "caption of a"), (1, "caption of b"), (4, "caption of sub/c")]
    assert all(im.shape[-1] == 3 and im.dtype == np.uint8 for _, im, _ in examples)
    assert examples[0][1].shape == (8, 8, 3) and examples[1][1].shape == (10, 12, 3)
    assert src.skipped.as_dict() == {"unreadable image": 1, "missing caption": 1}
    assert src.skipped.total == 2
    assert any("broken.png" in r.getMessage() for r in caplog.records)
    resized = list(sources.FolderSource(str(tmp_path), image_size=6, recursive=False))
    assert [im.shape for _, im, _ in resized] == [(6, 6, 3), (6, 6, 3)]


def test_caption_file_sources(tmp_path):
    rng = np.random.default_rng(1)
    for name in ("x.png", "y.png"):
        _png(tmp_path / name, rng.integers(0, 255, (5, 5, 3), dtype=np.uint8))
    rows = [{"path": "x.png", "caption": "an x", "id": 10},
            {"path": "missing.png", "caption": "gone", "id": 11},
            {"path": "y.png", "caption": "a y", "id": 12}]
    with open(tmp_path / "pairs.jsonl", "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)
    src = sources.CaptionFileSource(str(tmp_path / "pairs.jsonl"), id_key="id")
    assert [(i, c) for i, _, c in src] == [(10, "an x"), (12, "a y")]
    assert src.skipped.as_dict() == {"unreadable image": 1}
    (tmp_path / "pairs.csv").write_text("file,text\nx.png,\"an x, in csv\"\ny.png,a y\n")
    src = sources.make_source({"kind": "captions", "path": str(tmp_path / "pairs.csv"),
                               "path_key": "file", "caption_key": "text"})
    assert [(i, c) for i, _, c in src] == [(0, "an x, in csv"), (1, "a y")]
    with pytest.raises(KeyError, match="no column"):
        sources.CaptionFileSource(str(tmp_path / "pairs.csv"))


def test_raw_items_number_examples_and_skips(tmp_path):
    rng = np.random.default_rng(2)
    rows = [{"path": "x.png", "caption": "an x", "id": 10},
            {"path": "missing.png", "caption": "gone", "id": 11},
            {"path": "y.png", "caption": "a y", "id": 12}]
    for name in ("x.png", "y.png"):
        _png(tmp_path / name, rng.integers(0, 255, (5, 7, 3), dtype=np.uint8))
    with open(tmp_path / "pairs.jsonl", "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)
    # None-valued keys (config placeholders) are dropped before the constructor sees them.
    config = {"kind": "captions", "path": str(tmp_path / "pairs.jsonl"), "id_key": "id",
              "root": None}
    items = list(sources.raw_items(sources.source_from_config(config)))
    assert [(r.position, r.example is None, r.skip_reason) for r in items] == [
        (0, False, None), (1, True, "unreadable image"), (2, False, None)]
    assert [r.example[0] for r in items if r.example is not None] == [10, 12]
    stopped = sources.raw_items(sources.source_from_config(config), stop=2)
    assert [r.position for r in stopped] == [0, 1]
    identity = sources.source_identity(config, 16)
    assert identity.endswith("@16px") and '"root"' not in identity
    image = items[0].example[1]
    assert sources.prepare_image(image, 4).shape == (4, 4, 3)
    np.testing.assert_array_equal(sources.prepare_image(image, None), image)


def test_tfds_source_local(tmp_path, monkeypatch):
    tfds = pytest.importorskip("tensorflow_datasets")
    try:
        import importlib_resources  # noqa: F401  pylint: disable=g-import-not-at-top,unused-import
    except ImportError:
        # TFDS 4.9's download_and_prepare imports the `importlib_resources` backport, which it
        # does not declare; the standard library's module offers what it uses.
        monkeypatch.setitem(sys.modules, "importlib_resources", importlib.resources)

    class ImageragTinyCaptions(tfds.core.GeneratorBasedBuilder):
        """Five captioned images, generated locally."""

        VERSION = tfds.core.Version("1.0.0")

        def _info(self):
            return self.dataset_info_from_configs(features=tfds.features.FeaturesDict({
                "image": tfds.features.Image(shape=(None, None, 3)),
                "caption": tfds.features.Text(),
                "key": np.int64,
            }))

        def _split_generators(self, dl_manager):
            return {"train": self._generate_examples()}

        def _generate_examples(self):
            for i in range(5):
                img = np.full((6 + i, 7, 3), 40 * i, np.uint8)
                yield i, {"image": img, "caption": f"tiny image {i}", "key": 100 + i}

    ImageragTinyCaptions(data_dir=str(tmp_path)).download_and_prepare()
    src = sources.TFDSSource("imagerag_tiny_captions", "train", str(tmp_path), id_key="key")
    examples = sorted(src)
    assert len(src) == 5 and len(examples) == 5
    for i, (example_id, image, caption) in enumerate(examples):
        assert example_id == 100 + i and caption == f"tiny image {i}"
        assert image.shape == (6 + i, 7, 3) and (image == 40 * i).all()
    assert sources.make_source({"kind": "tfds", "name": "imagerag_tiny_captions",
                                "split": "train", "data_dir": str(tmp_path),
                                "image_size": 4}).__iter__().__next__()[1].shape == (4, 4, 3)
