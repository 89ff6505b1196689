"""The compositional miniature's data: two tinted handwritten digits side by side, bound by captions.

A composition is (left digit, left colour, right digit, right colour): 10 x 4 x 10 x 4 = 1,600.
A canvas is S x S RGB on black (square, as every production job expects): each half, S x S/2,
one of scikit-learn's 8x8 digits stretched to fill it and tinted with its colour. Captions name both digits, colours and sides in varied wording and
order, so that a model must bind each colour to its digit and each digit to its side.

Everything is a function of the seed:
* digit *images* are divided by `sources.digits_split_indices` (train / database / eval pools,
  disjoint), so no digit image appears in two splits;
* compositions are ranked by a seeded permutation into frequency classes: 'frequent' (a few,
  most of the training canvases), 'rare' (many, a few canvases each) and 'unseen' (none in
  training); with `novel_digits`, every composition holding one of those digits is 'novel': in
  the database only, and (compose_run) never shown to the UNet towers, a concept only retrieval
  can supply;
* the database holds every composition; the evaluation prompts are stratified over the classes.

The judge (`judge`, `score`) reads each half: the digit with the digits miniature's CNN on the
half made white, the colour from the pixels.
"""

from __future__ import annotations

import dataclasses
import functools
import re
from typing import Any, NamedTuple

import numpy as np

from imagerag_jax.data import sources

COLOURS = ("red", "green", "blue", "yellow")
PALETTE = np.array([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.35, 1.0], [1.0, 1.0, 0.0]], np.float32)
NUM_COMPOSITIONS = 10 * len(COLOURS) * 10 * len(COLOURS)
CLASSES = ("frequent", "rare", "unseen", "novel")
# Both digit forms appear in captions: the numeral ("3") or the word ("three").
TEMPLATES = (
    "a {lc} {ld} to the left of a {rc} {rd}",
    "a {rc} {rd} to the right of a {lc} {ld}",
    "{lc} {ld} on the left, {rc} {rd} on the right",
    "{rc} {rd} on the right, {lc} {ld} on the left",
    "on the left a {lc} {ld}, on the right a {rc} {rd}",
    "a {lc} {ld} and a {rc} {rd}, from left to right",
)


class Composition(NamedTuple):
    """Digit and colour index of each side."""

    left_digit: int
    left_colour: int
    right_digit: int
    right_colour: int

    @property
    def index(self) -> int:
        """A dense id in [0, NUM_COMPOSITIONS)."""
        c = len(COLOURS)
        return ((self.left_digit * c + self.left_colour) * 10 + self.right_digit) * c + self.right_colour

    @classmethod
    def from_index(cls, index: int) -> Composition:
        """Inverse of `index`."""
        c = len(COLOURS)
        rest, rc = divmod(int(index), c)
        rest, rd = divmod(rest, 10)
        ld, lc = divmod(rest, c)
        return cls(ld, lc, rd, rc)


def side_labels(compositions: np.ndarray) -> np.ndarray:
    """[N, 2] int: what stands on each side (digit * colours + colour), left then right."""
    n = len(COLOURS)
    comps = [Composition.from_index(int(i)) for i in compositions]
    return np.array([[c.left_digit * n + c.left_colour, c.right_digit * n + c.right_colour]
                     for c in comps], np.int64).reshape(len(comps), 2)


def caption(comp: Composition, variant: int) -> str:
    """Caption `variant` of a composition (template and numeral/word forms from the variant)."""
    template = TEMPLATES[variant % len(TEMPLATES)]
    forms = variant // len(TEMPLATES)
    word = lambda d, bit: sources.DIGIT_WORDS[d] if (forms >> bit) & 1 else str(d)
    return template.format(lc=COLOURS[comp.left_colour], ld=word(comp.left_digit, 0),
                           rc=COLOURS[comp.right_colour], rd=word(comp.right_digit, 1))


_TOKEN = re.compile(r"[a-z]+|[0-9]")


def parse_caption(text: str) -> Composition | None:
    """The composition a caption of `TEMPLATES` names (None for anything else)."""
    tokens = _TOKEN.findall(text.lower())
    pairs = []  # (colour, digit) in caption order
    for a, b in zip(tokens, tokens[1:]):
        if a in COLOURS and (b.isdigit() or b in sources.DIGIT_WORDS):
            pairs.append((COLOURS.index(a), int(b) if b.isdigit() else sources.DIGIT_WORDS.index(b)))
    if len(pairs) != 2:
        return None
    (c1, d1), (c2, d2) = pairs
    # In every template the first side word ("left"/"right") is the side of the first pair.
    side = next(t for t in tokens if t in ("left", "right"))
    if side == "right":
        return Composition(d2, c2, d1, c1)
    return Composition(d1, c1, d2, c2)


