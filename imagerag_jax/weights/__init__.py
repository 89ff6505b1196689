"""Weight import from (and export to) PyTorch checkpoints: the public loading API."""

from imagerag_jax.weights.convert import WeightLoadError
from imagerag_jax.weights.from_torch import (
    SDTowers,
    load_pipeline,
    load_text_encoder,
    load_unet,
    load_vae,
)

__all__ = [
    "SDTowers",
    "WeightLoadError",
    "load_pipeline",
    "load_text_encoder",
    "load_unet",
    "load_vae",
]
