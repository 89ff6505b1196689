"""Samplers as pure functions: SD-Turbo one step, DDIM and Euler with CFG, and the H-space edits.

`apply_fn(sample_nhwc, timesteps_(B,), context_(B,L,D)) -> model_output` is the model interface of
the plain samplers; wrap the UNet as `lambda x, t, c: unet.apply({'params': p}, x, t, c)`. Every
multi-step loop runs in `lax.fori_loop`, so a whole sampler traces the model once and jits as one
program; `multistep_sample` is the one place that chooses DDIM or Euler. The H-space functions
(ImageRAGTurbo's adapter step, direct injection, the per-prompt w search) take the UNet module
and params and call its encode() / decode() around the mid block. Step counts, guidance scale,
eta, spacing and prediction type are static Python values; nothing here loads files.
"""

from __future__ import annotations

from typing import Callable, Optional

import jax
import jax.numpy as jnp
import numpy as np

from imagerag_jax.errors import UserError
from imagerag_jax.models.adapter import inject, slerp_blend
from imagerag_jax.diffusion.schedule import (
    NoiseSchedule,
    check_prediction_type,
    euler_timesteps,
    inference_timesteps,
    make_schedule,
    predict_eps,
    predict_x0,
)

ApplyFn = Callable[[jax.Array, jax.Array, jax.Array], jax.Array]


# ---------------------------------------------------------------------------------------------
# Classifier-free guidance.
# ---------------------------------------------------------------------------------------------


def cfg_combine(eps_uncond: jax.Array, eps_cond: jax.Array, scale: float) -> jax.Array:
    """Classifier-free guidance: uncond + scale * (cond - uncond)."""
    return eps_uncond + scale * (eps_cond - eps_uncond)


def uses_cfg(guidance_scale: float, uncond_context: Optional[jax.Array]) -> bool:
    """True when guidance needs the unconditional pass (diffusers: guidance_scale > 1)."""
    use = float(guidance_scale) > 1.0
    if use and uncond_context is None:
        raise ValueError(f"guidance_scale={guidance_scale} > 1 needs an uncond_context")
    return use


def guided_model_output(
    apply_fn: ApplyFn,
    x_in: jax.Array,
    t: jax.Array,
    context: jax.Array,
    uncond_context: Optional[jax.Array],
    guidance_scale: float,
) -> jax.Array:
    """Model output at scalar timestep t, with CFG as one batched call of 2B when guidance_scale > 1."""
    batch = x_in.shape[0]
    t_b = jnp.broadcast_to(t, (batch,))
    if not uses_cfg(guidance_scale, uncond_context):
        return apply_fn(x_in, t_b, context)
    # Uncond first, as diffusers pipelines concatenate; a (1,L,D) uncond embedding broadcasts.
    uncond = jnp.broadcast_to(uncond_context, context.shape).astype(context.dtype)
    out = apply_fn(
        jnp.concatenate([x_in, x_in]),
        jnp.concatenate([t_b, t_b]),
        jnp.concatenate([uncond, context]),
    )
    out_uncond, out_cond = jnp.split(out, 2)
    return cfg_combine(out_uncond, out_cond, guidance_scale)


# ---------------------------------------------------------------------------------------------
# One-step sampling (SD-Turbo student).
# ---------------------------------------------------------------------------------------------


def one_step(
    apply_fn: ApplyFn,
    noise: jax.Array,
    context: jax.Array,
    schedule: NoiseSchedule,
    prediction_type: str = "epsilon",
    timestep: int = 999,
) -> jax.Array:
    """SD-Turbo one step: x_t = noise (DDPM scaling, init sigma 1), return x0 predicted at `timestep`."""
    # Equals DDIM with one 'trailing' step and final alpha 1. An Euler 'trailing' pipeline instead
    # feeds sqrt(1 - acp_999) * noise (0.9977 * noise) to the model; use euler_sample(num_steps=1,
    # spacing='trailing') to reproduce that one.
    check_prediction_type(prediction_type)
    t = jnp.full((noise.shape[0],), timestep, jnp.int32)
    out = apply_fn(noise, t, context)
    return predict_x0(out, noise, t, schedule, prediction_type).astype(noise.dtype)


