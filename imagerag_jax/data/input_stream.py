"""tf.data input stream: this host's TFRecord files -> batches -> global `jax.Array`s on a mesh.

    it = InputStream(data_dir, "train", global_batch_size=256, mesh=mesh, seed=0)
    batch = next(it)                 # {"latent": [B, H, W, C] jax.Array sharded on the batch axes}
    state = it.get_state()           # JSON-able; store it in the checkpoint
    it.set_state(state)              # after a restart: the same next batches

Per host: the split's *files* are divided by process (`files[process_index::process_count]`), so
hosts read disjoint data without coordination. Each epoch e reads this host's files in an order
shuffled with (seed, e), interleaves them deterministically, shuffles serialised records with a
buffer seeded by (seed, e), parses records, batches the per-host batch, casts floats to the output
dtype and prefetches. Epochs are concatenated before batching, so batches
may straddle epochs.

A mixture (`data_dir` a list of (dir, weight) pairs, `config.data_mixture`) reads every set as
above, each its own stream of epochs, and takes example e of the host's stream from the set that
`mixture.Choice` assigns to e (a deterministic function of e, the weights and the seed). The sets
must agree on latent/embedding shapes, k and the retrieval database; where some store the
teacher's noise and others do not, the others get fresh Gaussian noise seeded by (seed, set,
host, record), which is what the train step would draw for them.

Iterator state = number of batches consumed. The stream is a deterministic function of the seed,
so restoring rebuilds the stream at epoch `consumed // examples_per_epoch` and skips the rest of
that epoch's position as *serialised* records (no parsing, at most one epoch of reading); in a
mixture each set does so at its own count of consumed records (`Choice.counts`). No shuffle
buffer is stored in the checkpoint. The cost: the stream must not depend on anything else
(same files, weights, seed, batch size and process count; `set_state` checks).

Neighbours stored by id (`tfrecords.Schema.neighbours == 'ids'`), or their H-space from the cache:
a `neighbour_feed.NeighbourFeed` fills each host batch's neighbour arrays by id, after tf.data
and before the arrays become global (each host gathers its own rows from its database copy).

Corrupt data: the manifest is validated first (schema version, shapes, k, file sizes); a record
that cannot be read or parsed raises `RecordError` naming the file and the record index.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import numpy as np
import tensorflow as tf

from imagerag_jax.data import mixture, tfrecords

STATE_VERSION = 1

# Keep TF off accelerators: it only feeds the host; JAX owns the devices.
try:
    tf.config.set_visible_devices([], "GPU")
    tf.config.set_visible_devices([], "TPU")
except (RuntimeError, ValueError):  # Already initialised, or no such device type.
    pass


@dataclasses.dataclass(frozen=True)
class DataSet:
    """One TFRecord set of the stream: its manifest and this host's files."""

    data_dir: str
    weight: float
    manifest: dict[str, Any]
    schema: tfrecords.Schema
    files: tuple[str, ...]
    examples_per_epoch: int


def _retrieval_source(manifest: Mapping[str, Any]) -> tuple[Any, Any]:
    """(database path, index path) a set's neighbours came from (None where not recorded)."""
    index = manifest.get("index") or {}
    return (index.get("database") or {}).get("path"), index.get("path")


def mixture_schema(manifests: Sequence[tuple[str, Mapping[str, Any]]]) -> tfrecords.Schema:
    """The schema of the stream over (data_dir, manifest) sets; MixtureError names a misfit."""
    (first, m0), schema0 = manifests[0], tfrecords.Schema.from_dict(manifests[0][1]["schema"])
    has_noise = schema0.has_noise
    for data_dir, m in manifests[1:]:
        schema = tfrecords.Schema.from_dict(m["schema"])
        for field in ("latent_shape", "embed_shape", "pooled_dim", "k", "neighbours"):
            a, b = getattr(schema0, field), getattr(schema, field)
            if a != b:
                raise mixture.MixtureError(f"mixture sets differ in {field}: {first} has {a}, "
                                           f"{data_dir} has {b}")
        if schema0.k and _retrieval_source(m0) != _retrieval_source(m):
            raise mixture.MixtureError(
                f"mixture sets retrieved from different databases: {first} from "
                f"{_retrieval_source(m0)}, {data_dir} from {_retrieval_source(m)}; one adapter is "
                "trained against one database")
        has_noise = has_noise or schema.has_noise
    return dataclasses.replace(schema0, has_noise=has_noise)


def _named_sets(data_dir: str | Sequence[tuple[str, float]]) -> list[tuple[str, float]]:
    """(dir, weight) of one set or of a mixture; MixtureError for an empty or malformed one."""
    named = [(data_dir, 1.0)] if isinstance(data_dir, str) else mixture.parse_sets(data_dir)
    if not named:
        raise mixture.MixtureError("an empty mixture: name at least one (data_dir, weight)")
    return named


