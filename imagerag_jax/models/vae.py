"""The Stable Diffusion KL autoencoder (diffusers ``AutoencoderKL``) in Flax Linen, NHWC.

``encode`` maps an image in [-1, 1] to the mean and clipped log-variance of the latent Gaussian;
``decode`` maps an *unscaled* latent back to an image. ``to_latent_space``/``from_latent_space``
are the one definition of the UNets' latent space, ``(z - shift_factor) * scaling_factor``
(0.18215 and 0 for SD 2.x), and ``encode_latents``/``decode_latents`` the image <-> latent paths
built on them; every sampler, job and report goes through these.
Submodule names mirror the diffusers state-dict keys (``encoder/down_blocks_0/resnets_1``,
``decoder/up_blocks_0/upsamplers_0/conv``, ``encoder/mid_block/attentions_0/to_q``) so weight
conversion is a mechanical rename (``weights/convert.py``).
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from imagerag_jax.models import layers

Dtype = Any
DOWN_BLOCK, UP_BLOCK = "DownEncoderBlock2D", "UpDecoderBlock2D"
# diffusers' DiagonalGaussianDistribution clamps the log-variance to this range.
LOGVAR_MIN, LOGVAR_MAX = -30.0, 20.0
# Both towers hard-code this epsilon for every norm (resnets, mid attention, conv_norm_out).
VAE_EPS = 1e-6
# Config fields that must keep these values: other values change the architecture or the
# latent convention in ways this port does not implement.
UNSUPPORTED = {"act_fn": "silu", "latents_mean": None, "latents_std": None}


class SpatialSelfAttention(layers.Attention):
    """The VAE mid-block attention: GroupNorm, attention over all pixels, then the residual.

    A subclass (not a wrapper) so that ``group_norm`` and ``to_q``... sit side by side under
    ``attentions_0``, as in the diffusers state dict.
    """

    groups: int = 32
    eps: float = VAE_EPS

    @nn.compact
    def __call__(self, x: jax.Array, context: jax.Array | None = None) -> jax.Array:
        """Self-attention over the pixels of NHWC ``x`` (``context`` kept for the base signature)."""
        if context is not None:
            raise ValueError("the VAE attention is self-attention only")
        b, h, w, c = x.shape
        normed = layers.group_norm(self.groups, self.eps, "group_norm", self.dtype)(x)
        out = super().__call__(normed.reshape(b, h * w, c))
        return x + out.reshape(b, h, w, c).astype(x.dtype)


class MidBlock(nn.Module):
    """Resnet, optional single-head self-attention, resnet (diffusers ``UNetMidBlock2D``)."""

    channels: int
    groups: int
    add_attention: bool = True
    attention_impl: str = "auto"
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        x = _resnet(self, self.channels, "resnets_0")(x)
        if self.add_attention:
            # One head as wide as the block (attention_head_dim = channels); softmax in fp32
            # because diffusers sets upcast_softmax for this block.
            x = SpatialSelfAttention(
                heads=1, dim_head=self.channels, qkv_bias=True, upcast=True,
                implementation=self.attention_impl, groups=self.groups, dtype=self.dtype,
                name="attentions_0",
            )(x)
        return _resnet(self, self.channels, "resnets_1")(x)


class DownEncoderBlock(nn.Module):
    """Resnets without timestep input, then a stride-2 conv with (0,1,0,1) padding."""

    out_channels: int
    num_layers: int
    groups: int
    add_downsample: bool
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        for i in range(self.num_layers):
            x = _resnet(self, self.out_channels, f"resnets_{i}")(x)
        if self.add_downsample:
            x = layers.Downsample(
                self.out_channels, asymmetric_pad=True, dtype=self.dtype, name="downsamplers_0"
            )(x)
        return x


class UpDecoderBlock(nn.Module):
    """Resnets without timestep input, then nearest 2x upsampling and a conv."""

    out_channels: int
    num_layers: int
    groups: int
    add_upsample: bool
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        for i in range(self.num_layers):
            x = _resnet(self, self.out_channels, f"resnets_{i}")(x)
        if self.add_upsample:
            x = layers.Upsample(self.out_channels, dtype=self.dtype, name="upsamplers_0")(x)
        return x


def _resnet(parent: nn.Module, channels: int, name: str) -> layers.ResnetBlock:
    """A VAE resnet (no timestep embedding, eps 1e-6) with the parent's groups and dtype."""
    return layers.ResnetBlock(channels, parent.groups, VAE_EPS, dtype=parent.dtype, name=name)


