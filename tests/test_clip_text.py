"""CLIP text encoder: parity with transformers' CLIPTextModel through our loader, bf16, tokenizer."""

from __future__ import annotations

import json
import os
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
safetensors_torch = pytest.importorskip("safetensors.torch")

from imagerag_jax import weights  # noqa: E402
from imagerag_jax.models import layers  # noqa: E402
from imagerag_jax.models.clip_text import (  # noqa: E402
    CLIPTextTransformer,
    Tokenizer,
    activation,
    eos_positions,
)

TINY = dict(
    vocab_size=1000, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
    num_attention_heads=4, max_position_embeddings=77, layer_norm_eps=1e-5,
    bos_token_id=998, eos_token_id=999, pad_token_id=1,
)
# stabilityai/stable-diffusion-2-1(-base) text_encoder/config.json, verbatim in every field that
# shapes the model or its pooling (OpenCLIP ViT-H/14 text tower; its eos_token_id is the legacy 2).
SD21_TEXT_CONFIG = dict(
    vocab_size=49408, hidden_size=1024, intermediate_size=4096, num_hidden_layers=23,
    num_attention_heads=16, max_position_embeddings=77, hidden_act="gelu", layer_norm_eps=1e-5,
    projection_dim=512, bos_token_id=0, eos_token_id=2, pad_token_id=1,
)


def parity_tol(ref: np.ndarray) -> float:
    """fp32 parity (docs/design.md, "Numerics"): max |diff| <= 1e-4 * max(1, max|ref|) in fp32."""
    return 1e-4 * max(1.0, float(np.abs(ref).max()))


def save_torch_model(
    folder: str, seed: int = 0, *, safe: bool = True, prefix: str = "", **config: Any
) -> Any:
    """A random transformers CLIPTextModel saved to ``folder``; returns the torch model.

    Biases and layer norms start at 0/1 in transformers' init, which would hide a swapped or
    dropped bias; they are perturbed. ``prefix="text_model."`` writes the key layout of older
    checkpoints (SD 2.1's files) instead of transformers 5's; ``safe=False`` a pytorch_model.bin
    (transformers 5 always saves safetensors, so the pickle is written here).
    """
    torch.manual_seed(seed)
    model = transformers.CLIPTextModel(transformers.CLIPTextConfig(**config)).eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.ndim == 1:
                p.add_(0.1 * torch.randn_like(p))
    model.save_pretrained(folder)
    if prefix or not safe:
        state = {prefix + k: v.contiguous() for k, v in model.state_dict().items()}
        os.remove(os.path.join(folder, "model.safetensors"))
        if safe:
            safetensors_torch.save_file(state, os.path.join(folder, "model.safetensors"))
        else:
            torch.save(state, os.path.join(folder, "pytorch_model.bin"))
    return model


