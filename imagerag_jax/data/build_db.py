"""The build-db job: an image-text source -> VAE latents + text embeddings -> retrieval DB + index.

`build_db(config, workdir)` takes an ml_collections config (see `configs/precompute_digits.py`
for every field) and a workdir. Default locations: `workdir/db` (database, `config.db.dir`) and
`workdir/index` (its index, `config.index_dir`). It runs in one process; on a multi-host launch
only process 0 works.

  * Images are centre-cropped/resized to `config.image_size`, encoded by the VAE (mean latent,
    `(mean - shift) * scaling_factor`, stored f16); captions -> tokenizer -> text encoder (77xD
    hidden states, and the pooled embedding, L2-normalised) -> `DatabaseWriter.append` with the
    source's stable int64 ids.
  * Resumable: the DB manifest's committed `count` says how many accepted examples a previous
    (killed or limited, `config.db.limit`) run wrote; the source is iterated again from the start
    (sources iterate deterministically) and those are skipped. Duplicate ids are dropped (counted).
  * `image_hashes.bin` in the DB directory: one uint64 per row (row-aligned with the DB arrays,
    headerless little-endian like them, appended before each commit and truncated to the committed
    count on resume) = blake2b-64 of the uint8 RGB pixels after resizing, with their shape. It lets
    `precompute` exclude exact image duplicates of an example; read it with `load_image_hashes`.
  * The manifest records the text-encoder and VAE identity (`path#hash` of the module config, or
    `random:preset:seed#hash`), the source (its config and image size) and, in `extra`, the
    source's skip counts by reason ("unreadable image", "missing caption", "duplicate id").
  * The index (`config.index`: kind 'auto'|'scann'|'exact'|'bm25' and its parameters, see
    retrieval/index.py) is built over the pooled embeddings (captions for bm25) into the index
    directory; it is rebuilt only when the DB or the index config changed (`built_from.json`
    records both).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import jax
import numpy as np
import tqdm

from imagerag_jax import config_args, jsonfiles, towers
from imagerag_jax.data import encoders
from imagerag_jax.data import sources as sources_lib
from imagerag_jax.retrieval import database as db_lib
from imagerag_jax.retrieval import index as index_lib

HASHES_FILE = "image_hashes.bin"
INDEX_STAMP = "built_from.json"
_HASH_DTYPE = np.dtype("<u8")


# ------------------------------------------------------------------------------------------------
# Locations.
# ------------------------------------------------------------------------------------------------


def db_dir(config: Any, workdir: str) -> str:
    """The database directory: config.db.dir or workdir/db."""
    return config_args.get(config_args.get(config, "db"), "dir") or os.path.join(workdir, "db")


def index_dir(config: Any, workdir: str) -> str:
    """The index directory: config.index_dir or workdir/index."""
    return config_args.get(config, "index_dir") or os.path.join(workdir, "index")


# ------------------------------------------------------------------------------------------------
# The image-hash sidecar.
# ------------------------------------------------------------------------------------------------


def image_hash(image: np.ndarray) -> int:
    """64-bit blake2b of a uint8 image's shape and pixels (exact-duplicate detection)."""
    image = np.ascontiguousarray(image, np.uint8)
    h = hashlib.blake2b(digest_size=8)
    h.update(np.asarray(image.shape, np.int64).tobytes())
    h.update(image.tobytes())
    return int.from_bytes(h.digest(), "little")


def load_image_hashes(db_path: str, count: int | None = None) -> np.ndarray:
    """The DB's per-row image hashes (uint64 [count]); raises if the sidecar is missing or short."""
    path = os.path.join(db_path, HASHES_FILE)
    if count is None:
        count = db_lib.Database(db_path).count
    if not os.path.exists(path) or os.path.getsize(path) < count * 8:
        raise db_lib.DatabaseError(f"{path}: missing or shorter than {count} hashes; rebuild the "
                                   "database with data.build_db.build_db")
    return np.fromfile(path, _HASH_DTYPE, count=count).astype(np.uint64)


