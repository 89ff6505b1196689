"""Read single-file original Stable Diffusion checkpoints into diffusers/transformers key layout.

A single file (``.safetensors`` or a torch pickle ``.ckpt``) in the CompVis LDM / Stability SD 2.x
layout holds three towers under fixed prefixes:

- ``model.diffusion_model.*``  -> diffusers ``UNet2DConditionModel`` state_dict names
- ``first_stage_model.*``      -> diffusers ``AutoencoderKL`` state_dict names
- ``cond_stage_model.model.*`` (or ``conditioner.embedders.0.model.*``, the sgm layout of SD-Turbo)
  OpenCLIP text tower -> transformers ``CLIPTextModel`` names (``text_model.*``, the on-disk
  layout of ``text_encoder/model.safetensors`` in diffusers SD 2.x repos)

Everything is lazy: we first read names and shapes, build a *plan* ``{new_key: PlanEntry(sources,
transform)}`` and then materialise one float32 numpy array at a time, so peak host memory is about
one tensor (plus the fused q/k/v source while its three slices are produced).

Conventions copied from diffusers' single-file loader (``diffusers.loaders.single_file_utils``):

- SD 2.x uses the penultimate OpenCLIP layer: the last resblock is dropped (23 of 24 layers) and
  ``ln_final`` is still applied; ``text_projection``/``logit_scale`` have no CLIPTextModel slot.
- SD 2.x UNets (linear ``proj_in``) use 64-channel heads and diffusers stores the per-block *head
  count* in ``attention_head_dim`` ([5, 10, 20, 20] for SD 2.x); SD 1.x UNets (conv ``proj_in``)
  use 8 heads everywhere.
- Only the non-EMA UNet (``model.diffusion_model.*``) is read; ``model_ema.*`` copies are ignored,
  as in diffusers' default (``extract_ema=False``); released ``*-ema-pruned`` files already
  store the EMA weights there.
- Prediction type and ``upcast_attention`` are not visible in the weights; see
  ``infer_prediction_type`` and the ``upcast_attention`` argument of ``infer_unet_config``.

Of the project it imports only the weight-file readers (``weights/safetensors_io.py`` and
``convert.load_torch_pickle``) and ``WeightLoadError``, which every problem with the file's bytes
or keys raises (naming the file); torch is imported only for ``.ckpt`` files and bfloat16
safetensors. It is one job (the LDM -> diffusers key mapping for three towers) and stays one file
of about 800 lines.
"""

from __future__ import annotations

import contextlib
import os
import re
from typing import Any, Callable, Iterable, Iterator, Mapping, NamedTuple, Sequence, Union

import numpy as np

from imagerag_jax.weights.convert import WeightLoadError, load_torch_pickle

COMPONENTS = ("unet", "vae", "text_encoder")
UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
TEXT_PREFIXES = ("cond_stage_model.model.", "conditioner.embedders.0.model.")
# One key per component that only the original LDM layout has; used to detect the component.
UNET_ANCHOR = "input_blocks.0.0.weight"
VAE_ANCHOR = "encoder.conv_in.weight"
TEXT_ANCHOR = "token_embedding.weight"
MAX_LISTED_KEYS = 20

Shapes = Mapping[str, tuple[int, ...]]
Source = Union[str, "os.PathLike[str]", Mapping[str, Sequence[int]]]
Transform = Callable[[np.ndarray], np.ndarray]


class PlanEntry(NamedTuple):
    """How to make one output tensor: which source keys to read and what to apply."""

    sources: tuple[str, ...]
    transform: Transform


# ----------------------------------------------------------------------------------------------
# Reading files lazily
# ----------------------------------------------------------------------------------------------


def _sniff_format(path: str) -> str:
    """'safetensors' or 'torch' from the first bytes, so the extension does not matter."""
    from imagerag_jax.weights.safetensors_io import AGAIN, open_weight_file

    with open_weight_file(path) as f:
        head = f.read(9)
    if not head:
        raise WeightLoadError(f"{path}: empty (0 bytes); {AGAIN}")
    if head[:4] == b"PK\x03\x04":  # torch.save zip container
        return "torch"
    if head[8:9] == b"{" or path.endswith(".safetensors"):
        # 8-byte header length, then JSON; the reader says what is wrong with a damaged one.
        return "safetensors"
    if head[:1] == b"\x80":  # legacy (non-zip) pickle protocol byte
        return "torch"
    raise WeightLoadError(f"{path}: not a checkpoint: expected a .safetensors file or a torch.save "
                          f"pickle, but it starts with {head[:8]!r}")


