"""Flax params -> diffusers/transformers model folders that PyTorch loads with ``from_pretrained``.

``save_unet`` and ``save_vae`` (DESIGN section 3) write ``config.json`` plus
``diffusion_pytorch_model.safetensors``; ``save_text_encoder`` writes a transformers
``CLIPTextModel`` folder. No torch import is needed to write them.
"""

from __future__ import annotations

import json
import os
from typing import Any, Mapping

import numpy as np

from imagerag_jax.models.clip_text import CLIPTextTransformer
from imagerag_jax.models.unet import UNet
from imagerag_jax.models.vae import AutoencoderKL
from imagerag_jax.weights import convert

DIFFUSERS_VERSION = "0.31.0"  # the oldest diffusers whose config keys these folders use


def unet_config(unet: UNet) -> dict[str, Any]:
    """diffusers ``UNet2DConditionModel`` config for our module."""
    heads = unet.num_attention_heads
    return {
        "_class_name": "UNet2DConditionModel",
        "_diffusers_version": DIFFUSERS_VERSION,
        "in_channels": unet.in_channels,
        "out_channels": unet.out_channels,
        "block_out_channels": list(unet.block_out_channels),
        "down_block_types": list(unet.down_block_types),
        "up_block_types": list(unet.up_block_types),
        "layers_per_block": unet.layers_per_block,
        # diffusers reads the per-block head counts from attention_head_dim (SD 2.x convention).
        "attention_head_dim": heads if isinstance(heads, int) else list(heads),
        "cross_attention_dim": unet.cross_attention_dim,
        "use_linear_projection": unet.use_linear_projection,
        "upcast_attention": unet.upcast_attention,
        "flip_sin_to_cos": unet.flip_sin_to_cos,
        "freq_shift": unet.freq_shift,
        "norm_num_groups": unet.norm_num_groups,
        "norm_eps": unet.norm_eps,
        "sample_size": 64,
    }


def vae_config(vae: AutoencoderKL) -> dict[str, Any]:
    """diffusers ``AutoencoderKL`` config for our module."""
    n = len(vae.block_out_channels)
    return {
        "_class_name": "AutoencoderKL",
        "_diffusers_version": DIFFUSERS_VERSION,
        "in_channels": vae.in_channels,
        "out_channels": vae.out_channels,
        "block_out_channels": list(vae.block_out_channels),
        "down_block_types": ["DownEncoderBlock2D"] * n,
        "up_block_types": ["UpDecoderBlock2D"] * n,
        "layers_per_block": vae.layers_per_block,
        "latent_channels": vae.latent_channels,
        "norm_num_groups": vae.norm_num_groups,
        "scaling_factor": vae.scaling_factor,
        "use_quant_conv": vae.use_quant_conv,
        "use_post_quant_conv": vae.use_post_quant_conv,
        "mid_block_add_attention": vae.mid_block_add_attention,
        "act_fn": "silu",
        "sample_size": 512,
    }


def text_config(text: CLIPTextTransformer) -> dict[str, Any]:
    """transformers ``CLIPTextConfig`` for our module."""
    return {
        "architectures": ["CLIPTextModel"],
        "model_type": "clip_text_model",
        "vocab_size": text.vocab_size,
        "hidden_size": text.hidden_size,
        "intermediate_size": text.intermediate_size,
        "num_hidden_layers": text.num_hidden_layers,
        "num_attention_heads": text.num_attention_heads,
        "max_position_embeddings": text.max_position_embeddings,
        "hidden_act": text.hidden_act,
        "layer_norm_eps": text.layer_norm_eps,
        "eos_token_id": text.eos_token_id,
        "bos_token_id": text.eos_token_id - 1,
        "pad_token_id": 1,
        "projection_dim": text.hidden_size,
        "torch_dtype": "float32",
    }


def torch_state_dict(params: Mapping[str, Any], prefix: str = "") -> dict[str, np.ndarray]:
    """PyTorch-layout numpy state dict for a Flax param tree."""
    return {prefix + k: np.ascontiguousarray(v, np.float32) for k, v in convert.flax_to_torch(params)}


def _write(out_dir: str, config: Mapping[str, Any], tensors: Mapping[str, np.ndarray], weights: str) -> str:
    from safetensors.numpy import save_file

    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, "config.json"), "w") as f:
        json.dump(config, f, indent=2)
    save_file(dict(tensors), os.path.join(out_dir, weights), metadata={"format": "pt"})
    return out_dir


def save_unet(unet: UNet, params: Mapping[str, Any], out_dir: str) -> str:
    """Write a diffusers UNet folder loadable by ``UNet2DConditionModel.from_pretrained``."""
    return _write(out_dir, unet_config(unet), torch_state_dict(params),
                  "diffusion_pytorch_model.safetensors")


def save_vae(vae: AutoencoderKL, params: Mapping[str, Any], out_dir: str) -> str:
    """Write a diffusers VAE folder loadable by ``AutoencoderKL.from_pretrained``."""
    return _write(out_dir, vae_config(vae), torch_state_dict(params),
                  "diffusion_pytorch_model.safetensors")


def save_text_encoder(text: CLIPTextTransformer, params: Mapping[str, Any], out_dir: str) -> str:
    """Write a transformers folder loadable by ``CLIPTextModel.from_pretrained``."""
    return _write(out_dir, text_config(text), torch_state_dict(params, "text_model."),
                  "model.safetensors")
