"""The precompute job: training pairs -> TFRecord shards of examples with their DB neighbours.

`precompute(config, workdir)` takes an ml_collections config (see `configs/precompute_digits.py`
for every field) and a workdir; it writes `workdir/data` (or `config.data_dir`, a folder or any
TensorFlow filesystem's URL such as `gs://bucket/data`; a database and index at URLs are read from
local copies, `storage.stage`): the shards of one
split, their manifest parts and, once every shard exists, `manifest.json`. Each example holds its
target latent (VAE or teacher), its prompt embeddings and, with `config.k` > 0, its top-k
neighbours from the database and index that `build_db` wrote.

Every host runs it; each writes only its own shards:
  * Shard i of n holds the source's raw items [floor(i N / n), floor((i + 1) N / n)),
    N = len(source) (or `config.max_source_items`). The raw position counts every item the source
    yields *or* skips (each raw item does exactly one), so the split does not depend on which images are
    unreadable, and the skips of each range are recorded by the shard that owns it (manifest sums
    are exact over hosts).
  * Host p of P owns shards p, p + P, ... (the input pipeline reads `files[p::P]`). It iterates the
    source (decoding is cheap next to the models) and runs the models only on its ranges.
  * A shard is written to a temporary name and renamed; its manifest part
    (`_manifest_parts/{split}-{i:05d}.json`, written after the rename) is its `.done` marker. A
    rerun skips shards whose file and part exist with the recorded size. The host that finds every
    part present writes `manifest.json` (rerun any host to write it after a crash).
  * `precompute_{split}.json` pins the job's configuration (source, N, shards, models, DB, index,
    k, latents mode, teacher settings): resuming with another configuration is refused.
  * Latents: 'vae' encodes the example's image; 'teacher' samples from the teacher
    (`config.teacher_weights`, default `config.encoder_weights`; DDIM or Euler,
    `config.teacher.steps`, CFG `config.teacher.guidance` = 7.5 against `negative_prompt`) starting from
    `noise = default_rng([seed, id_lo32, id_hi32]).standard_normal(latent_shape)` rounded to f16,
    which is stored as `noise` (deterministic per example id, whichever host draws it).
  * Neighbours (`config.neighbours`): 'inline' stores each neighbour's latent, prompt
    embeddings and pooled embedding in the record; 'ids' stores only their ids and scores (about
    a quarter of the bytes at SD 2.1 shapes), which the trainer gathers from its copy of the
    database (`data/neighbour_feed.py`).
  * Retrieval: top-k by the L2-normalised pooled embedding (or the caption for bm25), excluding
    the example's own id and every DB entry whose image hash equals the example's image hash. The
    database must have been built with the same text encoder and VAE (checked).
"""

from __future__ import annotations

import json
import logging
import os
from typing import Any

import jax
import numpy as np
import tqdm

from imagerag_jax import config_args, jsonfiles, storage
from imagerag_jax.weights import towers
from imagerag_jax.data import build_db as build_db_lib
from imagerag_jax.data import encoders
from imagerag_jax.data import sources as sources_lib
from imagerag_jax.errors import UserError
from imagerag_jax.retrieval import database as db_lib
from imagerag_jax.retrieval import retriever as retriever_lib


def shard_bounds(num_items: int, num_shards: int) -> list[int]:
    """Raw-position boundaries: shard i holds [bounds[i], bounds[i + 1])."""
    return sources_lib.position_bounds(num_items, num_shards)


def host_shards(num_shards: int, process_index: int, process_count: int) -> list[int]:
    """Shard indices written by one process (strided, like the input pipeline's file split)."""
    return sources_lib.host_ranges(num_shards, process_index, process_count)


def shard_done(out_dir: str, split: str, index: int, num_shards: int) -> bool:
    """True when the shard file and its manifest part (the `.done` marker) agree."""
    from imagerag_jax.data import tfrecords  # pylint: disable=g-import-not-at-top
    name = tfrecords.shard_name(split, index, num_shards)
    part = os.path.join(out_dir, tfrecords.PARTS_DIR, f"{split}-{index:05d}.json")
    shard = os.path.join(out_dir, name)
    if not (storage.exists(part) and storage.exists(shard)):  # local, or gs:// and the like
        return False
    try:
        with storage.open_file(part) as f:
            files = json.load(f)["files"]
    except (OSError, ValueError, KeyError, tfrecords.tf.errors.OpError):
        return False
    return (len(files) == 1 and files[0]["name"] == name
            and files[0]["num_bytes"] == storage.size(shard))