# ---------------------------------------------------------------------------------------------
# DDIM.
# ---------------------------------------------------------------------------------------------


def ddim_step(
    model_output: jax.Array,
    t: jax.Array | int,
    prev_t: jax.Array | int,
    x_t: jax.Array,
    schedule: NoiseSchedule,
    prediction_type: str = "epsilon",
    eta: float = 0.0,
    noise: Optional[jax.Array] = None,
    set_alpha_to_one: bool = False,
) -> tuple[jax.Array, jax.Array]:
    """One DDIM update t -> prev_t as diffusers DDIMScheduler.step (no clipping); returns (x_prev, x0)."""
    check_prediction_type(prediction_type)
    if noise is None and not (isinstance(eta, (int, float)) and eta == 0):
        raise ValueError("ddim_step with eta > 0 needs `noise` (the variance noise for this step)")
    acp = schedule.alphas_cumprod
    t = jnp.asarray(t, jnp.int32)
    prev_t = jnp.asarray(prev_t, jnp.int32)
    # Past the last step there is no previous alpha: diffusers uses 1 or acp[0] (SD configs: acp[0]).
    final = jnp.ones((), acp.dtype) if set_alpha_to_one else acp[0]
    a_t = _expand(acp[t], x_t.ndim)
    a_prev = _expand(jnp.where(prev_t >= 0, acp[jnp.maximum(prev_t, 0)], final), x_t.ndim)

    x0 = predict_x0(model_output, x_t, t, schedule, prediction_type)
    eps = predict_eps(model_output, x_t, t, schedule, prediction_type)
    variance = (1.0 - a_prev) / (1.0 - a_t) * (1.0 - a_t / a_prev)
    std = eta * jnp.sqrt(variance)
    # Clamp: at eta=1 the direction coefficient is 0 up to rounding, which must not turn into NaN.
    direction = jnp.sqrt(jnp.maximum(1.0 - a_prev - std**2, 0.0)) * eps
    x_prev = jnp.sqrt(a_prev) * x0 + direction
    if noise is not None:
        x_prev = x_prev + std * noise
    return x_prev, x0


def ddim_sample(
    apply_fn: ApplyFn,
    noise: jax.Array,
    context: jax.Array,
    uncond_context: Optional[jax.Array],
    schedule: NoiseSchedule,
    num_steps: int,
    guidance_scale: float = 1.0,
    prediction_type: str = "epsilon",
    eta: float = 0.0,
    spacing: str = "leading",
    steps_offset: int = 1,
    set_alpha_to_one: bool = False,
    rng: Optional[jax.Array] = None,
) -> jax.Array:
    """DDIM sampling with CFG from noise (init sigma 1); step i's variance noise is normal(fold_in(rng, i))."""
    check_prediction_type(prediction_type)
    if eta > 0 and rng is None:
        raise ValueError("ddim_sample with eta > 0 needs `rng`")
    uses_cfg(guidance_scale, uncond_context)
    ts = inference_timesteps(num_steps, schedule, spacing, steps_offset)
    # diffusers steps back by N // n whatever the spacing, so prev_t need not be the next timestep.
    prev = ts - schedule.num_train_timesteps // num_steps
    ts_j, prev_j = jnp.asarray(ts, jnp.int32), jnp.asarray(prev, jnp.int32)

    def body(i: jax.Array, x: jax.Array) -> jax.Array:
        t = ts_j[i]
        out = guided_model_output(apply_fn, x, t, context, uncond_context, guidance_scale)
        step_noise = None
        if eta > 0:
            step_noise = jax.random.normal(jax.random.fold_in(rng, i), x.shape, x.dtype)
        x_prev, _ = ddim_step(
            out, t, prev_j[i], x, schedule, prediction_type, eta, step_noise, set_alpha_to_one
        )
        return x_prev.astype(x.dtype)

    return jax.lax.fori_loop(0, num_steps, body, noise)


