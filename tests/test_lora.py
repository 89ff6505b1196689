"""lora.py: decoder kernel selection, init, merge == unmerged low-rank path, jit/grad."""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from imagerag_jax.models import lora
from imagerag_jax.weights.random_pipeline import random_modules

RANK, ALPHA = 4, 8.0


@pytest.fixture(scope="module")
def tiny_unet():
    """(UNet module, random params) of the two-level preset (both decoder block types)."""
    return random_modules("tiny2")["unet"]


def randn(seed: int, *shape: int, scale: float = 1.0) -> jnp.ndarray:
    """Deterministic float32 normal array."""
    return jnp.asarray(scale * np.random.default_rng(seed).standard_normal(shape), jnp.float32)


def randomise_b(lora_params, seed: int = 0, scale: float = 0.1):
    """The same LoRA tree with non-zero B matrices."""
    leaves, treedef = jax.tree_util.tree_flatten_with_path(lora_params)
    new = [
        randn(seed + i, *x.shape, scale=scale) if jax.tree_util.keystr(p).endswith("['b']") else x
        for i, (p, x) in enumerate(leaves)
    ]
    return jax.tree_util.tree_unflatten(treedef, new)


def test_default_pattern_selects_decoder_attention_ff_and_resnet_convs(tiny_unet):
    _, params = tiny_unet
    paths = lora.select_paths(params, lora.DEFAULT_DECODER_PATTERN)
    assert all(p.startswith("up_blocks_") and p.endswith("/kernel") for p in paths)
    # The layer each path names, relative to its transformer block or resnet.
    owner = r"^up_blocks_\d+/(attentions_\d+/transformer_blocks_\d+|resnets_\d+)/"
    kinds = {re.sub(owner, "", p)[: -len("/kernel")] for p in paths}
    attn = {f"{a}/{proj}" for a in ("attn1", "attn2") for proj in ("to_q", "to_k", "to_v", "to_out_0")}
    assert kinds == attn | {"ff/net_0/proj", "ff/net_2", "conv1", "conv2"}
    # Every such kernel of the decoder is covered; nothing of the encoder or mid block.
    flat = lora.flatten(params)
    wanted = (r"^up_blocks_\d+/(resnets_\d+/conv[12]"
              r"|attentions_\d+/.*/(to_[qkv]|to_out_0|net_0/proj|net_2))/kernel$")
    assert set(paths) == {p for p in flat if re.match(wanted, p)}
    assert any(p.startswith("up_blocks_0/resnets_") for p in paths)  # the plain UpBlock2D too
    excluded = ("mid_block", "down_blocks", "conv_shortcut", "proj_in", "norm", "time_emb")
    assert not any(s in p for p in paths for s in excluded)


def test_init_shapes_zero_b_and_bitwise_identity_merge(tiny_unet):
    _, params = tiny_unet
    lp = lora.init_lora(jax.random.PRNGKey(0), params, lora.DEFAULT_DECODER_PATTERN, RANK)
    dense = lp["up_blocks_1"]["attentions_0"]["transformer_blocks_0"]["ff"]["net_2"]["kernel"]
    assert dense["a"].shape == (128, RANK) and dense["b"].shape == (RANK, 32)
    conv = lp["up_blocks_0"]["resnets_0"]["conv1"]["kernel"]
    assert conv["a"].shape == (3, 3, 128, RANK) and conv["b"].shape == (RANK, 64)
    assert np.abs(conv["a"]).max() > 0
    for path, (a, b) in lora.lora_pairs(lp).items():
        np.testing.assert_array_equal(b, 0.0)
        assert np.abs(a).max() <= 1.0 / np.sqrt(np.prod(a.shape[:-1])) + 1e-7, path
    assert lora.count_params(lp) == sum(a.size + b.size for a, b in lora.lora_pairs(lp).values())
    # Traceable, so a trainer can shape and shard it with eval_shape / jit(out_shardings).
    shapes = jax.eval_shape(lambda r: lora.init_lora(r, params, lora.DEFAULT_DECODER_PATTERN, RANK),
                            jax.random.PRNGKey(0))
    assert jax.tree_util.tree_map(lambda s: s.shape, shapes) == jax.tree_util.tree_map(jnp.shape, lp)

    merged = lora.merge(params, lp, ALPHA, RANK)
    assert jax.tree_util.tree_structure(merged) == jax.tree_util.tree_structure(params)
    for (path, m), p in zip(jax.tree_util.tree_leaves_with_path(merged), jax.tree_util.tree_leaves(params)):
        assert m.dtype == p.dtype, path
        np.testing.assert_array_equal(m, p, err_msg=jax.tree_util.keystr(path))
    merged_jit = jax.jit(lora.merge, static_argnums=(2, 3))(params, lp, ALPHA, RANK)
    for m, p in zip(jax.tree_util.tree_leaves(merged_jit), jax.tree_util.tree_leaves(params)):
        np.testing.assert_array_equal(m, p)


def test_merge_touches_only_selected_kernels(tiny_unet):
    _, params = tiny_unet
    lp = randomise_b(lora.init_lora(jax.random.PRNGKey(0), params, lora.DEFAULT_DECODER_PATTERN, RANK))
    merged, base = lora.flatten(lora.merge(params, lp, ALPHA, RANK)), lora.flatten(params)
    selected = set(lora.select_paths(params, lora.DEFAULT_DECODER_PATTERN))
    for path, leaf in base.items():
        if path in selected:
            assert not np.array_equal(merged[path], leaf), path
        else:
            assert merged[path] is leaf, path