def has_digit(compositions: np.ndarray, digits: tuple[int, ...]) -> np.ndarray:
    """[N] bool: the composition holds one of `digits` on either side."""
    comps = [Composition.from_index(int(i)) for i in np.asarray(compositions).reshape(-1)]
    return np.array([c.left_digit in digits or c.right_digit in digits for c in comps], bool)


def blind_digits(config: Any) -> tuple[int, ...]:
    """A run's digits that its training split holds and its UNet towers never see (`blind=D`)."""
    return tuple(int(d) for d in config.teacher.get("blind_digits", ()))


def mixture_sets(config: Any) -> tuple[dict[str, float], list[str]]:
    """The mixture's weights by set name, and the sets to precompute (a weight-0 set is not)."""
    weights = {n: float(w) for n, w in dict(config.mixture).items()}
    unknown = sorted(set(weights) - {"teacher", "real"})
    if unknown or any(w < 0 for w in weights.values()) or not any(weights.values()):
        raise ValueError(f"config.mixture {weights}: weights >= 0, not all 0, for 'teacher' and "
                         f"'real' only{f' (unknown: {unknown})' if unknown else ''}")
    needed = [n for n in ("teacher", "real")
              if weights.get(n, 0.0) != 0.0 or (n == "teacher" and config.teacher_only_ablation)]
    return weights, needed


@functools.lru_cache(maxsize=4)
def frequency_classes(seed: int, frequent: int = 40, unseen: int = 400,
                      novel_digits: tuple[int, ...] = ()) -> np.ndarray:
    """Class (0 frequent, 1 rare, 2 unseen, 3 novel) of each composition index.

    Novel: holds one of `novel_digits`. The others are ranked by a seeded permutation (the same
    with or without novel digits): the first `frequent` are frequent, the last `unseen` unseen.
    """
    if not set(novel_digits) <= set(range(10)) or len(set(novel_digits)) >= 9:
        raise ValueError(f"novel_digits={novel_digits}: distinct digits 0-9, at most 8 of them")
    order = np.random.default_rng([seed, 7]).permutation(NUM_COMPOSITIONS)
    novel = has_digit(np.arange(NUM_COMPOSITIONS), tuple(novel_digits))
    order = order[~novel[order]]
    if frequent + unseen > len(order):
        raise ValueError(f"{frequent} frequent + {unseen} unseen compositions, but only {len(order)} "
                         f"hold no novel digit {tuple(novel_digits)}")
    classes = np.full(NUM_COMPOSITIONS, 3, np.int64)
    classes[order] = 1
    classes[order[:frequent]] = 0
    classes[order[len(order) - unseen:]] = 2
    return classes