# ---------------------------------------------------------------------------------------------
# Euler (discrete, k-diffusion sigma parameterisation).
# ---------------------------------------------------------------------------------------------


def euler_sigmas(timesteps: np.ndarray, schedule: NoiseSchedule) -> jax.Array:
    """Sigmas sqrt((1-acp)/acp) linearly interpolated at (possibly fractional) timesteps, plus a final 0."""
    acp = schedule.alphas_cumprod
    full = jnp.sqrt((1.0 - acp) / acp)
    grid = jnp.arange(schedule.num_train_timesteps, dtype=jnp.float32)
    sigmas = jnp.interp(jnp.asarray(timesteps, jnp.float32), grid, full)
    return jnp.concatenate([sigmas, jnp.zeros((1,), sigmas.dtype)])


def euler_init_noise_sigma(sigmas: jax.Array, spacing: str) -> jax.Array:
    """diffusers' init_noise_sigma: max sigma, or sqrt(max^2 + 1) for 'leading' spacing."""
    max_sigma = jnp.max(sigmas)
    if spacing in ("linspace", "trailing"):
        return max_sigma
    return jnp.sqrt(max_sigma**2 + 1.0)


def euler_scale_model_input(x: jax.Array, sigma: jax.Array) -> jax.Array:
    """Maps the sigma-scaled sample back to the model's DDPM scale: x / sqrt(sigma^2 + 1)."""
    return x / jnp.sqrt(sigma**2 + 1.0)


def euler_step(
    model_output: jax.Array,
    sigma: jax.Array | float,
    sigma_next: jax.Array | float,
    x: jax.Array,
    prediction_type: str = "epsilon",
) -> tuple[jax.Array, jax.Array]:
    """One Euler update sigma -> sigma_next as diffusers EulerDiscreteScheduler.step (s_churn=0); returns (x_next, x0)."""
    check_prediction_type(prediction_type)
    sigma = jnp.asarray(sigma, jnp.float32)
    if prediction_type == "epsilon":
        x0 = x - sigma * model_output
    elif prediction_type == "v_prediction":
        x0 = model_output * (-sigma / jnp.sqrt(sigma**2 + 1.0)) + x / (sigma**2 + 1.0)
    else:
        x0 = model_output
    derivative = (x - x0) / sigma
    x_next = x + derivative * (sigma_next - sigma)
    return x_next, x0


def euler_sample(
    apply_fn: ApplyFn,
    noise: jax.Array,
    context: jax.Array,
    uncond_context: Optional[jax.Array],
    schedule: NoiseSchedule,
    num_steps: int,
    guidance_scale: float = 1.0,
    prediction_type: str = "epsilon",
    spacing: str = "linspace",
    steps_offset: int = 0,
) -> jax.Array:
    """Euler discrete sampling with CFG, as diffusers EulerDiscreteScheduler (default config) in a pipeline."""
    check_prediction_type(prediction_type)
    uses_cfg(guidance_scale, uncond_context)
    ts_j = jnp.asarray(euler_timesteps(num_steps, schedule, spacing, steps_offset))
    sigmas = euler_sigmas(ts_j, schedule)
    x_init = (noise * euler_init_noise_sigma(sigmas, spacing)).astype(noise.dtype)

    def body(i: jax.Array, x: jax.Array) -> jax.Array:
        sigma = sigmas[i]
        x_in = euler_scale_model_input(x, sigma).astype(x.dtype)
        out = guided_model_output(apply_fn, x_in, ts_j[i], context, uncond_context, guidance_scale)
        x_next, _ = euler_step(out, sigma, sigmas[i + 1], x, prediction_type)
        return x_next.astype(x.dtype)

    return jax.lax.fori_loop(0, num_steps, body, x_init)


SAMPLERS = ("euler", "ddim")


def check_sampler(sampler: str) -> None:
    """UserError unless `sampler` is one of SAMPLERS."""
    if sampler not in SAMPLERS:
        raise UserError(f"unknown sampler {sampler!r}; expected one of {SAMPLERS}")


