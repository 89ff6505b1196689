"""Analytic FLOP counts (models/flops.py): hand-computed cases, the op lists against the real param
trees, and the SD 2.1 UNet forward and train step against XLA's CPU cost analysis (within 5%)."""

from __future__ import annotations

import types

import jax
import jax.numpy as jnp
import pytest
from flax import traverse_util

from imagerag_jax.models import flops
from imagerag_jax.models.unet import UNet

S = jax.ShapeDtypeStruct


def _xla_flops(lowered_or_compiled) -> float:
    cost = lowered_or_compiled.cost_analysis()
    return float((cost[0] if isinstance(cost, (list, tuple)) else cost)["flops"])


def _kernels(params) -> dict[str, tuple[int, ...]]:
    """'a/b' -> kernel shape for every '.../kernel' leaf of a param tree."""
    flat = traverse_util.flatten_dict(params)
    return {"/".join(k[:-1]): tuple(v.shape) for k, v in flat.items() if k[-1] == "kernel"}


def _weight_ops(tally: flops.Tally) -> dict[str, tuple[int, ...]]:
    return {op.path: op.kernel for op in tally.ops if op.kind in ("conv", "dense")}


# ---------------------------------------------------------------------------------- by hand


def test_single_conv_dense_and_attention_by_hand():
    g = flops.Tally()
    # 3x3 'same' conv, 2 examples of 16x16x8 -> 16 channels: 2 * 2*16*16 * 9*8*16 multiply-adds.
    assert g.conv("c", 2, (16, 16), 3, 8, 16) == (16, 16)
    assert g.ops[-1].forward == 2 * 2 * 16 * 16 * 9 * 8 * 16 == 1_179_648
    # Stride 2, VAE padding (0, 1): 16 -> 8.
    assert g.conv("d", 1, (16, 16), 3, 8, 8, stride=2, padding=((0, 1), (0, 1))) == (8, 8)
    assert g.ops[-1].forward == 2 * 8 * 8 * 9 * 8 * 8
    g.dense("fc", 4 * 10, 32, 64)  # 4 examples x 10 tokens
    assert g.ops[-1].forward == 2 * 40 * 32 * 64 == 163_840
    g.attention("attn", 2, 3, 100, 77, 16, q=False, k=False, v=False)
    assert [op.forward for op in g.ops[-2:]] == [2 * 2 * 3 * 100 * 77 * 16] * 2 == [1_478_400] * 2
    assert g.backward == 0  # nothing differentiated


def test_backward_conventions_by_hand():
    # A frozen chain the gradient flows through: input gradients only (1x).
    g = flops.Tally(input_grad=True)
    g.dense("a", 10, 4, 4)
    assert g.ops[-1].backward == g.ops[-1].forward
    # A trained layer on a constant input: weight gradient only (1x); downstream of it, 2x.
    g = flops.Tally(trained=lambda p: True)
    g.dense("a", 10, 4, 4)
    g.dense("b", 10, 4, 4)
    assert [op.backward for op in g.ops] == [320, 640]
    # Cross-attention to a constant context in a varying chain: QK^T and PV cost 1x each.
    g = flops.Tally(input_grad=True)
    g.attention("x", 1, 2, 8, 5, 4, q=True, k=False, v=False)
    assert [op.backward for op in g.ops] == [op.forward for op in g.ops]
    g = flops.Tally(input_grad=True)
    g.attention("s", 1, 2, 8, 8, 4, q=True, k=True, v=True)  # self-attention: 2x
    assert [op.backward for op in g.ops] == [2 * op.forward for op in g.ops]


def test_hand_cases_equal_xla_where_the_conventions_agree():
    """No padding, no elementwise work: XLA's count is exactly ours."""
    x, w = S((2, 16, 16, 8), jnp.float32), S((3, 3, 8, 16), jnp.float32)
    conv = lambda x, w: jax.lax.conv_general_dilated(x, w, (1, 1), "VALID",
                                                     dimension_numbers=("NHWC", "HWIO", "NHWC"))
    g = flops.Tally()
    g.conv("c", 2, (16, 16), 3, 8, 16, padding=((0, 0), (0, 0)))
    assert _xla_flops(jax.jit(conv).lower(x, w).compile()) == g.forward
    g = flops.Tally()
    g.dense("fc", 40, 32, 64)
    assert _xla_flops(jax.jit(jnp.dot).lower(S((40, 32), jnp.float32), S((32, 64), jnp.float32))) == g.forward
    # Attention's two products; XLA also counts the softmax (a few FLOPs per score).
    q = S((2, 3, 100, 16), jnp.float32)
    k = S((2, 3, 77, 16), jnp.float32)
    products = lambda q, k, v: (q @ jnp.swapaxes(k, -1, -2)) @ v
    g = flops.Tally()
    g.attention("a", 2, 3, 100, 77, 16, q=False, k=False, v=False)
    assert _xla_flops(jax.jit(products).lower(q, k, k)) == g.forward


