"""CLIP text transformer (transformers ``CLIPTextModel`` layout) and its tokenizer.

SD 2.x uses OpenCLIP ViT-H/14's text tower converted to this layout (hidden 1024, 23 layers,
16 heads, exact-erf gelu); SD 1.x uses OpenAI CLIP ViT-L/14 (768, 12 layers, quick_gelu).
Submodule names mirror the state-dict keys below ``text_model.`` (``encoder.layers.3`` ->
``encoder/layers_3``) so that ``weights/convert.py`` maps weights by name.
"""

from __future__ import annotations

import dataclasses
import os
import warnings
from typing import Any, Callable, Mapping, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from imagerag_jax.models.layers import attention, layer_norm

Dtype = Any

# transformers' CLIPTextConfig defaults: its save_pretrained may omit fields equal to them.
CONFIG_DEFAULTS: dict[str, Any] = {
    "vocab_size": 49408,
    "hidden_size": 512,
    "intermediate_size": 2048,
    "num_hidden_layers": 12,
    "num_attention_heads": 8,
    "max_position_embeddings": 77,
    "hidden_act": "quick_gelu",
    "layer_norm_eps": 1e-5,
    "eos_token_id": 49407,
}
# Configs from before transformers PR #24773 say eos_token_id=2; the EOS is then the largest id.
LEGACY_EOS_TOKEN_ID = 2
TOKENIZER_FILE_SETS = (("vocab.json", "merges.txt"), ("tokenizer.json",))
DEFAULT_MAX_LENGTH = 77


def quick_gelu(x: jax.Array) -> jax.Array:
    """OpenAI CLIP's sigmoid approximation of gelu: x * sigmoid(1.702 x)."""
    return x * jax.nn.sigmoid(1.702 * x)


ACTIVATIONS: dict[str, Callable[[jax.Array], jax.Array]] = {
    "gelu": lambda x: nn.gelu(x, approximate=False),
    "quick_gelu": quick_gelu,
    "gelu_new": lambda x: nn.gelu(x, approximate=True),
    "gelu_pytorch_tanh": lambda x: nn.gelu(x, approximate=True),
}


def activation(name: str) -> Callable[[jax.Array], jax.Array]:
    """The activation function for a transformers ``hidden_act`` name."""
    if name not in ACTIVATIONS:
        raise ValueError(
            f"unsupported CLIP hidden_act {name!r}; supported: {', '.join(sorted(ACTIVATIONS))}"
        )
    return ACTIVATIONS[name]


