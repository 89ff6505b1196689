"""The retrieval database on disk: append-only writer with resume, memory-mapped reader.

Layout of a database directory (schema version 1)::

  manifest.json          schema version, committed count, shapes, dtypes, source, model identities
  latents.bin            [N, H, W, C]  float16   VAE latents (scaled, NHWC)
  prompt_embeds.bin      [N, L, D]     float16   text-encoder last hidden states (L = 77)
  pooled.bin             [N, D]        float32   L2-normalised pooled text embeddings
  ids.bin                [N]           int64     stable example ids (unique)
  captions.bin           utf-8 bytes of all captions, concatenated
  caption_offsets.bin    [N + 1]       int64     caption i = captions.bin[off[i]:off[i + 1]]

Arrays are headerless C-order files whose shapes and dtypes live in the manifest, so that appending
is a plain file append (a `.npy` header would have to be rewritten on every batch). They are read
with `np.memmap`; nothing is loaded until rows are gathered (`db.latents[rows]`).

Commit protocol: the writer appends a batch to every file, flushes (and fsyncs), then atomically
replaces the manifest with the new count. The manifest's `count` is the only commit point: a writer
killed mid-batch leaves bytes past the committed rows, which a resuming writer truncates away.

`concatenate` writes the rows of several committed databases as one (how `data/build_db.py` joins
the parts that the hosts of a multi-host build wrote). Building the database (encoding image-text
pairs) is `build_db`'s job; this module only owns the format.
"""

from __future__ import annotations

import dataclasses
import datetime
import logging
import os
from collections.abc import Sequence
from typing import Any

import numpy as np

from imagerag_jax import jsonfiles
from imagerag_jax.errors import UserError

SCHEMA_VERSION = 1
FORMAT_NAME = "imagerag-jax-retrieval-db"
MANIFEST = "manifest.json"

# name -> (file name, stored dtype); captions are handled separately.
ARRAYS = {
    "latents": ("latents.bin", np.float16),
    "prompt_embeds": ("prompt_embeds.bin", np.float16),
    "pooled": ("pooled.bin", np.float32),
    "ids": ("ids.bin", np.int64),
}
CAPTIONS = "captions.bin"
CAPTION_OFFSETS = "caption_offsets.bin"


class DatabaseError(UserError):
    """A database directory is missing, inconsistent, or does not match what was asked for."""


@dataclasses.dataclass(frozen=True)
class DatabaseSpec:
    """Per-entry shapes of a database (without the leading N)."""

    latent_shape: tuple[int, int, int]  # (H, W, C), NHWC
    embed_shape: tuple[int, int]  # (L, D): tokens x width of the text encoder's hidden states
    pooled_dim: int  # D of the pooled embedding

    def shapes(self) -> dict[str, tuple[int, ...]]:
        """Row shape of every array."""
        return {
            "latents": tuple(self.latent_shape),
            "prompt_embeds": tuple(self.embed_shape),
            "pooled": (self.pooled_dim,),
            "ids": (),
        }


@dataclasses.dataclass(frozen=True)
class Encoders:
    """The text encoder and VAE that wrote a database's rows (or that a job would read them with).

    ``text_encoder`` and ``vae`` are ``label#archhash`` (``weights.towers.module_identity``): the
    label is an absolute path, a hub id with its commit (``org/name@<commit>``, `weights.hub`) or
    ``random:preset:seed``: the provenance of the rows, ignored by `check_encoders`, since paths
    change when a workdir is moved or copied and a local folder may hold the same weights as a hub
    id; the weights are told apart by their fingerprints
    (``weights.towers.fingerprint``), None where unknown.
    """

    text_encoder: str
    vae: str
    text_encoder_fingerprint: str | None = None
    vae_fingerprint: str | None = None

    @classmethod
    def of_manifest(cls, manifest: dict[str, Any]) -> Encoders:
        """The encoders a database manifest records (identities at the top, fingerprints in extra)."""
        extra = manifest.get("extra") or {}
        return cls(manifest.get("text_encoder") or "", manifest.get("vae") or "",
                   extra.get("text_encoder_fingerprint"), extra.get("vae_fingerprint"))


def _arch_hash(identity: str) -> str:
    """'label#archhash' -> 'archhash'; an identity without a hash is compared whole."""
    return identity.rsplit("#", 1)[1] if "#" in identity else identity


