"""Building blocks shared by the UNet and the VAE: resnets, transformers, resampling, attention.

Submodule attribute names mirror the diffusers/transformers state-dict names (``to_out_0`` for
``to_out.0``) so that weight conversion is a mechanical rename; see ``weights/from_torch.py``.
"""

from __future__ import annotations

import math
from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

Dtype = Any
ATTENTION_IMPLEMENTATIONS = ("auto", "chunked", "einsum", "xla", "cudnn")
# Query block of the "chunked" path: a (heads, 128, keys) score block stays cache-sized on CPU,
# where the full 4096x4096 score matrix of SD at 64x64 latents (335 MB per block) is memory-bound.
QUERY_CHUNK = 128


def _matmul_attention(q: jax.Array, k: jax.Array, v: jax.Array, causal: bool, upcast: bool) -> jax.Array:
    """softmax(q k^T / sqrt(d)) v in (batch, heads, tokens, dim) layout."""
    scale = 1.0 / math.sqrt(q.shape[-1])
    scores = jnp.matmul(q * jnp.asarray(scale, q.dtype), jnp.swapaxes(k, -1, -2))
    if causal:
        # finfo.min, not -inf: a finite fill can never turn a softmax row into NaN.
        visible = jnp.tril(jnp.ones((q.shape[-2], k.shape[-2]), bool))
        scores = jnp.where(visible, scores, jnp.finfo(scores.dtype).min)
    weights = jax.nn.softmax(scores.astype(jnp.float32) if upcast else scores, axis=-1)
    return jnp.matmul(weights.astype(v.dtype), v)


