"""The TFRecord schema of training examples (versioned), its writer, parser and manifest.

One example (docs/design.md, "Formats"), stored dtypes; k retrieved neighbours, NHWC latents:

  prompt                   bytes      utf-8 caption
  latent                   f16 [H, W, C]     target z0 (VAE latent, scaled)
  noise (optional)         f16 [H, W, C]     the teacher's initial noise for synthetic pairs
  prompt_embeds            f16 [L, D]        text-encoder hidden states (L = 77)
  pooled                   f32 [D]           L2-normalised pooled text embedding
  retrieved_latents        f16 [k, H, W, C]
  retrieved_prompt_embeds  f16 [k, L, D]
  retrieved_pooled         f32 [k, D]
  retrieval_scores         f32 [k]
  retrieved_ids            i64 [k]           database ids of the neighbours
  example_id               i64 []

Float arrays are stored as raw little-endian bytes (one `bytes_list` entry each: parsing is a
memcpy), ids as `int64_list`. With k = 0 the retrieved fields are absent (the no-retrieval baseline).

How the neighbours are stored (`Schema.neighbours`, docs/design.md "Record options"):

  'inline'   the fields above: every neighbour's latent, prompt embeddings and pooled embedding
             in the record (~1.0 MB per example at SD 2.1 shapes, k = 4, with noise);
  'ids'      only `retrieved_ids` and `retrieval_scores` (~0.23 MB): each training host gathers
             the rest from its copy of the database by id (`data.neighbour_feed`), or gathers each
             neighbour's H-space from the database's H-space cache instead.

A batch that carries the H-space (`Schema.hspace_shape` set) has `retrieved_hspace` f16 [k, h, w, C]
in place of `retrieved_latents` and `retrieved_prompt_embeds`: the frozen student encoder's output
at t = 0 on each neighbour, which the train step would otherwise compute.

Shards are `{split}-{i:05d}-of-{n:05d}.tfrecord` next to `manifest.json` (schema version, shapes,
dtypes, k, per-file counts and byte sizes, skipped counts, source and index parameters), which
`validate_manifest` checks before anything is read.
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import logging
import os
from collections.abc import Iterable, Mapping
from typing import Any

import numpy as np
import tensorflow as tf

from imagerag_jax import jsonfiles
from imagerag_jax.errors import UserError

SCHEMA_VERSION = 1
FORMAT_NAME = "imagerag-jax-tfrecord"
MANIFEST = "manifest.json"
PARTS_DIR = "_manifest_parts"

STORED_DTYPES: dict[str, str] = {
    "prompt": "string",
    "latent": "float16",
    "noise": "float16",
    "prompt_embeds": "float16",
    "pooled": "float32",
    "retrieved_latents": "float16",
    "retrieved_prompt_embeds": "float16",
    "retrieved_pooled": "float32",
    "retrieved_hspace": "float16",
    "retrieval_scores": "float32",
    "retrieved_ids": "int64",
    "example_id": "int64",
}
RAW_FIELDS = tuple(k for k, v in STORED_DTYPES.items() if v.startswith("float"))
# What a record holds of its neighbours, per `Schema.neighbours`.
NEIGHBOURS = ("inline", "ids")
NEIGHBOUR_IDS = ("retrieval_scores", "retrieved_ids")
NEIGHBOUR_ARRAYS = ("retrieved_latents", "retrieved_prompt_embeds", "retrieved_pooled")


class ManifestError(UserError):
    """A TFRecord manifest is missing, of another schema version, or does not match expectations."""


class RecordError(ValueError):
    """A record could not be read or parsed; names the file and the record index."""

    def __init__(self, filename: str, index: int, reason: str):
        super().__init__(f"{filename}: record {index}: {reason}")
        self.filename, self.index, self.reason = filename, index, reason


@dataclasses.dataclass(frozen=True)
class Schema:
    """Shapes of one example; the stored dtypes are fixed by `STORED_DTYPES`."""

    latent_shape: tuple[int, int, int]  # (H, W, C)
    embed_shape: tuple[int, int]  # (L, D)
    pooled_dim: int
    k: int
    has_noise: bool = False
    neighbours: str = "inline"  # NEIGHBOURS: the arrays in the record, or ids only
    hspace_shape: tuple[int, int, int] | None = None  # set: neighbours as H-space, not latents

    def __post_init__(self):
        object.__setattr__(self, "latent_shape", tuple(int(s) for s in self.latent_shape))
        object.__setattr__(self, "embed_shape", tuple(int(s) for s in self.embed_shape))
        if self.hspace_shape is not None:
            object.__setattr__(self, "hspace_shape", tuple(int(s) for s in self.hspace_shape))
        if self.neighbours not in NEIGHBOURS:
            raise ValueError(f"neighbours must be one of {NEIGHBOURS}, got {self.neighbours!r}")
        if self.neighbours == "ids" and self.hspace_shape is not None:
            raise ValueError("neighbours stored by id carry no H-space (the feed gathers it)")

    @property
    def fields(self) -> tuple[str, ...]:
        """Fields present in an example of this schema."""
        names = ["prompt", "latent", "prompt_embeds", "pooled", "example_id"]
        if self.has_noise:
            names.append("noise")
        if self.k:
            names.extend(NEIGHBOUR_IDS)
            if self.neighbours == "inline":
                names.append("retrieved_pooled")
                names.extend(("retrieved_hspace",) if self.hspace_shape is not None else
                             ("retrieved_latents", "retrieved_prompt_embeds"))
        return tuple(n for n in STORED_DTYPES if n in names)

    def shapes(self) -> dict[str, tuple[int, ...]]:
        """Per-example shape of every present field."""
        k = self.k
        all_shapes = {
            "prompt": (),
            "latent": self.latent_shape,
            "noise": self.latent_shape,
            "prompt_embeds": self.embed_shape,
            "pooled": (self.pooled_dim,),
            "retrieved_latents": (k, *self.latent_shape),
            "retrieved_prompt_embeds": (k, *self.embed_shape),
            "retrieved_pooled": (k, self.pooled_dim),
            "retrieved_hspace": (k, *(self.hspace_shape or ())),
            "retrieval_scores": (k,),
            "retrieved_ids": (k,),
            "example_id": (),
        }
        return {n: all_shapes[n] for n in self.fields}

    def to_dict(self) -> dict[str, Any]:
        """JSON-able form (for the manifest)."""
        d = {"latent_shape": list(self.latent_shape), "embed_shape": list(self.embed_shape),
             "pooled_dim": self.pooled_dim, "k": self.k, "has_noise": self.has_noise,
             "neighbours": self.neighbours}
        if self.hspace_shape is not None:
            d["hspace_shape"] = list(self.hspace_shape)
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Schema:
        """Inverse of `to_dict` (manifests without 'neighbours' store them inline)."""
        hs = d.get("hspace_shape")
        return cls(tuple(d["latent_shape"]), tuple(d["embed_shape"]), int(d["pooled_dim"]),
                   int(d["k"]), bool(d.get("has_noise", False)), str(d.get("neighbours", "inline")),
                   None if hs is None else tuple(hs))


def random_example(schema: Schema, rng: np.random.Generator, example_id: int = 0) -> dict[str, Any]:
    """A random example of `schema` (stored dtypes), for tests and benchmarks."""
    ex: dict[str, Any] = {"prompt": f"random example {example_id}", "example_id": example_id}
    for name, shape in schema.shapes().items():
        if name in RAW_FIELDS:
            ex[name] = rng.standard_normal(shape, np.float32).astype(STORED_DTYPES[name])
    if schema.k:
        ex["retrieved_ids"] = rng.integers(0, 2**31 - 1, schema.k, dtype=np.int64)
    return ex


def feature_spec(schema: Schema) -> dict[str, tf.io.FixedLenFeature]:
    """`tf.io.parse_example` features for `schema`."""
    spec = {}
    for name in schema.fields:
        if name == "example_id":
            spec[name] = tf.io.FixedLenFeature([], tf.int64)
        elif name == "retrieved_ids":
            spec[name] = tf.io.FixedLenFeature([schema.k], tf.int64)
        else:
            spec[name] = tf.io.FixedLenFeature([], tf.string)
    return spec


def _bytes(b: bytes) -> tf.train.Feature:
    return tf.train.Feature(bytes_list=tf.train.BytesList(value=[b]))


def serialize_example(example: Mapping[str, Any], schema: Schema | None = None) -> bytes:
    """Serialises one example dict to `tf.train.Example` bytes (casting to the stored dtypes).

    Without `schema` it is inferred from the arrays (`schema_of`); with one, shapes are checked.
    """
    schema = schema or schema_of(example)
    shapes = schema.shapes()
    missing = set(schema.fields) - set(example)
    if missing:
        raise ValueError(f"example is missing fields {sorted(missing)} required by {schema}")
    feats = {}
    for name in schema.fields:
        value = example[name]
        if name == "prompt":
            feats[name] = _bytes(value.encode("utf-8") if isinstance(value, str) else bytes(value))
            continue
        arr = np.asarray(value)
        if arr.shape != shapes[name]:
            raise ValueError(f"field {name!r} has shape {arr.shape}, schema says {shapes[name]}")
        if name in ("retrieved_ids", "example_id"):
            ints = tf.train.Int64List(value=arr.reshape(-1).tolist())
            feats[name] = tf.train.Feature(int64_list=ints)
        else:
            stored = np.dtype(STORED_DTYPES[name]).newbyteorder("<")
            feats[name] = _bytes(np.ascontiguousarray(arr, stored).tobytes())
    return tf.train.Example(features=tf.train.Features(feature=feats)).SerializeToString()


def schema_of(example: Mapping[str, Any]) -> Schema:
    """Infers the schema from an example's array shapes (ids without arrays: neighbours by id)."""
    k = np.shape(example["retrieved_ids"])[0] if "retrieved_ids" in example else 0
    hspace = example.get("retrieved_hspace")
    neighbours = "ids" if k and "retrieved_pooled" not in example else "inline"
    return Schema(np.shape(example["latent"]), np.shape(example["prompt_embeds"]),
                  np.shape(example["pooled"])[-1], k, "noise" in example, neighbours,
                  None if hspace is None else np.shape(hspace)[1:])


