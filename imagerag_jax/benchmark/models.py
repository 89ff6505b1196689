"""Forward-pass benchmarks of our jitted Flax towers against diffusers/transformers in PyTorch.

Both sides get the same random weights (ours are converted from the PyTorch state dict in
process) and the same inputs; the outputs are compared too, so a fast wrong port cannot pass.
"""

from __future__ import annotations

import argparse
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from imagerag_jax.benchmark import common

UNET_CONFIGS = {
    "sd21": dict(
        block_out_channels=(320, 640, 1280, 1280),
        layers_per_block=2,
        down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
        cross_attention_dim=1024,
        attention_head_dim=(5, 10, 20, 20),
        use_linear_projection=True,
    ),
    "tiny": dict(
        block_out_channels=(32, 64),
        layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=64,
        attention_head_dim=(2, 4),
        use_linear_projection=True,
        norm_num_groups=8,
    ),
}
VAE_CONFIGS = {
    "sd21": dict(
        block_out_channels=(128, 256, 512, 512),
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        layers_per_block=2,
        latent_channels=4,
    ),
    "tiny": dict(
        block_out_channels=(32, 64),
        down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2,
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=8,
    ),
}
TEXT_CONFIGS = {
    "sd21": dict(
        vocab_size=49408, hidden_size=1024, intermediate_size=4096, num_hidden_layers=23,
        num_attention_heads=16, max_position_embeddings=77, hidden_act="gelu",
        bos_token_id=49406, eos_token_id=49407, pad_token_id=1,
    ),
    "tiny": dict(
        vocab_size=1000, hidden_size=64, intermediate_size=256, num_hidden_layers=2,
        num_attention_heads=4, max_position_embeddings=77, hidden_act="gelu",
        bos_token_id=998, eos_token_id=999, pad_token_id=1,
    ),
}


def torch_unet(config: str):
    """A randomly initialised diffusers UNet of the named configuration."""
    import diffusers

    return diffusers.UNet2DConditionModel(**UNET_CONFIGS[config]).eval()


def torch_vae(config: str):
    """A randomly initialised diffusers AutoencoderKL of the named configuration."""
    import diffusers

    return diffusers.AutoencoderKL(**VAE_CONFIGS[config]).eval()


def torch_text(config: str):
    """A randomly initialised transformers CLIPTextModel of the named configuration."""
    import transformers

    return transformers.CLIPTextModel(transformers.CLIPTextConfig(**TEXT_CONFIGS[config])).eval()


def to_flax(component: str, model: Any, attention_impl: str = "auto", dtype: Any = jnp.float32):
    """Our module and params converted from a PyTorch model's config and state dict."""
    from imagerag_jax.weights import from_torch

    cfg = dict(model.config) if component != "text_encoder" else model.config.to_dict()
    module = from_torch.build_module(component, cfg, attention_impl=attention_impl, dtype=dtype)
    tensors = ((k, v.detach().numpy()) for k, v in model.state_dict().items())
    return module, from_torch.params_from_tensors(component, module, tensors)


def _torch_runner(fn):
    import torch

    def run():
        with torch.no_grad():
            return fn()

    return run


def bench_unet(args: argparse.Namespace) -> dict[str, Any]:
    """Full UNet forward (eps prediction) at the given latent size and batch."""
    import torch

    torch.manual_seed(0)
    model = torch_unet(args.config)
    unet, params = to_flax("unet", model, args.attention)
    rng = np.random.default_rng(0)
    x = rng.standard_normal((args.batch, 4, args.latent, args.latent), dtype=np.float32)
    ctx = rng.standard_normal((args.batch, 77, unet.cross_attention_dim), dtype=np.float32)
    t = np.full((args.batch,), 999)
    fwd = jax.jit(unet.apply)
    xj, tj, cj = jnp.asarray(x.transpose(0, 2, 3, 1)), jnp.asarray(t), jnp.asarray(ctx)
    ours_fn = lambda: fwd({"params": params}, xj, tj, cj).block_until_ready()
    xt, tt, ct = torch.from_numpy(x), torch.from_numpy(t), torch.from_numpy(ctx)
    ref_fn = _torch_runner(lambda: model(xt, tt, ct).sample)
    return _compare("unet", ours_fn, ref_fn, args, lambda o: np.asarray(o).transpose(0, 3, 1, 2))


def bench_vae(args: argparse.Namespace) -> dict[str, Any]:
    """VAE decode of a latent to pixels (the costly half of the VAE at inference)."""
    import torch

    torch.manual_seed(0)
    model = torch_vae(args.config)
    vae, params = to_flax("vae", model)
    z = np.random.default_rng(0).standard_normal((args.batch, 4, args.latent, args.latent), dtype=np.float32)
    dec = jax.jit(lambda p, z: vae.apply({"params": p}, z, method=vae.decode))
    zj = jnp.asarray(z.transpose(0, 2, 3, 1))
    ours_fn = lambda: dec(params, zj).block_until_ready()
    zt = torch.from_numpy(z)
    ref_fn = _torch_runner(lambda: model.decode(zt).sample)
    return _compare("vae-decode", ours_fn, ref_fn, args, lambda o: np.asarray(o).transpose(0, 3, 1, 2))


