"""The offline jobs: build the retrieval database, and precompute the training TFRecords.

    build_db(config, workdir)     image-text source -> VAE latents + text embeddings -> DB + index
    precompute(config, workdir)   training pairs -> target latents (VAE or teacher), embeddings,
                                  top-k DB neighbours -> TFRecord shards + manifest (multi-host)

Both take an ml_collections config (see `configs/precompute_digits.py` for every field) and a
workdir. Default locations: `workdir/db` (database), `workdir/index` (its index), `workdir/data`
(TFRecords), `workdir/random_pipeline` (the tiny random SD pipeline used when `config.weights` is
unset: the jobs then run end to end, but the numbers mean nothing).

build_db (one process; on a multi-host launch only process 0 works):
  * images are centre-cropped/resized to `config.image_size`, encoded by the VAE (mean latent,
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
    retrieval/index.py) is built over the pooled embeddings (captions for bm25) into `workdir/index`;
    it is rebuilt only when the DB or the index config changed.

precompute (every host runs it; each writes only its own shards):
  * Shard i of n holds the source's raw items [floor(i N / n), floor((i + 1) N / n)), N = len(source)
    (or `config.limit`). The raw position counts every item the source yields *or* skips (each raw
    item does exactly one), so the split does not depend on which images are unreadable, and the
    skips of each range are recorded by the shard that owns it (manifest sums are exact over hosts).
  * Host p of P owns shards p, p + P, ... (the input pipeline reads `files[p::P]`). It iterates the
    source (decoding is cheap next to the models) and runs the models only on its ranges.
  * A shard is written to a temporary name and renamed; its manifest part
    (`_manifest_parts/{split}-{i:05d}.json`, written after the rename) is its `.done` marker. A rerun
    skips shards whose file and part exist with the recorded size. The host that finds every part
    present writes `manifest.json` (rerun any host to write it after a crash).
  * `precompute_{split}.json` pins the job's configuration (source, N, shards, models, DB, index,
    k, latents mode, teacher settings): resuming with another configuration is refused.
  * Latents: 'vae' encodes the example's image; 'teacher' samples from the teacher
    (`config.teacher_weights`, default `config.weights`; DDIM or Euler, `config.teacher.steps`,
    CFG `config.teacher.guidance` = 7.5 against `negative_prompt`) starting from
    `noise = default_rng([seed, id_lo32, id_hi32]).standard_normal(latent_shape)` rounded to f16,
    which is stored as `noise` (deterministic per example id, whichever host draws it).
  * Retrieval: top-k by the L2-normalised pooled embedding (or the caption for bm25), excluding
    the example's own id and every DB entry whose image hash equals the example's image hash.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import shutil
from collections.abc import Iterator, Mapping, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import tqdm

from imagerag_jax import sampling
from imagerag_jax.data import sources as sources_lib
from imagerag_jax.retrieval import database as db_lib
from imagerag_jax.retrieval import index as index_lib
from imagerag_jax.schedule import make_schedule

HASHES_FILE = "image_hashes.bin"
INDEX_STAMP = "built_from.json"
RANDOM_PIPELINE_DIR = "random_pipeline"
_HASH_DTYPE = np.dtype("<u8")


# ------------------------------------------------------------------------------------------------
# Config helpers.
# ------------------------------------------------------------------------------------------------


def _get(cfg: Any, key: str, default: Any = None) -> Any:
    """cfg[key] for a dict or ConfigDict, `default` when missing or None."""
    if cfg is None:
        return default
    value = cfg.get(key, None) if hasattr(cfg, "get") else getattr(cfg, key, None)
    return default if value is None else value


def _plain(cfg: Any) -> dict[str, Any]:
    """A plain dict (None values dropped) from a ConfigDict or mapping."""
    if cfg is None:
        return {}
    d = cfg.to_dict() if hasattr(cfg, "to_dict") else dict(cfg)
    return {k: v for k, v in d.items() if v is not None}


def _json_default(o: Any) -> Any:
    if isinstance(o, np.generic):
        return o.item()
    if isinstance(o, (tuple, set)):
        return list(o)
    return str(o)


def _canonical(obj: Any) -> str:
    return json.dumps(obj, sort_keys=True, default=_json_default)


def _short_hash(obj: Any, n: int = 12) -> str:
    return hashlib.sha256(_canonical(obj).encode()).hexdigest()[:n]


def _atomic_write_json(path: str, obj: Any) -> None:
    """Writes JSON via a per-process temp file and an atomic rename."""
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=2, sort_keys=True, default=_json_default)
    os.replace(tmp, path)


# ------------------------------------------------------------------------------------------------
# Models: loading and identity.
# ------------------------------------------------------------------------------------------------


@dataclasses.dataclass
class Models:
    """A loaded pipeline plus the identity strings recorded in manifests."""

    pipe: Any  # weights.Pipeline
    label: str  # weights path, or random:preset:seed
    text_encoder_id: str
    vae_id: str
    unet_id: str


def module_identity(label: str, module: Any) -> str:
    """`label#hash` with the hash of the module's architecture fields (not dtype or kernels)."""
    fields = {f.name: getattr(module, f.name) for f in dataclasses.fields(module)
              if f.name not in ("parent", "name", "dtype", "param_dtype", "attention_impl")}
    return f"{label}#{_short_hash({'class': type(module).__name__, **fields})}"


