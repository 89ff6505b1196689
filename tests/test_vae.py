"""AutoencoderKL: parity with diffusers through our loader, bf16 compute, loader errors."""

from __future__ import annotations

import json
import os
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")
safetensors_torch = pytest.importorskip("safetensors.torch")

from imagerag_jax import weights  # noqa: E402
from imagerag_jax.models.vae import AutoencoderKL, sample_latent  # noqa: E402
from imagerag_jax.weights import WeightLoadError  # noqa: E402

WEIGHTS_FILE = "diffusion_pytorch_model.safetensors"
# bf16 compute (fp32 params, fp32 moments/pixels) against the fp32 result of the same params:
# ~8 mantissa bits through ~20 norm/conv layers lands near 1e-2 relative; 5e-2 leaves headroom.
BF16_TOL = 5e-2


def _cfg(chans: list[int], **kw: Any) -> dict[str, Any]:
    """A diffusers AutoencoderKL config with one encoder/decoder block per channel entry."""
    n = len(chans)
    return dict(block_out_channels=chans, down_block_types=["DownEncoderBlock2D"] * n,
                up_block_types=["UpDecoderBlock2D"] * n, **kw)


TINY = _cfg([32, 64], norm_num_groups=8, layers_per_block=2)
TINY_3_BLOCKS = _cfg([32, 32, 64], norm_num_groups=32, layers_per_block=1)
# Options later VAEs use: no 1x1 quant convs, no mid-block attention, wider latents.
TINY_NO_EXTRAS = _cfg([32, 64], norm_num_groups=16, layers_per_block=1, latent_channels=8,
                      use_quant_conv=False, use_post_quant_conv=False,
                      mid_block_add_attention=False)
# The SD 2.x VAE config (stabilityai/stable-diffusion-2-1-base vae/config.json).
SD2 = _cfg([128, 256, 512, 512], in_channels=3, out_channels=3, latent_channels=4,
           layers_per_block=2, norm_num_groups=32, act_fn="silu", sample_size=768,
           scaling_factor=0.18215)


