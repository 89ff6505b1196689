"""Load Stable Diffusion 2.x weights (diffusers folders or single-file checkpoints) into Flax.

Public API: ``load_unet``, ``load_vae``, ``load_text_encoder``,
``load_pipeline``. Each returns the Flax module and its parameter tree. Every ``path`` may also
be a Hugging Face hub id (``org/name[@revision]``): `hub.resolve` turns it into the local
snapshot folder first, fetching only the files the tower reads.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, Iterable, Iterator, Mapping

import jax
import jax.numpy as jnp
import numpy as np

from imagerag_jax.models.clip_text import CLIPTextTransformer, Tokenizer
from imagerag_jax.models.unet import UNet
from imagerag_jax.models.vae import AutoencoderKL
from imagerag_jax.weights import convert, hub, single_file
from imagerag_jax.weights.convert import WeightLoadError

# What each loader reads of a hub snapshot (the UNet's prediction type is in the scheduler config).
HUB_PARTS = {"unet": ("unet", "scheduler"), "vae": ("vae",), "text_encoder": ("text_encoder",)}
SINGLE_FILE_SUFFIXES = (".safetensors", ".ckpt", ".pt", ".pth", ".bin")
# Old diffusers VAE checkpoints name attention projections query/key/value/proj_attn.
VAE_RENAMES = (
    (r"\.attentions\.(\d+)\.query\.", r".attentions.\1.to_q."),
    (r"\.attentions\.(\d+)\.key\.", r".attentions.\1.to_k."),
    (r"\.attentions\.(\d+)\.value\.", r".attentions.\1.to_v."),
    (r"\.attentions\.(\d+)\.proj_attn\.", r".attentions.\1.to_out.0."),
)
TEXT_IGNORE = (r"position_ids$",)
# transformers' CLIPTextModel nests everything under ``text_model.``; our module is that level.
TEXT_RENAMES = ((r"^text_model\.", ""),)
# UNet config fields whose non-default values change the architecture in ways not ported.
UNET_UNSUPPORTED = {
    "class_embed_type": None,
    "addition_embed_type": None,
    "encoder_hid_dim": None,
    "time_cond_proj_dim": None,
    "num_class_embeds": None,
    "only_cross_attention": False,
    "dual_cross_attention": False,
    "center_input_sample": False,
    "resnet_time_scale_shift": "default",
    "time_embedding_type": "positional",
    "conv_in_kernel": 3,
    "conv_out_kernel": 3,
    "transformer_layers_per_block": 1,
    "mid_block_type": "UNetMidBlock2DCrossAttn",
    "act_fn": "silu",
    "downsample_padding": 1,
}


def _read_json(path: str) -> dict[str, Any]:
    """A JSON object from a config file; WeightLoadError naming the file if it is not one."""
    try:
        with open(path) as f:
            value = json.load(f)
    except (OSError, ValueError) as e:  # ValueError: JSONDecodeError and UnicodeDecodeError
        raise WeightLoadError(f"{path}: not a readable JSON config ({e})") from e
    if not isinstance(value, dict):
        raise WeightLoadError(f"{path}: expected a JSON object, got a {type(value).__name__}")
    return value


def _component_folder(path: str, subfolder: str) -> str:
    """A model folder (has config.json) given either itself or the pipeline folder above it."""
    if not os.path.exists(path):
        raise WeightLoadError(f"{path} does not exist")
    for candidate in (path, os.path.join(path, subfolder)):
        if os.path.isfile(os.path.join(candidate, "config.json")):
            return candidate
    raise WeightLoadError(
        f"{path} is not a {subfolder} model: expected {path}/config.json or "
        f"{path}/{subfolder}/config.json (a diffusers folder), or a single-file checkpoint "
        f"({', '.join(SINGLE_FILE_SUFFIXES)})"
    )


def _is_single_file(path: str) -> bool:
    return os.path.isfile(path) and path.endswith(SINGLE_FILE_SUFFIXES)


def unet_kwargs_from_config(cfg: Mapping[str, Any]) -> dict[str, Any]:
    """diffusers ``UNet2DConditionModel`` config -> ``UNet`` fields; rejects unported options."""
    bad = [
        f"{k}={cfg[k]!r}" for k, default in UNET_UNSUPPORTED.items()
        if k in cfg and cfg[k] != default and not (k == "transformer_layers_per_block" and
                                                   _all_equal(cfg[k], 1))
    ]
    if bad:
        raise WeightLoadError("UNet config uses options this port does not implement: " + ", ".join(bad))
    # diffusers quirk: SD 2.x stores the head *count* in attention_head_dim.
    heads = cfg.get("num_attention_heads") or cfg.get("attention_head_dim", 8)
    return dict(
        in_channels=cfg.get("in_channels", 4),
        out_channels=cfg.get("out_channels", 4),
        block_out_channels=tuple(cfg["block_out_channels"]),
        down_block_types=tuple(cfg["down_block_types"]),
        up_block_types=tuple(cfg["up_block_types"]),
        layers_per_block=cfg.get("layers_per_block", 2),
        num_attention_heads=heads if isinstance(heads, int) else tuple(heads),
        cross_attention_dim=cfg.get("cross_attention_dim", 1024),
        use_linear_projection=bool(cfg.get("use_linear_projection", False)),
        upcast_attention=bool(cfg.get("upcast_attention", False)),
        flip_sin_to_cos=bool(cfg.get("flip_sin_to_cos", True)),
        freq_shift=float(cfg.get("freq_shift", 0)),
        norm_num_groups=cfg.get("norm_num_groups", 32),
        norm_eps=cfg.get("norm_eps", 1e-5),
    )


def _all_equal(value: Any, target: int) -> bool:
    return all(v == target for v in value) if isinstance(value, (list, tuple)) else value == target


def _prediction_type(folder: str, default: str = "epsilon") -> str:
    """The scheduler's prediction type from a pipeline folder, if one sits beside the model."""
    for cand in (os.path.join(folder, "scheduler"), os.path.join(folder, "..", "scheduler")):
        cfg_path = os.path.join(cand, "scheduler_config.json")
        if os.path.isfile(cfg_path):
            return _read_json(cfg_path).get("prediction_type", default)
    return default