class _Reader:
    """Uniform lazy access (names, shapes, one tensor at a time) to a safetensors or torch file."""

    def __init__(self, path: str) -> None:
        self.path = os.fspath(path)
        self._stack = contextlib.ExitStack()
        self._tensors: Mapping[str, Any] | None = None
        self.metadata: dict[str, Any] = {}
        self.format = _sniff_format(self.path)
        try:
            if self.format == "safetensors":
                self._open_safetensors()
            else:
                self._open_torch()
        except WeightLoadError:
            self.close()
            raise
        except Exception as e:  # any parse failure becomes one clear error naming the file
            self.close()
            raise WeightLoadError(f"{self.path}: cannot read as a {self.format} checkpoint: {e}") from e

    def _open_safetensors(self) -> None:
        # Our own reader: safe_open's mmap would leave every touched page resident.
        from imagerag_jax.weights.safetensors_io import SafetensorsFile

        self._st = self._stack.enter_context(SafetensorsFile(self.path))
        self.shapes = {k: self._st.shape(k) for k in self._st.keys()}
        self.metadata = dict(self._st.metadata)

    def _open_torch(self) -> None:
        obj = load_torch_pickle(self.path)  # first: it explains a missing torch, naming the file
        import torch

        if not isinstance(obj, Mapping):
            raise WeightLoadError(f"{self.path}: expected a dict of tensors, got {type(obj).__name__}")
        # Lightning-style checkpoints nest the weights; top-level extras (global_step...) are metadata.
        state = obj["state_dict"] if isinstance(obj.get("state_dict"), Mapping) else obj
        self.metadata = {k: v for k, v in obj.items() if isinstance(v, (int, float, str))}
        self._tensors = {k: v for k, v in state.items() if isinstance(v, torch.Tensor)}
        self.shapes = {k: tuple(v.shape) for k, v in self._tensors.items()}

    def get(self, key: str) -> np.ndarray:
        """One tensor as a float32 array that owns its memory (no view into the file)."""
        if self._tensors is not None:
            import torch

            return self._tensors[key].to(torch.float32, copy=True).numpy()
        return self._st.get(key, np.float32)

    def close(self) -> None:
        """Release file handles and mappings."""
        self._stack.close()
        self._tensors = None

    def __enter__(self) -> "_Reader":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def read_keys_and_shapes(path: str | os.PathLike[str]) -> dict[str, tuple[int, ...]]:
    """Every tensor name in the file with its shape, without reading tensor data."""
    with _Reader(os.fspath(path)) as reader:
        return dict(reader.shapes)


def _as_shapes(source: Source) -> tuple[dict[str, tuple[int, ...]], str]:
    """(shapes, name for messages) from a path or an already-read key -> shape mapping."""
    if isinstance(source, Mapping):
        return {k: tuple(v) for k, v in source.items()}, "<keys_and_shapes>"
    return read_keys_and_shapes(source), os.fspath(source)


# ----------------------------------------------------------------------------------------------
# Errors
# ----------------------------------------------------------------------------------------------


def _listing(keys: Iterable[str]) -> str:
    """'N key(s): [first 20 ...]' for error messages."""
    keys = sorted(keys)
    shown = keys[:MAX_LISTED_KEYS]
    more = f" (first {MAX_LISTED_KEYS} shown)" if len(keys) > MAX_LISTED_KEYS else ""
    return f"{len(keys)} key(s){more}: {shown}"


def _key_error(name: str, message: str, keys: Iterable[str]) -> WeightLoadError:
    """One error naming the file, what was expected and the offending keys."""
    return WeightLoadError(f"{name}: {message}; {_listing(keys)}")


# ----------------------------------------------------------------------------------------------
# Component detection
# ----------------------------------------------------------------------------------------------


def _text_prefix(shapes: Shapes) -> str | None:
    """Which OpenCLIP prefix the file uses, if any."""
    for prefix in TEXT_PREFIXES:
        if prefix + TEXT_ANCHOR in shapes:
            return prefix
    return None


def _component_prefix(shapes: Shapes, component: str) -> str | None:
    """The key prefix of a component if its anchor key is present."""
    if component == "unet":
        return UNET_PREFIX if UNET_PREFIX + UNET_ANCHOR in shapes else None
    if component == "vae":
        return VAE_PREFIX if VAE_PREFIX + VAE_ANCHOR in shapes else None
    if component == "text_encoder":
        return _text_prefix(shapes)
    raise ValueError(f"unknown component {component!r}: expected one of {COMPONENTS}")


def detect_components(path: Source) -> set[str]:
    """Which of 'unet', 'vae', 'text_encoder' the checkpoint holds in the original layout."""
    shapes, _ = _as_shapes(path)
    return {c for c in COMPONENTS if _component_prefix(shapes, c) is not None}


def is_single_file_checkpoint(path: str | os.PathLike[str]) -> bool:
    """True for a readable file holding at least one SD component in the original layout."""
    try:
        return os.path.isfile(path) and bool(detect_components(path))
    except (ValueError, OSError):
        return False


def _expected_anchors() -> str:
    """Human-readable list of the keys that identify each component."""
    text = " or ".join(repr(p + TEXT_ANCHOR) for p in TEXT_PREFIXES)
    return f"{UNET_PREFIX + UNET_ANCHOR!r} (unet), {VAE_PREFIX + VAE_ANCHOR!r} (vae), {text} (text_encoder)"