def multistep_sample(
    apply_fn: ApplyFn,
    noise: jax.Array,
    context: jax.Array,
    uncond_context: Optional[jax.Array],
    schedule: NoiseSchedule,
    sampler: str,
    num_steps: int,
    guidance_scale: float = 1.0,
    prediction_type: str = "epsilon",
) -> jax.Array:
    """`sampler` ('euler' | 'ddim', each with its default spacing) with CFG from noise."""
    check_sampler(sampler)
    fn = ddim_sample if sampler == "ddim" else euler_sample
    return fn(apply_fn, noise, context, uncond_context, schedule, num_steps, guidance_scale,
              prediction_type)


# ---------------------------------------------------------------------------------------------
# Shared helpers.
# ---------------------------------------------------------------------------------------------


def _expand(coef: jax.Array, ndim: int) -> jax.Array:
    """Appends singleton axes so a scalar or per-example (B,) coefficient broadcasts over NHWC."""
    return coef.reshape(coef.shape + (1,) * (ndim - coef.ndim))


# ---------------------------------------------------------------------------------------------
# Text to image with the three SD towers.
# ---------------------------------------------------------------------------------------------


def ids_to_images(
    pipe,
    ids: jax.Array,
    uncond_ids: Optional[jax.Array],
    noise: jax.Array,
    *,
    steps: int = 1,
    guidance: float = 0.0,
    sampler: str = "euler",
    schedule: Optional[NoiseSchedule] = None,
) -> jax.Array:
    """Prompt ids -> images in [-1, 1] (B, H, W, 3): text encoder, sampler, VAE decode, one jit.

    ``pipe`` is a ``weights.SDTowers`` (any object with unet/vae/text_encoder and their params).
    One step without guidance is the SD-Turbo path (``one_step`` at t=999); otherwise the chosen
    multi-step sampler with classifier-free guidance when ``guidance > 1``.
    """
    check_sampler(sampler)
    if steps < 1:
        raise UserError(f"steps must be >= 1, got {steps}")
    schedule = schedule or make_schedule("scaled_linear")
    use_cfg = float(guidance) > 1.0
    if use_cfg and uncond_ids is None:
        raise ValueError("guidance > 1 needs uncond_ids (the negative prompt's token ids)")
    pred = pipe.prediction_type

    @jax.jit
    def run(unet_p, vae_p, text_p, ids, uncond_ids, noise):
        encode = lambda i: pipe.text_encoder.apply({"params": text_p}, i)[0]
        context = encode(ids)
        uncond = encode(uncond_ids) if use_cfg else None
        apply_fn = lambda x, t, c: pipe.unet.apply({"params": unet_p}, x, t, c)
        if steps == 1 and not use_cfg:
            latents = one_step(apply_fn, noise, context, schedule, pred)
        else:
            latents = multistep_sample(apply_fn, noise, context, uncond, schedule, sampler, steps,
                                       guidance, pred)
        return pipe.vae.apply({"params": vae_p}, latents, method=pipe.vae.decode_latents)

    return run(pipe.unet_params, pipe.vae_params, pipe.text_params, ids,
               ids if uncond_ids is None else uncond_ids, noise)


# ---------------------------------------------------------------------------------------------
# H-space edits: ImageRAGTurbo one step (paper Eq. 4-5), direct injection (Eq. 3), w search.
# ---------------------------------------------------------------------------------------------

# The paper's predefined blending strengths for the per-prompt search (Sec. 3.2).
INJECTION_WEIGHTS = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)


def _timesteps(timestep: jax.Array | int, batch: int) -> jax.Array:
    """A scalar or (B,) timestep as an int32 (B,) array."""
    return jnp.broadcast_to(jnp.asarray(timestep, jnp.int32).reshape(-1), (batch,))


def unet_encode(unet, unet_params, x_t: jax.Array, t: jax.Array, context: jax.Array):
    """The UNet encoder: (h, skips, temb), h the H-space features (B, hh, ww, C)."""
    return unet.apply({"params": unet_params}, x_t, t, context, method=unet.encode)


