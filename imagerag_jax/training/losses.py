"""Training objectives of ImageRAGTurbo (paper Sec. 3.4, Eq. 6-10).

Logit arrays are (B, K): one column per discriminator stage k. Expectations are batch means and
the stage terms are summed, as written in Eq. 6-7. All losses return float32 scalars.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from imagerag_jax.models.latent_lpips import random_augment


def _f32(x: jax.Array) -> jax.Array:
    """Losses are reduced in float32 whatever the compute dtype."""
    return jnp.asarray(x, jnp.float32)


def hinge_d_loss(real_logits: jax.Array, fake_logits: jax.Array) -> jax.Array:
    """Eq. 6: sum_k [ mean_b relu(1 - D_k(real)) + mean_b relu(1 + D_k(fake)) ]."""
    real = jnp.mean(jax.nn.relu(1.0 - _f32(real_logits)), axis=0)
    fake = jnp.mean(jax.nn.relu(1.0 + _f32(fake_logits)), axis=0)
    return jnp.sum(real) + jnp.sum(fake)


def hinge_g_loss(fake_logits: jax.Array) -> jax.Array:
    """Eq. 7: -sum_k mean_b D_k(fake)."""
    return -jnp.sum(jnp.mean(_f32(fake_logits), axis=0))


def smooth_l1(pred: jax.Array, target: jax.Array) -> jax.Array:
    """Eq. 8 elementwise (0.5 d^2 if |d| < 1 else |d| - 0.5), mean over all elements."""
    d = jnp.abs(_f32(pred) - _f32(target))
    return jnp.mean(jnp.where(d < 1.0, 0.5 * jnp.square(d), d - 0.5))


def latent_lpips_loss(
    lpips_module: Any,
    lpips_variables: Any,
    pred: jax.Array,
    target: jax.Array,
    rng: jax.Array,
    augment: bool = True,
    **augment_kwargs: Any,
) -> jax.Array:
    """Eq. 9: batch mean of d(T(pred), T(target)) with one shared random augmentation T per example.

    ``rng``: one key for the batch, or one key per example (a leading axis of the batch's size),
    each example's T then drawn from its own key alone, whatever batch it is computed in (the
    train step's keying, so accumulated micro-batches draw what one big batch draws).
    """
    if augment:
        if _is_key_per_example(rng, pred.shape[0]):
            one = lambda k, p, t: random_augment(k, p[None], t[None], **augment_kwargs)
            pred, target = jax.vmap(one)(rng, pred, target)
            pred, target = pred[:, 0], target[:, 0]
        else:
            pred, target = random_augment(rng, pred, target, **augment_kwargs)
    return jnp.mean(lpips_module.apply(lpips_variables, pred, target))


def _is_key_per_example(rng: jax.Array, batch: int) -> bool:
    """Whether `rng` holds one key per example (typed keys (B,) or raw uint32 keys (B, 2))."""
    typed = jnp.issubdtype(rng.dtype, jax.dtypes.prng_key)
    return rng.ndim == (1 if typed else 2) and rng.shape[0] == batch


class LossParts(NamedTuple):
    """Generator objective and its terms (unweighted), for logging."""

    total: jax.Array
    adv: jax.Array
    distill: jax.Array
    lpips: jax.Array


def generator_loss(
    adv: jax.Array, distill: jax.Array, lpips: jax.Array | float, alpha: float = 2.5, beta: float = 1.0
) -> jax.Array:
    """Eq. 10: L_adv + alpha * L_distill + beta * L_latentLPIPS (paper: alpha 2.5, beta 1.0)."""
    return _f32(adv) + alpha * _f32(distill) + beta * _f32(lpips)


def generator_loss_parts(
    adv: jax.Array, distill: jax.Array, lpips: jax.Array | float, alpha: float = 2.5, beta: float = 1.0
) -> LossParts:
    """Eq. 10 with its terms kept apart for metrics."""
    total = generator_loss(adv, distill, lpips, alpha, beta)
    return LossParts(total, _f32(adv), _f32(distill), _f32(lpips))


def discriminator_accuracy(real_logits: jax.Array, fake_logits: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(fraction of real logits > 0, fraction of fake logits < 0) over all examples and stages."""
    return jnp.mean(_f32(real_logits) > 0), jnp.mean(_f32(fake_logits) < 0)
