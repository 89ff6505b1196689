"""Weighted mixtures of TFRecord sets: the config's sets, and which set each example comes from.

    sets = mixture.config_sets(config, workdir)      # [(data_dir, weight), ...]
    choice = mixture.Choice(weights, seed)
    choice.tf(e)           # set of example e of a host's stream (a tf.data map)
    choice.counts(n)       # examples of each set among the first n (numpy; restores a position)

Example e (0, 1, ... of one host's stream) comes from set i where
u(e) = ((e mod 2^31) * M + S) mod 2^32 falls into [T_i-1, T_i), with T the cumulative weights
scaled to 2^32, M = floor(2^32 / golden ratio) (odd) and S a hash of the seed. A Weyl sequence,
not a random draw: the same integers in TensorFlow (the stream) and numpy (a restore counts each
set's examples in a prefix exactly, with no state stored), and any n consecutive examples hold
n * w_i + O(log n) of set i, so every batch follows the weights without a random walk.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import numpy as np
import tensorflow as tf

from imagerag_jax import jsonfiles
from imagerag_jax.data import tfrecords
from imagerag_jax.errors import UserError

_M = 2654435769  # floor(2**32 / golden ratio), odd
_PERIOD = 1 << 31  # e mod 2^31 keeps e * M below 2^63 (int64 in both frameworks)
_CHUNK = 1 << 22


class MixtureError(UserError):
    """A mixture that cannot be read: bad weights, paths, or sets that do not fit together."""


def _seed_offset(seed: int) -> int:
    """S: the seed spread over 32 bits (a fixed integer hash, identical on every host)."""
    x = (int(seed) * 0x9E3779B97F4A7C15 + 0x632BE59BD9B4E019) % (1 << 64)
    x ^= x >> 29
    x = (x * 0xBF58476D1CE4E5B9) % (1 << 64)
    return int(x >> 32)


class Choice:
    """The set of each example in a stream, for normalised `weights` and a seed."""

    def __init__(self, weights: Sequence[float], seed: int):
        w = np.asarray(weights, np.float64)
        if w.ndim != 1 or len(w) == 0 or not np.all(np.isfinite(w)) or np.any(w <= 0):
            raise MixtureError(f"mixture weights must be positive numbers, got {list(weights)}")
        cum = np.cumsum(w / w.sum())
        # Boundaries between sets (the last set ends at 2^32); every set keeps a non-empty range.
        self.thresholds = np.minimum(np.round(cum[:-1] * (1 << 32)).astype(np.int64), (1 << 32) - 1)
        self.weights = tuple(float(x) for x in w / w.sum())
        self.offset = _seed_offset(seed)

    def numpy(self, e: np.ndarray) -> np.ndarray:
        """Set index of each example index in `e` (int64)."""
        u = ((np.asarray(e, np.int64) % _PERIOD) * _M + self.offset) % (1 << 32)
        return np.searchsorted(self.thresholds, u, side="right").astype(np.int64)

    def tf(self, e: tf.Tensor) -> tf.Tensor:
        """Set index of example `e` (an int64 scalar tensor), as `numpy` computes it."""
        u = tf.math.floormod(tf.math.floormod(e, _PERIOD) * _M + self.offset, 1 << 32)
        return tf.reduce_sum(tf.cast(u >= tf.constant(self.thresholds), tf.int64))

    def counts(self, n: int) -> list[int]:
        """Examples of each set among examples 0..n-1."""
        total = np.zeros(len(self.weights), np.int64)
        for start in range(0, int(n), _CHUNK):
            idx = self.numpy(np.arange(start, min(int(n), start + _CHUNK), dtype=np.int64))
            total += np.bincount(idx, minlength=len(self.weights))
        return [int(c) for c in total]


def parse_sets(value: Any) -> list[tuple[str, float]]:
    """`config.data_mixture` ((dir, weight) pairs) as a checked list."""
    sets = []
    for item in value:
        if not isinstance(item, (tuple, list)) or len(item) != 2:
            raise MixtureError(f"config.data_mixture entries are (data_dir, weight) pairs, got {item!r}")
        path, weight = item
        if not isinstance(path, str) or not path:
            raise MixtureError(f"config.data_mixture: {path!r} is not a data directory")
        try:
            weight = float(weight)
        except (TypeError, ValueError) as e:
            raise MixtureError(f"config.data_mixture: weight {weight!r} of {path} is not a number") from e
        if not np.isfinite(weight) or weight <= 0:
            raise MixtureError(f"config.data_mixture: weight {weight} of {path} must be > 0")
        sets.append((path, weight))
    dirs = [p for p, _ in sets]
    if len(set(dirs)) != len(dirs):
        raise MixtureError(f"config.data_mixture names a set twice: {dirs}")
    return sets


def config_sets(config: Any, workdir: str | None = None) -> list[tuple[str, float]]:
    """The training sets of a config: `data_mixture`, else [(data_dir, 1.0)], else workdir/data."""
    get = config.get if hasattr(config, "get") else (lambda k, d=None: getattr(config, k, d))
    mixture, data_dir = get("data_mixture") or (), get("data_dir")
    if mixture:
        if data_dir is not None:
            raise MixtureError("set config.data_dir or config.data_mixture, not both")
        return parse_sets(mixture)
    if data_dir is not None:
        return [(data_dir, 1.0)]
    if workdir is None:
        raise MixtureError("the config names no data (config.data_dir / config.data_mixture)")
    return [(os.path.join(workdir, "data"), 1.0)]


def run_manifest(config: Any, workdir: str | None = None) -> dict[str, Any] | None:
    """The TFRecord manifest of a run's training data; None when missing or unreadable.

    A mixture's sets share one database, index and k, so its first set's manifest speaks for all
    (what export reads k from, and generation the run's database and index).
    """
    data_dir = config_sets(config, workdir)[0][0]
    try:
        return jsonfiles.read(os.path.join(data_dir, tfrecords.MANIFEST), what="TFRecord manifest")
    except ValueError:  # missing, not JSON, or not an object
        return None
