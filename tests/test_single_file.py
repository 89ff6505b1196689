"""Oracle tests for imagerag_jax.weights.single_file (docs/design.md, "Test oracles").

Random tiny diffusers/transformers models are written out in the original CompVis/Stability
single-file layout (by a test-only inverse mapping), then converted both by diffusers' own pure
converters and by ours; key sets and tensors must be identical. The fixture inverse is itself
checked: diffusers' conversion of the written file must give back the model's state_dict.
"""

from __future__ import annotations

import copy

import ctypes
import datetime
import os
import re
from typing import Any, Callable

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from imagerag_jax.weights import single_file as sf

diffusers = pytest.importorskip("diffusers")
transformers = pytest.importorskip("transformers")
from diffusers import AutoencoderKL, UNet2DConditionModel  # noqa: E402
from diffusers.loaders import single_file_utils as dsf  # noqa: E402
from transformers import CLIPTextConfig, CLIPTextModel  # noqa: E402

HEAD_CHANNELS = 16  # tiny UNet heads; SD 2.x uses 64
LPB = 2  # layers_per_block, as in SD


# ----------------------------------------------------------------------------------------------
# Tiny models
# ----------------------------------------------------------------------------------------------


def tiny_unet_config(linear: bool, channels: tuple[int, ...] = (32, 64, 64), cross: int = 48) -> dict[str, Any]:
    """A 3-level UNet: two cross-attention levels and one plain level, like SD's 4th level."""
    return dict(
        sample_size=8,
        in_channels=4,
        out_channels=4,
        layers_per_block=LPB,
        block_out_channels=channels,
        down_block_types=("CrossAttnDownBlock2D",) * (len(channels) - 1) + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * (len(channels) - 1),
        cross_attention_dim=cross,
        attention_head_dim=[c // HEAD_CHANNELS for c in channels] if linear else 8,
        use_linear_projection=linear,
        norm_num_groups=32,
    )


def ldm_unet_original_config(cfg: dict[str, Any]) -> dict[str, Any]:
    """The original LDM yaml (as a dict) that describes ``cfg``, for diffusers' config oracle."""
    ch = cfg["block_out_channels"]
    unet = dict(
        in_channels=cfg["in_channels"],
        out_channels=cfg["out_channels"],
        model_channels=ch[0],
        channel_mult=[c // ch[0] for c in ch],
        attention_resolutions=[2**i for i, t in enumerate(cfg["down_block_types"]) if "CrossAttn" in t],
        num_res_blocks=cfg["layers_per_block"],
        transformer_depth=1,
        context_dim=cfg["cross_attention_dim"],
        use_linear_in_transformer=cfg["use_linear_projection"],
    )
    unet.update(num_head_channels=HEAD_CHANNELS) if cfg["use_linear_projection"] else unet.update(num_heads=8)
    vae = dict(ch=32, ch_mult=[1, 2, 4, 4], z_channels=4, num_res_blocks=2, in_channels=3, out_ch=3)
    params = {"unet_config": {"params": unet}, "first_stage_config": {"params": {"ddconfig": vae}}}
    return {"model": {"params": params}}


TINY_VAE = dict(
    in_channels=3,
    out_channels=3,
    down_block_types=("DownEncoderBlock2D",) * 2,
    up_block_types=("UpDecoderBlock2D",) * 2,
    block_out_channels=(32, 64),
    layers_per_block=2,
    latent_channels=4,
    norm_num_groups=32,
)
LDM_VAE_ORIGINAL_CONFIG = {
    "model": {"params": {"first_stage_config": {"params": {"ddconfig": dict(
        ch=32, ch_mult=[1, 2], z_channels=4, num_res_blocks=2, in_channels=3, out_ch=3)}}}}
}


def tiny_clip(layers: int) -> CLIPTextModel:
    """A CLIPTextModel with 64-channel heads (2 of them) and ``layers`` layers."""
    torch.manual_seed(3)
    cfg = CLIPTextConfig(
        vocab_size=1000, hidden_size=128, intermediate_size=256, num_hidden_layers=layers,
        num_attention_heads=2, max_position_embeddings=77, hidden_act="gelu", projection_dim=96,
        bos_token_id=0, eos_token_id=2, pad_token_id=1,
    )
    return CLIPTextModel(cfg).eval()


def randomised(model: torch.nn.Module, seed: int) -> dict[str, torch.Tensor]:
    """The model's state_dict with every tensor random (zero-initialised layers would hide swaps)."""
    gen = torch.Generator().manual_seed(seed)
    out = {k: torch.randn(v.shape, generator=gen) for k, v in model.state_dict().items()}
    model.load_state_dict(out)
    return out


# ----------------------------------------------------------------------------------------------
# Test-only inverse: diffusers/transformers layout -> original single-file layout
# ----------------------------------------------------------------------------------------------

UNET_TOP = {
    "time_embedding.linear_1": "time_embed.0", "time_embedding.linear_2": "time_embed.2",
    "conv_in": "input_blocks.0.0", "conv_norm_out": "out.0", "conv_out": "out.2",
}
UNET_RES = {
    "norm1": "in_layers.0", "conv1": "in_layers.2", "time_emb_proj": "emb_layers.1",
    "norm2": "out_layers.0", "conv2": "out_layers.3", "conv_shortcut": "skip_connection",
}


def unet_res(rest: str) -> str:
    name, param = rest.rsplit(".", 1)
    return f"{UNET_RES[name]}.{param}"


def unet_to_ldm(key: str, up_attn: list[bool]) -> str:
    """diffusers UNet key -> original key (the fixture's inverse of the conversion)."""
    head, param = key.rsplit(".", 1)
    if head in UNET_TOP:
        return f"{UNET_TOP[head]}.{param}"
    if m := re.match(r"down_blocks\.(\d+)\.(resnets|attentions)\.(\d+)\.(.+)", key):
        i = 1 + int(m[1]) * (LPB + 1) + int(m[3])
        return f"input_blocks.{i}.0.{unet_res(m[4])}" if m[2] == "resnets" else f"input_blocks.{i}.1.{m[4]}"
    if m := re.match(r"down_blocks\.(\d+)\.downsamplers\.0\.conv\.(.+)", key):
        return f"input_blocks.{(int(m[1]) + 1) * (LPB + 1)}.0.op.{m[2]}"
    if m := re.match(r"mid_block\.resnets\.(\d)\.(.+)", key):
        return f"middle_block.{2 * int(m[1])}.{unet_res(m[2])}"
    if m := re.match(r"mid_block\.attentions\.0\.(.+)", key):
        return f"middle_block.1.{m[1]}"
    if m := re.match(r"up_blocks\.(\d+)\.(resnets|attentions)\.(\d+)\.(.+)", key):
        i = int(m[1]) * (LPB + 1) + int(m[3])
        return f"output_blocks.{i}.0.{unet_res(m[4])}" if m[2] == "resnets" else f"output_blocks.{i}.1.{m[4]}"
    if m := re.match(r"up_blocks\.(\d+)\.upsamplers\.0\.conv\.(.+)", key):
        u = int(m[1])
        return f"output_blocks.{u * (LPB + 1) + LPB}.{2 if up_attn[u] else 1}.conv.{m[2]}"
    raise AssertionError(f"fixture inverse does not know {key}")


def vae_to_ldm(key: str, value: torch.Tensor, n_levels: int) -> tuple[str, torch.Tensor]:
    """diffusers VAE key -> original key; mid attention linears become 1x1 convs as in LDM."""
    key = key.replace("conv_shortcut", "nin_shortcut").replace("conv_norm_out", "norm_out")
    if m := re.match(r"encoder\.down_blocks\.(\d+)\.resnets\.(.+)", key):
        return f"encoder.down.{m[1]}.block.{m[2]}", value
    if m := re.match(r"encoder\.down_blocks\.(\d+)\.downsamplers\.0\.(.+)", key):
        return f"encoder.down.{m[1]}.downsample.{m[2]}", value
    if m := re.match(r"decoder\.up_blocks\.(\d+)\.resnets\.(.+)", key):
        return f"decoder.up.{n_levels - 1 - int(m[1])}.block.{m[2]}", value
    if m := re.match(r"decoder\.up_blocks\.(\d+)\.upsamplers\.0\.(.+)", key):
        return f"decoder.up.{n_levels - 1 - int(m[1])}.upsample.{m[2]}", value
    if m := re.match(r"(encoder|decoder)\.mid_block\.resnets\.(\d)\.(.+)", key):
        return f"{m[1]}.mid.block_{int(m[2]) + 1}.{m[3]}", value
    if m := re.match(r"(encoder|decoder)\.mid_block\.attentions\.0\.(.+)", key):
        names = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}
        name, param = m[2].rsplit(".", 1)
        value = value[:, :, None, None] if value.ndim == 2 else value
        return f"{m[1]}.mid.attn_1.{names[name]}.{param}", value
    return key, value


def clip_to_openclip(sd: dict[str, torch.Tensor], extra_layer_seed: int | None) -> dict[str, torch.Tensor]:
    """transformers CLIPTextModel state_dict -> OpenCLIP text tower (fused in_proj) keys.

    ``extra_layer_seed`` adds a random final resblock (SD 2.x's unused 24th layer), a
    text_projection and a logit_scale, as real SD 2.x files have.
    """
    sd = {k.removeprefix("text_model."): v for k, v in sd.items()}
    out = {
        "token_embedding.weight": sd["embeddings.token_embedding.weight"],
        "positional_embedding": sd["embeddings.position_embedding.weight"],
        "ln_final.weight": sd["final_layer_norm.weight"],
        "ln_final.bias": sd["final_layer_norm.bias"],
    }
    names = {"layer_norm1": "ln_1", "layer_norm2": "ln_2", "mlp.fc1": "mlp.c_fc", "mlp.fc2": "mlp.c_proj",
             "self_attn.out_proj": "attn.out_proj"}
    n_layers = len({k.split(".")[2] for k in sd if k.startswith("encoder.layers.")})
    for i in range(n_layers):
        p = f"encoder.layers.{i}."
        for new, old in names.items():
            for param in ("weight", "bias"):
                out[f"transformer.resblocks.{i}.{old}.{param}"] = sd[f"{p}{new}.{param}"]
        for param in ("weight", "bias"):
            out[f"transformer.resblocks.{i}.attn.in_proj_{param}"] = torch.cat(
                [sd[f"{p}self_attn.{q}_proj.{param}"] for q in "qkv"])
    if extra_layer_seed is not None:
        gen = torch.Generator().manual_seed(extra_layer_seed)
        template = {k: v for k, v in out.items() if k.startswith("transformer.resblocks.0.")}
        for k, v in template.items():
            out[k.replace("resblocks.0.", f"resblocks.{n_layers}.")] = torch.randn(v.shape, generator=gen)
        width = out["token_embedding.weight"].shape[1]
        out["text_projection"] = torch.randn(width, 96, generator=gen)
        out["logit_scale"] = torch.tensor(4.6052)
    return out


# ----------------------------------------------------------------------------------------------
# Fixtures: original-layout files
# ----------------------------------------------------------------------------------------------


def write_checkpoint(path: str, state: dict[str, torch.Tensor], fmt: str, dtype: torch.dtype) -> str:
    """Write ``state`` as .safetensors, or as a Lightning-style .ckpt (state_dict + global_step)."""
    state = {k: v.to(dtype).contiguous() for k, v in state.items()}
    if fmt == "safetensors":
        save_file(state, path)
    else:
        torch.save({"state_dict": state, "global_step": 875000}, path)
    return path


def load_torch_state(path: str) -> dict[str, torch.Tensor]:
    """Oracle-side reader, independent of ours: the whole file as torch tensors."""
    if path.endswith(".safetensors"):
        from safetensors.torch import load_file
        return load_file(path)
    return torch.load(path, map_location="cpu", weights_only=True)["state_dict"]


class Models:
    """The tiny models and their original-layout state dict, built once per session."""

    def __init__(self) -> None:
        torch.manual_seed(0)
        self.unet_cfgs = {lin: tiny_unet_config(lin) for lin in (True, False)}
        self.unets = {lin: UNet2DConditionModel(**cfg).eval() for lin, cfg in self.unet_cfgs.items()}
        self.unet_sd = {lin: randomised(m, seed=1 + lin) for lin, m in self.unets.items()}
        self.vae = AutoencoderKL(**TINY_VAE).eval()
        self.vae_sd = randomised(self.vae, seed=4)
        self.clip = tiny_clip(layers=23)
        self.clip_sd = randomised(self.clip, seed=5)

    def original(self, linear: bool, text_prefix: str = "cond_stage_model.model.") -> dict[str, torch.Tensor]:
        """A whole SD single file: UNet + VAE + OpenCLIP (24 resblocks) + top-level extras."""
        up_attn = [t.startswith("CrossAttn") for t in self.unet_cfgs[linear]["up_block_types"]]
        out = {sf.UNET_PREFIX + unet_to_ldm(k, up_attn): v for k, v in self.unet_sd[linear].items()}
        n_levels = len(TINY_VAE["block_out_channels"])
        for k, v in self.vae_sd.items():
            new, value = vae_to_ldm(k, v, n_levels)
            out[sf.VAE_PREFIX + new] = value
        for k, v in clip_to_openclip(self.clip_sd, extra_layer_seed=6).items():
            out[text_prefix + k] = v
        out["alphas_cumprod"] = torch.linspace(1, 0, 1000)  # schedule buffers real files carry
        out["model_ema.decay"] = torch.tensor(0.9999)
        return out


@pytest.fixture(scope="session")
def models() -> Models:
    return Models()


FORMATS = [("safetensors", torch.float32), ("ckpt", torch.float16)]


@pytest.fixture(scope="session", params=FORMATS, ids=lambda p: f"{p[0]}-{str(p[1]).split('.')[-1]}")
def sd_file(
    request: pytest.FixtureRequest, models: Models, tmp_path_factory: pytest.TempPathFactory
) -> dict[str, Any]:
    """One whole-checkpoint file per (format, dtype) for each proj_in kind."""
    fmt, dtype = request.param
    folder = tmp_path_factory.mktemp(f"sd_{fmt}_{str(dtype).split('.')[-1]}")
    paths = {
        lin: write_checkpoint(str(folder / f"sd_{'lin' if lin else 'conv'}.{fmt}"), models.original(lin), fmt, dtype)
        for lin in (True, False)
    }
    return {"paths": paths, "dtype": dtype}


def assert_same(ours: dict[str, np.ndarray], theirs: dict[str, torch.Tensor]) -> None:
    """Identical key sets and bit-identical float32 tensors."""
    assert set(ours) == set(theirs), (sorted(set(ours) ^ set(theirs)))[:20]
    for k, v in theirs.items():
        assert ours[k].dtype == np.float32, k
        np.testing.assert_array_equal(ours[k], v.float().numpy(), err_msg=k)


# ----------------------------------------------------------------------------------------------
# Oracle tests
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("linear", [True, False], ids=["linear_proj", "conv_proj"])
def test_unet_matches_diffusers_converter(sd_file: dict[str, Any], models: Models, linear: bool) -> None:
    path = sd_file["paths"][linear]
    ckpt = load_torch_state(path)
    ldm_config = ldm_unet_original_config(models.unet_cfgs[linear])
    dcfg = dsf.create_unet_diffusers_config_from_ldm(ldm_config, ckpt)
    theirs = dsf.convert_ldm_unet_checkpoint(ckpt, dcfg)
    # Fixture check: diffusers' conversion of our written file gives back the model's weights.
    assert_same({k: v.to(sd_file["dtype"]).float().numpy() for k, v in models.unet_sd[linear].items()}, theirs)

    ours = sf.load_component_state_dict(path, "unet")
    assert_same(ours, theirs)

    cfg = sf.infer_unet_config(path, head_channels=HEAD_CHANNELS)
    shared = set(cfg) & set(dcfg) - {"upcast_attention"}
    assert {k: cfg[k] for k in shared} == {k: dcfg[k] for k in shared}
    assert {"block_out_channels", "attention_head_dim", "down_block_types", "up_block_types"} <= shared
    # Our config builds a model that takes our tensors strictly.
    UNet2DConditionModel(**cfg).load_state_dict({k: torch.from_numpy(v) for k, v in ours.items()}, strict=True)


def test_vae_matches_diffusers_converter(sd_file: dict[str, Any], models: Models) -> None:
    path = sd_file["paths"][True]
    ckpt = load_torch_state(path)
    dcfg = dsf.create_vae_diffusers_config_from_ldm(LDM_VAE_ORIGINAL_CONFIG, ckpt)
    theirs = dsf.convert_ldm_vae_checkpoint(ckpt, dcfg)
    assert_same({k: v.to(sd_file["dtype"]).float().numpy() for k, v in models.vae_sd.items()}, theirs)

    ours = sf.load_component_state_dict(path, "vae")
    assert_same(ours, theirs)

    cfg = sf.infer_vae_config(path)
    shared = set(cfg) & set(dcfg)
    assert {k: cfg[k] for k in shared} == {k: dcfg[k] for k in shared}
    assert {"block_out_channels", "layers_per_block", "latent_channels"} <= shared
    AutoencoderKL(**cfg).load_state_dict({k: torch.from_numpy(v) for k, v in ours.items()}, strict=True)


def test_text_encoder_matches_diffusers_converter(sd_file: dict[str, Any], models: Models) -> None:
    """24 OpenCLIP resblocks: diffusers drops resblocks.23 and text_projection itself; so do we."""
    path = sd_file["paths"][True]
    ckpt = load_torch_state(path)
    theirs = dsf.convert_open_clip_checkpoint(models.clip, ckpt, prefix="cond_stage_model.model.")
    expected = {"text_model." + k.removeprefix("text_model."): v.to(sd_file["dtype"]).float().numpy()
                for k, v in models.clip_sd.items()}
    assert_same(expected, theirs)

    ours = sf.load_component_state_dict(path, "text_encoder")
    assert_same(ours, theirs)

    cfg = sf.infer_text_config(path)
    want = models.clip.config.to_dict()
    fields = ("vocab_size", "hidden_size", "intermediate_size", "projection_dim", "num_hidden_layers",
              "num_attention_heads", "max_position_embeddings", "hidden_act", "layer_norm_eps", "eos_token_id")
    assert {k: cfg[k] for k in fields} == {k: want[k] for k in fields}
    model = CLIPTextModel(CLIPTextConfig(**cfg)).eval()
    # transformers >= 5.6 flattens CLIPTextModel (no text_model. level); the file layout keeps it.
    model.load_state_dict({k.removeprefix("text_model."): torch.from_numpy(v) for k, v in ours.items()})
    if sd_file["dtype"] == torch.float32:
        ids = torch.tensor([[0, 5, 7, 9, 2, 1, 1]])
        with torch.no_grad():
            torch.testing.assert_close(model(ids).pooler_output, models.clip(ids).pooler_output, rtol=0, atol=0)


def test_bfloat16_safetensors(models: Models, tmp_path: Any) -> None:
    """bf16 safetensors (numpy cannot read them) come out as the same float32 values as diffusers'."""
    path = str(tmp_path / "bf16.safetensors")
    write_checkpoint(path, models.original(True), "safetensors", torch.bfloat16)
    ckpt = load_torch_state(path)
    dcfg = dsf.create_vae_diffusers_config_from_ldm(LDM_VAE_ORIGINAL_CONFIG, ckpt)
    assert_same(sf.load_component_state_dict(path, "vae"), dsf.convert_ldm_vae_checkpoint(ckpt, dcfg))
    theirs = dsf.convert_open_clip_checkpoint(models.clip, ckpt)
    assert_same(sf.load_component_state_dict(path, "text_encoder"), theirs)


def test_text_encoder_conditioner_prefix(models: Models, tmp_path: Any) -> None:
    """sgm layout (SD-Turbo): diffusers keeps the last layer and text_projection there; we don't."""
    prefix = "conditioner.embedders.0.model."
    path = str(tmp_path / "sgm.safetensors")
    write_checkpoint(path, models.original(True, prefix), "safetensors", torch.float32)
    ckpt = load_torch_state(path)
    theirs = dsf.convert_open_clip_checkpoint(models.clip, ckpt, prefix=prefix)
    extra = {k for k in theirs if k.startswith("text_model.encoder.layers.23.")} | {"text_projection.weight"}
    assert len(extra) == 17  # 16 tensors of layer 23 (q/k/v split) + the projection
    ours = sf.load_component_state_dict(path, "text_encoder")
    assert_same(ours, {k: v for k, v in theirs.items() if k not in extra})
    assert sf.detect_components(path) == {"unet", "vae", "text_encoder"}


def test_text_encoder_keep_last_layer(models: Models, tmp_path: Any) -> None:
    """With drop_last_text_layer=False all resblocks come through (diffusers' output for a 4-layer tower)."""
    clip = tiny_clip(layers=4)
    sd = randomised(clip, seed=9)
    orig = {"cond_stage_model.model." + k: v for k, v in clip_to_openclip(sd, extra_layer_seed=None).items()}
    path = write_checkpoint(str(tmp_path / "t.ckpt"), orig, "ckpt", torch.float32)
    theirs = dsf.convert_open_clip_checkpoint(clip, load_torch_state(path))
    assert_same(sf.load_component_state_dict(path, "text_encoder", drop_last_text_layer=False), theirs)
    assert sf.infer_text_config(path, drop_last_layer=False)["num_hidden_layers"] == 4
    dropped = sf.load_component_state_dict(path, "text_encoder")
    assert set(dropped) == {k for k in theirs if not k.startswith("text_model.encoder.layers.3.")}


def test_sd2_unet_config_from_shapes() -> None:
    """Shapes of a real SD 2.1 UNet (built on the meta device) give diffusers' SD 2.1 config."""
    sd2 = dict(block_out_channels=(320, 640, 1280, 1280), attention_head_dim=[5, 10, 20, 20],
               cross_attention_dim=1024, use_linear_projection=True, sample_size=64)
    with torch.device("meta"):
        unet = UNet2DConditionModel(**sd2)
    up_attn = [t.startswith("CrossAttn") for t in unet.config.up_block_types]
    shapes = {sf.UNET_PREFIX + unet_to_ldm(k, up_attn): tuple(v.shape) for k, v in unet.state_dict().items()}
    cfg = sf.infer_unet_config(shapes)
    assert cfg["attention_head_dim"] == [5, 10, 20, 20]
    def norm(value: Any) -> Any:
        return tuple(value) if isinstance(value, (list, tuple)) else value

    for key in ("block_out_channels", "down_block_types", "up_block_types", "layers_per_block",
                "cross_attention_dim", "use_linear_projection", "in_channels", "out_channels", "sample_size"):
        assert norm(cfg[key]) == norm(unet.config[key]), key
    assert len(sf.build_plan(shapes, "unet")) == len(unet.state_dict())


# ----------------------------------------------------------------------------------------------
# Detection and errors
# ----------------------------------------------------------------------------------------------


def test_detection(sd_file: dict[str, Any], tmp_path: Any) -> None:
    path = sd_file["paths"][False]
    assert sf.is_single_file_checkpoint(path)
    assert sf.detect_components(path) == {"unet", "vae", "text_encoder"}
    diffusers_layout = str(tmp_path / "diffusion_pytorch_model.safetensors")
    save_file({"conv_in.weight": torch.zeros(4, 4, 3, 3)}, diffusers_layout)
    assert not sf.is_single_file_checkpoint(diffusers_layout)
    assert not sf.is_single_file_checkpoint(str(tmp_path / "missing.safetensors"))


def test_prediction_type_metadata(tmp_path: Any) -> None:
    path = str(tmp_path / "v.safetensors")
    save_file({"x": torch.zeros(1)}, path, metadata={"modelspec.architecture": "stable-diffusion-v2-768-v"})
    assert sf.infer_prediction_type(path) == "v_prediction"
    save_file({"x": torch.zeros(1)}, path, metadata={"modelspec.prediction_type": "epsilon"})
    assert sf.infer_prediction_type(path, default="v_prediction") == "epsilon"
    save_file({"x": torch.zeros(1)}, path)
    assert sf.infer_prediction_type(path) == "epsilon"


def error_of(fn: Callable[[], Any]) -> str:
    with pytest.raises(ValueError) as info:
        fn()
    return str(info.value)


def test_not_sd_file_raises_clear_error(tmp_path: Any) -> None:
    path = str(tmp_path / "other.safetensors")
    save_file({f"layer{i}.weight": torch.zeros(2) for i in range(25)}, path)
    for call in (lambda: sf.iter_component_tensors(path, "unet"), lambda: sf.infer_vae_config(path),
                 lambda: sf.infer_text_config(path), lambda: sf.load_component_state_dict(path, "vae")):
        msg = error_of(call)
        assert path in msg and "not a single-file Stable Diffusion checkpoint" in msg
        assert "model.diffusion_model.input_blocks.0.0.weight" in msg and "25 key(s) (first 20 shown)" in msg
    garbage = tmp_path / "garbage.ckpt"
    garbage.write_bytes(b"this is not a checkpoint at all")
    assert str(garbage) in error_of(lambda: sf.iter_component_tensors(str(garbage), "unet"))
    assert not sf.is_single_file_checkpoint(str(garbage))
    assert "unknown component" in error_of(lambda: sf.iter_component_tensors(path, "tokenizer"))


def test_torch_pickle_variants(models: Models, tmp_path: Any) -> None:
    """Flat and legacy (non-zip, not mmappable) pickles load; pickles with arbitrary objects are refused."""
    vae = {k: v for k, v in models.original(True).items() if k.startswith(sf.VAE_PREFIX)}
    legacy = str(tmp_path / "legacy.ckpt")
    torch.save(vae, legacy, _use_new_zipfile_serialization=False)
    theirs = dsf.convert_ldm_vae_checkpoint(vae, dsf.create_vae_diffusers_config_from_ldm(LDM_VAE_ORIGINAL_CONFIG, vae))
    assert_same(sf.load_component_state_dict(legacy, "vae"), theirs)
    unsafe = str(tmp_path / "unsafe.ckpt")
    torch.save({"state_dict": vae, "callback": datetime.datetime(2022, 12, 7)}, unsafe)
    msg = error_of(lambda: sf.iter_component_tensors(unsafe, "vae"))
    assert unsafe in msg and "weights_only" in msg
    assert not sf.is_single_file_checkpoint(unsafe)


@pytest.mark.parametrize("fmt", ["safetensors", "ckpt"])
def test_missing_component_raises_clear_error(models: Models, tmp_path: Any, fmt: str) -> None:
    state = {k: v for k, v in models.original(True).items() if not k.startswith("cond_stage_model.")}
    path = write_checkpoint(str(tmp_path / f"no_text.{fmt}"), state, fmt, torch.float16)
    assert sf.detect_components(path) == {"unet", "vae"}
    for call in (lambda: sf.iter_component_tensors(path, "text_encoder"), lambda: sf.infer_text_config(path)):
        msg = error_of(call)
        assert path in msg and "no text_encoder" in msg
        assert "cond_stage_model.model.token_embedding.weight" in msg
        assert f"{len(state)} key(s)" in msg
    assert len(sf.load_component_state_dict(path, "vae")) == len(models.vae_sd)


def test_unknown_component_key_raises_clear_error(models: Models, tmp_path: Any) -> None:
    state = models.original(True)
    state["model.diffusion_model.label_emb.0.0.weight"] = torch.zeros(8, 8)  # class-conditioned UNet
    path = write_checkpoint(str(tmp_path / "upscaler.safetensors"), state, "safetensors", torch.float32)
    msg = error_of(lambda: sf.iter_component_tensors(path, "unet"))
    assert path in msg and "no diffusers equivalent" in msg
    assert "1 key(s)" in msg and "label_emb.0.0.weight" in msg
    state = {k: v for k, v in models.original(True).items() if "time_embed.0" not in k}
    path = write_checkpoint(str(tmp_path / "truncated.safetensors"), state, "safetensors", torch.float32)
    msg = error_of(lambda: sf.infer_unet_config(path))
    assert path in msg and "incomplete unet" in msg and "model.diffusion_model.time_embed.0.weight" in msg


# ----------------------------------------------------------------------------------------------
# Laziness: host memory stays near one tensor while iterating
# ----------------------------------------------------------------------------------------------


def rss_anon_bytes() -> int:
    """Anonymous resident memory of this process (file-backed mmap pages excluded)."""
    libc = ctypes.CDLL(None)
    if hasattr(libc, "malloc_trim"):
        libc.malloc_trim(0)  # hand freed heap back to the OS so earlier garbage doesn't mask growth
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("RssAnon:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no RssAnon")


@pytest.mark.skipif(not os.path.exists("/proc/self/status"), reason="needs Linux /proc")
@pytest.mark.parametrize("fmt", ["safetensors", "ckpt"])
def test_iteration_memory_is_bounded(tmp_path: Any, fmt: str) -> None:
    """~70 MB of float32 output from many <= 1.2 MB tensors; iterating must not accumulate it."""
    cfg = tiny_unet_config(True, channels=(128, 128, 128, 128), cross=128)
    with torch.device("meta"):
        unet = UNet2DConditionModel(**cfg)
    up_attn = [t.startswith("CrossAttn") for t in cfg["up_block_types"]]
    state = {sf.UNET_PREFIX + unet_to_ldm(k, up_attn): torch.ones(v.shape, dtype=torch.float16)
             for k, v in unet.state_dict().items()}
    path = write_checkpoint(str(tmp_path / f"big.{fmt}"), state, fmt, torch.float16)
    total = sum(v.numel() * 4 for v in state.values())
    largest = max(v.numel() * 4 for v in state.values())
    del state
    assert total > 60e6 and largest < 1.3e6

    start, peak, produced = rss_anon_bytes(), 0, 0
    for _, array in sf.iter_component_tensors(path, "unet"):
        produced += array.nbytes
        peak = max(peak, rss_anon_bytes() - start)
        del array
    assert produced == total

    assert peak < 0.1 * total, f"peak RssAnon growth {peak} B while producing {total} B"

    # The measurement is sensitive: holding everything does show up.
    start = rss_anon_bytes()
    held = sf.load_component_state_dict(path, "unet")
    assert rss_anon_bytes() - start > 0.8 * total
    del held


# ----------------------------------------------------------------------------------------------
# End to end: a single file through our loaders and Flax modules vs the PyTorch models
# ----------------------------------------------------------------------------------------------


def test_single_file_through_flax_loaders_matches_torch(models: Models, tmp_path: Any) -> None:
    """load_pipeline(file) and load_unet(file) give the torch models' outputs (fp32 parity)."""
    import jax.numpy as jnp

    from imagerag_jax import weights
    from tests.helpers import assert_parity, nchw, nhwc

    path = write_checkpoint(str(tmp_path / "sd.safetensors"), models.original(True), "safetensors", torch.float32)
    pipe = weights.load_pipeline(path, head_channels=HEAD_CHANNELS)
    assert pipe.tokenizer is None and pipe.prediction_type == "epsilon"
    rng = np.random.default_rng(0)
    # VAE decode.
    z = rng.standard_normal((1, 4, 4, 4), dtype=np.float32)
    with torch.no_grad():
        ref = models.vae.decode(torch.from_numpy(z)).sample.numpy()
    assert_parity(nchw(pipe.vae.apply({"params": pipe.vae_params}, nhwc(z), method=pipe.vae.decode)), ref)
    # Text encoder (23 of the file's 24 layers, final layer norm).
    ids = rng.integers(3, 1000, (2, 77))
    ids[:, 12] = 2
    clip64 = copy.deepcopy(models.clip).double()
    with torch.no_grad():
        ref32 = models.clip(torch.from_numpy(ids)).last_hidden_state.numpy()
        ref64 = clip64(torch.from_numpy(ids)).last_hidden_state.numpy()
    ours = np.asarray(pipe.text_encoder.apply({"params": pipe.text_params}, jnp.asarray(ids, jnp.int32))[0])
    # This fixture's 23 strongly randomised layers are ill-conditioned: torch's own fp32 result is
    # ~1.3e-4 (relative) from float64, so judge ours against float64 with torch fp32's error as
    # the yardstick (a wrong mapping is off by O(1)).
    torch_err = np.abs(ref32 - ref64).max()
    assert np.abs(ours - ref64).max() <= 2 * torch_err + 1e-4 * max(1.0, np.abs(ref64).max())
    # UNet: head width is not in the weights; the tiny fixture uses 16-channel heads.
    unet, params = pipe.unet, pipe.unet_params
    cfg = {"cross_attention_dim": unet.cross_attention_dim}
    x = rng.standard_normal((1, 4, 16, 16), dtype=np.float32)
    ctx = rng.standard_normal((1, 5, cfg["cross_attention_dim"]), dtype=np.float32)
    t = np.array([321])
    with torch.no_grad():
        ref = models.unets[True](torch.from_numpy(x), torch.from_numpy(t), torch.from_numpy(ctx)).sample.numpy()
    assert_parity(nchw(unet.apply({"params": params}, nhwc(x), jnp.asarray(t), jnp.asarray(ctx))), ref)