def _open_retriever(db_path: str, idx_path: str, models: towers.JobTowers,
                    exclude_duplicates: bool) -> retriever_lib.Retriever:
    """The database and index build_db wrote, checked against precompute's encoders (a URL's
    read from a local copy: `storage.stage`)."""
    db_path, idx_path = (storage.stage(p, what=w) for p, w in ((db_path, "retrieval database"),
                                                                (idx_path, "index")))
    db = db_lib.Database(db_path)
    db_lib.check_encoders(db_path, db.manifest, models.encoders())
    hashes = build_db_lib.load_image_hashes(db_path, db.count) if exclude_duplicates else None
    return retriever_lib.Retriever.open(db, idx_path, image_hashes=hashes)


def _job_description(config: Any, models: towers.JobTowers,
                     teacher: towers.JobTowers | None, num_items: int,
                     retriever: retriever_lib.Retriever | None, index_meta: dict[str, Any],
                     image_size: int | None, db_url: str | None = None) -> dict[str, Any]:
    """What determines the shards' content; a resumed job must match it exactly."""
    get, plain = config_args.get, config_args.plain
    tcfg = plain(get(config, "teacher"))
    desc = {
        "source": plain(get(config, "source")), "image_size": image_size,
        "num_items": num_items, "num_shards": int(get(config, "num_shards", 1)),
        "split": get(config, "split", "train"), "k": int(get(config, "k", 0)),
        "latents": get(config, "latents", "vae"), "seed": int(get(config, "seed", 0)),
        "neighbours": get(config, "neighbours", "inline"),
        "exclude_duplicate_images": bool(get(config, "exclude_duplicate_images", True)),
        "text_encoder": models.text_encoder_id, "vae": models.vae_id,
    }
    if desc["latents"] == "teacher":
        desc["teacher"] = {**tcfg, "unet": teacher.unet_id, "text_encoder": teacher.text_encoder_id}
    if retriever is not None:
        db = retriever.database
        # Where the trainer finds it: its URL when it was staged from one.
        location = db_url if db_url and storage.is_url(db_url) else os.path.abspath(db.path)
        desc["database"] = {"path": location, "count": db.count,
                            "created": db.manifest.get("created"), "source": db.manifest.get("source")}
        desc["index"] = {k: index_meta[k] for k in ("kind", "count", "config")}
    return jsonfiles.normalized(desc)


def _without_paths(desc: dict[str, Any]) -> dict[str, Any]:
    """A job description less where its database lies: a moved or copied workdir still resumes."""
    if "database" not in desc:
        return desc
    return {**desc, "database": {k: v for k, v in desc["database"].items() if k != "path"}}


