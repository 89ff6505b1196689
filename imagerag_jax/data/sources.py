"""Image-text sources: iterables of (example_id, image uint8 [H, W, 3], caption).

    FolderSource(root)                      images with same-named .txt captions
    CaptionFileSource("pairs.jsonl")        JSONL or CSV rows of (path, caption[, id])
    TFDSSource("coco_captions", "train", data_dir=..., image_key="image", caption_key="captions/text")
    DigitsSource("train")                   scikit-learn's bundled digits, upsampled, captioned
    img2dataset.WebDatasetSource("*.tar")   img2dataset's webdataset shards, filtered by metadata
    PromptListSource("prompts.parquet")     prompts only (no images), for teacher synthesis

Ids are stable int64s: the source's own id column where there is one, else the position in a
deterministic order (sorted paths, file order, TFDS split order; the original index for digits).
Unreadable images are skipped, logged and counted in `source.skipped` (a `SkipCounter`), never
silently dropped. All sources optionally center-crop and resize to `image_size` (square).

The offline jobs build a source from their config with `source_from_config` and walk it with
`raw_items`, which numbers every raw item (an example or a skip) so that a source splits into
position ranges that do not depend on which images are readable: `position_bounds` cuts them,
`host_ranges` deals them to the processes and `RawCursor` walks them (precompute's shards and
build_db's parts).
"""

from __future__ import annotations

import abc
import collections
import csv
import functools
import io
import json
import logging
import os
import re
from collections.abc import Iterator, Mapping, Sequence
from typing import Any, NamedTuple

import numpy as np

from imagerag_jax import config_args, jsonfiles
from imagerag_jax.errors import UserError

Example = tuple[int, np.ndarray | None, str]  # None: a prompt-only source
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff")


class SkipCounter:
    """Counts skipped items by reason, logs each skip and keeps a few examples per reason."""

    def __init__(self, name: str, keep: int = 5):
        self.name = name
        self.counts: collections.Counter[str] = collections.Counter()
        self.examples: dict[str, list[str]] = collections.defaultdict(list)
        self._keep = keep

    def skip(self, item: str, reason: str, error: Exception | None = None) -> None:
        """Records one skipped item."""
        self.counts[reason] += 1
        if len(self.examples[reason]) < self._keep:
            self.examples[reason].append(item)
        logging.warning("%s: skipping %s (%s%s)", self.name, item, reason,
                        f": {error}" if error is not None else "")

    @property
    def total(self) -> int:
        """Number of skipped items."""
        return sum(self.counts.values())

    def as_dict(self) -> dict[str, int]:
        """Counts by reason (for manifests)."""
        return dict(self.counts)

    def __repr__(self) -> str:
        return f"SkipCounter({self.name!r}, {dict(self.counts)})"


def to_rgb_uint8(image: Any) -> np.ndarray:
    """A PIL image or array (gray, RGB, RGBA, palette) as uint8 [H, W, 3]."""
    from PIL import Image  # pylint: disable=g-import-not-at-top
    if isinstance(image, Image.Image):
        if image.mode == "P":  # palettes may carry transparency; go through RGBA
            image = image.convert("RGBA")
        return np.asarray(image.convert("RGB"), np.uint8)
    arr = np.asarray(image)
    if arr.ndim == 2:
        arr = arr[..., None]
    if arr.ndim != 3 or arr.shape[-1] not in (1, 3, 4):
        raise ValueError(f"not an image array: shape {arr.shape}")
    if arr.dtype != np.uint8:
        raise ValueError(f"expected uint8 pixels, got {arr.dtype}")
    if arr.shape[-1] == 1:
        arr = np.repeat(arr, 3, axis=-1)
    return np.ascontiguousarray(arr[..., :3])


