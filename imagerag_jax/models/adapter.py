"""The H-space adapter (paper Eq. 4-5), the retrieval weight lambda and spherical blending (Eq. 3).

All tensors are NHWC. ``h_tgt`` is the UNet mid-block output for the target (B, h, w, C);
``h_retr`` stacks the k retrieved neighbours' H-space maps (B, k, h, w, C), each computed by the
frozen encoder at t = 0 (``sampling.retrieved_hspace``).
"""

from __future__ import annotations

import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from imagerag_jax.models import layers

Dtype = Any
LAMBDA_MODES = ("mean", "per_neighbour")
SLERP_MAGNITUDES = ("lerp", "raw")
POSITIONAL = ("none", "sincos")
BLOCKS = ("attention", "transformer")


def sincos_2d(height: int, width: int, channels: int) -> np.ndarray:
    """Fixed 2-D sine/cosine position codes (h*w, channels) f32, rows then columns (row-major tokens).

    The first half of the channels code the row, the second half the column, each as
    [sin(p f_i), cos(p f_i)] with f_i = 10000^(-i/n) over n = channels // 4 frequencies
    (integer positions, so a map of any size gets the same code at the same cell). NumPy: the
    shapes are static, so it is a constant of the traced program, and the PyTorch runtime uses
    the same table.
    """
    if channels % 4:
        raise ValueError(f"sincos positions need channels divisible by 4, got {channels}")
    n = channels // 4
    freqs = 10000.0 ** (-np.arange(n) / n)
    code = lambda pos: np.concatenate([np.sin(pos[:, None] * freqs), np.cos(pos[:, None] * freqs)], -1)
    rows = np.repeat(code(np.arange(height)), width, axis=0)
    cols = np.tile(code(np.arange(width)), (height, 1))
    return np.concatenate([rows, cols], axis=-1).astype(np.float32)


