"""Analytic FLOP counts of the towers, the adapter, the discriminator heads and the train step.

Computed from the modules' configurations (the Flax module objects themselves, never their params)
and the input shapes, so they hold on every backend, including those whose cost model misses
library calls (XLA's GPU cost analysis omits cuDNN convolutions).

What is counted: every matmul-like op, at 2 FLOPs per multiply-add (XLA's cost-analysis
convention): convolutions (``2 · H_out · W_out · k² · C_in · C_out`` per example, counted over the
padded input, which is what a GPU or TPU kernel computes), dense layers and 1x1 convolutions
(``2 · tokens · d_in · d_out``), attention's two batched products (``Q Kᵀ`` and ``P V``:
``2 · heads · N_q · N_k · d`` each; causal attention is counted in full, as XLA computes it), the
LoRA merge (``A·B`` per adapted kernel) and the spectral-norm power iterations. Not counted:
normalisations, activations, softmax, residual adds, noise draws, losses and the optimisers'
elementwise updates (together ~1-3% of XLA's count at SD 2.1 shapes). Two known differences from
XLA's cost analysis, both small at SD 2.1 shapes (tests/test_flops.py measures the total): XLA
counts that elementwise work, and it skips a padded convolution's multiply-adds on padding
(3% fewer for a 3x3 kernel on a 64x64 map, 16% on 8x8; the CPU backend's patch-matmul path of
`layers.Conv` counts them like we do).

Backward conventions (`Tally`): every op's backward is counted op by op from what the gradient
needs. An input gradient ("dgrad", as many FLOPs as the forward) where the op's input depends on
what is differentiated; a weight gradient ("wgrad", the same again) where the op's kernel is
trained. So a trained layer inside a differentiated chain costs 2x its forward, a frozen layer
that gradients flow through (the teacher encoder under the generator's loss, latent LPIPS, the
frozen decoder kernels) 1x, and a frozen part outside the gradient (the student encoder, the
retrieved branch, the teacher on real latents) 0x. Attention: ``Q Kᵀ`` costs one forward for
each of Q and K that varies, ``P V`` one for each of P and V, so self-attention in a
differentiated chain costs 2x and cross-attention to a constant text context 1x. The first op
of a chain whose input is constant (the heads' first conv in the discriminator step, the
adapter's Q/K/V projections) gets its weight gradient only.

Remat (``config.remat``, `training.step.REMAT_POLICIES`): the segments the step wraps in
``jax.checkpoint`` (the generator's LoRA merge + adapter + decoder, the teacher encoder under
the generator's loss, latent LPIPS) recompute, in the backward pass, the forward ops their policy
does not save: every op under ``full``; the convolutions under ``dots`` (convolutions with k > 1
are ``conv_general_dilated``, not dots, except on the CPU backend's patch-matmul path); the
convolutions and attention's batched products under ``dots_no_batch``; nothing under ``none``.

Also here: the bf16 dense peak of known accelerators (`PEAK_TFLOPS`, `peak_tflops`) and `mfu`.
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

from imagerag_jax.models import layers, lora
from imagerag_jax.models.latent_lpips import feature_layout

# ---------------------------------------------------------------------------------------------
# The op tally.
# ---------------------------------------------------------------------------------------------

KINDS = ("conv", "dense", "attention", "lora", "spectral_norm")


@dataclasses.dataclass(frozen=True)
class Op:
    """One matmul-like op of a module call, for the whole batch of that call.

    Attributes:
        path: the Flax param path of its kernel ('up_blocks_1/resnets_0/conv1'); for attention,
            the path of the attention module ('.../attn1') with '/qk' or '/av' appended.
        kind: 'conv' (k > 1), 'dense' (dense layers, 1x1 convs), 'attention' (a batched product),
            'lora' (a LoRA merge A·B), 'spectral_norm' (power iteration and sigma).
        forward: forward FLOPs.
        backward: backward FLOPs under the tally's gradient (see the module docstring).
        kernel: the kernel's shape (HWIO for convs, (in, out) for dense), () for attention.
        im2col: a conv the CPU backend runs as one matmul over unfolded patches (`layers.Conv`),
            i.e. a dot there (it matters only to the 'dots' remat policies on CPU).
    """

    path: str
    kind: str
    forward: int
    backward: int = 0
    kernel: tuple[int, ...] = ()
    im2col: bool = False


class Tally:
    """The ops of one or more module calls, with their backward cost under one gradient.

    Args:
        trained: kernel path -> whether that kernel gets a gradient (default: none does).
        input_grad: whether the main input of the walked module depends on what is
            differentiated (then every op downstream of it needs an input gradient).

    The walkers (`unet_encoder`, `vae_decoder`, ...) append ops in program order and track
    whether the running activation (`varies`) depends on what is differentiated.
    """

    def __init__(self, trained: Callable[[str], bool] | None = None, input_grad: bool = False):
        self.trained = trained or (lambda path: False)
        self.varies = bool(input_grad)
        self.ops: list[Op] = []

    # --- totals -----------------------------------------------------------------------------

    @property
    def forward(self) -> int:
        """Forward FLOPs of every op."""
        return sum(op.forward for op in self.ops)

    @property
    def backward(self) -> int:
        """Backward FLOPs of every op (0 when nothing varies)."""
        return sum(op.backward for op in self.ops)

    def by_kind(self) -> dict[str, int]:
        """Forward FLOPs per op kind."""
        out = dict.fromkeys(KINDS, 0)
        for op in self.ops:
            out[op.kind] += op.forward
        return out

    # --- ops ----------------------------------------------------------------------------------

    def weight_op(self, path: str, kind: str, flops: int, kernel: tuple[int, ...], *,
                  x_varies: bool | None = None, im2col: bool = False) -> bool:
        """An op `y = x · W`; returns whether y varies.

        ``x_varies=None``: x is the running activation, and y becomes it; otherwise x is a side
        input (text context, timestep embedding, retrieved features) with that variability and
        the running activation is left alone.
        """
        on_stream = x_varies is None
        xv = self.varies if on_stream else bool(x_varies)
        wt = bool(self.trained(path))
        self.ops.append(Op(path, kind, int(flops), int(flops) * (int(xv) + int(wt)), kernel, im2col))
        out = xv or wt
        if on_stream:
            self.varies = out
        return out

    def conv(self, path: str, batch: int, in_hw: tuple[int, int], k: int, cin: int, cout: int, *,
             stride: int = 1, padding: tuple[tuple[int, int], tuple[int, int]] | None = None,
             x_varies: bool | None = None, port: bool = True) -> tuple[int, int]:
        """A k x k convolution of a (batch, *in_hw, cin) map; returns the output's (h, w).

        ``padding`` defaults to 'same' ((k-1)//2 each side); ``port``: a `layers.Conv` (whose CPU
        path is a patch matmul for small maps), else a plain ``flax.linen.Conv``.
        """
        if padding is None:
            padding = (((k - 1) // 2,) * 2,) * 2
        h, w = in_hw
        oh = (h + sum(padding[0]) - k) // stride + 1
        ow = (w + sum(padding[1]) - k) // stride + 1
        flops = 2 * batch * oh * ow * k * k * cin * cout
        kind = "dense" if k == 1 else "conv"
        im2col = (port and k > 1 and stride == 1 and h * w <= layers.IM2COL_MAX_PIXELS
                  and cin >= layers.IM2COL_MIN_CHANNELS)
        self.weight_op(path, kind, flops, (k, k, cin, cout), x_varies=x_varies, im2col=im2col)
        return oh, ow

    def dense(self, path: str, rows: int, din: int, dout: int, *, x_varies: bool | None = None) -> bool:
        """A dense layer on `rows` vectors (batch x tokens); returns whether its output varies."""
        return self.weight_op(path, "dense", 2 * rows * din * dout, (din, dout), x_varies=x_varies)

    def attention(self, path: str, batch: int, heads: int, nq: int, nk: int, dim: int, *,
                  q: bool, k: bool, v: bool, dim_v: int | None = None) -> bool:
        """softmax(Q Kᵀ) V over `heads` heads; q, k, v: whether each varies; returns whether the output does."""
        qk = 2 * batch * heads * nq * nk * dim
        av = 2 * batch * heads * nq * nk * (dim_v or dim)
        p = q or k
        self.ops.append(Op(f"{path}/qk", "attention", qk, qk * (int(q) + int(k))))
        self.ops.append(Op(f"{path}/av", "attention", av, av * (int(p) + int(v))))
        return p or v


# ---------------------------------------------------------------------------------------------
# Shared blocks (layers.py).
# ---------------------------------------------------------------------------------------------


def _resnet(g: Tally, path: str, batch: int, hw: tuple[int, int], cin: int, cout: int,
            temb_dim: int | None) -> None:
    """`layers.ResnetBlock`: conv1, optional time_emb_proj, conv2, 1x1 shortcut when cin != cout."""
    v_in = g.varies
    g.conv(f"{path}/conv1", batch, hw, 3, cin, cout)
    if temb_dim:
        # The timestep embedding is a constant of the step (frozen encoder, integer timesteps).
        g.varies = g.dense(f"{path}/time_emb_proj", batch, temb_dim, cout, x_varies=False) or g.varies
    g.conv(f"{path}/conv2", batch, hw, 3, cout, cout)
    shortcut = v_in
    if cin != cout:
        before = g.varies
        g.varies = v_in
        g.conv(f"{path}/conv_shortcut", batch, hw, 1, cin, cout)
        shortcut, g.varies = g.varies, before
    g.varies = g.varies or shortcut


def _attention_block(g: Tally, path: str, rows: int, batch: int, heads: int, dim_head: int, width: int,
                     out_features: int, *, context: tuple[int, int] | None = None) -> None:
    """`layers.Attention` + its residual: self-attention, or cross-attention to a constant context (L, D)."""
    v_in = g.varies
    inner = heads * dim_head
    q = g.dense(f"{path}/to_q", rows, width, inner, x_varies=v_in)
    if context is None:
        nk, kv_rows, kv_dim, kv_var = rows // batch, rows, width, v_in
    else:
        nk, kv_dim = context
        kv_rows, kv_var = batch * nk, False
    k = g.dense(f"{path}/to_k", kv_rows, kv_dim, inner, x_varies=kv_var)
    v = g.dense(f"{path}/to_v", kv_rows, kv_dim, inner, x_varies=kv_var)
    g.varies = g.attention(path, batch, heads, rows // batch, nk, dim_head, q=q, k=k, v=v)
    g.dense(f"{path}/to_out_0", rows, inner, out_features)
    g.varies = g.varies or v_in


def _transformer(g: Tally, path: str, batch: int, hw: tuple[int, int], channels: int, heads: int,
                 dim_head: int, context: tuple[int, int], linear_projection: bool) -> None:
    """`layers.Transformer2D` (depth 1): proj_in, self-attn, cross-attn, GEGLU feed-forward, proj_out."""
    v_in = g.varies
    rows = batch * hw[0] * hw[1]
    inner = heads * dim_head
    if linear_projection:
        g.dense(f"{path}/proj_in", rows, channels, inner)
    else:
        g.conv(f"{path}/proj_in", batch, hw, 1, channels, inner)
    block = f"{path}/transformer_blocks_0"
    _attention_block(g, f"{block}/attn1", rows, batch, heads, dim_head, inner, inner)
    _attention_block(g, f"{block}/attn2", rows, batch, heads, dim_head, inner, inner, context=context)
    v_ff = g.varies
    g.dense(f"{block}/ff/net_0/proj", rows, inner, 2 * 4 * inner)
    g.dense(f"{block}/ff/net_2", rows, 4 * inner, inner)
    g.varies = g.varies or v_ff
    if linear_projection:
        g.dense(f"{path}/proj_out", rows, inner, channels)
    else:
        g.conv(f"{path}/proj_out", batch, hw, 1, inner, channels)
    g.varies = g.varies or v_in


# ---------------------------------------------------------------------------------------------
# UNet (models/unet.py).
# ---------------------------------------------------------------------------------------------


def _unet_heads(unet: Any) -> tuple[int, ...]:
    """Per-block head counts of a UNet config."""
    return layers.per_block(unet.num_attention_heads, len(unet.block_out_channels), "num_attention_heads")


def _walk_unet_encoder(g: Tally, unet: Any, batch: int, latent_hw: tuple[int, int],
                       context_len: int) -> tuple[list[tuple[int, tuple[int, int]]], tuple[int, int]]:
    """conv_in, time embedding, down blocks, mid block; returns (skips [(channels, hw)], h-space hw)."""
    boc, heads = tuple(unet.block_out_channels), _unet_heads(unet)
    n, ctx = len(boc), (context_len, int(unet.cross_attention_dim))
    temb_dim = boc[0] * 4
    g.dense("time_embedding/linear_1", batch, boc[0], temb_dim, x_varies=False)
    g.dense("time_embedding/linear_2", batch, temb_dim, temb_dim, x_varies=False)
    hw = tuple(latent_hw)
    g.conv("conv_in", batch, hw, 3, int(unet.in_channels), boc[0])
    skips, ch = [(boc[0], hw)], boc[0]
    for i in range(n):
        p = f"down_blocks_{i}"
        for j in range(unet.layers_per_block):
            _resnet(g, f"{p}/resnets_{j}", batch, hw, ch, boc[i], temb_dim)
            ch = boc[i]
            if unet.down_block_types[i] == "CrossAttnDownBlock2D":
                _transformer(g, f"{p}/attentions_{j}", batch, hw, ch, heads[i], boc[i] // heads[i], ctx,
                             unet.use_linear_projection)
            skips.append((ch, hw))
        if i < n - 1:
            hw = g.conv(f"{p}/downsamplers_0/conv", batch, hw, 3, ch, ch, stride=2, padding=((1, 1), (1, 1)))
            skips.append((ch, hw))
    _resnet(g, "mid_block/resnets_0", batch, hw, ch, ch, temb_dim)
    _transformer(g, "mid_block/attentions_0", batch, hw, ch, heads[-1], ch // heads[-1], ctx,
                 unet.use_linear_projection)
    _resnet(g, "mid_block/resnets_1", batch, hw, ch, ch, temb_dim)
    return skips, hw


def unet_encoder(unet: Any, batch: int, latent_hw: tuple[int, int], context_len: int = 77,
                 g: Tally | None = None) -> Tally:
    """`UNet.encode` (conv_in, time embedding, down blocks, mid block = the H-space).

    Args:
        unet: a `models.unet.UNet` (only its configuration fields are read).
        batch: examples in the call.
        latent_hw: the latent's (height, width), e.g. (64, 64) at 512 px.
        context_len: text tokens (77).
        g: the tally to add to (default: a fresh one, forward only).
    """
    g = Tally() if g is None else g
    _walk_unet_encoder(g, unet, batch, latent_hw, context_len)
    return g


def unet_decoder(unet: Any, batch: int, latent_hw: tuple[int, int], context_len: int = 77,
                 g: Tally | None = None) -> Tally:
    """`UNet.decode` (up blocks over the skips, conv_out) from the H-space; args as `unet_encoder`."""
    g = Tally() if g is None else g
    skips, hw = _walk_unet_encoder(Tally(), unet, batch, latent_hw, context_len)
    boc, heads = tuple(unet.block_out_channels), _unet_heads(unet)
    n, ctx, temb_dim = len(boc), (context_len, int(unet.cross_attention_dim)), boc[0] * 4
    rev, rev_heads, ch = boc[::-1], heads[::-1], boc[-1]
    for i in range(n):
        p = f"up_blocks_{i}"
        for j in range(unet.layers_per_block + 1):
            skip_ch, _ = skips.pop()
            _resnet(g, f"{p}/resnets_{j}", batch, hw, ch + skip_ch, rev[i], temb_dim)
            ch = rev[i]
            if unet.up_block_types[i] == "CrossAttnUpBlock2D":
                _transformer(g, f"{p}/attentions_{j}", batch, hw, ch, rev_heads[i], rev[i] // rev_heads[i],
                             ctx, unet.use_linear_projection)
        if i < n - 1:
            hw = (2 * hw[0], 2 * hw[1])
            g.conv(f"{p}/upsamplers_0/conv", batch, hw, 3, ch, ch)
    g.conv("conv_out", batch, hw, 3, ch, int(unet.out_channels))
    return g


def unet_forward(unet: Any, batch: int, latent_hw: tuple[int, int], context_len: int = 77,
                 g: Tally | None = None) -> Tally:
    """The full UNet call (encoder + decoder); args as `unet_encoder`."""
    g = unet_encoder(unet, batch, latent_hw, context_len, g)
    return unet_decoder(unet, batch, latent_hw, context_len, g)


def unet_hspace_hw(unet: Any, latent_hw: tuple[int, int]) -> tuple[int, int]:
    """The H-space's (height, width) for a latent size (8x8 at 64x64 for SD)."""
    return _walk_unet_encoder(Tally(), unet, 1, latent_hw, 1)[1]