def decode_image(data: bytes) -> np.ndarray:
    """Encoded image bytes (PNG, JPEG, ...) -> uint8 [H, W, 3]; raises on corrupt data."""
    from PIL import Image  # pylint: disable=g-import-not-at-top
    with Image.open(io.BytesIO(data)) as im:
        im.load()  # forces a full decode so that truncated files fail here
        return to_rgb_uint8(im)


def read_image_file(path: str) -> np.ndarray:
    """Reads and decodes an image file -> uint8 [H, W, 3]."""
    with open(path, "rb") as f:
        return decode_image(f.read())


def center_crop_resize(image: np.ndarray, size: int) -> np.ndarray:
    """Center-crops to a square and resizes to size x size (bicubic, antialiased)."""
    from PIL import Image  # pylint: disable=g-import-not-at-top
    h, w = image.shape[:2]
    s = min(h, w)
    top, left = (h - s) // 2, (w - s) // 2
    crop = image[top:top + s, left:left + s]
    if s == size:
        return np.ascontiguousarray(crop)
    return np.asarray(Image.fromarray(crop).resize((size, size), Image.BICUBIC), np.uint8)


class Source(abc.ABC):
    """Iterable of (example_id, image, caption); `skipped` counts what could not be read."""

    has_images = True  # False: prompts only (image None), for teacher synthesis

    def __init__(self, name: str, image_size: int | None = None):
        self.skipped = SkipCounter(name)
        self.image_size = image_size

    @abc.abstractmethod
    def __iter__(self) -> Iterator[Example]:
        """Yields (example_id, uint8 [H, W, 3], caption)."""

    def _finish(self, image: np.ndarray) -> np.ndarray:
        return image if self.image_size is None else center_crop_resize(image, self.image_size)

    def _read(self, item: str, load: Any) -> np.ndarray | None:
        """Runs `load()` (returns an image); None and a counted skip if it fails."""
        try:
            return self._finish(load())
        except Exception as e:  # pylint: disable=broad-except
            self.skipped.skip(item, "unreadable image", e)
            return None


class FolderSource(Source):
    """Images under `root` (recursively) with captions in same-named `.txt` files."""

    def __init__(self, root: str, *, extensions: Sequence[str] = IMAGE_EXTENSIONS,
                 recursive: bool = True, image_size: int | None = None):
        super().__init__(f"FolderSource({root})", image_size)
        self.root = root
        if not os.path.isdir(root):
            raise FileNotFoundError(f"image folder {root!r} does not exist")
        exts = tuple(e.lower() for e in extensions)
        paths = []
        for dirpath, dirnames, filenames in os.walk(root):
            dirnames.sort()
            paths += [os.path.relpath(os.path.join(dirpath, f), root)
                      for f in filenames if f.lower().endswith(exts)]
            if not recursive:
                break
        # Sorted relative paths define the ids: stable for a fixed set of files.
        self.paths = sorted(paths)

    def __len__(self) -> int:
        return len(self.paths)

    def __iter__(self) -> Iterator[Example]:
        for i, rel in enumerate(self.paths):
            path = os.path.join(self.root, rel)
            txt = os.path.splitext(path)[0] + ".txt"
            if not os.path.exists(txt):
                self.skipped.skip(path, "missing caption")
                continue
            with open(txt, encoding="utf-8") as f:
                caption = f.read().strip()
            image = self._read(path, lambda p=path: read_image_file(p))
            if image is not None:
                yield i, image, caption