def _component_view(shapes: Shapes, component: str, name: str) -> tuple[str, dict[str, tuple[int, ...]]]:
    """(prefix, shapes with the prefix stripped) or a clear error if the component is absent."""
    if component not in COMPONENTS:
        raise ValueError(f"unknown component {component!r}: expected one of {COMPONENTS}")
    prefix = _component_prefix(shapes, component)
    if prefix is None:
        found = {c for c in COMPONENTS if _component_prefix(shapes, c) is not None}
        if not found:
            raise _key_error(
                name,
                "not a single-file Stable Diffusion checkpoint in the original CompVis/Stability "
                f"layout: expected at least one of {_expected_anchors()}; the file has",
                shapes,
            )
        raise _key_error(
            name,
            f"no {component} in this checkpoint (it has {sorted(found)}): expected "
            f"{_expected_anchors()}; the file has",
            shapes,
        )
    return prefix, {k[len(prefix):]: v for k, v in shapes.items() if k.startswith(prefix)}


def _require(view: Shapes, keys: Sequence[str], prefix: str, component: str, name: str) -> None:
    """Fail clearly (not with KeyError) when keys needed for inference are missing."""
    missing = [prefix + k for k in keys if k not in view]
    if missing:
        raise _key_error(name, f"incomplete {component}: missing expected", missing)


def _indices(view: Shapes, pattern: str) -> list[int]:
    """Sorted distinct integers captured by group 1 of ``pattern`` across the keys."""
    rx = re.compile(pattern)
    return sorted({int(m.group(1)) for k in view if (m := rx.match(k))})


# ----------------------------------------------------------------------------------------------
# UNet
# ----------------------------------------------------------------------------------------------

_UNET_TOP = {
    "time_embed.0.weight": "time_embedding.linear_1.weight",
    "time_embed.0.bias": "time_embedding.linear_1.bias",
    "time_embed.2.weight": "time_embedding.linear_2.weight",
    "time_embed.2.bias": "time_embedding.linear_2.bias",
    "input_blocks.0.0.weight": "conv_in.weight",
    "input_blocks.0.0.bias": "conv_in.bias",
    "out.0.weight": "conv_norm_out.weight",
    "out.0.bias": "conv_norm_out.bias",
    "out.2.weight": "conv_out.weight",
    "out.2.bias": "conv_out.bias",
}
_UNET_RESNET = {
    "in_layers.0": "norm1",
    "in_layers.2": "conv1",
    "emb_layers.1": "time_emb_proj",
    "out_layers.0": "norm2",
    "out_layers.3": "conv2",
    "skip_connection": "conv_shortcut",
}
_UNET_RESNET_RE = re.compile(
    r"^(in_layers\.[02]|emb_layers\.1|out_layers\.[03]|skip_connection)\.(weight|bias)$"
)
# Transformer2DModel names are the same in LDM and diffusers; we only check the name is one we know.
_UNET_ATTN_RE = re.compile(
    r"^(norm|proj_in|proj_out)\.(weight|bias)$"
    r"|^transformer_blocks\.\d+\.("
    r"attn[12]\.to_[qkv]\.weight|attn[12]\.to_out\.0\.(weight|bias)"
    r"|norm[123]\.(weight|bias)|ff\.net\.0\.proj\.(weight|bias)|ff\.net\.2\.(weight|bias))$"
)
_INPUT_RE = re.compile(r"^input_blocks\.(\d+)\.(\d+)\.(.+)$")
_MIDDLE_RE = re.compile(r"^middle_block\.(\d+)\.(.+)$")
_OUTPUT_RE = re.compile(r"^output_blocks\.(\d+)\.(\d+)\.(.+)$")
_MIDDLE_NAMES = {0: "mid_block.resnets.0.", 1: "mid_block.attentions.0.", 2: "mid_block.resnets.1."}


def _unet_resnet(rest: str) -> str | None:
    """LDM ResBlock parameter name -> diffusers ResnetBlock2D name."""
    m = _UNET_RESNET_RE.match(rest)
    return f"{_UNET_RESNET[m.group(1)]}.{m.group(2)}" if m else None


def _unet_attn(rest: str) -> str | None:
    """SpatialTransformer parameter name (unchanged in diffusers) if it is a known one."""
    return rest if _UNET_ATTN_RE.match(rest) else None


def _join(prefix: str, rest: str | None) -> str | None:
    return None if rest is None else prefix + rest