def random_pipeline_path(workdir: str, preset: str = "tiny", seed: int = 0) -> str:
    """Writes (once) the tiny random pipeline under workdir and returns its path."""
    from imagerag_jax.weights import random_pipeline  # pylint: disable=g-import-not-at-top
    path = os.path.join(workdir, f"{RANDOM_PIPELINE_DIR}_{preset}_{seed}")
    if not os.path.exists(os.path.join(path, "model_index.json")):
        # Write beside and rename: concurrent hosts never see a half-written folder.
        tmp = f"{path}.tmp-{os.getpid()}"
        random_pipeline.write_random_pipeline(tmp, preset=preset, seed=seed)
        try:
            os.rename(tmp, path)
        except OSError:  # another process won the race; theirs is identical
            shutil.rmtree(tmp, ignore_errors=True)
    return path


def load_models(config: Any, workdir: str, weights: str | None = None) -> Models:
    """Loads `weights` (default `config.weights`; unset: the random pipeline) with identities."""
    from imagerag_jax import weights as weights_lib  # pylint: disable=g-import-not-at-top
    path = weights or _get(config, "weights")
    if path is None:
        preset, seed = _get(config, "random_preset", "tiny"), int(_get(config, "random_seed", 0))
        logging.warning("No weights configured: using a tiny random-weight pipeline (%s, seed %d); "
                        "the latents and embeddings mean nothing.", preset, seed)
        label = f"random:{preset}:{seed}"
        path = random_pipeline_path(workdir, preset, seed)
    else:
        label = os.path.abspath(path)
    dtype = jnp.bfloat16 if _get(config, "compute_dtype", "float32") == "bfloat16" else jnp.float32
    pipe = weights_lib.load_pipeline(path, dtype=dtype, tokenizer_path=_get(config, "tokenizer"))
    if pipe.tokenizer is None:
        raise ValueError(f"{path} has no tokenizer/ folder: set config.tokenizer to a CLIP tokenizer")
    return Models(pipe, label, module_identity(label, pipe.text_encoder),
                  module_identity(label, pipe.vae), module_identity(label, pipe.unet))


# ------------------------------------------------------------------------------------------------
# Batch functions (one jit each; modules are static, batches padded to a fixed size).
# ------------------------------------------------------------------------------------------------


def _vae_latents(vae: Any, params: Any, images: jax.Array) -> jax.Array:
    """uint8 [B, H, W, 3] -> scaled mean latents [B, h, w, C] float32."""
    x = images.astype(jnp.float32) / 127.5 - 1.0
    mean, _ = vae.apply({"params": params}, x, method=vae.encode)
    return ((mean - vae.shift_factor) * vae.scaling_factor).astype(jnp.float32)


encode_images = jax.jit(_vae_latents, static_argnums=0)
encode_images.__doc__ = "Jitted: uint8 images [B, H, W, 3] -> scaled VAE mean latents (float32)."