def unet_dummy_inputs(unet: UNet, batch: int = 1) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Smallest valid (sample, timesteps, context) for shaping a UNet's params."""
    size = 2 ** (len(unet.block_out_channels) - 1)
    return (
        jnp.zeros((batch, size, size, unet.in_channels)),
        jnp.zeros((batch,), jnp.int32),
        jnp.zeros((batch, 1, unet.cross_attention_dim)),
    )


def build_module(
    component: str,
    cfg: Mapping[str, Any],
    *,
    dtype: Any = jnp.float32,
    attention_impl: str = "auto",
    prediction_type: str = "epsilon",
) -> Any:
    """The Flax module for a diffusers/transformers config dict of 'unet', 'vae' or 'text_encoder'."""
    if component == "unet":
        return UNet(**unet_kwargs_from_config(cfg), prediction_type=prediction_type,
                    attention_impl=attention_impl, dtype=dtype)
    if component == "vae":
        return AutoencoderKL.from_config(cfg, dtype=dtype)
    if component == "text_encoder":
        return CLIPTextTransformer.from_config(cfg, dtype=dtype)
    raise ValueError(f"unknown component {component!r}")


def _build(component: str, cfg: Mapping[str, Any], where: str, **options: Any) -> Any:
    """``build_module``, with a config the port cannot build reported against its file."""
    name = where if os.path.isfile(where) else os.path.join(where, "config.json")
    try:
        return build_module(component, cfg, **options)
    except KeyError as e:
        raise WeightLoadError(f"{name}: the {component} config has no field {e}") from e
    except ValueError as e:  # the models' from_config checks
        raise WeightLoadError(f"{name}: {e}") from e


def params_from_tensors(
    component: str,
    module: Any,
    tensors: Iterable[tuple[str, np.ndarray]],
    param_dtype: Any = jnp.float32,
    *,
    source: str | None = None,
) -> dict[str, Any]:
    """Fill ``module``'s params from a stream of diffusers/transformers-named tensors.

    ``source`` (the folder or file the tensors come from) is named in a mismatch error.
    """
    if component == "unet":
        inputs = unet_dummy_inputs(module)
    else:
        inputs = module.dummy_inputs()
    shapes = convert.param_shapes(lambda: module.init(jax.random.PRNGKey(0), *inputs))
    rules, ignore = {"vae": (VAE_RENAMES, ()), "text_encoder": (TEXT_RENAMES, TEXT_IGNORE)}.get(
        component, ((), ())
    )
    return convert.torch_to_flax(
        convert.renamed(tensors, rules), shapes, ignore=ignore, dtype=param_dtype,
        component=f"{source} ({component})" if source else component,
    )


def _source(
    path: str, component: str, **infer_options: Any
) -> tuple[dict[str, Any], Iterator[tuple[str, np.ndarray]], str]:
    """(config, tensor stream, folder-or-file) for a component of a folder or single file.

    ``infer_options`` go to the single-file config inference (e.g. ``head_channels``).
    """
    if _is_single_file(path):
        infer = {
            "unet": single_file.infer_unet_config,
            "vae": single_file.infer_vae_config,
            "text_encoder": single_file.infer_text_config,
        }[component]
        cfg = dict(infer(path, **infer_options))
        return cfg, single_file.iter_component_tensors(path, component), path
    folder = _component_folder(path, component)
    cfg = _read_json(os.path.join(folder, "config.json"))
    return cfg, convert.iter_folder_tensors(folder), folder


