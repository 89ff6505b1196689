"""The miniature's data: scikit-learn's digits as arrays, captions and deterministic batches."""

from __future__ import annotations

import dataclasses
import functools

import numpy as np

from imagerag_jax.data import sources


@dataclasses.dataclass(frozen=True)
class DigitSplit:
    """One split in memory: ids, images in [-1, 1] (N, S, S, 3), labels and captions."""

    ids: np.ndarray
    images: np.ndarray
    labels: np.ndarray
    captions: tuple[str, ...]

    def __len__(self) -> int:
        return len(self.ids)


@functools.lru_cache(maxsize=8)
def load_split(split: str, size: int, seed: int = 0) -> DigitSplit:
    """A digits split ('train', 'eval', 'database') exactly as the precompute jobs see it."""
    src = sources.DigitsSource(split, size=size, seed=seed)
    ids = np.asarray(src.ids, np.int64)
    images = np.stack([src.image(int(i)) for i in ids]).astype(np.float32) / 127.5 - 1.0
    labels = src.labels.astype(np.int64)
    return DigitSplit(ids, images, labels, tuple(src.caption(int(i)) for i in ids))


def join(*splits: DigitSplit) -> DigitSplit:
    """Concatenation of splits."""
    return DigitSplit(np.concatenate([s.ids for s in splits]), np.concatenate([s.images for s in splits]),
                      np.concatenate([s.labels for s in splits]),
                      tuple(c for s in splits for c in s.captions))


def batch_indices(n: int, batch: int, step: int, seed: int) -> np.ndarray:
    """Indices of batch `step` of an epoch-wise shuffle of n items (a pure function of step)."""
    per_epoch = max(n // batch, 1)
    epoch, j = divmod(step, per_epoch)
    order = np.random.default_rng([seed, epoch]).permutation(n)
    return order[(j * batch) % n: (j * batch) % n + batch] if n >= batch else order[np.arange(batch) % n]


def eval_prompts(split: DigitSplit, limit: int = 0) -> tuple[list[str], np.ndarray, np.ndarray]:
    """(captions, labels, ids) of the held-out prompts, class-balanced when limited."""
    idx = np.arange(len(split))
    if limit and limit < len(split):
        # Round-robin over classes keeps the digits balanced in a short list.
        per_class = [idx[split.labels == c] for c in range(10)]
        idx = np.asarray([p[i] for i in range(max(map(len, per_class))) for p in per_class
                          if i < len(p)][:limit])
    return [split.captions[i] for i in idx], split.labels[idx], split.ids[idx]