class HSpaceAdapter(nn.Module):
    """Cross-attention from target H-space tokens to the k retrieved maps' tokens (Eq. 4).

    Q = W_Q LN(h_tgt) over the h*w target tokens; K = W_K LN(h_retr), V = W_V LN(h_retr) over all
    k*h*w retrieved tokens. Multi-head softmax(QK^T / sqrt(d)) V, then ``to_out`` back to C
    channels. Parameters: norm_tgt, norm_retr (LayerNorm scale/bias), to_q, to_k, to_v (kernels,
    no bias: the paper's W_Q, W_K, W_V are linear maps), to_out (kernel, bias).

    Pre-normalisation (``pre_norm=True``, the default): a LayerNorm over channels (with affine,
    two-pass variance) on the target tokens and, separately, on the retrieved tokens. SD's
    H-space activations are large and their scale differs between the target (encoded at t=999)
    and the neighbours (t=0); without it the logits would be dominated by feature norms and
    saturate the softmax at initialisation, with it they start O(1) at any t. The output
    magnitude is learned by ``to_out``.

    Positions (``positional``): ``'none'`` (the paper: no positional encoding, so a target token
    cannot tell where in the neighbour's map a token came from, only what it holds) or
    ``'sincos'``: the same fixed 2-D code (``sincos_2d``) added to the normalised target tokens
    and to every neighbour's tokens, so a query can attend to the neighbour's token at its own
    cell. Parameter-free: the weights and their export layout are the same either way. The result
    stays invariant to the order of the neighbours.

    ``to_out`` (kernel and bias) is zero-initialised: the adapter outputs exactly 0 at init, so
    Eq. 5 starts at the frozen SD-Turbo result bit for bit.

    ``block='transformer'`` is the paper's adapter (Sec. 4.4: 36M parameters at 1,280 channels):
    SD's spatial transformer block (``layers.Transformer2D``: GroupNorm, linear proj_in,
    self-attention over the target tokens, cross-attention whose keys and values are the k
    neighbours' tokens, GEGLU feed-forward, proj_out), returning its edit without the residual,
    its proj_out zero-initialised (again exactly 0 at init). With ``pre_norm`` the neighbours'
    tokens pass ``norm_retr`` first (the target's own GroupNorm is the block's). Parameters:
    norm_retr, transformer (diffusers' Transformer2DModel names). No position codes.
    """

    block: str = "attention"
    groups: int = 32

    num_heads: int = 8
    head_dim: int | None = None
    attention_impl: str = "auto"
    pre_norm: bool = True
    upcast_attention: bool = False
    positional: str = "none"
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, h_tgt: jax.Array, h_retr: jax.Array) -> jax.Array:
        """(B,h,w,C), (B,k,h',w',C) [or (B,h',w',C) for k=1] -> delta (B,h,w,C)."""
        if h_retr.ndim == 4:
            h_retr = h_retr[:, None]
        if h_tgt.ndim != 4 or h_retr.ndim != 5:
            raise ValueError(
                f"expected h_tgt (B,h,w,C) and h_retr (B,k,h,w,C); got {h_tgt.shape}, {h_retr.shape}"
            )
        b, hh, ww, c = h_tgt.shape
        if h_retr.shape[0] != b or h_retr.shape[-1] != c:
            raise ValueError(f"h_retr {h_retr.shape} does not match h_tgt {h_tgt.shape} in batch/channels")
        if self.positional not in POSITIONAL:
            raise ValueError(f"unknown adapter positional {self.positional!r}; choose one of {POSITIONAL}")
        if self.block not in BLOCKS:
            raise ValueError(f"unknown adapter block {self.block!r}; choose one of {BLOCKS}")
        heads, dim = self._heads(c)
        inner = heads * dim
        if self.block == "transformer":
            return self._transformer(h_tgt, h_retr, heads, dim)

        q_in = h_tgt.reshape(b, hh * ww, c).astype(self.dtype)
        kv_in = h_retr.reshape(b, -1, c).astype(self.dtype)  # all k*h'*w' tokens of an example
        if self.pre_norm:
            q_in = layers.layer_norm(name="norm_tgt", dtype=self.dtype)(q_in)
            kv_in = layers.layer_norm(name="norm_retr", dtype=self.dtype)(kv_in)
        if self.positional == "sincos":
            k_maps, rh, rw = h_retr.shape[1], h_retr.shape[2], h_retr.shape[3]
            q_in = q_in + jnp.asarray(sincos_2d(hh, ww, c), self.dtype)
            kv_in = kv_in + jnp.asarray(np.tile(sincos_2d(rh, rw, c), (k_maps, 1)), self.dtype)
        dense = lambda n, name: nn.Dense(n, use_bias=False, dtype=self.dtype, name=name)
        split = lambda t: t.reshape(t.shape[0], t.shape[1], heads, dim)
        q = split(dense(inner, "to_q")(q_in))
        k = split(dense(inner, "to_k")(kv_in))
        v = split(dense(inner, "to_v")(kv_in))
        out = layers.attention(q, k, v, implementation=self.attention_impl, upcast=self.upcast_attention)
        out = nn.Dense(
            c, dtype=self.dtype, kernel_init=nn.initializers.zeros, bias_init=nn.initializers.zeros,
            name="to_out",
        )(out.reshape(b, hh * ww, inner))
        return out.reshape(b, hh, ww, c)

    def _transformer(self, h_tgt: jax.Array, h_retr: jax.Array, heads: int, dim: int) -> jax.Array:
        """The paper's block: SD's spatial transformer reading the neighbours' tokens, edit only."""
        c = h_tgt.shape[-1]
        if self.positional != "none":
            raise ValueError(f"adapter block 'transformer' takes no position codes (positional "
                             f"{self.positional!r}); use block 'attention' for them")
        if c % self.groups:
            raise ValueError(f"adapter block 'transformer': {c} channels cannot be split into "
                             f"{self.groups} GroupNorm groups; set adapter.groups")
        kv_in = h_retr.reshape(h_retr.shape[0], -1, c).astype(self.dtype)
        if self.pre_norm:
            kv_in = layers.layer_norm(name="norm_retr", dtype=self.dtype)(kv_in)
        return layers.Transformer2D(
            heads, dim, use_linear_projection=True, upcast_attention=self.upcast_attention,
            attention_impl=self.attention_impl, groups=self.groups, residual=False,
            zero_init_out=True, dtype=self.dtype, name="transformer",
        )(h_tgt.astype(self.dtype), kv_in)

    def _heads(self, channels: int) -> tuple[int, int]:
        """(heads, head_dim): head_dim defaults to channels // num_heads."""
        if self.head_dim is not None:
            return self.num_heads, self.head_dim
        if channels % self.num_heads:
            raise ValueError(f"{channels} channels cannot be split into {self.num_heads} heads; set head_dim")
        return self.num_heads, channels // self.num_heads