def _text_embeddings(text: Any, params: Any, token_ids: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Token ids [B, L] -> (hidden states [B, L, D] float32, L2-normalised pooled [B, D])."""
    hidden, pooled = text.apply({"params": params}, token_ids)
    pooled = pooled.astype(jnp.float32)
    pooled = pooled / jnp.maximum(jnp.linalg.norm(pooled, axis=-1, keepdims=True), 1e-12)
    return hidden.astype(jnp.float32), pooled


encode_text = jax.jit(_text_embeddings, static_argnums=0)
encode_text.__doc__ = "Jitted: token ids [B, L] -> (hidden [B, L, D], normalised pooled [B, D])."


class TeacherSpec(NamedTuple):
    """Static settings of the teacher sampler."""

    sampler: str  # 'ddim' | 'euler'
    steps: int
    guidance: float
    prediction_type: str


def _teacher_sample(spec: TeacherSpec, unet: Any, text: Any, unet_params: Any, text_params: Any,
                    token_ids: jax.Array, uncond_ids: jax.Array, noise: jax.Array) -> jax.Array:
    """Multi-step teacher sampling with CFG from `noise`: the synthetic target latents z0."""
    context, _ = text.apply({"params": text_params}, token_ids)
    uncond, _ = text.apply({"params": text_params}, uncond_ids)
    apply_fn = lambda x, t, c: unet.apply({"params": unet_params}, x, t, c)
    schedule = make_schedule("scaled_linear")
    uncond = uncond if spec.guidance > 1.0 else None
    if spec.sampler == "ddim":
        out = sampling.ddim_sample(apply_fn, noise, context, uncond, schedule, spec.steps,
                                   spec.guidance, spec.prediction_type)
    elif spec.sampler == "euler":
        out = sampling.euler_sample(apply_fn, noise, context, uncond, schedule, spec.steps,
                                    spec.guidance, spec.prediction_type)
    else:
        raise ValueError(f"unknown teacher sampler {spec.sampler!r}; expected 'ddim' or 'euler'")
    return out.astype(jnp.float32)


teacher_latents = jax.jit(_teacher_sample, static_argnums=(0, 1, 2))
teacher_latents.__doc__ = "Jitted: teacher DDIM/Euler + CFG from the given noise -> latents."


def pad_rows(x: np.ndarray, size: int) -> np.ndarray:
    """Pads the leading axis to `size` by repeating the last row (static shapes under jit)."""
    if len(x) == size:
        return x
    return np.concatenate([x, np.repeat(x[-1:], size - len(x), axis=0)])


class Encoder:
    """Runs the jitted batch functions of one pipeline on padded host batches."""

    def __init__(self, models: Models, batch_size: int):
        self.models, self.batch_size = models, batch_size
        self.pipe = models.pipe

    def images(self, images: np.ndarray) -> np.ndarray:
        """uint8 [b, H, W, 3] -> latents [b, h, w, C] float32."""
        b = len(images)
        out = encode_images(self.pipe.vae, self.pipe.vae_params, pad_rows(images, self.batch_size))
        return np.asarray(out)[:b]

    def texts(self, captions: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        """Captions -> (prompt embeds [b, L, D], normalised pooled [b, D]) float32."""
        b = len(captions)
        ids = pad_rows(self.pipe.tokenizer(list(captions)), self.batch_size)
        hidden, pooled = encode_text(self.pipe.text_encoder, self.pipe.text_params, ids)
        return np.asarray(hidden)[:b], np.asarray(pooled)[:b]

    def teacher(self, spec: TeacherSpec, captions: Sequence[str], negative_prompt: str,
                noise: np.ndarray) -> np.ndarray:
        """Teacher latents [b, h, w, C] from `noise` [b, h, w, C] (this pipeline is the teacher)."""
        b = len(captions)
        ids = pad_rows(self.pipe.tokenizer(list(captions)), self.batch_size)
        uncond = self.pipe.tokenizer([negative_prompt])
        out = teacher_latents(spec, self.pipe.unet, self.pipe.text_encoder, self.pipe.unet_params,
                              self.pipe.text_params, ids, uncond,
                              pad_rows(noise.astype(np.float32), self.batch_size))
        return np.asarray(out)[:b]


def example_noise(seed: int, example_ids: Sequence[int], shape: Sequence[int]) -> np.ndarray:
    """The teacher's initial noise per example id (f16-exact float16 [b, *shape])."""
    out = np.empty((len(example_ids), *shape), np.float16)
    for j, i in enumerate(example_ids):
        i = int(i)
        rng = np.random.default_rng([int(seed), i & 0xFFFFFFFF, (i >> 32) & 0xFFFFFFFF])
        out[j] = rng.standard_normal(tuple(shape), np.float32)
    return out


# ------------------------------------------------------------------------------------------------
# Images and hashes.
# ------------------------------------------------------------------------------------------------


def prepare_image(image: np.ndarray, size: int | None) -> np.ndarray:
    """uint8 [H, W, 3] centre-cropped and resized to size x size (unchanged when already so)."""
    if size is None or image.shape[:2] == (size, size):
        return np.ascontiguousarray(image, np.uint8)
    return sources_lib.center_crop_resize(image, size)


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
                                   "database with data.precompute.build_db")
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
        with open(self.path, "ab") as f:
            f.write(np.asarray(hashes, _HASH_DTYPE).tobytes())
            if self._fsync:
                f.flush()
                os.fsync(f.fileno())


