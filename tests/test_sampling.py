"""sampling.py against diffusers' DDIMScheduler / EulerDiscreteScheduler steps and pipeline-style loops."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler, EulerDiscreteScheduler

from imagerag_jax.diffusion import sampling as smp
from imagerag_jax.diffusion import schedule as sch

SD = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")
B, H, W, C, L, D = 2, 4, 3, 4, 3, 8
SCHEDULE = sch.scaled_linear_schedule()


def assert_close(ours, ref) -> None:
    """fp32 parity: max |ours - ref| <= 1e-4 * max(1, max |ref|)."""
    ours, ref = np.asarray(ours, np.float64), np.asarray(ref, np.float64)
    assert ours.shape == ref.shape, (ours.shape, ref.shape)
    assert np.all(np.isfinite(ref)), "reference is not finite"
    err, bound = np.max(np.abs(ours - ref)), 1e-4 * max(1.0, float(np.max(np.abs(ref))))
    assert err <= bound, f"max|diff|={err:.3e} > {bound:.3e}"


def nchw(x_nhwc) -> torch.Tensor:
    """NHWC array -> NCHW torch (diffusers' layout)."""
    return torch.from_numpy(np.ascontiguousarray(np.asarray(x_nhwc).transpose(0, 3, 1, 2)))


def nhwc(x_nchw: torch.Tensor) -> np.ndarray:
    """NCHW torch -> NHWC numpy."""
    return x_nchw.detach().numpy().transpose(0, 2, 3, 1)


def randn(seed: int, *shape: int) -> np.ndarray:
    """Deterministic float32 normal array."""
    return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


# A deterministic fake denoiser, written once per framework. The channel term is layout dependent,
# so a wrong NHWC/NCHW transpose or a swapped cond/uncond order changes the result.
def fake_jax(x: jax.Array, t: jax.Array, ctx: jax.Array) -> jax.Array:
    """out = 0.1 x + 0.001 t + mean(ctx) + 0.05 * channel index (NHWC)."""
    per_example = 0.001 * t.astype(jnp.float32) + jnp.mean(ctx, axis=(1, 2))
    return 0.1 * x + per_example[:, None, None, None] + 0.05 * jnp.arange(x.shape[-1], dtype=x.dtype)


def fake_torch(x: torch.Tensor, t: torch.Tensor, ctx: torch.Tensor) -> torch.Tensor:
    """The same fake denoiser in NCHW torch."""
    per_example = 0.001 * t.to(torch.float32) + ctx.mean(dim=(1, 2))
    chan = 0.05 * torch.arange(x.shape[1], dtype=x.dtype)[None, :, None, None]
    return 0.1 * x + per_example[:, None, None, None] + chan


def diffusers_loop(sched, noise, ctx, uncond, n, guidance, eta=0.0, step_noises=None) -> np.ndarray:
    """Reference: the StableDiffusionPipeline denoising loop driving a diffusers scheduler (NCHW torch)."""
    sched.set_timesteps(n)
    x = nchw(noise) * sched.init_noise_sigma
    cfg = guidance > 1.0
    ctx_t = torch.from_numpy(np.concatenate([uncond, ctx]) if cfg else ctx)
    for i, t in enumerate(sched.timesteps):
        x_in = torch.cat([x, x]) if cfg else x
        x_in = sched.scale_model_input(x_in, t)
        out = fake_torch(x_in, t.expand(x_in.shape[0]), ctx_t)
        if cfg:
            out_u, out_c = out.chunk(2)
            out = out_u + guidance * (out_c - out_u)
        kwargs = {}
        if isinstance(sched, DDIMScheduler):
            kwargs = dict(eta=eta)
            if step_noises is not None:
                kwargs["variance_noise"] = nchw(step_noises[i])
        x = sched.step(out, t, x, **kwargs).prev_sample
    return nhwc(x)


def ddim_ref(prediction_type, spacing="leading", steps_offset=1, set_alpha_to_one=False):
    """diffusers DDIM in the SD 2.x configuration (no clipping)."""
    return DDIMScheduler(
        **SD, clip_sample=False, set_alpha_to_one=set_alpha_to_one, steps_offset=steps_offset,
        timestep_spacing=spacing, prediction_type=prediction_type,
    )


def euler_ref(prediction_type, spacing="linspace", steps_offset=0):
    """diffusers EulerDiscreteScheduler (default config apart from the SD betas)."""
    return EulerDiscreteScheduler(
        **SD, prediction_type=prediction_type, timestep_spacing=spacing, steps_offset=steps_offset
    )


# ------------------------------------------------------------------------------ single steps


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction", "sample"])
@pytest.mark.parametrize("set_alpha_to_one", [False, True])
@pytest.mark.parametrize("eta", [0.0, 0.7])
def test_ddim_step_matches_diffusers(prediction_type, set_alpha_to_one, eta):
    n = 10
    ref = ddim_ref(prediction_type, set_alpha_to_one=set_alpha_to_one)
    ref.set_timesteps(n)
    for k, t in enumerate([991, 501, 101, 1]):  # t=1 steps past 0: prev alpha is the "final" one
        out, x, vn = randn(10 + k, B, H, W, C), randn(20 + k, B, H, W, C), randn(30 + k, B, H, W, C)
        r = ref.step(nchw(out), t, nchw(x), eta=eta, variance_noise=nchw(vn) if eta > 0 else None)
        prev, x0 = smp.ddim_step(
            jnp.asarray(out), t, t - 1000 // n, jnp.asarray(x), SCHEDULE, prediction_type, eta,
            jnp.asarray(vn) if eta > 0 else None, set_alpha_to_one,
        )
        assert_close(prev, nhwc(r.prev_sample))
        assert_close(x0, nhwc(r.pred_original_sample))


def test_ddim_step_per_example_timesteps():
    """A (B,) timestep vector steps each example with its own coefficients."""
    ts, prevs = np.array([981, 41]), np.array([961, 21])
    out, x = randn(1, B, H, W, C), randn(2, B, H, W, C)
    prev, _ = smp.ddim_step(jnp.asarray(out), ts, prevs, jnp.asarray(x), SCHEDULE)
    ref = ddim_ref("epsilon")
    ref.set_timesteps(50)
    for b in range(B):
        r = ref.step(nchw(out[b : b + 1]), int(ts[b]), nchw(x[b : b + 1])).prev_sample
        assert_close(prev[b : b + 1], nhwc(r))


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction", "sample"])
@pytest.mark.parametrize("spacing,offset", [("linspace", 0), ("leading", 1), ("trailing", 0)])
def test_euler_steps_match_diffusers(prediction_type, spacing, offset):
    n = 6
    ref = euler_ref(prediction_type, spacing, offset)
    ref.set_timesteps(n)
    ts = sch.euler_timesteps(n, SCHEDULE, spacing, offset)
    sigmas = smp.euler_sigmas(ts, SCHEDULE)
    assert_close(sigmas, ref.sigmas.numpy())
    assert_close(smp.euler_init_noise_sigma(sigmas, spacing), float(ref.init_noise_sigma))
    for i, t in enumerate(ref.timesteps):
        out, x = randn(40 + i, B, H, W, C), randn(50 + i, B, H, W, C)
        scaled = ref.scale_model_input(nchw(x), t)
        assert_close(smp.euler_scale_model_input(jnp.asarray(x), sigmas[i]), nhwc(scaled))
        r = ref.step(nchw(out), t, nchw(x))
        prev, x0 = smp.euler_step(jnp.asarray(out), sigmas[i], sigmas[i + 1], jnp.asarray(x), prediction_type)
        assert_close(prev, nhwc(r.prev_sample))
        assert_close(x0, nhwc(r.pred_original_sample))


def test_cfg_combine():
    u, c = randn(1, B, H, W, C), randn(2, B, H, W, C)
    np.testing.assert_allclose(smp.cfg_combine(u, c, 7.5), u + 7.5 * (c - u), rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(smp.cfg_combine(u, c, 1.0), c, rtol=1e-6, atol=1e-6)


# ------------------------------------------------------------------------------ full loops


NOISE = randn(100, B, H, W, C)
CTX = randn(101, B, L, D)
UNCOND = randn(102, B, L, D) * 0.5 + 0.3


# Each prediction type, spacing and CFG on/off appears, without the full product (keeps the file fast).
DDIM_CASES = [
    ("epsilon", 7.5, "leading", 1, 10),  # SD 2.x default configuration
    ("v_prediction", 1.0, "leading", 1, 10),
    ("epsilon", 1.0, "trailing", 0, 4),
    ("v_prediction", 3.0, "linspace", 0, 7),  # prev_t = t - N // n is not the next timestep here
]
EULER_CASES = [
    ("epsilon", 7.5, "linspace", 0, 10),  # diffusers' default configuration
    ("v_prediction", 1.0, "linspace", 0, 10),
    ("epsilon", 3.0, "leading", 1, 5),
    ("v_prediction", 1.0, "trailing", 0, 1),  # SD-Turbo-style single step
]


@pytest.mark.parametrize("prediction_type,guidance,spacing,offset,n", DDIM_CASES)
def test_ddim_sample_matches_diffusers_loop(prediction_type, guidance, spacing, offset, n):
    ref = diffusers_loop(ddim_ref(prediction_type, spacing, offset), NOISE, CTX, UNCOND, n, guidance)
    ours = smp.ddim_sample(
        fake_jax, jnp.asarray(NOISE), jnp.asarray(CTX), jnp.asarray(UNCOND), SCHEDULE, n,
        guidance, prediction_type, spacing=spacing, steps_offset=offset,
    )
    assert_close(ours, ref)


def test_ddim_sample_eta_matches_diffusers_loop():
    """eta > 0: step i's variance noise is normal(fold_in(rng, i)); feed the same draws to diffusers."""
    n, eta, rng = 8, 1.0, jax.random.PRNGKey(3)
    draw = jax.jit(jax.vmap(lambda i: jax.random.normal(jax.random.fold_in(rng, i), NOISE.shape)))
    step_noises = np.asarray(draw(jnp.arange(n)))
    ref = diffusers_loop(ddim_ref("epsilon"), NOISE, CTX, UNCOND, n, 5.0, eta, step_noises)
    ours = smp.ddim_sample(
        fake_jax, jnp.asarray(NOISE), jnp.asarray(CTX), jnp.asarray(UNCOND), SCHEDULE, n, 5.0,
        eta=eta, rng=rng,
    )
    assert_close(ours, ref)


@pytest.mark.parametrize("prediction_type,guidance,spacing,offset,n", EULER_CASES)
def test_euler_sample_matches_diffusers_loop(prediction_type, guidance, spacing, offset, n):
    ref = diffusers_loop(euler_ref(prediction_type, spacing, offset), NOISE, CTX, UNCOND, n, guidance)
    ours = smp.euler_sample(
        fake_jax, jnp.asarray(NOISE), jnp.asarray(CTX), jnp.asarray(UNCOND), SCHEDULE, n,
        guidance, prediction_type, spacing=spacing, steps_offset=offset,
    )
    assert_close(ours, ref)


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_one_step_matches_ddim_single_trailing_step(prediction_type):
    """SD-Turbo one step = DDIM with one trailing step (t=999) and final alpha 1: x_prev is x0."""
    ref = diffusers_loop(ddim_ref(prediction_type, "trailing", 0, set_alpha_to_one=True), NOISE, CTX, None, 1, 0.0)
    ours = smp.one_step(fake_jax, jnp.asarray(NOISE), jnp.asarray(CTX), SCHEDULE, prediction_type)
    assert_close(ours, ref)
    # The one-step x0 formula, in float64 from diffusers' acp[999] ~ 0.00466.
    if prediction_type == "epsilon":
        a = float(DDIMScheduler(**SD).alphas_cumprod[999])
        eps = np.asarray(fake_jax(jnp.asarray(NOISE), jnp.full((B,), 999), jnp.asarray(CTX)), np.float64)
        assert_close(ours, (NOISE - np.sqrt(1 - a) * eps) / np.sqrt(a))


# ------------------------------------------------------------------------------ jit and CFG batching


def counting(fn):
    """Wraps a model callable, recording the batch size of every (trace-time) call."""
    calls: list[int] = []

    def wrapped(x, t, ctx):
        assert x.shape[0] == t.shape[0] == ctx.shape[0]
        calls.append(x.shape[0])
        return fn(x, t, ctx)

    return wrapped, calls


@pytest.mark.parametrize("sampler,guidance", [("ddim", 3.0), ("euler", 0.0)])
def test_samplers_jit_trace_model_once_with_cfg_batch(sampler, guidance):
    apply_fn, calls = counting(fake_jax)
    fn = {"ddim": smp.ddim_sample, "euler": smp.euler_sample}[sampler]
    run = jax.jit(functools.partial(fn, apply_fn, num_steps=12, guidance_scale=guidance))
    ours = run(jnp.asarray(NOISE), jnp.asarray(CTX), jnp.asarray(UNCOND), schedule=SCHEDULE)
    # One trace of the loop body: the 12 steps run inside lax.fori_loop, not a Python loop;
    # CFG batches cond and uncond into one call of 2B, guidance <= 1 skips the uncond pass.
    assert calls == [2 * B if guidance > 1 else B]
    sched = ddim_ref("epsilon") if sampler == "ddim" else euler_ref("epsilon")
    assert_close(ours, diffusers_loop(sched, NOISE, CTX, UNCOND, 12, guidance))


@pytest.mark.parametrize("sampler,guidance", [("ddim", 3.0), ("euler", 2.0), ("euler", 0.0)])
def test_multistep_sample_dispatches_to_the_named_sampler(sampler, guidance):
    x, c, u = jnp.asarray(NOISE), jnp.asarray(CTX), jnp.asarray(UNCOND)
    fn = {"ddim": smp.ddim_sample, "euler": smp.euler_sample}[sampler]
    want = fn(fake_jax, x, c, u, SCHEDULE, 4, guidance, "v_prediction")
    got = smp.multistep_sample(fake_jax, x, c, u, SCHEDULE, sampler, 4, guidance, "v_prediction")
    np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
    with pytest.raises(ValueError, match=r"unknown sampler 'lms'; expected one of"):
        smp.multistep_sample(fake_jax, x, c, u, SCHEDULE, "lms", 4, guidance)


def test_cfg_broadcasts_single_uncond_embedding():
    uncond1 = UNCOND[:1]
    ours = smp.ddim_sample(fake_jax, jnp.asarray(NOISE), jnp.asarray(CTX), jnp.asarray(uncond1), SCHEDULE, 5, 4.0)
    full = np.broadcast_to(uncond1, UNCOND.shape)
    ref = diffusers_loop(ddim_ref("epsilon"), NOISE, CTX, full, 5, 4.0)
    assert_close(ours, ref)


# ------------------------------------------------------------------------------ errors


def test_bad_arguments_raise_clear_errors():
    x, c = jnp.asarray(NOISE), jnp.asarray(CTX)
    with pytest.raises(ValueError, match=r"'x0'.*epsilon.*v_prediction.*sample"):
        smp.ddim_sample(fake_jax, x, c, None, SCHEDULE, 4, prediction_type="x0")
    with pytest.raises(ValueError, match=r"'x0'.*epsilon.*v_prediction.*sample"):
        smp.euler_sample(fake_jax, x, c, None, SCHEDULE, 4, prediction_type="x0")
    with pytest.raises(ValueError, match=r"'x0'.*epsilon.*v_prediction.*sample"):
        smp.one_step(fake_jax, x, c, SCHEDULE, prediction_type="x0")
    with pytest.raises(ValueError, match=r"'x0'.*epsilon.*v_prediction.*sample"):
        smp.ddim_step(x, 10, 0, x, SCHEDULE, "x0")
    with pytest.raises(ValueError, match=r"'x0'.*epsilon.*v_prediction.*sample"):
        smp.euler_step(x, 1.0, 0.0, x, "x0")
    with pytest.raises(ValueError, match=r"unknown timestep spacing 'cosine'"):
        smp.ddim_sample(fake_jax, x, c, None, SCHEDULE, 4, spacing="cosine")
    with pytest.raises(ValueError, match=r"unknown timestep spacing 'cosine'"):
        smp.euler_sample(fake_jax, x, c, None, SCHEDULE, 4, spacing="cosine")
    with pytest.raises(ValueError, match=r"needs an uncond_context"):
        smp.ddim_sample(fake_jax, x, c, None, SCHEDULE, 4, guidance_scale=7.5)
    with pytest.raises(ValueError, match=r"eta > 0 needs `rng`"):
        smp.ddim_sample(fake_jax, x, c, None, SCHEDULE, 4, eta=0.5)
    with pytest.raises(ValueError, match=r"eta > 0 needs `noise`"):
        smp.ddim_step(x, 10, 0, x, SCHEDULE, eta=0.5)