def _chunked_attention(q: jax.Array, k: jax.Array, v: jax.Array, upcast: bool, chunk: int) -> jax.Array:
    """Attention over query blocks of ``chunk`` tokens, one block at a time (``lax.map``)."""
    b, h, n, d = q.shape
    blocks = jnp.moveaxis(q.reshape(b, h, n // chunk, chunk, d), 2, 0)
    out = jax.lax.map(lambda qb: _matmul_attention(qb, k, v, False, upcast), blocks)
    return jnp.moveaxis(out, 0, 2).reshape(b, h, n, v.shape[-1])


def attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    *,
    implementation: str = "auto",
    upcast: bool = False,
    causal: bool = False,
) -> jax.Array:
    """Scaled dot-product attention on (batch, tokens, heads, head_dim) tensors.

    The single place where attention is computed, so that a backend kernel can be chosen by a
    config field: "xla"/"cudnn" use ``jax.nn.dot_product_attention`` (cuDNN flash on GPU),
    "einsum" a plain matmul-softmax-matmul, "chunked" the same over query blocks (fastest on CPU
    for long sequences), "auto" picks "chunked" on CPU and "xla" elsewhere. ``causal`` lets query
    i see keys 0..i only (the CLIP text encoder), with the same top-left alignment on every path.
    """
    if implementation not in ATTENTION_IMPLEMENTATIONS:
        raise ValueError(
            f"unknown attention implementation {implementation!r}; "
            f"choose one of {ATTENTION_IMPLEMENTATIONS}"
        )
    out_dtype = q.dtype
    if upcast:
        # SD 2.x (768) was trained with fp32 attention scores; keep them so under bf16 compute.
        q, k, v = (x.astype(jnp.float32) for x in (q, k, v))
    if implementation == "auto":
        # Measured on a 2-core CPU at 4096 tokens: XLA's generic dot_product_attention and the
        # full matmul path are 3-6x slower than query blocks (docs/design.md, "Performance on CPU").
        implementation = "chunked" if jax.default_backend() == "cpu" else "xla"
    if implementation == "chunked" and (causal or q.shape[1] <= QUERY_CHUNK or q.shape[1] % QUERY_CHUNK):
        implementation = "einsum"  # short or ragged sequences: one block is the whole thing
    if implementation in ("einsum", "chunked"):
        qh, kh, vh = (jnp.swapaxes(x, 1, 2) for x in (q, k, v))  # -> (batch, heads, tokens, dim)
        if implementation == "chunked":
            out = _chunked_attention(qh, kh, vh, upcast, QUERY_CHUNK)
        else:
            out = _matmul_attention(qh, kh, vh, causal, upcast)
        out = jnp.swapaxes(out, 1, 2)
    else:
        out = jax.nn.dot_product_attention(
            q, k, v, is_causal=causal, implementation=None if implementation == "xla" else "cudnn"
        )
    return out.astype(out_dtype)


def group_norm(num_groups: int, epsilon: float, name: str | None = None, dtype: Dtype = jnp.float32) -> nn.GroupNorm:
    """GroupNorm with the two-pass variance PyTorch uses (the fast E[x^2]-E[x]^2 loses digits)."""
    return nn.GroupNorm(
        num_groups=num_groups, epsilon=epsilon, use_fast_variance=False, dtype=dtype, name=name
    )


def layer_norm(epsilon: float = 1e-5, name: str | None = None, dtype: Dtype = jnp.float32) -> nn.LayerNorm:
    """LayerNorm with PyTorch's two-pass variance."""
    return nn.LayerNorm(epsilon=epsilon, use_fast_variance=False, dtype=dtype, name=name)


# On CPU, XLA's convolution is 2-5x slower than one matmul over unfolded patches when the map is
# small and the channels many (SD's 8x8 and 16x16 levels at 1280-2560 channels), and slower
# than its own convolution on large maps; measured crossover between 16x16 and 32x32.
IM2COL_MAX_PIXELS = 256
# ...and only with many input channels: at 32-128 channels XLA's own convolution is as fast forward
# and 2x faster backward (the patch concatenation's gradient dominates; measured on the digits UNet).
IM2COL_MIN_CHANNELS = 256


class Conv(nn.Module):
    """NHWC convolution with nn.Conv's parameters (kernel HWIO, bias) and a CPU fast path.

    Stride-1 convolutions on maps of at most ``IM2COL_MAX_PIXELS`` pixels run on the CPU backend as
    a matmul over unfolded patches (1x1 kernels always as a plain matmul); the result is the same
    convolution, only the XLA kernel differs.
    """

    features: int
    kernel_size: int
    strides: int = 1
    padding: Any = None
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        k, cin = self.kernel_size, x.shape[-1]
        kernel = self.param("kernel", nn.initializers.lecun_normal(), (k, k, cin, self.features))
        bias = self.param("bias", nn.initializers.zeros_init(), (self.features,))
        x, kernel, bias = nn.dtypes.promote_dtype(x, kernel, bias, dtype=self.dtype)
        pad = self.padding
        if pad is None:
            pad = ((k - 1) // 2, (k - 1) // 2), ((k - 1) // 2, (k - 1) // 2)
        b, h, w, _ = x.shape
        small_map = h * w <= IM2COL_MAX_PIXELS and cin >= IM2COL_MIN_CHANNELS
        if self.strides == 1 and (k == 1 or (jax.default_backend() == "cpu" and small_map)):
            x = jnp.pad(x, ((0, 0), *pad, (0, 0)))
            oh, ow = x.shape[1] - k + 1, x.shape[2] - k + 1
            patches = jnp.concatenate(
                [x[:, i:i + oh, j:j + ow, :] for i in range(k) for j in range(k)], axis=-1
            )
            y = jnp.dot(patches.reshape(b * oh * ow, k * k * cin), kernel.reshape(k * k * cin, -1))
            y = y.reshape(b, oh, ow, self.features)
        else:
            y = jax.lax.conv_general_dilated(
                x, kernel, (self.strides, self.strides), pad, dimension_numbers=("NHWC", "HWIO", "NHWC")
            )
        return y + bias


def conv(features: int, kernel: int, name: str | None = None, stride: int = 1, padding: Any = None, dtype: Dtype = jnp.float32) -> Conv:
    """NHWC convolution with PyTorch-style symmetric 'same' padding by default."""
    if padding is not None:
        padding = tuple(tuple(p) for p in padding)
    return Conv(features, kernel, stride, padding, dtype=dtype, name=name)


def timestep_embedding(
    timesteps: jax.Array,
    dim: int,
    flip_sin_to_cos: bool = True,
    freq_shift: float = 0.0,
    max_period: float = 10000.0,
) -> jax.Array:
    """Sinusoidal timestep features as in diffusers' ``get_timestep_embedding`` (float32)."""
    half = dim // 2
    exponent = -math.log(max_period) * jnp.arange(half, dtype=jnp.float32) / (half - freq_shift)
    args = timesteps.astype(jnp.float32)[:, None] * jnp.exp(exponent)[None, :]
    emb = jnp.concatenate([jnp.sin(args), jnp.cos(args)], axis=-1)
    if flip_sin_to_cos:
        emb = jnp.concatenate([emb[:, half:], emb[:, :half]], axis=-1)
    if dim % 2:
        emb = jnp.pad(emb, ((0, 0), (0, 1)))
    return emb


class TimestepEmbedding(nn.Module):
    """Two-layer MLP on the sinusoidal features (diffusers ``TimestepEmbedding``)."""

    features: int
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        x = nn.Dense(self.features, dtype=self.dtype, name="linear_1")(x)
        return nn.Dense(self.features, dtype=self.dtype, name="linear_2")(nn.silu(x))


class ResnetBlock(nn.Module):
    """GroupNorm-SiLU-conv residual block with optional timestep conditioning."""

    out_channels: int
    groups: int = 32
    eps: float = 1e-5
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, temb: jax.Array | None = None) -> jax.Array:
        h = nn.silu(group_norm(self.groups, self.eps, "norm1", self.dtype)(x))
        h = conv(self.out_channels, 3, "conv1", dtype=self.dtype)(h)
        if temb is not None:
            t = nn.Dense(self.out_channels, dtype=self.dtype, name="time_emb_proj")(nn.silu(temb))
            h = h + t[:, None, None, :]
        h = nn.silu(group_norm(self.groups, self.eps, "norm2", self.dtype)(h))
        h = conv(self.out_channels, 3, "conv2", dtype=self.dtype)(h)
        if x.shape[-1] != self.out_channels:
            x = conv(self.out_channels, 1, "conv_shortcut", dtype=self.dtype)(x)
        return x + h


class Downsample(nn.Module):
    """Stride-2 3x3 convolution; ``asymmetric_pad`` reproduces the VAE's (0,1,0,1) padding."""

    out_channels: int
    asymmetric_pad: bool = False
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        padding = ((0, 1), (0, 1)) if self.asymmetric_pad else ((1, 1), (1, 1))
        return conv(self.out_channels, 3, "conv", stride=2, padding=padding, dtype=self.dtype)(x)


class Upsample(nn.Module):
    """Nearest-neighbour 2x upsampling followed by a 3x3 convolution."""

    out_channels: int
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        x = jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)
        return conv(self.out_channels, 3, "conv", dtype=self.dtype)(x)