# ------------------------------------------------------------------------------------------------
# Sources.
# ------------------------------------------------------------------------------------------------


def make_source(source_config: Any) -> sources_lib.Source:
    """A source from its config (None-valued keys dropped, so configs may carry placeholders)."""
    return sources_lib.make_source(_plain(source_config))


def source_identity(source_config: Any, image_size: int | None) -> str:
    """Stable identity string of a source config plus the image size (recorded in manifests)."""
    return f"{_canonical(_plain(source_config))}@{image_size}px"


class RawItem(NamedTuple):
    """One raw item of a source: an example, or the reason it was skipped."""

    position: int
    example: sources_lib.Example | None
    skip_reason: str | None


def raw_items(source: sources_lib.Source, stop: int | None = None) -> Iterator[RawItem]:
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


# ------------------------------------------------------------------------------------------------
# build_db.
# ------------------------------------------------------------------------------------------------


def db_dir(config: Any, workdir: str) -> str:
    """The database directory: config.db.dir or workdir/db."""
    return _get(_get(config, "db"), "dir") or os.path.join(workdir, "db")


def index_dir(config: Any, workdir: str) -> str:
    """The index directory: config.index_dir or workdir/index."""
    return _get(config, "index_dir") or os.path.join(workdir, "index")


def build_db(config: Any, workdir: str) -> dict[str, Any]:
    """Builds (or resumes) the retrieval DB from `config.db.source`, then its index.

    Returns a summary: {"path", "count", "added", "skipped", "index"}.
    """
    if jax.process_count() > 1 and jax.process_index() != 0:
        logging.info("build_db runs on process 0 only (one append-only writer).")
        return {}
    dbc = _get(config, "db")
    if dbc is None or _get(dbc, "source") is None:
        raise ValueError("build_db needs config.db.source (e.g. {'kind': 'digits', ...})")
    path = db_dir(config, workdir)
    image_size = _get(config, "image_size")
    batch_size = int(_get(config, "batch_size", 32))
    limit = int(_get(dbc, "limit", 0)) or None
    fsync = bool(_get(dbc, "fsync", True))
    overwrite = bool(_get(dbc, "overwrite", False))

    models = load_models(config, workdir)
    enc = Encoder(models, batch_size)
    source = make_source(_get(dbc, "source"))
    src_id = source_identity(_get(dbc, "source"), image_size)

    # Shapes from abstract evaluation on the first image: the writer needs them before any batch.
    it = raw_items(source)
    first = next((r for r in it if r.example is not None), None)
    if first is None:
        raise ValueError(f"source {source.skipped.name} yielded no readable example")
    img0 = prepare_image(first.example[1], image_size)
    lat = jax.eval_shape(lambda x: _vae_latents(enc.pipe.vae, enc.pipe.vae_params, x),
                         jax.ShapeDtypeStruct((1, *img0.shape), jnp.uint8))
    hid, pooled = jax.eval_shape(
        lambda t: _text_embeddings(enc.pipe.text_encoder, enc.pipe.text_params, t),
        jax.ShapeDtypeStruct((1, enc.pipe.tokenizer.max_length), jnp.int32))
    spec = db_lib.DatabaseSpec(tuple(lat.shape[1:]), tuple(hid.shape[1:]), int(pooled.shape[-1]))

    if overwrite and os.path.exists(os.path.join(path, HASHES_FILE)):
        os.remove(os.path.join(path, HASHES_FILE))
    extra = {"image_size": image_size, "image_hashes": HASHES_FILE,
             "compute_dtype": _get(config, "compute_dtype", "float32")}
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
        image = prepare_image(image, image_size)
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
        db_lib._write_manifest(path, writer.manifest)  # pylint: disable=protected-access
    writer.close()
    skipped = writer.manifest["extra"].get("skipped", {})
    logging.info("build_db: %s holds %d entries (%d added this run); skipped inputs: %s",
                 path, writer.count, writer.count - committed, skipped or "none")
    idx = build_index(path, index_dir(config, workdir), _get(config, "index"))
    return {"path": path, "count": writer.count, "added": writer.count - committed,
            "skipped": skipped, "index": idx}


