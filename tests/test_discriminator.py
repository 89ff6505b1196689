"""Discriminator: heads on the tiny random teacher, spectral norm, gradient routing, timesteps."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from imagerag_jax.models import discriminator as disc
from imagerag_jax.weights.random_pipeline import random_modules, random_params

B, SIZE, TOKENS = 2, 8, 5
HEADS = disc.DiscriminatorHeads(hidden=16, time_dim=16, cond_dim=16)


def numpy_head_variables(unet, unet_params, z, context, pooled, seed: int = 0):
    """Head variables filled with numpy from their shapes (compiling jax.random on CPU costs ~5 s)."""
    shapes = jax.eval_shape(
        lambda: disc.init_heads(HEADS, jax.random.PRNGKey(0), unet, unet_params, z, context, pooled)
    )
    rng = np.random.default_rng(seed)
    params = random_params(shapes["params"], seed)
    stats = jax.tree_util.tree_map(
        lambda s: jnp.asarray(rng.standard_normal(s.shape, dtype=np.float32)), shapes["batch_stats"]
    )
    return {"params": params, "batch_stats": stats}


@pytest.fixture(scope="module")
def setup():
    """Tiny teacher UNet + params, head variables and one batch of inputs."""
    unet, unet_params = random_modules("tiny2")["unet"]
    rng = np.random.default_rng(0)
    normal = lambda *shape: jnp.asarray(rng.standard_normal(shape, dtype=np.float32))
    z = normal(B, SIZE, SIZE, unet.in_channels)
    context = normal(B, TOKENS, unet.cross_attention_dim)
    pooled = normal(B, unet.cross_attention_dim) * 10.0
    variables = numpy_head_variables(unet, unet_params, z, context, pooled)
    return unet, unet_params, variables, z, context, pooled


@pytest.fixture(scope="module")
def logits_and_grads(setup):
    """One compiled call: logits, stats updates and gradients w.r.t. teacher, heads and z_s."""
    unet, unet_params, variables, z, context, pooled = setup
    t = jnp.array([10, 900])

    def loss(teacher_params, head_params, z_s, update_stats):
        head_vars = {"params": head_params, "batch_stats": variables["batch_stats"]}
        logits, stats = disc.discriminator_logits(
            unet, teacher_params, HEADS, head_vars, z_s, t, context, pooled, update_stats
        )
        return jnp.sum(logits), (logits, stats)

    @jax.jit
    def run(teacher_params, head_params, z_s):
        grad_fn = jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True)
        (_, (logits, frozen_stats)), grads = grad_fn(teacher_params, head_params, z_s, False)
        _, (_, new_stats) = loss(teacher_params, head_params, z_s, True)
        return logits, grads, frozen_stats, new_stats

    return run(unet_params, variables["params"], z)


def test_logits_one_per_stage(setup, logits_and_grads):
    unet = setup[0]
    logits = logits_and_grads[0]
    n_stages = len(unet.block_out_channels) + 1  # every down block and the mid block
    assert logits.shape == (B, n_stages) and logits.dtype == jnp.float32
    assert np.all(np.isfinite(np.asarray(logits)))


def test_variable_collections(setup):
    variables = setup[2]
    assert set(variables) == {"params", "batch_stats"}
    n_stages = len(setup[0].block_out_channels) + 1
    heads = sorted(k for k in variables["params"] if k.startswith("head_"))
    assert heads == [f"head_{k}" for k in range(n_stages)]
    stats = variables["batch_stats"]["head_0"]["sn_conv_0"]
    assert stats["conv_0/kernel/u"].shape == (1, HEADS.hidden) and stats["conv_0/kernel/sigma"].shape == ()


def test_gradients_reach_heads_and_latent_not_teacher(logits_and_grads):
    _, (g_teacher, g_heads, g_z), _, _ = logits_and_grads
    assert all(not np.asarray(g).any() for g in jax.tree_util.tree_leaves(g_teacher))
    assert np.abs(np.asarray(g_z)).max() > 0  # the generator loss needs d logits / d z_s
    assert sorted(g_heads) == ["cond_mlp_0", "cond_mlp_1", "head_0", "head_1", "head_2"]
    for name, tree in g_heads.items():  # every tensor of every head and of the condition MLP
        assert all(np.abs(np.asarray(g)).max() > 0 for g in jax.tree_util.tree_leaves(tree)), name


def test_update_stats_only_when_asked(setup, logits_and_grads):
    variables = setup[2]
    _, _, frozen_stats, new_stats = logits_and_grads
    same = jax.tree_util.tree_map(lambda a, b: bool(jnp.all(a == b)), frozen_stats, variables["batch_stats"])
    assert all(jax.tree_util.tree_leaves(same))
    changed = jax.tree_util.tree_map(lambda a, b: bool(jnp.any(a != b)), new_stats, variables["batch_stats"])
    assert any(jax.tree_util.tree_leaves(changed))


def test_spectral_norm_power_iteration(setup):
    """After repeated update_stats=True calls, kernel/sigma has largest singular value ~1."""
    variables = setup[2]
    rng = np.random.default_rng(1)
    n_stages = len(variables["batch_stats"])
    # The power iteration depends on the kernels only, so any stage inputs of the right width do.
    widths = [variables["params"][f"head_{k}"]["conv_0"]["kernel"].shape[2] for k in range(n_stages)]
    stages = [jnp.asarray(rng.standard_normal((B, 4, 4, c), dtype=np.float32)) for c in widths]
    t, pooled = jnp.array([0, 999]), setup[5]

    @jax.jit
    def iterate(stats):
        def step(_, stats):
            _, mutated = HEADS.apply({**variables, "batch_stats": stats}, stages, t, pooled,
                                     update_stats=True, mutable=["batch_stats"])
            return mutated["batch_stats"]
        return jax.lax.fori_loop(0, 300, step, stats)  # 300 calls, one power step each

    stats = iterate(variables["batch_stats"])
    for k in range(n_stages):
        for j in range(HEADS.num_convs):
            kernel = np.asarray(variables["params"][f"head_{k}"][f"conv_{j}"]["kernel"], np.float64)
            matrix = kernel.reshape(-1, kernel.shape[-1])  # (kh*kw*in, out)
            sigma = float(stats[f"head_{k}"][f"sn_conv_{j}"][f"conv_{j}/kernel/sigma"])
            assert sigma == pytest.approx(np.linalg.svd(matrix, compute_uv=False)[0], rel=1e-3)
            top = np.linalg.svd(matrix / sigma, compute_uv=False)[0]
            assert top == pytest.approx(1.0, abs=1e-3), (k, j, top)


def test_timesteps_cover_all_training_steps_uniformly():
    n, num = 200_000, 1000
    t = np.asarray(disc.sample_discriminator_timesteps(jax.random.PRNGKey(0), n, num))
    assert t.dtype == np.int32 and t.min() == 0 and t.max() == num - 1
    assert abs(t.mean() - (num - 1) / 2) < 3.0  # std of the mean ~0.65
    counts = np.bincount(t // 50, minlength=20)  # 20 bins of 50 steps
    chi2 = float(np.sum((counts - n / 20) ** 2 / (n / 20)))
    assert chi2 < 50.0  # 19 dof: p(chi2 > 50) ~ 1e-4