class CaptionFileSource(Source):
    """Rows of a JSONL or CSV file naming an image path and its caption (optionally an id).

    Relative paths are resolved against `root` (default: the file's directory).
    """

    def __init__(self, path: str, *, root: str | None = None, path_key: str = "path",
                 caption_key: str = "caption", id_key: str | None = None,
                 image_size: int | None = None):
        super().__init__(f"CaptionFileSource({path})", image_size)
        self.path, self.path_key, self.caption_key, self.id_key = path, path_key, caption_key, id_key
        self.root = root if root is not None else os.path.dirname(os.path.abspath(path))
        self.rows = self._load_rows()

    def _load_rows(self) -> list[Mapping[str, Any]]:
        with open(self.path, encoding="utf-8", newline="") as f:
            if self.path.endswith((".jsonl", ".json")):
                rows = [json.loads(line) for line in f if line.strip()]
            elif self.path.endswith((".csv", ".tsv")):
                rows = list(csv.DictReader(f, delimiter="\t" if self.path.endswith(".tsv") else ","))
            else:
                raise UserError(f"{self.path}: expected .jsonl, .csv or .tsv")
        for key in filter(None, (self.path_key, self.caption_key, self.id_key)):
            if rows and key not in rows[0]:
                raise KeyError(f"{self.path}: no column {key!r} (have {sorted(rows[0])})")
        return rows

    def __len__(self) -> int:
        return len(self.rows)

    def __iter__(self) -> Iterator[Example]:
        for i, row in enumerate(self.rows):
            path = os.path.join(self.root, str(row[self.path_key]))
            example_id = int(row[self.id_key]) if self.id_key else i
            image = self._read(path, lambda p=path: read_image_file(p))
            if image is not None:
                yield example_id, image, str(row[self.caption_key]).strip()


class PromptListSource(Source):
    """Prompts without images, for teacher synthesis: .txt (a prompt per line), .jsonl, .csv, .parquet.

    Yields (id, None, prompt): the id is the `id_key` column where given, else the row's
    position. Rows are streamed (parquet by record batch via pyarrow); an empty prompt is skipped
    and counted ('empty prompt').
    """

    has_images = False

    def __init__(self, path: str, *, caption_key: str = "caption", id_key: str | None = None):
        super().__init__(f"PromptListSource({path})")
        if not path.endswith((".txt", ".jsonl", ".csv", ".parquet")):
            raise UserError(f"{path}: a prompt list is .txt, .jsonl, .csv or .parquet")
        if not os.path.isfile(path):
            raise FileNotFoundError(f"{path}: no such prompt list")
        self.path, self.caption_key, self.id_key = path, caption_key, id_key
        self._len: int | None = None

    def _rows(self) -> Iterator[Mapping[str, Any]]:
        """The file's rows as mappings, streamed."""
        if self.path.endswith(".parquet"):
            import pyarrow.parquet as pq  # pylint: disable=g-import-not-at-top

            f = pq.ParquetFile(self.path)
            columns = [c for c in (self.caption_key, self.id_key) if c]
            missing = [c for c in columns if c not in f.schema_arrow.names]
            if missing:
                raise KeyError(f"{self.path}: no column {missing[0]!r} (have {f.schema_arrow.names})")
            for batch in f.iter_batches(columns=columns, batch_size=4096):
                yield from batch.to_pylist()
            return
        with open(self.path, encoding="utf-8", newline="") as f:
            if self.path.endswith(".txt"):
                yield from ({self.caption_key: line.rstrip("\n")} for line in f)
                return
            rows = (json.loads(line) for line in f if line.strip()) if self.path.endswith(".jsonl") \
                else csv.DictReader(f)
            for row in rows:
                for key in filter(None, (self.caption_key, self.id_key)):
                    if key not in row:
                        raise KeyError(f"{self.path}: no column {key!r} (have {sorted(row)})")
                yield row

    def __len__(self) -> int:
        if self._len is None:
            if self.path.endswith(".parquet"):
                import pyarrow.parquet as pq  # pylint: disable=g-import-not-at-top

                self._len = pq.ParquetFile(self.path).metadata.num_rows
            else:
                self._len = sum(1 for _ in self._rows())
        return self._len

    def __iter__(self) -> Iterator[Example]:
        for i, row in enumerate(self._rows()):
            prompt = str(row.get(self.caption_key) or "").strip()
            if not prompt:
                self.skipped.skip(f"{self.path}:{i}", "empty prompt")
                continue
            yield (int(row[self.id_key]) if self.id_key else i), None, prompt