def precompute(config: Any, workdir: str, process_index: int | None = None,
               process_count: int | None = None) -> dict[str, Any] | None:
    """Writes this process's TFRecord shards; returns the manifest once every shard exists."""
    from imagerag_jax.data import tfrecords  # pylint: disable=g-import-not-at-top
    get = config_args.get
    pi = jax.process_index() if process_index is None else int(process_index)
    pc = jax.process_count() if process_count is None else int(process_count)
    if get(config, "source") is None:
        raise UserError("precompute needs config.source (the training pairs)")
    mode = get(config, "latents", "vae")
    if mode not in ("vae", "teacher"):
        raise UserError(f"config.latents must be 'vae' or 'teacher', got {mode!r}")
    neighbours = get(config, "neighbours", "inline")
    if neighbours not in tfrecords.NEIGHBOURS:
        raise UserError(f"config.neighbours must be one of {', '.join(tfrecords.NEIGHBOURS)}, "
                        f"got {neighbours!r}")
    out_dir = get(config, "data_dir") or os.path.join(workdir, "data")
    split = get(config, "split", "train")
    num_shards = int(get(config, "num_shards", 1))
    k = int(get(config, "k", 0))
    image_size = get(config, "image_size")
    batch_size = int(get(config, "batch_size", 32))
    seed = int(get(config, "seed", 0))
    exclude_dups = bool(get(config, "exclude_duplicate_images", True))

    models = towers.load_job_towers(config, workdir)
    enc = encoders.Encoder(models, batch_size)
    teacher_enc, teacher, spec = None, None, None
    tcfg = get(config, "teacher")
    negative = get(tcfg, "negative_prompt", "")
    if mode == "teacher":
        tw = get(config, "teacher_weights")
        teacher = models if tw is None or tw == get(config, "encoder_weights") else (
            towers.load_job_towers(config, workdir, tw))
        teacher_enc = encoders.Encoder(teacher, batch_size)
        spec = encoders.TeacherSpec(get(tcfg, "sampler", "ddim"), int(get(tcfg, "steps", 25)),
                                    float(get(tcfg, "guidance", 7.5)), teacher.pipe.prediction_type)
    retriever, index_meta = None, {}
    if k > 0:
        retriever = _open_retriever(build_db_lib.db_dir(config, workdir),
                                    build_db_lib.index_dir(config, workdir), models, exclude_dups)
        index_meta = build_db_lib.index_meta(build_db_lib.index_dir(config, workdir))

    source = sources_lib.source_from_config(get(config, "source"))
    if not source.has_images and mode != "teacher":
        raise UserError(f"{source.skipped.name} holds prompts only: it needs config.latents='teacher' "
                         "(the teacher synthesizes the images), not 'vae'")
    limit = int(get(config, "max_source_items", 0)) or None
    if not hasattr(source, "__len__"):
        if limit is None:
            raise UserError("this source has no length: set config.max_source_items (raw items to read)")
        num_items = limit
    else:
        num_items = len(source) if limit is None else min(len(source), limit)

    storage.makedirs(out_dir)  # a local folder or an object-storage URL
    desc = _job_description(config, models, teacher, num_items, retriever, index_meta, image_size,
                            build_db_lib.db_dir(config, workdir))
    desc_path = os.path.join(out_dir, f"precompute_{split}.json")
    if storage.exists(desc_path):
        old = jsonfiles.read(desc_path, what="precompute job description", error=UserError)
        old, pinned = _without_paths(old), _without_paths(desc)
        if old != pinned:
            diff = sorted(key for key in set(old) | set(pinned) if old.get(key) != pinned.get(key))
            raise UserError(f"{out_dir} holds split {split!r} of a precompute job with another "
                             f"configuration (differs in {diff}); use a new data_dir or delete it")
    else:
        jsonfiles.write_atomic(desc_path, desc)

    # Shapes of the schema from abstract evaluation (no compile).
    if image_size is None:
        raise UserError("precompute needs config.image_size (pixels; images are resized to it)")
    lat, embed_shape, pooled_dim = enc.output_shapes((image_size, image_size, 3))
    schema = tfrecords.Schema(lat, embed_shape, pooled_dim, k, has_noise=mode == "teacher",
                              neighbours=neighbours if k else "inline")
    if retriever is not None and (tuple(retriever.database.shapes["latents"]) != lat or
                                  tuple(retriever.database.shapes["prompt_embeds"]) != embed_shape):
        raise UserError(f"database shapes {retriever.database.shapes} do not match the examples' "
                         f"latent {lat} / embeds {schema.embed_shape}; check config.image_size")

    bounds = shard_bounds(num_items, num_shards)
    mine = host_shards(num_shards, pi, pc)
    todo = [i for i in mine if not shard_done(out_dir, split, i, num_shards)]
    logging.info("precompute: process %d/%d owns shards %s of %d; %d to write, %d already done.",
                 pi, pc, mine, num_shards, len(todo), len(mine) - len(todo))

    def process(batch: list[tuple[int, np.ndarray, str]]) -> list[dict[str, Any]]:
        ids = np.asarray([b[0] for b in batch], np.int64)
        images = np.stack([b[1] for b in batch]) if source.has_images else None
        captions = [b[2] for b in batch]
        embeds, pooled = enc.texts(captions)
        out: dict[str, Any] = {"prompt_embeds": embeds, "pooled": pooled}
        if mode == "vae":
            out["latent"] = enc.images(images)
        else:
            noise = encoders.example_noise(seed, ids, lat)
            out["noise"] = noise
            out["latent"] = teacher_enc.teacher(spec, captions, negative, noise)
        if retriever is not None:
            # A prompt has no image to be a duplicate of: only its own id is excluded.
            hashes = [build_db_lib.image_hash(im) for im in images] if images is not None else \
                [None] * len(batch)
            got = retriever.retrieve(retriever.queries(pooled, captions), k,
                                     exclude_ids=retriever.exclusions(ids, hashes))
            out.update(retrieved_ids=got["ids"], retrieval_scores=got["scores"].astype(np.float32))
            if schema.neighbours == "inline":
                out.update(retrieved_latents=got["latents"], retrieved_prompt_embeds=got["prompt_embeds"],
                           retrieved_pooled=got["pooled"])
        return [{"prompt": captions[j], "example_id": ids[j],
                 **{name: v[j] for name, v in out.items()}} for j in range(len(batch))]

    if todo:
        cursor = sources_lib.RawCursor(sources_lib.raw_items(source, stop=bounds[max(todo) + 1]))
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
                    if image is not None:
                        image = sources_lib.prepare_image(image, image_size)
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
        logging.info("precompute: %d shard(s) of other processes not finished yet (%s...); the "
                     "last process to finish writes the manifest.", len(missing), missing[:8])
        return None
    index_params = dict(index_meta)
    source_info = {"config": config_args.plain(get(config, "source")), "name": source.skipped.name,
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
