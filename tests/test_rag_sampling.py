"""sampling.py's ImageRAGTurbo paths on the tiny random UNet: retrieved H-space, adapter one step,
direct injection and the per-prompt w search."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from imagerag_jax.models import lora
from imagerag_jax.diffusion import sampling as smp
from imagerag_jax.models.adapter import HSpaceAdapter, retrieval_lambda
from imagerag_jax.diffusion.schedule import scaled_linear_schedule
from imagerag_jax.weights.random_pipeline import random_modules
from tests import helpers
from tests.helpers import assert_parity

B, K, S, L = 2, 3, 8, 5
SCHEDULE = scaled_linear_schedule()


def randn(seed: int, *shape: int, scale: float = 1.0) -> jnp.ndarray:
    """Deterministic float32 normal array."""
    return jnp.asarray(scale * np.random.default_rng(seed).standard_normal(shape), jnp.float32)


@pytest.fixture(scope="module")
def setup():
    """Tiny UNet, inputs, the neighbours' H-space, a fresh adapter and jitted samplers (compiled once)."""
    unet, params = random_modules("tiny")["unet"]
    d = unet.cross_attention_dim
    noise, context = randn(0, B, S, S, 4), randn(1, B, L, d)
    retr_latents, retr_context = randn(2, B, K, S, S, 4), randn(3, B, K, L, d)
    h_retr = jax.jit(lambda p, x, c: smp.retrieved_hspace(unet, p, x, c))(params, retr_latents, retr_context)
    adapter = HSpaceAdapter(num_heads=4)
    adapter_params = jax.jit(adapter.init)(jax.random.PRNGKey(0), h_retr[:, 0], h_retr)["params"]
    base = jax.jit(lambda p: smp.one_step(
        lambda x, t, c: unet.apply({"params": p}, x, t, c), noise, context, SCHEDULE))(params)
    # w is always passed as a (B,) array so that one compilation serves every call.
    inject = jax.jit(lambda w: smp.direct_injection_one_step(
        unet, params, noise, context, h_retr[:, 0], w, SCHEDULE))
    return dict(
        unet=unet, params=params, noise=noise, context=context, retr_latents=retr_latents,
        retr_context=retr_context, h_retr=h_retr, adapter=adapter, adapter_params=adapter_params,
        lam=retrieval_lambda(randn(4, B, d), randn(5, B, K, d)), base=base, inject=inject,
    )


def test_retrieved_hspace_equals_per_neighbour_encode_calls(setup):
    unet, params, h_retr = setup["unet"], setup["params"], setup["h_retr"]
    h = S // 2 ** (len(unet.block_out_channels) - 1)  # the mid block's side: one halving per level
    assert h_retr.shape == (B, K, h, h, unet.h_space_channels)
    encode = jax.jit(lambda x, c: unet.apply({"params": params}, x, jnp.zeros((B,), jnp.int32), c,
                                             method=unet.encode)[0])
    for j in range(K):
        ref = encode(setup["retr_latents"][:, j], setup["retr_context"][:, j])
        np.testing.assert_allclose(h_retr[:, j], ref, rtol=1e-5, atol=1e-5)
    assert not np.allclose(h_retr[:, 0], h_retr[:, 1])
    with pytest.raises(ValueError, match="does not match"):
        smp.retrieved_hspace(unet, params, setup["retr_latents"], setup["retr_context"][:, :2])


def test_fresh_adapter_and_zero_lora_give_exactly_the_base_one_step(request):
    if helpers.rerun_with_default_emitters(request):  # two programs compared bit for bit
        return
    setup = request.getfixturevalue("setup")
    unet, params, adapter, base = setup["unet"], setup["params"], setup["adapter"], setup["base"]
    rag = jax.jit(lambda p, ap, lam: smp.imagerag_one_step(
        unet, p, adapter, ap, setup["noise"], setup["context"], setup["h_retr"], lam, SCHEDULE))
    np.testing.assert_array_equal(rag(params, setup["adapter_params"], setup["lam"]), base)
    lp = lora.init_lora(jax.random.PRNGKey(1), params, lora.DEFAULT_DECODER_PATTERN, 4)
    merged = jax.jit(lora.merge, static_argnums=(2, 3))(params, lp, 4.0, 4)
    np.testing.assert_array_equal(rag(merged, setup["adapter_params"], setup["lam"]), base)
    # A trained (non-zero) adapter edits the output, except where lambda = 0.
    c = unet.h_space_channels
    to_out = {"kernel": randn(6, c, c, scale=0.5), "bias": randn(7, c)}
    trained = dict(setup["adapter_params"], to_out=to_out)
    edited = np.asarray(rag(params, trained, setup["lam"]))
    assert np.all(np.isfinite(edited)) and not np.allclose(edited, base)
    np.testing.assert_array_equal(rag(params, trained, jnp.zeros((B,))), base)


def test_direct_injection_w1_is_base_and_per_example_w(setup):
    inject, base = setup["inject"], setup["base"]
    np.testing.assert_allclose(inject(jnp.ones((B,))), base, rtol=1e-4, atol=1e-4)
    mixed = inject(jnp.array([0.3, 0.7]))
    np.testing.assert_array_equal(mixed[0], inject(jnp.full((B,), 0.3))[0])
    np.testing.assert_array_equal(mixed[1], inject(jnp.full((B,), 0.7))[1])
    assert not np.allclose(mixed, base, atol=1e-3)


def test_search_picks_the_best_w_per_prompt(setup):
    unet, params, noise, context = setup["unet"], setup["params"], setup["noise"], setup["context"]
    target = setup["inject"](jnp.array([0.3, 0.8]))
    score_fn = lambda x0: -jnp.mean(jnp.abs(x0 - target), axis=(1, 2, 3))

    @jax.jit
    def search(p):
        return smp.search_injection_weight(
            unet, p, noise, context, setup["h_retr"][:, 0], SCHEDULE, score_fn,
            return_scores=True, batch_size=3)

    best_x0, best_w, scores = search(params)
    assert scores.shape == (len(smp.INJECTION_WEIGHTS), B)
    np.testing.assert_allclose(best_w, [0.3, 0.8], rtol=1e-6)
    assert_parity(best_x0, target)  # the decoder runs batched over w inside lax.map
    assert np.all(np.argmax(np.asarray(scores), axis=0) == [2, 7])