class _HashSidecar:
    """Appends image hashes row-aligned with a DatabaseWriter (written before each DB commit)."""

    def __init__(self, db_path: str, committed: int, fsync: bool):
        self.path, self._fsync = os.path.join(db_path, HASHES_FILE), fsync
        have = os.path.getsize(self.path) if os.path.exists(self.path) else 0
        if have < committed * 8:
            raise db_lib.DatabaseError(
                f"{self.path} holds {have // 8} hashes but the database commits {committed} rows; "
                "rebuild with config.db.overwrite=True")
        with open(self.path, "ab") as f:
            f.truncate(committed * 8)  # drop hashes of a batch a killed run never committed

    def append(self, hashes: Sequence[int]) -> None:
        """Appends one batch's hashes (fsynced when the DB is)."""
        with open(self.path, "ab") as f:
            f.write(np.asarray(hashes, _HASH_DTYPE).tobytes())
            if self._fsync:
                f.flush()
                os.fsync(f.fileno())


# ------------------------------------------------------------------------------------------------
# build_db.
# ------------------------------------------------------------------------------------------------


def build_db(config: Any, workdir: str) -> dict[str, Any]:
    """Builds (or resumes) the retrieval DB from `config.db.source`, then its index.

    Returns a summary: {"path", "count", "added", "skipped", "index"}.
    """
    get = config_args.get
    if jax.process_count() > 1 and jax.process_index() != 0:
        logging.info("build_db runs on process 0 only (one append-only writer).")
        return {}
    dbc = get(config, "db")
    if dbc is None or get(dbc, "source") is None:
        raise ValueError("build_db needs config.db.source (e.g. {'kind': 'digits', ...})")
    path = db_dir(config, workdir)
    image_size = get(config, "image_size")
    batch_size = int(get(config, "batch_size", 32))
    limit = int(get(dbc, "limit", 0)) or None
    fsync = bool(get(dbc, "fsync", True))
    overwrite = bool(get(dbc, "overwrite", False))

    models = towers.load_pipeline_towers(config, workdir)
    enc = encoders.Encoder(models, batch_size)
    source = sources_lib.source_from_config(get(dbc, "source"))
    if not source.has_images:
        raise ValueError(f"{source.skipped.name} holds prompts only; a retrieval database needs "
                         "images (use it as config.source of precompute with latents='teacher')")
    src_id = sources_lib.source_identity(get(dbc, "source"), image_size)

    # Shapes from abstract evaluation on the first image: the writer needs them before any batch.
    it = sources_lib.raw_items(source)
    first = next((r for r in it if r.example is not None), None)
    if first is None:
        raise ValueError(f"source {source.skipped.name} yielded no readable example")
    img0 = sources_lib.prepare_image(first.example[1], image_size)
    spec = db_lib.DatabaseSpec(*enc.output_shapes(img0.shape))

    if overwrite and os.path.exists(os.path.join(path, HASHES_FILE)):
        os.remove(os.path.join(path, HASHES_FILE))
    # Weight fingerprints beside the architecture identities: generation refuses a DB whose
    # text encoder or VAE had other weights (paths alone move between machines).
    extra = {"image_size": image_size, "image_hashes": HASHES_FILE,
             "compute_dtype": get(config, "compute_dtype", "float32"),
             "text_encoder_fingerprint": towers.fingerprint(models.pipe.text_params),
             "vae_fingerprint": towers.fingerprint(models.pipe.vae_params)}
    writer = db_lib.DatabaseWriter(path, spec, source=src_id, text_encoder=models.text_encoder_id,
                                   vae=models.vae_id, overwrite=overwrite, fsync=fsync, extra=extra)
    hashes = _HashSidecar(path, writer.count, fsync)
    committed = writer.count
    target = limit if limit is not None else (len(source) if hasattr(source, "__len__") else None)

    seen_ids: set[int] = set()
    accepted = 0
    dup_ids = 0
    batch: list[tuple[int, np.ndarray, str, int]] = []

    def flush() -> None:
        ids = np.asarray([b[0] for b in batch], np.int64)
        images = np.stack([b[1] for b in batch])
        captions = [b[2] for b in batch]
        latents = enc.images(images)
        embeds, pooled_ = enc.texts(captions)
        hashes.append([b[3] for b in batch])
        writer.manifest["extra"] = _db_extra(writer.manifest.get("extra", {}), source, dup_ids)
        writer.append(captions, latents, embeds, pooled_, ids)
        batch.clear()

    done = limit is not None and committed >= limit
    bar = tqdm.tqdm(total=target, initial=min(committed, target or committed), unit="img",
                    desc=f"build_db {os.path.basename(path)}", disable=done)
    items = _chain_first(first, it)
    for item in ([] if done else items):
        if item.example is None:
            continue
        example_id, image, caption = item.example
        if int(example_id) in seen_ids:
            dup_ids += 1
            logging.warning("build_db: duplicate id %d skipped", example_id)
            continue
        seen_ids.add(int(example_id))
        accepted += 1
        if accepted <= committed:  # written by an earlier run (the source order is deterministic)
            continue
        image = sources_lib.prepare_image(image, image_size)
        if image.shape != img0.shape:
            raise ValueError(f"image of id {example_id} has shape {image.shape}, expected "
                             f"{img0.shape}; set config.image_size")
        batch.append((int(example_id), image, caption, image_hash(image)))
        bar.update(1)
        if len(batch) == batch_size:
            flush()
        if limit is not None and accepted >= limit:
            break
    if batch:
        flush()
    bar.close()
    if not done:
        # Final skip counts (including skips after the last batch): commit them with the manifest.
        writer.manifest["extra"] = _db_extra(writer.manifest.get("extra", {}), source, dup_ids)
        # The writer has no public call that commits the manifest without appending rows.
        db_lib._write_manifest(path, writer.manifest)  # pylint: disable=protected-access
    writer.close()
    skipped = writer.manifest["extra"].get("skipped", {})
    logging.info("build_db: %s holds %d entries (%d added this run); skipped inputs: %s",
                 path, writer.count, writer.count - committed, skipped or "none")
    idx = build_index(path, index_dir(config, workdir), get(config, "index"))
    return {"path": path, "count": writer.count, "added": writer.count - committed,
            "skipped": skipped, "index": idx}


