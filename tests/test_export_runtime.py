"""Export of a training run to PyTorch and the torch runtime (to_diffusers.py, to_torch.py, torch_runtime.py).

(a) export -> our loaders is the identity; (b) the merged UNet in diffusers = our Flax UNet with the
LoRA merged; (c) the PEFT LoRA on the unmerged base = the merged UNet; (d) the torch adapter hook
= sampling.imagerag_one_step (a zero adapter = plain one step); (e) a trained tiny run exported
and re-run in PyTorch end to end (text encoder, index search, one step, VAE) = the JAX path; (f)
bad workdirs and output folders give one clear error and leave everything as it was.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")
transformers = pytest.importorskip("transformers")

from imagerag_jax import weights  # noqa: E402
from imagerag_jax.export import to_diffusers
from imagerag_jax.models import lora
from imagerag_jax.diffusion import sampling
from imagerag_jax.weights import towers
from imagerag_jax.training import trainer as trainer_lib
from imagerag_jax.export import torch_runtime as rt  # noqa: E402
from imagerag_jax.models import adapter as adapter_lib  # noqa: E402
from imagerag_jax.models.clip_text import Tokenizer  # noqa: E402
from imagerag_jax.retrieval import database as db_lib  # noqa: E402
from imagerag_jax.retrieval import index as index_lib  # noqa: E402
from imagerag_jax.diffusion.schedule import scaled_linear_schedule  # noqa: E402
from imagerag_jax.weights import convert, to_torch  # noqa: E402
from tests.helpers import assert_parity, nchw, parity_error  # noqa: E402
from tests.rag_fixtures import tiny_config  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
SCHEDULE = scaled_linear_schedule()
B, K, S, L = 2, 2, 8, 77
ALPHA, RANK = 8.0, 4  # scale 2: the alpha/rank factor is exercised
MEASURED: dict[str, float] = {}  # max |diff| per check, printed at the end (-s)


def randn(seed: int, *shape: int, scale: float = 1.0) -> np.ndarray:
    return (scale * np.random.default_rng(seed).standard_normal(shape)).astype(np.float32)


def check(name: str, out, ref) -> None:
    """assert_parity, recording the max |diff|."""
    MEASURED[name] = parity_error(out, ref)[0]
    assert_parity(out, ref)


@pytest.fixture(scope="module", autouse=True)
def report_and_one_torch_thread():
    """One torch thread (tiny models; two threads on a busy 2-core machine are ~100x slower)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
    print("\nmax |diff|: " + ", ".join(f"{k}={v:.2e}" for k, v in MEASURED.items()))


def same_tree(a, b, what: str) -> None:
    """Two param trees with the same paths and bit-identical leaves."""
    fa, fb = convert.flatten(a), convert.flatten(b)
    assert fa.keys() == fb.keys(), what
    for k in fa:
        np.testing.assert_array_equal(np.asarray(fa[k]), np.asarray(fb[k]), err_msg=f"{what} {k}")


def torch_out(model, x_nhwc, t, ctx) -> np.ndarray:
    """A diffusers UNet's output on NHWC numpy inputs, as NCHW numpy."""
    with torch.no_grad():
        return model(torch.from_numpy(np.ascontiguousarray(nchw(x_nhwc))), torch.from_numpy(t),
                     torch.from_numpy(ctx)).sample.numpy()