def check_encoders(path: str, manifest: dict[str, Any], want: Encoders) -> None:
    """Refuses a database whose rows another text encoder or VAE wrote than `want`.

    The one compatibility rule of build-db's resume, precompute's retrieval and generation: the
    architecture hashes must be equal, and the weight fingerprints too where both are known. The
    labels (paths) are not compared, so a moved or copied workdir keeps its database.

    Raises:
        DatabaseError: one sentence naming the database, the encoder and both identities.
    """
    have = Encoders.of_manifest(manifest)
    for what in ("text_encoder", "vae"):
        have_id, want_id = getattr(have, what), getattr(want, what)
        have_fp, want_fp = getattr(have, f"{what}_fingerprint"), getattr(want, f"{what}_fingerprint")
        if not have_id:
            logging.warning("%s records no %s identity; cannot check it matches this job's", path, what)
            continue
        weights_differ = have_fp is not None and want_fp is not None and have_fp != want_fp
        if _arch_hash(have_id) != _arch_hash(want_id) or weights_differ:
            raise DatabaseError(
                f"{path} was built with {what} {have_id}{f' (weights {have_fp})' if have_fp else ''}, "
                f"but this job's is {want_id}{f' (weights {want_fp})' if want_fp else ''}: its rows "
                "need the same text encoder and VAE weights; rebuild the database with these "
                "(build-db with config.db.overwrite=True, or another config.db.dir)")


def _row_bytes(name: str, shape: Sequence[int]) -> int:
    return int(np.prod(shape, dtype=np.int64)) * np.dtype(ARRAYS[name][1]).itemsize


def _read_manifest(path: str) -> dict[str, Any]:
    """Reads and checks the manifest of the database at `path`."""
    mpath = os.path.join(path, MANIFEST)
    if not os.path.isdir(path):
        raise DatabaseError(f"retrieval database {path!r} does not exist")
    if not os.path.exists(mpath):
        raise DatabaseError(f"retrieval database {path!r} has no {MANIFEST}")
    m = jsonfiles.read_versioned(mpath, FORMAT_NAME, SCHEMA_VERSION, what="database manifest",
                                 version_key="schema_version", error=DatabaseError,
                                 hint="rebuild the database")
    for key in ("count", "shapes", "dtypes"):
        if key not in m:
            raise DatabaseError(f"{mpath}: missing key {key!r}")
    for name, (_, dtype) in ARRAYS.items():
        if name not in m["shapes"]:
            raise DatabaseError(f"{mpath}: no shape recorded for {name!r}")
        if np.dtype(m["dtypes"].get(name)) != np.dtype(dtype):
            raise DatabaseError(f"{mpath}: {name} dtype {m['dtypes'].get(name)!r} != {np.dtype(dtype)}")
    return m


def write_manifest(path: str, manifest: dict[str, Any]) -> None:
    """Atomically replaces the manifest of the database at `path` (fsynced): the commit point.

    The writer commits through it; a builder also calls it to commit manifest-only changes (e.g.
    final skip counts in ``extra``) to a writer's ``manifest`` without appending rows.
    """
    jsonfiles.write_atomic(os.path.join(path, MANIFEST), manifest)