class CLIPAttention(nn.Module):
    """Causal multi-head self-attention with transformers' names (q_proj, k_proj, v_proj, out_proj)."""

    heads: int
    upcast: bool = True
    implementation: str = "auto"
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        width = x.shape[-1]
        if width % self.heads:
            raise ValueError(f"hidden size {width} is not divisible by {self.heads} heads")
        split = lambda t: t.reshape(*t.shape[:-1], self.heads, width // self.heads)
        q, k, v = (
            split(nn.Dense(width, dtype=self.dtype, name=name)(x))
            for name in ("q_proj", "k_proj", "v_proj")
        )
        out = attention(q, k, v, implementation=self.implementation, upcast=self.upcast, causal=True)
        return nn.Dense(width, dtype=self.dtype, name="out_proj")(out.reshape(*x.shape[:-1], width))


class CLIPMLP(nn.Module):
    """fc1 -> activation -> fc2."""

    intermediate_size: int
    hidden_act: str = "gelu"
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        h = nn.Dense(self.intermediate_size, dtype=self.dtype, name="fc1")(x)
        h = activation(self.hidden_act)(h)
        return nn.Dense(x.shape[-1], dtype=self.dtype, name="fc2")(h)


class CLIPEncoderLayer(nn.Module):
    """Pre-LayerNorm residual block: causal self-attention, then MLP."""

    num_attention_heads: int
    intermediate_size: int
    hidden_act: str = "gelu"
    layer_norm_eps: float = 1e-5
    upcast_attention: bool = True
    attention_impl: str = "auto"
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        # Layer norms run in fp32 and the residual stream stays fp32: under bf16 compute only the
        # matmuls drop precision, which keeps 23 accumulated residual additions accurate.
        h = layer_norm(self.layer_norm_eps, "layer_norm1")(x)
        x = x + CLIPAttention(
            self.num_attention_heads, self.upcast_attention, self.attention_impl, self.dtype,
            name="self_attn",
        )(h)
        h = layer_norm(self.layer_norm_eps, "layer_norm2")(x)
        return x + CLIPMLP(self.intermediate_size, self.hidden_act, self.dtype, name="mlp")(h)


class CLIPTextEmbeddings(nn.Module):
    """Token embedding plus learned absolute position embedding."""

    vocab_size: int
    hidden_size: int
    max_position_embeddings: int

    @nn.compact
    def __call__(self, input_ids: jax.Array) -> jax.Array:
        # Kept fp32: this is the start of the fp32 residual stream.
        tokens = nn.Embed(self.vocab_size, self.hidden_size, dtype=jnp.float32, name="token_embedding")
        positions = nn.Embed(
            self.max_position_embeddings, self.hidden_size, dtype=jnp.float32, name="position_embedding"
        )
        return tokens(input_ids) + positions(jnp.arange(input_ids.shape[-1]))[None]


class CLIPEncoder(nn.Module):
    """The stack of encoder layers (``encoder.layers.N``)."""

    num_hidden_layers: int
    layer_kwargs: Mapping[str, Any]

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        for i in range(self.num_hidden_layers):
            x = CLIPEncoderLayer(**self.layer_kwargs, name=f"layers_{i}")(x)
        return x


class CLIPTextTransformer(nn.Module):
    """transformers ``CLIPTextModel``: ``input_ids (B, L) -> (last_hidden_state, pooled)``.

    ``dtype`` is the matmul compute dtype; layer norms, the residual stream, softmax (when
    ``upcast_attention``) and both outputs stay fp32.
    """

    vocab_size: int = 49408
    hidden_size: int = 1024
    intermediate_size: int = 4096
    num_hidden_layers: int = 23
    num_attention_heads: int = 16
    max_position_embeddings: int = 77
    hidden_act: str = "gelu"
    layer_norm_eps: float = 1e-5
    eos_token_id: int = 49407
    upcast_attention: bool = True
    attention_impl: str = "auto"
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, input_ids: jax.Array) -> tuple[jax.Array, jax.Array]:
        input_ids = self._check_ids(input_ids)
        x = CLIPTextEmbeddings(
            self.vocab_size, self.hidden_size, self.max_position_embeddings, name="embeddings"
        )(input_ids)
        layer_kwargs = dict(
            num_attention_heads=self.num_attention_heads,
            intermediate_size=self.intermediate_size,
            hidden_act=self.hidden_act,
            layer_norm_eps=self.layer_norm_eps,
            upcast_attention=self.upcast_attention,
            attention_impl=self.attention_impl,
            dtype=self.dtype,
        )
        x = CLIPEncoder(self.num_hidden_layers, layer_kwargs, name="encoder")(x)
        last_hidden_state = layer_norm(self.layer_norm_eps, "final_layer_norm")(x)
        index = eos_positions(input_ids, self.eos_token_id)
        pooled = jnp.take_along_axis(last_hidden_state, index[:, None, None], axis=1)[:, 0]
        return last_hidden_state, pooled

    def _check_ids(self, input_ids: jax.Array) -> jax.Array:
        """Validate the (batch, length) shape and integer dtype of the token ids."""
        input_ids = jnp.asarray(input_ids)
        if input_ids.ndim != 2:
            raise ValueError(f"input_ids must be (batch, length), got shape {input_ids.shape}")
        if input_ids.shape[1] > self.max_position_embeddings:
            raise ValueError(
                f"sequence length {input_ids.shape[1]} exceeds max_position_embeddings "
                f"{self.max_position_embeddings}"
            )
        if not jnp.issubdtype(input_ids.dtype, jnp.integer):
            raise ValueError(f"input_ids must be integers, got {input_ids.dtype}")
        return input_ids

    def dummy_inputs(self, batch: int = 1) -> tuple[jax.Array]:
        """Smallest valid inputs for shaping params (a full-length row of zeros)."""
        return (jnp.zeros((batch, self.max_position_embeddings), jnp.int32),)

    @classmethod
    def from_config(cls, cfg: Mapping[str, Any], dtype: Dtype = jnp.float32, **overrides: Any) -> CLIPTextTransformer:
        """Build from a transformers ``CLIPTextConfig`` dict (or a ``CLIPConfig`` with ``text_config``)."""
        return cls(**config_kwargs(cfg), dtype=dtype, **overrides)