def tint(digit: np.ndarray, colour: int, size: int) -> np.ndarray:
    """An 8x8 digit (0..16) stretched to a size x size/2 half and tinted: float32 RGB in [0, 1]."""
    if size % 16:
        raise ValueError(f"canvas size {size} must be a multiple of 16 (two 8x8 digits side by side)")
    x = np.clip(digit.astype(np.float32) / 16.0, 0.0, 1.0)
    x = np.kron(x, np.ones((size // 8, size // 16), np.float32))
    return x[..., None] * PALETTE[colour]


def canvas(left: np.ndarray, right: np.ndarray, comp: Composition, size: int = 16) -> np.ndarray:
    """uint8 [size, size, 3]: the two 8x8 digits tinted and placed left and right on black."""
    halves = [tint(left, comp.left_colour, size), tint(right, comp.right_colour, size)]
    return np.round(np.concatenate(halves, axis=1) * 255.0).astype(np.uint8)


def as_float(images: np.ndarray) -> np.ndarray:
    """uint8 canvases -> float32 in [-1, 1] (the towers' input)."""
    return images.astype(np.float32) / 127.5 - 1.0


def digit_halves(ids: np.ndarray, size: int = 16) -> np.ndarray:
    """uint8 [N, size, size/2, 3]: digit images as white canvas halves (the judge's training input)."""
    digits, _ = sources.load_digits()
    return np.stack([np.round(np.repeat(tint(digits[int(i)], 0, size)[..., :1], 3, -1) * 255.0)
                     for i in ids]).astype(np.uint8)


def colour_of(half: np.ndarray) -> int:
    """The palette colour of a half canvas (uint8 or [-1, 1] float), -1 when nothing is drawn."""
    x = half.astype(np.float32)
    x = x / 255.0 if half.dtype == np.uint8 else (x + 1.0) / 2.0
    ink = x.max(-1) > 0.3
    if not ink.any():
        return -1
    mean = x[ink].mean(0)
    mean = mean / max(float(mean.max()), 1e-6)
    return int(np.argmin(((PALETTE - mean) ** 2).sum(-1)))


@dataclasses.dataclass(frozen=True)
class ComposeSplit:
    """One split in memory: canvases uint8 [N, S, 2S, 3], compositions, captions, classes."""

    images: np.ndarray
    compositions: np.ndarray  # [N] composition indices
    left_ids: np.ndarray  # [N] digit-image ids (sklearn indices) on each side
    right_ids: np.ndarray
    captions: tuple[str, ...]
    classes: np.ndarray  # [N] frequency class of each canvas's composition

    def __len__(self) -> int:
        return len(self.captions)


def _pools(seed: int) -> dict[str, dict[int, np.ndarray]]:
    """Digit-image ids of each split, per digit."""
    _, labels = sources.load_digits()
    return {name: {d: idx[labels[idx] == d] for d in range(10)}
            for name, idx in sources.digits_split_indices(seed).items()}


def _make(comps: np.ndarray, pool: dict[int, np.ndarray], rng: np.random.Generator, size: int,
          classes: np.ndarray) -> ComposeSplit:
    """Canvases of the given compositions, each side a random digit image of the pool."""
    digits, _ = sources.load_digits()
    images, lefts, rights, caps = [], [], [], []
    for index in comps:
        comp = Composition.from_index(int(index))
        left = int(rng.choice(pool[comp.left_digit]))
        right = int(rng.choice(pool[comp.right_digit]))
        images.append(canvas(digits[left], digits[right], comp, size))
        lefts.append(left)
        rights.append(right)
        caps.append(caption(comp, int(rng.integers(1 << 30))))
    return ComposeSplit(np.stack(images), np.asarray(comps, np.int64), np.asarray(lefts, np.int64),
                        np.asarray(rights, np.int64), tuple(caps), classes[np.asarray(comps, np.int64)])


def make_splits(seed: int = 0, *, novel_digits=(), **kw) -> dict[str, ComposeSplit]:
    """`_make_splits` (cached) with the novel digits as a sorted tuple, however they were given."""
    return _make_splits(seed, novel_digits=tuple(sorted(int(d) for d in novel_digits)), **kw)


@functools.lru_cache(maxsize=4)
def _make_splits(seed: int = 0, *, size: int = 16, train: int = 4000, frequent_share: float = 0.6,
                 database_per_composition: int = 2, eval_per_class: int = 60,
                 frequent: int = 40, unseen: int = 400, novel_digits: tuple[int, ...] = ()
                 ) -> dict[str, ComposeSplit]:
    """'train' (long-tailed, no unseen or novel composition), 'database' (every composition), 'eval'.

    `frequent_share` of the training canvases spread over the `frequent` compositions, the rest
    uniformly over the rare ones; the eval split holds `eval_per_class` distinct compositions of
    each class (none of 'novel' without `novel_digits`), drawn from the eval digit pool.
    """
    classes = frequency_classes(seed, frequent, unseen, novel_digits)
    pools = _pools(seed)
    rng = np.random.default_rng([seed, 11])
    by_class = [np.nonzero(classes == c)[0] for c in range(len(CLASSES))]
    n_freq = int(round(train * frequent_share))
    train_comps = np.concatenate([rng.choice(by_class[0], n_freq),
                                  rng.choice(by_class[1], train - n_freq)])
    rng.shuffle(train_comps)
    db_comps = np.repeat(np.arange(NUM_COMPOSITIONS), database_per_composition)
    eval_comps = np.concatenate([rng.choice(c, min(eval_per_class, len(c)), replace=False)
                                 for c in by_class])
    return {"train": _make(train_comps, pools["train"], np.random.default_rng([seed, 1]), size, classes),
            "database": _make(db_comps, pools["database"], np.random.default_rng([seed, 2]), size, classes),
            "eval": _make(eval_comps, pools["eval"], np.random.default_rng([seed, 3]), size, classes)}


SPLIT_ID_OFFSET = {"train": 0, "database": 1_000_000, "eval": 2_000_000}
NUM_VARIANTS = 4 * len(TEMPLATES)  # template x (numeral|word) on each side


def all_captions() -> list[list[str]]:
    """Every wording of every composition, by composition index (a `stages.CaptionTable`'s input)."""
    return [[caption(Composition.from_index(i), v) for v in range(NUM_VARIANTS)]
            for i in range(NUM_COMPOSITIONS)]


class ComposeSource(sources.Source):
    """A compositional split as a source of the production jobs (build-db, precompute).

    Ids are the canvas's position in its split plus a per-split offset, so the splits share one
    id space and never collide; the arguments after `seed` are `make_splits`'.
    """

    def __init__(self, split: str = "train", *, size: int = 16, seed: int = 0, **split_kw):
        super().__init__(f"ComposeSource({split})", None)
        if split not in SPLIT_ID_OFFSET:
            raise ValueError(f"unknown compose split {split!r}; have {sorted(SPLIT_ID_OFFSET)}")
        self.split = make_splits(seed, size=size, **split_kw)[split]
        self.offset = SPLIT_ID_OFFSET[split]

    def __len__(self) -> int:
        return len(self.split)

    def __iter__(self):
        for i, (img, text) in enumerate(zip(self.split.images, self.split.captions)):
            yield self.offset + i, img, text


def train_judge(size: int = 16, *, split_seed: int = 0, seed: int = 0, epochs: int = 0):
    """The digit judge: a `judge.DigitClassifier` fit on the real train-pool digits as white halves.

    Never on the database or eval pools, never on a generated image.
    """
    from imagerag_jax.miniature import judge as judge_lib  # pylint: disable=g-import-not-at-top

    _, labels = sources.load_digits()
    ids = sources.digits_split_indices(split_seed)["train"]
    kw = {"epochs": epochs} if epochs else {}
    return judge_lib.DigitClassifier(**kw).fit(digit_halves(ids, size), labels[ids], seed=seed)


# --------------------------------------------------------------------------- the judge


def white_halves(images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(left, right) halves of canvases as white-on-black digits: the digit judge's input.

    The tint scales each channel by the palette colour and every palette colour has a channel
    at 1, so the per-pixel channel maximum is the digit's own intensity.
    """
    x = np.asarray(images)
    half = x.shape[2] // 2
    white = lambda h: np.repeat(h.max(axis=-1, keepdims=True), 3, axis=-1)
    return white(x[:, :, :half]), white(x[:, :, half:])


def judge(classifier, images: np.ndarray) -> dict[str, np.ndarray]:
    """Per canvas: the digit on each side (`classifier`, a miniature.judge.DigitClassifier on
    each half) and the colour on each side (measured from the pixels)."""
    x = np.asarray(images)
    left, right = white_halves(x)
    half = x.shape[2] // 2
    return {"left_digit": classifier.predict(left), "right_digit": classifier.predict(right),
            "left_colour": np.array([colour_of(h) for h in x[:, :, :half]], np.int64),
            "right_colour": np.array([colour_of(h) for h in x[:, :, half:]], np.int64)}


def correct_attributes(predicted: dict[str, np.ndarray], compositions: np.ndarray) -> np.ndarray:
    """(N, 4) bool: each attribute of `Composition._fields` judged right, per canvas."""
    comps = [Composition.from_index(int(i)) for i in compositions]
    return np.stack([np.asarray(predicted[name]) == np.array([getattr(c, name) for c in comps], np.int64)
                     for name in Composition._fields], axis=1).reshape(len(comps), len(Composition._fields))


def novel_digit_accuracy(predicted: dict[str, np.ndarray], compositions: np.ndarray,
                         novel_digits: tuple[int, ...]) -> float | None:
    """Of the sides that should show one of `novel_digits`, the fraction judged to (None: no such side)."""
    comps = [Composition.from_index(int(i)) for i in compositions]
    hits = [int(predicted[f"{side}_digit"][j]) == getattr(c, f"{side}_digit")
            for j, c in enumerate(comps) for side in ("left", "right")
            if getattr(c, f"{side}_digit") in novel_digits]
    return float(np.mean(hits)) if hits else None


def score(predicted: dict[str, np.ndarray], compositions: np.ndarray, classes: np.ndarray,
          novel_digits: tuple[int, ...] = (), blind_digits: tuple[int, ...] = ()) -> dict[str, object]:
    """TIFA-like: accuracy per attribute, the all-four-correct rate, it per frequency class, and
    how often a side that should show a novel (or a blind) digit does."""
    right = correct_attributes(predicted, compositions)
    all_four = right.all(axis=1)
    classes = np.asarray(classes)
    return {"all_correct": float(all_four.mean()),
            "attribute_accuracy": {n: float(right[:, i].mean()) for i, n in enumerate(Composition._fields)},
            "by_class": {name: (float(all_four[classes == c].mean()) if np.any(classes == c) else None)
                         for c, name in enumerate(CLASSES)},
            "novel_digit_accuracy": novel_digit_accuracy(predicted, compositions, tuple(novel_digits)),
            "blind_digit_accuracy": novel_digit_accuracy(predicted, compositions, tuple(blind_digits))}
