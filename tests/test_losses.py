"""Losses of Eq. 6-10 against hand-computed values on small fixed arrays."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from imagerag_jax.training import losses

# B=2 examples, K=2 stages.
REAL = jnp.array([[2.0, 0.5], [-1.0, 0.0]])
FAKE = jnp.array([[-2.0, 0.5], [1.0, -0.5]])


def test_hinge_d_loss_hand_computed():
    # relu(1 - real) = [[0, .5], [2, 1]] -> stage means 1.0, 0.75
    # relu(1 + fake) = [[0, 1.5], [2, .5]] -> stage means 1.0, 1.0
    assert float(losses.hinge_d_loss(REAL, FAKE)) == pytest.approx(1.0 + 0.75 + 1.0 + 1.0)


def test_hinge_d_loss_zero_when_confident():
    assert float(losses.hinge_d_loss(jnp.full((3, 2), 1.5), jnp.full((3, 2), -1.0))) == 0.0


def test_hinge_g_loss_hand_computed():
    # stage means of fake: (-2 + 1)/2 = -0.5 and (0.5 - 0.5)/2 = 0 -> -(-0.5 + 0)
    assert float(losses.hinge_g_loss(FAKE)) == pytest.approx(0.5)


def test_hinge_sums_stages():
    # Duplicating the stages doubles the loss: stage terms are summed, not averaged.
    assert float(losses.hinge_g_loss(jnp.concatenate([FAKE, FAKE], 1))) == pytest.approx(1.0)
    real2, fake2 = jnp.concatenate([REAL, REAL], 1), jnp.concatenate([FAKE, FAKE], 1)
    assert float(losses.hinge_d_loss(real2, fake2)) == pytest.approx(7.5)


def test_smooth_l1_three_regimes():
    pred = jnp.array([0.5, 1.0, 3.0, -2.5])
    target = jnp.array([0.0, 0.0, 0.0, -0.5])
    # |d| = .5 -> .125 ; |d| = 1 -> 1 - .5 = .5 ; |d| = 3 -> 2.5 ; |d| = 2 -> 1.5
    assert float(losses.smooth_l1(pred, target)) == pytest.approx((0.125 + 0.5 + 2.5 + 1.5) / 4)
    # Both branches agree at |d| = 1 (continuity).
    assert float(losses.smooth_l1(jnp.array([1.0]), jnp.array([0.0]))) == pytest.approx(0.5)
    assert float(losses.smooth_l1(jnp.array([0.999999]), jnp.array([0.0]))) == pytest.approx(0.5, abs=1e-5)


def test_smooth_l1_gradient():
    pred = jnp.array([0.5, -0.25, 3.0, -2.5])
    grad = jax.grad(losses.smooth_l1)(pred, jnp.zeros(4))
    # d/dpred: d (|d|<1) or sign(d) (|d|>=1), divided by the element count 4.
    np.testing.assert_allclose(np.asarray(grad), [0.5 / 4, -0.25 / 4, 1 / 4, -1 / 4], rtol=1e-6)


def test_smooth_l1_means_over_all_elements():
    pred = jnp.zeros((2, 3, 3, 4)).at[0, 0, 0, 0].set(0.2)
    assert float(losses.smooth_l1(pred, jnp.zeros_like(pred))) == pytest.approx(0.5 * 0.04 / 72)


def test_generator_loss_weighting():
    # Eq. 10 with the paper's alpha=2.5, beta=1: 0.3 + 2.5*0.2 + 1*0.4
    assert float(losses.generator_loss(0.3, 0.2, 0.4)) == pytest.approx(1.2)
    assert float(losses.generator_loss(0.3, 0.2, 0.4, alpha=1.0, beta=0.0)) == pytest.approx(0.5)
    parts = losses.generator_loss_parts(
        jnp.float32(0.3), jnp.float32(0.2), jnp.float32(0.4), alpha=2.0, beta=3.0
    )
    assert float(parts.total) == pytest.approx(0.3 + 0.4 + 1.2)
    assert (float(parts.adv), float(parts.distill), float(parts.lpips)) == pytest.approx((0.3, 0.2, 0.4))


def test_discriminator_accuracy():
    # real > 0: 2.0 and 0.5 of 4 -> 0.5 ; fake < 0: -2.0 and -0.5 of 4 -> 0.5
    acc_real, acc_fake = losses.discriminator_accuracy(REAL, FAKE)
    assert (float(acc_real), float(acc_fake)) == (0.5, 0.5)
    acc_real, acc_fake = losses.discriminator_accuracy(jnp.ones((2, 3)), -jnp.ones((2, 3)))
    assert (float(acc_real), float(acc_fake)) == (1.0, 1.0)


class _SquaredDistance:
    """Stand-in perceptual network: per-example sum of squared differences."""

    def apply(self, variables, x, y):
        return jnp.sum(jnp.square(x - y), axis=(1, 2, 3)) * variables["scale"]


def test_latent_lpips_loss_hand_computed():
    x = jnp.zeros((2, 2, 2, 1))
    y = jnp.stack([jnp.ones((2, 2, 1)), 2 * jnp.ones((2, 2, 1))])
    # Per example 4 * 1^2 = 4 and 4 * 2^2 = 16 -> batch mean 10 (times the stand-in scale 1).
    rng = jax.random.PRNGKey(0)
    loss = losses.latent_lpips_loss(_SquaredDistance(), {"scale": 1.0}, x, y, rng, augment=False)
    assert float(loss) == pytest.approx(10.0)


def test_latent_lpips_loss_augments_both_inputs_alike():
    rng = jax.random.PRNGKey(3)
    x = jax.random.normal(rng, (4, 8, 8, 4))
    # Identical inputs stay identical under the shared augmentation -> exactly zero.
    assert float(losses.latent_lpips_loss(_SquaredDistance(), {"scale": 1.0}, x, x, rng)) == 0.0
    # Cutout removes part of the difference, so the augmented loss is below the plain one.
    plain = losses.latent_lpips_loss(_SquaredDistance(), {"scale": 1.0}, x, x + 1.0, rng, augment=False)
    augmented = losses.latent_lpips_loss(_SquaredDistance(), {"scale": 1.0}, x, x + 1.0, rng)
    assert float(plain) == pytest.approx(256.0)
    assert float(augmented) < float(plain)