class Attention(nn.Module):
    """Multi-head attention with diffusers' projection names (to_q, to_k, to_v, to_out_0)."""

    heads: int
    dim_head: int
    out_features: int | None = None
    qkv_bias: bool = False
    upcast: bool = False
    implementation: str = "auto"
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, context: jax.Array | None = None) -> jax.Array:
        context = x if context is None else context
        inner = self.heads * self.dim_head
        dense = lambda n, name, bias: nn.Dense(n, use_bias=bias, dtype=self.dtype, name=name)
        split = lambda t: t.reshape(*t.shape[:-1], self.heads, self.dim_head)
        q = split(dense(inner, "to_q", self.qkv_bias)(x))
        k = split(dense(inner, "to_k", self.qkv_bias)(context))
        v = split(dense(inner, "to_v", self.qkv_bias)(context))
        out = attention(q, k, v, implementation=self.implementation, upcast=self.upcast)
        out = out.reshape(*out.shape[:-2], inner)
        return dense(self.out_features or x.shape[-1], "to_out_0", True)(out)


class GEGLU(nn.Module):
    """Gated-GELU projection (diffusers ``GEGLU``: one matmul, split into value and gate)."""

    features: int
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        h = nn.Dense(self.features * 2, dtype=self.dtype, name="proj")(x)
        value, gate = jnp.split(h, 2, axis=-1)
        return value * nn.gelu(gate, approximate=False)


