"""`run(config, workdir)`: every stage of a miniature (digits, or compose), then the comparison.

Stages (each resumable): vae -> text -> teacher -> student (turbo) -> build-db -> precompute ->
ImageRAGTurbo training (the production `train.train_and_evaluate`) -> classifier -> evaluation.
"""

from __future__ import annotations

import copy
import os
import time
from typing import Any

import ml_collections
import numpy as np
from absl import logging

from imagerag_jax import jsonfiles
from imagerag_jax.miniature import data as data_lib
from imagerag_jax.miniature import stages
from imagerag_jax.models.clip_text import Tokenizer
from imagerag_jax.weights import random_pipeline, to_torch


def models_dir(workdir: str, name: str) -> str:
    """The pipeline folder the miniature writes for `name` ('teacher', 'turbo') under workdir."""
    return os.path.join(workdir, "models", name)


def _write_pipeline(path: str, unet, unet_p, vae, vae_p, text, text_p, tokenizer_dir: str) -> str:
    """A diffusers pipeline folder (what build-db/precompute/train load), written once."""
    if not os.path.exists(os.path.join(path, "model_index.json")):
        tmp = jsonfiles.temp_name(path)  # a folder: written beside, then renamed into place
        to_torch.save_pipeline(tmp, unet, unet_p, vae, vae_p, text, text_p, tokenizer_dir=tokenizer_dir)
        os.replace(tmp, path)
    return path


def job_config(template: ml_collections.ConfigDict, **fields: Any) -> ml_collections.ConfigDict:
    """An unlocked copy of a sub-config with fields set (paths known only at run time)."""
    cfg = copy.deepcopy(template)
    cfg.unlock()
    for key, value in fields.items():
        setattr(cfg, key, value)
    cfg.lock()
    return cfg


class Towers:
    """Everything the stages produced, in memory (modules + params + caption tables)."""

    def __init__(self, **kw: Any):
        self.__dict__.update(kw)


def train_towers(config: ml_collections.ConfigDict, workdir: str, images: np.ndarray | None = None,
                 labels: np.ndarray | None = None, *, captions: list[list[str]] | None = None,
                 prompt_labels: np.ndarray | None = None, side_labels: np.ndarray | None = None,
                 unet_keep: np.ndarray | None = None) -> Towers:
    """Stages 1-4: VAE, text encoder, teacher, turbo student; writes models/{teacher,turbo}.

    `images` (float [-1, 1]) and their `labels` train the towers, `captions[label]` are the
    wordings of each label and `prompt_labels` the labels whose captions the student is distilled
    on; the defaults are the digits miniature's (train + database splits, every digit).
    `side_labels` [N, S] say what stands on each vertical strip of an image (the text encoder's
    per-side loss, `config.text.sides`). `unet_keep` (bool [N], default all) picks the images
    the teacher UNet trains on; the VAE and text encoder see every image.
    """
    seed, progress = int(config.seed), bool(config.progress)
    size = int(config.image_size)
    if images is None:
        # The splits and captions are those of the precompute jobs (source seed 0) whatever the
        # training seed, so the held-out split stays held out.
        train, db = data_lib.load_split("train", size), data_lib.load_split("database", size)
        pretrain = data_lib.join(train, db)
        images, labels = pretrain.images, pretrain.labels
    stats: dict[str, Any] = {}

    t0 = time.perf_counter()
    vae, vae_p, stats["vae"] = stages.train_vae(workdir, dict(config.vae), images, seed=seed,
                                                progress=progress)
    logging.info("vae ready (%.0f s): %s", time.perf_counter() - t0, stats["vae"].get("final"))

    tok_dir = random_pipeline.write_byte_tokenizer(os.path.join(workdir, "models", "tokenizer"))
    tokenizer = Tokenizer.from_pretrained(tok_dir)
    table = stages.CaptionTable(tokenizer, captions)
    t0 = time.perf_counter()
    text, text_p, stats["text"] = stages.train_text(workdir, dict(config.text), table, images, labels,
                                                    seed=seed, side_labels=side_labels,
                                                    progress=progress)
    logging.info("text encoder ready (%.0f s): %s", time.perf_counter() - t0, stats["text"].get("final"))

    t0 = time.perf_counter()
    keep = np.ones(len(images), bool) if unet_keep is None else np.asarray(unet_keep, bool)
    latents = stages.encode_latents(vae, vae_p, images[keep])
    unet = stages.make_unet(dict(config.teacher), text.hidden_size)
    teacher_p, stats["teacher"] = stages.train_teacher(
        workdir, dict(config.teacher), unet, latents, labels[keep], text, text_p, table,
        seed=seed, progress=progress)
    logging.info("teacher ready (%.0f s): %s", time.perf_counter() - t0, stats["teacher"].get("final"))

    t0 = time.perf_counter()
    pairs = stages.teacher_pairs(workdir, dict(config.student), unet, teacher_p, text, text_p, table,
                                 latents.shape[1:], seed=seed, labels=prompt_labels,
                                 progress=progress)
    student_p, stats["student"] = stages.train_student(workdir, dict(config.student), unet, teacher_p,
                                                       pairs, text, text_p, table, seed=seed,
                                                       progress=progress)
    logging.info("turbo student ready (%.0f s): %s", time.perf_counter() - t0, stats["student"].get("final"))

    _write_pipeline(models_dir(workdir, "teacher"), unet, teacher_p, vae, vae_p, text, text_p, tok_dir)
    _write_pipeline(models_dir(workdir, "turbo"), unet, student_p, vae, vae_p, text, text_p, tok_dir)
    return Towers(vae=vae, vae_p=vae_p, text=text, text_p=text_p, tokenizer=tokenizer, table=table,
                  unet=unet, teacher_p=teacher_p, student_p=student_p, stats=stats)


