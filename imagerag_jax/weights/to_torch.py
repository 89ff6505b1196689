"""Flax params -> diffusers/transformers model folders that PyTorch loads with ``from_pretrained``.

``save_unet`` and ``save_vae`` write ``config.json`` plus
``diffusion_pytorch_model.safetensors``; ``save_text_encoder`` writes a transformers
``CLIPTextModel`` folder; ``save_pipeline`` a whole ``StableDiffusionPipeline`` folder.
``save_lora_peft`` writes a decoder LoRA in the PEFT/diffusers LoRA format and ``save_adapter``
the H-space adapter for ``imagerag_jax/torch_runtime.py``. No torch import is needed to write
them.
"""

from __future__ import annotations

import json
import os
import shutil
from typing import Any, Mapping

import numpy as np

from imagerag_jax.models import lora as lora_lib
from imagerag_jax.models.adapter import HSpaceAdapter
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


# ---------------------------------------------------------------------------------------------
# Whole pipeline folders.
# ---------------------------------------------------------------------------------------------


def scheduler_config(prediction_type: str = "epsilon", base: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """A scheduler config: ``base`` (e.g. the student's own) or SD-Turbo's Euler 'trailing' one."""
    cfg = dict(base) if base is not None else {
        "_class_name": "EulerDiscreteScheduler", "_diffusers_version": DIFFUSERS_VERSION,
        "beta_schedule": "scaled_linear", "beta_start": 0.00085, "beta_end": 0.012,
        "num_train_timesteps": 1000, "timestep_spacing": "trailing", "steps_offset": 1,
    }
    cfg["prediction_type"] = prediction_type  # the UNet's, which our loader reads back from here
    return cfg


def model_index(has_text: bool = True, has_tokenizer: bool = True,
                scheduler_class: str = "EulerDiscreteScheduler") -> dict[str, Any]:
    """``model_index.json`` of a ``StableDiffusionPipeline`` folder (absent parts as [null, null])."""
    return {
        "_class_name": "StableDiffusionPipeline",
        "_diffusers_version": DIFFUSERS_VERSION,
        "unet": ["diffusers", "UNet2DConditionModel"],
        "vae": ["diffusers", "AutoencoderKL"],
        "text_encoder": ["transformers", "CLIPTextModel"] if has_text else [None, None],
        "tokenizer": ["transformers", "CLIPTokenizer"] if has_tokenizer else [None, None],
        "scheduler": ["diffusers", scheduler_class],
        "safety_checker": [None, None],
        "feature_extractor": [None, None],
        "requires_safety_checker": False,
    }


def save_pipeline(
    out_dir: str,
    unet: UNet,
    unet_params: Mapping[str, Any],
    vae: AutoencoderKL,
    vae_params: Mapping[str, Any],
    text: CLIPTextTransformer | None = None,
    text_params: Mapping[str, Any] | None = None,
    *,
    tokenizer_dir: str | None = None,
    scheduler: Mapping[str, Any] | None = None,
) -> dict[str, str]:
    """Write unet/, vae/, [text_encoder/, tokenizer/], scheduler/ and model_index.json; returns the paths.

    ``tokenizer_dir`` is copied as is (a CLIP tokenizer folder); ``scheduler`` is a scheduler
    config (default: ``scheduler_config(unet.prediction_type)``).
    """
    paths = {
        "unet": save_unet(unet, unet_params, os.path.join(out_dir, "unet")),
        "vae": save_vae(vae, vae_params, os.path.join(out_dir, "vae")),
    }
    if text is not None:
        paths["text_encoder"] = save_text_encoder(text, text_params, os.path.join(out_dir, "text_encoder"))
    if tokenizer_dir is not None:
        paths["tokenizer"] = shutil.copytree(tokenizer_dir, os.path.join(out_dir, "tokenizer"),
                                             dirs_exist_ok=True)
    sched = dict(scheduler) if scheduler is not None else scheduler_config(unet.prediction_type)
    os.makedirs(os.path.join(out_dir, "scheduler"), exist_ok=True)
    paths["scheduler"] = os.path.join(out_dir, "scheduler")
    with open(os.path.join(paths["scheduler"], "scheduler_config.json"), "w") as f:
        json.dump(sched, f, indent=2)
    paths["model_index"] = os.path.join(out_dir, "model_index.json")
    index = model_index(text is not None, tokenizer_dir is not None,
                        sched.get("_class_name", "EulerDiscreteScheduler"))
    with open(paths["model_index"], "w") as f:
        json.dump(index, f, indent=2)
    return paths


# ---------------------------------------------------------------------------------------------
# LoRA in the PEFT / diffusers format.
# ---------------------------------------------------------------------------------------------

LORA_WEIGHT_NAME = "pytorch_lora_weights.safetensors"  # diffusers' LORA_WEIGHT_NAME_SAFE
LORA_METADATA_KEY = "lora_adapter_metadata"  # diffusers' LORA_ADAPTER_METADATA_KEY
LORA_CONFIG_NAME = "lora_config.json"


def torch_module_name(kernel_path: str) -> str:
    """'up_blocks_1/attentions_0/.../to_out_0/kernel' -> 'up_blocks.1.attentions.0....to_out.0'."""
    path = tuple(kernel_path.split("/"))
    # The exporter's own renaming rule, on a one-leaf tree: 'a/b_0/kernel' -> 'a.b.0.weight'.
    key, _ = next(convert.flax_to_torch(convert.unflatten({path: np.zeros(())})))
    return key[: -len(".weight")] if path[-1] == "kernel" else key


def lora_peft_state_dict(lora_params: Mapping[str, Any], alpha: float, rank: int,
                         prefix: str = "unet") -> dict[str, np.ndarray]:
    """PEFT LoRA tensors ``{prefix}.{module}.lora_A.weight`` / ``lora_B.weight`` (float32, torch layout).

    Linear: A (in, r) -> lora_A (r, in), B (r, out) -> lora_B (out, r). Conv: A (kh, kw, in, r)
    -> lora_A (r, in, kh, kw) (PEFT's conv with the base kernel size), B (r, out) -> lora_B
    (out, r, 1, 1). B is stored times alpha / rank, so the file's own scale is 1 (lora_alpha =
    r): every loader, with or without the metadata, applies exactly W + (alpha/rank)·B·A.
    """
    scale = float(alpha) / float(rank)
    out: dict[str, np.ndarray] = {}
    for path, (a, b) in sorted(lora_lib.lora_pairs(lora_params).items()):
        name = f"{prefix}.{torch_module_name(path)}" if prefix else torch_module_name(path)
        a = np.asarray(a, np.float32)
        b = np.asarray(b, np.float32) * np.float32(scale)
        if a.ndim == 2:
            a_t, b_t = a.T, b.T
        elif a.ndim == 4:
            a_t, b_t = np.transpose(a, (3, 2, 0, 1)), b.T[:, :, None, None]
        else:
            raise ValueError(f"LoRA {path!r}: A has shape {a.shape}; expected a Dense or conv factor")
        out[f"{name}.lora_A.weight"] = np.ascontiguousarray(a_t)
        out[f"{name}.lora_B.weight"] = np.ascontiguousarray(b_t)
    return out


def lora_peft_config(lora_params: Mapping[str, Any], rank: int) -> dict[str, Any]:
    """``peft.LoraConfig`` kwargs of the exported LoRA (lora_alpha = r: the scale is in lora_B)."""
    targets = sorted(torch_module_name(p) for p in lora_lib.lora_pairs(lora_params))
    return {"r": int(rank), "lora_alpha": int(rank), "target_modules": targets, "rank_pattern": {},
            "alpha_pattern": {}, "use_dora": False, "lora_bias": False}


def save_lora_peft(lora_params: Mapping[str, Any], alpha: float, rank: int, out_dir: str, *,
                   prefix: str = "unet", extra: Mapping[str, Any] | None = None) -> str:
    """Write ``pytorch_lora_weights.safetensors`` (diffusers ``load_lora_weights`` format) + a JSON sidecar.

    The safetensors metadata carry ``lora_adapter_metadata`` (the ``LoraConfig`` kwargs under
    ``{prefix}.``), as diffusers' ``save_lora_weights`` writes them; ``lora_config.json`` repeats
    them with the trained alpha and rank and ``extra`` (e.g. the base model) for people.
    """
    from safetensors.numpy import save_file

    os.makedirs(out_dir, exist_ok=True)
    tensors = lora_peft_state_dict(lora_params, alpha, rank, prefix)
    peft_cfg = lora_peft_config(lora_params, rank)
    packed = {f"{prefix}.{k}" if prefix else k: v for k, v in peft_cfg.items()}
    path = os.path.join(out_dir, LORA_WEIGHT_NAME)
    save_file(tensors, path, metadata={"format": "pt",
                                       LORA_METADATA_KEY: json.dumps(packed, indent=2, sort_keys=True)})
    sidecar = {"format": "peft-lora", "prefix": prefix, "peft_config": peft_cfg,
               "trained_rank": int(rank), "trained_alpha": float(alpha),
               "scale_in_lora_B": float(alpha) / float(rank), **dict(extra or {})}
    with open(os.path.join(out_dir, LORA_CONFIG_NAME), "w") as f:
        json.dump(sidecar, f, indent=2)
    return path


# ---------------------------------------------------------------------------------------------
# The H-space adapter (read by imagerag_jax/torch_runtime.py).
# ---------------------------------------------------------------------------------------------

ADAPTER_FORMAT = "imagerag-jax-hspace-adapter"
ADAPTER_VERSION = 1
ADAPTER_WEIGHTS = "adapter.safetensors"
ADAPTER_LAYER_NORM_EPS = 1e-5  # models/layers.layer_norm's default, used by the adapter


def adapter_config(adapter: HSpaceAdapter, channels: int) -> dict[str, Any]:
    """Everything needed to rebuild ``adapter`` for ``channels`` H-space channels (heads resolved)."""
    head_dim = adapter.head_dim
    if head_dim is None:
        if channels % adapter.num_heads:
            raise ValueError(f"{channels} channels cannot be split into {adapter.num_heads} heads")
        head_dim = channels // adapter.num_heads
    return {
        "format": ADAPTER_FORMAT,
        "version": ADAPTER_VERSION,
        "channels": int(channels),
        "num_heads": int(adapter.num_heads),
        "head_dim": int(head_dim),
        "pre_norm": bool(adapter.pre_norm),
        "upcast_attention": bool(adapter.upcast_attention),
        "positional": str(adapter.positional),
        "block": str(adapter.block),
        "groups": int(adapter.groups),
        "layer_norm_eps": ADAPTER_LAYER_NORM_EPS,
        # Eq. 5's lambda: mean over the k neighbours of cos(pooled target, pooled neighbour).
        "lambda_mode": "mean",
    }


def save_adapter(adapter: HSpaceAdapter, params: Mapping[str, Any], channels: int, out_dir: str,
                 *, extra: Mapping[str, Any] | None = None) -> str:
    """Write ``config.json`` (``adapter_config`` + ``extra``) and ``adapter.safetensors`` (torch layout)."""
    config = {**adapter_config(adapter, channels), **dict(extra or {})}
    tensors = torch_state_dict(params)
    want = config["num_heads"] * config["head_dim"]
    first = "to_q.weight" if config["block"] == "attention" else "transformer.proj_in.weight"
    if tensors[first].shape != (want, channels):
        raise ValueError(f"adapter {first} has shape {tensors[first].shape}, config says "
                         f"({want}, {channels})")
    return _write(out_dir, config, tensors, ADAPTER_WEIGHTS)