def torch_vae(cfg: dict[str, Any], seed: int = 0) -> Any:
    """A diffusers AutoencoderKL with random weights, norms included (default norms are 1/0)."""
    torch.manual_seed(seed)
    model = diffusers.AutoencoderKL(**cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_((1.0 if name.endswith("weight") else 0.0) + 0.1 * torch.randn_like(p))
    return model


def save(model: Any, folder: str) -> str:
    """save_pretrained (safetensors) and return the folder."""
    model.save_pretrained(folder)
    return folder


def rewrite_weights(folder: str, edit: Callable[[dict[str, Any]], dict[str, Any]]) -> None:
    """Apply ``edit`` to the saved state dict of a diffusers folder, in place."""
    path = os.path.join(folder, WEIGHTS_FILE)
    state = safetensors_torch.load_file(path)
    safetensors_torch.save_file(edit(state), path)


def nhwc(t: Any) -> jax.Array:
    return jnp.asarray(t.numpy().transpose(0, 2, 3, 1))


def nchw(a: jax.Array) -> np.ndarray:
    return np.asarray(a).transpose(0, 3, 1, 2)


def torch_reference(model: Any, x: Any, z: Any) -> tuple[np.ndarray, ...]:
    """diffusers' (mean, logvar) of encode(x) and decode(z)."""
    with torch.no_grad():
        dist = model.encode(x).latent_dist
        image = model.decode(z).sample
    return dist.mean.numpy(), dist.logvar.numpy(), image.numpy()


def run_ours(vae: AutoencoderKL, params: Any, x: jax.Array, z: jax.Array) -> tuple[np.ndarray, ...]:
    """Our (mean, logvar, image) in NCHW, encode and decode compiled as one program."""

    @jax.jit
    def run(params, x, z):
        mean, logvar = vae.apply({"params": params}, x, method=vae.encode)
        return mean, logvar, vae.apply({"params": params}, z, method=vae.decode)

    return tuple(nchw(a) for a in run(params, x, z))


def assert_close(ours: np.ndarray, ref: np.ndarray, what: str) -> None:
    """fp32 parity bound: max|diff| <= 1e-4 * max(1, max|ref|)."""
    assert ours.shape == ref.shape, (what, ours.shape, ref.shape)
    err, bound = np.abs(ours - ref).max(), 1e-4 * max(1.0, np.abs(ref).max())
    assert err <= bound, f"{what}: max|diff| {err:.3g} > {bound:.3g}"


def random_inputs(cfg: dict[str, Any], pixels: int, batch: int = 2) -> tuple[Any, Any]:
    """Image in [-1, 1] and an unscaled latent at the matching size, NCHW torch tensors."""
    g = torch.Generator().manual_seed(1)
    factor = 2 ** (len(cfg["block_out_channels"]) - 1)
    x = torch.rand(batch, cfg.get("in_channels", 3), pixels, pixels, generator=g) * 2 - 1
    z = torch.randn(batch, cfg.get("latent_channels", 4), pixels // factor, pixels // factor,
                    generator=g) / 0.18215
    return x, z


def check_parity(model: Any, vae: AutoencoderKL, params: Any, cfg: dict[str, Any], pixels: int) -> None:
    """Encode moments and decoded image agree with diffusers."""
    x, z = random_inputs(cfg, pixels)
    ref = torch_reference(model, x, z)
    ours = run_ours(vae, params, nhwc(x), nhwc(z))
    for name, a, b in zip(("mean", "logvar", "image"), ours, ref):
        assert_close(a, b, name)


@pytest.mark.parametrize(
    "cfg,pixels,pipeline_layout",
    [(TINY, 16, True), (TINY_3_BLOCKS, 16, False), (TINY_NO_EXTRAS, 16, False), (SD2, 32, False)],
    ids=["tiny", "tiny-3-blocks-lpb1", "tiny-no-quant-no-attn", "sd2-config"],
)
def test_parity_with_diffusers(tmp_path, cfg, pixels, pipeline_layout):
    model = torch_vae(cfg)
    # A pipeline folder (its vae/ subfolder) and a bare vae folder both load.
    save(model, str(tmp_path / "vae") if pipeline_layout else str(tmp_path))
    vae, params = weights.load_vae(str(tmp_path))
    assert vae.scaling_factor == pytest.approx(cfg.get("scaling_factor", 0.18215))
    check_parity(model, vae, params, cfg, pixels)


def test_old_attention_names_and_conv_layout(tmp_path):
    """query/key/value/proj_attn checkpoints (and 1x1-conv projections) load and match."""
    model = torch_vae(TINY, seed=3)
    folder = save(model, str(tmp_path))
    old = {"to_q": "query", "to_k": "key", "to_v": "value", "to_out.0": "proj_attn"}

    def rename(state: dict[str, Any]) -> dict[str, Any]:
        out = {}
        for key, value in state.items():
            for new, legacy in old.items():
                key = key.replace(f".attentions.0.{new}.", f".attentions.0.{legacy}.")
            if ".attentions.0." in key and key.endswith("weight") and value.ndim == 2:
                value = value[:, :, None, None].contiguous()  # LDM stores these as 1x1 convs
            out[key] = value
        assert sum("proj_attn" in k for k in out) == 4  # both towers, weight and bias
        return out

    rewrite_weights(folder, rename)
    vae, params = weights.load_vae(folder)
    check_parity(model, vae, params, TINY, 16)


def test_bf16_compute_close_to_fp32(tmp_path):
    folder = save(torch_vae(TINY), str(tmp_path))
    vae32, params = weights.load_vae(folder)
    vae16, params16 = weights.load_vae(folder, dtype=jnp.bfloat16)
    x, z = (nhwc(t) for t in random_inputs(TINY, 16))
    ref = run_ours(vae32, params, x, z)
    got = run_ours(vae16, params16, x, z)
    for name, a, b in zip(("mean", "logvar", "image"), got, ref):
        assert a.dtype == np.float32, name  # moments and pixels come back in fp32
        err = np.abs(a - b).max()
        assert 0 < err <= BF16_TOL * max(1.0, np.abs(b).max()), f"{name}: bf16 error {err:.3g}"


def test_loader_lists_missing_extra_and_misshaped(tmp_path):
    folder = save(torch_vae(TINY), str(tmp_path))

    def corrupt(state: dict[str, Any]) -> dict[str, Any]:
        del state["encoder.conv_in.bias"]
        state["encoder.not_a_layer.weight"] = torch.zeros(3)
        state["decoder.conv_out.weight"] = torch.zeros(3, 32, 5, 5)
        return state

    rewrite_weights(folder, corrupt)
    with pytest.raises(WeightLoadError) as info:
        weights.load_vae(folder)
    msg = str(info.value)
    for needle in ("missing", "encoder/conv_in/bias", "unexpected", "encoder.not_a_layer.weight",
                   "shape mismatch", "decoder.conv_out.weight"):
        assert needle in msg, (needle, msg)


def test_loader_rejects_folders_that_are_not_a_vae(tmp_path):
    with pytest.raises(WeightLoadError, match="not a vae"):
        weights.load_vae(str(tmp_path))  # empty folder
    unet_cfg = {"_class_name": "UNet2DConditionModel", "block_out_channels": [32, 64],
                "down_block_types": ["CrossAttnDownBlock2D", "DownBlock2D"]}
    (tmp_path / "config.json").write_text(json.dumps(unet_cfg))
    with pytest.raises(ValueError, match="UNet2DConditionModel, not an AutoencoderKL"):
        weights.load_vae(str(tmp_path))
    (tmp_path / "config.json").write_text(json.dumps(TINY))
    with pytest.raises(WeightLoadError, match="no weight file"):
        weights.load_vae(str(tmp_path))


def test_from_config_rejects_unported_options():
    bad = dict(TINY, down_block_types=["DownEncoderBlock2D", "AttnDownEncoderBlock2D"],
               act_fn="gelu", norm_num_groups=24)
    with pytest.raises(ValueError) as info:
        AutoencoderKL.from_config(bad)
    msg = str(info.value)
    for needle in ("AttnDownEncoderBlock2D", "act_fn='gelu'", "norm_num_groups=24"):
        assert needle in msg, (needle, msg)
    with pytest.raises(ValueError, match="up_block_types has 1 entries"):
        AutoencoderKL.from_config(dict(TINY, up_block_types=["UpDecoderBlock2D"]))


def test_from_config_defaults_and_dummy_inputs():
    vae = AutoencoderKL.from_config(SD2, dtype=jnp.bfloat16)
    assert (vae.block_out_channels, vae.layers_per_block, vae.scaling_factor) == (
        (128, 256, 512, 512), 2, 0.18215)
    assert vae.use_quant_conv and vae.use_post_quant_conv and vae.mid_block_add_attention
    assert vae.dtype == jnp.bfloat16
    (x,) = vae.dummy_inputs(batch=2)
    assert x.shape == (2, 8, 8, 3)


def test_sample_latent():
    mean = jnp.arange(8.0).reshape(1, 2, 2, 2)
    rng = jax.random.PRNGKey(0)
    z = sample_latent(mean, jnp.full_like(mean, 2 * np.log(0.5)), rng)
    eps = jax.random.normal(rng, mean.shape)
    np.testing.assert_allclose(z, mean + 0.5 * eps, rtol=1e-6)
    assert jnp.array_equal(AutoencoderKL.sample_latent(mean, mean, rng), sample_latent(mean, mean, rng))