def _unet_input_key(i: int, sub: int, rest: str, lpb: int) -> str | None:
    """input_blocks.i.sub.rest -> down_blocks.*; level and layer follow from layers_per_block."""
    if i == 0:
        return None  # conv_in is in _UNET_TOP; anything else under input_blocks.0 is unknown
    block, layer = divmod(i - 1, lpb + 1)
    if sub == 0 and rest in ("op.weight", "op.bias"):
        return f"down_blocks.{block}.downsamplers.0.conv.{rest[3:]}"
    if sub == 0:
        return _join(f"down_blocks.{block}.resnets.{layer}.", _unet_resnet(rest))
    if sub == 1:
        return _join(f"down_blocks.{block}.attentions.{layer}.", _unet_attn(rest))
    return None


def _unet_output_key(i: int, sub: int, rest: str, lpb: int) -> str | None:
    """output_blocks.i.sub.rest -> up_blocks.*; the upsampler sits after the attention if any."""
    block, layer = divmod(i, lpb + 1)
    if sub in (1, 2) and rest in ("conv.weight", "conv.bias"):
        return f"up_blocks.{block}.upsamplers.0.{rest}"
    if sub == 0:
        return _join(f"up_blocks.{block}.resnets.{layer}.", _unet_resnet(rest))
    if sub == 1:
        return _join(f"up_blocks.{block}.attentions.{layer}.", _unet_attn(rest))
    return None


def _unet_key(key: str, lpb: int) -> str | None:
    """Original UNet key (prefix stripped) -> diffusers key, or None if not recognised."""
    if key in _UNET_TOP:
        return _UNET_TOP[key]
    if m := _INPUT_RE.match(key):
        return _unet_input_key(int(m.group(1)), int(m.group(2)), m.group(3), lpb)
    if m := _MIDDLE_RE.match(key):
        sub, rest = int(m.group(1)), m.group(2)
        if sub not in _MIDDLE_NAMES:
            return None
        mapped = _unet_attn(rest) if sub == 1 else _unet_resnet(rest)
        return _join(_MIDDLE_NAMES[sub], mapped)
    if m := _OUTPUT_RE.match(key):
        return _unet_output_key(int(m.group(1)), int(m.group(2)), m.group(3), lpb)
    return None


class _UNetLayout(NamedTuple):
    levels: int
    layers_per_block: int


def _unet_layout(view: Shapes, name: str) -> _UNetLayout:
    """Number of resolution levels and layers_per_block from the input_blocks numbering."""
    _require(view, [UNET_ANCHOR, "out.2.weight", "time_embed.0.weight"], UNET_PREFIX, "unet", name)
    inputs = _indices(view, r"^input_blocks\.(\d+)\.")
    downsamplers = [i for i in inputs if f"input_blocks.{i}.0.op.weight" in view]
    levels = len(downsamplers) + 1
    # input_blocks = conv_in + levels * layers_per_block resnets + (levels - 1) downsamplers
    lpb, rest = divmod(len(inputs) - levels, levels)
    expected_down = [(b + 1) * (lpb + 1) for b in range(levels - 1)]
    n_outputs = len(_indices(view, r"^output_blocks\.(\d+)\."))
    if rest or lpb < 1 or downsamplers != expected_down or n_outputs != levels * (lpb + 1):
        raise _key_error(
            name,
            "unsupported UNet layout: input_blocks/output_blocks numbering does not match an SD "
            f"UNet ({len(inputs)} input blocks, {n_outputs} output blocks, downsamplers at "
            f"{downsamplers}); downsampler keys are",
            [UNET_PREFIX + f"input_blocks.{i}.0.op.weight" for i in downsamplers],
        )
    return _UNetLayout(levels, lpb)


def _unet_plan(view: Shapes, prefix: str, name: str) -> dict[str, PlanEntry]:
    """Plan for the UNet: a pure renaming (LDM and diffusers tensors have the same shapes)."""
    lpb = _unet_layout(view, name).layers_per_block
    return _rename_plan(view, prefix, name, "unet", lambda k: _unet_key(k, lpb))