class DatabaseWriter:
    """Appends entries to a database directory in batches; resumes from the committed count.

    Usage (the builder job)::

        with DatabaseWriter(path, spec, source="digits/database", text_encoder=..., vae=...) as w:
            for batch in batches_after(w.count):  # skip what an earlier, killed run committed
                w.append(captions, latents, prompt_embeds, pooled, ids)

    A fresh directory is created; an existing one is resumed when its manifest matches `spec`, the
    source and the encoders (`check_encoders`, with the fingerprints in `extra`; else
    `DatabaseError`), or wiped when `overwrite=True`.
    """

    def __init__(self, path: str, spec: DatabaseSpec, *, source: str = "",
                 text_encoder: str = "", vae: str = "", overwrite: bool = False,
                 fsync: bool = True, extra: dict[str, Any] | None = None):
        self.path = path
        self.spec = spec
        self._fsync = fsync
        shapes = {k: list(v) for k, v in spec.shapes().items()}
        identity = {"source": source, "text_encoder": text_encoder, "vae": vae}
        exists = os.path.exists(os.path.join(path, MANIFEST))
        if exists and overwrite:
            for fname in [MANIFEST, CAPTIONS, CAPTION_OFFSETS] + [f for f, _ in ARRAYS.values()]:
                if os.path.exists(os.path.join(path, fname)):
                    os.remove(os.path.join(path, fname))
            exists = False
        os.makedirs(path, exist_ok=True)
        if exists:
            m = _read_manifest(path)
            if m["shapes"] != shapes:
                raise DatabaseError(
                    f"{path}: cannot resume, manifest shapes {m['shapes']} != requested {shapes}")
            if m.get("source") != source:
                raise DatabaseError(
                    f"{path}: cannot resume, manifest source {m.get('source')!r} != requested "
                    f"{source!r} (pass overwrite=True to rebuild)")
            given = extra or {}
            check_encoders(path, m, Encoders(text_encoder, vae, given.get("text_encoder_fingerprint"),
                                             given.get("vae_fingerprint")))
            self.manifest = m
            self._truncate_to(m["count"])
            if m["count"]:
                logging.info("Resuming retrieval database %s at %d committed entries.", path, m["count"])
        else:
            self.manifest = {
                "format": FORMAT_NAME,
                "schema_version": SCHEMA_VERSION,
                "count": 0,
                "shapes": shapes,
                "dtypes": {k: np.dtype(dt).name for k, (_, dt) in ARRAYS.items()},
                "created": datetime.datetime.now(datetime.timezone.utc).isoformat(),
                **identity,
                "extra": extra or {},
            }
            self._truncate_to(0)
            write_manifest(path, self.manifest)

    @property
    def count(self) -> int:
        """Number of committed entries."""
        return int(self.manifest["count"])

    def _file(self, fname: str) -> str:
        return os.path.join(self.path, fname)

    def _truncate_to(self, count: int) -> None:
        """Drops bytes past `count` committed rows (left by a killed writer)."""
        for name, (fname, _) in ARRAYS.items():
            self._truncate_file(fname, count * _row_bytes(name, self.manifest["shapes"][name]))
        offsets_file = self._file(CAPTION_OFFSETS)
        if count == 0:
            with open(offsets_file, "wb") as f:
                f.write(np.zeros(1, np.int64).tobytes())
            self._truncate_file(CAPTIONS, 0)
            self._caption_end = 0
            return
        self._truncate_file(CAPTION_OFFSETS, (count + 1) * 8)
        self._caption_end = int(np.fromfile(offsets_file, np.int64, count=1, offset=count * 8)[0])
        self._truncate_file(CAPTIONS, self._caption_end)

    def _truncate_file(self, fname: str, size: int) -> None:
        path = self._file(fname)
        have = os.path.getsize(path) if os.path.exists(path) else 0
        if have < size:
            raise DatabaseError(
                f"{path}: has {have} bytes but the manifest commits {size}; the database is corrupt")
        with open(path, "ab") as f:
            f.truncate(size)

    def append(self, captions: Sequence[str], latents: np.ndarray, prompt_embeds: np.ndarray,
               pooled: np.ndarray, ids: np.ndarray | Sequence[int] | None = None) -> None:
        """Appends and commits one batch; pooled embeddings are L2-normalised here.

        Args:
            captions: B strings.
            latents: [B, H, W, C] VAE latents (cast to float16).
            prompt_embeds: [B, L, D] text-encoder hidden states (cast to float16).
            pooled: [B, D] pooled text embeddings (normalised, stored float32).
            ids: B stable int64 ids; default: consecutive from the current count.
        """
        b = len(captions)
        if ids is None:
            ids = np.arange(self.count, self.count + b, dtype=np.int64)
        pooled = np.asarray(pooled, np.float32)
        pooled = pooled / np.maximum(np.linalg.norm(pooled, axis=-1, keepdims=True), 1e-12)
        arrays = {"latents": latents, "prompt_embeds": prompt_embeds, "pooled": pooled, "ids": ids}
        for name, value in arrays.items():
            value = np.asarray(value)
            want = (b, *self.manifest["shapes"][name])
            if value.shape != want:
                raise DatabaseError(f"append: {name} has shape {value.shape}, expected {want}")
            if name == "ids" and value.dtype.kind not in "iu":
                raise DatabaseError(f"append: ids must be integers, got {value.dtype}")
            arrays[name] = np.ascontiguousarray(value, ARRAYS[name][1])
        if len(np.unique(arrays["ids"])) != b:
            raise DatabaseError("append: duplicate ids within the batch")
        encoded = [c.encode("utf-8") for c in captions]
        ends = self._caption_end + np.cumsum([len(e) for e in encoded], dtype=np.int64)

        # Data first, manifest last: a crash in between leaves uncommitted tail bytes only.
        for name, (fname, _) in ARRAYS.items():
            self._append_bytes(fname, arrays[name].tobytes())
        self._append_bytes(CAPTIONS, b"".join(encoded))
        self._append_bytes(CAPTION_OFFSETS, ends.tobytes())
        if b:
            self._caption_end = int(ends[-1])
        self.manifest["count"] = self.count + b
        write_manifest(self.path, self.manifest)

    def _append_bytes(self, fname: str, data: bytes) -> None:
        with open(self._file(fname), "ab") as f:
            f.write(data)
            if self._fsync:
                f.flush()
                os.fsync(f.fileno())

    def close(self) -> None:
        """Nothing is buffered between appends; kept for symmetry and `with` use."""

    def __enter__(self) -> DatabaseWriter:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class Database:
    """Read-only, memory-mapped view of a committed database.

    `latents`, `prompt_embeds`, `pooled` and `ids` are `np.memmap`s of the committed rows, so opening
    a 1M-entry database reads only the manifest; `db.latents[rows]` gathers rows into memory.
    """

    def __init__(self, path: str):
        self.path = path
        self.manifest = _read_manifest(path)
        self.count = int(self.manifest["count"])
        self.shapes = {k: tuple(v) for k, v in self.manifest["shapes"].items()}
        for name, (fname, dtype) in ARRAYS.items():
            setattr(self, name, self._map(fname, dtype, (self.count, *self.shapes[name])))
        self._offsets = self._map(CAPTION_OFFSETS, np.int64, (self.count + 1,))
        n_text = int(self._offsets[-1]) if self.count else 0
        self._captions = self._map(CAPTIONS, np.uint8, (n_text,))
        self._id_order: np.ndarray | None = None

    latents: np.ndarray
    prompt_embeds: np.ndarray
    pooled: np.ndarray
    ids: np.ndarray

    @classmethod
    def open(cls, path: str) -> Database:
        """Opens the database at `path` (validates the manifest and file sizes)."""
        return cls(path)

    def _map(self, fname: str, dtype: Any, shape: tuple[int, ...]) -> np.ndarray:
        fpath = os.path.join(self.path, fname)
        if not os.path.exists(fpath):
            raise DatabaseError(f"retrieval database {self.path!r}: missing file {fname}")
        need = int(np.prod(shape, dtype=np.int64)) * np.dtype(dtype).itemsize
        have = os.path.getsize(fpath)
        if have < need:
            raise DatabaseError(
                f"{fpath}: {have} bytes, but {self.count} committed entries of shape {shape[1:]} "
                f"({np.dtype(dtype).name}) need {need}; the file is truncated or the shapes are wrong")
        if need == 0:  # mmap cannot map zero bytes.
            return np.zeros(shape, dtype)
        return np.memmap(fpath, dtype=dtype, mode="r", shape=shape)

    def __len__(self) -> int:
        return self.count

    @property
    def spec(self) -> DatabaseSpec:
        """Per-entry shapes as a `DatabaseSpec`."""
        return DatabaseSpec(self.shapes["latents"], self.shapes["prompt_embeds"],
                            self.shapes["pooled"][0])

    @property
    def caption_offsets(self) -> np.ndarray:
        """[N + 1] int64: caption i is bytes [off[i], off[i + 1]) of captions.bin."""
        return self._offsets

    def caption(self, row: int) -> str:
        """Caption of one row."""
        row = int(row)
        if not -self.count <= row < self.count:
            raise IndexError(f"row {row} out of range for a database of {self.count}")
        row %= self.count
        start, end = int(self._offsets[row]), int(self._offsets[row + 1])
        return self._captions[start:end].tobytes().decode("utf-8")

    def captions(self, rows: Sequence[int] | np.ndarray | None = None) -> list[str]:
        """Captions of the given rows (all when None)."""
        rows = range(self.count) if rows is None else np.asarray(rows).reshape(-1)
        return [self.caption(r) for r in rows]

    def rows_for_ids(self, ids: np.ndarray | Sequence[int]) -> np.ndarray:
        """Maps stable ids to row positions (vectorised); unknown ids raise `KeyError`."""
        if self._id_order is None:
            order = np.argsort(self.ids, kind="stable")
            if self.count > 1 and np.any(np.diff(np.asarray(self.ids)[order]) == 0):
                raise DatabaseError(f"{self.path}: ids are not unique")
            self._id_order = order
        ids = np.asarray(ids, np.int64)
        sorted_ids = np.asarray(self.ids)[self._id_order]
        pos = np.clip(np.searchsorted(sorted_ids, ids), 0, max(self.count - 1, 0))
        if self.count == 0 or np.any(sorted_ids[pos] != ids):
            missing = ids[(sorted_ids[pos] != ids)] if self.count else ids
            raise KeyError(f"ids not in the database: {missing.reshape(-1)[:10].tolist()}")
        return self._id_order[pos]

    def gather(self, rows: np.ndarray | Sequence[int],
               names: Sequence[str] | None = None) -> dict[str, np.ndarray]:
        """Gathers latents, prompt_embeds, pooled and ids of `rows` (any shape) into memory
        (only the arrays in `names`, when given: the others are not read)."""
        rows = np.asarray(rows, np.int64)
        flat = rows.reshape(-1)
        # memmap fancy indexing is fastest on sorted unique rows; undo the permutation after.
        uniq, inverse = np.unique(flat, return_inverse=True)
        out = {}
        for name in ARRAYS if names is None else names:
            got = np.asarray(getattr(self, name)[uniq])[inverse]
            out[name] = got.reshape(rows.shape + got.shape[1:])
        return out

    def __repr__(self) -> str:
        return (f"Database({self.path!r}, count={self.count}, shapes={self.shapes}, "
                f"text_encoder={self.manifest.get('text_encoder')!r}, vae={self.manifest.get('vae')!r})")