# ---------------------------------------------------------------------------------------------
# Synthetic weights: the tiny student, a non-zero LoRA and a non-zero adapter.
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def synth(tmp_path_factory):
    """Tiny UNet, a LoRA with random B, its merge, and the three written as diffusers/PEFT folders."""
    out = tmp_path_factory.mktemp("synth")
    unet, base = towers.random_tower("unet", "tiny", 0)
    lora_p = lora.init_lora(jax.random.PRNGKey(1), base, lora.DEFAULT_DECODER_PATTERN, RANK)
    flat = lora.flatten(lora_p)
    for i, path in enumerate(sorted(p for p in flat if p.endswith("/b"))):
        flat[path] = jnp.asarray(randn(100 + i, *flat[path].shape, scale=0.3))
    lora_p = lora.unflatten(flat)
    merged = lora.merge(base, lora_p, ALPHA, RANK)
    to_torch.save_unet(unet, base, str(out / "base"))
    to_torch.save_unet(unet, merged, str(out / "merged"))
    to_torch.save_lora_peft(lora_p, ALPHA, RANK, str(out / "lora"))
    d = unet.cross_attention_dim
    adapter = adapter_lib.HSpaceAdapter(num_heads=4)

    @jax.jit
    def rag_fn(unet_p, adapter_p, noise, ctx, retr_lat, retr_ctx, lam):
        """(x0, h_retr) of sampling.imagerag_one_step at t=999 (the test's only JAX program)."""
        h_retr = sampling.retrieved_hspace(unet, unet_p, retr_lat, retr_ctx)
        return sampling.imagerag_one_step(unet, unet_p, adapter, adapter_p, noise, ctx, h_retr, lam,
                                          SCHEDULE), h_retr

    inputs = dict(x=randn(1, B, S, S, 4), t=np.array([999, 500]), ctx=randn(2, B, L, d),
                  noise=randn(10, B, S, S, 4), retr_lat=randn(12, B, K, S, S, 4),
                  retr_ctx=randn(13, B, K, L, d))
    return dict(unet=unet, base=base, lora=lora_p, merged=merged, dir=out, adapter=adapter,
                rag_fn=rag_fn, **inputs)


def _jax_x0(synth, unet_p, adapter_p, lam, noise=None, ctx=None, retr_lat=None, retr_ctx=None):
    """rag_fn on the synth inputs (or the given ones), as numpy."""
    pick = lambda v, name: jnp.asarray(synth[name] if v is None else v)
    x0, h_retr = synth["rag_fn"](unet_p, adapter_p, pick(noise, "noise"), pick(ctx, "ctx"),
                                 pick(retr_lat, "retr_lat"), pick(retr_ctx, "retr_ctx"), jnp.asarray(lam))
    return np.asarray(x0), np.asarray(h_retr)


