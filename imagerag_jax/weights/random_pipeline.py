"""A complete diffusers-format SD 2.x pipeline folder with random weights, written without torch.

Used by the tests and as the CLI's embedded default so that a fresh install can exercise the real
loading and generation path end to end without downloading anything. Its images are noise.
"""

from __future__ import annotations

import json
import os
import tempfile
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from imagerag_jax.models.clip_text import CLIPTextTransformer
from imagerag_jax.models.unet import UNet
from imagerag_jax.models.vae import AutoencoderKL
from imagerag_jax.weights import convert, to_torch
from imagerag_jax.weights.from_torch import unet_dummy_inputs

# Byte-level BPE with no merges: 256 byte symbols, the same with end-of-word, then BOS/EOS.
TINY_VOCAB_SIZE = 2 * 256 + 2
# 'tiny': the cheapest towers that run every step of training and inference (one UNet level: a
# UNet's compile time grows with its levels, and most CPU test time is compiling). 'tiny2': two
# UNet levels, both block types, down- and upsampling: the converters' round trips and the tests
# of what depends on the UNet's levels (LoRA's decoder pattern, one discriminator head per stage).
_TINY_VAE = dict(block_out_channels=(16, 32), layers_per_block=1, norm_num_groups=8)
_TINY_TEXT = dict(vocab_size=TINY_VOCAB_SIZE, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                  num_attention_heads=2, eos_token_id=TINY_VOCAB_SIZE - 1)
PRESETS: dict[str, dict[str, dict[str, Any]]] = {
    "tiny": {
        "unet": dict(block_out_channels=(32,), down_block_types=("CrossAttnDownBlock2D",),
                     up_block_types=("CrossAttnUpBlock2D",), layers_per_block=1, num_attention_heads=(2,),
                     cross_attention_dim=32, norm_num_groups=8),
        "vae": _TINY_VAE,
        "text_encoder": _TINY_TEXT,
    },
    "tiny2": {
        "unet": dict(block_out_channels=(32, 64), down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                     up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), layers_per_block=1,
                     num_attention_heads=(2, 4), cross_attention_dim=32, norm_num_groups=8),
        "vae": _TINY_VAE,
        "text_encoder": _TINY_TEXT,
    },
}


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP byte -> printable unicode character table used by byte-level BPE vocabularies."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(
        range(ord("®"), ord("ÿ") + 1)
    )
    table, extra = {}, 0
    for b in range(256):
        if b in printable:
            table[b] = chr(b)
        else:
            table[b] = chr(256 + extra)
            extra += 1
    return table


def write_byte_tokenizer(out_dir: str) -> str:
    """A CLIP tokenizer folder with a byte-level vocabulary (pads with '!', id 0, as SD 2.x)."""
    os.makedirs(out_dir, exist_ok=True)
    symbols = list(bytes_to_unicode().values())
    vocab = {s: i for i, s in enumerate(symbols + [s + "</w>" for s in symbols])}
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    with open(os.path.join(out_dir, "vocab.json"), "w") as f:
        json.dump(vocab, f)
    with open(os.path.join(out_dir, "merges.txt"), "w") as f:
        f.write("#version: 0.2\n")
    config = {
        "tokenizer_class": "CLIPTokenizer",
        "model_max_length": 77,
        "bos_token": "<|startoftext|>",
        "eos_token": "<|endoftext|>",
        "unk_token": "<|endoftext|>",
        "pad_token": "!",
        "do_lower_case": True,
    }
    with open(os.path.join(out_dir, "tokenizer_config.json"), "w") as f:
        json.dump(config, f)
    return out_dir


def random_params(shapes: Any, seed: int) -> Any:
    """Random params for a shape tree: kernels/embeddings ~ N(0, 1/fan_in), biases 0, scales 1.

    Filled with numpy: compiling ``module.init`` costs XLA ~10 s per tower on CPU, for weights
    whose exact distribution does not matter here.
    """
    rng = np.random.default_rng(seed)
    flat = convert.flatten(shapes)
    out = {}
    for path, leaf in flat.items():
        shape, name = tuple(leaf.shape), path[-1]
        if name == "bias":
            value = np.zeros(shape, np.float32)
        elif name == "scale":
            value = np.ones(shape, np.float32)
        else:
            fan_in = int(np.prod(shape[:-1])) if name == "kernel" else 1
            value = rng.standard_normal(shape, dtype=np.float32) / np.sqrt(fan_in)
        out[path] = jnp.asarray(value)
    return convert.unflatten(out)


def random_modules(preset: str = "tiny", seed: int = 0) -> dict[str, tuple[Any, Any]]:
    """{component: (module, random params)} for a preset."""
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; choose one of {sorted(PRESETS)}")
    spec = PRESETS[preset]
    unet = UNet(**spec["unet"])
    vae = AutoencoderKL(**spec["vae"])
    text = CLIPTextTransformer(**spec["text_encoder"])
    inputs = {"unet": unet_dummy_inputs(unet), "vae": vae.dummy_inputs(), "text_encoder": text.dummy_inputs()}
    out = {}
    for i, (name, module) in enumerate((("unet", unet), ("vae", vae), ("text_encoder", text))):
        shapes = convert.param_shapes(lambda: module.init(jax.random.PRNGKey(0), *inputs[name]))
        out[name] = (module, random_params(shapes, seed * 3 + i))
    return out


def write_random_pipeline(out_dir: str, preset: str = "tiny", seed: int = 0,
                          prediction_type: str = "epsilon") -> str:
    """Write unet/, vae/, text_encoder/, tokenizer/, scheduler/ and model_index.json."""
    modules = random_modules(preset, seed)
    with tempfile.TemporaryDirectory() as tok:
        to_torch.save_pipeline(out_dir, *modules["unet"], *modules["vae"], *modules["text_encoder"],
                               tokenizer_dir=write_byte_tokenizer(tok),
                               scheduler=to_torch.scheduler_config(prediction_type))
    return out_dir
