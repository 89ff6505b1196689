"""The Stable Diffusion 1.x/2.x UNet with an explicit encoder / H-space / decoder split.

``encode`` runs conv_in, the down blocks and the mid block and returns the mid-block output ``h``
(the paper's H-space), the skip activations and the timestep embedding; ``decode`` runs the up
blocks and the output head. ``__call__`` is their composition and equals diffusers'
``UNet2DConditionModel`` given the same weights.
"""

from __future__ import annotations

from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from imagerag_jax.models import layers

Dtype = Any
CROSS_DOWN, PLAIN_DOWN = "CrossAttnDownBlock2D", "DownBlock2D"
CROSS_UP, PLAIN_UP = "CrossAttnUpBlock2D", "UpBlock2D"


class _Block(nn.Module):
    """Fields shared by the down and up blocks: resnets, optional transformers, a resampler."""

    out_channels: int
    num_layers: int
    cross: bool
    resample: bool
    heads: int
    dim_head: int
    use_linear_projection: bool
    upcast_attention: bool
    attention_impl: str
    groups: int = 32
    eps: float = 1e-5
    dtype: Dtype = jnp.float32

    def resnet_and_attention(self, i: int, x: jax.Array, temb: jax.Array, context: jax.Array) -> jax.Array:
        """Layer i: a resnet, then the block's transformer when it has cross-attention."""
        x = layers.ResnetBlock(self.out_channels, self.groups, self.eps, dtype=self.dtype,
                               name=f"resnets_{i}")(x, temb)
        return _transformer(self, f"attentions_{i}")(x, context) if self.cross else x


class DownBlock(_Block):
    """Resnets (each followed by a transformer when ``cross``) and an optional downsampler."""

    @nn.compact
    def __call__(self, x, temb, context) -> tuple[jax.Array, list[jax.Array]]:
        skips = []
        for i in range(self.num_layers):
            x = self.resnet_and_attention(i, x, temb, context)
            skips.append(x)
        if self.resample:
            x = layers.Downsample(self.out_channels, dtype=self.dtype, name="downsamplers_0")(x)
            skips.append(x)
        return x, skips


class UpBlock(_Block):
    """Resnets over [x, skip] concatenations (each followed by a transformer) and an upsampler."""

    @nn.compact
    def __call__(self, x, skips: Sequence[jax.Array], temb, context) -> jax.Array:
        skips = list(skips)
        for i in range(self.num_layers):
            x = self.resnet_and_attention(i, jnp.concatenate([x, skips.pop()], axis=-1), temb, context)
        if self.resample:
            x = layers.Upsample(self.out_channels, dtype=self.dtype, name="upsamplers_0")(x)
        return x


class MidBlock(nn.Module):
    """Resnet, transformer, resnet at the lowest resolution; its output is the H-space."""

    out_channels: int
    heads: int
    dim_head: int
    use_linear_projection: bool
    upcast_attention: bool
    attention_impl: str
    groups: int = 32
    eps: float = 1e-5
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x, temb, context) -> jax.Array:
        x = layers.ResnetBlock(self.out_channels, self.groups, self.eps, dtype=self.dtype, name="resnets_0")(x, temb)
        x = _transformer(self, "attentions_0")(x, context)
        return layers.ResnetBlock(self.out_channels, self.groups, self.eps, dtype=self.dtype, name="resnets_1")(x, temb)


def _transformer(block: nn.Module, name: str) -> layers.Transformer2D:
    """The spatial transformer a block owns, configured from the block's fields."""
    return layers.Transformer2D(
        block.heads, block.dim_head, use_linear_projection=block.use_linear_projection,
        upcast_attention=block.upcast_attention, attention_impl=block.attention_impl,
        groups=block.groups, dtype=block.dtype, name=name,
    )