def data_schema(data_dir: str | Sequence[tuple[str, float]], split: str) -> tfrecords.Schema:
    """The schema `InputStream(data_dir, split, ...)` yields (manifests validated, not the files)."""
    named = _named_sets(data_dir)
    return mixture_schema([(d, tfrecords.validate_manifest(d, split=split, check_files=False))
                           for d, _ in named])


def retrieval_manifest(data_dir: str | Sequence[tuple[str, float]], split: str) -> dict[str, Any]:
    """The manifest that says where the neighbours came from (a mixture's sets share it)."""
    return tfrecords.validate_manifest(_named_sets(data_dir)[0][0], split=split, check_files=False)


def host_files(files: Sequence[Any], process_index: int, process_count: int) -> list[Any]:
    """This process's share of a split's files (round-robin: disjoint and covering)."""
    if len(files) < process_count:
        raise ValueError(f"{len(files)} files cannot be split over {process_count} processes; "
                         "write at least one shard per host")
    return list(files[process_index::process_count])


class InputStream:
    """Iterator of batches (global jax.Arrays with `mesh`, else host-local numpy dicts).

    Args:
        data_dir: directory of a TFRecord set written by `data.tfrecords` (manifest + shards), or
          a mixture: (directory, weight) pairs (weights need not sum to 1).
        split: e.g. "train".
        global_batch_size: batch over all processes; each host reads global / process_count.
        mesh: shard the batch over `batch_axes` of this mesh; None yields host-local numpy arrays.
        batch_axes: mesh axes of the batch dimension (default: all mesh axes).
    sharding: instead of mesh/batch_axes, the sharding of every batch array (leading dim = batch).
      seed: shuffling seed (file order and record buffer).
      shuffle_buffer: serialised records in the shuffle buffer (memory: buffer x record size).
      num_epochs: None repeats forever; else stop after the batches every host can fill (one set).
      expected: schema expectations checked against the manifest (`Schema` or e.g. {"k": 4}).
      dtype: output dtype of float fields (stored f16/f32 are cast; ids stay integers).
      fields: output keys (default: every stored field except "prompt"; with a feed, also the
        fields it adds).
      neighbour_feed: fills the neighbours' arrays of every batch by id (`data.neighbour_feed`).
      include_prompt: add "prompt" as a host-local numpy array of str (never a jax.Array).
      process_index, process_count: default `jax.process_index()` / `jax.process_count()`.
      cycle_length: files read concurrently.
      prefetch: batches prepared ahead.
    """

    def __init__(self, data_dir: str | Sequence[tuple[str, float]], split: str,
                 global_batch_size: int, *,
                 mesh: jax.sharding.Mesh | None = None, batch_axes: Sequence[str] | None = None,
                 sharding: jax.sharding.Sharding | None = None,
                 seed: int = 0, shuffle_buffer: int = 512, num_epochs: int | None = None,
                 expected: tfrecords.Schema | Mapping[str, Any] | None = None,
                 dtype: Any = np.float32, fields: Sequence[str] | None = None,
                 include_prompt: bool = False, process_index: int | None = None,
                 process_count: int | None = None, cycle_length: int = 8, prefetch: int = 2,
                 neighbour_feed: Any = None):
        self.process_index = jax.process_index() if process_index is None else process_index
        self.process_count = jax.process_count() if process_count is None else process_count
        if global_batch_size % self.process_count:
            raise ValueError(f"global batch {global_batch_size} not divisible by "
                             f"{self.process_count} processes")
        self.is_mixture = not isinstance(data_dir, str)
        named = _named_sets(data_dir)
        if self.is_mixture and num_epochs is not None:
            raise mixture.MixtureError("num_epochs needs one TFRecord set; a mixture repeats forever")
        self.split, self.seed, self.shuffle_buffer = split, seed, shuffle_buffer
        self.global_batch_size = global_batch_size
        self.per_host_batch = global_batch_size // self.process_count
        self.num_epochs, self.cycle_length, self.prefetch = num_epochs, cycle_length, prefetch
        self.sets = [self._read_set(d, w, expected) for d, w in named]
        self.manifest = self.sets[0].manifest
        self.schema = mixture_schema([(s.data_dir, s.manifest) for s in self.sets])
        self.choice = mixture.Choice([s.weight for s in self.sets], seed) if self.is_mixture else None
        self.dtype = np.dtype(dtype)
        self.include_prompt = include_prompt
        self.feed = neighbour_feed
        stored = [f for f in self.schema.fields if f != "prompt"]
        added = list(self.feed.fields(self.schema)) if self.feed is not None else []
        all_fields = stored + [f for f in added if f not in stored]
        self.fields = list(fields) if fields is not None else all_fields
        unknown = set(self.fields) - set(all_fields)
        if unknown:
            raise ValueError(f"fields {sorted(unknown)} not in the schema's fields {all_fields}")
        # What tf.data parses: the requested stored fields, and the ids the feed gathers by.
        self._parsed = [f for f in stored if f in self.fields or (self.feed is not None and
                                                                   f == "retrieved_ids")]
        self.files = [f for s in self.sets for f in s.files]
        self.examples_per_epoch = sum(s.examples_per_epoch for s in self.sets)
        if self.examples_per_epoch < self.per_host_batch and num_epochs is not None:
            logging.warning("Host %d has %d examples per epoch, fewer than its batch %d.",
                            self.process_index, self.examples_per_epoch, self.per_host_batch)
        self.total_batches = None
        if num_epochs is not None:
            # Every host must yield the same number of batches, or multi-host steps would deadlock.
            shards = tfrecords.split_files(self.sets[0].data_dir, self.manifest, split)
            per_host = [sum(n for _, n in host_files(shards, p, self.process_count))
                        for p in range(self.process_count)]
            self.total_batches = min(num_epochs * n // self.per_host_batch for n in per_host)

        self.sharding = sharding
        if sharding is None and mesh is not None:
            axes = tuple(batch_axes) if batch_axes is not None else tuple(mesh.axis_names)
            self.sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(axes))
        self._consumed = 0
        self._build()

    def _read_set(self, data_dir: str, weight: float,
                  expected: tfrecords.Schema | Mapping[str, Any] | None) -> DataSet:
        """Validates one set's manifest and takes this host's share of its split's files."""
        manifest = tfrecords.validate_manifest(data_dir, split=self.split, expected=expected)
        mine = host_files(tfrecords.split_files(data_dir, manifest, self.split),
                          self.process_index, self.process_count)
        files = tuple(p for p, _ in mine)
        n = sum(n for _, n in mine)
        if n == 0:
            raise ValueError(f"process {self.process_index}: the files {list(files)} hold no examples")
        return DataSet(data_dir, weight, manifest, tfrecords.Schema.from_dict(manifest["schema"]),
                       files, n)

    # --- the tf.data graph ----------------------------------------------------------------------

    def _epoch(self, files: Sequence[str], epoch: tf.Tensor) -> tf.data.Dataset:
        """Serialised records of one epoch of one set's files, deterministically shuffled."""
        files = tf.random.experimental.stateless_shuffle(
            tf.constant(list(files)), seed=tf.stack([tf.constant(self.seed, tf.int64), epoch]))
        ds = tf.data.Dataset.from_tensor_slices(files).interleave(
            lambda f: tf.data.TFRecordDataset(f, buffer_size=8 << 20),
            cycle_length=min(self.cycle_length, len(files)), block_length=1,
            num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
        if self.shuffle_buffer > 1:
            ds = ds.shuffle(self.shuffle_buffer, seed=self.seed * 1_000_003 + epoch,
                            reshuffle_each_iteration=False)
        return ds

    def _parse(self, serialized: tf.Tensor, schema: tfrecords.Schema) -> dict[str, tf.Tensor]:
        ex = tfrecords.parse_example(serialized, schema)
        keep = self._parsed + (["prompt"] if self.include_prompt else [])
        return {name: ex[name] for name in keep if name in ex}

    def _records(self, index: int, start: int) -> tf.data.Dataset:
        """Parsed records of set `index` from its record `start` on (epochs concatenated)."""
        s = self.sets[index]
        start_epoch, offset = divmod(start, s.examples_per_epoch)
        end_epoch = self.num_epochs if self.num_epochs is not None else np.iinfo(np.int64).max
        ds = tf.data.Dataset.range(start_epoch, max(start_epoch, end_epoch)).flat_map(
            lambda e: self._epoch(s.files, e))
        ds = ds.skip(offset)  # raw records: cheap compared to parsing
        # Parse per record (parallel over records, small allocations), cast once per batch; the
        # same speed as parsing whole batches at SD shapes (measured), and independent of batch.
        ds = ds.map(lambda r: self._parse(r, s.schema), num_parallel_calls=tf.data.AUTOTUNE,
                    deterministic=True)
        if "noise" in self._parsed and not s.schema.has_noise:
            shape = self.schema.latent_shape
            # Per (seed, set, host): hosts read different records at the same record index.
            seed = tf.constant([(self.seed * 1_000_003 + index) * 65_537 + self.process_index, 0],
                               tf.int64)

            def add_noise(i: tf.Tensor, ex: dict[str, tf.Tensor]) -> dict[str, tf.Tensor]:
                noise = tf.random.stateless_normal(shape, seed=seed + tf.stack([0, i]))
                return {**ex, "noise": tf.cast(noise, tfrecords.STORED_DTYPES["noise"])}

            ds = ds.enumerate(start).map(add_noise, num_parallel_calls=tf.data.AUTOTUNE,
                                         deterministic=True)
        return ds

    def _cast(self, batch: dict[str, tf.Tensor]) -> dict[str, tf.Tensor]:
        out = {}
        for name, x in batch.items():
            if x.dtype.is_floating:
                # bfloat16: TF casts to float32 and numpy (ml_dtypes) finishes, as TF's bf16 numpy type
                # is not ml_dtypes'.
                x = tf.cast(x, tf.float32 if self.dtype.name == "bfloat16" else self.dtype.name)
            out[name] = x
        return out

    def _build(self) -> None:
        consumed_examples = self._consumed * self.per_host_batch
        if self.choice is None:
            ds = self._records(0, consumed_examples)
        else:
            counts = self.choice.counts(consumed_examples)
            streams = [self._records(i, c) for i, c in enumerate(counts)]
            which = tf.data.Dataset.range(consumed_examples, np.iinfo(np.int64).max).map(self.choice.tf)
            ds = tf.data.Dataset.choose_from_datasets(streams, which)
        ds = ds.batch(self.per_host_batch, drop_remainder=True)
        if self.total_batches is not None:
            ds = ds.take(max(0, self.total_batches - self._consumed))
        ds = ds.map(self._cast, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
        ds = ds.prefetch(self.prefetch)
        opts = tf.data.Options()
        opts.deterministic = True
        opts.experimental_optimization.map_parallelization = True
        ds = ds.with_options(opts)
        self._dataset = ds
        self._it = iter(ds)

    # --- iteration ------------------------------------------------------------------------------

    def __iter__(self) -> InputStream:
        return self

    def __next__(self) -> dict[str, Any]:
        try:
            batch = next(self._it)
        except tf.errors.OpError as e:
            for s in self.sets:
                bad = tfrecords.find_bad_record(s.files, s.schema)
                if bad is not None:
                    raise bad from e
            raise
        self._consumed += 1
        host = {name: value.numpy() for name, value in batch.items()}
        if self.feed is not None:
            host = self.feed.fill(host)
        out = {}
        for name in self.fields + (["prompt"] if self.include_prompt else []):
            x = host[name]
            if name == "prompt":
                out[name] = np.array([p.decode("utf-8") for p in x])
                continue
            if x.dtype.kind == "f" and x.dtype != self.dtype:
                x = x.astype(self.dtype)
            out[name] = x if self.sharding is None else self._to_global(name, x)
        return out

    def _to_global(self, name: str, x: np.ndarray) -> jax.Array:
        if x.dtype == np.int64 and not jax.config.jax_enable_x64:
            # Without x64 JAX would truncate silently; ids are small in practice, but check.
            if x.size and (x.max() > np.iinfo(np.int32).max or x.min() < np.iinfo(np.int32).min):
                raise OverflowError(f"{name}: ids beyond int32 need jax_enable_x64")
            x = x.astype(np.int32)
        return jax.make_array_from_process_local_data(self.sharding, x)

    def get_state(self) -> dict[str, Any]:
        """JSON-able position (batches consumed plus what the stream depends on)."""
        state = {"version": STATE_VERSION, "batches_consumed": self._consumed, "seed": self.seed,
                 "split": self.split, "per_host_batch": self.per_host_batch,
                 "process_index": self.process_index, "process_count": self.process_count,
                 "shuffle_buffer": self.shuffle_buffer,
                 "files": [f.rsplit("/", 1)[-1] for f in self.files]}
        if self.is_mixture:
            # A mixture's stream depends on every set's files and on the weights.
            state["files"] = [[f.rsplit("/", 1)[-1] for f in s.files] for s in self.sets]
            state["weights"] = [s.weight for s in self.sets]
        return state

    def set_state(self, state: Mapping[str, Any]) -> None:
        """Restores a position from `get_state` (rebuilds the stream and skips to it)."""
        if state.get("version") != STATE_VERSION:
            raise ValueError(f"iterator state version {state.get('version')!r} != {STATE_VERSION}")
        mine = self.get_state()
        for key in ("seed", "split", "per_host_batch", "process_index", "process_count",
                    "shuffle_buffer", "files", "weights"):
            if state.get(key) != mine.get(key):  # "weights" exists for mixtures only
                raise ValueError(f"iterator state was saved with {key}={state.get(key)!r}, but this "
                                 f"stream has {mine.get(key)!r}; the saved position does not apply")
        self._consumed = int(state["batches_consumed"])
        self._build()

    @property
    def steps_per_epoch(self) -> int:
        """Batches per epoch of this host, all sets together (the smallest host bounds finite runs)."""
        return self.examples_per_epoch // self.per_host_batch
