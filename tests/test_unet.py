"""UNet parity with diffusers' UNet2DConditionModel through our loader, and the encode/decode split."""

from __future__ import annotations

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")

from imagerag_jax import weights  # noqa: E402
from imagerag_jax.benchmark.models import UNET_CONFIGS  # noqa: E402
from imagerag_jax.weights import WeightLoadError  # noqa: E402
from tests.helpers import assert_parity, nchw, nhwc  # noqa: E402

TINY = dict(
    sample_size=16,
    block_out_channels=(32, 64),
    layers_per_block=1,
    down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
    cross_attention_dim=24,
    attention_head_dim=(2, 4),
    use_linear_projection=True,
    norm_num_groups=8,
)
SD21 = {**UNET_CONFIGS["sd21"], "sample_size": 64}  # the benchmark's SD 2.1 UNet config


def make_unet_folder(tmp_path, seed: int = 0, safe: bool = True, prediction_type: str | None = None, **overrides):
    """A random diffusers UNet saved as a pipeline-style folder; returns (torch model, path)."""
    torch.manual_seed(seed)
    model = diffusers.UNet2DConditionModel(**{**TINY, **overrides}).eval()
    # Random biases and norm affines so that a transposed or skipped tensor cannot hide.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias") or "norm" in name:
                p.add_(0.1 * torch.randn_like(p))
    model.save_pretrained(str(tmp_path / "unet"), safe_serialization=safe)
    if prediction_type:
        os.makedirs(tmp_path / "scheduler", exist_ok=True)
        with open(tmp_path / "scheduler" / "scheduler_config.json", "w") as f:
            json.dump({"prediction_type": prediction_type}, f)
    return model, str(tmp_path)