def _get_path(features: Mapping[str, Any], key: str) -> Any:
    """features["a/b"] -> features["a"]["b"] (TFDS nests features)."""
    value: Any = features
    for part in key.split("/"):
        value = value[part]
    return value


class TFDSSource(Source):
    """A TFDS dataset already prepared under `data_dir` (nothing is downloaded).

    `caption_key` may name a nested feature ("captions/text"); a list of captions yields
    element `caption_index`. Images are decoded here (not by TFDS) so that corrupt ones are
    skipped and counted instead of stopping the job.
    """

    def __init__(self, name: str, split: str, data_dir: str, *, image_key: str = "image",
                 caption_key: str = "caption", id_key: str | None = None,
                 caption_index: int = 0, image_size: int | None = None):
        super().__init__(f"TFDSSource({name}:{split})", image_size)
        import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
        self.name, self.split, self.data_dir = name, split, data_dir
        self.image_key, self.caption_key, self.id_key = image_key, caption_key, id_key
        self.caption_index = caption_index
        # Unregistered names are found as prepared datasets in data_dir (read-only builder).
        self.builder = tfds.builder(name, data_dir=data_dir)
        self.builder.info.splits[split]  # pylint: disable=pointless-statement  # fails early

    def __len__(self) -> int:
        return self.builder.info.splits[self.split].num_examples

    def __iter__(self) -> Iterator[Example]:
        import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
        decoders = {self.image_key: tfds.decode.SkipDecoding()}
        ds = self.builder.as_dataset(split=self.split, shuffle_files=False, decoders=decoders,
                                     read_config=tfds.ReadConfig(add_tfds_id=True))
        for i, ex in enumerate(tfds.as_numpy(ds)):
            caption = _get_path(ex, self.caption_key)
            if isinstance(caption, np.ndarray):
                if caption.size <= self.caption_index:
                    self.skipped.skip(str(ex.get("tfds_id", i)), "no caption")
                    continue
                caption = caption.reshape(-1)[self.caption_index]
            if isinstance(caption, bytes):
                caption = caption.decode("utf-8")
            example_id = int(_get_path(ex, self.id_key)) if self.id_key else i
            raw = _get_path(ex, self.image_key)
            image = self._read(str(ex.get("tfds_id", i)), lambda r=raw: decode_image(r))
            if image is not None:
                yield example_id, image, str(caption).strip()


# --- scikit-learn's bundled digits ------------------------------------------------------------

DIGIT_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
DIGIT_TEMPLATES = (
    "a handwritten digit {word}",
    "the number {num} written by hand",
    "a handwritten {word}",
    "the digit {word}, written by hand",
    "a hand-drawn number {word}",
    "digit {num} in handwriting",
    "an image of the handwritten number {word}",
    "a scribbled {word}",
)
DIGITS_SPLITS = {"train": 0.5, "eval": 0.1, "database": 0.4}


@functools.lru_cache(maxsize=1)
def load_digits() -> tuple[np.ndarray, np.ndarray]:
    """(images [1797, 8, 8] in 0..16, labels [1797]) from scikit-learn's bundled copy."""
    from sklearn import datasets  # pylint: disable=g-import-not-at-top
    digits = datasets.load_digits()
    return digits.images, digits.target.astype(np.int64)


def digit_caption(label: int, variant: int) -> str:
    """Caption `variant` (mod the number of templates) naming digit `label`."""
    template = DIGIT_TEMPLATES[variant % len(DIGIT_TEMPLATES)]
    return template.format(word=DIGIT_WORDS[label], num=label)


def caption_digit(caption: str) -> int | None:
    """The digit a caption names (word or numeral); None if it names none or several."""
    found = {DIGIT_WORDS.index(w) for w in re.findall(r"[a-z]+", caption.lower())
             if w in DIGIT_WORDS}
    found |= {int(n) for n in re.findall(r"(?<![0-9])[0-9](?![0-9])", caption)}
    return found.pop() if len(found) == 1 else None