def infer_unet_config(
    keys_and_shapes: Source,
    *,
    sample_size: int = 64,
    upcast_attention: bool = False,
    head_channels: int = 64,
    num_heads: int | None = None,
) -> dict[str, Any]:
    """diffusers ``UNet2DConditionModel`` config fields inferred from the tensor shapes.

    Not visible in the weights, so arguments with documented defaults:
    ``sample_size`` latent size (64: SD 2.x-base / SD-Turbo at 512 px; pass 96 for 768 px models);
    ``upcast_attention`` (False; diffusers' SD 2.1-768 v-model config sets it True, which only
    changes low-precision numerics); attention heads: with linear ``proj_in`` (SD 2.x) every
    block gets ``channels // head_channels`` heads, stored in ``attention_head_dim`` as
    diffusers does ([5, 10, 20, 20] for SD 2.x); with conv ``proj_in`` (SD 1.x) 8 heads. An
    explicit ``num_heads`` overrides both.
    """
    shapes, name = _as_shapes(keys_and_shapes)
    _, view = _component_view(shapes, "unet", name)
    levels, lpb = _unet_layout(view, name)
    _require(view, ["middle_block.1.proj_in.weight"], UNET_PREFIX, "unet", name)
    first = [1 + b * (lpb + 1) for b in range(levels)]  # first input block of each level
    _require(view, [f"input_blocks.{i}.0.out_layers.3.weight" for i in first], UNET_PREFIX, "unet", name)
    channels = [int(view[f"input_blocks.{i}.0.out_layers.3.weight"][0]) for i in first]
    down_attn = [f"input_blocks.{i}.1.proj_in.weight" in view for i in first]
    up_attn = [f"output_blocks.{u * (lpb + 1)}.1.proj_in.weight" in view for u in range(levels)]
    linear = len(view["middle_block.1.proj_in.weight"]) == 2
    return {
        "sample_size": sample_size,
        "in_channels": int(view[UNET_ANCHOR][1]),
        "out_channels": int(view["out.2.weight"][0]),
        "down_block_types": ["CrossAttnDownBlock2D" if a else "DownBlock2D" for a in down_attn],
        "up_block_types": ["CrossAttnUpBlock2D" if a else "UpBlock2D" for a in up_attn],
        "block_out_channels": channels,
        "layers_per_block": lpb,
        "cross_attention_dim": _cross_attention_dim(view, name),
        "attention_head_dim": _unet_heads(channels, linear, head_channels, num_heads, name),
        "use_linear_projection": linear,
        "transformer_layers_per_block": _transformer_depth(view, first, down_attn),
        "upcast_attention": upcast_attention,
        "mid_block_type": "UNetMidBlock2DCrossAttn",
        "class_embed_type": None,
        "addition_embed_type": None,
        "addition_time_embed_dim": None,
        "projection_class_embeddings_input_dim": None,
    }


def _cross_attention_dim(view: Shapes, name: str) -> int:
    """Width of the text context, read from any cross-attention key projection."""
    for key, shape in view.items():
        if key.endswith(".attn2.to_k.weight"):
            return int(shape[1])
    raise _key_error(name, "unet has no cross-attention (no '*.attn2.to_k.weight'); its keys are", view)