# ---------------------------------------------------------------------------------- structure


def test_unet_ops_are_the_param_tree():
    """Every kernel of the SD 2.1 UNet is counted once, with its shape (and nothing else is)."""
    from imagerag_jax.weights.from_torch import unet_dummy_inputs

    unet = UNet()
    params = jax.eval_shape(lambda: unet.init(jax.random.PRNGKey(0), *unet_dummy_inputs(unet)))["params"]
    ops = _weight_ops(flops.unet_forward(unet, 1, (64, 64)))
    assert ops == _kernels(params)
    enc, dec = flops.unet_encoder(unet, 1, (64, 64)), flops.unet_decoder(unet, 1, (64, 64))
    assert enc.forward + dec.forward == flops.unet_forward(unet, 1, (64, 64)).forward
    assert flops.unet_hspace_hw(unet, (64, 64)) == (8, 8)
    stages = jax.eval_shape(lambda p, x, c: unet.apply({"params": p}, x, jnp.zeros((1,), jnp.int32), c,
                                                       method=unet.encoder_stages),
                            params, S((1, 64, 64, 4), jnp.float32), S((1, 77, 1024), jnp.float32))
    assert [tuple(s.shape[1:]) for s in stages] == flops.unet_encoder_stage_shapes(unet, (64, 64))


def test_vae_text_adapter_heads_lpips_ops_are_their_param_trees():
    from imagerag_jax.models.adapter import HSpaceAdapter
    from imagerag_jax.models.clip_text import CLIPTextTransformer
    from imagerag_jax.models.discriminator import DiscriminatorHeads
    from imagerag_jax.models.latent_lpips import LatentLPIPS
    from imagerag_jax.models.vae import AutoencoderKL

    vae = AutoencoderKL()
    params = jax.eval_shape(lambda: vae.init(jax.random.PRNGKey(0), *vae.dummy_inputs()))["params"]
    ops = {**_weight_ops(flops.vae_encoder(vae, 1, (512, 512))), **_weight_ops(flops.vae_decoder(vae, 1, (64, 64)))}
    assert ops == _kernels(params)

    text = CLIPTextTransformer(num_hidden_layers=2)
    params = jax.eval_shape(lambda: text.init(jax.random.PRNGKey(0), *text.dummy_inputs()))["params"]
    assert _weight_ops(flops.clip_text(text, 1, 77)) == _kernels(params)

    adapter = HSpaceAdapter(num_heads=8)
    h = S((1, 8, 8, 1280), jnp.float32)
    params = jax.eval_shape(adapter.init, jax.random.PRNGKey(0), h, S((1, 4, 8, 8, 1280), jnp.float32))["params"]
    assert _weight_ops(flops.adapter(adapter, 1, (8, 8, 1280), 4)) == _kernels(params)
    paper = HSpaceAdapter(num_heads=20, block="transformer")  # the paper's: SD's transformer block
    params = jax.eval_shape(paper.init, jax.random.PRNGKey(0), h, S((1, 4, 8, 8, 1280), jnp.float32))["params"]
    assert _weight_ops(flops.adapter(paper, 1, (8, 8, 1280), 4)) == _kernels(params)

    heads = DiscriminatorHeads()
    stages = [(32, 32, 320), (16, 16, 640), (8, 8, 1280), (8, 8, 1280), (8, 8, 1280)]
    variables = jax.eval_shape(heads.init, jax.random.PRNGKey(0), [S((1, *s), jnp.float32) for s in stages],
                               jnp.zeros((1,), jnp.int32), S((1, 1024), jnp.float32))
    assert _weight_ops(flops.discriminator_heads(heads, 1, stages, 1024)) == _kernels(variables["params"])

    lp = LatentLPIPS()
    x = S((1, 64, 64, 4), jnp.float32)
    variables = jax.eval_shape(lp.init, jax.random.PRNGKey(0), x, x)
    convs = {p: k for p, k in _weight_ops(flops.latent_lpips(lp, 1, (64, 64, 4))).items()
             if p.startswith("features")}
    assert convs == _kernels(variables["params"])