def parse_example(serialized: tf.Tensor, schema: Schema) -> dict[str, tf.Tensor]:
    """Parses serialised examples (a scalar or a [B] batch) into tensors of the stored dtypes."""
    serialized = tf.convert_to_tensor(serialized)
    feats = tf.io.parse_example(serialized, feature_spec(schema))
    lead = tf.shape(serialized)
    out = {}
    for name, shape in schema.shapes().items():
        x = feats[name]
        if name in RAW_FIELDS:
            x = tf.io.decode_raw(x, tf.dtypes.as_dtype(STORED_DTYPES[name]), little_endian=True)
            x = tf.reshape(x, tf.concat([lead, tf.constant(shape, tf.int32)], 0))
        out[name] = x
    return out


def parse_example_numpy(serialized: bytes, schema: Schema) -> dict[str, Any]:
    """Parses one record without TF ops (diagnostics, tests); raises ValueError on any mismatch."""
    ex = tf.train.Example.FromString(serialized)
    feats = ex.features.feature
    out = {}
    for name, shape in schema.shapes().items():
        if name not in feats:
            raise ValueError(f"missing feature {name!r}")
        f = feats[name]
        if name == "prompt":
            out[name] = f.bytes_list.value[0].decode("utf-8")
        elif name in ("retrieved_ids", "example_id"):
            v = np.asarray(f.int64_list.value, np.int64)
            if v.size != max(1, int(np.prod(shape))):
                raise ValueError(f"{name}: {v.size} values, expected shape {shape}")
            out[name] = v.reshape(shape)
        else:
            dt = np.dtype(STORED_DTYPES[name]).newbyteorder("<")
            if len(f.bytes_list.value) != 1:
                raise ValueError(f"{name}: expected one bytes value, got {len(f.bytes_list.value)}")
            raw = f.bytes_list.value[0]
            need = int(np.prod(shape)) * dt.itemsize
            if len(raw) != need:
                raise ValueError(f"{name}: {len(raw)} bytes, expected {need} for {shape} {dt.name}")
            out[name] = np.frombuffer(raw, dt).reshape(shape).astype(dt.newbyteorder("="))
    return out