def digits_split_indices(seed: int = 0,
                         fractions: Mapping[str, float] = DIGITS_SPLITS) -> dict[str, np.ndarray]:
    """Deterministic, disjoint, covering, per-class stratified splits of the 1797 digits."""
    labels = load_digits()[1]
    total = sum(fractions.values())
    names = list(fractions)
    out: dict[str, list[int]] = {n: [] for n in names}
    rng = np.random.default_rng(seed)
    for c in range(10):
        idx = rng.permutation(np.nonzero(labels == c)[0])
        bounds = np.round(np.cumsum([fractions[n] for n in names]) / total * len(idx)).astype(int)
        for name, lo, hi in zip(names, np.concatenate([[0], bounds[:-1]]), bounds):
            out[name].extend(idx[lo:hi].tolist())
    return {n: np.sort(np.asarray(v, np.int64)) for n, v in out.items()}


class DigitsSource(Source):
    """scikit-learn's bundled 8x8 digits, upsampled to size x size RGB, with varied captions.

    White ink on black like the originals. Ids are the indices into `load_digits()`, so splits
    ("train", "eval", "database", or "all") share one id space and are disjoint.
    """

    def __init__(self, split: str = "train", *, size: int = 32, seed: int = 0,
                 fractions: Mapping[str, float] = DIGITS_SPLITS):
        super().__init__(f"DigitsSource({split})", None)
        self.split, self.size, self.seed = split, size, seed
        self._images8, self.all_labels = load_digits()
        if split == "all":
            self.ids = np.arange(len(self.all_labels), dtype=np.int64)
        else:
            splits = digits_split_indices(seed, fractions)
            if split not in splits:
                raise UserError(f"unknown digits split {split!r}; have {sorted(splits)} or 'all'")
            self.ids = splits[split]

    def __len__(self) -> int:
        return len(self.ids)

    @property
    def labels(self) -> np.ndarray:
        """Digit labels in iteration order."""
        return self.all_labels[self.ids]

    def label_of(self, example_id: int) -> int:
        """The digit of an example id."""
        return int(self.all_labels[example_id])

    def image(self, example_id: int) -> np.ndarray:
        """The upsampled uint8 [size, size, 3] image of an id."""
        from PIL import Image  # pylint: disable=g-import-not-at-top
        img8 = np.round(self._images8[example_id] * (255.0 / 16.0)).astype(np.uint8)
        big = np.asarray(Image.fromarray(img8).resize((self.size, self.size), Image.BILINEAR))
        return np.repeat(big[..., None], 3, axis=-1)

    def caption(self, example_id: int) -> str:
        """The caption of an id (template chosen deterministically from the seed and the id)."""
        variant = int(np.random.default_rng([self.seed, int(example_id)]).integers(1 << 30))
        return digit_caption(self.label_of(example_id), variant)

    def __iter__(self) -> Iterator[Example]:
        for i in self.ids:
            yield int(i), self.image(i), self.caption(i)


def make_source(config: Mapping[str, Any] | Any) -> Source:
    """A source from a config dict / ConfigDict: {"kind": "folder"|"captions"|"tfds"|"digits"|
    "webdataset"|"parquet"|"prompts"|"package.module:Class", ...}.

    The remaining keys are the constructor's arguments, e.g.
    {"kind": "tfds", "name": "coco_captions", "split": "train", "data_dir": "/data/tfds",
     "caption_key": "captions/text"}.
    """
    from imagerag_jax.data.img2dataset import ParquetSource, WebDatasetSource  # they build on this module

    cfg = dict(config.to_dict() if hasattr(config, "to_dict") else config)
    kind = cfg.pop("kind")
    kinds = {"folder": FolderSource, "captions": CaptionFileSource, "tfds": TFDSSource,
             "digits": DigitsSource, "webdataset": WebDatasetSource, "parquet": ParquetSource,
             "prompts": PromptListSource}
    if ":" in str(kind):  # "package.module:Class": a Source subclass defined outside this module
        return _import_source(kind)(**cfg)
    if kind not in kinds:
        raise UserError(f"unknown source kind {kind!r}; expected one of {sorted(kinds)}")
    return kinds[kind](**cfg)


