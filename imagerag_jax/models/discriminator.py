"""Latent adversarial discriminator (paper Sec. 3.4, Fig. 4): frozen teacher encoder + trainable heads.

The discriminator D sees a noised latent z_s (s uniform over all N training timesteps), runs the
frozen teacher UNet encoder on it (``UNet.encoder_stages``: the output of every down block and of
the mid block) and puts one trainable projection head on each stage k, giving one logit D_k per
stage. The hinge losses (Eq. 6-7, ``losses.py``) sum over k.

Each head: spectral-normalised 3x3 convolutions (Miyato et al. 2018; no gradient penalty, so no
double backprop) -> spatial mean φ -> projection-discriminator output (Miyato & Koyama 2018)
``logit = linear(φ) + <φ, embed(cond)>`` with cond = [sinusoidal(t), LayerNorm(pooled text)].

Variable collections of ``DiscriminatorHeads`` (all trainable state lives here; the teacher's
params are separate and frozen):

- ``'params'``: ``head_{k}/conv_{j}/{kernel,bias}``, ``head_{k}/out/{kernel,bias}``,
  ``head_{k}/embed/kernel`` and ``cond_mlp_{0,1}/{kernel,bias}`` (shared by the heads).
- ``'batch_stats'``: spectral-norm power-iteration state: under ``head_{k}/sn_conv_{j}`` the
  flat keys ``'conv_{j}/kernel/u'`` (1, hidden) and ``'conv_{j}/kernel/sigma'`` () (flax's
  ``nn.SpectralNorm`` names them with '/' inside one key).
  Pass ``update_stats=True`` together with ``mutable=['batch_stats']`` in the discriminator
  training step so the singular vector estimate improves; use ``update_stats=False`` otherwise
  (the generator step), which still normalises with one power iteration from the stored ``u``.
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from imagerag_jax.models import layers

Dtype = Any


class StageHead(nn.Module):
    """One projection head on a single encoder stage: SN convs, spatial mean, projection logit."""

    hidden: int = 256
    num_convs: int = 2
    power_iterations: int = 1
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, feature: jax.Array, cond: jax.Array, update_stats: bool) -> jax.Array:
        x = feature.astype(self.dtype)
        for j in range(self.num_convs):
            conv = nn.Conv(self.hidden, (3, 3), padding=((1, 1), (1, 1)), dtype=self.dtype, name=f"conv_{j}")
            sn = nn.SpectralNorm(conv, n_steps=self.power_iterations, name=f"sn_conv_{j}")
            x = sn(x, update_stats=update_stats)
            x = nn.leaky_relu(x, 0.2)
        phi = jnp.mean(x, axis=(1, 2))  # (B, hidden)
        unconditional = nn.Dense(1, dtype=self.dtype, name="out")(phi)[:, 0]
        # Projection term: inner product of the pooled features with the condition embedding.
        embed = nn.Dense(self.hidden, use_bias=False, dtype=self.dtype, name="embed")(cond)
        return unconditional + jnp.sum(phi * embed, axis=-1)


class DiscriminatorHeads(nn.Module):
    """One trainable head per teacher-encoder stage; ``__call__`` returns logits (B, n_stages).

    Fields: ``hidden`` conv width of every head; ``num_convs`` SN convs per head; ``time_dim``
    sinusoidal timestep feature size; ``cond_dim`` width of the shared condition MLP;
    ``power_iterations`` power-iteration steps per call; ``dtype`` compute dtype (fp32 default).
    """

    hidden: int = 256
    num_convs: int = 2
    time_dim: int = 256
    cond_dim: int = 256
    power_iterations: int = 1
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(
        self,
        stages: Sequence[jax.Array],
        timesteps: jax.Array,
        pooled: jax.Array,
        update_stats: bool = False,
    ) -> jax.Array:
        batch = stages[0].shape[0]
        t = jnp.broadcast_to(jnp.asarray(timesteps, jnp.float32).reshape(-1), (batch,))
        temb = layers.timestep_embedding(t, self.time_dim)
        # CLIP pooled embeddings have a large, prompt-dependent norm; normalise so the condition
        # MLP sees inputs on the scale of the sinusoidal features.
        text = nn.LayerNorm(use_scale=False, use_bias=False, dtype=jnp.float32, name="pooled_norm")(
            pooled.astype(jnp.float32)
        )
        cond = jnp.concatenate([temb, text], axis=-1).astype(self.dtype)
        cond = nn.silu(nn.Dense(self.cond_dim, dtype=self.dtype, name="cond_mlp_0")(cond))
        cond = nn.Dense(self.cond_dim, dtype=self.dtype, name="cond_mlp_1")(cond)
        logits = [
            StageHead(self.hidden, self.num_convs, self.power_iterations, self.dtype, name=f"head_{k}")(
                feature, cond, update_stats
            )
            for k, feature in enumerate(stages)
        ]
        return jnp.stack(logits, axis=-1).astype(jnp.float32)


def teacher_stages(
    teacher_unet: nn.Module, teacher_params: Any, z_s: jax.Array, timesteps: jax.Array, context: jax.Array
) -> tuple[jax.Array, ...]:
    """Frozen teacher-encoder features; stop_gradient on the params only, so d/dz_s still flows."""
    frozen = jax.lax.stop_gradient(teacher_params)
    return teacher_unet.apply(
        {"params": frozen}, z_s, timesteps, context, method=teacher_unet.encoder_stages
    )


def discriminator_logits(
    teacher_unet: nn.Module,
    teacher_params: Any,
    heads: DiscriminatorHeads,
    head_variables: Mapping[str, Any],
    z_s: jax.Array,
    timesteps: jax.Array,
    context: jax.Array,
    pooled: jax.Array,
    update_stats: bool,
) -> tuple[jax.Array, Any]:
    """D(z_s, text, t): (logits (B, n_stages), new batch_stats); batch_stats unchanged unless update_stats."""
    stages = teacher_stages(teacher_unet, teacher_params, z_s, timesteps, context)
    if update_stats:
        logits, mutated = heads.apply(
            head_variables, stages, timesteps, pooled, update_stats=True, mutable=["batch_stats"]
        )
        return logits, mutated["batch_stats"]
    logits = heads.apply(head_variables, stages, timesteps, pooled, update_stats=False)
    return logits, head_variables["batch_stats"]


def init_heads(
    heads: DiscriminatorHeads,
    rng: jax.Array,
    teacher_unet: nn.Module,
    teacher_params: Any,
    z_s: jax.Array,
    context: jax.Array,
    pooled: jax.Array,
) -> Any:
    """Head variables ({'params', 'batch_stats'}) shaped by the teacher stages of example inputs."""
    t = jnp.zeros((z_s.shape[0],), jnp.int32)
    # Only the stage shapes matter: eval_shape avoids running (and compiling) the teacher.
    shapes = jax.eval_shape(lambda: teacher_stages(teacher_unet, teacher_params, z_s, t, context))
    stages = [jnp.zeros(s.shape, s.dtype) for s in shapes]
    return heads.init(rng, stages, t, pooled, update_stats=False)


def sample_discriminator_timesteps(rng: jax.Array, batch: int, num_train_timesteps: int = 1000) -> jax.Array:
    """s ~ Uniform{0, ..., N-1}: all N training timesteps, not the student's few (paper Sec. 3.4)."""
    return jax.random.randint(rng, (batch,), 0, num_train_timesteps, dtype=jnp.int32)
