"""A tiny trained run and a retrieval DB + exact index built with its text encoder and VAE.

    from tests.rag_fixtures import make_run_and_db
    made = make_run_and_db(tmp_path)    # {"workdir", "db", "index", "captions"}

The session fixture `rag_run` (tests/conftest.py) makes it once for every test file; a test that
writes beside the DB (an H-space cache) works on a copy. The DB's latents are the VAE's encodings of random images, its embeddings the
run's text encoder's, and its manifest records the towers' identities and fingerprints as
`build-db` does, so `rag.check_database` has something real to check.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from imagerag_jax.weights import towers
from imagerag_jax.training import trainer as trainer_lib
from imagerag_jax.retrieval import database as db_lib
from imagerag_jax.retrieval import index as index_lib

ROOT = Path(__file__).resolve().parents[1]
CAPTIONS = ["a red square", "a blue circle", "a green triangle", "a handwritten digit seven",
            "a photo of a cat", "a photo of a dog"]
LATENT = (8, 8, 4)  # configs/tiny.py's synthetic latents


def tiny_config(**changes: Any):
    """configs/tiny.py without sample grids, with `changes` applied."""
    spec = importlib.util.spec_from_file_location("config_tiny", ROOT / "configs" / "tiny.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    cfg = module.get_config(None)
    cfg.sample_every = 0
    for key, value in changes.items():
        cfg[key] = value
    return cfg


def write_db(path: str, captions: list[str], *, seed: int = 0, text_seed: int = 0,
             vae_seed: int = 0, text_identity: str | None = None) -> str:
    """A DB of `captions` encoded by the tiny random towers of `text_seed`/`vae_seed`."""
    from imagerag_jax.models.clip_text import Tokenizer
    from imagerag_jax.weights import random_pipeline

    text, text_p = towers.random_tower("text_encoder", "tiny", text_seed)
    vae, vae_p = towers.random_tower("vae", "tiny", vae_seed)
    tok = Tokenizer.from_pretrained(random_pipeline.write_byte_tokenizer(
        os.path.join(os.path.dirname(os.path.abspath(path)), "tokenizer")))
    hidden, pooled = jax.jit(lambda ids: text.apply({"params": text_p}, ids))(jnp.asarray(tok(captions)))
    pooled = np.asarray(pooled) / np.linalg.norm(np.asarray(pooled), axis=-1, keepdims=True)
    f = vae.downsample_factor
    pixels = np.random.default_rng(seed).uniform(-1, 1, (len(captions), LATENT[0] * f, LATENT[1] * f, 3))
    latents = jax.jit(lambda x: vae.apply({"params": vae_p}, x, method=vae.encode_latents))(
        jnp.asarray(pixels, jnp.float32))
    spec = db_lib.DatabaseSpec(LATENT, tuple(hidden.shape[1:]), int(pooled.shape[-1]))
    extra = {"text_encoder_fingerprint": towers.fingerprint(text_p),
             "vae_fingerprint": towers.fingerprint(vae_p)}
    with db_lib.DatabaseWriter(
            path, spec, source="tests", fsync=False, extra=extra,
            text_encoder=text_identity or towers.module_identity(f"random:tiny:{text_seed}", text),
            vae=towers.module_identity(f"random:tiny:{vae_seed}", vae)) as w:
        w.append(captions, np.asarray(latents), np.asarray(hidden), pooled,
                 np.arange(100, 100 + len(captions)))
    return path


def write_index(db_path: str, out: str, kind: str = "exact") -> str:
    """The saved index of a DB (captions for 'bm25', pooled embeddings otherwise)."""
    db = db_lib.Database(db_path)
    data = db.captions() if kind == "bm25" else db.pooled
    index_lib.Index.build(data, {"kind": kind}, ids=db.ids).save(out)
    return out


def make_run_and_db(root: str | os.PathLike) -> dict[str, Any]:
    """configs/tiny.py trained 4 steps (lr 1e-4: the adapter moves off zero) + a 6-entry DB + index."""
    root = str(root)
    workdir = os.path.join(root, "work")
    trainer_lib.train_and_evaluate(tiny_config(total_steps=4, checkpoint_every=4, log_every=4), workdir)
    db = write_db(os.path.join(root, "db"), CAPTIONS)
    index = write_index(db, os.path.join(root, "index"))
    return {"workdir": workdir, "db": db, "index": index, "captions": list(CAPTIONS)}