def load_unet(
    path: str,
    *,
    dtype: Any = jnp.float32,
    param_dtype: Any = jnp.float32,
    attention_impl: str = "auto",
    prediction_type: str | None = None,
    upcast_attention: bool | None = None,
    head_channels: int = 64,
) -> tuple[UNet, dict[str, Any]]:
    """Load a UNet from a diffusers folder (pipeline or ``unet/``) or a single-file checkpoint.

    ``head_channels`` is used for single files only, whose weights do not record the attention
    head width (64 for every SD 2.x model).
    """
    path = hub.local_path(path, HUB_PARTS["unet"])
    single = _is_single_file(path)
    cfg, tensors, where = _source(path, "unet", **({"head_channels": head_channels} if single else {}))
    if upcast_attention is not None:
        cfg["upcast_attention"] = upcast_attention
    if prediction_type is None:
        prediction_type = single_file.infer_prediction_type(where) if single else _prediction_type(where)
    unet = _build("unet", cfg, where, dtype=dtype, attention_impl=attention_impl,
                  prediction_type=prediction_type)
    return unet, params_from_tensors("unet", unet, tensors, param_dtype, source=where)


def load_vae(
    path: str, *, dtype: Any = jnp.float32, param_dtype: Any = jnp.float32
) -> tuple[AutoencoderKL, dict[str, Any]]:
    """Load an AutoencoderKL from a diffusers folder (pipeline or ``vae/``) or a single file."""
    cfg, tensors, where = _source(hub.local_path(path, HUB_PARTS["vae"]), "vae")
    vae = _build("vae", cfg, where, dtype=dtype)
    return vae, params_from_tensors("vae", vae, tensors, param_dtype, source=where)


def load_text_encoder(
    path: str, *, dtype: Any = jnp.float32, param_dtype: Any = jnp.float32
) -> tuple[CLIPTextTransformer, dict[str, Any]]:
    """Load a CLIP text encoder from a transformers folder (or ``text_encoder/``) or a single file."""
    cfg, tensors, where = _source(hub.local_path(path, HUB_PARTS["text_encoder"]), "text_encoder")
    text = _build("text_encoder", cfg, where, dtype=dtype)
    return text, params_from_tensors("text_encoder", text, tensors, param_dtype, source=where)


@dataclasses.dataclass
class SDTowers:
    """The three SD towers, their params, the tokenizer and the prediction type."""

    unet: UNet
    unet_params: dict[str, Any]
    vae: AutoencoderKL
    vae_params: dict[str, Any]
    text_encoder: CLIPTextTransformer
    text_params: dict[str, Any]
    tokenizer: Tokenizer | None
    prediction_type: str
    source: str  # the absolute path, or org/name@<commit> for hub weights (`hub.label`)


def _tokenizer(folder: str) -> Tokenizer:
    """The CLIP tokenizer of a folder (or hub id); WeightLoadError naming it if it holds none.

    A pipeline folder (a hub snapshot of one, say) stands for its ``tokenizer/``.
    """
    folder = hub.tokenizer_dir(folder)
    try:
        return Tokenizer.from_pretrained(folder)
    except (OSError, ValueError) as e:  # missing files; or transformers failing on damaged ones
        message = str(e)
        raise WeightLoadError(message if folder in message else f"{folder}: {message}") from e


def load_pipeline(
    path: str,
    *,
    dtype: Any = jnp.float32,
    param_dtype: Any = jnp.float32,
    attention_impl: str = "auto",
    tokenizer_path: str | None = None,
    prediction_type: str | None = None,
    head_channels: int = 64,
) -> SDTowers:
    """Load every tower of a diffusers pipeline folder or a single-file SD checkpoint.

    A single file carries no tokenizer: pass ``tokenizer_path`` (a folder with the CLIP
    tokenizer files), or the pipeline's tokenizer is ``None``. ``path`` and ``tokenizer_path``
    may be hub ids (``org/name[@revision]``), resolved once here.
    """
    path = hub.local_path(path, hub.PIPELINE)
    if not os.path.exists(path):
        raise WeightLoadError(f"{path} does not exist")
    if not _is_single_file(path) and not os.path.isfile(os.path.join(path, "model_index.json")):
        raise WeightLoadError(
            f"{path} is not a Stable Diffusion pipeline: expected a diffusers folder with "
            f"model_index.json (unet/, vae/, text_encoder/, tokenizer/) or a single-file checkpoint "
            f"({', '.join(SINGLE_FILE_SUFFIXES)})"
        )
    # detect_components, not is_single_file_checkpoint: a damaged file's own error says what is wrong.
    if _is_single_file(path) and not single_file.detect_components(path):
        raise WeightLoadError(f"{path} is not a Stable Diffusion single-file checkpoint")
    unet, unet_params = load_unet(path, dtype=dtype, param_dtype=param_dtype,
                                  attention_impl=attention_impl, prediction_type=prediction_type,
                                  head_channels=head_channels)
    vae, vae_params = load_vae(path, dtype=dtype, param_dtype=param_dtype)
    text, text_params = load_text_encoder(path, dtype=dtype, param_dtype=param_dtype)
    tok_dir = tokenizer_path or (None if _is_single_file(path) else os.path.join(path, "tokenizer"))
    tokenizer = _tokenizer(tok_dir) if tok_dir and (tokenizer_path or os.path.isdir(tok_dir)) else None
    return SDTowers(unet, unet_params, vae, vae_params, text, text_params, tokenizer,
                    unet.prediction_type, hub.label(path))