def _chain_first(first: sources_lib.RawItem, rest: Iterator[sources_lib.RawItem]
                 ) -> Iterator[sources_lib.RawItem]:
    """`first`, then `rest` (the item already taken to read the shapes goes back in front)."""
    yield first
    yield from rest


def _db_extra(extra: Mapping[str, Any], source: sources_lib.Source, dup_ids: int) -> dict[str, Any]:
    """The manifest's `extra` with the source's current skip counts and examples."""
    skipped = dict(source.skipped.as_dict())
    if dup_ids:
        skipped["duplicate id"] = dup_ids
    return {**extra, "skipped": skipped,
            "skipped_examples": {k: list(v) for k, v in source.skipped.examples.items()}}


# ------------------------------------------------------------------------------------------------
# The index.
# ------------------------------------------------------------------------------------------------


def build_index(db_path: str, out_dir: str, index_config: Any = None) -> dict[str, Any]:
    """Builds and saves the index over a DB unless `out_dir` is current; returns its meta."""
    db = db_lib.Database(db_path)
    cfg = config_args.plain(index_config)
    stamp = {"db_path": os.path.abspath(db_path), "db_count": db.count,
             "db_created": db.manifest.get("created"), "config": cfg}
    stamp_path = os.path.join(out_dir, INDEX_STAMP)
    if os.path.exists(stamp_path) and os.path.exists(os.path.join(out_dir, index_lib.META)):
        with open(stamp_path) as f:
            if json.load(f) == jsonfiles.normalized(stamp):
                logging.info("Index %s is up to date (%d entries).", out_dir, db.count)
                return index_meta(out_dir)
    if db.count == 0:
        raise ValueError(f"{db_path} is empty: nothing to index")
    if cfg.get("kind") == "bm25":
        index = index_lib.Index.build(db.captions(), cfg, ids=np.asarray(db.ids))
    else:
        index = index_lib.Index.build(db.pooled, cfg, ids=np.asarray(db.ids))
    # Save beside, then swap in: readers never see a half-written index.
    tmp = f"{out_dir}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    index.save(tmp)
    jsonfiles.write_atomic(os.path.join(tmp, INDEX_STAMP), stamp)
    old = f"{out_dir}.old-{os.getpid()}"
    if os.path.exists(out_dir):
        os.rename(out_dir, old)
    os.rename(tmp, out_dir)
    shutil.rmtree(old, ignore_errors=True)
    logging.info("Built %s index over %d entries into %s.", index.kind, db.count, out_dir)
    return index_meta(out_dir)


def index_meta(path: str) -> dict[str, Any]:
    """The saved index's path, kind, count and config (what manifests record about it)."""
    with open(os.path.join(path, index_lib.META)) as f:
        meta = json.load(f)
    return {"path": os.path.abspath(path), "kind": meta["kind"], "count": meta["count"],
            "config": meta["config"]}