def unet_decode(unet, unet_params, h: jax.Array, skips, temb: jax.Array, context: jax.Array) -> jax.Array:
    """The UNet decoder from (possibly edited) H-space features: eps or v."""
    return unet.apply({"params": unet_params}, h, skips, temb, context, method=unet.decode)


def hspace_edit_x0(
    unet,
    unet_params,
    x_t: jax.Array,
    timestep: jax.Array | int,
    context: jax.Array,
    edit_fn: Callable[[jax.Array], jax.Array],
    schedule: NoiseSchedule,
    prediction_type: str = "epsilon",
) -> jax.Array:
    """x0 predicted at ``timestep`` from x_t with the H-space replaced by edit_fn(h) before decoding."""
    check_prediction_type(prediction_type)
    t = _timesteps(timestep, x_t.shape[0])
    h, skips, temb = unet_encode(unet, unet_params, x_t, t, context)
    out = unet_decode(unet, unet_params, edit_fn(h), skips, temb, context)
    return predict_x0(out, x_t, t, schedule, prediction_type).astype(x_t.dtype)


def retrieved_hspace(
    unet,
    unet_params,
    retr_latents: jax.Array,
    retr_context: jax.Array,
    *,
    stop_gradient: bool = True,
) -> jax.Array:
    """H-space of every neighbour, (B,k,h,w,c) latents + (B,k,L,D) embeds -> (B,k,hh,ww,C).

    The frozen encoder at t = 0 (retrieved latents are clean, paper Sec. 3.2), one encode call on
    the B*k neighbours. A pure function of the DB entry (cacheable); gradients are stopped because
    the paper's retrieved branch is frozen.
    """
    b, k = retr_latents.shape[:2]
    if retr_context.shape[:2] != (b, k):
        raise ValueError(f"retr_context {retr_context.shape} does not match retr_latents {retr_latents.shape}")
    x = retr_latents.reshape(b * k, *retr_latents.shape[2:])
    ctx = retr_context.reshape(b * k, *retr_context.shape[2:])
    h, _, _ = unet_encode(unet, unet_params, x, jnp.zeros((b * k,), jnp.int32), ctx)
    h = h.reshape(b, k, *h.shape[1:])
    return jax.lax.stop_gradient(h) if stop_gradient else h


def imagerag_x0(
    unet,
    unet_params,
    adapter,
    adapter_params,
    x_t: jax.Array,
    timestep: jax.Array | int,
    context: jax.Array,
    h_retr: jax.Array,
    lam: jax.Array | float,
    schedule: NoiseSchedule,
    prediction_type: str = "epsilon",
) -> jax.Array:
    """ImageRAGTurbo's x0 from any x_t, t (Sec. 3.4): h = h_tgt + lam * adapter(h_tgt, h_retr) (Eq. 5)."""

    def edit(h: jax.Array) -> jax.Array:
        delta = adapter.apply({"params": adapter_params}, h, h_retr)
        return inject(h, delta, lam)

    return hspace_edit_x0(unet, unet_params, x_t, timestep, context, edit, schedule, prediction_type)


def imagerag_one_step(
    unet,
    unet_params,
    adapter,
    adapter_params,
    noise: jax.Array,
    context: jax.Array,
    h_retr: jax.Array,
    lam: jax.Array | float,
    schedule: NoiseSchedule,
    prediction_type: str = "epsilon",
    timestep: int = 999,
) -> jax.Array:
    """One-step ImageRAGTurbo: x_t = noise at t=999 (one_step's convention), adapter in H-space, x0.

    ``unet_params`` may be LoRA-merged by the caller; ``h_retr`` (B,k,hh,ww,C) comes from
    ``retrieved_hspace``; ``lam`` is a scalar or (B,) (``adapter.retrieval_lambda``).
    """
    return imagerag_x0(
        unet, unet_params, adapter, adapter_params, noise, timestep, context, h_retr, lam,
        schedule, prediction_type,
    )


