"""Diffusion noise schedules, prediction-type conversions and timestep spacings (NHWC, pure JAX)."""

from __future__ import annotations

import dataclasses
from typing import Union

import jax
import jax.numpy as jnp
import numpy as np

ArrayLike = Union[jax.Array, np.ndarray, int, float]

PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")
SCHEDULE_KINDS = ("scaled_linear", "linear")
SPACINGS = ("leading", "trailing", "linspace")


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class NoiseSchedule:
    """Discrete DDPM schedule: betas and cumulative alpha products (float32), length num_train_timesteps."""

    betas: jax.Array
    alphas_cumprod: jax.Array
    # Static under jit so timestep tables can be built in numpy while the arrays are traced.
    num_train_timesteps: int = dataclasses.field(metadata=dict(static=True))


def _schedule_from_betas(betas64: np.ndarray) -> NoiseSchedule:
    """Builds the schedule from float64 betas; cumprod in float64 then cast (error ~1e-6 rel. vs diffusers' fp32)."""
    alphas_cumprod = np.cumprod(1.0 - betas64)
    return NoiseSchedule(
        betas=jnp.asarray(betas64, jnp.float32),
        alphas_cumprod=jnp.asarray(alphas_cumprod, jnp.float32),
        num_train_timesteps=int(betas64.shape[0]),
    )


def scaled_linear_schedule(
    beta_start: float = 0.00085, beta_end: float = 0.012, num_train_timesteps: int = 1000
) -> NoiseSchedule:
    """Stable Diffusion's schedule: betas linear in sqrt space, then squared."""
    betas = np.linspace(beta_start**0.5, beta_end**0.5, num_train_timesteps, dtype=np.float64) ** 2
    return _schedule_from_betas(betas)


def linear_schedule(
    beta_start: float = 0.0001, beta_end: float = 0.02, num_train_timesteps: int = 1000
) -> NoiseSchedule:
    """The original DDPM linear beta schedule."""
    betas = np.linspace(beta_start, beta_end, num_train_timesteps, dtype=np.float64)
    return _schedule_from_betas(betas)


def make_schedule(
    kind: str = "scaled_linear",
    beta_start: float = 0.00085,
    beta_end: float = 0.012,
    num_train_timesteps: int = 1000,
) -> NoiseSchedule:
    """Builds a schedule by name ('scaled_linear' or 'linear')."""
    if kind == "scaled_linear":
        return scaled_linear_schedule(beta_start, beta_end, num_train_timesteps)
    if kind == "linear":
        return linear_schedule(beta_start, beta_end, num_train_timesteps)
    raise ValueError(f"unknown schedule kind {kind!r}; expected one of {SCHEDULE_KINDS}")


# ---------------------------------------------------------------------------------------------
# Per-timestep coefficients and prediction-type conversions.
# ---------------------------------------------------------------------------------------------


def check_prediction_type(prediction_type: str) -> None:
    """Raises ValueError unless prediction_type is one of PREDICTION_TYPES."""
    if prediction_type not in PREDICTION_TYPES:
        raise ValueError(
            f"unknown prediction_type {prediction_type!r}; expected one of {PREDICTION_TYPES}"
        )


def _bcast(coef: jax.Array, ndim: int) -> jax.Array:
    """Appends singleton axes so a scalar or per-example (B,) coefficient broadcasts over NHWC."""
    return coef.reshape(coef.shape + (1,) * (ndim - coef.ndim))


def alpha_sigma(t: ArrayLike, schedule: NoiseSchedule, ndim: int = 0) -> tuple[jax.Array, jax.Array]:
    """Returns (sqrt(acp_t), sqrt(1 - acp_t)) for integer t (scalar or (B,)), broadcastable to rank ndim."""
    acp = schedule.alphas_cumprod[jnp.asarray(t, jnp.int32)]
    alpha, sigma = jnp.sqrt(acp), jnp.sqrt(1.0 - acp)
    return _bcast(alpha, ndim), _bcast(sigma, ndim)


def add_noise(x0: jax.Array, eps: jax.Array, t: ArrayLike, schedule: NoiseSchedule) -> jax.Array:
    """Forward diffusion x_t = alpha_t x0 + sigma_t eps."""
    alpha, sigma = alpha_sigma(t, schedule, x0.ndim)
    return alpha * x0 + sigma * eps


def v_target(x0: jax.Array, eps: jax.Array, t: ArrayLike, schedule: NoiseSchedule) -> jax.Array:
    """Velocity target v = alpha_t eps - sigma_t x0 (Salimans & Ho)."""
    alpha, sigma = alpha_sigma(t, schedule, x0.ndim)
    return alpha * eps - sigma * x0


