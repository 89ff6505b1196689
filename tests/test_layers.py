"""The attention function: every implementation agrees with a float64 numpy reference."""

from __future__ import annotations

import numpy as np
import pytest
import jax.numpy as jnp

from imagerag_jax.models import layers


def reference(q, k, v):
    q, k, v = (np.asarray(x, np.float64).transpose(0, 2, 1, 3) for x in (q, k, v))
    s = q @ k.transpose(0, 1, 3, 2) / np.sqrt(q.shape[-1])
    p = np.exp(s - s.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    return (p @ v).transpose(0, 2, 1, 3)


@pytest.mark.parametrize("impl", ["auto", "chunked", "einsum", "xla"])
@pytest.mark.parametrize("lq", [77, 512])
def test_attention_implementations_match_reference(impl, lq):
    rng = np.random.default_rng(0)
    q = rng.standard_normal((2, lq, 3, 16), dtype=np.float32)
    k = rng.standard_normal((2, 300, 3, 16), dtype=np.float32)
    v = rng.standard_normal((2, 300, 3, 16), dtype=np.float32)
    out = layers.attention(jnp.asarray(q), jnp.asarray(k), jnp.asarray(v), implementation=impl)
    assert out.shape == (2, lq, 3, 16)
    np.testing.assert_allclose(np.asarray(out), reference(q, k, v), atol=2e-5)


def test_unknown_implementation_is_rejected():
    x = jnp.zeros((1, 4, 1, 8))
    with pytest.raises(ValueError, match="unknown attention implementation"):
        layers.attention(x, x, x, implementation="flash9")


@pytest.mark.parametrize("kernel,size,cin", [(3, 8, 256), (3, 16, 32), (1, 8, 16), (3, 32, 256)])
def test_conv_paths_match_xla_convolution(kernel, size, cin):
    """The unfolded-patch CPU path (and the plain one) equal lax.conv, values and gradients."""
    import jax

    rng = np.random.default_rng(1)
    x = jnp.asarray(rng.standard_normal((2, size, size, cin), dtype=np.float32))
    conv = layers.Conv(8, kernel)
    params = conv.init(jax.random.PRNGKey(0), x)["params"]
    pad = (kernel - 1) // 2

    def ours(p, x):
        return jnp.sum(jnp.sin(conv.apply({"params": p}, x)))

    def ref(p, x):
        y = jax.lax.conv_general_dilated(x, p["kernel"], (1, 1), ((pad, pad), (pad, pad)),
                                         dimension_numbers=("NHWC", "HWIO", "NHWC"),
                                         precision=jax.lax.Precision.HIGHEST)
        return jnp.sum(jnp.sin(y + p["bias"]))

    got, want = jax.grad(ours, (0, 1))(params, x), jax.grad(ref, (0, 1))(params, x)
    np.testing.assert_allclose(float(ours(params, x)), float(ref(params, x)), rtol=1e-4)
    for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
        np.testing.assert_allclose(np.asarray(g), np.asarray(w), atol=1e-3 * float(np.abs(w).max()))