def run_both(model, unet, params, batch=2, size=16, tokens=7, seed=0):
    """Same random inputs through the torch reference and our UNet; returns (ours NCHW, ref)."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((batch, unet.in_channels, size, size), dtype=np.float32)
    ctx = rng.standard_normal((batch, tokens, unet.cross_attention_dim), dtype=np.float32)
    t = np.array([999, 10, 500, 0][:batch])
    with torch.no_grad():
        ref = model(torch.from_numpy(x), torch.from_numpy(t), torch.from_numpy(ctx)).sample.numpy()
    out = jax.jit(unet.apply)({"params": params}, nhwc(x), jnp.asarray(t), jnp.asarray(ctx))
    return nchw(out), ref


@pytest.mark.parametrize(
    "overrides",
    [
        {},
        {"use_linear_projection": False},
        {"upcast_attention": True},
        {"attention_head_dim": 4},
        {"attention_head_dim": (4, 1)},
        {
            "block_out_channels": (32, 32, 64),
            "down_block_types": ("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
            "up_block_types": ("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
            "layers_per_block": 2,
            "attention_head_dim": (1, 2, 4),
        },
    ],
    ids=["linear-proj", "conv-proj", "upcast", "int-heads", "tuple-heads-4-1", "three-blocks"],
)
def test_tiny_unet_parity(tmp_path, overrides):
    model, path = make_unet_folder(tmp_path, **overrides)
    unet, params = weights.load_unet(path)
    out, ref = run_both(model, unet, params)
    assert_parity(out, ref)


def test_bin_checkpoint_and_prediction_type(tmp_path):
    model, path = make_unet_folder(tmp_path, safe=False, prediction_type="v_prediction")
    assert os.path.exists(os.path.join(path, "unet", "diffusion_pytorch_model.bin"))
    unet, params = weights.load_unet(path)
    assert unet.prediction_type == "v_prediction"
    out, ref = run_both(model, unet, params, batch=1)
    assert_parity(out, ref)


def test_encode_decode_split_is_the_forward_pass(tmp_path):
    model, path = make_unet_folder(tmp_path)
    unet, params = weights.load_unet(path)
    x = jnp.asarray(np.random.default_rng(1).standard_normal((2, 16, 16, 4)), jnp.float32)
    t = jnp.array([999, 3])
    ctx = jnp.ones((2, 5, 24))
    h, skips, temb = unet.apply({"params": params}, x, t, ctx, method=unet.encode)
    # Two blocks at 16x16: H-space is the mid-block output at 8x8 with the last block width.
    assert h.shape == (2, 8, 8, 64)
    assert len(skips) == 1 + 2 + 1  # conv_in, two resnets (layers_per_block=1 each), one downsampler
    full = unet.apply({"params": params}, x, t, ctx)
    split = unet.apply({"params": params}, h, skips, temb, ctx, method=unet.decode)
    np.testing.assert_array_equal(np.asarray(full), np.asarray(split))
    # The H-space matters: changing h changes the output.
    edited = unet.apply({"params": params}, h + 1.0, skips, temb, ctx, method=unet.decode)
    assert float(jnp.abs(edited - full).max()) > 1e-3


def test_bf16_compute_close_to_fp32(tmp_path):
    model, path = make_unet_folder(tmp_path)
    unet32, params = weights.load_unet(path)
    unet16, _ = weights.load_unet(path, dtype=jnp.bfloat16)
    x = jnp.asarray(np.random.default_rng(2).standard_normal((1, 16, 16, 4)), jnp.float32)
    args = (x, jnp.array([500]), jnp.ones((1, 4, 24)))
    ref = unet32.apply({"params": params}, *args)
    out = unet16.apply({"params": params}, *args)
    assert out.dtype == jnp.bfloat16
    # bf16 has an 8-bit mantissa; through ~20 layers a few percent of the output scale is expected.
    assert float(jnp.abs(out.astype(jnp.float32) - ref).max()) <= 0.05 * max(1.0, float(jnp.abs(ref).max()))


def test_missing_unexpected_and_misshaped_tensors_are_listed(tmp_path):
    from safetensors.numpy import load_file, save_file

    _, path = make_unet_folder(tmp_path)
    f = os.path.join(path, "unet", "diffusion_pytorch_model.safetensors")
    sd = load_file(f)
    sd.pop("conv_in.weight")
    sd["extra.weight"] = np.zeros(3, np.float32)
    sd["conv_out.bias"] = np.zeros(7, np.float32)
    save_file(sd, f)
    with pytest.raises(WeightLoadError) as err:
        weights.load_unet(path)
    msg = str(err.value)
    assert "missing from checkpoint (1)" in msg and "conv_in/kernel" in msg
    assert "unexpected in checkpoint (1)" in msg and "extra.weight" in msg
    assert "shape mismatch (1)" in msg and "conv_out.bias" in msg


def test_error_lists_first_20_and_count(tmp_path):
    from safetensors.numpy import save_file

    _, path = make_unet_folder(tmp_path)
    f = os.path.join(path, "unet", "diffusion_pytorch_model.safetensors")
    save_file({f"junk.{i}.weight": np.zeros(1, np.float32) for i in range(30)}, f)
    with pytest.raises(WeightLoadError) as err:
        weights.load_unet(path)
    msg = str(err.value)
    assert "unexpected in checkpoint (30)" in msg and "... and 10 more" in msg


def test_not_a_model_path(tmp_path):
    with pytest.raises(WeightLoadError, match="is not a unet model"):
        weights.load_unet(str(tmp_path))
    with pytest.raises(WeightLoadError, match="does not exist"):
        weights.load_unet(str(tmp_path / "nope"))


def test_unsupported_config_is_rejected(tmp_path):
    _, path = make_unet_folder(tmp_path)
    cfg_path = os.path.join(path, "unet", "config.json")
    cfg = json.load(open(cfg_path))
    cfg["class_embed_type"] = "timestep"
    json.dump(cfg, open(cfg_path, "w"))
    with pytest.raises(WeightLoadError, match="class_embed_type"):
        weights.load_unet(path)


@pytest.mark.slow
def test_real_sd21_unet_config_parity(tmp_path):
    """The real SD 2.1-base / SD-Turbo UNet configuration (865M params, random) at 16x16 latents."""
    torch.manual_seed(0)
    model = diffusers.UNet2DConditionModel(**SD21).eval()
    model.save_pretrained(str(tmp_path / "unet"))
    del model
    model = diffusers.UNet2DConditionModel.from_pretrained(str(tmp_path / "unet")).eval()
    unet, params = weights.load_unet(str(tmp_path))
    assert unet.block_out_channels == (320, 640, 1280, 1280)
    assert unet.num_attention_heads == (5, 10, 20, 20)
    out, ref = run_both(model, unet, params, batch=1, size=16, tokens=77)
    assert_parity(out, ref)
