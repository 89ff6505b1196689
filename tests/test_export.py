"""Flax -> diffusers/transformers folders: PyTorch loads them and computes the same outputs."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")
transformers = pytest.importorskip("transformers")

from imagerag_jax import weights  # noqa: E402
from imagerag_jax.weights import convert, random_pipeline, to_torch  # noqa: E402
from tests.helpers import assert_parity, nchw, nhwc  # noqa: E402


@pytest.fixture(scope="module")
def modules():
    return random_pipeline.random_modules("tiny2", seed=3)


def _same_tree(a, b):
    fa, fb = convert.flatten(a), convert.flatten(b)
    assert fa.keys() == fb.keys()
    for k in fa:
        np.testing.assert_array_equal(np.asarray(fa[k]), np.asarray(fb[k]), err_msg="/".join(k))


def test_unet_export_loads_in_diffusers_and_round_trips(modules, tmp_path):
    unet, params = modules["unet"]
    to_torch.save_unet(unet, params, str(tmp_path / "unet"))
    ref_model = diffusers.UNet2DConditionModel.from_pretrained(str(tmp_path / "unet")).eval()
    rng = np.random.default_rng(0)
    x = rng.standard_normal((2, 4, 8, 8), dtype=np.float32)
    ctx = rng.standard_normal((2, 5, unet.cross_attention_dim), dtype=np.float32)
    t = np.array([999, 20])
    with torch.no_grad():
        ref = ref_model(torch.from_numpy(x), torch.from_numpy(t), torch.from_numpy(ctx)).sample.numpy()
    ours = unet.apply({"params": params}, nhwc(x), jnp.asarray(t), jnp.asarray(ctx))
    assert_parity(nchw(ours), ref)
    unet2, params2 = weights.load_unet(str(tmp_path / "unet"))
    assert unet2.block_out_channels == unet.block_out_channels
    _same_tree(params, params2)


def test_vae_export_loads_in_diffusers_and_round_trips(modules, tmp_path):
    vae, params = modules["vae"]
    to_torch.save_vae(vae, params, str(tmp_path / "vae"))
    ref_model = diffusers.AutoencoderKL.from_pretrained(str(tmp_path / "vae")).eval()
    z = np.random.default_rng(1).standard_normal((1, 4, 4, 4), dtype=np.float32)
    with torch.no_grad():
        ref = ref_model.decode(torch.from_numpy(z)).sample.numpy()
    ours = vae.apply({"params": params}, nhwc(z), method=vae.decode)
    assert_parity(nchw(ours), ref)
    _same_tree(params, weights.load_vae(str(tmp_path / "vae"))[1])


def test_text_encoder_export_loads_in_transformers_and_round_trips(modules, tmp_path):
    text, params = modules["text_encoder"]
    to_torch.save_text_encoder(text, params, str(tmp_path / "te"))
    ref_model = transformers.CLIPTextModel.from_pretrained(str(tmp_path / "te")).eval()
    ids = np.random.default_rng(2).integers(0, text.vocab_size - 2, (2, 77))
    ids[:, 9] = text.eos_token_id
    with torch.no_grad():
        ref = ref_model(torch.from_numpy(ids)).pooler_output.numpy()
    _, pooled = text.apply({"params": params}, jnp.asarray(ids, jnp.int32))
    assert_parity(pooled, ref)
    _same_tree(params, weights.load_text_encoder(str(tmp_path / "te"))[1])


def test_random_pipeline_folder_loads_in_diffusers(tmp_path):
    path = random_pipeline.write_random_pipeline(str(tmp_path / "pipe"))
    pipe = diffusers.StableDiffusionPipeline.from_pretrained(path, safety_checker=None)
    ours = weights.load_pipeline(path)
    ids = ours.tokenizer(["a red square"])
    ref_ids = pipe.tokenizer(["a red square"], padding="max_length", max_length=77,
                             return_tensors="np").input_ids
    np.testing.assert_array_equal(ids, ref_ids)
    assert ours.prediction_type == "epsilon"
