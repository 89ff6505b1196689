"""`run(config, workdir)` for the compositional miniature (configs/compose.py).

Per training seed: towers (VAE, text encoder, teacher, turbo student: `run.train_towers` on the
compositional canvases) -> build-db on the database split -> precompute two TFRecord sets of
the training prompts (teacher-synthesised, real) -> ImageRAGTurbo trained on their mixture (and,
as an ablation, on the teacher set alone) -> `compose_report.evaluate_seed`. With several seeds
each runs in workdir/seed_S and `compose_report.aggregate` writes the table over seeds.
"""

from __future__ import annotations

import copy
import json
import os
import time
from typing import Any

import ml_collections
import numpy as np

from imagerag_jax import jsonfiles
from imagerag_jax.miniature import compose
from imagerag_jax.miniature import compose_report
from imagerag_jax.miniature import run as run_lib


def splits(config: ml_collections.ConfigDict) -> dict[str, compose.ComposeSplit]:
    """The run's splits (a function of data_seed and config.splits only)."""
    return compose.make_splits(int(config.data_seed), size=int(config.image_size), **dict(config.splits))


def check_splits(config: ml_collections.ConfigDict, workdir: str) -> None:
    """Record the data the workdir's stages are trained on; refuse to resume on other data."""
    want = json.loads(json.dumps({"data_seed": int(config.data_seed), "image_size": int(config.image_size),
                                  **dict(config.splits)}, default=list))
    path = os.path.join(workdir, "splits.json")
    if os.path.exists(path):
        with open(path) as f:
            have = json.load(f)
        if have != want:
            raise ValueError(f"{workdir} holds stages trained on other splits ({have} != {want}); "
                             "use a fresh --workdir")
        return
    jsonfiles.write_atomic(path, want, sort_keys=False, indent=1)


def train_towers(config: ml_collections.ConfigDict, workdir: str) -> run_lib.Towers:
    """The towers on train + database canvases; the student is distilled on the training prompts.

    The VAE and the text encoder see every canvas; the teacher UNet none with a novel digit
    (`config.splits.novel_digits`), so only retrieval can show the one-step student those, nor
    one with a blind digit (`config.teacher.blind_digits`), whose prompts the student is not
    distilled on either.
    """
    check_splits(config, workdir)
    s = splits(config)
    images = compose.as_float(np.concatenate([s["train"].images, s["database"].images]))
    labels = np.concatenate([s["train"].compositions, s["database"].compositions])
    novel = np.concatenate([s["train"].classes, s["database"].classes]) == compose.CLASSES.index("novel")
    blind = compose.blind_digits(config)
    prompts = s["train"].compositions[~compose.has_digit(s["train"].compositions, blind)]
    return run_lib.train_towers(config, workdir, images, labels, captions=compose.all_captions(),
                                prompt_labels=prompts, side_labels=compose.side_labels(labels),
                                unet_keep=~novel & ~compose.has_digit(labels, blind))


def train_imagerag(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
    """build-db -> precompute (teacher and real sets) -> train on the mixture (+ teacher only)."""
    from imagerag_jax.training import trainer as train_lib  # pylint: disable=g-import-not-at-top
    from imagerag_jax.data import build_db as build_db_lib  # pylint: disable=g-import-not-at-top
    from imagerag_jax.data import precompute as precompute_lib  # pylint: disable=g-import-not-at-top

    rag = os.path.join(workdir, "rag")
    models = dict(encoder_weights=run_lib.models_dir(workdir, "turbo"),
                  teacher_weights=run_lib.models_dir(workdir, "teacher"),
                  seed=int(config.seed))
    pre = run_lib.job_config(config.precompute, **models)
    build_db_lib.build_db(pre, rag)
    weights, needed = compose.mixture_sets(config)
    sets = {}
    for name in needed:
        sets[name] = os.path.join(rag, f"data_{name}")
        job = run_lib.job_config(config.precompute, **models, data_dir=sets[name],
                                  latents="teacher" if name == "teacher" else "vae")
        precompute_lib.precompute(job, rag)
    train_fields = dict(student_weights=models["encoder_weights"],
                        teacher_weights=models["teacher_weights"], seed=int(config.seed))
    mixture = tuple((sets[n], w) for n, w in weights.items() if w != 0.0)
    states, seconds = {}, {}
    variants = [("imageragturbo", dict(data_mixture=mixture), "train")]
    if config.teacher_only_ablation:
        variants.append(("imageragturbo_teacher_only", dict(data_dir=sets["teacher"]), "train_teacher_only"))
    if config.train_arms:
        for arm in ("no_adapter", "shuffled"):
            variants.append((f"imageragturbo_{arm}", dict(data_mixture=mixture, arm=arm), f"train_{arm}"))
    for name, data, folder in variants:
        t0 = time.perf_counter()
        tcfg = run_lib.job_config(config.train, **train_fields, **data)
        states[name] = train_lib.train_and_evaluate(tcfg, os.path.join(rag, folder))
        seconds[name] = round(time.perf_counter() - t0, 1)
    return {"states": states, "seconds": seconds, "db": build_db_lib.db_dir(pre, rag),
            "index": build_db_lib.index_dir(pre, rag)}


def run_seed(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
    """Every stage of one training seed, then its evaluation (results.{json,md} in workdir)."""
    os.makedirs(workdir, exist_ok=True)
    t_start = time.perf_counter()
    towers = train_towers(config, workdir)
    t0 = time.perf_counter()
    trained = train_imagerag(config, workdir)
    towers.stats["imagerag"] = {"steps": int(config.train.total_steps),
                                "seconds": round(time.perf_counter() - t0, 1), **trained["seconds"]}
    results = compose_report.evaluate_seed(config, workdir, towers, trained, splits(config))
    results["total_seconds"] = round(time.perf_counter() - t_start, 1)
    compose_report.write(workdir, results)
    return results


def seed_config(config: ml_collections.ConfigDict, seed: int) -> ml_collections.ConfigDict:
    """The one-seed config of training seed `seed` (what `--config.seed=S` runs)."""
    cfg = copy.deepcopy(config)
    cfg.unlock()
    cfg.seed, cfg.num_seeds = int(seed), 1
    cfg.lock()
    return cfg


def run(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
    """One seed in workdir, or `num_seeds` seeds in workdir/seed_S and the table over them."""
    n = int(config.num_seeds)
    if n < 1:
        raise ValueError(f"config.num_seeds must be >= 1, got {n}")
    if n == 1:
        return run_seed(config, workdir)
    t_start = time.perf_counter()
    per_seed = []
    for s in range(int(config.seed), int(config.seed) + n):
        per_seed.append(run_seed(seed_config(config, s), os.path.join(workdir, f"seed_{s}")))
    results = compose_report.aggregate(config, per_seed, [os.path.join(workdir, f"seed_{s}")
                                                          for s in range(int(config.seed), int(config.seed) + n)])
    results["total_seconds"] = round(time.perf_counter() - t_start, 1)
    results["config"] = json.loads(config.to_json_best_effort())
    compose_report.write(workdir, results)
    return results