class UNet(nn.Module):
    """SD 1.x/2.x ``UNet2DConditionModel`` in NHWC.

    ``num_attention_heads`` follows diffusers: per block head counts (SD 2.x stores them in the
    misnamed ``attention_head_dim`` config field; the loader resolves that).
    """

    in_channels: int = 4
    out_channels: int = 4
    block_out_channels: Sequence[int] = (320, 640, 1280, 1280)
    down_block_types: Sequence[str] = (CROSS_DOWN, CROSS_DOWN, CROSS_DOWN, PLAIN_DOWN)
    up_block_types: Sequence[str] = (PLAIN_UP, CROSS_UP, CROSS_UP, CROSS_UP)
    layers_per_block: int = 2
    num_attention_heads: int | Sequence[int] = (5, 10, 20, 20)
    cross_attention_dim: int = 1024
    use_linear_projection: bool = True
    upcast_attention: bool = False
    flip_sin_to_cos: bool = True
    freq_shift: float = 0.0
    norm_num_groups: int = 32
    norm_eps: float = 1e-5
    prediction_type: str = "epsilon"
    attention_impl: str = "auto"
    dtype: Dtype = jnp.float32

    def setup(self) -> None:
        n = len(self.block_out_channels)
        for kind in self.down_block_types:
            if kind not in (CROSS_DOWN, PLAIN_DOWN):
                raise ValueError(f"unsupported down block type {kind!r}")
        for kind in self.up_block_types:
            if kind not in (CROSS_UP, PLAIN_UP):
                raise ValueError(f"unsupported up block type {kind!r}")
        heads = layers.per_block(self.num_attention_heads, n, "num_attention_heads")
        common = dict(
            use_linear_projection=self.use_linear_projection,
            upcast_attention=self.upcast_attention,
            attention_impl=self.attention_impl,
            groups=self.norm_num_groups,
            eps=self.norm_eps,
            dtype=self.dtype,
        )
        boc = tuple(self.block_out_channels)
        time_dim = boc[0] * 4
        self.conv_in = layers.conv(boc[0], 3, dtype=self.dtype)
        self.time_embedding = layers.TimestepEmbedding(time_dim, dtype=self.dtype)
        self.down_blocks = [
            DownBlock(
                boc[i], self.layers_per_block, self.down_block_types[i] == CROSS_DOWN,
                resample=i < n - 1, heads=heads[i], dim_head=boc[i] // heads[i], **common,
            )
            for i in range(n)
        ]
        self.mid_block = MidBlock(boc[-1], heads=heads[-1], dim_head=boc[-1] // heads[-1], **common)
        rev_boc, rev_heads = boc[::-1], heads[::-1]
        self.up_blocks = [
            UpBlock(
                rev_boc[i], self.layers_per_block + 1, self.up_block_types[i] == CROSS_UP,
                resample=i < n - 1, heads=rev_heads[i], dim_head=rev_boc[i] // rev_heads[i],
                **common,
            )
            for i in range(n)
        ]
        self.conv_norm_out = layers.group_norm(self.norm_num_groups, self.norm_eps, dtype=self.dtype)
        self.conv_out = layers.conv(self.out_channels, 3, dtype=self.dtype)

    def time_embed(self, timesteps: jax.Array, batch: int) -> jax.Array:
        """Timestep embedding for a scalar or (batch,) timestep array."""
        t = jnp.broadcast_to(jnp.asarray(timesteps, jnp.float32).reshape(-1), (batch,))
        feats = layers.timestep_embedding(
            t, self.block_out_channels[0], self.flip_sin_to_cos, self.freq_shift
        )
        return self.time_embedding(feats.astype(self.dtype))

    def _encoder(self, sample: jax.Array, timesteps: jax.Array, context: jax.Array):
        """Down and mid blocks; returns (h, skips, temb, per-stage outputs)."""
        sample = sample.astype(self.dtype)
        context = context.astype(self.dtype)
        temb = self.time_embed(timesteps, sample.shape[0])
        x = self.conv_in(sample)
        skips, stages = [x], []
        for block in self.down_blocks:
            x, block_skips = block(x, temb, context)
            skips.extend(block_skips)
            stages.append(x)
        h = self.mid_block(x, temb, context)
        stages.append(h)
        return h, tuple(skips), temb, tuple(stages)

    def encode(
        self, sample: jax.Array, timesteps: jax.Array, context: jax.Array
    ) -> tuple[jax.Array, tuple[jax.Array, ...], jax.Array]:
        """Down blocks and mid block: returns (h, skips, temb), h being the H-space features."""
        h, skips, temb, _ = self._encoder(sample, timesteps, context)
        return h, skips, temb

    def encoder_stages(
        self, sample: jax.Array, timesteps: jax.Array, context: jax.Array
    ) -> tuple[jax.Array, ...]:
        """Output of every down block (after its downsampler) and of the mid block.

        The multi-stage features the latent adversarial discriminator puts its heads on.
        """
        return self._encoder(sample, timesteps, context)[3]

    def decode(
        self, h: jax.Array, skips: Sequence[jax.Array], temb: jax.Array, context: jax.Array
    ) -> jax.Array:
        """Up blocks and output head from (possibly edited) H-space features: eps or v."""
        skips = list(skips)
        context = context.astype(self.dtype)
        x = h.astype(self.dtype)
        for block in self.up_blocks:
            n = block.num_layers
            x = block(x, skips[-n:], temb, context)
            del skips[-n:]
        x = nn.silu(self.conv_norm_out(x))
        return self.conv_out(x)

    def __call__(self, sample: jax.Array, timesteps: jax.Array, context: jax.Array) -> jax.Array:
        """Full denoiser output (epsilon or v, per ``prediction_type``)."""
        return self.decode(*self.encode(sample, timesteps, context), context)

    @property
    def h_space_channels(self) -> int:
        """Channels of the H-space features (the last block width)."""
        return self.block_out_channels[-1]