def train_imagerag(config: ml_collections.ConfigDict, workdir: str) -> tuple[Any, str, str]:
    """Stage 5: build-db -> precompute -> train with the production jobs; (state, db, index dirs)."""
    from imagerag_jax.training import trainer as train_lib  # pylint: disable=g-import-not-at-top
    from imagerag_jax.data import build_db as build_db_lib  # pylint: disable=g-import-not-at-top
    from imagerag_jax.data import precompute as precompute_lib  # pylint: disable=g-import-not-at-top

    rag = os.path.join(workdir, "rag")
    pre = job_config(config.precompute, encoder_weights=models_dir(workdir, "turbo"),
                      teacher_weights=models_dir(workdir, "teacher"), seed=int(config.seed))
    build_db_lib.build_db(pre, rag)
    precompute_lib.precompute(pre, rag)
    tcfg = job_config(config.train, student_weights=models_dir(workdir, "turbo"),
                       teacher_weights=models_dir(workdir, "teacher"),
                       data_dir=os.path.join(rag, "data"), seed=int(config.seed))
    state = train_lib.train_and_evaluate(tcfg, os.path.join(rag, "train"))
    return state, build_db_lib.db_dir(pre, rag), build_db_lib.index_dir(pre, rag)


def run(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
    """Every stage, then the evaluation; writes workdir/results.{json,md} and grids; returns results.

    A config with `miniature = "compose"` (configs/compose.py) runs the compositional miniature.
    """
    if config.get("miniature", "digits") == "compose":
        from imagerag_jax.miniature import compose_run  # pylint: disable=g-import-not-at-top
        return compose_run.run(config, workdir)
    from imagerag_jax.miniature import report  # pylint: disable=g-import-not-at-top

    os.makedirs(workdir, exist_ok=True)
    t_start = time.perf_counter()
    towers = train_towers(config, workdir)
    t0 = time.perf_counter()
    state, db_path, index_path = train_imagerag(config, workdir)
    towers.stats["imagerag"] = {"steps": int(config.train.total_steps),
                                "seconds": round(time.perf_counter() - t0, 1)}
    results = report.evaluate_all(config, workdir, towers, state, db_path, index_path)
    results["total_seconds"] = round(time.perf_counter() - t_start, 1)
    report.write(workdir, results)
    return results