def random_ids(vocab: int, eos: int, length: int, seed: int = 0) -> np.ndarray:
    """Three rows: EOS mid-row then EOS padding, EOS mid-row then zeros, EOS in the last slot."""
    rng = np.random.default_rng(seed)
    ids = rng.integers(0, min(vocab, eos) - 1, size=(3, length))
    ids[0, length // 3:] = eos
    ids[1, length // 2] = eos
    ids[1, length // 2 + 1:] = 0
    ids[2, -1] = eos
    return ids.astype(np.int32)


def torch_forward(model: Any, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(last_hidden_state, pooler_output) of the reference model."""
    with torch.no_grad():
        out = model(input_ids=torch.from_numpy(ids.astype(np.int64)))
    return out.last_hidden_state.numpy(), out.pooler_output.numpy()


def assert_parity(ours: tuple[jax.Array, jax.Array], ref: tuple[np.ndarray, np.ndarray]) -> None:
    """Both outputs within the parity tolerance of the reference."""
    for name, a, r in zip(("last_hidden_state", "pooled"), ours, ref):
        a = np.asarray(a)
        assert a.shape == r.shape and a.dtype == np.float32, (name, a.shape, a.dtype)
        err = float(np.abs(a - r).max())
        assert err <= parity_tol(r), f"{name}: max|diff| {err:.3g} > {parity_tol(r):.3g}"


# ------------------------------------------------------------------------------------ parity


@pytest.mark.parametrize(
    "case",
    [
        dict(hidden_act="gelu"),
        dict(hidden_act="gelu", attention_impl="xla"),
        dict(hidden_act="quick_gelu", safe=False),
        # legacy pooling (argmax of ids) with the "text_model." key layout of SD 2.1's files
        dict(hidden_act="gelu", eos_token_id=2, bos_token_id=0, prefix="text_model."),
    ],
    ids=["gelu", "gelu-xla-attention", "quick_gelu-bin", "legacy-eos2-prefixed"],
)
def test_parity_tiny(tmp_path, case):
    case = dict(case)
    impl = case.pop("attention_impl", None)
    safe, prefix = case.pop("safe", True), case.pop("prefix", "")
    config = {**TINY, **case}
    model = save_torch_model(str(tmp_path), safe=safe, prefix=prefix, **config)
    assert os.path.exists(tmp_path / ("model.safetensors" if safe else "pytorch_model.bin"))
    text, params = weights.load_text_encoder(str(tmp_path))
    assert text.hidden_act == config["hidden_act"] and text.eos_token_id == config["eos_token_id"]
    if impl:
        text = text.clone(attention_impl=impl)
    eos = config["vocab_size"] - 1 if config["eos_token_id"] == 2 else config["eos_token_id"]
    ids = random_ids(config["vocab_size"], eos, 77)
    ids[:, 1] = 2  # legacy configs must pool at the largest id, not at the first id 2
    ours = jax.jit(text.apply)({"params": params}, ids)
    assert_parity(ours, torch_forward(model, ids))


def test_parity_sd21_real_config(tmp_path):
    """The real SD 2.1 text encoder shape (23 x 1024, 16 heads, gelu) with random weights."""
    model = save_torch_model(str(tmp_path), **SD21_TEXT_CONFIG)
    text, params = weights.load_text_encoder(str(tmp_path))
    assert (text.hidden_size, text.num_hidden_layers, text.num_attention_heads) == (1024, 23, 16)
    assert (text.intermediate_size, text.vocab_size, text.hidden_act) == (4096, 49408, "gelu")
    # A short sequence keeps the test fast; params do not depend on the length.
    ids = random_ids(49408, 49407, 12, seed=1)
    ids[:, 0] = 49406  # <|startoftext|>: large, but pooling must pick <|endoftext|> 49407
    ids[:, 1] = 2  # the config's legacy eos_token_id: must not be what is pooled
    ours = jax.jit(text.apply)({"params": params}, ids)
    assert_parity(ours, torch_forward(model, ids))
    del model, params


@pytest.mark.parametrize("param_dtype", [jnp.float32, jnp.bfloat16])
def test_bf16_close_to_fp32(tmp_path, param_dtype):
    """bf16 compute: max|diff| <= 2e-2 * max(1, max|fp32|), mean |diff| <= 1e-2 (fp32 outputs).

    Measured on this tiny model: max 0.5-0.7% of max|fp32|, mean 0.004-0.005 (bf16 params).
    """
    save_torch_model(str(tmp_path), **{**TINY, "hidden_act": "gelu"})
    text32, params32 = weights.load_text_encoder(str(tmp_path))
    text16, params16 = weights.load_text_encoder(
        str(tmp_path), dtype=jnp.bfloat16, param_dtype=param_dtype
    )
    assert jax.tree.leaves(params16)[0].dtype == param_dtype
    ids = random_ids(TINY["vocab_size"], TINY["eos_token_id"], 77)
    ref = jax.jit(text32.apply)({"params": params32}, ids)
    out = jax.jit(text16.apply)({"params": params16}, ids)
    for a, r in zip(out, ref):
        a, r = np.asarray(a), np.asarray(r)
        assert a.dtype == np.float32 and np.isfinite(a).all()
        diff = np.abs(a - r)
        assert diff.max() <= 2e-2 * max(1.0, np.abs(r).max()), diff.max()
        assert diff.mean() <= 1e-2, diff.mean()


# ------------------------------------------------------------------------- building blocks


@pytest.mark.parametrize("name", ["gelu", "quick_gelu", "gelu_new", "gelu_pytorch_tanh"])
def test_activations_match_transformers(name):
    from transformers.activations import ACT2FN

    x = np.linspace(-6, 6, 241, dtype=np.float32)
    ref = ACT2FN[name](torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(np.asarray(activation(name)(jnp.asarray(x))), ref, atol=1e-6)


def test_causal_attention_both_paths():
    """layers.attention(causal=True) equals a masked numpy reference on 'einsum' and 'xla'."""
    rng = np.random.default_rng(0)
    q, k, v = (rng.standard_normal((2, 7, 3, 8)).astype(np.float32) for _ in range(3))
    s = np.einsum("bqhd,bkhd->bhqk", q, k) / np.sqrt(8)
    s = np.where(np.tril(np.ones((7, 7), bool)), s, -np.inf)
    w = np.exp(s - s.max(-1, keepdims=True))
    ref = np.einsum("bhqk,bkhd->bqhd", w / w.sum(-1, keepdims=True), v)
    for impl in ("einsum", "xla"):
        out = layers.attention(jnp.asarray(q), jnp.asarray(k), jnp.asarray(v), implementation=impl, causal=True)
        np.testing.assert_allclose(np.asarray(out), ref, atol=2e-6, err_msg=impl)


def test_eos_positions():
    ids = jnp.array([[49406, 5, 49407, 49407], [49406, 7, 8, 49407], [3, 4, 5, 6]])
    np.testing.assert_array_equal(eos_positions(ids, 49407), [2, 3, 0])  # no EOS -> 0, as HF
    np.testing.assert_array_equal(eos_positions(ids, 2), [2, 3, 3])  # legacy: first argmax


def test_from_config_variants():
    text_cfg = dict(SD21_TEXT_CONFIG)
    clip_config = transformers.CLIPConfig(text_config=text_cfg).to_dict()  # a full CLIPModel config
    nested = CLIPTextTransformer.from_config(clip_config)
    assert nested == CLIPTextTransformer.from_config(text_cfg)
    # Fields omitted from config.json take transformers' CLIPTextConfig defaults.
    default = CLIPTextTransformer.from_config({}, dtype=jnp.bfloat16)
    assert (default.hidden_size, default.hidden_act, default.eos_token_id) == (512, "quick_gelu", 49407)
    assert default.dtype == jnp.bfloat16
    with pytest.raises(ValueError, match="unsupported CLIP hidden_act 'relu'"):
        CLIPTextTransformer.from_config({**text_cfg, "hidden_act": "relu"})
    text = CLIPTextTransformer.from_config({**TINY, "hidden_act": "gelu"})
    shapes = jax.eval_shape(text.init, jax.random.PRNGKey(0), *text.dummy_inputs())["params"]
    assert shapes["encoder"]["layers_1"]["self_attn"]["q_proj"]["kernel"].shape == (32, 32)
    with pytest.raises(ValueError, match="exceeds max_position_embeddings"):
        jax.eval_shape(text.init, jax.random.PRNGKey(0), jnp.zeros((1, 78), jnp.int32))


# ------------------------------------------------------------------------------ loader errors


def test_loader_reports_missing_extra_and_misshaped(tmp_path):
    model = save_torch_model(str(tmp_path), **{**TINY, "hidden_act": "gelu"})
    state = {"text_model." + k: v.contiguous() for k, v in model.state_dict().items()}
    del state["text_model.encoder.layers.1.mlp.fc2.bias"]
    state["text_model.encoder.layers.0.extra.weight"] = torch.zeros(3)
    state["text_model.final_layer_norm.weight"] = torch.ones(31)
    safetensors_torch.save_file(state, str(tmp_path / "model.safetensors"))
    with pytest.raises(weights.WeightLoadError) as info:
        weights.load_text_encoder(str(tmp_path))
    msg = str(info.value)
    assert "missing from checkpoint" in msg and "encoder/layers_1/mlp/fc2/bias (32,)" in msg
    assert "unexpected in checkpoint (1)" in msg and "encoder.layers.0.extra.weight (3,)" in msg
    assert "shape mismatch (1)" in msg and "final_layer_norm.weight: checkpoint (31,) vs module (32,)" in msg


# ---------------------------------------------------------------------------------- tokenizer


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP's reversible byte -> printable unicode table."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


MERGES = [("c", "a"), ("ca", "t</w>"), ("d", "o"), ("do", "g</w>")]


def write_tokenizer(folder: str, pad_token: str | None) -> dict[str, int]:
    """A minimal consistent CLIP BPE tokenizer (bytes, bytes+</w>, 4 merges, BOS/EOS) on disk."""
    os.makedirs(folder, exist_ok=True)
    chars = list(bytes_to_unicode().values())
    tokens = chars + [c + "</w>" for c in chars] + ["".join(m) for m in MERGES]
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    vocab = {t: i for i, t in enumerate(tokens)}
    with open(os.path.join(folder, "vocab.json"), "w") as f:
        json.dump(vocab, f)
    with open(os.path.join(folder, "merges.txt"), "w") as f:
        f.write("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in MERGES))
    config: dict[str, Any] = {"tokenizer_class": "CLIPTokenizer", "model_max_length": 77}
    if pad_token is not None:
        config["pad_token"] = pad_token
    with open(os.path.join(folder, "tokenizer_config.json"), "w") as f:
        json.dump(config, f)
    return vocab


@pytest.mark.parametrize("pad_token", ["!", None], ids=["sd2-pad-!", "sd1-pad-eos"])
def test_tokenizer_pads_to_77(tmp_path, pad_token):
    vocab = write_tokenizer(str(tmp_path), pad_token)
    tok = Tokenizer.from_pretrained(str(tmp_path))
    bos, eos = vocab["<|startoftext|>"], vocab["<|endoftext|>"]
    pad = 0 if pad_token == "!" else eos  # '!' is the first byte token, as in SD 2.x's vocab
    assert tok.pad_token_id == pad and tok.eos_token_id == eos
    ids = tok(["a cat", "Dog  dog"])
    assert ids.shape == (2, 77) and ids.dtype == np.int32
    np.testing.assert_array_equal(ids[0, :4], [bos, vocab["a</w>"], vocab["cat</w>"], eos])
    np.testing.assert_array_equal(ids[1, :4], [bos, vocab["dog</w>"], vocab["dog</w>"], eos])
    assert (ids[:, 4:] == pad).all()
    assert tok("a cat").shape == (1, 77)


def test_tokenizer_truncation_warns(tmp_path):
    vocab = write_tokenizer(str(tmp_path), "!")
    tok = Tokenizer.from_pretrained(str(tmp_path))
    long_prompt = " ".join(["cat"] * 100)  # 100 tokens + BOS/EOS: 25 over 77
    with pytest.warns(UserWarning, match=r"25 token\(s\) dropped: 'cat cat") as record:
        ids = tok(["a dog", long_prompt])
    assert len(record) == 1
    assert ids.shape == (2, 77) and ids[1, -1] == vocab["<|endoftext|>"]
    assert (ids[1, 1:-1] == vocab["cat</w>"]).all()
    # Exactly transformers' padded and truncated ids (the SD pipelines' call).
    ref = tok.tokenizer(["a dog", long_prompt], padding="max_length", max_length=77, truncation=True)
    np.testing.assert_array_equal(ids, np.asarray(ref["input_ids"]))


def test_tokenizer_missing_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="no CLIP tokenizer"):
        Tokenizer.from_pretrained(str(tmp_path))
    with pytest.raises(FileNotFoundError, match="does not exist"):
        Tokenizer.from_pretrained(str(tmp_path / "nowhere"))