def bench_text(args: argparse.Namespace) -> dict[str, Any]:
    """Text encoder forward on 77 tokens."""
    import torch

    torch.manual_seed(0)
    model = torch_text(args.config)
    text, params = to_flax("text_encoder", model)
    cfg = TEXT_CONFIGS[args.config]
    ids = np.random.default_rng(0).integers(0, cfg["vocab_size"] - 2, (args.batch, 77)).astype(np.int64)
    ids[:, 10] = cfg["eos_token_id"]
    enc = jax.jit(lambda p, i: text.apply({"params": p}, i)[0])
    ij = jnp.asarray(ids, jnp.int32)
    ours_fn = lambda: enc(params, ij).block_until_ready()
    it = torch.from_numpy(ids)
    ref_fn = _torch_runner(lambda: model(it).last_hidden_state)
    return _compare("text-encoder", ours_fn, ref_fn, args, np.asarray)


def bench_pipeline(args: argparse.Namespace) -> dict[str, Any]:
    """One-step generation: text encoder + one UNet step + VAE decode, both frameworks."""
    import torch

    from imagerag_jax.diffusion import schedule

    torch.manual_seed(0)
    tm_text, tm_unet, tm_vae = torch_text(args.config), torch_unet(args.config), torch_vae(args.config)
    text, text_p = to_flax("text_encoder", tm_text)
    unet, unet_p = to_flax("unet", tm_unet, args.attention)
    vae, vae_p = to_flax("vae", tm_vae)
    sched = schedule.scaled_linear_schedule()
    acp = float(sched.alphas_cumprod[999])
    cfg = TEXT_CONFIGS[args.config]
    ids = np.random.default_rng(0).integers(0, cfg["vocab_size"] - 2, (args.batch, 77)).astype(np.int64)
    ids[:, 10] = cfg["eos_token_id"]
    noise = np.random.default_rng(1).standard_normal((args.batch, 4, args.latent, args.latent), dtype=np.float32)

    @jax.jit
    def generate(text_p, unet_p, vae_p, ids, noise):
        # Params are arguments, not closed-over constants (XLA would embed 5 GB of them).
        ctx, _ = text.apply({"params": text_p}, ids)
        eps = unet.apply({"params": unet_p}, noise, jnp.full((noise.shape[0],), 999), ctx)
        x0 = (noise - np.sqrt(1 - acp) * eps) / np.sqrt(acp)
        return vae.apply({"params": vae_p}, x0 / 0.18215, method=vae.decode)

    ij, nj = jnp.asarray(ids, jnp.int32), jnp.asarray(noise.transpose(0, 2, 3, 1))
    ours_fn = lambda: generate(text_p, unet_p, vae_p, ij, nj).block_until_ready()
    it, nt = torch.from_numpy(ids), torch.from_numpy(noise)

    def ref():
        ctx = tm_text(it).last_hidden_state
        eps = tm_unet(nt, torch.full((nt.shape[0],), 999), ctx).sample
        x0 = (nt - np.sqrt(1 - acp) * eps) / np.sqrt(acp)
        return tm_vae.decode(x0 / 0.18215).sample

    return _compare("pipeline-1-step", ours_fn, _torch_runner(ref), args,
                    lambda o: np.asarray(o).transpose(0, 3, 1, 2))


def _compare(name, ours_fn, ref_fn, args, to_ref_layout) -> dict[str, Any]:
    """Check outputs agree, time both, print and return the result."""
    out, ref = to_ref_layout(ours_fn()), np.asarray(ref_fn())
    diff = common.max_abs_diff(out, ref)
    ours = common.time_fn(ours_fn, args.runs, warmup=1)
    theirs = None if args.no_reference else common.time_fn(ref_fn, args.runs, warmup=1)
    extra = f"[config={args.config} latent={args.latent} batch={args.batch} attention={args.attention}]"
    print(common.report(name, ours, theirs, extra))
    print(f"  max |ours - reference| = {diff:.3g} (reference max |x| {np.abs(ref).max():.3g})")
    result = {"name": name, "ours": ours, "reference": theirs, "max_abs_diff": diff}
    if theirs:
        result["ratio"] = ours["median_s"] / theirs["median_s"]
    result["machine"] = common.machine_info(FRAMEWORKS)
    return result


# What machine_info reports versions and threads of for these benchmarks.
FRAMEWORKS = ("jax", "torch")
BENCHMARKS = {"unet": bench_unet, "vae": bench_vae, "text": bench_text, "pipeline": bench_pipeline}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Flags shared by the model benchmarks."""
    parser.add_argument("--config", choices=sorted(UNET_CONFIGS), default="sd21")
    parser.add_argument("--latent", type=int, default=64, help="latent height/width")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--attention", default="auto", help="attention implementation")
    parser.add_argument("--no-reference", action="store_true", help="skip the PyTorch timing")