def from_config(adapter: Any, dtype: Dtype = jnp.float32) -> HSpaceAdapter:
    """The adapter of a run's ``config.adapter`` or an export's adapter config (head_dim 0: C // heads)."""
    get = adapter.get
    return HSpaceAdapter(num_heads=int(get("num_heads")), head_dim=int(get("head_dim", 0)) or None,
                         attention_impl=str(get("attention_impl", "auto")),
                         pre_norm=bool(get("pre_norm", True)),
                         upcast_attention=bool(get("upcast_attention", False)),
                         positional=str(get("positional", "none")),
                         block=str(get("block", "attention")), groups=int(get("groups", 32)),
                         dtype=dtype)


def _l2_normalize(x: jax.Array, eps: float = 1e-12) -> jax.Array:
    """x / ||x|| over the last axis; a zero vector stays zero (finite value and gradient)."""
    sq = jnp.sum(jnp.square(x), axis=-1, keepdims=True)
    return x * jax.lax.rsqrt(jnp.maximum(sq, eps * eps))


def retrieval_lambda(pooled_tgt: jax.Array, pooled_retr: jax.Array, mode: str = "mean") -> jax.Array:
    """Eq. 5's lambda from pooled text embeddings (B,D), (B,k,D): (B,) for 'mean', (B,k) otherwise.

    ``'mean'`` (what the adapter path uses as the paper's scalar lambda): the mean over the k
    neighbours of cos(pooled_tgt, pooled_retr_j). ``'per_neighbour'``: the (B, k) similarities,
    for weighting neighbours individually. Not clipped: nearest neighbours are positively
    similar in practice, and a negative lambda would only flip the learned edit.
    """
    if mode not in LAMBDA_MODES:
        raise ValueError(f"unknown lambda mode {mode!r}; choose one of {LAMBDA_MODES}")
    t = _l2_normalize(pooled_tgt.astype(jnp.float32))
    r = _l2_normalize(pooled_retr.astype(jnp.float32))
    sims = jnp.einsum("bd,bkd->bk", t, r)
    return sims if mode == "per_neighbour" else jnp.mean(sims, axis=-1)


def inject(h_tgt: jax.Array, delta: jax.Array, lam: jax.Array | float) -> jax.Array:
    """Eq. 5: h_tgt + lambda * delta, lambda a scalar or per-example (B,); keeps h_tgt's dtype."""
    lam = jnp.asarray(lam)
    if lam.ndim:
        lam = lam.reshape(lam.shape[0], *([1] * (h_tgt.ndim - 1)))
    return (h_tgt + lam * delta).astype(h_tgt.dtype)


def _safe_norm(x: jax.Array) -> jax.Array:
    """||x|| over the last axis with a finite (zero) gradient at x = 0 (double-where)."""
    sq = jnp.sum(jnp.square(x), axis=-1)
    pos = sq > 0
    return jnp.where(pos, jnp.sqrt(jnp.where(pos, sq, 1.0)), 0.0)


def _safe_unit(x: jax.Array, norm: jax.Array) -> jax.Array:
    """x / norm (norm broadcastable, (B,1)) with zero vectors mapped to zero."""
    pos = norm > 0
    return jnp.where(pos, x / jnp.where(pos, norm, 1.0), 0.0)


def _perpendicular(u: jax.Array) -> jax.Array:
    """A fixed unit vector orthogonal to each row of u (B,n): Gram-Schmidt of e_j, j = argmin |u_j|."""
    j = jnp.argmin(jnp.abs(u), axis=-1)
    e = jax.nn.one_hot(j, u.shape[-1], dtype=u.dtype)
    # |u_j| <= 1/sqrt(n), so e - u_j u has squared norm 1 - u_j^2 > 0 whenever n >= 2.
    p = e - jnp.take_along_axis(u, j[:, None], axis=-1) * u
    return _safe_unit(p, _safe_norm(p)[:, None])


