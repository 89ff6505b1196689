"""Optional per-entry cache of the retrieved branch: every database entry's H-space features.

The retrieved branch of ImageRAGTurbo runs the frozen student encoder at t = 0 on a neighbour's
(latent, prompt embeds) (``sampling.retrieved_hspace``). That is a pure function of the entry and
of the encoder weights, so it can be computed once per entry and gathered at inference instead of
running the encoder on B*k neighbours per call.

Layout, beside the database it caches (one folder per encoder fingerprint)::

  <db>/hspace_cache/<fingerprint>/
    manifest.json   format, version, fingerprint, the database's count and 'created', shape, dtype,
                    committed count
    hspace.bin      [N, hh, ww, C] float16, headerless C-order (8x8x1280 per entry at SD size)

A float32 cache (``dtype='float32'``, folder ``<fingerprint>-float32``) stores the encoder's
output exactly: twice the disk, for checks that compare with the encoder computed in the step.

The commit protocol is the database's: a batch is appended (and fsynced), then the manifest is
atomically replaced with the new count, the only commit point. A killed build resumes at the
committed count after truncating the uncommitted tail; a database that grew is extended; one that
was rebuilt (another 'created', or fewer entries) starts the cache over. The fingerprint covers the
encoder params only (`towers.encoder_params`), so a merged decoder LoRA keeps the cache valid.

Building is single-process: the batch is split over the local devices of one host.
"""

from __future__ import annotations

import datetime
import functools
import logging
import os
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from imagerag_jax import jsonfiles, sharding
from imagerag_jax.diffusion import sampling
from imagerag_jax.weights import towers
from imagerag_jax.errors import UserError
from imagerag_jax.retrieval import database as db_lib

CACHE_FORMAT = "imagerag-jax-hspace-cache"
CACHE_VERSION = 1
CACHE_ROOT = "hspace_cache"
MANIFEST = "manifest.json"
DATA = "hspace.bin"
DTYPE = np.float16  # the default storage dtype
DTYPES = ("float16", "float32")


# ---------------------------------------------------------------------------------------------
# Identity, paths and sizes.
# ---------------------------------------------------------------------------------------------


def encoder_fingerprint(unet_params: Any) -> str:
    """Fingerprint of the params the H-space depends on (the decoder, hence its LoRA, excluded).

    Taken of the weights rounded to bfloat16, so one checkpoint has one fingerprint whether it is
    held in float32 (generation, build-cache) or in bfloat16 (a trainer's `frozen_param_dtype`).
    """
    rounded = jax.tree.map(lambda x: x.astype(jnp.bfloat16), towers.encoder_params(unet_params))
    return towers.fingerprint(rounded)


def cache_dir(db_path: str, fingerprint: str, dtype: str = "float16") -> str:
    """The cache folder of one encoder fingerprint (and storage dtype) beside the database."""
    if dtype not in DTYPES:
        raise UserError(f"an H-space cache stores {' or '.join(DTYPES)}, not {dtype!r}")
    name = fingerprint if dtype == "float16" else f"{fingerprint}-{dtype}"
    return os.path.join(db_path, CACHE_ROOT, name)


def bytes_per_entry(shape: Sequence[int], dtype: Any = DTYPE) -> int:
    """Bytes one entry's H-space takes on disk (float16 unless the cache was built otherwise)."""
    return int(np.prod(shape, dtype=np.int64)) * np.dtype(dtype).itemsize


def size_per_million(shape: Sequence[int]) -> str:
    """Disk size per 1M entries: '152.6 GiB (163.8 GB) per 1M entries (163,840 B/entry)' at SD size."""
    total = bytes_per_entry(shape) * 1_000_000
    return (f"{total / 2**30:.1f} GiB ({total / 1e9:.1f} GB) per 1M entries "
            f"({bytes_per_entry(shape):,} B/entry)")


# ---------------------------------------------------------------------------------------------
# The encoder: one jitted program on a fixed, device-sharded batch.
# ---------------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=8)
def _program(unet: Any, batch: jax.sharding.NamedSharding, dtype: str = "float16") -> Any:
    """The jitted encoder of one module, batch sharding and output dtype (kept: later builds reuse
    its compile)."""
    rep = sharding.replicated(batch.mesh)

    def encode(p, latents, embeds):
        h = sampling.retrieved_hspace(unet, p, latents[:, None].astype(jnp.float32),
                                      embeds[:, None].astype(jnp.float32))[:, 0]
        return h.astype(dtype)

    return jax.jit(encode, in_shardings=(rep, batch, batch), out_shardings=batch)