def test_dense_merge_equals_unmerged_low_rank_path():
    w = randn(0, 24, 40)
    params = {"blk": {"proj": {"kernel": w, "bias": jnp.zeros((40,))}}}
    lp = randomise_b(lora.init_lora(jax.random.PRNGKey(1), params, r"proj/kernel$", RANK), seed=3, scale=0.5)
    a, b = lp["blk"]["proj"]["kernel"]["a"], lp["blk"]["proj"]["kernel"]["b"]
    x = randn(9, 5, 24)
    merged = lora.merge(params, lp, ALPHA, RANK)["blk"]["proj"]["kernel"]
    unmerged = x @ w + (ALPHA / RANK) * (x @ a) @ b
    np.testing.assert_allclose(x @ merged, unmerged, rtol=1e-5, atol=1e-5)
    assert not np.allclose(x @ merged, x @ w)


def conv(x, k):
    """NHWC / HWIO 'same' convolution."""
    return jax.lax.conv_general_dilated(x, k, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"))


def test_conv_merge_equals_base_conv_plus_low_rank_path():
    w = randn(0, 3, 3, 6, 10, scale=0.2)
    params = {"resnets_0": {"conv1": {"kernel": w, "bias": jnp.zeros((10,))}}}
    lp = randomise_b(lora.init_lora(jax.random.PRNGKey(2), params, r"conv1/kernel$", RANK), seed=5, scale=0.5)
    a, b = lp["resnets_0"]["conv1"]["kernel"]["a"], lp["resnets_0"]["conv1"]["kernel"]["b"]
    x = randn(8, 2, 7, 5, 6)
    merged = lora.merge(params, lp, ALPHA, RANK)["resnets_0"]["conv1"]["kernel"]
    # Low-rank path: kh x kw conv to RANK channels, then a 1x1 conv (a matmul) with B.
    low_rank = jnp.einsum("bhwr,ro->bhwo", conv(x, a), b)
    ref = conv(x, w) + (ALPHA / RANK) * low_rank
    np.testing.assert_allclose(conv(x, merged), ref, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(lora.lora_delta(a, b), jnp.einsum("hwir,ro->hwio", a, b), rtol=1e-6)


def test_pattern_matching_nothing_raises_with_examples(tiny_unet):
    _, params = tiny_unet
    with pytest.raises(ValueError, match="matches no") as err:
        lora.init_lora(jax.random.PRNGKey(0), params, r"^nonexistent/", RANK)
    assert "conv_in/kernel" in str(err.value)


def test_merge_validates_rank_and_paths():
    params = {"d": {"kernel": randn(0, 4, 6)}}
    lp = lora.init_lora(jax.random.PRNGKey(0), params, "kernel", 2)
    with pytest.raises(ValueError, match="rank"):
        lora.merge(params, lp, 1.0, 3)
    with pytest.raises(KeyError, match="not in the base"):
        lora.merge({"e": params["d"]}, lp, 1.0, 2)
    with pytest.raises(ValueError, match="rank"):
        lora.init_lora(jax.random.PRNGKey(0), params, "kernel", 0)


def test_merge_under_jit_and_grad_reaches_a_and_b(tiny_unet):
    unet, params = tiny_unet
    lp = lora.init_lora(jax.random.PRNGKey(0), params, lora.DEFAULT_DECODER_PATTERN, RANK)
    x, t, ctx = randn(0, 1, 8, 8, 4), jnp.array([500]), randn(1, 1, 3, 32)
    # LoRA lives in the decoder only: differentiate decode() from fixed encoder outputs.
    h, skips, temb = jax.jit(lambda p: unet.apply({"params": p}, x, t, ctx, method=unet.encode))(params)

    def loss(lp):
        merged = lora.merge(params, lp, ALPHA, RANK)
        return jnp.mean(unet.apply({"params": merged}, h, skips, temb, ctx, method=unet.decode) ** 2)

    value_and_grad = jax.jit(jax.value_and_grad(loss))
    l0, g0 = value_and_grad(lp)
    g0 = lora.lora_pairs(g0)
    # B = 0 at init: dL/dA = 0 exactly, dL/dB is non-zero everywhere LoRA was placed.
    assert all(np.abs(gb).max() > 0 for _, gb in g0.values())
    assert all(np.abs(ga).max() == 0 for ga, _ in g0.values())
    l1, g = value_and_grad(randomise_b(lp, scale=0.05))
    g = lora.lora_pairs(g)
    assert all(np.all(np.isfinite(ga)) and np.abs(ga).max() > 0 for ga, _ in g.values())
    assert float(l1) != float(l0)


def test_decoder_lora_leaves_the_encoder_and_h_space_unchanged(tiny_unet):
    unet, params = tiny_unet
    lp = randomise_b(lora.init_lora(jax.random.PRNGKey(0), params, lora.DEFAULT_DECODER_PATTERN, RANK))
    merged = lora.merge(params, lp, ALPHA, RANK)
    x, t, ctx = randn(0, 1, 8, 8, 4), jnp.array([999]), randn(1, 1, 3, 32)
    enc = jax.jit(lambda p: unet.apply({"params": p}, x, t, ctx, method=unet.encode)[0])
    np.testing.assert_array_equal(enc(merged), enc(params))