class Encoder(nn.Module):
    """conv_in, down blocks, mid block, GroupNorm-SiLU-conv_out to 2*latent channels."""

    block_out_channels: Sequence[int]
    layers_per_block: int
    latent_channels: int
    groups: int
    add_attention: bool = True
    attention_impl: str = "auto"
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        chans = self.block_out_channels
        x = layers.conv(chans[0], 3, "conv_in", dtype=self.dtype)(x)
        for i, ch in enumerate(chans):
            x = DownEncoderBlock(
                ch, self.layers_per_block, self.groups, add_downsample=i < len(chans) - 1,
                dtype=self.dtype, name=f"down_blocks_{i}",
            )(x)
        x = MidBlock(chans[-1], self.groups, self.add_attention, self.attention_impl,
                     dtype=self.dtype, name="mid_block")(x)
        x = nn.silu(layers.group_norm(self.groups, VAE_EPS, "conv_norm_out", self.dtype)(x))
        # fp32: these are the moments; exp(logvar) amplifies any rounding.
        return layers.conv(2 * self.latent_channels, 3, "conv_out", dtype=jnp.float32)(x)


class Decoder(nn.Module):
    """conv_in, mid block, up blocks (layers_per_block + 1 resnets), GroupNorm-SiLU-conv_out."""

    block_out_channels: Sequence[int]
    layers_per_block: int
    out_channels: int
    groups: int
    add_attention: bool = True
    attention_impl: str = "auto"
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, z: jax.Array) -> jax.Array:
        chans = tuple(reversed(self.block_out_channels))
        x = layers.conv(chans[0], 3, "conv_in", dtype=self.dtype)(z)
        x = MidBlock(chans[0], self.groups, self.add_attention, self.attention_impl,
                     dtype=self.dtype, name="mid_block")(x)
        for i, ch in enumerate(chans):
            x = UpDecoderBlock(
                ch, self.layers_per_block + 1, self.groups, add_upsample=i < len(chans) - 1,
                dtype=self.dtype, name=f"up_blocks_{i}",
            )(x)
        x = nn.silu(layers.group_norm(self.groups, VAE_EPS, "conv_norm_out", self.dtype)(x))
        # fp32 for the pixels themselves (cheap: a few output channels).
        return layers.conv(self.out_channels, 3, "conv_out", dtype=jnp.float32)(x)