def test_train_step_phases_and_remat_policies():
    from imagerag_jax.models.adapter import HSpaceAdapter
    from imagerag_jax.models.discriminator import DiscriminatorHeads

    unet = UNet()
    kw = dict(latent_shape=(64, 64, 4), context_len=77, pooled_dim=1024, k=4, batch=8)
    by = {r: flops.train_step_flops(unet, unet, HSpaceAdapter(), DiscriminatorHeads(), remat=r, **kw)
          for r in ("none", "dots", "dots_no_batch", "full")}
    enc = flops.unet_encoder(unet, 1, (64, 64)).forward
    step = by["none"]
    assert step.phases["retrieved_branch"] == 4 * step.phases["student_encoder"] == 4 * 8 * enc
    assert step.phases["teacher_encoder_real_forward"] == 8 * enc
    # The frozen decoder kernels carry input gradients, the LoRA'd ones weight gradients too.
    assert step.phases["decoder_forward"] < step.phases["decoder_backward"] < 2 * step.phases["decoder_forward"]
    recompute = [by[r].phases["remat_recompute"] for r in ("none", "dots", "dots_no_batch", "full")]
    assert recompute[0] == 0 and recompute == sorted(recompute) and len(set(recompute)) == 4
    # full recomputes the forward of its segments: LoRA merge, adapter, decoder, teacher (fake).
    p = by["full"].phases
    assert recompute[-1] == sum(p[n] for n in ("lora_merge", "adapter_forward", "decoder_forward",
                                               "teacher_encoder_fake_forward"))
    assert by["full"].per_example == by["full"].total / 8
    assert "total" in by["full"].table()
    # The 'no_adapter' arm (adapter None): neither the retrieved branch nor the adapter, the rest alike.
    alone = flops.train_step_flops(unet, unet, None, DiscriminatorHeads(), remat="none", **kw).phases
    gone = ("retrieved_branch", "adapter_forward", "adapter_backward")
    assert all(alone[n] == 0 for n in gone) and all(step.phases[n] > 0 for n in gone)
    assert {n: v for n, v in alone.items() if n not in gone} == \
        {n: v for n, v in step.phases.items() if n not in gone}


def test_peaks_and_mfu():
    assert flops.peak_tflops("NVIDIA H100 80GB HBM3") == 989
    assert flops.peak_tflops("NVIDIA H100 PCIe") == 756
    assert flops.peak_tflops("NVIDIA H100 NVL") is None
    assert flops.peak_tflops("NVIDIA H200") == 989
    assert flops.peak_tflops("NVIDIA A100-SXM4-80GB") == 312
    assert [flops.peak_tflops(k) for k in ("TPU v4", "TPU v5 lite", "TPU v5e", "TPU v5", "TPU v5p",
                                           "TPU v6 lite", "TPU v6e")] == [275, 197, 197, 459, 459, 918, 918]
    assert flops.peak_tflops("cpu") is None
    assert flops.peak_tflops() is None  # the test machine's CPU
    assert flops.mfu(2e12, 100.0, 500.0) == pytest.approx(0.4)
    with pytest.raises(ValueError):
        flops.mfu(1.0, 1.0, 0.0)


# ---------------------------------------------------------------------------------- against XLA


def test_sd21_unet_forward_matches_xla_cost_analysis():
    """Within 5% of the compiled program's count; the lowered (unoptimised) count agrees with it."""
    from imagerag_jax.weights.from_torch import unet_dummy_inputs

    # einsum attention: the CPU default ('chunked') runs in a lax.map, whose body XLA counts once.
    unet = UNet(attention_impl="einsum")
    params = jax.eval_shape(lambda: unet.init(jax.random.PRNGKey(0), *unet_dummy_inputs(unet)))["params"]
    args = (params, S((1, 64, 64, 4), jnp.float32), S((1,), jnp.int32), S((1, 77, 1024), jnp.float32))
    lowered = jax.jit(lambda p, x, t, c: unet.apply({"params": p}, x, t, c)).lower(*args)
    compiled, unoptimised = _xla_flops(lowered.compile()), _xla_flops(lowered)
    ours = flops.unet_forward(unet, 1, (64, 64)).forward
    assert ours / compiled == pytest.approx(1.0, abs=0.05)
    assert unoptimised / compiled == pytest.approx(1.0, abs=0.02)


