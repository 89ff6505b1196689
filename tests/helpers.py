"""Shared test helpers: layout conversion and the fp32 parity tolerance (docs/design.md, "Numerics")."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np


def nhwc(x: np.ndarray) -> jnp.ndarray:
    """NCHW numpy (PyTorch layout) -> NHWC jax array."""
    return jnp.asarray(np.transpose(x, (0, 2, 3, 1)))


def nchw(x) -> np.ndarray:
    """NHWC jax array -> NCHW numpy, for comparison with PyTorch outputs."""
    return np.transpose(np.asarray(x, np.float32), (0, 3, 1, 2))


def parity_error(out, ref) -> tuple[float, float]:
    """(max |out - ref|, allowed) with allowed = 1e-4 * max(1, max |ref|)."""
    out = np.asarray(out, np.float64)
    ref = np.asarray(ref, np.float64)
    assert out.shape == ref.shape, f"shape {out.shape} != reference {ref.shape}"
    return float(np.abs(out - ref).max()), 1e-4 * max(1.0, float(np.abs(ref).max()))


def assert_parity(out, ref) -> None:
    """Fail unless max |out - ref| <= 1e-4 * max(1, max |ref|) (fp32 parity bar)."""
    err, allowed = parity_error(out, ref)
    assert err <= allowed, f"max |diff| {err:.3g} exceeds {allowed:.3g}"
