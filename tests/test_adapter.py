"""models/adapter.py: the H-space adapter (Eq. 4), lambda and injection (Eq. 5), slerp (Eq. 3)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from imagerag_jax.models.adapter import HSpaceAdapter, from_config, inject, retrieval_lambda, sincos_2d, slerp_blend

B, K, HH, WW, C = 2, 3, 4, 4, 16


def randn(seed: int, *shape: int, scale: float = 1.0) -> jnp.ndarray:
    """Deterministic float32 normal array."""
    return jnp.asarray(scale * np.random.default_rng(seed).standard_normal(shape), jnp.float32)


def init_adapter(adapter: HSpaceAdapter, h_tgt, h_retr) -> dict:
    """Fresh adapter params."""
    return adapter.init(jax.random.PRNGKey(0), h_tgt, h_retr)["params"]


def with_random_out(params: dict, seed: int = 7) -> dict:
    """Params with a non-zero output projection, so that gradients reach W_Q, W_K, W_V."""
    params = jax.tree_util.tree_map(lambda x: x, params)
    params["to_out"] = {"kernel": randn(seed, C, C, scale=0.3), "bias": randn(seed + 1, C)}
    return params


def assert_runtime_matches(model, h_tgt, h_retr, out) -> None:
    """The PyTorch runtime `model` (NCHW) on the NHWC inputs gives the JAX output `out` to the
    fp32 parity bar (max abs error <= 1e-4 of the output's scale)."""
    import torch

    with torch.no_grad():
        got = model(torch.from_numpy(np.transpose(np.asarray(h_tgt), (0, 3, 1, 2)).copy()),
                    torch.from_numpy(np.transpose(np.asarray(h_retr), (0, 1, 4, 2, 3)).copy()))
    got = np.transpose(got.numpy(), (0, 2, 3, 1))
    scale = np.abs(out).max()
    assert np.abs(got - out).max() <= 1e-4 * scale, np.abs(got - out).max() / scale


# ------------------------------------------------------------------------------------------------
# Adapter.
# ------------------------------------------------------------------------------------------------


def test_zero_initialised_adapter_outputs_exact_zero():
    adapter = HSpaceAdapter(num_heads=4)
    h_tgt, h_retr = randn(0, B, HH, WW, C, scale=30.0), randn(1, B, K, HH, WW, C, scale=30.0)
    params = init_adapter(adapter, h_tgt, h_retr)
    assert set(params) == {"norm_tgt", "norm_retr", "to_q", "to_k", "to_v", "to_out"}
    np.testing.assert_array_equal(params["to_out"]["kernel"], 0.0)
    np.testing.assert_array_equal(params["to_out"]["bias"], 0.0)
    delta = adapter.apply({"params": params}, h_tgt, h_retr)
    assert delta.shape == (B, HH, WW, C)
    np.testing.assert_array_equal(delta, 0.0)
    np.testing.assert_array_equal(inject(h_tgt, delta, jnp.array([0.3, 0.9])), h_tgt)


def np_layer_norm(x: np.ndarray, prm: dict) -> np.ndarray:
    """Float64 LayerNorm over the last axis (eps 1e-5, two-pass variance) with scale and bias."""
    mu = x.mean(-1, keepdims=True)
    var = ((x - mu) ** 2).mean(-1, keepdims=True)
    return (x - mu) / np.sqrt(var + 1e-5) * prm["scale"] + prm["bias"]


def np_attention(x: np.ndarray, ctx: np.ndarray, prm: dict, heads: int, dim: int, out: str) -> np.ndarray:
    """Float64 multi-head attention of tokens x (B,N,C) to ctx (B,M,C): prm's to_q, to_k, to_v
    kernels (no bias), softmax(QK^T / sqrt(dim)) V, then prm[out] (kernel and bias)."""
    b = x.shape[0]
    q = (x @ prm["to_q"]["kernel"]).reshape(b, -1, heads, dim)
    k = (ctx @ prm["to_k"]["kernel"]).reshape(b, -1, heads, dim)
    v = (ctx @ prm["to_v"]["kernel"]).reshape(b, -1, heads, dim)
    logits = np.einsum("bqhd,bkhd->bhqk", q, k) / np.sqrt(dim)
    att = np.exp(logits - logits.max(-1, keepdims=True))
    att /= att.sum(-1, keepdims=True)
    o = np.einsum("bhqk,bkhd->bqhd", att, v).reshape(b, -1, heads * dim)
    return o @ prm[out]["kernel"] + prm[out]["bias"]


def numpy_adapter(params: dict, h_tgt, h_retr, heads: int, dim: int, pos=None) -> np.ndarray:
    """Float64 reference of Eq. 4 with per-token LayerNorm (+ `pos` (h*w, C) on every map's tokens)."""
    p = jax.tree_util.tree_map(lambda x: np.asarray(x, np.float64), params)
    b = h_tgt.shape[0]
    q_in = np_layer_norm(np.asarray(h_tgt, np.float64).reshape(b, -1, C), p["norm_tgt"])
    kv = np_layer_norm(np.asarray(h_retr, np.float64).reshape(b, -1, C), p["norm_retr"])  # K*HH*WW tokens
    if pos is not None:
        q_in = q_in + pos
        kv = kv + np.tile(pos, (h_retr.shape[1], 1))
    out = np_attention(q_in, kv, p, heads, dim, "to_out")
    return out.reshape(h_tgt.shape[0], HH, WW, C)


@pytest.mark.parametrize("heads,head_dim", [(4, None), (2, 6)])
def test_adapter_matches_float64_reference_over_k_neighbours(heads, head_dim):
    adapter = HSpaceAdapter(num_heads=heads, head_dim=head_dim, attention_impl="einsum")
    h_tgt, h_retr = randn(0, B, HH, WW, C, scale=5.0), randn(1, B, K, HH, WW, C, scale=5.0)
    params = init_adapter(adapter, h_tgt, h_retr)
    inner = heads * (head_dim or C // heads)
    assert params["to_q"]["kernel"].shape == (C, inner)
    assert params["to_out"]["kernel"].shape == (inner, C)
    params = with_random_out(params) if head_dim is None else dict(
        params, to_out={"kernel": randn(3, inner, C), "bias": randn(4, C)}
    )
    out = jax.jit(adapter.apply)({"params": params}, h_tgt, h_retr)
    ref = numpy_adapter(params, h_tgt, h_retr, heads, inner // heads)
    np.testing.assert_allclose(out, ref, rtol=1e-4, atol=1e-4)


def test_adapter_is_invariant_to_neighbour_order_and_accepts_k1():
    adapter = HSpaceAdapter(num_heads=4)
    h_tgt, h_retr = randn(0, B, HH, WW, C), randn(1, B, K, HH, WW, C)
    params = with_random_out(init_adapter(adapter, h_tgt, h_retr))
    apply = jax.jit(adapter.apply)
    out = apply({"params": params}, h_tgt, h_retr)
    np.testing.assert_allclose(apply({"params": params}, h_tgt, h_retr[:, ::-1]), out, rtol=1e-5, atol=1e-5)
    # A 4-D h_retr is one neighbour.
    np.testing.assert_array_equal(
        apply({"params": params}, h_tgt, h_retr[:, 0]), apply({"params": params}, h_tgt, h_retr[:, :1])
    )
    assert not np.allclose(apply({"params": params}, h_tgt, h_retr[:, :1]), out)


def test_gradients_reach_every_adapter_parameter():
    adapter = HSpaceAdapter(num_heads=4)
    h_tgt, h_retr = randn(0, B, HH, WW, C), randn(1, B, K, HH, WW, C)
    target = randn(2, B, HH, WW, C)
    fresh = init_adapter(adapter, h_tgt, h_retr)

    def loss(p):
        h = inject(h_tgt, adapter.apply({"params": p}, h_tgt, h_retr), jnp.array([0.5, 0.8]))
        return jnp.mean((h - target) ** 2)

    grad = jax.jit(jax.grad(loss))
    # At init only to_out learns (everything upstream is multiplied by its zero kernel) ...
    g0 = grad(fresh)
    assert np.abs(g0["to_out"]["kernel"]).max() > 0 and np.abs(g0["to_out"]["bias"]).max() > 0
    np.testing.assert_array_equal(g0["to_q"]["kernel"], 0.0)
    # ... and once it is non-zero, W_Q, W_K, W_V and the norms receive gradient too.
    g = grad(with_random_out(fresh))
    for path, leaf in jax.tree_util.tree_leaves_with_path(g):
        assert np.all(np.isfinite(leaf)), path
        assert np.abs(leaf).max() > 0, f"zero gradient for {jax.tree_util.keystr(path)}"


def test_sincos_2d_is_the_hand_computed_code():
    code = np.asarray(sincos_2d(2, 3, 8))  # 2 frequencies: 1 and 10000^(-1/2) = 0.01
    assert code.shape == (6, 8)
    row, col = 1, 2  # token 5 in row-major order
    want = [np.sin(row), np.sin(0.01 * row), np.cos(row), np.cos(0.01 * row),
            np.sin(col), np.sin(0.01 * col), np.cos(col), np.cos(0.01 * col)]
    np.testing.assert_allclose(code[row * 3 + col], want, rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(code[0], [0, 0, 1, 1, 0, 0, 1, 1], atol=1e-7)
    # A bigger map agrees on the cells it shares (positions are integers, not fractions of the size).
    np.testing.assert_allclose(np.asarray(sincos_2d(4, 5, 8)).reshape(4, 5, 8)[:2, :3].reshape(6, 8), code,
                               rtol=1e-6, atol=1e-7)
    with pytest.raises(ValueError, match="divisible by 4"):
        sincos_2d(2, 2, 6)


def test_sincos_adapter_matches_float64_reference_and_sees_where_tokens_are():
    adapter = HSpaceAdapter(num_heads=4, positional="sincos", attention_impl="einsum")
    h_tgt, h_retr = randn(0, B, HH, WW, C, scale=5.0), randn(1, B, K, HH, WW, C, scale=5.0)
    params = with_random_out(init_adapter(adapter, h_tgt, h_retr))
    apply = jax.jit(adapter.apply)
    out = apply({"params": params}, h_tgt, h_retr)
    ref = numpy_adapter(params, h_tgt, h_retr, 4, C // 4, pos=np.asarray(sincos_2d(HH, WW, C), np.float64))
    np.testing.assert_allclose(out, ref, rtol=1e-4, atol=1e-4)
    # Still invariant to the order of the neighbours ...
    np.testing.assert_allclose(apply({"params": params}, h_tgt, h_retr[:, ::-1]), out, rtol=1e-5, atol=1e-5)
    # ... but no longer to where a token sits in a neighbour's map: mirroring every neighbour
    # left-right changes the result, which the paper's position-free adapter cannot see.
    mirrored = h_retr[:, :, :, ::-1]
    plain = HSpaceAdapter(num_heads=4)
    plain_apply = jax.jit(plain.apply)
    np.testing.assert_allclose(plain_apply({"params": params}, h_tgt, mirrored),
                               plain_apply({"params": params}, h_tgt, h_retr), rtol=1e-5, atol=1e-5)
    assert np.abs(np.asarray(apply({"params": params}, h_tgt, mirrored)) - np.asarray(out)).max() > 1e-2
    # Same parameters either way (the export layout does not change).
    assert jax.tree_util.tree_structure(params) == jax.tree_util.tree_structure(
        init_adapter(plain, h_tgt, h_retr))


def test_sincos_adapter_matches_the_torch_runtime():
    torch = pytest.importorskip("torch")
    from imagerag_jax.export import torch_runtime as rt
    from imagerag_jax.weights import to_torch

    adapter = HSpaceAdapter(num_heads=4, positional="sincos")
    h_tgt, h_retr = randn(0, B, HH, WW, C, scale=5.0), randn(1, B, K, HH, 2 * WW, C, scale=5.0)
    params = with_random_out(init_adapter(adapter, h_tgt, h_retr))
    out = np.asarray(jax.jit(adapter.apply)({"params": params}, h_tgt, h_retr))
    model = rt.HSpaceAdapter(C, 4, positional="sincos")
    model.load_state_dict({k: torch.from_numpy(np.array(v)) for k, v in to_torch.torch_state_dict(params).items()})
    assert_runtime_matches(model, h_tgt, h_retr, out)
    assert to_torch.adapter_config(adapter, C)["positional"] == "sincos"


def test_from_config_reads_a_run_config_and_defaults_to_no_positions():
    a = from_config({"num_heads": 4, "head_dim": 0, "attention_impl": "einsum"})
    assert (a.num_heads, a.head_dim, a.attention_impl, a.positional) == (4, None, "einsum", "none")
    assert from_config({"num_heads": 2, "head_dim": 8, "positional": "sincos"}).positional == "sincos"
    # An export's adapter config builds the module it was written from.
    from imagerag_jax.weights import to_torch

    exported = HSpaceAdapter(num_heads=2, head_dim=8, pre_norm=False, upcast_attention=True, positional="sincos")
    back = from_config(to_torch.adapter_config(exported, C))
    assert (back.num_heads, back.head_dim, back.pre_norm, back.upcast_attention, back.positional) == \
        (2, 8, False, True, "sincos")
    with pytest.raises(ValueError, match="unknown adapter positional 'rope'"):
        init_adapter(from_config({"num_heads": 4, "positional": "rope"}), randn(0, B, HH, WW, C),
                     randn(1, B, K, HH, WW, C))


def test_adapter_rejects_bad_shapes():
    adapter = HSpaceAdapter(num_heads=5)
    with pytest.raises(ValueError, match="heads"):
        adapter.init(jax.random.PRNGKey(0), randn(0, B, HH, WW, C), randn(1, B, K, HH, WW, C))
    with pytest.raises(ValueError, match="batch/channels"):
        HSpaceAdapter(num_heads=4).init(
            jax.random.PRNGKey(0), randn(0, B, HH, WW, C), randn(1, B, K, HH, WW, C + 4)
        )


# ------------------------------------------------------------------------------------------------
# Lambda and injection.
# ------------------------------------------------------------------------------------------------


def test_retrieval_lambda_is_mean_cosine_similarity():
    tgt = np.array([[3.0, 4.0, 0.0], [1.0, 0.0, 0.0]], np.float32)
    retr = np.array(
        [
            [[3.0, 4.0, 0.0], [0.0, 0.0, 2.0], [-6.0, -8.0, 0.0]],  # cos 1, 0, -1
            [[1.0, 1.0, 0.0], [5.0, 0.0, 0.0], [0.0, 1.0, 0.0]],  # cos 1/sqrt2, 1, 0
        ],
        np.float32,
    )
    per = np.array([[1.0, 0.0, -1.0], [1 / np.sqrt(2.0), 1.0, 0.0]])
    np.testing.assert_allclose(retrieval_lambda(tgt, retr, "per_neighbour"), per, atol=1e-6)
    np.testing.assert_allclose(retrieval_lambda(tgt, retr), per.mean(-1), atol=1e-6)
    assert retrieval_lambda(tgt, retr).shape == (2,)
    with pytest.raises(ValueError, match="lambda mode"):
        retrieval_lambda(tgt, retr, "max")


def test_retrieval_lambda_matches_random_hand_computation():
    tgt, retr = np.asarray(randn(0, 4, 32)), np.asarray(randn(1, 4, 5, 32))
    ref = np.einsum("bd,bkd->bk", tgt, retr) / (
        np.linalg.norm(tgt, axis=-1)[:, None] * np.linalg.norm(retr, axis=-1)
    )
    np.testing.assert_allclose(retrieval_lambda(tgt, retr, "per_neighbour"), ref, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(retrieval_lambda(tgt, retr), ref.mean(-1), rtol=1e-5, atol=1e-6)


def test_inject_scales_delta_per_example():
    h, d = randn(0, B, HH, WW, C), randn(1, B, HH, WW, C)
    lam = jnp.array([0.25, -2.0])
    np.testing.assert_allclose(inject(h, d, lam), h + lam[:, None, None, None] * d, rtol=1e-6)
    np.testing.assert_allclose(inject(h, d, 0.5), h + 0.5 * d, rtol=1e-6)


# ------------------------------------------------------------------------------------------------
# Slerp (Eq. 3).
# ------------------------------------------------------------------------------------------------


def numpy_slerp(h_retr, h_tgt, w) -> np.ndarray:
    """Float64 Eq. 3 on unit vectors, rescaled by the lerped norms (the 'lerp' magnitude mode)."""
    a = np.asarray(h_retr, np.float64).reshape(len(h_retr), -1)
    t = np.asarray(h_tgt, np.float64).reshape(len(h_tgt), -1)
    w = np.broadcast_to(np.asarray(w, np.float64), (len(a),))[:, None]
    na, nt = np.linalg.norm(a, axis=1, keepdims=True), np.linalg.norm(t, axis=1, keepdims=True)
    ua, ut = a / na, t / nt
    om = np.arccos(np.clip((ua * ut).sum(1, keepdims=True), -1, 1))
    unit = (np.sin((1 - w) * om) * ua + np.sin(w * om) * ut) / np.sin(om)
    return (((1 - w) * na + w * nt) * unit).reshape(np.shape(h_tgt))


def test_slerp_matches_float64_reference():
    a, t = randn(0, B, HH, WW, C, scale=3.0), randn(1, B, HH, WW, C, scale=7.0)
    for w in (0.1, 0.5, 0.8, np.array([0.2, 0.9], np.float32)):
        np.testing.assert_allclose(slerp_blend(a, t, w), numpy_slerp(a, t, w), rtol=1e-5, atol=1e-5)


def test_raw_mode_is_literal_eq3_and_equals_lerp_mode_for_equal_norms():
    a, t = np.asarray(randn(0, B, 64)), np.asarray(randn(1, B, 64))
    ua = a / np.linalg.norm(a, axis=1, keepdims=True)
    ut = t / np.linalg.norm(t, axis=1, keepdims=True)
    om = np.arccos((ua * ut).sum(1, keepdims=True))
    w = 0.3
    literal = (np.sin((1 - w) * om) * a + np.sin(w * om) * t) / np.sin(om)
    np.testing.assert_allclose(slerp_blend(a, t, w, magnitude="raw"), literal, rtol=1e-5, atol=1e-5)
    a_eq, t_eq = 2.5 * ua, 2.5 * ut
    np.testing.assert_allclose(
        slerp_blend(a_eq, t_eq, w), slerp_blend(a_eq, t_eq, w, magnitude="raw"), rtol=1e-5, atol=1e-6
    )
    with pytest.raises(ValueError, match="magnitude"):
        slerp_blend(a, t, w, magnitude="nope")


def test_slerp_endpoints_and_symmetry():
    a, t = randn(0, B, HH, WW, C, scale=2.0), randn(1, B, HH, WW, C, scale=5.0)
    np.testing.assert_allclose(slerp_blend(a, t, 1.0), t, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(slerp_blend(a, t, 0.0), a, rtol=1e-6, atol=1e-6)
    for w in (0.2, 0.5, 0.7):
        np.testing.assert_allclose(slerp_blend(a, t, w), slerp_blend(t, a, 1.0 - w), rtol=1e-5, atol=1e-5)


def test_unit_inputs_stay_on_the_sphere_along_the_geodesic():
    a, t = np.array(randn(0, B, 48)), np.array(randn(1, B, 48))
    a /= np.linalg.norm(a, axis=1, keepdims=True)
    t /= np.linalg.norm(t, axis=1, keepdims=True)
    omega = np.arccos((a * t).sum(1))
    for w in (0.1, 0.45, 0.9):
        out = np.asarray(slerp_blend(a, t, w), np.float64)
        np.testing.assert_allclose(np.linalg.norm(out, axis=1), 1.0, atol=1e-5)
        # Angles from each end split Ω in the ratio (1-w) : w.
        np.testing.assert_allclose(np.arccos(np.clip((out * a).sum(1), -1, 1)), w * omega, atol=1e-3)
        np.testing.assert_allclose(np.arccos(np.clip((out * t).sum(1), -1, 1)), (1 - w) * omega, atol=1e-3)


def blend_loss(a, t, w):
    """Scalar of the blend that depends on every output element (for gradient checks)."""
    return jnp.sum(jnp.sin(slerp_blend(a, t, w)))


@pytest.mark.parametrize("sign", [1.0, -1.0])
def test_parallel_and_antiparallel_inputs_are_finite_with_finite_grads(sign):
    a = randn(0, B, HH, WW, C)
    t = sign * jnp.array([2.0, 0.5])[:, None, None, None] * a  # exactly (anti)parallel, mixed norms
    grad = jax.jit(jax.grad(blend_loss, argnums=(0, 1, 2)))
    for w in (0.0, 0.3, 0.5, 1.0):
        out = np.asarray(slerp_blend(a, t, w))
        assert np.all(np.isfinite(out))
        for g in grad(a, t, jnp.float32(w)):
            assert np.all(np.isfinite(np.asarray(g)))
    na = np.linalg.norm(np.asarray(a).reshape(B, -1), axis=1)
    nt = np.linalg.norm(np.asarray(t).reshape(B, -1), axis=1)
    out = np.asarray(slerp_blend(a, t, 0.5)).reshape(B, -1)
    # Both cases keep the lerped norm; parallel is the plain lerp, antiparallel turns by π/2.
    np.testing.assert_allclose(np.linalg.norm(out, axis=1), 0.5 * (na + nt), rtol=1e-5)
    cos_a = (out * np.asarray(a).reshape(B, -1)).sum(1) / (np.linalg.norm(out, axis=1) * na)
    np.testing.assert_allclose(cos_a, 1.0 if sign > 0 else 0.0, atol=1e-5)
    np.testing.assert_allclose(slerp_blend(a, t, 1.0), t, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(slerp_blend(a, t, 0.0), a, rtol=1e-5, atol=1e-5)


def test_near_parallel_is_continuous_with_the_regular_path():
    a = randn(0, B, 64)
    t = a + 1e-3 * randn(1, B, 64)  # Ω ~ 1e-3: regular branch, close to the threshold
    out = slerp_blend(a, t, 0.4)
    np.testing.assert_allclose(out, numpy_slerp(a, t, 0.4), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(out, 0.6 * a + 0.4 * t, rtol=1e-4, atol=1e-4)
    assert all(np.all(np.isfinite(g)) for g in jax.grad(blend_loss, argnums=(0, 1))(a, t, 0.4))


def test_zero_vector_and_dtype_are_safe():
    a, t = jnp.zeros((B, 8)), randn(1, B, 8)
    assert np.all(np.isfinite(slerp_blend(a, t, 0.5)))
    assert all(np.all(np.isfinite(g)) for g in jax.grad(blend_loss, argnums=(0, 1))(a, t, 0.5))
    out = slerp_blend(randn(0, B, 8).astype(jnp.bfloat16), t.astype(jnp.bfloat16), 0.5)
    assert out.dtype == jnp.bfloat16


# ------------------------------------------------------------------------------------------------
# The paper's adapter: SD's transformer block (block='transformer').
# ------------------------------------------------------------------------------------------------

GROUPS = 4


def randomised(params: dict, seed: int = 11) -> dict:
    """Every parameter replaced by a random array of its shape (proj_out's zeros included)."""
    leaves, tree = jax.tree_util.tree_flatten(params)
    rng = np.random.default_rng(seed)
    return jax.tree_util.tree_unflatten(tree, [
        jnp.asarray((1.0 if x.ndim == 1 and i % 2 else 0.0) + 0.3 * rng.standard_normal(x.shape), jnp.float32)
        for i, x in enumerate(leaves)])


def numpy_transformer_adapter(params: dict, h_tgt, h_retr, heads: int, dim: int) -> np.ndarray:
    """Float64 reference of the transformer adapter: norm_retr on the neighbours' tokens; GroupNorm
    (eps 1e-6), proj_in, pre-LN self-attention, cross-attention to the neighbours, GEGLU
    feed-forward (exact GELU), each residual; proj_out; no outer residual."""
    import math

    p = jax.tree_util.tree_map(lambda x: np.asarray(x, np.float64), params)
    t = p["transformer"]
    blk = t["transformer_blocks_0"]

    ln = np_layer_norm
    attend = lambda x, ctx, prm: np_attention(x, ctx, prm, heads, dim, "to_out_0")

    x = np.asarray(h_tgt, np.float64)
    b, hh, ww, c = x.shape
    g = x.reshape(b, hh * ww, GROUPS, c // GROUPS)
    mu, var = g.mean((1, 3), keepdims=True), g.var((1, 3), keepdims=True)
    x = ((g - mu) / np.sqrt(var + 1e-6)).reshape(b, hh * ww, c) * t["norm"]["scale"] + t["norm"]["bias"]
    x = x @ t["proj_in"]["kernel"] + t["proj_in"]["bias"]
    ctx = ln(np.asarray(h_retr, np.float64).reshape(b, -1, c), p["norm_retr"])
    x = x + attend(ln(x, blk["norm1"]), ln(x, blk["norm1"]), blk["attn1"])
    x = x + attend(ln(x, blk["norm2"]), ctx, blk["attn2"])
    h = ln(x, blk["norm3"]) @ blk["ff"]["net_0"]["proj"]["kernel"] + blk["ff"]["net_0"]["proj"]["bias"]
    value, gate = np.split(h, 2, axis=-1)
    gelu = 0.5 * gate * (1.0 + np.vectorize(math.erf)(gate / math.sqrt(2.0)))
    x = x + (value * gelu) @ blk["ff"]["net_2"]["kernel"] + blk["ff"]["net_2"]["bias"]
    out = x @ t["proj_out"]["kernel"] + t["proj_out"]["bias"]
    return out.reshape(b, hh, ww, c)


def transformer_adapter(**kw) -> HSpaceAdapter:
    return HSpaceAdapter(num_heads=4, block="transformer", groups=GROUPS, **kw)


def test_transformer_adapter_has_the_papers_size_and_a_fresh_one_edits_nothing():
    # Sec. 4.4: 36M parameters at 1,280 channels (SD 2.1's mid block: 20 heads of 64).
    big = HSpaceAdapter(num_heads=20, block="transformer")
    shapes = jax.eval_shape(big.init, jax.random.PRNGKey(0), jnp.zeros((1, 8, 8, 1280)),
                            jnp.zeros((1, 2, 8, 8, 1280)))["params"]
    count = sum(x.size for x in jax.tree_util.tree_leaves(shapes))
    assert abs(count / 36e6 - 1) < 0.05, count
    adapter = transformer_adapter()
    h_tgt, h_retr = randn(0, B, HH, WW, C, scale=30.0), randn(1, B, K, HH, WW, C, scale=30.0)
    params = init_adapter(adapter, h_tgt, h_retr)
    assert set(params) == {"norm_retr", "transformer"}
    np.testing.assert_array_equal(params["transformer"]["proj_out"]["kernel"], 0.0)
    delta = adapter.apply({"params": params}, h_tgt, h_retr)
    assert delta.shape == (B, HH, WW, C)
    np.testing.assert_array_equal(delta, 0.0)


def test_transformer_adapter_matches_float64_reference_and_reads_the_neighbours():
    adapter = transformer_adapter(attention_impl="einsum")
    h_tgt, h_retr = randn(0, B, HH, WW, C, scale=5.0), randn(1, B, K, HH, 2 * WW, C, scale=5.0)
    params = randomised(init_adapter(adapter, h_tgt, h_retr))
    apply = jax.jit(adapter.apply)
    out = np.asarray(apply({"params": params}, h_tgt, h_retr))
    ref = numpy_transformer_adapter(params, h_tgt, h_retr, 4, C // 4)
    scale = np.abs(ref).max()
    assert np.abs(out - ref).max() <= 1e-4 * scale, np.abs(out - ref).max() / scale
    # The neighbours' content moves the edit; their order does not (cross-attention over a set).
    other = np.asarray(apply({"params": params}, h_tgt, randn(2, B, K, HH, 2 * WW, C, scale=5.0)))
    assert np.abs(other - out).max() > 1e-2 * scale
    swapped = np.asarray(apply({"params": params}, h_tgt, h_retr[:, ::-1]))
    np.testing.assert_allclose(swapped, out, rtol=1e-4, atol=1e-4 * scale)


def test_transformer_adapter_export_matches_the_torch_runtime(tmp_path):
    torch = pytest.importorskip("torch")
    from imagerag_jax.export import torch_runtime as rt
    from imagerag_jax.weights import to_torch

    adapter = transformer_adapter()
    h_tgt, h_retr = randn(0, B, HH, WW, C, scale=5.0), randn(1, B, K, HH, WW, C, scale=5.0)
    params = randomised(init_adapter(adapter, h_tgt, h_retr))
    out = np.asarray(jax.jit(adapter.apply)({"params": params}, h_tgt, h_retr))
    to_torch.save_adapter(adapter, params, C, str(tmp_path / "adapter"))
    model = rt.load_adapter(str(tmp_path / "adapter"))
    assert (model.block, model.config["block"], model.config["groups"]) == ("transformer", "transformer", GROUPS)
    assert_runtime_matches(model, h_tgt, h_retr, out)
    back = from_config(model.config)
    assert (back.block, back.groups, back.num_heads) == ("transformer", GROUPS, 4)


def test_transformer_adapter_rejects_positions_and_bad_groups():
    h_tgt, h_retr = randn(0, B, HH, WW, C), randn(1, B, K, HH, WW, C)
    with pytest.raises(ValueError, match="takes no position codes"):
        init_adapter(transformer_adapter(positional="sincos"), h_tgt, h_retr)
    with pytest.raises(ValueError, match="cannot be split into 5 GroupNorm groups"):
        init_adapter(HSpaceAdapter(num_heads=4, block="transformer", groups=5), h_tgt, h_retr)
    with pytest.raises(ValueError, match="unknown adapter block 'mlp'"):
        init_adapter(HSpaceAdapter(num_heads=4, block="mlp"), h_tgt, h_retr)