def config_kwargs(cfg: Mapping[str, Any]) -> dict[str, Any]:
    """transformers CLIP text config dict -> ``CLIPTextTransformer`` fields (with HF defaults)."""
    if isinstance(cfg.get("text_config"), Mapping):
        cfg = cfg["text_config"]
    values = {k: (cfg[k] if cfg.get(k) is not None else v) for k, v in CONFIG_DEFAULTS.items()}
    activation(values["hidden_act"])  # fail now, not at first use
    eos = values["eos_token_id"]
    if isinstance(eos, (list, tuple)):
        if len(eos) != 1:
            raise ValueError(f"a single eos_token_id is needed for pooling, got {eos}")
        values["eos_token_id"] = eos[0]
    if values["hidden_size"] % values["num_attention_heads"]:
        raise ValueError(
            f"hidden_size {values['hidden_size']} is not divisible by "
            f"num_attention_heads {values['num_attention_heads']}"
        )
    return values


def eos_positions(input_ids: jax.Array, eos_token_id: int) -> jax.Array:
    """Index of the pooled token per row, exactly as transformers' CLIPTextModel picks it."""
    if eos_token_id == LEGACY_EOS_TOKEN_ID:
        # Legacy configs: the EOS token has the largest id in CLIP's vocabulary.
        return jnp.argmax(input_ids, axis=-1)
    # First EOS (padding may also be EOS); a row without EOS pools position 0, like transformers.
    return jnp.argmax((input_ids == eos_token_id).astype(jnp.int32), axis=-1)


# ---------------------------------------------------------------------------------- tokenizer


@dataclasses.dataclass
class Tokenizer:
    """Prompts -> int32 ids (B, max_length), padded and truncated as the SD pipelines do."""

    tokenizer: Any  # a transformers CLIPTokenizer
    max_length: int = DEFAULT_MAX_LENGTH

    @classmethod
    def from_pretrained(cls, path: str, max_length: int = DEFAULT_MAX_LENGTH) -> Tokenizer:
        """Load the CLIP tokenizer files (vocab.json + merges.txt, or tokenizer.json) from a folder."""
        if not os.path.isdir(path):
            raise FileNotFoundError(f"tokenizer folder {path} does not exist")
        if not any(all(os.path.isfile(os.path.join(path, f)) for f in files) for files in TOKENIZER_FILE_SETS):
            raise FileNotFoundError(
                f"{path} holds no CLIP tokenizer: expected vocab.json and merges.txt, or "
                f"tokenizer.json (a diffusers pipeline's tokenizer/ folder)"
            )
        from transformers import CLIPTokenizer  # deferred: transformers is slow to import

        return cls(CLIPTokenizer.from_pretrained(path), max_length)

    @property
    def pad_token_id(self) -> int:
        """The padding id from the tokenizer files ('!' = 0 for SD 2.x, EOS for SD 1.x)."""
        return int(self.tokenizer.pad_token_id)

    @property
    def eos_token_id(self) -> int:
        """The <|endoftext|> id."""
        return int(self.tokenizer.eos_token_id)

    def __call__(self, prompts: str | Sequence[str]) -> np.ndarray:
        """Token ids (B, max_length) int32 with BOS/EOS; long prompts are truncated with a warning.

        The ids are transformers' `padding="max_length", truncation=True` ones, from one
        tokenizer pass: untruncated, so that a long prompt's dropped tokens are known and named,
        then cut to the first max_length - 1 ids and the EOS (CLIP's BOS ... EOS template) and
        padded on the right.
        """
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        # verbose=False: transformers would log its own over-length warning, without the prompt.
        rows = self.tokenizer(prompts, truncation=False, verbose=False)["input_ids"]
        ids = np.full((len(prompts), self.max_length), self.pad_token_id, np.int32)
        for i, (prompt, row) in enumerate(zip(prompts, rows)):
            dropped = len(row) - self.max_length
            if dropped > 0:
                warnings.warn(f"prompt truncated to {self.max_length} tokens, {dropped} token(s) "
                              f"dropped: {prompt!r}", stacklevel=2)
                row = row[:self.max_length - 1] + row[-1:]
            ids[i, :len(row)] = row
        return ids