class AutoencoderKL(nn.Module):
    """diffusers ``AutoencoderKL`` (SD 2.x defaults); NHWC; ``dtype`` is the compute dtype."""

    in_channels: int = 3
    out_channels: int = 3
    block_out_channels: Sequence[int] = (128, 256, 512, 512)
    layers_per_block: int = 2
    latent_channels: int = 4
    norm_num_groups: int = 32
    scaling_factor: float = 0.18215
    shift_factor: float = 0.0
    use_quant_conv: bool = True
    use_post_quant_conv: bool = True
    mid_block_add_attention: bool = True
    attention_impl: str = "auto"
    dtype: Dtype = jnp.float32

    def setup(self) -> None:
        """Build the two towers and the 1x1 (post-)quantisation convs."""
        common = dict(
            block_out_channels=tuple(self.block_out_channels),
            layers_per_block=self.layers_per_block,
            groups=self.norm_num_groups,
            add_attention=self.mid_block_add_attention,
            attention_impl=self.attention_impl,
            dtype=self.dtype,
        )
        self.encoder = Encoder(latent_channels=self.latent_channels, **common)
        self.decoder = Decoder(out_channels=self.out_channels, **common)
        # Latent-space 1x1 convs stay fp32: they touch few values and feed the moments/decoder.
        if self.use_quant_conv:
            self.quant_conv = layers.conv(2 * self.latent_channels, 1, dtype=jnp.float32)
        if self.use_post_quant_conv:
            self.post_quant_conv = layers.conv(self.latent_channels, 1, dtype=jnp.float32)

    def encode(self, x: jax.Array) -> tuple[jax.Array, jax.Array]:
        """Image (B, H, W, C) in [-1, 1] -> (mean, logvar) of the unscaled latent, float32."""
        moments = self.encoder(x)
        if self.use_quant_conv:
            moments = self.quant_conv(moments)
        moments = moments.astype(jnp.float32)
        mean, logvar = jnp.split(moments, 2, axis=-1)
        return mean, jnp.clip(logvar, LOGVAR_MIN, LOGVAR_MAX)

    def decode(self, z: jax.Array) -> jax.Array:
        """Unscaled latent (B, h, w, latent_channels) -> image (B, 8h, 8w, C), float32."""
        z = z.astype(jnp.float32)
        if self.use_post_quant_conv:
            z = self.post_quant_conv(z)
        return self.decoder(z).astype(jnp.float32)

    def to_latent_space(self, mean: Any) -> Any:
        """Unscaled latent -> the UNets' latent space: (z - shift) * scale (numpy or jax arrays)."""
        return (mean - self.shift_factor) * self.scaling_factor

    def from_latent_space(self, z: Any) -> Any:
        """The UNets' latent space -> unscaled latent: z / scale + shift (numpy or jax arrays)."""
        return z / self.scaling_factor + self.shift_factor

    def encode_latents(self, x: jax.Array) -> jax.Array:
        """Image in [-1, 1] -> the scaled mean latent the UNets see, float32."""
        mean, _ = self.encode(x)
        return self.to_latent_space(mean).astype(jnp.float32)

    def decode_latents(self, z: jax.Array) -> jax.Array:
        """Scaled latent (what the UNets produce) -> image clipped to [-1, 1], float32."""
        return jnp.clip(self.decode(self.from_latent_space(z.astype(jnp.float32))), -1.0, 1.0)

    def __call__(self, x: jax.Array) -> jax.Array:
        """Reconstruction through the mean latent; touches every parameter (used by init)."""
        mean, _ = self.encode(x)
        return self.decode(mean)

    @staticmethod
    def sample_latent(mean: jax.Array, logvar: jax.Array, rng: jax.Array) -> jax.Array:
        """Draw z = mean + exp(logvar / 2) * eps from the encoder's diagonal Gaussian."""
        return sample_latent(mean, logvar, rng)

    @property
    def downsample_factor(self) -> int:
        """Pixels per latent along each side (8 for SD)."""
        return 2 ** (len(self.block_out_channels) - 1)

    def dummy_inputs(self, batch: int = 1) -> tuple[jax.Array]:
        """The smallest valid image (one latent pixel) for shaping params with ``init``."""
        size = self.downsample_factor
        return (jnp.zeros((batch, size, size, self.in_channels), jnp.float32),)

    @classmethod
    def from_config(cls, cfg: Mapping[str, Any], dtype: Dtype = jnp.float32,
                    attention_impl: str = "auto") -> "AutoencoderKL":
        """Build from a diffusers ``AutoencoderKL`` config.json dict; reject what is not ported."""
        _check_config(cfg)
        return cls(
            in_channels=int(cfg.get("in_channels", 3)),
            out_channels=int(cfg.get("out_channels", 3)),
            block_out_channels=tuple(int(c) for c in cfg.get("block_out_channels", (64,))),
            layers_per_block=int(cfg.get("layers_per_block", 1)),
            latent_channels=int(cfg.get("latent_channels", 4)),
            norm_num_groups=int(cfg.get("norm_num_groups", 32)),
            scaling_factor=float(cfg.get("scaling_factor", 0.18215)),
            shift_factor=float(cfg.get("shift_factor") or 0.0),
            use_quant_conv=bool(cfg.get("use_quant_conv", True)),
            use_post_quant_conv=bool(cfg.get("use_post_quant_conv", True)),
            mid_block_add_attention=bool(cfg.get("mid_block_add_attention", True)),
            attention_impl=attention_impl,
            dtype=dtype,
        )


def sample_latent(mean: jax.Array, logvar: jax.Array, rng: jax.Array) -> jax.Array:
    """Draw z = mean + exp(logvar / 2) * eps, eps ~ N(0, I), in float32."""
    mean = mean.astype(jnp.float32)
    eps = jax.random.normal(rng, mean.shape, jnp.float32)
    return mean + jnp.exp(0.5 * logvar.astype(jnp.float32)) * eps


def _block_types(cfg: Mapping[str, Any], key: str, expected: str, n: int) -> list[str]:
    """Problems with a block-type list (diffusers' defaults give one block)."""
    types = [t[len("UNetRes"):] if t.startswith("UNetRes") else t for t in cfg.get(key, (expected,))]
    problems = [f"{key} has {len(types)} entries but block_out_channels has {n}"] if len(types) != n else []
    bad = sorted({t for t in types if t != expected})
    if bad:
        problems.append(f"{key} uses {bad}; only {expected} is implemented")
    return problems


def _check_config(cfg: Mapping[str, Any]) -> None:
    """Raise one ValueError naming every config value this port cannot build."""
    cls_name = cfg.get("_class_name", "AutoencoderKL")
    if cls_name != "AutoencoderKL":
        raise ValueError(f"config is for {cls_name}, not an AutoencoderKL (VAE) config")
    chans = tuple(cfg.get("block_out_channels", (64,)))
    groups = cfg.get("norm_num_groups", 32)
    problems = _block_types(cfg, "down_block_types", DOWN_BLOCK, len(chans))
    problems += _block_types(cfg, "up_block_types", UP_BLOCK, len(chans))
    problems += [f"{k}={cfg[k]!r} (only {v!r})" for k, v in UNSUPPORTED.items()
                 if cfg.get(k, v) != v]
    if not chans:
        problems.append("block_out_channels is empty")
    problems += [f"norm_num_groups={groups} does not divide {c} channels" for c in chans if c % groups]
    if problems:
        raise ValueError("unsupported AutoencoderKL config: " + "; ".join(problems))
