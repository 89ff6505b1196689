"""Prompts -> images with a local SD 2.x / SD-Turbo pipeline: what ``main generate`` runs.

    from imagerag_jax.inference import generate
    pipe = generate.load_pipeline("/path/to/sd-turbo")          # None: the tiny random pipeline
    images = generate.text_to_images(pipe, ["a cat on a sofa"], seed=0)  # (B, 512, 512, 3), [-1, 1]

One step without guidance is SD-Turbo (t = 999); more steps use the chosen sampler with
classifier-free guidance when ``guidance > 1`` (``sampling.ids_to_images``, one jit).
"""

from __future__ import annotations

import logging
import tempfile
import time
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from imagerag_jax.diffusion import sampling
from imagerag_jax.errors import UserError

# The embedded random pipeline's images are 64 px (its UNet was made for 8x8 latents).
RANDOM_PIPELINE_SIZE = 64
DEFAULT_SIZE = 512


def load_pipeline(weights: str | None, *, tokenizer: str | None = None,
                  dtype: str = "float32") -> Any:
    """A `weights.SDTowers` from a folder or single file; None: a tiny random one (images are noise)."""
    from imagerag_jax import weights as weights_lib
    from imagerag_jax.weights import random_pipeline

    t0 = time.perf_counter()
    compute = jnp.bfloat16 if dtype == "bfloat16" else jnp.float32
    if weights is None:
        logging.warning("no weights given: using a tiny random-weight pipeline; images are noise")
        with tempfile.TemporaryDirectory(prefix="imagerag-random-") as tmp:
            return weights_lib.load_pipeline(random_pipeline.write_random_pipeline(tmp), dtype=compute)
    pipe = weights_lib.load_pipeline(weights, dtype=compute, tokenizer_path=tokenizer)
    if pipe.tokenizer is None:
        raise UserError(f"{weights} has no tokenizer/ folder: pass a tokenizer folder (--tokenizer)")
    logging.info("loaded %s in %.1f s", weights, time.perf_counter() - t0)
    return pipe


def default_size(weights: str | None) -> int:
    """Image size when none is asked for: 512 px (SD 2.x-base, SD-Turbo), 64 for the random pipeline."""
    return RANDOM_PIPELINE_SIZE if weights is None else DEFAULT_SIZE


def latent_size(pipe: Any, height: int, width: int) -> tuple[int, int]:
    """(h, w) of the latents for an image size; UserError unless the UNet can take it."""
    factor = pipe.vae.downsample_factor
    multiple = factor * 2 ** (len(pipe.unet.block_out_channels) - 1)
    if height % multiple or width % multiple:
        raise UserError(f"height and width must be multiples of {multiple} for this pipeline, got "
                        f"{height}x{width}")
    return height // factor, width // factor


def text_to_images(pipe: Any, prompts: Sequence[str], *, seed: int = 0, steps: int = 1,
                   guidance: float = 0.0, sampler: str = "euler", negative_prompt: str = "",
                   height: int = DEFAULT_SIZE, width: int | None = None) -> np.ndarray:
    """One image per prompt, float32 (B, H, W, 3) in [-1, 1]; noise from `seed`."""
    if not prompts:
        raise UserError("no prompts given")
    width = width or height
    h, w = latent_size(pipe, height, width)
    ids = jnp.asarray(pipe.tokenizer(list(prompts)))
    uncond_ids = jnp.asarray(pipe.tokenizer([negative_prompt] * len(prompts)))
    noise = jax.random.normal(jax.random.PRNGKey(seed), (len(prompts), h, w, pipe.unet.in_channels))
    t0 = time.perf_counter()
    out = sampling.ids_to_images(pipe, ids, uncond_ids, noise, steps=steps, guidance=guidance,
                                 sampler=sampler)
    out = np.asarray(jax.device_get(out))
    logging.info("generated %d image(s) in %.1f s (incl. compile)", len(out), time.perf_counter() - t0)
    return out