def _chain_first(first: RawItem, rest: Iterator[RawItem]) -> Iterator[RawItem]:
    yield first
    yield from rest


def _db_extra(extra: Mapping[str, Any], source: sources_lib.Source, dup_ids: int) -> dict[str, Any]:
    skipped = dict(source.skipped.as_dict())
    if dup_ids:
        skipped["duplicate id"] = dup_ids
    return {**extra, "skipped": skipped,
            "skipped_examples": {k: list(v) for k, v in source.skipped.examples.items()}}


def build_index(db_path: str, out_dir: str, index_config: Any = None) -> dict[str, Any]:
    """Builds and saves the index over a DB (skipped when `out_dir` is current); returns its meta."""
    db = db_lib.Database(db_path)
    cfg = _plain(index_config)
    stamp = {"db_path": os.path.abspath(db_path), "db_count": db.count,
             "db_created": db.manifest.get("created"), "config": cfg}
    stamp_path = os.path.join(out_dir, INDEX_STAMP)
    if os.path.exists(stamp_path) and os.path.exists(os.path.join(out_dir, index_lib.META)):
        with open(stamp_path) as f:
            if json.load(f) == json.loads(_canonical(stamp)):
                logging.info("Index %s is up to date (%d entries).", out_dir, db.count)
                return _index_meta(out_dir)
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
    _atomic_write_json(os.path.join(tmp, INDEX_STAMP), stamp)
    old = f"{out_dir}.old-{os.getpid()}"
    if os.path.exists(out_dir):
        os.rename(out_dir, old)
    os.rename(tmp, out_dir)
    shutil.rmtree(old, ignore_errors=True)
    logging.info("Built %s index over %d entries into %s.", index.kind, db.count, out_dir)
    return _index_meta(out_dir)


def _index_meta(path: str) -> dict[str, Any]:
    with open(os.path.join(path, index_lib.META)) as f:
        meta = json.load(f)
    return {"path": os.path.abspath(path), "kind": meta["kind"], "count": meta["count"],
            "config": meta["config"]}


# ------------------------------------------------------------------------------------------------
# precompute.
# ------------------------------------------------------------------------------------------------