def test_sd21_train_step_matches_xla_cost_analysis():
    """The SD 2.1-shaped train step (configs/imageragturbo_sd21.py: bf16, remat full, k = 4, LoRA
    rank 64 on the decoder; no latent LPIPS, as the trainer runs without its weights) against the
    lowered program's count (compiling it on CPU takes minutes; the UNet test above shows the
    lowered count agrees with the compiled one)."""
    from imagerag_jax import sharding
    from imagerag_jax.benchmark.train import load_config
    from imagerag_jax.diffusion import sampling
    from imagerag_jax.diffusion import schedule as schedule_lib
    from imagerag_jax.models import adapter as adapter_lib
    from imagerag_jax.models import discriminator as disc_lib
    from imagerag_jax.models import lora
    from imagerag_jax.training import step as step_lib
    from imagerag_jax.weights.from_torch import unet_dummy_inputs

    config = load_config("sd21")
    dt = jnp.bfloat16
    unet = UNet(attention_impl="einsum", dtype=dt)
    frozen_p = jax.tree.map(lambda x: S(x.shape, dt), jax.eval_shape(
        lambda: unet.init(jax.random.PRNGKey(0), *unet_dummy_inputs(unet)))["params"])
    syn = config.synthetic
    lat, emb, pooled_dim, k = tuple(syn.latent_shape), tuple(syn.embed_shape), int(syn.pooled_dim), int(syn.k)
    setup = step_lib.StepSetup(
        student=unet, teacher=unet, adapter=adapter_lib.from_config(config.adapter, dtype=dt),
        heads=disc_lib.DiscriminatorHeads(**dict(config.disc), dtype=dt), lpips=None,
        prediction_type="epsilon", student_timesteps=(999,), lora_alpha=float(config.lora.alpha),
        lora_rank=int(config.lora.rank), alpha=float(config.alpha), beta=0.0)
    gen_tx, disc_tx = step_lib.make_optimizer(config.optimizer), step_lib.make_optimizer(config.disc_optimizer)
    pattern = config.lora.pattern or lora.DEFAULT_DECODER_PATTERN

    def init(student_p):  # the train state's shapes (Trainer._init_fn, without a Trainer's towers)
        z, ctx, t = jnp.zeros((1, *lat)), jnp.zeros((1, *emb)), jnp.zeros((1,), jnp.int32)
        h = jnp.zeros(jax.eval_shape(lambda: sampling.unet_encode(unet, student_p, z, t, ctx)[0]).shape)
        heads = disc_lib.init_heads(setup.heads, jax.random.PRNGKey(3), unet, student_p, z, ctx,
                                    jnp.zeros((1, pooled_dim)))
        h_retr = jnp.zeros((1, k, *h.shape[1:]))
        params = {"adapter": setup.adapter.init(jax.random.PRNGKey(1), h, h_retr)["params"],
                  "lora": lora.init_lora(jax.random.PRNGKey(2), student_p, pattern, setup.lora_rank),
                  "disc": heads["params"], "disc_stats": heads["batch_stats"]}
        return {"params": params, "gen_opt_state": gen_tx.init(step_lib.generator_params(params)),
                "disc_opt_state": disc_tx.init(params["disc"]), "step": jnp.zeros((), jnp.int32),
                "rng": jax.random.PRNGKey(4)}

    batch_size = 2
    state = jax.eval_shape(init, frozen_p)
    mesh = sharding.make_mesh((("data", -1), ("fsdp", 1)))
    rules = tuple(tuple(r) for r in config.logical_rules)
    fn = step_lib.make_train_step(setup, schedule_lib.scaled_linear_schedule(), mesh, rules, gen_tx, disc_tx,
                                  remat=config.remat)
    shapes = {"latent": lat, "noise": lat, "prompt_embeds": emb, "pooled": (pooled_dim,),
              "retrieved_latents": (k, *lat), "retrieved_prompt_embeds": (k, *emb),
              "retrieved_pooled": (k, pooled_dim)}
    batch = {f: S((batch_size, *s), jnp.float32) for f, s in shapes.items()}
    xla = _xla_flops(jax.jit(fn).lower(state, {"student": frozen_p, "teacher": frozen_p}, batch))

    schema = types.SimpleNamespace(latent_shape=lat, embed_shape=emb, pooled_dim=pooled_dim, k=k)
    ours = flops.train_step_flops_from_setup(setup, schema, batch=batch_size, lora_pattern=config.lora.pattern,
                                             remat=config.remat, backend="cpu")
    assert ours.total / xla == pytest.approx(1.0, abs=0.05), ours.table()
