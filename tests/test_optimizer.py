"""The generator's optimiser: the adapter's learning-rate multiplier against plain AdamW steps."""

import jax.numpy as jnp
import numpy as np
import optax
import pytest

from imagerag_jax.training import step

ADAMW = dict(lr=1e-3, b1=0.9, b2=0.999, eps=1e-8, weight_decay=0.01, grad_clip_norm=0.0)


def _two_steps(cfg):
    params = {"adapter": {"w": jnp.array([1.0, -2.0])}, "lora": {"a": jnp.array([0.5, 3.0, -1.0])}}
    grads = [{"adapter": {"w": jnp.array([0.3, -0.1])}, "lora": {"a": jnp.array([1.0, -2.0, 0.5])}},
             {"adapter": {"w": jnp.array([-0.2, 0.4])}, "lora": {"a": jnp.array([0.1, 0.2, -0.3])}}]
    tx = step.make_optimizer(cfg)
    state, out = tx.init(params), []
    for g in grads:
        updates, state = tx.update(g, state, params)
        params = optax.apply_updates(params, updates)
        out.append(updates)
    return out, state


def test_adapter_steps_are_scaled_and_the_lora_steps_are_not():
    plain, _ = _two_steps(ADAMW)
    scaled, state = _two_steps({**ADAMW, "adapter_lr_multiplier": 10.0})
    # Step 1: the same moments, so exactly 10x for the adapter; later steps see the moved params
    # only through the weight decay, so compare step 1 exactly and step 2 for the LoRA.
    np.testing.assert_allclose(scaled[0]["adapter"]["w"], 10.0 * plain[0]["adapter"]["w"], rtol=1e-6)
    np.testing.assert_allclose(scaled[0]["lora"]["a"], plain[0]["lora"]["a"], rtol=1e-6)
    np.testing.assert_allclose(scaled[1]["lora"]["a"], plain[1]["lora"]["a"], rtol=1e-6)
    # Adam's first step is -lr * sign(g) - lr * wd * p: check one entry by hand.
    np.testing.assert_allclose(float(plain[0]["adapter"]["w"][0]), -1e-3 * (1.0 + 0.01 * 1.0), rtol=1e-4)
    assert float(state.hyperparams["learning_rate"]) == pytest.approx(1e-3)  # with_learning_rates reads it


def test_non_positive_multiplier_is_refused():
    with pytest.raises(ValueError, match="adapter_lr_multiplier must be > 0, got 0.0"):
        step.make_optimizer({**ADAMW, "adapter_lr_multiplier": 0.0})