def shard_name(split: str, index: int, num_shards: int) -> str:
    """`{split}-{i:05d}-of-{n:05d}.tfrecord`."""
    return f"{split}-{index:05d}-of-{num_shards:05d}.tfrecord"


class ShardWriter:
    """Writes a split's examples round-robin into shards; one writer per host in multi-host jobs.

    Each host passes the shard indices it owns (e.g. `range(process_index, n, process_count)`);
    `close()` records a manifest part, and one host calls `write_manifest` after all have closed.
    Shards are written under a temporary name and renamed on close, so a killed job leaves no
    complete-looking shard behind.
    """

    def __init__(self, out_dir: str, split: str, schema: Schema, num_shards: int,
                 shard_indices: Iterable[int] | None = None):
        self.out_dir, self.split, self.schema, self.num_shards = out_dir, split, schema, num_shards
        self.shard_indices = list(range(num_shards) if shard_indices is None else shard_indices)
        if not self.shard_indices or not all(0 <= i < num_shards for i in self.shard_indices):
            raise ValueError(f"bad shard indices {self.shard_indices} for {num_shards} shards")
        tf.io.gfile.makedirs(out_dir)
        self._names = [shard_name(split, i, num_shards) for i in self.shard_indices]
        self._writers = [tf.io.TFRecordWriter(os.path.join(out_dir, n + ".tmp")) for n in self._names]
        self._counts = [0] * len(self._names)
        self._next = 0
        self.skipped: dict[str, int] = {}

    def write(self, example: Mapping[str, Any]) -> None:
        """Serialises and writes one example to the next shard."""
        self.write_serialized(serialize_example(example, self.schema))

    def write_serialized(self, record: bytes) -> None:
        """Writes an already serialised example."""
        self._writers[self._next].write(record)
        self._counts[self._next] += 1
        self._next = (self._next + 1) % len(self._writers)

    def skip(self, reason: str, n: int = 1) -> None:
        """Counts examples that were not written (recorded in the manifest)."""
        self.skipped[reason] = self.skipped.get(reason, 0) + n

    def close(self) -> dict[str, Any]:
        """Finalises the shards and writes this writer's manifest part; returns the part."""
        files = []
        for w, name, count in zip(self._writers, self._names, self._counts):
            w.close()
            path = os.path.join(self.out_dir, name)
            tf.io.gfile.rename(path + ".tmp", path, overwrite=True)
            files.append({"name": name, "num_examples": count,
                          "num_bytes": int(tf.io.gfile.stat(path).length)})
        part = {"split": self.split, "num_shards": self.num_shards, "files": files,
                "skipped": self.skipped, "schema": self.schema.to_dict()}
        parts_dir = os.path.join(self.out_dir, PARTS_DIR)
        tf.io.gfile.makedirs(parts_dir)
        with tf.io.gfile.GFile(os.path.join(parts_dir, f"{self.split}-{self.shard_indices[0]:05d}.json"),
                               "w") as f:
            json.dump(part, f, indent=1)
        return part

    def __enter__(self) -> ShardWriter:
        return self

    def __exit__(self, *exc) -> None:
        if exc[0] is None:
            self.close()