@pytest.fixture(scope="module")
def zero_adapter(synth):
    """The adapter's params at initialisation (zero output)."""
    unet = synth["unet"]
    h = jnp.zeros((B, S // 2, S // 2, unet.h_space_channels))
    return synth["adapter"].init(jax.random.PRNGKey(0), h, jnp.zeros((B, K, *h.shape[1:])))["params"]


def test_b_exported_merged_unet_in_diffusers_matches_flax(synth, zero_adapter):
    # At lam = 0 imagerag_one_step is the plain UNet at t = 999; compare the UNet outputs (eps).
    noise, ctx = synth["noise"], synth["ctx"]
    model = diffusers.UNet2DConditionModel.from_pretrained(str(synth["dir"] / "merged")).eval()
    acp = float(SCHEDULE.alphas_cumprod[999])
    to_eps = lambda x0: (noise - np.sqrt(acp) * x0) / np.sqrt(1.0 - acp)
    ours = to_eps(_jax_x0(synth, synth["merged"], zero_adapter, np.zeros(B, np.float32))[0])
    check("b_merged_unet_eps", torch_out(model, noise, np.array([999, 999]), ctx), nchw(ours))
    plain = to_eps(_jax_x0(synth, synth["base"], zero_adapter, np.zeros(B, np.float32))[0])
    assert np.abs(ours - plain).max() > 1e-2, "the LoRA changes nothing: the check would be vacuous"


def _manual_merge(model, lora_dir: str) -> None:
    """W += (lora_alpha / r)·B·A per module, from the file's tensors and metadata (no PEFT)."""
    from safetensors import safe_open

    path = os.path.join(lora_dir, to_torch.LORA_WEIGHT_NAME)
    with safe_open(path, "pt") as f:
        meta = json.loads(f.metadata()[to_torch.LORA_METADATA_KEY])
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    scale = meta["unet.lora_alpha"] / meta["unet.r"]
    modules = dict(model.named_modules())
    assert sorted(meta["unet.target_modules"]) == sorted(
        {k[len("unet."):].rsplit(".lora_", 1)[0] for k in tensors})
    with torch.no_grad():
        for name in meta["unet.target_modules"]:
            a, b = tensors[f"unet.{name}.lora_A.weight"], tensors[f"unet.{name}.lora_B.weight"]
            w = modules[name].weight
            delta = (b.flatten(1) @ a.flatten(1)).reshape(w.shape)  # conv: B (o,r,1,1), A (r,i,kh,kw)
            w += scale * delta


def test_c_peft_lora_on_base_reproduces_merged(synth):
    x, t, ctx = synth["x"], synth["t"], synth["ctx"]
    merged = torch_out(diffusers.UNet2DConditionModel.from_pretrained(str(synth["dir"] / "merged")).eval(),
                       x, t, ctx)
    model = diffusers.UNet2DConditionModel.from_pretrained(str(synth["dir"] / "base")).eval()
    _manual_merge(model, str(synth["dir"] / "lora"))
    check("c_lora_manual_merge", torch_out(model, x, t, ctx), merged)


def test_c_peft_lora_loads_with_diffusers_load_lora_adapter(synth):
    pytest.importorskip("peft")
    x, t, ctx = synth["x"], synth["t"], synth["ctx"]
    merged = torch_out(diffusers.UNet2DConditionModel.from_pretrained(str(synth["dir"] / "merged")).eval(),
                       x, t, ctx)
    model = diffusers.UNet2DConditionModel.from_pretrained(str(synth["dir"] / "base")).eval()
    model.load_lora_adapter(str(synth["dir"] / "lora"), prefix="unet",
                            weight_name=to_torch.LORA_WEIGHT_NAME)
    check("c_lora_peft", torch_out(model, x, t, ctx), merged)


# ---------------------------------------------------------------------------------------------
# (d) The torch adapter hook against sampling.imagerag_one_step.
# ---------------------------------------------------------------------------------------------


def _random_adapter_params(like, seed: int):
    """Adapter params shaped like `like`, every leaf random (to_out non-zero, LayerNorm not identity)."""
    flat = convert.flatten(like)
    out = {}
    for i, (path, leaf) in enumerate(sorted(flat.items())):
        scale = 0.2 if path[-1] == "kernel" else 0.1
        value = randn(seed + i, *leaf.shape, scale=scale)
        out[path] = jnp.asarray(value + (1.0 if path[-1] == "scale" else 0.0))
    return convert.unflatten(out)


@pytest.fixture(scope="module")
def rag(synth, zero_adapter, tmp_path_factory):
    """A random adapter, lambda, the JAX one-step results and the torch side (adapter folders, UNet)."""
    unet, merged = synth["unet"], synth["merged"]
    d = unet.cross_attention_dim
    pooled, retr_pooled = randn(14, B, d), randn(15, B, K, d)
    params = _random_adapter_params(zero_adapter, 200)
    lam = np.asarray(adapter_lib.retrieval_lambda(jnp.asarray(pooled), jnp.asarray(retr_pooled)))
    x0, h_retr = _jax_x0(synth, merged, params, lam)
    x0_zero, _ = _jax_x0(synth, merged, zero_adapter, lam)
    plain, _ = _jax_x0(synth, merged, params, np.zeros_like(lam))
    folder = tmp_path_factory.mktemp("adapter")
    to_torch.save_adapter(synth["adapter"], params, unet.h_space_channels, str(folder / "adapter"))
    to_torch.save_adapter(synth["adapter"], zero_adapter, unet.h_space_channels, str(folder / "zero"))
    model = diffusers.UNet2DConditionModel.from_pretrained(str(synth["dir"] / "merged")).eval()
    sched = diffusers.EulerDiscreteScheduler.from_config(to_torch.scheduler_config())
    make = lambda name: rt.ImageRAGTurboPipeline(model, None, None, None, sched.alphas_cumprod,
                                                 "epsilon", rt.load_adapter(str(folder / name)),
                                                 timestep=999)
    tt = lambda a: torch.from_numpy(np.ascontiguousarray(a))
    return dict(
        jax=dict(x0=x0, h_retr=h_retr, lam=lam, x0_zero=x0_zero, plain=plain, params=params),
        torch=dict(noise=tt(nchw(synth["noise"])), ctx=tt(synth["ctx"]),
                   retr_lat=tt(np.transpose(synth["retr_lat"], (0, 1, 4, 2, 3))),
                   retr_ctx=tt(synth["retr_ctx"]), pooled=tt(pooled), retr_pooled=tt(retr_pooled)),
        make=make, folder=folder)


def test_d_torch_adapter_hook_matches_jax_one_step(rag):
    j, t = rag["jax"], rag["torch"]
    pipe = rag["make"]("adapter")
    lam = rt.retrieval_lambda(t["pooled"], t["retr_pooled"])
    check("d_lambda", lam.numpy(), j["lam"])
    with torch.no_grad():
        h_retr = rt.retrieved_hspace(pipe.unet, t["retr_lat"], t["retr_ctx"])
    check("d_h_retr", h_retr.numpy(), np.transpose(np.asarray(j["h_retr"]), (0, 1, 4, 2, 3)))
    x0 = pipe.denoise(t["noise"], t["ctx"], t["retr_lat"], t["retr_ctx"], lam)
    check("d_x0_adapter", x0.numpy(), nchw(j["x0"]))
    # The adapter matters here (so the check above is not the plain UNet's).
    assert np.abs(np.asarray(j["x0"]) - np.asarray(j["plain"])).max() > 1e-2
    # The hook is inactive outside `retrieval` and removable.
    plain = pipe.denoise(t["noise"], t["ctx"])
    check("d_x0_plain", plain.numpy(), nchw(j["plain"]))
    pipe.hook.remove()
    # The exported adapter tensors are the Flax params (exact).
    sd = rt.load_adapter(str(rag["folder"] / "adapter")).state_dict()
    for key, value in to_torch.torch_state_dict(j["params"]).items():
        np.testing.assert_array_equal(sd[key].numpy(), value, err_msg=key)


def test_d_load_adapter_refuses_missing_and_foreign_configs(rag, tmp_path):
    with pytest.raises(FileNotFoundError, match="has no adapter"):
        rt.load_adapter(str(tmp_path))
    folder = tmp_path / "adapter"
    folder.mkdir()
    cfg = json.loads((rag["folder"] / "adapter" / "config.json").read_text())
    for key, value, match in (("version", 99, "version 99"), ("format", "other", "format 'other'")):
        (folder / "config.json").write_text(json.dumps(dict(cfg, **{key: value})))
        with pytest.raises(ValueError, match=match):
            rt.load_adapter(str(tmp_path))
    (folder / "config.json").write_text("{not json")
    with pytest.raises(ValueError, match="not a readable JSON adapter config"):
        rt.load_adapter(str(folder))

def test_d_zero_adapter_is_plain_one_step(rag):
    j, t = rag["jax"], rag["torch"]
    pipe = rag["make"]("zero")
    lam = rt.retrieval_lambda(t["pooled"], t["retr_pooled"])
    x0 = pipe.denoise(t["noise"], t["ctx"], t["retr_lat"], t["retr_ctx"], lam)
    plain = pipe.denoise(t["noise"], t["ctx"])
    np.testing.assert_array_equal(x0.numpy(), plain.numpy())  # h + lam * 0 = h, bit for bit
    check("d_jax_zero_vs_plain", np.asarray(j["x0_zero"]), np.asarray(j["plain"]))
    check("d_x0_zero_adapter", x0.numpy(), nchw(j["plain"]))
    pipe.hook.remove()


# ---------------------------------------------------------------------------------------------
# A trained tiny run: export (CLI), identity, PyTorch end to end, errors.
# ---------------------------------------------------------------------------------------------


CAPTIONS = ["a red square", "a blue circle", "a green triangle", "a handwritten digit seven",
            "a photo of a cat", "a photo of a dog"]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """configs/tiny.py for 4 steps (lr 1e-4) on its synthetic data, exported in-process."""
    root = tmp_path_factory.mktemp("run")
    workdir, out = root / "work", root / "export"
    cfg = tiny_config(total_steps=4, checkpoint_every=4, log_every=4)
    state = jax.tree.map(np.asarray, trainer_lib.train_and_evaluate(cfg, str(workdir)))
    paths = to_diffusers.export_run(str(workdir), str(out))
    return dict(workdir=workdir, out=out, state=state, paths=paths, root=root)


def test_a_export_then_import_is_the_identity(run):
    out, params = run["out"], run["state"]["params"]
    assert np.any(params["adapter"]["to_out"]["kernel"]), "4 steps at lr 1e-4 left the adapter at zero"
    assert sorted(run["paths"]) == ["adapter", "base_unet", "lora", "manifest", "model_index",
                                    "scheduler", "text_encoder", "tokenizer", "unet", "vae"]
    _, base = towers.random_tower("unet", "tiny", 0)
    merged = lora.merge(base, params["lora"], 4.0, 4)
    same_tree(weights.load_unet(str(out / "unet"))[1], merged, "merged unet")
    same_tree(weights.load_unet(str(out / "lora" / "base_unet"))[1], base, "base unet")
    same_tree(weights.load_vae(str(out / "vae"))[1], towers.random_tower("vae", "tiny", 0)[1], "vae")
    same_tree(weights.load_text_encoder(str(out / "text_encoder"))[1],
         towers.random_tower("text_encoder", "tiny", 0)[1], "text")
    sd = rt.load_adapter(str(out)).state_dict()
    for key, value in to_torch.torch_state_dict(params["adapter"]).items():
        np.testing.assert_array_equal(sd[key].numpy(), value, err_msg=key)
    from safetensors.numpy import load_file

    peft = load_file(str(out / "lora" / to_torch.LORA_WEIGHT_NAME))
    want = to_torch.lora_peft_state_dict(params["lora"], 4.0, 4)
    assert peft.keys() == want.keys() and len(peft) == 2 * len(lora.lora_pairs(params["lora"]))
    for key in want:
        np.testing.assert_array_equal(peft[key], want[key], err_msg=key)
    pipe = weights.load_pipeline(str(out))  # our loader reads the folder back as a pipeline too
    assert pipe.tokenizer is not None and pipe.prediction_type == "epsilon"
    manifest = json.loads((out / to_diffusers.MANIFEST).read_text())
    assert manifest["step"] == 4 and manifest["text_encoder"] == "random:tiny:0"


@pytest.fixture(scope="module")
def retrieval_db(run):
    """A 6-entry DB (random latents, captions encoded by the run's text encoder) and its exact index."""
    text, text_p = towers.random_tower("text_encoder", "tiny", 0)
    tok = Tokenizer.from_pretrained(str(run["out"] / "tokenizer"))
    hidden, pooled = jax.jit(lambda ids: text.apply({"params": text_p}, ids))(jnp.asarray(tok(CAPTIONS)))
    hidden, pooled = np.asarray(hidden), np.asarray(pooled)
    pooled = pooled / np.linalg.norm(pooled, axis=-1, keepdims=True)
    spec = db_lib.DatabaseSpec((S, S, 4), tuple(hidden.shape[1:]), int(pooled.shape[-1]))
    path = run["root"] / "db"
    with db_lib.DatabaseWriter(str(path), spec, fsync=False) as w:
        w.append(CAPTIONS, randn(30, len(CAPTIONS), S, S, 4), hidden, pooled,
                 np.arange(100, 100 + len(CAPTIONS)))
    db = db_lib.Database(str(path))
    index_lib.Index.build(db.pooled, {"kind": "exact"}, ids=db.ids).save(str(run["root"] / "index"))
    return dict(db=str(path), index=str(run["root"] / "index"), hidden=hidden, pooled=pooled)


def test_e_trained_run_reruns_in_pytorch_like_jax(run, retrieval_db, synth):
    out, params = run["out"], run["state"]["params"]
    pipe = rt.ImageRAGTurboPipeline.from_pretrained(str(out), database=retrieval_db["db"],
                                                    index=retrieval_db["index"])
    assert pipe.k == 2 and pipe.timestep == 999
    rows = [0, 4]
    prompts = [CAPTIONS[i] for i in rows]
    noise = randn(40, len(prompts), S, S, 4)
    res = pipe(prompts, noise=torch.from_numpy(np.ascontiguousarray(nchw(noise))))

    # JAX from the run's own state (not the export): text embeddings, search, one step, VAE.
    hidden, pooled = retrieval_db["hidden"][rows], retrieval_db["pooled"][rows]
    ids, _ = index_lib.Index.load(retrieval_db["index"]).search(pooled, K)
    np.testing.assert_array_equal(res.retrieved_ids, ids)
    db = db_lib.Database(retrieval_db["db"])
    got = {k: np.asarray(v, np.float32) for k, v in db.gather(db.rows_for_ids(ids)).items()}
    _, base = towers.random_tower("unet", "tiny", 0)
    merged = lora.merge(base, params["lora"], 4.0, 4)
    lam = np.asarray(adapter_lib.retrieval_lambda(jnp.asarray(pooled), jnp.asarray(got["pooled"])))
    check("e_lambda", res.lam.numpy(), lam)
    x0, _ = _jax_x0(synth, merged, params["adapter"], lam, noise, hidden, got["latents"],
                    got["prompt_embeds"])
    check("e_x0", res.latents.numpy(), nchw(x0))
    x0_plain, _ = _jax_x0(synth, merged, params["adapter"], np.zeros_like(lam), noise, hidden,
                          got["latents"], got["prompt_embeds"])
    MEASURED["e_adapter_effect"] = float(np.abs(x0 - x0_plain).max())
    assert MEASURED["e_adapter_effect"] > 0, "the trained adapter changes nothing"
    vae, vae_p = towers.random_tower("vae", "tiny", 0)
    decode = jax.jit(lambda z: jnp.clip(vae.apply({"params": vae_p}, z / vae.scaling_factor,
                                                  method=vae.decode), -1, 1))
    check("e_images", res.images.numpy(), nchw(decode(jnp.asarray(x0))))
    factor = 2 ** (len(vae.block_out_channels) - 1)
    assert rt.to_uint8(res.images).shape == (2, factor * S, factor * S, 3)
    # diffusers reads the export as a StableDiffusionPipeline (adapter/ and lora/ are ignored).
    sd = diffusers.StableDiffusionPipeline.from_pretrained(str(out), safety_checker=None)
    assert isinstance(sd.unet, diffusers.UNet2DConditionModel)
    # The torch text encoder gives the DB's embeddings (the search above used them).
    embeds, pooled_t = pipe.encode_prompt(prompts)
    check("e_text_embeds", embeds.numpy(), hidden)
    check("e_text_pooled", pooled_t.numpy(), pooled)


def test_e_trained_lora_with_diffusers_load_lora_weights(run):
    pytest.importorskip("peft")
    out = run["out"]
    sd = diffusers.StableDiffusionPipeline.from_pretrained(str(out), safety_checker=None)
    merged = sd.unet
    sd.unet = diffusers.UNet2DConditionModel.from_pretrained(str(out / "lora" / "base_unet")).eval()
    sd.load_lora_weights(str(out / "lora"))
    x, t, ctx = randn(50, 1, S, S, 4), np.array([999]), randn(51, 1, L, 32)
    check("e_lora_load_lora_weights", torch_out(sd.unet, x, t, ctx), torch_out(merged, x, t, ctx))


def test_f_bad_workdir_and_out_dir_fail_clearly_and_keep_everything(run, tmp_path, capfd):
    with pytest.raises(to_diffusers.ExportError, match="does not exist"):
        to_diffusers.export_run(str(tmp_path / "nope"), str(tmp_path / "o1"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(to_diffusers.ExportError, match="no checkpoints/ folder"):
        to_diffusers.export_run(str(tmp_path / "empty"), str(tmp_path / "o2"))
    (tmp_path / "empty" / "checkpoints").mkdir()
    with pytest.raises(to_diffusers.ExportError, match="no complete checkpoint"):
        to_diffusers.export_run(str(tmp_path / "empty"), str(tmp_path / "o3"))
    with pytest.raises(to_diffusers.ExportError, match=r"no checkpoint at step 3; available: \[4\]"):
        to_diffusers.export_run(str(run["workdir"]), str(tmp_path / "o4"), step=3)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty"], "a failed export left files"
    assert sorted(p.name for p in (tmp_path / "empty").iterdir()) == ["checkpoints"]

    # A non-empty output folder: refused (CLI: one line, exit 2), untouched; replaced with overwrite.
    target = tmp_path / "taken"
    target.mkdir()
    (target / "keep.txt").write_text("mine")
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "TF_CPP_MIN_LOG_LEVEL": "2"}
    cmd = [sys.executable, "-m", "imagerag_jax.main", "export", "--workdir", str(run["workdir"]),
           "--out_dir", str(target)]
    res = subprocess.run(cmd, cwd=str(ROOT), env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 2, res.stderr[-2000:]
    assert "Traceback" not in res.stderr
    errors = [line for line in res.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "not empty" in errors[0] and "--overwrite" in errors[0], res.stderr
    assert sorted(p.name for p in target.iterdir()) == ["keep.txt"]
    assert (target / "keep.txt").read_text() == "mine"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty", "taken"]
    # The same command line again in this process (main.run_cli: no interpreter start-up).
    from tests.helpers import cli_in_process  # pylint: disable=g-import-not-at-top
    res = cli_in_process(capfd, *cmd[3:], "--overwrite", cwd=str(ROOT))
    assert res.returncode == 0, res.stderr[-2000:]
    assert not (target / "keep.txt").exists() and (target / "unet" / "config.json").exists()
    assert json.loads((target / to_diffusers.MANIFEST).read_text())["step"] == 4
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty", "taken"], "temporary folders left"


def test_a_run_saved_before_random_seed_still_loads(run, tmp_path):
    """Runs saved before `random_seed` existed seeded their random towers with `seed`."""
    import shutil

    from imagerag_jax.training import checkpoints

    assert checkpoints.current_config({"seed": 3})["random_seed"] == 3
    assert checkpoints.current_config({"seed": 3, "random_seed": 0})["random_seed"] == 0
    old = tmp_path / "old"
    shutil.copytree(run["workdir"], old)
    saved = [p for p in old.rglob("*") if p.is_file() and '"random_seed"' in p.read_text(errors="ignore")]
    assert saved, "no saved config holds random_seed"
    for path in saved:  # the run as an earlier version wrote it
        config = json.loads(path.read_text())
        del config["random_seed"]
        path.write_text(json.dumps(config))
    loaded = to_diffusers.load_run(str(old))  # rebuilds the towers and checks their fingerprints
    assert loaded.config.random_seed == loaded.config.seed