def _import_source(kind: str) -> type:
    """The Source subclass a "package.module:Class" kind names (e.g. your own dataset's reader)."""
    import importlib  # pylint: disable=g-import-not-at-top

    module, _, name = kind.partition(":")
    try:
        cls = getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError) as e:
        raise UserError(f"source kind {kind!r}: cannot import {name} from {module} ({e})") from e
    if not (isinstance(cls, type) and issubclass(cls, Source)):
        raise UserError(f"source kind {kind!r} is not a data.sources.Source subclass")
    return cls


# --- sources from job configs -----------------------------------------------------------------


def source_from_config(source_config: Any) -> Source:
    """A source from a job config (None-valued keys dropped: configs may carry placeholders)."""
    return make_source(config_args.plain(source_config))


def source_identity(source_config: Any, image_size: int | None) -> str:
    """Stable identity string of a source config plus the image size (recorded in manifests)."""
    return f"{jsonfiles.canonical(config_args.plain(source_config))}@{image_size}px"


def prepare_image(image: np.ndarray, size: int | None) -> np.ndarray:
    """uint8 [H, W, 3] centre-cropped and resized to size x size (unchanged when already so)."""
    if size is None or image.shape[:2] == (size, size):
        return np.ascontiguousarray(image, np.uint8)
    return center_crop_resize(image, size)


class RawItem(NamedTuple):
    """One raw item of a source: an example, or the reason it was skipped."""

    position: int
    example: Example | None
    skip_reason: str | None


def raw_items(source: Source, stop: int | None = None) -> Iterator[RawItem]:
    """Yields every raw item of `source` with its position: examples and skips, in order.

    Every raw item of a source is either yielded or skipped exactly once, so position = yielded +
    skipped so far; it does not depend on which images are readable.
    """
    reasons: list[str] = []
    counter = source.skipped
    original_skip = counter.skip

    def recording_skip(item: str, reason: str, error: Exception | None = None) -> None:
        reasons.append(reason)
        original_skip(item, reason, error)

    counter.skip = recording_skip  # instance attribute: only this source object is affected
    position = 0
    it = iter(source)
    try:
        while stop is None or position < stop:
            example = next(it, None)
            for reason in reasons:
                if stop is not None and position >= stop:
                    return
                yield RawItem(position, None, reason)
                position += 1
            reasons.clear()
            if example is None or (stop is not None and position >= stop):
                return
            yield RawItem(position, example, None)
            position += 1
    finally:
        counter.skip = original_skip


# --- splitting a source between hosts by raw position ----------------------------------------


def position_bounds(num_items: int, num_ranges: int) -> list[int]:
    """Raw-position boundaries: range i holds [bounds[i], bounds[i + 1]) = [floor(i N / n), ...)."""
    return [i * num_items // num_ranges for i in range(num_ranges + 1)]


def host_ranges(num_ranges: int, process_index: int, process_count: int) -> list[int]:
    """Range indices owned by one process: p, p + P, ... (strided, like the input pipeline's files)."""
    if not 0 <= process_index < process_count:
        raise ValueError(f"process_index {process_index} not in [0, {process_count})")
    return list(range(process_index, num_ranges, process_count))


class RawCursor:
    """Consumes a raw-item stream range by range (items past a range wait for the next call)."""

    def __init__(self, items: Iterator[RawItem]):
        self._it, self._pending = items, None

    def until(self, end: int) -> Iterator[RawItem]:
        """The items before raw position `end`; the first one at or past it is kept for later."""
        while True:
            item = self._pending if self._pending is not None else next(self._it, None)
            self._pending = None
            if item is None:
                return
            if item.position >= end:
                self._pending = item
                return
            yield item