def open_database(path: str) -> Database:
    """Opens a database directory for reading."""
    return Database(path)


def copy_prefix(dst: str, srcs: Sequence[tuple[str, int]], fsync: bool) -> None:
    """Writes `dst` as the concatenation of the first `n` bytes of each (file, n) in `srcs`."""
    with open(dst, "wb") as out:
        for src, n in srcs:
            with open(src, "rb") as f:
                left = n
                while left:
                    chunk = f.read(min(left, 1 << 24))
                    if not chunk:
                        raise DatabaseError(f"{src}: shorter than its {n} committed bytes")
                    out.write(chunk)
                    left -= len(chunk)
        if fsync:
            out.flush()
            os.fsync(out.fileno())


def concatenate(path: str, parts: Sequence[Database], *, manifest_extra: dict[str, Any],
                fsync: bool = True) -> Database:
    """Writes the rows of committed databases `parts`, in order, as one database at `path`.

    The parts must agree in shapes and identities (source, text encoder, VAE). The old manifest is
    removed first and the new one written last, so a crash in between leaves no committed
    database (never a mix); other files in `path` (e.g. the parts' own folder) are left alone.
    """
    if not parts:
        raise DatabaseError(f"{path}: no databases to concatenate")
    first = parts[0].manifest
    for p in parts[1:]:
        for key in ("shapes", "source", "text_encoder", "vae"):
            if p.manifest.get(key) != first.get(key):
                raise DatabaseError(f"cannot concatenate {parts[0].path} and {p.path}: their {key} "
                                    f"differ ({first.get(key)!r} != {p.manifest.get(key)!r})")
    ids = np.concatenate([np.asarray(p.ids) for p in parts])
    if len(np.unique(ids)) != len(ids):
        raise DatabaseError(f"{path}: the databases to concatenate share ids")
    os.makedirs(path, exist_ok=True)
    if os.path.exists(os.path.join(path, MANIFEST)):
        os.remove(os.path.join(path, MANIFEST))  # uncommit the old rows before overwriting them
    for name, (fname, _) in ARRAYS.items():
        copy_prefix(os.path.join(path, fname),
                    [(os.path.join(p.path, fname), p.count * _row_bytes(name, p.shapes[name]))
                     for p in parts], fsync)
    ends = [np.asarray(p.caption_offsets[1:], np.int64) for p in parts]
    text_ends = [int(e[-1]) if len(e) else 0 for e in ends]
    copy_prefix(os.path.join(path, CAPTIONS),
                [(os.path.join(p.path, CAPTIONS), n) for p, n in zip(parts, text_ends)], fsync)
    starts = np.cumsum([0] + text_ends[:-1], dtype=np.int64)  # each part's captions move by this
    offsets = np.concatenate([np.zeros(1, np.int64)] + [e + s for e, s in zip(ends, starts)])
    with open(os.path.join(path, CAPTION_OFFSETS), "wb") as f:
        f.write(offsets.tobytes())
        if fsync:
            f.flush()
            os.fsync(f.fileno())
    manifest = {**first, "count": int(sum(p.count for p in parts)), "extra": manifest_extra,
                "created": datetime.datetime.now(datetime.timezone.utc).isoformat()}
    write_manifest(path, manifest)
    return Database(path)