class Encoder:
    """The frozen encoder at t = 0 on `batch_size` DB rows, the batch split over the mesh.

    `batch_size` is rounded up to a multiple of the batch shards; shorter batches are zero-padded
    so that the program compiles once.
    """

    def __init__(self, unet: Any, unet_params: Any, batch_size: int, mesh: Any = None,
                 dtype: str = "float16"):
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if mesh is None:
            mesh = sharding.make_mesh((("data", -1),), jax.local_devices())
        shards = sharding.batch_shards(mesh)
        self.batch_size = -(-batch_size // shards) * shards
        self.sharding = sharding.batch_sharding(mesh)
        rep = sharding.replicated(mesh)
        params = towers.encoder_params(unet_params)  # what the fingerprint covers, nothing more
        self.params = sharding.put(params, jax.tree.map(lambda _: rep, params))
        self._fn = _program(unet, self.sharding, dtype)

    def output_shape(self, latent_shape: Sequence[int], embed_shape: Sequence[int]
                     ) -> tuple[int, ...]:
        """(hh, ww, C) of one entry, without running the encoder."""
        spec = lambda s: jax.ShapeDtypeStruct((self.batch_size, *s), DTYPE)
        out = jax.eval_shape(self._fn, self.params, spec(latent_shape), spec(embed_shape))
        return tuple(int(d) for d in out.shape[1:])

    def __call__(self, latents: np.ndarray, embeds: np.ndarray) -> jax.Array:
        """Dispatches n <= batch_size rows (asynchronously); the result has batch_size rows."""
        n = len(latents)
        if not 0 < n <= self.batch_size:
            raise ValueError(f"{n} rows for an encoder batch of {self.batch_size}")
        pad = lambda x: np.concatenate([x, np.zeros((self.batch_size - n, *x.shape[1:]), x.dtype)])
        latents, embeds = np.asarray(latents, DTYPE), np.asarray(embeds, DTYPE)
        if n < self.batch_size:
            latents, embeds = pad(latents), pad(embeds)
        return self._fn(self.params, latents, embeds)


def make_encoder(unet: Any, unet_params: Any, batch_size: int, mesh: Any = None,
                 dtype: str = "float16") -> Encoder:
    """The `Encoder` that `build_cache` runs (a seam for tests that count calls)."""
    return Encoder(unet, unet_params, batch_size, mesh, dtype)


# ---------------------------------------------------------------------------------------------
# Manifest.
# ---------------------------------------------------------------------------------------------


def _read_manifest(path: str) -> dict[str, Any] | None:
    """The cache manifest in folder `path`; None when absent, UserError naming it when corrupt."""
    mpath = os.path.join(path, MANIFEST)
    if not os.path.exists(mpath):
        return None
    m = jsonfiles.read_versioned(mpath, CACHE_FORMAT, CACHE_VERSION, what="H-space cache manifest",
                                 error=UserError, hint=f"delete {path} and rebuild the cache")
    ok = (isinstance(m.get("fingerprint"), str) and isinstance(m.get("count"), int)
          and isinstance(m.get("db"), dict) and isinstance(m.get("shape"), list)
          and m.get("dtype") in DTYPES)
    if not ok:
        raise UserError(f"{mpath}: not a valid H-space cache manifest (needs fingerprint, count, "
                        f"db, shape and a dtype of {DTYPES}); delete {path} and rebuild it")
    return m


def _write_manifest(path: str, manifest: dict[str, Any], fsync: bool) -> None:
    """Atomically replaces the manifest: the commit point."""
    jsonfiles.write_atomic(os.path.join(path, MANIFEST), manifest, fsync=fsync)


def _db_identity(db: db_lib.Database) -> dict[str, Any]:
    return {"count": db.count, "created": db.manifest.get("created")}


def _mismatch(m: dict[str, Any], db: db_lib.Database, shape: tuple[int, ...] | None) -> str | None:
    """Why a cache manifest cannot be resumed against `db` (None when it can)."""
    if m["db"].get("created") != db.manifest.get("created"):
        return "the database was rebuilt (another 'created' time)"
    if db.count < m["db"].get("count", 0) or db.count < m["count"]:
        return (f"the database has {db.count} entries, fewer than the "
                f"{max(m['db'].get('count', 0), m['count'])} the cache was built for")
    if shape is not None and tuple(m["shape"]) != tuple(shape):
        return f"the cache's shape {tuple(m['shape'])} is not the encoder's {tuple(shape)}"
    return None


def _truncate(path: str, size: int) -> bool:
    """Cuts `path` to `size` bytes (creating it when size is 0); False when it is shorter."""
    have = os.path.getsize(path) if os.path.exists(path) else 0
    if have < size:
        return False
    with open(path, "ab") as f:
        f.truncate(size)
    return True


# ---------------------------------------------------------------------------------------------
# Build.
# ---------------------------------------------------------------------------------------------


def build_cache(db_path: str, unet: Any, unet_params: Any, *, batch_size: int = 16,
                mesh: Any = None, fsync: bool = True, progress: bool = True,
                dtype: str = "float16") -> str:
    """Computes (or resumes, or extends) the H-space cache of the database at `db_path`; its folder.

    `unet`/`unet_params` are the student's (a merged decoder LoRA does not matter). `mesh` splits
    each batch over its devices (default: every local device on a 'data' axis). `dtype`: the
    storage dtype (float32: the encoder's output exactly, for checks; see the module docstring).
    """
    from tqdm.auto import tqdm  # pylint: disable=g-import-not-at-top

    db = db_lib.Database.open(db_path)
    fp = encoder_fingerprint(unet_params)
    path = cache_dir(db_path, fp, dtype)
    os.makedirs(path, exist_ok=True)
    encoder = make_encoder(unet, unet_params, batch_size, mesh, dtype)
    shape = encoder.output_shape(db.shapes["latents"], db.shapes["prompt_embeds"])
    row = bytes_per_entry(shape, dtype)
    data = os.path.join(path, DATA)

    m = _read_manifest(path)
    if m is not None:
        why = ("its fingerprint is not this folder's" if m["fingerprint"] != fp
               else f"it stores {m['dtype']}, not {dtype}" if m["dtype"] != dtype
               else _mismatch(m, db, shape))
        if why is None and not _truncate(data, m["count"] * row):
            why = f"{data} is shorter than its {m['count']} committed entries"
        if why is not None:
            logging.warning("Starting the H-space cache %s over: %s.", path, why)
            m = None
        elif m["count"]:
            logging.info("Resuming the H-space cache %s at %d of %d entries.", path, m["count"],
                         db.count)
    fresh = m is None
    if fresh:
        m = {"format": CACHE_FORMAT, "version": CACHE_VERSION, "fingerprint": fp, "count": 0,
             "shape": list(shape), "dtype": dtype,
             "created": datetime.datetime.now(datetime.timezone.utc).isoformat()}
    m["db"] = _db_identity(db)
    _write_manifest(path, m, fsync)
    if fresh:  # after the manifest says 0: a crash in between leaves an empty, valid cache
        _truncate(data, 0)

    def commit(start: int, n: int, out: jax.Array) -> None:
        # Data first, manifest last: a crash in between leaves an uncommitted tail only.
        h = np.ascontiguousarray(np.asarray(out)[:n], dtype)
        with open(data, "ab") as f:
            f.write(h.tobytes())
            f.flush()
            if fsync:
                os.fsync(f.fileno())
        m["count"] = start + n
        _write_manifest(path, m, fsync)
        bar.update(n)

    bar = tqdm(total=db.count, initial=m["count"], desc="H-space cache", unit="entry",
               disable=not progress, leave=False)
    pending = None
    try:
        for start in range(m["count"], db.count, encoder.batch_size):
            stop = min(start + encoder.batch_size, db.count)
            # Dispatch this batch before writing the previous one: disk and device overlap.
            out = encoder(db.latents[start:stop], db.prompt_embeds[start:stop])
            if pending is not None:
                commit(*pending)
            pending = (start, stop - start, out)
        if pending is not None:
            commit(*pending)
    finally:
        bar.close()
    return path


# ---------------------------------------------------------------------------------------------
# Read.
# ---------------------------------------------------------------------------------------------


class HSpaceCache:
    """Read-only, memory-mapped view of a complete cache: `gather(rows)` reads only those rows."""

    def __init__(self, path: str, manifest: dict[str, Any]):
        self.path = path
        self.manifest = manifest
        self.fingerprint: str = manifest["fingerprint"]
        self.count: int = int(manifest["count"])
        self.shape: tuple[int, int, int] = tuple(int(d) for d in manifest["shape"])
        self.dtype = np.dtype(manifest["dtype"])
        full = (self.count, *self.shape)
        if self.count == 0:  # mmap cannot map zero bytes.
            self._data = np.zeros(full, self.dtype)
        else:
            self._data = np.memmap(os.path.join(path, DATA), dtype=self.dtype, mode="r", shape=full)

    def gather(self, rows: np.ndarray | Sequence[int]) -> np.ndarray:
        """H-space of DB `rows` (any int shape): rows.shape + shape, in the stored dtype."""
        rows = np.asarray(rows, np.int64)
        flat = rows.reshape(-1)
        if flat.size and (flat.min() < 0 or flat.max() >= self.count):
            bad = flat[(flat < 0) | (flat >= self.count)]
            raise IndexError(f"rows {bad[:10].tolist()} out of range for a cache of {self.count}")
        # memmap fancy indexing is fastest on sorted unique rows; undo the permutation after.
        uniq, inverse = np.unique(flat, return_inverse=True)
        got = np.asarray(self._data[uniq])[inverse.reshape(-1)]
        return got.reshape(rows.shape + self.shape)

    def __len__(self) -> int:
        return self.count

    def nbytes(self) -> int:
        """Bytes of the committed features on disk."""
        return self.count * bytes_per_entry(self.shape, self.dtype)

    def describe(self) -> dict[str, Any]:
        """Path, fingerprint, count, shape and size (for logs and manifests)."""
        return {"path": self.path, "fingerprint": self.fingerprint, "count": self.count,
                "shape": list(self.shape), "dtype": self.dtype.name, "bytes": self.nbytes()}

    def __repr__(self) -> str:
        return f"HSpaceCache({self.path!r}, count={self.count}, shape={self.shape})"


def open_cache(db_path: str, unet_params: Any = None, *, fingerprint: str | None = None,
               dtype: str = "float16") -> HSpaceCache | None:
    """The complete cache (of `dtype`) of the database for these encoder params (or fingerprint);
    else None.

    None, with a logging.info line saying why, when there is no cache for this encoder, when it
    is incomplete, or when the database changed since it was built.
    """
    if (unet_params is None) == (fingerprint is None):
        raise ValueError("open_cache needs exactly one of unet_params and fingerprint")
    db = db_lib.Database.open(db_path)
    fp = fingerprint if fingerprint is not None else encoder_fingerprint(unet_params)
    path = cache_dir(db_path, fp, dtype)
    m = _read_manifest(path)
    why = None
    if m is None:
        root = os.path.join(db_path, CACHE_ROOT)
        others = sorted(os.listdir(root)) if os.path.isdir(root) else []
        others = [o for o in others if o != os.path.basename(path)]
        why = f"no H-space cache for encoder {fp} at {path}" + (
            f" (caches exist for other encoders: {', '.join(others)})" if others else "")
    elif m["fingerprint"] != fp or m["dtype"] != dtype:
        why = f"{path} holds a {m['dtype']} cache of encoder {m['fingerprint']}, not {fp}'s {dtype}"
    else:
        changed = _mismatch(m, db, None)
        if changed is not None:
            why = f"the H-space cache {path} is stale: {changed}"
        elif m["count"] < db.count:
            why = (f"the H-space cache {path} is incomplete ({m['count']} of {db.count} entries); "
                   "run build_cache to finish it")
        else:
            data = os.path.join(path, DATA)
            size = os.path.getsize(data) if os.path.exists(data) else 0
            if size < m["count"] * bytes_per_entry(m["shape"], m["dtype"]):
                why = f"the H-space cache {path} is truncated ({size} bytes for {m['count']} entries)"
    if why is not None:
        logging.info("Not using an H-space cache: %s.", why)
        return None
    return HSpaceCache(path, m)