def shard_bounds(num_items: int, num_shards: int) -> list[int]:
    """Raw-position boundaries: shard i holds [bounds[i], bounds[i + 1])."""
    return [i * num_items // num_shards for i in range(num_shards + 1)]


def host_shards(num_shards: int, process_index: int, process_count: int) -> list[int]:
    """Shard indices written by one process (strided, like the input pipeline's file split)."""
    if not 0 <= process_index < process_count:
        raise ValueError(f"process_index {process_index} not in [0, {process_count})")
    return list(range(process_index, num_shards, process_count))


def shard_done(out_dir: str, split: str, index: int, num_shards: int) -> bool:
    """True when the shard file and its manifest part (the `.done` marker) agree."""
    from imagerag_jax.data import tfrecords  # pylint: disable=g-import-not-at-top
    name = tfrecords.shard_name(split, index, num_shards)
    part = os.path.join(out_dir, tfrecords.PARTS_DIR, f"{split}-{index:05d}.json")
    shard = os.path.join(out_dir, name)
    if not (os.path.exists(part) and os.path.exists(shard)):
        return False
    try:
        with open(part) as f:
            files = json.load(f)["files"]
    except (OSError, ValueError, KeyError):
        return False
    return (len(files) == 1 and files[0]["name"] == name
            and files[0]["num_bytes"] == os.path.getsize(shard))


class _Retriever:
    """Index search with self/duplicate exclusion and DB gathers."""

    def __init__(self, db_path: str, idx_path: str, models: Models, exclude_duplicates: bool):
        self.db = db_lib.Database(db_path)
        m = self.db.manifest
        for key, have in (("text_encoder", models.text_encoder_id), ("vae", models.vae_id)):
            if m.get(key) != have:
                raise ValueError(
                    f"{db_path} was built with {key} {m.get(key)!r}, but precompute uses {have!r}: "
                    "retrieval needs the same text encoder and latent space; rebuild the database")
        self.index = index_lib.Index.load(idx_path)
        if self.index.count != self.db.count or (
                self.index.ids is not None and not np.array_equal(self.index.ids, self.db.ids)):
            raise ValueError(f"index {idx_path} ({self.index.count} entries) does not match the "
                             f"database {db_path} ({self.db.count}); run build_db again")
        self.meta = _index_meta(idx_path)
        self.ids = np.asarray(self.db.ids)
        self.exclude_duplicates = exclude_duplicates
        if exclude_duplicates:
            h = load_image_hashes(db_path, self.db.count)
            self._order = np.argsort(h, kind="stable")
            self._sorted_hashes = h[self._order]

    def duplicates(self, hash_: int) -> np.ndarray:
        """DB ids whose image hash equals `hash_`."""
        h = np.uint64(hash_)
        lo = np.searchsorted(self._sorted_hashes, h, "left")
        hi = np.searchsorted(self._sorted_hashes, h, "right")
        return self.ids[self._order[lo:hi]]

    def __call__(self, pooled: np.ndarray, captions: Sequence[str], example_ids: np.ndarray,
                 hashes: Sequence[int], k: int) -> dict[str, np.ndarray]:
        """Top-k neighbours of a batch: ids, scores and the gathered DB rows."""
        excl = [np.concatenate([[eid], self.duplicates(h)]) if self.exclude_duplicates else
                np.asarray([eid]) for eid, h in zip(example_ids, hashes)]
        width = max(len(e) for e in excl)
        exclude = np.full((len(excl), width), -1, np.int64)
        for j, e in enumerate(excl):
            exclude[j, :len(e)] = e
        queries = list(captions) if self.index.kind == "bm25" else pooled
        ids, scores = self.index.search(queries, k, exclude_ids=exclude)
        if np.any(ids < 0):
            j = int(np.nonzero((ids < 0).any(1))[0][0])
            raise ValueError(f"example {int(example_ids[j])}: only {int((ids[j] >= 0).sum())} of "
                             f"k={k} neighbours left after exclusions; the database is too small")
        rows = self.db.rows_for_ids(ids)
        got = self.db.gather(rows)
        return {"retrieved_ids": ids, "retrieval_scores": scores.astype(np.float32),
                "retrieved_latents": got["latents"], "retrieved_prompt_embeds": got["prompt_embeds"],
                "retrieved_pooled": got["pooled"]}


class _Cursor:
    """Consumes a raw-item stream range by range (items past a range wait for the next call)."""

    def __init__(self, items: Iterator[RawItem]):
        self._it, self._pending = items, None

    def until(self, end: int) -> Iterator[RawItem]:
        while True:
            item = self._pending if self._pending is not None else next(self._it, None)
            self._pending = None
            if item is None:
                return
            if item.position >= end:
                self._pending = item
                return
            yield item


def _job_description(config: Any, models: Models, teacher: Models | None, num_items: int,
                     retriever: _Retriever | None, image_size: int | None) -> dict[str, Any]:
    """What determines the shards' content; a resumed job must match it exactly."""
    tcfg = _plain(_get(config, "teacher"))
    desc = {
        "source": _plain(_get(config, "source")), "image_size": image_size,
        "num_items": num_items, "num_shards": int(_get(config, "num_shards", 1)),
        "split": _get(config, "split", "train"), "k": int(_get(config, "k", 0)),
        "latents": _get(config, "latents", "vae"), "seed": int(_get(config, "seed", 0)),
        "exclude_duplicate_images": bool(_get(config, "exclude_duplicate_images", True)),
        "text_encoder": models.text_encoder_id, "vae": models.vae_id,
    }
    if desc["latents"] == "teacher":
        desc["teacher"] = {**tcfg, "unet": teacher.unet_id, "text_encoder": teacher.text_encoder_id}
    if retriever is not None:
        desc["database"] = {"path": os.path.abspath(retriever.db.path), "count": retriever.db.count,
                            "created": retriever.db.manifest.get("created"),
                            "source": retriever.db.manifest.get("source")}
        desc["index"] = {k: retriever.meta[k] for k in ("kind", "count", "config")}
    return json.loads(_canonical(desc))


def precompute(config: Any, workdir: str, process_index: int | None = None,
               process_count: int | None = None) -> dict[str, Any] | None:
    """Writes this process's TFRecord shards; returns the manifest once every shard exists."""
    from imagerag_jax.data import tfrecords  # pylint: disable=g-import-not-at-top
    pi = jax.process_index() if process_index is None else int(process_index)
    pc = jax.process_count() if process_count is None else int(process_count)
    if _get(config, "source") is None:
        raise ValueError("precompute needs config.source (the training pairs)")
    mode = _get(config, "latents", "vae")
    if mode not in ("vae", "teacher"):
        raise ValueError(f"config.latents must be 'vae' or 'teacher', got {mode!r}")
    out_dir = _get(config, "data_dir") or os.path.join(workdir, "data")
    split = _get(config, "split", "train")
    num_shards = int(_get(config, "num_shards", 1))
    k = int(_get(config, "k", 0))
    image_size = _get(config, "image_size")
    batch_size = int(_get(config, "batch_size", 32))
    seed = int(_get(config, "seed", 0))
    exclude_dups = bool(_get(config, "exclude_duplicate_images", True))

    models = load_models(config, workdir)
    enc = Encoder(models, batch_size)
    teacher_enc, teacher, spec = None, None, None
    tcfg = _get(config, "teacher")
    negative = _get(tcfg, "negative_prompt", "")
    if mode == "teacher":
        tw = _get(config, "teacher_weights")
        teacher = models if tw is None or tw == _get(config, "weights") else load_models(
            config, workdir, tw)
        teacher_enc = Encoder(teacher, batch_size)
        spec = TeacherSpec(_get(tcfg, "sampler", "ddim"), int(_get(tcfg, "steps", 25)),
                           float(_get(tcfg, "guidance", 7.5)), teacher.pipe.prediction_type)
    retriever = None
    if k > 0:
        retriever = _Retriever(db_dir(config, workdir), index_dir(config, workdir), models,
                               exclude_dups)

    source = make_source(_get(config, "source"))
    limit = int(_get(config, "limit", 0)) or None
    if not hasattr(source, "__len__"):
        if limit is None:
            raise ValueError("this source has no length: set config.limit (raw items to read)")
        num_items = limit
    else:
        num_items = len(source) if limit is None else min(len(source), limit)

    os.makedirs(out_dir, exist_ok=True)
    desc = _job_description(config, models, teacher, num_items, retriever, image_size)
    desc_path = os.path.join(out_dir, f"precompute_{split}.json")
    if os.path.exists(desc_path):
        with open(desc_path) as f:
            old = json.load(f)
        if old != desc:
            diff = sorted(key for key in set(old) | set(desc) if old.get(key) != desc.get(key))
            raise ValueError(f"{out_dir} holds split {split!r} of a precompute job with another "
                             f"configuration (differs in {diff}); use a new data_dir or delete it")
    else:
        _atomic_write_json(desc_path, desc)

    # Shapes of the schema from abstract evaluation (no compile).
    if image_size is None:
        raise ValueError("precompute needs config.image_size (pixels; images are resized to it)")
    lat_shape = jax.eval_shape(lambda x: _vae_latents(enc.pipe.vae, enc.pipe.vae_params, x),
                               jax.ShapeDtypeStruct((1, image_size, image_size, 3), jnp.uint8))
    hid, pooled_shape = jax.eval_shape(
        lambda t: _text_embeddings(enc.pipe.text_encoder, enc.pipe.text_params, t),
        jax.ShapeDtypeStruct((1, enc.pipe.tokenizer.max_length), jnp.int32))
    lat = tuple(lat_shape.shape[1:])
    schema = tfrecords.Schema(lat, tuple(hid.shape[1:]), int(pooled_shape.shape[-1]), k,
                              has_noise=mode == "teacher")
    if retriever is not None and (tuple(retriever.db.shapes["latents"]) != lat or
                                  tuple(retriever.db.shapes["prompt_embeds"]) != schema.embed_shape):
        raise ValueError(f"database shapes {retriever.db.shapes} do not match the examples' "
                         f"latent {lat} / embeds {schema.embed_shape}; check config.image_size")

    bounds = shard_bounds(num_items, num_shards)
    mine = host_shards(num_shards, pi, pc)
    todo = [i for i in mine if not shard_done(out_dir, split, i, num_shards)]
    logging.info("precompute: process %d/%d owns shards %s of %d; %d to write, %d already done.",
                 pi, pc, mine, num_shards, len(todo), len(mine) - len(todo))

    def process(batch: list[tuple[int, np.ndarray, str]]) -> list[dict[str, Any]]:
        ids = np.asarray([b[0] for b in batch], np.int64)
        images = np.stack([b[1] for b in batch])
        captions = [b[2] for b in batch]
        embeds, pooled = enc.texts(captions)
        out: dict[str, Any] = {"prompt_embeds": embeds, "pooled": pooled}
        if mode == "vae":
            out["latent"] = enc.images(images)
        else:
            noise = example_noise(seed, ids, lat)
            out["noise"] = noise
            out["latent"] = teacher_enc.teacher(spec, captions, negative, noise)
        if retriever is not None:
            out.update(retriever(pooled, captions, ids, [image_hash(im) for im in images], k))
        return [{"prompt": captions[j], "example_id": ids[j],
                 **{name: v[j] for name, v in out.items()}} for j in range(len(batch))]

    if todo:
        cursor = _Cursor(raw_items(source, stop=bounds[max(todo) + 1]))
        bar = tqdm.tqdm(total=sum(bounds[i + 1] - bounds[i] for i in todo), unit="item",
                        desc=f"precompute {split} p{pi}")
        for i in todo:
            for _ in cursor.until(bounds[i]):  # other hosts' (or finished) ranges
                pass
            with tfrecords.ShardWriter(out_dir, split, schema, num_shards, [i]) as writer:
                batch: list[tuple[int, np.ndarray, str]] = []
                for item in cursor.until(bounds[i + 1]):
                    bar.update(1)
                    if item.example is None:
                        writer.skip(item.skip_reason)
                        continue
                    example_id, image, caption = item.example
                    image = prepare_image(image, image_size)
                    if image.shape != (image_size, image_size, 3):
                        raise ValueError(f"image {example_id}: shape {image.shape} after resizing")
                    batch.append((int(example_id), image, caption))
                    if len(batch) == batch_size:
                        for ex in process(batch):
                            writer.write(ex)
                        batch = []
                if batch:
                    for ex in process(batch):
                        writer.write(ex)
            logging.info("precompute: shard %d/%d done (%d raw items).", i, num_shards,
                         bounds[i + 1] - bounds[i])
        bar.close()

    missing = [i for i in range(num_shards) if not shard_done(out_dir, split, i, num_shards)]
    if missing:
        logging.info("precompute: %d shard(s) of other processes not finished yet (%s...); the last "
                     "process to finish writes the manifest.", len(missing), missing[:8])
        return None
    index_params = dict(retriever.meta) if retriever is not None else {}
    source_info = {"config": _plain(_get(config, "source")), "name": source.skipped.name,
                   "image_size": image_size, "num_items": num_items}
    extra = {"precompute": desc, "latents": mode}
    if retriever is not None:
        index_params["database"] = desc["database"]
    manifest = tfrecords.write_manifest(out_dir, schema, source=source_info,
                                        index_params=index_params, extra=extra)
    s = manifest["splits"][split]
    logging.info("precompute: wrote %s: %d examples in %d shards, skipped %s.", out_dir,
                 s["num_examples"], num_shards, s["skipped"] or "none")
    return manifest