def write_manifest(out_dir: str, schema: Schema, *, source: Any = None,
                   index_params: Mapping[str, Any] | None = None,
                   extra: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """Merges the writers' parts into `manifest.json` (checks every shard of every split exists)."""
    parts_dir = os.path.join(out_dir, PARTS_DIR)
    splits: dict[str, Any] = {}
    for fname in sorted(tf.io.gfile.listdir(parts_dir)):
        with tf.io.gfile.GFile(os.path.join(parts_dir, fname)) as f:
            part = json.load(f)
        if Schema.from_dict(part["schema"]) != schema:
            raise ManifestError(f"{fname}: written with schema {part['schema']}, not {schema}")
        s = splits.setdefault(part["split"], {"num_shards": part["num_shards"], "files": [],
                                              "skipped": {}})
        s["files"].extend(part["files"])
        for reason, n in part["skipped"].items():
            s["skipped"][reason] = s["skipped"].get(reason, 0) + n
    for split, s in splits.items():
        s["files"].sort(key=lambda f: f["name"])
        names = [f["name"] for f in s["files"]]
        want = [shard_name(split, i, s["num_shards"]) for i in range(s["num_shards"])]
        if names != want:
            raise ManifestError(f"split {split!r}: shards {sorted(set(want) - set(names))} missing "
                                f"(or duplicated: {len(names)} parts for {len(want)} shards)")
        s["num_examples"] = sum(f["num_examples"] for f in s["files"])
    manifest = {
        "format": FORMAT_NAME,
        "schema_version": SCHEMA_VERSION,
        "schema": schema.to_dict(),
        "k": schema.k,
        "shapes": {n: list(v) for n, v in schema.shapes().items()},
        "dtypes": {n: STORED_DTYPES[n] for n in schema.fields},
        "splits": splits,
        "source": source,
        "index": dict(index_params or {}),
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(),
        **dict(extra or {}),
    }
    # Every host that finds all parts present writes it: each through its own temporary name.
    tmp = jsonfiles.temp_name(os.path.join(out_dir, MANIFEST))
    with tf.io.gfile.GFile(tmp, "w") as f:
        json.dump(manifest, f, indent=2)
    tf.io.gfile.rename(tmp, os.path.join(out_dir, MANIFEST), overwrite=True)
    return manifest


def write_examples(out_dir: str, split: str, examples: Iterable[Mapping[str, Any]],
                   schema: Schema, num_shards: int, **manifest_kw) -> dict[str, Any]:
    """Single-process convenience: writes a split and (re)writes the manifest."""
    with ShardWriter(out_dir, split, schema, num_shards) as w:
        for ex in examples:
            w.write(ex)
    return write_manifest(out_dir, schema, **manifest_kw)


def read_manifest(data_dir: str) -> dict[str, Any]:
    """Loads `data_dir/manifest.json`."""
    path = os.path.join(data_dir, MANIFEST)
    if not tf.io.gfile.exists(path):
        raise ManifestError(f"{data_dir!r} has no {MANIFEST}; was the TFRecord set written completely?")
    with tf.io.gfile.GFile(path) as f:
        try:
            return json.load(f)
        except json.JSONDecodeError as e:
            raise ManifestError(f"{path}: not valid JSON ({e})") from e


def validate_manifest(data_dir: str, *, split: str | None = None,
                      expected: Schema | Mapping[str, Any] | None = None,
                      check_files: bool = True) -> dict[str, Any]:
    """Checks the manifest before reading: format, schema version, shapes/dtypes, k, files.

    Args:
        data_dir: directory holding manifest.json and the shards.
        split: if given, it must be present (and its files are checked).
        expected: a `Schema`, or a mapping with any of its fields (e.g. {"k": 4}), that must match.
        check_files: every shard exists and has the recorded byte size (catches truncation).
    Returns:
        The manifest dict.
    """
    m = read_manifest(data_dir)
    where = os.path.join(data_dir, MANIFEST)
    jsonfiles.check_version(m, where, FORMAT_NAME, SCHEMA_VERSION, version_key="schema_version",
                            error=ManifestError, hint="regenerate the TFRecords")
    for key in ("schema", "shapes", "dtypes", "splits"):
        if key not in m:
            raise ManifestError(f"{where}: missing key {key!r}")
    try:
        schema = Schema.from_dict(m["schema"])
    except (KeyError, TypeError, ValueError) as e:
        raise ManifestError(f"{where}: bad schema {m['schema']!r} ({e})") from e
    if m["shapes"] != {n: list(v) for n, v in schema.shapes().items()}:
        raise ManifestError(f"{where}: shapes {m['shapes']} inconsistent with schema {schema}")
    if m["dtypes"] != {n: STORED_DTYPES[n] for n in schema.fields}:
        raise ManifestError(f"{where}: dtypes {m['dtypes']} differ from the schema's stored dtypes")
    if expected is not None:
        want = expected.to_dict() if isinstance(expected, Schema) else dict(expected)
        have = schema.to_dict()
        for key, value in want.items():
            if key not in have:
                raise ManifestError(f"unknown schema field {key!r} in expectations")
            norm = list(value) if isinstance(value, (tuple, list)) else value
            if have[key] != norm:
                raise ManifestError(f"{where}: {key} is {have[key]!r} but {norm!r} was expected")
    splits = [split] if split is not None else list(m["splits"])
    for s in splits:
        if s not in m["splits"]:
            raise ManifestError(f"{where}: no split {s!r} (have {sorted(m['splits'])})")
        if not check_files:
            continue
        for f in m["splits"][s]["files"]:
            path = os.path.join(data_dir, f["name"])
            if not tf.io.gfile.exists(path):
                raise ManifestError(f"{path}: listed in the manifest but missing")
            size = tf.io.gfile.stat(path).length
            if size != f["num_bytes"]:
                raise ManifestError(f"{path}: {size} bytes, the manifest records {f['num_bytes']} "
                                    "(truncated or rewritten)")
    return m


def split_files(data_dir: str, manifest: Mapping[str, Any], split: str) -> list[tuple[str, int]]:
    """(path, num_examples) of every shard of `split`, in shard order."""
    return [(os.path.join(data_dir, f["name"]), f["num_examples"])
            for f in manifest["splits"][split]["files"]]


def find_bad_record(files: Iterable[str], schema: Schema) -> RecordError | None:
    """Scans files in order and returns the first unreadable or unparsable record (diagnostics)."""
    for path in files:
        index = 0
        it = iter(tf.data.TFRecordDataset(path))
        while True:
            try:
                record = next(it)
            except StopIteration:
                break
            except (tf.errors.DataLossError, tf.errors.OpError) as e:
                return RecordError(path, index, f"unreadable ({e.message.splitlines()[0]})")
            try:
                parse_example_numpy(record.numpy(), schema)
            except Exception as e:  # pylint: disable=broad-except
                return RecordError(path, index, f"cannot parse ({e})")
            index += 1
    logging.info("find_bad_record: all records of %s parse", files)
    return None