def slerp_blend(
    h_retr: jax.Array,
    h_tgt: jax.Array,
    w: jax.Array | float,
    *,
    magnitude: str = "lerp",
    eps: float = 1e-4,
) -> jax.Array:
    """Eq. 3: sin((1-w)Ω)/sinΩ · h_retr + sin(wΩ)/sinΩ · h_tgt, per example over flattened features.

    ``w`` (scalar or (B,)) weights h_tgt: w = 1 gives h_tgt, w = 0 gives h_retr. Ω is the angle
    between the L2-normalised flattened features, computed as 2·atan2(|u_r - u_t|, |u_r + u_t|),
    which stays accurate near 0 and π where arccos loses all digits in float32.

    Magnitudes: ``'lerp'`` (default) slerps the unit vectors and rescales by the linearly
    interpolated norms (1-w)|h_retr| + w|h_tgt|. The endpoints are then exact, equal-norm inputs
    stay on their sphere, and for equal norms this is Eq. 3 itself. ``'raw'`` applies Eq. 3's
    coefficients to the raw features (the literal formula; unequal norms give a result off both
    spheres; its antiparallel case uses the 'lerp' result).

    Degenerate angles (finite values and gradients, via the double-where trick):
    Ω < eps: the slerp coefficients tend to the lerp ones (1-w, w), which are used.
    π - Ω < eps (antiparallel): every great circle through u_r and u_t = -u_r is a geodesic; we take
    the one through a fixed perpendicular direction p (Gram-Schmidt of the basis vector where
    |u_r| is smallest): cos(wπ) u_r + sin(wπ) p, which stays on the sphere and ends at u_t.
    Computed in float32, returned in h_tgt's dtype.
    """
    if magnitude not in SLERP_MAGNITUDES:
        raise ValueError(f"unknown magnitude mode {magnitude!r}; choose one of {SLERP_MAGNITUDES}")
    if h_retr.shape != h_tgt.shape:
        raise ValueError(f"h_retr {h_retr.shape} and h_tgt {h_tgt.shape} must have the same shape")
    shape, out_dtype = h_tgt.shape, h_tgt.dtype
    b = shape[0]
    a = h_retr.reshape(b, -1).astype(jnp.float32)
    t = h_tgt.reshape(b, -1).astype(jnp.float32)
    w = jnp.broadcast_to(jnp.asarray(w, jnp.float32).reshape(-1), (b,))[:, None]

    na, nt = _safe_norm(a)[:, None], _safe_norm(t)[:, None]
    ua, ut = _safe_unit(a, na), _safe_unit(t, nt)
    omega = 2.0 * jnp.arctan2(_safe_norm(ua - ut), _safe_norm(ua + ut))[:, None]

    parallel = omega < eps
    antiparallel = omega > math.pi - eps
    regular = ~(parallel | antiparallel)
    # Evaluate the slerp branch at a harmless angle where it is not selected, so that its
    # division by sin(Ω) never makes inf (whose unselected gradient would still be NaN).
    om = jnp.where(regular, omega, 0.5 * math.pi)
    sin_om = jnp.sin(om)
    # Divide rather than multiply by 1/sin(Ω): w = 1 then gives c_t = 1 exactly.
    c_r = jnp.where(regular, jnp.sin((1.0 - w) * om) / sin_om, 1.0 - w)
    c_t = jnp.where(regular, jnp.sin(w * om) / sin_om, w)

    flip = jnp.cos(w * math.pi) * ua + jnp.sin(w * math.pi) * _perpendicular(ua)
    direction = jnp.where(antiparallel, flip, c_r * ua + c_t * ut)
    out = ((1.0 - w) * na + w * nt) * direction
    if magnitude == "raw":
        out = jnp.where(antiparallel, out, c_r * a + c_t * t)
    return out.reshape(shape).astype(out_dtype)