def _unet_heads(
    channels: list[int], linear: bool, head_channels: int, num_heads: int | None, name: str
) -> int | list[int]:
    """diffusers' ``attention_head_dim`` (really a head count) for SD 2.x / SD 1.x conventions."""
    if num_heads is not None:
        return num_heads
    if not linear:
        return 8  # SD 1.x: num_heads=8 in the original config
    if any(c % head_channels for c in channels):
        raise WeightLoadError(
            f"{name}: block channels {channels} are not multiples of head_channels={head_channels}"
        )
    return [c // head_channels for c in channels]


def _transformer_depth(view: Shapes, first: list[int], has_attn: list[bool]) -> int | list[int]:
    """transformer_blocks per attention (1 for SD); a list only when levels differ."""
    depths = [
        len(_indices(view, rf"^input_blocks\.{i}\.1\.transformer_blocks\.(\d+)\.")) if a else 1
        for i, a in zip(first, has_attn)
    ]
    return depths[0] if len(set(depths)) == 1 else depths


# ----------------------------------------------------------------------------------------------
# VAE
# ----------------------------------------------------------------------------------------------

_VAE_TOP = {
    f"{part}.{src}.{p}": f"{part}.{dst}.{p}"
    for part in ("encoder", "decoder")
    for src, dst in (("conv_in", "conv_in"), ("conv_out", "conv_out"), ("norm_out", "conv_norm_out"))
    for p in ("weight", "bias")
}
_VAE_TOP.update(
    {f"{c}.{p}": f"{c}.{p}" for c in ("quant_conv", "post_quant_conv") for p in ("weight", "bias")}
)
_VAE_RESNET_RE = re.compile(r"^(norm1|conv1|norm2|conv2|nin_shortcut)\.(weight|bias)$")
_VAE_ATTN = {"norm": "group_norm", "q": "to_q", "k": "to_k", "v": "to_v", "proj_out": "to_out.0"}
_VAE_ATTN_RE = re.compile(r"^(encoder|decoder)\.mid\.attn_1\.(norm|q|k|v|proj_out)\.(weight|bias)$")
_VAE_DOWN_RE = re.compile(r"^encoder\.down\.(\d+)\.block\.(\d+)\.(.+)$")
_VAE_DOWNSAMPLE_RE = re.compile(r"^encoder\.down\.(\d+)\.downsample\.conv\.(weight|bias)$")
_VAE_UP_RE = re.compile(r"^decoder\.up\.(\d+)\.block\.(\d+)\.(.+)$")
_VAE_UPSAMPLE_RE = re.compile(r"^decoder\.up\.(\d+)\.upsample\.conv\.(weight|bias)$")
_VAE_MID_RE = re.compile(r"^(encoder|decoder)\.mid\.block_([12])\.(.+)$")


def _vae_resnet(rest: str) -> str | None:
    """LDM VAE ResnetBlock name -> diffusers name (only nin_shortcut is renamed)."""
    m = _VAE_RESNET_RE.match(rest)
    return None if m is None else rest.replace("nin_shortcut", "conv_shortcut")


def _vae_key(key: str, n_up: int) -> str | None:
    """Original VAE key (prefix stripped) -> diffusers key; decoder levels are numbered reversed."""
    if key in _VAE_TOP:
        return _VAE_TOP[key]
    if m := _VAE_DOWN_RE.match(key):
        return _join(f"encoder.down_blocks.{m.group(1)}.resnets.{m.group(2)}.", _vae_resnet(m.group(3)))
    if m := _VAE_DOWNSAMPLE_RE.match(key):
        return f"encoder.down_blocks.{m.group(1)}.downsamplers.0.conv.{m.group(2)}"
    if m := _VAE_UP_RE.match(key):
        block = n_up - 1 - int(m.group(1))
        return _join(f"decoder.up_blocks.{block}.resnets.{m.group(2)}.", _vae_resnet(m.group(3)))
    if m := _VAE_UPSAMPLE_RE.match(key):
        return f"decoder.up_blocks.{n_up - 1 - int(m.group(1))}.upsamplers.0.conv.{m.group(2)}"
    if m := _VAE_MID_RE.match(key):
        return _join(f"{m.group(1)}.mid_block.resnets.{int(m.group(2)) - 1}.", _vae_resnet(m.group(3)))
    if m := _VAE_ATTN_RE.match(key):
        return f"{m.group(1)}.mid_block.attentions.0.{_VAE_ATTN[m.group(2)]}.{m.group(3)}"
    return None


def _squeeze_conv(x: np.ndarray) -> np.ndarray:
    """1x1 conv kernel [out, in, 1, 1] (or [out, in, 1]) -> linear weight [out, in]."""
    return x[(slice(None), slice(None)) + (0,) * (x.ndim - 2)]


def _vae_plan(view: Shapes, prefix: str, name: str) -> dict[str, PlanEntry]:
    """Plan for the VAE: renaming, plus mid-attention 1x1 convs become linear weights."""
    n_up = len(_indices(view, r"^decoder\.up\.(\d+)\."))
    plan = _rename_plan(view, prefix, name, "vae", lambda k: _vae_key(k, n_up))
    for new_key, entry in plan.items():
        old = entry.sources[0][len(prefix):]
        if _VAE_ATTN_RE.match(old) and len(view[old]) > 2:
            plan[new_key] = PlanEntry(entry.sources, _squeeze_conv)
    return plan


def infer_vae_config(
    keys_and_shapes: Source, *, sample_size: int = 512, scaling_factor: float = 0.18215
) -> dict[str, Any]:
    """diffusers ``AutoencoderKL`` config fields inferred from the tensor shapes.

    ``sample_size`` (pixels) and ``scaling_factor`` (SD 2.x: 0.18215) are not in the weights.
    """
    shapes, name = _as_shapes(keys_and_shapes)
    _, view = _component_view(shapes, "vae", name)
    needed = [VAE_ANCHOR, "decoder.conv_in.weight", "decoder.conv_out.weight",
              "encoder.down.0.block.0.conv2.weight"]
    _require(view, needed, VAE_PREFIX, "vae", name)
    levels = _indices(view, r"^encoder\.down\.(\d+)\.")
    _require(view, [f"encoder.down.{i}.block.0.conv2.weight" for i in levels], VAE_PREFIX, "vae", name)
    channels = [int(view[f"encoder.down.{i}.block.0.conv2.weight"][0]) for i in levels]
    return {
        "sample_size": sample_size,
        "in_channels": int(view[VAE_ANCHOR][1]),
        "out_channels": int(view["decoder.conv_out.weight"][0]),
        "down_block_types": ["DownEncoderBlock2D"] * len(channels),
        "up_block_types": ["UpDecoderBlock2D"] * len(channels),
        "block_out_channels": channels,
        "latent_channels": int(view["decoder.conv_in.weight"][1]),
        "layers_per_block": len(_indices(view, r"^encoder\.down\.0\.block\.(\d+)\.")),
        "scaling_factor": scaling_factor,
        "use_quant_conv": "quant_conv.weight" in view,
        "use_post_quant_conv": "post_quant_conv.weight" in view,
        "mid_block_add_attention": "encoder.mid.attn_1.q.weight" in view,
    }


# ----------------------------------------------------------------------------------------------
# OpenCLIP text encoder
# ----------------------------------------------------------------------------------------------

_TEXT_TOP = {
    "token_embedding.weight": "text_model.embeddings.token_embedding.weight",
    "positional_embedding": "text_model.embeddings.position_embedding.weight",
    "ln_final.weight": "text_model.final_layer_norm.weight",
    "ln_final.bias": "text_model.final_layer_norm.bias",
}
# Present in OpenCLIP but with no CLIPTextModel slot (attn_mask is a buffer some exports keep).
_TEXT_DROPPED = ("text_projection", "logit_scale", "attn_mask")
_TEXT_BLOCK = {
    "ln_1": "layer_norm1",
    "ln_2": "layer_norm2",
    "mlp.c_fc": "mlp.fc1",
    "mlp.c_proj": "mlp.fc2",
    "attn.out_proj": "self_attn.out_proj",
}
_TEXT_BLOCK_RE = re.compile(
    r"^transformer\.resblocks\.(\d+)\.(ln_1|ln_2|mlp\.c_fc|mlp\.c_proj|attn\.out_proj)\.(weight|bias)$"
)
_TEXT_INPROJ_RE = re.compile(r"^transformer\.resblocks\.(\d+)\.attn\.in_proj_(weight|bias)$")
_TEXT_BLOCK_ANY_RE = re.compile(r"^transformer\.resblocks\.(\d+)\.")


def _qkv_slice(index: int) -> Transform:
    """Transform taking the q (0), k (1) or v (2) third of a fused in_proj tensor (as a copy)."""

    def take(x: np.ndarray) -> np.ndarray:
        width = x.shape[0] // 3
        return x[index * width:(index + 1) * width].copy()  # copy: don't pin the fused tensor

    return take


def _identity(x: np.ndarray) -> np.ndarray:
    return x


def _text_plan(view: Shapes, prefix: str, name: str, drop_last_layer: bool) -> dict[str, PlanEntry]:
    """Plan for the text tower: renames, q/k/v split, and SD 2.x's unused last layer dropped."""
    n_blocks = len(_indices(view, r"^transformer\.resblocks\.(\d+)\."))
    dropped_layer = n_blocks - 1 if drop_last_layer else None
    plan: dict[str, PlanEntry] = {}
    unknown: list[str] = []
    for key in view:
        block = _TEXT_BLOCK_ANY_RE.match(key)
        if key in _TEXT_DROPPED or (block and int(block.group(1)) == dropped_layer):
            continue
        if key in _TEXT_TOP:
            plan[_TEXT_TOP[key]] = PlanEntry((prefix + key,), _identity)
        elif m := _TEXT_BLOCK_RE.match(key):
            new = f"text_model.encoder.layers.{m.group(1)}.{_TEXT_BLOCK[m.group(2)]}.{m.group(3)}"
            plan[new] = PlanEntry((prefix + key,), _identity)
        elif m := _TEXT_INPROJ_RE.match(key):
            for index, proj in enumerate(("q_proj", "k_proj", "v_proj")):
                new = f"text_model.encoder.layers.{m.group(1)}.self_attn.{proj}.{m.group(2)}"
                plan[new] = PlanEntry((prefix + key,), _qkv_slice(index))
        else:
            unknown.append(prefix + key)
    if unknown:
        message = f"text_encoder keys under {prefix!r} with no CLIPTextModel equivalent"
        raise _key_error(name, message, unknown)
    return plan


def infer_text_config(
    keys_and_shapes: Source, *, head_channels: int = 64, drop_last_layer: bool = True
) -> dict[str, Any]:
    """transformers ``CLIPTextConfig`` fields for the OpenCLIP text tower (SD 2.x conventions).

    ``num_hidden_layers`` is the resblock count minus one (SD 2.x uses the penultimate layer);
    heads are ``hidden // head_channels`` (OpenCLIP ViT-H: 64-channel heads). Token ids copy
    diffusers' SD 2.x ``text_encoder/config.json`` (eos_token_id=2 selects transformers' legacy
    pooling at the highest token id, i.e. the EOS token).
    """
    shapes, name = _as_shapes(keys_and_shapes)
    prefix, view = _component_view(shapes, "text_encoder", name)
    needed = [TEXT_ANCHOR, "positional_embedding", "ln_final.weight",
              "transformer.resblocks.0.mlp.c_fc.weight"]
    _require(view, needed, prefix, "text_encoder", name)
    vocab, hidden = (int(d) for d in view[TEXT_ANCHOR])
    n_blocks = len(_indices(view, r"^transformer\.resblocks\.(\d+)\."))
    if hidden % head_channels:
        raise WeightLoadError(
            f"{name}: text hidden size {hidden} is not a multiple of head_channels={head_channels}"
        )
    projection = view.get("text_projection")
    return {
        "architectures": ["CLIPTextModel"],
        "model_type": "clip_text_model",
        "vocab_size": vocab,
        "hidden_size": hidden,
        "intermediate_size": int(view["transformer.resblocks.0.mlp.c_fc.weight"][0]),
        "projection_dim": int(projection[1]) if projection is not None and len(projection) == 2 else hidden,
        "num_hidden_layers": n_blocks - 1 if drop_last_layer else n_blocks,
        "num_attention_heads": hidden // head_channels,
        "max_position_embeddings": int(view["positional_embedding"][0]),
        "hidden_act": "gelu",  # OpenCLIP ViT-H uses exact GELU (not quick_gelu like OpenAI CLIP)
        "layer_norm_eps": 1e-5,
        "bos_token_id": 0,
        "eos_token_id": 2,
        "pad_token_id": 1,
    }


# ----------------------------------------------------------------------------------------------
# Plans and materialisation
# ----------------------------------------------------------------------------------------------


def _rename_plan(
    view: Shapes, prefix: str, name: str, component: str, rename: Callable[[str], str | None]
) -> dict[str, PlanEntry]:
    """One-to-one plan from a key-renaming function; unknown keys and collisions are errors."""
    plan: dict[str, PlanEntry] = {}
    unknown: list[str] = []
    for key in view:
        new = rename(key)
        if new is None:
            unknown.append(prefix + key)
        elif new in plan:
            clash = [plan[new].sources[0], prefix + key]
            raise _key_error(name, f"two {component} keys map to diffusers key {new!r}", clash)
        else:
            plan[new] = PlanEntry((prefix + key,), _identity)
    if unknown:
        raise _key_error(
            name,
            f"{component} keys under {prefix!r} with no diffusers equivalent (unsupported architecture?)",
            unknown,
        )
    return plan


def build_plan(
    keys_and_shapes: Source, component: str, *, drop_last_text_layer: bool = True
) -> dict[str, PlanEntry]:
    """``{diffusers_key: PlanEntry(source_keys, transform)}`` for one component; reads no tensor data."""
    shapes, name = _as_shapes(keys_and_shapes)
    return _plan(shapes, name, component, drop_last_text_layer)


def _plan(shapes: Shapes, name: str, component: str, drop_last_text_layer: bool) -> dict[str, PlanEntry]:
    """build_plan with the file name for messages given separately."""
    prefix, view = _component_view(shapes, component, name)
    if component == "unet":
        return _unet_plan(view, prefix, name)
    if component == "vae":
        return _vae_plan(view, prefix, name)
    return _text_plan(view, prefix, name, drop_last_text_layer)


def iter_component_tensors(
    path: str | os.PathLike[str], component: str, *, drop_last_text_layer: bool = True
) -> Iterator[tuple[str, np.ndarray]]:
    """Yield ``(diffusers_key, float32 array)`` one tensor at a time.

    The plan is built (and any layout error raised) when this is called, before iteration.
    """
    path = os.fspath(path)
    plan = _plan(read_keys_and_shapes(path), path, component, drop_last_text_layer)
    return _materialise(path, plan)


def _materialise(path: str, plan: Mapping[str, PlanEntry]) -> Iterator[tuple[str, np.ndarray]]:
    """Read sources in plan order; the last source is kept so q/k/v share one read."""
    with _Reader(path) as reader:
        cached_key: str | None = None
        cached: np.ndarray | None = None
        for new_key, (sources, transform) in plan.items():
            arrays = []
            for source in sources:
                if source != cached_key:
                    cached = None  # drop the previous source before reading the next
                    cached_key, cached = source, reader.get(source)
                arrays.append(cached)
            yield new_key, np.ascontiguousarray(transform(*arrays), dtype=np.float32)
        cached = None


def load_component_state_dict(
    path: str | os.PathLike[str], component: str, *, drop_last_text_layer: bool = True
) -> dict[str, np.ndarray]:
    """The whole component as ``{diffusers_key: float32 array}`` (convenience over the iterator)."""
    return dict(iter_component_tensors(path, component, drop_last_text_layer=drop_last_text_layer))


# ----------------------------------------------------------------------------------------------
# Prediction type (not in the weights)
# ----------------------------------------------------------------------------------------------

_PREDICTION_ALIASES = {
    "v": "v_prediction", "v_prediction": "v_prediction", "epsilon": "epsilon", "eps": "epsilon"
}


def infer_prediction_type(path: str | os.PathLike[str], default: str = "epsilon") -> str:
    """'epsilon' or 'v_prediction' from file metadata when it says so, else ``default``.

    Weights cannot tell eps from v models (SD 2.1-base and SD 2.1-768 have identical shapes),
    so only explicit metadata is trusted: Stability ModelSpec safetensors metadata
    ``modelspec.prediction_type`` ('epsilon' / 'v'), or ``modelspec.architecture`` ending in
    '-v' (e.g. 'stable-diffusion-v2-768-v'). diffusers' own heuristic (``.ckpt`` global_step ==
    875000 means eps, anything else v) is deliberately not copied: it misfires on fine-tunes.
    The default is 'epsilon' because this project's models (SD 2.1-base, SD-Turbo) are eps.
    """
    with _Reader(os.fspath(path)) as reader:
        meta = reader.metadata
    declared = str(meta.get("modelspec.prediction_type", "")).strip().lower()
    if declared in _PREDICTION_ALIASES:
        return _PREDICTION_ALIASES[declared]
    if str(meta.get("modelspec.architecture", "")).strip().lower().endswith("-v"):
        return "v_prediction"
    return default