def unet_encoder_stage_shapes(unet: Any, latent_hw: tuple[int, int]) -> list[tuple[int, int, int]]:
    """(h, w, channels) of `UNet.encoder_stages`: every down block's output and the mid block's."""
    boc, hw, out = tuple(unet.block_out_channels), tuple(latent_hw), []
    for i in range(len(boc)):
        if i < len(boc) - 1:
            hw = ((hw[0] + 2 - 3) // 2 + 1, (hw[1] + 2 - 3) // 2 + 1)
        out.append((*hw, boc[i]))
    return out + [(*hw, boc[-1])]


# ---------------------------------------------------------------------------------------------
# VAE (models/vae.py) and text encoder (models/clip_text.py).
# ---------------------------------------------------------------------------------------------


def _vae_mid(g: Tally, path: str, batch: int, hw: tuple[int, int], ch: int, attention: bool) -> None:
    """The VAE mid block: resnet, one-head self-attention over the pixels, resnet."""
    _resnet(g, f"{path}/resnets_0", batch, hw, ch, ch, None)
    if attention:
        _attention_block(g, f"{path}/attentions_0", batch * hw[0] * hw[1], batch, 1, ch, ch, ch)
    _resnet(g, f"{path}/resnets_1", batch, hw, ch, ch, None)


def vae_encoder(vae: Any, batch: int, image_hw: tuple[int, int], g: Tally | None = None) -> Tally:
    """`AutoencoderKL.encode` of (batch, *image_hw, 3) images (encoder + quant_conv)."""
    g = Tally() if g is None else g
    chans, hw = tuple(vae.block_out_channels), tuple(image_hw)
    g.conv("encoder/conv_in", batch, hw, 3, int(vae.in_channels), chans[0])
    ch = chans[0]
    for i, out in enumerate(chans):
        for j in range(vae.layers_per_block):
            _resnet(g, f"encoder/down_blocks_{i}/resnets_{j}", batch, hw, ch, out, None)
            ch = out
        if i < len(chans) - 1:
            hw = g.conv(f"encoder/down_blocks_{i}/downsamplers_0/conv", batch, hw, 3, ch, ch, stride=2,
                        padding=((0, 1), (0, 1)))
    _vae_mid(g, "encoder/mid_block", batch, hw, ch, vae.mid_block_add_attention)
    g.conv("encoder/conv_out", batch, hw, 3, ch, 2 * int(vae.latent_channels))
    if vae.use_quant_conv:
        g.conv("quant_conv", batch, hw, 1, 2 * int(vae.latent_channels), 2 * int(vae.latent_channels))
    return g


def vae_decoder(vae: Any, batch: int, latent_hw: tuple[int, int], g: Tally | None = None) -> Tally:
    """`AutoencoderKL.decode` of (batch, *latent_hw, latent_channels) latents (post_quant_conv + decoder)."""
    g = Tally() if g is None else g
    chans, hw, lat = tuple(reversed(vae.block_out_channels)), tuple(latent_hw), int(vae.latent_channels)
    if vae.use_post_quant_conv:
        g.conv("post_quant_conv", batch, hw, 1, lat, lat)
    g.conv("decoder/conv_in", batch, hw, 3, lat, chans[0])
    _vae_mid(g, "decoder/mid_block", batch, hw, chans[0], vae.mid_block_add_attention)
    ch = chans[0]
    for i, out in enumerate(chans):
        for j in range(vae.layers_per_block + 1):
            _resnet(g, f"decoder/up_blocks_{i}/resnets_{j}", batch, hw, ch, out, None)
            ch = out
        if i < len(chans) - 1:
            hw = (2 * hw[0], 2 * hw[1])
            g.conv(f"decoder/up_blocks_{i}/upsamplers_0/conv", batch, hw, 3, ch, ch)
    g.conv("decoder/conv_out", batch, hw, 3, ch, int(vae.out_channels))
    return g


def clip_text(text: Any, batch: int, seq_len: int = 77, g: Tally | None = None) -> Tally:
    """`CLIPTextTransformer` on (batch, seq_len) ids (the embedding lookups cost no FLOPs)."""
    g = Tally() if g is None else g
    d, heads, inter = int(text.hidden_size), int(text.num_attention_heads), int(text.intermediate_size)
    rows = batch * seq_len
    for i in range(text.num_hidden_layers):
        p = f"encoder/layers_{i}"
        v_in = g.varies
        q = g.dense(f"{p}/self_attn/q_proj", rows, d, d, x_varies=v_in)
        k = g.dense(f"{p}/self_attn/k_proj", rows, d, d, x_varies=v_in)
        v = g.dense(f"{p}/self_attn/v_proj", rows, d, d, x_varies=v_in)
        g.varies = g.attention(f"{p}/self_attn", batch, heads, seq_len, seq_len, d // heads, q=q, k=k, v=v)
        g.dense(f"{p}/self_attn/out_proj", rows, d, d)
        g.varies = v_mid = g.varies or v_in
        g.dense(f"{p}/mlp/fc1", rows, d, inter)
        g.dense(f"{p}/mlp/fc2", rows, inter, d)
        g.varies = g.varies or v_mid
    return g


# ---------------------------------------------------------------------------------------------
# Trainable modules: adapter, discriminator heads; latent LPIPS; LoRA merge.
# ---------------------------------------------------------------------------------------------


def adapter(module: Any, batch: int, hspace: tuple[int, int, int], k: int, g: Tally | None = None) -> Tally:
    """`HSpaceAdapter` of (batch, h, w, C) target tokens attending to k neighbours' (h, w, C) maps
    (its ``block='transformer'``: SD's spatial transformer with the neighbours as its context).

    The target side follows the tally's running activation; the neighbours' H-space is a
    constant (the frozen retrieved branch, or the cache).
    """
    g = Tally() if g is None else g
    hh, ww, c = hspace
    heads = int(module.num_heads)
    dim = int(module.head_dim) if module.head_dim else c // heads
    inner, nq, nk = heads * dim, hh * ww, k * hh * ww
    if getattr(module, "block", "attention") == "transformer":
        _transformer(g, "transformer", batch, (hh, ww), c, heads, dim, (nk, c), linear_projection=True)
        return g
    q = g.dense("to_q", batch * nq, c, inner)
    kv = g.dense("to_k", batch * nk, c, inner, x_varies=False)
    v = g.dense("to_v", batch * nk, c, inner, x_varies=False)
    g.varies = g.attention("attention", batch, heads, nq, nk, dim, q=q, k=kv, v=v)
    g.dense("to_out", batch * nq, inner, c)
    return g


def discriminator_heads(heads: Any, batch: int, stages: Sequence[tuple[int, int, int]], pooled_dim: int,
                        g: Tally | None = None) -> Tally:
    """`DiscriminatorHeads` on the teacher-encoder stages [(h, w, C), ...] of `batch` examples.

    The stages follow the tally's running activation (each head's chain starts from it); the
    timestep and pooled-text condition is a constant input. Counts the spectral-norm power
    iterations (per call, not per example) and, where the kernels are trained, the gradient
    through sigma.
    """
    g = Tally() if g is None else g
    stage_varies = g.varies
    cond = g.dense("cond_mlp_0", batch, int(heads.time_dim) + int(pooled_dim), int(heads.cond_dim),
                   x_varies=False)
    cond = g.dense("cond_mlp_1", batch, int(heads.cond_dim), int(heads.cond_dim), x_varies=cond)
    hidden, steps = int(heads.hidden), int(heads.power_iterations)
    for s, (h, w, c) in enumerate(stages):
        g.varies = stage_varies
        cin = c
        for j in range(heads.num_convs):
            path = f"head_{s}/conv_{j}"
            kk = 9 * cin
            # u Wᵀ and v W per power iteration, then sigma = v W uᵀ; its gradient (trained
            # kernels only) is one outer product v ⊗ u.
            sn = 2 * kk * hidden * (2 * steps + 1)
            trained = g.trained(path)
            g.ops.append(Op(f"{path}/spectral_norm", "spectral_norm", sn,
                            2 * kk * hidden if trained else 0, (kk, hidden)))
            g.conv(path, batch, (h, w), 3, cin, hidden, port=False)
            cin = hidden
        phi = g.varies
        g.dense(f"head_{s}/out", batch, hidden, 1, x_varies=phi)
        g.dense(f"head_{s}/embed", batch, int(heads.cond_dim), hidden, x_varies=cond)
    return g


def latent_lpips(module: Any, batch: int, latent: tuple[int, int, int], g: Tally | None = None) -> Tally:
    """`LatentLPIPS` of `batch` pairs: one VGG pass over the 2·batch concatenated latents + the heads."""
    g = Tally() if g is None else g
    hw, cin, n = (latent[0], latent[1]), latent[2], 2 * batch
    stage_pixels = []
    for width, pairs, pool in zip(module.widths, feature_layout(module.convs_per_stage), module.pools):
        for conv_i, _ in pairs:
            g.conv(f"features_{conv_i}", n, hw, 3, cin, width, port=False)
            cin = width
        if pool:
            hw = (hw[0] // 2, hw[1] // 2)
        stage_pixels.append(hw[0] * hw[1])
    for k, (width, pixels) in enumerate(zip(module.widths, stage_pixels)):
        # Squared feature differences (batch, h, w, C) @ lin_k (C,).
        g.weight_op(f"lin{k}", "dense", 2 * batch * pixels * width, (width,), x_varies=g.varies)
    return g


def lora_merge(kernels: Iterable[tuple[str, tuple[int, ...]]], rank: int, trained: bool = True) -> Tally:
    """W + (alpha/rank)·A·B for each (path, kernel shape): 2·prod(shape[:-1])·rank·out FLOPs each.

    Per call of the generator (so per micro-batch, not per example). Backward (trained A, B):
    dA = dW·Bᵀ and dB = Aᵀ·dW, twice the forward; dW itself is the adapted layer's weight gradient.
    """
    g = Tally()
    for path, shape in kernels:
        flops = 2 * math.prod(shape[:-1]) * rank * shape[-1]
        g.ops.append(Op(f"{path}/lora", "lora", flops, 2 * flops if trained else 0, shape))
    return g


# ---------------------------------------------------------------------------------------------
# The train step (training/step.py).
# ---------------------------------------------------------------------------------------------

REMAT_SAVED = {
    # Op kinds whose outputs a policy saves (so the backward pass need not recompute them).
    "none": None,  # no remat segments at all
    "full": frozenset(),
    "dots": frozenset({"dense", "attention", "lora", "spectral_norm"}),
    "dots_no_batch": frozenset({"dense", "lora", "spectral_norm"}),
}


def remat_recompute(ops: Iterable[Op], policy: str, backend: str = "gpu") -> int:
    """Forward FLOPs a remat policy recomputes in the backward pass of a segment holding `ops`.

    On the CPU backend small-map convolutions are patch matmuls (dots), which the 'dots'
    policies save.
    """
    if policy not in REMAT_SAVED:
        raise ValueError(f"unknown remat policy {policy!r}; expected one of {sorted(REMAT_SAVED)}")
    saved = REMAT_SAVED[policy]
    if saved is None:
        return 0
    total = 0
    for op in ops:
        kind = "dense" if (op.im2col and backend == "cpu") else op.kind
        if kind not in saved:
            total += op.forward
    return total


@dataclasses.dataclass(frozen=True)
class StepFlops:
    """FLOPs of one train step at a (micro-)batch, by phase.

    ``phases`` maps a phase name to its FLOPs for the whole batch; `per_example` divides the
    total by the batch (the LoRA merge and the spectral-norm iterations are per call, so they
    shrink per example as the batch grows).
    """

    batch: int
    phases: Mapping[str, int]
    remat: str

    @property
    def total(self) -> int:
        """FLOPs of the step (its batch)."""
        return sum(self.phases.values())

    @property
    def per_example(self) -> float:
        """FLOPs per example."""
        return self.total / self.batch

    def table(self) -> str:
        """A text table: phase, GFLOP per example, share of the step."""
        rows = [f"{'phase':<34} {'GFLOP/example':>14} {'share':>7}"]
        for name, value in self.phases.items():
            rows.append(f"{name:<34} {value / self.batch / 1e9:>14.2f} {value / self.total:>7.1%}")
        rows.append(f"{'total':<34} {self.per_example / 1e9:>14.2f} {1:>7.1%}")
        return "\n".join(rows)


def lora_trained(pattern: str | None) -> Callable[[str], bool]:
    """Kernel path -> whether the LoRA regex (`lora.select_paths`'; None: the decoder default) adapts it."""
    regex = re.compile(pattern or lora.DEFAULT_DECODER_PATTERN)
    return lambda path: bool(regex.search(f"{path}/kernel"))


def train_step_flops(student: Any, teacher: Any, adapter_module: Any, heads: Any, *,
                     latent_shape: Sequence[int], context_len: int, pooled_dim: int, k: int,
                     batch: int = 1, lora_pattern: str | None = None, lora_rank: int = 64,
                     lpips: Any = None, remat: str = "none", backend: str = "gpu",
                     retrieved_branch: bool = True) -> StepFlops:
    """FLOPs of `training.step.make_train_step`'s step, by phase, at a (micro-)batch of `batch`.

    Args:
        student, teacher: the student and teacher `UNet`s (`StepSetup.student` / `.teacher`).
        adapter_module: the `HSpaceAdapter` (None: the 'no_adapter' training arm, which runs
            neither the adapter nor the retrieved branch); heads: the `DiscriminatorHeads`.
        latent_shape: (h, w, C) of a latent; context_len: text tokens; pooled_dim: the pooled
            text embedding's width; k: retrieved neighbours per example.
        batch: examples per step on a device (the micro-batch under gradient accumulation).
        lora_pattern: the LoRA regex (None or '': the decoder default); lora_rank: its rank.
        lpips: the `LatentLPIPS` module when the step uses it (weights given and beta > 0), else None.
        remat: the remat policy (`config.remat`); backend: `jax.default_backend()` (matters for
            the 'dots' policies only).
        retrieved_branch: the step encodes the neighbours (False: their H-space comes in the
            batch, from the H-space cache, and costs the step nothing).

    Phases: the student encoder on x_t and the retrieved branch (the same frozen encoder at t = 0
    on the k neighbours), forward only; the generator's forward (LoRA merge, adapter, decoder,
    the teacher encoder and the heads on the noised fake, latent LPIPS on (fake, target)) and its
    backward (LoRA'd decoder kernels and the adapter trained: 2x; the frozen decoder kernels, the
    teacher encoder, the heads and LPIPS that the gradient flows through: input gradients, 1x;
    self-attention 2x); remat's recomputed forward of its segments; the discriminator step (the
    teacher encoder on the noised real latents, forward only, the fake stages reused; the heads on
    real and fake together, 2·batch, trained: weight gradients everywhere, input gradients
    after the first conv).
    """
    hw = (int(latent_shape[0]), int(latent_shape[1]))
    b = int(batch)
    ctx = int(context_len)
    phases: dict[str, int] = {}
    phases["student_encoder"] = unet_encoder(student, b, hw, ctx).forward
    encodes_neighbours = adapter_module is not None and retrieved_branch
    phases["retrieved_branch"] = unet_encoder(student, b * k, hw, ctx).forward if encodes_neighbours else 0

    # Generator: LoRA-merged decoder from the edited H-space (constant h, skips, temb, context).
    lora_fn = lora_trained(lora_pattern)
    dec = unet_decoder(student, b, hw, ctx, Tally(trained=lora_fn, input_grad=True))
    merge = lora_merge(((op.path, op.kernel) for op in dec.ops
                        if op.kind in ("conv", "dense") and lora_fn(op.path)), lora_rank)
    hh, ww = unet_hspace_hw(student, hw)
    ad = Tally() if adapter_module is None else adapter(
        adapter_module, b, (hh, ww, int(student.block_out_channels[-1])), k,
        Tally(trained=lambda p: True, input_grad=False))
    # The decoder's input is the adapter's edit: it varies (dec was walked with input_grad=True).
    stages = unet_encoder_stage_shapes(teacher, hw)
    t_fake = unet_encoder(teacher, b, hw, ctx, Tally(input_grad=True))
    h_gen = discriminator_heads(heads, b, stages, pooled_dim, Tally(input_grad=True))
    lp = latent_lpips(lpips, b, tuple(latent_shape), Tally(input_grad=True)) if lpips is not None else None

    phases["lora_merge"] = merge.forward
    phases["adapter_forward"] = ad.forward
    phases["decoder_forward"] = dec.forward
    phases["teacher_encoder_fake_forward"] = t_fake.forward
    phases["heads_generator_forward"] = h_gen.forward
    if lp is not None:
        phases["latent_lpips_forward"] = lp.forward
    phases["decoder_backward"] = dec.backward
    phases["adapter_backward"] = ad.backward
    phases["lora_merge_backward"] = merge.backward
    phases["teacher_encoder_fake_backward"] = t_fake.backward
    phases["heads_generator_backward"] = h_gen.backward
    if lp is not None:
        phases["latent_lpips_backward"] = lp.backward
    segments = [*merge.ops, *ad.ops, *dec.ops, *t_fake.ops, *(lp.ops if lp is not None else ())]
    phases["remat_recompute"] = remat_recompute(segments, remat, backend)

    # Discriminator: the teacher on the noised real latents (outside any gradient), then the
    # heads on real and fake stages (2·batch rows, constants) with trained kernels.
    phases["teacher_encoder_real_forward"] = unet_encoder(teacher, b, hw, ctx).forward
    h_disc = discriminator_heads(heads, 2 * b, stages, pooled_dim, Tally(trained=lambda p: True))
    phases["heads_discriminator_forward"] = h_disc.forward
    phases["heads_discriminator_backward"] = h_disc.backward
    return StepFlops(batch=b, phases=phases, remat=remat)


def train_step_flops_from_setup(setup: Any, shapes: Any, *, batch: int, lora_pattern: str | None,
                                remat: str, backend: str = "gpu", arm: str = "retrieved") -> StepFlops:
    """`train_step_flops` of a `training.step.StepSetup` and a data schema.

    Args:
        setup: the step's `StepSetup` (student, teacher, adapter, heads, lpips, beta, lora_rank).
        shapes: a data schema (`latent_shape`, `embed_shape`, `pooled_dim`, `k`): the trainer's.
        batch: examples per device per (micro-)batch.
        lora_pattern: the LoRA regex the trainer uses (`Trainer.lora_pattern`).
        remat: the remat policy; backend: `jax.default_backend()`.
        arm: the training arm (`training.step.ARMS`); 'no_adapter' counts no adapter and no
            retrieved branch.

    A schema whose batches carry the neighbours' H-space (`hspace_shape` set) has no retrieved
    branch in the step.
    """
    # The step uses latent LPIPS only when it is loaded and beta > 0 (training/step.py).
    lp = setup.lpips if setup.lpips is not None and float(setup.beta) > 0 else None
    return train_step_flops(setup.student, setup.teacher, None if arm == "no_adapter" else setup.adapter,
                            setup.heads,
                            latent_shape=tuple(shapes.latent_shape), context_len=int(shapes.embed_shape[0]),
                            pooled_dim=int(shapes.pooled_dim), k=int(shapes.k), batch=batch,
                            lora_pattern=lora_pattern, lora_rank=int(setup.lora_rank), lpips=lp,
                            remat=remat, backend=backend,
                            retrieved_branch=getattr(shapes, "hspace_shape", None) is None)


# ---------------------------------------------------------------------------------------------
# Peaks and MFU.
# ---------------------------------------------------------------------------------------------

# Dense (no 2:4 sparsity) bf16 peak per chip, TFLOP/s. NVIDIA datasheets give bf16 Tensor Core
# figures "with sparsity", twice the dense peak: H100 SXM 1,979 and H100 PCIe 1,513
# (https://www.nvidia.com/en-us/data-center/h100/), H200 1,979 (same GH100 compute,
# https://www.nvidia.com/en-us/data-center/h200/), A100 312 dense / 624 sparse
# (https://www.nvidia.com/content/dam/en-zz/Solutions/Data-Center/a100/pdf/nvidia-a100-datasheet-us-nvidia-1758950-r4-web.pdf).
# Google Cloud TPU pages, "peak compute per chip (bf16)": v4 275
# (https://cloud.google.com/tpu/docs/v4), v5e 197 (https://cloud.google.com/tpu/docs/v5e), v5p 459
# (https://cloud.google.com/tpu/docs/v5p), v6e 918 (https://cloud.google.com/tpu/docs/v6e).
PEAK_TFLOPS: dict[str, float] = {
    "H100 SXM": 989.0,
    "H100 PCIe": 756.0,
    "H200": 989.0,
    "A100": 312.0,
    "TPU v4": 275.0,
    "TPU v5e": 197.0,
    "TPU v5p": 459.0,
    "TPU v6e": 918.0,
}
# jax's device_kind strings -> PEAK_TFLOPS keys, first match wins ('NVIDIA H100 80GB HBM3',
# 'NVIDIA H100 PCIe', 'NVIDIA A100-SXM4-80GB', 'TPU v5 lite', 'TPU v5', 'TPU v6 lite', ...).
# H100 NVL and other variants not listed give None rather than a wrong peak.
_DEVICE_KIND_PATTERNS: tuple[tuple[str, str | None], ...] = (
    (r"H100.*NVL", None),
    (r"H100.*PCIe", "H100 PCIe"),
    (r"H100", "H100 SXM"),
    (r"H200", "H200"),
    (r"A100", "A100"),
    (r"^TPU v4", "TPU v4"),
    (r"^TPU v5 ?(lite|e)\b", "TPU v5e"),
    (r"^TPU v5(p)?$", "TPU v5p"),
    (r"^TPU v6 ?(lite|e)\b", "TPU v6e"),
)


def peak_tflops(device_kind: str | None = None) -> float | None:
    """The bf16 dense peak (TFLOP/s per chip) of a device kind, or None when unknown (e.g. CPU).

    Args:
        device_kind: a ``jax.Device.device_kind``; None: that of ``jax.devices()[0]``.
    """
    if device_kind is None:
        import jax  # deferred: the counting functions need no backend

        device_kind = jax.devices()[0].device_kind
    for pattern, key in _DEVICE_KIND_PATTERNS:
        if re.search(pattern, device_kind.strip(), re.IGNORECASE):
            return None if key is None else PEAK_TFLOPS[key]
    return None


def mfu(flops_per_example: float, examples_per_s_per_device: float, peak_tflops: float) -> float:
    """Model FLOPs utilisation: achieved FLOP/s per device over its peak (a fraction, not %)."""
    if peak_tflops <= 0:
        raise ValueError(f"peak_tflops must be > 0, got {peak_tflops}")
    return flops_per_example * examples_per_s_per_device / (peak_tflops * 1e12)