def neighbour_sensitivity(x0: jax.Array, x0_shuffled: jax.Array, x0_plain: jax.Array) -> dict[str, jax.Array]:
    """How much a trained student uses what it retrieves, from three one-step predictions.

    ``x0``: with each example's retrieved neighbours; ``x0_shuffled``: the same call with the
    neighbours of another example (e.g. rolled by one over the batch, lambda kept);
    ``x0_plain``: the plain student's (the frozen UNet, no LoRA, no adapter). Returns
    ``neighbour_sensitivity`` = mean |x0 - x0_shuffled| / mean |x0 - x0_plain| (0: the edit
    ignores the neighbours' content; 1: swapping them moves the prediction as far as all of the
    fine-tuning did) with its two distances, ``.../shuffled_distance`` and ``.../plain_distance``.
    """
    moved = jnp.mean(jnp.abs(x0.astype(jnp.float32) - x0_shuffled.astype(jnp.float32)))
    from_plain = jnp.mean(jnp.abs(x0.astype(jnp.float32) - x0_plain.astype(jnp.float32)))
    return {"neighbour_sensitivity": moved / jnp.maximum(from_plain, 1e-12),
            "neighbour_sensitivity/shuffled_distance": moved,
            "neighbour_sensitivity/plain_distance": from_plain}


def direct_injection_one_step(
    unet,
    unet_params,
    noise: jax.Array,
    context: jax.Array,
    h_retr_single: jax.Array,
    w: jax.Array | float,
    schedule: NoiseSchedule,
    prediction_type: str = "epsilon",
    timestep: int = 999,
) -> jax.Array:
    """Training-free direct H-space injection (Sec. 3.2): decode slerp(h_retr, h_tgt, w) (Eq. 3).

    ``h_retr_single`` (B,hh,ww,C) is one neighbour's H-space (e.g. ``retrieved_hspace(...)[:, 0]``);
    ``w`` (scalar or (B,)) weights the target, w = 1 is the plain one-step output.
    """
    edit = lambda h: slerp_blend(h_retr_single, h, w)
    return hspace_edit_x0(unet, unet_params, noise, timestep, context, edit, schedule, prediction_type)


def search_injection_weight(
    unet,
    unet_params,
    noise: jax.Array,
    context: jax.Array,
    h_retr_single: jax.Array,
    schedule: NoiseSchedule,
    score_fn: Callable[[jax.Array], jax.Array],
    weights: tuple[float, ...] = INJECTION_WEIGHTS,
    prediction_type: str = "epsilon",
    timestep: int = 999,
    *,
    return_scores: bool = False,
    batch_size: Optional[int] = None,
):
    """Per-prompt exhaustive search of w (Sec. 3.2): returns (best_x0, best_w (B,)) [, scores (W,B)].

    The target is encoded once; the decoder runs for every w inside one ``lax.map`` (``batch_size``
    w's at a time, all when None), and ``score_fn(x0 (B,...)) -> (B,)`` (higher is better, must
    be traceable) scores each. Ties go to the first (smallest listed) w.
    """
    check_prediction_type(prediction_type)
    batch = noise.shape[0]
    t = _timesteps(timestep, batch)
    ws = jnp.asarray(weights, jnp.float32)
    h, skips, temb = unet_encode(unet, unet_params, noise, t, context)

    def run(w: jax.Array) -> tuple[jax.Array, jax.Array]:
        out = unet_decode(unet, unet_params, slerp_blend(h_retr_single, h, w), skips, temb, context)
        x0 = predict_x0(out, noise, t, schedule, prediction_type).astype(noise.dtype)
        return x0, score_fn(x0).reshape(batch)

    x0s, scores = jax.lax.map(run, ws, batch_size=batch_size)  # (W,B,...), (W,B)
    best = jnp.argmax(scores, axis=0)
    best_x0 = jnp.take_along_axis(x0s, best.reshape(1, batch, *([1] * (x0s.ndim - 2))), axis=0)[0]
    result = (best_x0, ws[best])
    return result + (scores,) if return_scores else result