class FeedForward(nn.Module):
    """GEGLU feed-forward with 4x expansion (names ``net_0.proj`` and ``net_2``)."""

    mult: int = 4
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        dim = x.shape[-1]
        h = GEGLU(dim * self.mult, dtype=self.dtype, name="net_0")(x)
        return nn.Dense(dim, dtype=self.dtype, name="net_2")(h)


class BasicTransformerBlock(nn.Module):
    """Self-attention, cross-attention and feed-forward, each pre-LayerNorm and residual."""

    heads: int
    dim_head: int
    upcast_attention: bool = False
    attention_impl: str = "auto"
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, context: jax.Array) -> jax.Array:
        attn = lambda name: Attention(
            self.heads, self.dim_head, upcast=self.upcast_attention,
            implementation=self.attention_impl, dtype=self.dtype, name=name,
        )
        x = x + attn("attn1")(layer_norm(name="norm1", dtype=self.dtype)(x))
        x = x + attn("attn2")(layer_norm(name="norm2", dtype=self.dtype)(x), context)
        return x + FeedForward(dtype=self.dtype, name="ff")(layer_norm(name="norm3", dtype=self.dtype)(x))


class Transformer2D(nn.Module):
    """Spatial transformer: GroupNorm, projection in (linear or 1x1 conv), blocks, projection out.

    ``residual=False`` returns the block's edit without adding the input back, and
    ``zero_init_out=True`` zero-initialises ``proj_out`` (the H-space adapter's transformer block:
    a fresh one edits nothing).
    """

    heads: int
    dim_head: int
    depth: int = 1
    use_linear_projection: bool = False
    upcast_attention: bool = False
    attention_impl: str = "auto"
    groups: int = 32
    residual: bool = True
    zero_init_out: bool = False
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, context: jax.Array) -> jax.Array:
        b, h, w, c = x.shape
        inner = self.heads * self.dim_head
        residual = x
        x = group_norm(self.groups, 1e-6, "norm", self.dtype)(x)
        if self.use_linear_projection:
            x = nn.Dense(inner, dtype=self.dtype, name="proj_in")(x.reshape(b, h * w, c))
        else:
            x = conv(inner, 1, "proj_in", dtype=self.dtype)(x).reshape(b, h * w, inner)
        for i in range(self.depth):
            x = BasicTransformerBlock(
                self.heads, self.dim_head, self.upcast_attention, self.attention_impl,
                dtype=self.dtype, name=f"transformer_blocks_{i}",
            )(x, context)
        if self.use_linear_projection:
            zero = dict(kernel_init=nn.initializers.zeros, bias_init=nn.initializers.zeros)
            x = nn.Dense(c, dtype=self.dtype, name="proj_out", **(zero if self.zero_init_out else {}))(x)
            x = x.reshape(b, h, w, c)
        else:
            if self.zero_init_out:
                raise ValueError("zero_init_out needs use_linear_projection")
            x = conv(c, 1, "proj_out", dtype=self.dtype)(x.reshape(b, h, w, inner))
        return x + residual if self.residual else x


def per_block(value: int | Sequence[int], n: int, name: str) -> tuple[int, ...]:
    """Broadcast an int config value to one entry per block; check tuple lengths."""
    if isinstance(value, int):
        return (value,) * n
    value = tuple(value)
    if len(value) != n:
        raise ValueError(f"{name} has {len(value)} entries but there are {n} blocks")
    return value