def predict_x0(
    model_output: jax.Array,
    x_t: jax.Array,
    t: ArrayLike,
    schedule: NoiseSchedule,
    prediction_type: str = "epsilon",
) -> jax.Array:
    """Clean-sample estimate from the model output of the given prediction type."""
    check_prediction_type(prediction_type)
    alpha, sigma = alpha_sigma(t, schedule, x_t.ndim)
    if prediction_type == "epsilon":
        return (x_t - sigma * model_output) / alpha
    if prediction_type == "v_prediction":
        return alpha * x_t - sigma * model_output
    return model_output


def predict_eps(
    model_output: jax.Array,
    x_t: jax.Array,
    t: ArrayLike,
    schedule: NoiseSchedule,
    prediction_type: str = "epsilon",
) -> jax.Array:
    """Noise estimate from the model output of the given prediction type."""
    check_prediction_type(prediction_type)
    alpha, sigma = alpha_sigma(t, schedule, x_t.ndim)
    if prediction_type == "epsilon":
        return model_output
    if prediction_type == "v_prediction":
        return alpha * model_output + sigma * x_t
    return (x_t - alpha * model_output) / sigma


# ---------------------------------------------------------------------------------------------
# Timestep tables (numpy, static: they fix the shapes and the unrolled structure of samplers).
# ---------------------------------------------------------------------------------------------


def _check_num_steps(num_steps: int, num_train_timesteps: int) -> None:
    """Raises ValueError unless 1 <= num_steps <= num_train_timesteps."""
    if not 1 <= int(num_steps) <= num_train_timesteps:
        raise ValueError(
            f"number of steps must be in [1, {num_train_timesteps}], got {num_steps}"
        )


def _spaced_timesteps(
    num_steps: int, num_train_timesteps: int, spacing: str, steps_offset: int
) -> np.ndarray:
    """Descending float64 timesteps as diffusers computes them; 'linspace' is left unrounded."""
    if spacing not in SPACINGS:
        raise ValueError(f"unknown timestep spacing {spacing!r}; expected one of {SPACINGS}")
    _check_num_steps(num_steps, num_train_timesteps)
    n, big_n = int(num_steps), int(num_train_timesteps)
    if spacing == "linspace":
        ts = np.linspace(0, big_n - 1, n, dtype=np.float64)[::-1]
    elif spacing == "leading":
        # Integer ratio: the steps start at 0 and stop short of N-1 (SD 1.x/2.x default, plus offset).
        ts = (np.arange(0, n) * (big_n // n)).round()[::-1].astype(np.float64) + steps_offset
    else:
        # Float ratio counted down from N: the first step is always N-1 (pure noise at t=999).
        ts = np.round(np.arange(big_n, 0, -big_n / n)) - 1.0
    ts = np.ascontiguousarray(ts)
    if ts.max() > big_n - 1 or ts.min() < 0:
        raise ValueError(
            f"timesteps {ts.tolist()} fall outside [0, {big_n - 1}] (spacing={spacing!r}, "
            f"steps_offset={steps_offset})"
        )
    return ts


def inference_timesteps(
    num_inference_steps: int,
    schedule: NoiseSchedule | int,
    spacing: str = "leading",
    steps_offset: int = 0,
) -> np.ndarray:
    """Descending int64 timesteps equal to diffusers DDIMScheduler.set_timesteps (linspace is rounded)."""
    big_n = schedule if isinstance(schedule, int) else schedule.num_train_timesteps
    return _spaced_timesteps(num_inference_steps, big_n, spacing, steps_offset).round().astype(np.int64)


def euler_timesteps(
    num_inference_steps: int,
    schedule: NoiseSchedule | int,
    spacing: str = "linspace",
    steps_offset: int = 0,
) -> np.ndarray:
    """Descending float32 timesteps equal to diffusers EulerDiscreteScheduler.set_timesteps (linspace unrounded)."""
    big_n = schedule if isinstance(schedule, int) else schedule.num_train_timesteps
    return _spaced_timesteps(num_inference_steps, big_n, spacing, steps_offset).astype(np.float32)


def student_timesteps(num_steps: int, num_train_timesteps: int = 1000) -> np.ndarray:
    """The few-step student's T_n (paper Sec. 3.4) as descending int64 timesteps.

    The paper gives T_n as fractions {1, (n-1)/n, ..., 1/n} of the N training steps (a 4-step student
    uses {1.0, 0.75, 0.5, 0.25}). Fraction f maps to the 0-based timestep round(f * N) - 1, i.e.
    t_i = round(N - i * N / n) - 1 for i = 0..n-1, so fraction 1.0 is the pure-noise step N-1:
    1 step -> [999], 4 steps -> [999, 749, 499, 249]. This equals diffusers' 'trailing' spacing,
    the one SD-Turbo's few-step sampling uses.
    """
    return inference_timesteps(num_steps, num_train_timesteps, spacing="trailing")
