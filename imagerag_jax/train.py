"""ImageRAGTurbo training: latent adversarial distillation with retrieval (paper Sec. 3.3-3.4).

    from imagerag_jax import train
    from configs import tiny
    state = train.train_and_evaluate(tiny.get_config(), "/tmp/workdir")   # also from a Colab

Frozen: the SD-Turbo student UNet, the SD 2.1 teacher UNet's encoder (the discriminator backbone),
the VAE (sample grids only) and latent LPIPS. Trainable: the H-space adapter and the student
decoder's LoRA (the generator, one AdamW) and the discriminator heads (another AdamW).

One jitted step (in/out shardings over the ('data', 'fsdp') mesh, train state donated):

  x_t = noise (the example's teacher noise when it has one)      [t = 999; n-step: t ~ T_n]
  h, skips, temb = student.encode(x_t, t, text)                   frozen, no backward
  h_retr = student.encode(z0_retr, 0, text_retr)                  frozen, t = 0, k neighbours
  lam = mean_j cos(pooled, pooled_retr_j)                         Eq. 5's lambda
  z_hat = x0(student.decode(h + lam * adapter(h, h_retr), ...; W + LoRA))
  s ~ U{0..999}, eps ~ N(0, I): z_s = add_noise(z0, eps, s), z_hat_s = add_noise(z_hat, eps, s)
  G: hinge_g(D(z_hat_s)) + alpha * smoothL1(z_hat, z0) + beta * latentLPIPS(z_hat, z0)
  D: hinge_d(D(z_s), D(stop_grad(z_hat_s))), spectral-norm stats updated
  both optimisers step; a non-finite loss or gradient keeps the old state and is reported.

`train_and_evaluate` adds the loop: input pipeline, orbax checkpoints (resume, SIGTERM), clu
metrics (losses, D accuracy, lambda, grad norms, step time, examples/s, TFLOP/s per device) and
PNG sample grids with and without retrieval.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import signal
import threading
import time
from collections.abc import Mapping, Sequence
from typing import Any, Callable

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from imagerag_jax import checkpoints, images, lora, losses, sampling, sharding
from imagerag_jax import schedule as schedule_lib
from imagerag_jax.models import adapter as adapter_lib
from imagerag_jax.models import discriminator as disc_lib
from imagerag_jax.models.latent_lpips import latent_lpips_or_none
from imagerag_jax.models.unet import UNet

PyTree = Any
State = dict[str, Any]
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}
REMAT_POLICIES: dict[str, Callable[..., Any] | None] = {
    "none": None,
    # Each remat segment (student decoder + adapter, the teacher encoder under the generator's
    # D term, latent LPIPS) keeps only its inputs; its forward is recomputed in the backward pass.
    "full": jax.checkpoint_policies.nothing_saveable,
    "dots": jax.checkpoint_policies.dots_saveable,
    "dots_no_batch": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}
# What the step reads from a batch (ids and scores are not used by the objective).
BATCH_FIELDS = ("latent", "noise", "prompt_embeds", "pooled", "retrieved_latents",
                "retrieved_prompt_embeds", "retrieved_pooled")
TEACHER_DECODER_KEYS = ("conv_norm_out", "conv_out")
# Config fields the jitted functions do not depend on (the loop's); see Trainer._jit_key.
LOOP_FIELDS = ("total_steps", "log_every", "checkpoint_every", "keep_checkpoints",
               "async_checkpoints", "sample_every", "num_samples", "debug_nan_step", "data_dir",
               "split", "shuffle_buffer", "synthetic", "global_batch_size")
# Jitted init/step functions per (config, mesh, shapes): a second Trainer with the same settings
# (a resumed run, a notebook re-run) reuses them instead of tracing the UNets again.
_JIT_CACHE: dict[tuple, Any] = {}


# ---------------------------------------------------------------------------------------------
# Frozen towers.
# ---------------------------------------------------------------------------------------------


_TINY_CACHE: dict[int, dict[str, tuple[Any, PyTree]]] = {}


def _random_tower(name: str, preset: str, seed: int) -> tuple[Any, PyTree]:
    """(module, random params) of a preset: 'tiny' (random_pipeline) or 'sd21' (SD 2.x sizes)."""
    from imagerag_jax.weights import random_pipeline

    if preset == "tiny":
        # Kept per process (a few MB): building them traces every tower, seconds per run.
        if seed not in _TINY_CACHE:
            _TINY_CACHE[seed] = random_pipeline.random_modules("tiny", seed)
        return _TINY_CACHE[seed][name]
    if preset == "none":
        raise ValueError(f"no weights path for the {name} and random_preset='none': set the config's "
                         f"weight paths (or random_preset='sd21'/'tiny' for random towers)")
    if preset != "sd21":
        raise ValueError(f"unknown random_preset {preset!r}; expected 'tiny', 'sd21' or 'none'")
    from imagerag_jax.models.vae import AutoencoderKL
    from imagerag_jax.weights import convert
    from imagerag_jax.weights.from_torch import unet_dummy_inputs

    if name == "unet":
        module = UNet()  # the defaults are SD 2.1-base / SD-Turbo
        inputs = unet_dummy_inputs(module)
    else:
        module = AutoencoderKL()
        inputs = module.dummy_inputs()
    shapes = convert.param_shapes(lambda: module.init(jax.random.PRNGKey(0), *inputs))
    return module, random_pipeline.random_params(shapes, seed)


def load_tower(name: str, path: str | None, *, preset: str, seed: int, compute_dtype: Any,
               param_dtype: Any, prediction_type: str = "epsilon") -> tuple[Any, PyTree, dict[str, Any]]:
    """(module, params, reference) from a weights path, or random modules of `preset` when None."""
    from imagerag_jax import weights

    if path is not None:
        if name == "unet":
            module, params = weights.load_unet(path, dtype=compute_dtype, param_dtype=param_dtype)
        else:
            module, params = weights.load_vae(path, dtype=compute_dtype, param_dtype=param_dtype)
        ref = {"path": os.path.abspath(path) if "://" not in path else path}
    else:
        module, params = _random_tower(name, preset, seed)
        changes = {"dtype": compute_dtype}
        if name == "unet":
            changes["prediction_type"] = prediction_type
        module = module.clone(**changes)
        params = jax.tree.map(lambda x: jnp.asarray(x, param_dtype), params)
        ref = {"path": None, "random_preset": preset, "seed": seed}
    return module, params, ref


def encoder_params(unet_params: Mapping[str, Any]) -> dict[str, Any]:
    """A UNet's params without the decoder (up blocks, output head): all the teacher needs."""
    return {k: v for k, v in unet_params.items()
            if not k.startswith("up_blocks") and k not in TEACHER_DECODER_KEYS}


@jax.jit
def _leaf_sums(leaves: list[jax.Array]) -> list[jax.Array]:
    """[sum x, sum x^2] per leaf, in float32 (module level: traced once per tree structure)."""
    return [jnp.stack([jnp.sum(x.astype(jnp.float32)), jnp.sum(jnp.square(x.astype(jnp.float32)))])
            for x in leaves]


def fingerprint(params: PyTree) -> str:
    """Content hash of a param tree from its paths, shapes and per-leaf sums (cheap, on device)."""
    leaves = jax.tree_util.tree_leaves_with_path(params)
    sums = _leaf_sums([x for _, x in leaves])
    h = hashlib.sha256()
    for (path, x), s in zip(leaves, sums):
        s = _host(s)
        h.update(f"{sharding.path_str(path)}:{tuple(x.shape)}:{x.dtype}:{s[0]:.6e}:{s[1]:.6e};".encode())
    return h.hexdigest()[:16]


# ---------------------------------------------------------------------------------------------
# Optimisers and data.
# ---------------------------------------------------------------------------------------------


def make_optimizer(cfg: Mapping[str, Any]) -> optax.GradientTransformation:
    """AdamW with a constant learning rate (paper: 1e-5), optional global-norm clipping.

    The learning rate lives in the optimiser state (inject_hyperparams): the compiled step does
    not depend on it, and a resumed run takes the config's value (`with_learning_rates`).
    """
    clip = float(cfg.get("grad_clip_norm", 0.0) or 0.0)

    def adamw(learning_rate):
        tx = optax.adamw(learning_rate, b1=cfg["b1"], b2=cfg["b2"], eps=cfg["eps"],
                         weight_decay=cfg["weight_decay"])
        return optax.chain(optax.clip_by_global_norm(clip), tx) if clip > 0 else tx

    return optax.inject_hyperparams(adamw)(learning_rate=float(cfg["lr"]))


def with_learning_rates(state: State, config: ml_collections.ConfigDict) -> State:
    """The state with both optimisers' learning rates set to the config's (after a restore)."""

    def set_lr(opt_state, lr: float):
        old = opt_state.hyperparams["learning_rate"]
        new = sharding.put(np.asarray(lr, old.dtype), old.sharding)
        return opt_state._replace(hyperparams={**opt_state.hyperparams, "learning_rate": new})

    return {**state, "gen_opt_state": set_lr(state["gen_opt_state"], config.optimizer.lr),
            "disc_opt_state": set_lr(state["disc_opt_state"], config.disc_optimizer.lr)}


def synthetic_schema(config: ml_collections.ConfigDict):
    """The tfrecords.Schema of the synthetic set (config.synthetic)."""
    from imagerag_jax.data import tfrecords

    s = config.synthetic
    return tfrecords.Schema(tuple(s.latent_shape), tuple(s.embed_shape), int(s.pooled_dim), int(s.k),
                            bool(s.has_noise))


def write_synthetic_data(out_dir: str, config: ml_collections.ConfigDict) -> str:
    """Random TFRecords at the config's synthetic shapes (once: an existing set is reused)."""
    from imagerag_jax.data import tfrecords

    if os.path.exists(os.path.join(out_dir, tfrecords.MANIFEST)):
        return out_dir
    if jax.process_index() == 0:
        schema = synthetic_schema(config)
        rng = np.random.default_rng(config.seed)
        n = int(config.synthetic.num_examples)
        examples = (tfrecords.random_example(schema, rng, i) for i in range(n))
        tfrecords.write_examples(out_dir, config.split, examples, schema,
                                 num_shards=max(int(config.synthetic.num_shards), jax.process_count()),
                                 source={"synthetic": True, "seed": config.seed})
        logging.info("wrote %d synthetic examples to %s", n, out_dir)
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices("imagerag_synthetic_data")
    return out_dir


def batch_fields(schema) -> tuple[str, ...]:
    """The batch keys the step reads, given a data schema (noise only when stored)."""
    present = set(schema.fields)
    return tuple(f for f in BATCH_FIELDS if f in present)


def abstract_batch(schema, global_batch: int, shardings: Mapping[str, Any]) -> dict[str, jax.ShapeDtypeStruct]:
    """ShapeDtypeStructs of a global float32 batch (for ahead-of-time compilation)."""
    shapes = schema.shapes()
    return {f: jax.ShapeDtypeStruct((global_batch, *shapes[f]), jnp.float32, sharding=shardings[f])
            for f in batch_fields(schema)}


def random_batch(schema, global_batch: int, seed: int = 0) -> dict[str, np.ndarray]:
    """A host batch of standard-normal float32 fields (tests, benchmarks; no TensorFlow needed)."""
    rng = np.random.default_rng(seed)
    shapes = schema.shapes()
    return {f: rng.standard_normal((global_batch, *shapes[f]), np.float32) for f in batch_fields(schema)}


# ---------------------------------------------------------------------------------------------
# The trainer: modules, frozen weights on the mesh, shardings and jitted functions (no loop).
# ---------------------------------------------------------------------------------------------


@dataclasses.dataclass
class StepSetup:
    """Static pieces of the step (hashable modules and Python numbers)."""

    student: UNet
    teacher: UNet
    adapter: adapter_lib.HSpaceAdapter
    heads: disc_lib.DiscriminatorHeads
    lpips: Any
    prediction_type: str
    student_timesteps: tuple[int, ...]
    lora_alpha: float
    lora_rank: int
    alpha: float
    beta: float


class Trainer:
    """Everything `train_and_evaluate` needs except the loop; importable for Colab and tests.

        trainer = Trainer(config)                       # loads/places the frozen towers
        state = trainer.init_state(schema)              # sharded init (eval_shape + out_shardings)
        step, flops = trainer.compile_step(trainer.abstract_state(schema), schema, batch_size)
        state, metrics = step(state, trainer.frozen, trainer.shard_batch(host_batch))
        images = trainer.sample_fn()(state, trainer.frozen, trainer.vae_params, batch)

    `schema` is a `data.tfrecords.Schema` (or any object with its shape fields and `shapes()`).
    Attributes: `frozen` (student, teacher encoder, [lpips]) and `vae_params` placed on the mesh
    with `frozen_shardings` / `vae_shardings`; `setup` (modules and static numbers of the step).
    """

    def __init__(self, config: ml_collections.ConfigDict, mesh: jax.sharding.Mesh | None = None):
        self.config = config
        self.mesh = mesh if mesh is not None else sharding.make_mesh(config.mesh)
        self.rules = tuple(tuple(r) for r in config.logical_rules)
        self.schedule = schedule_lib.scaled_linear_schedule()
        compute = DTYPES[config.compute_dtype]
        param_dtype = DTYPES[config.frozen_param_dtype]
        common = dict(preset=config.random_preset, compute_dtype=compute, param_dtype=param_dtype,
                      prediction_type=config.random_prediction_type)
        student, student_p, student_ref = load_tower("unet", config.student_weights, seed=config.seed,
                                                     **common)
        teacher, teacher_p, teacher_ref = load_tower("unet", config.teacher_weights,
                                                     seed=config.seed + 1, **common)
        vae_path = config.vae_weights
        if vae_path is None and config.student_weights is not None and \
                os.path.isdir(os.path.join(config.student_weights, "vae")):
            vae_path = config.student_weights  # the SD-Turbo pipeline folder has the VAE
        self.vae, vae_p, vae_ref = load_tower("vae", vae_path, seed=config.seed, **common)
        lp = latent_lpips_or_none(config.latent_lpips_weights, config.beta)
        beta = float(config.beta) if lp is not None else 0.0
        ad = config.adapter
        if config.lambda_mode != "mean":
            raise ValueError(f"lambda_mode {config.lambda_mode!r}: the step needs one lambda per "
                             "example ('mean')")
        if config.remat not in REMAT_POLICIES:
            raise ValueError(f"unknown remat {config.remat!r}; expected one of {sorted(REMAT_POLICIES)}")
        n = int(config.student_steps)
        self.setup = StepSetup(
            student=student,
            teacher=teacher,
            adapter=adapter_lib.HSpaceAdapter(num_heads=ad.num_heads, head_dim=ad.head_dim or None,
                                              attention_impl=ad.attention_impl, dtype=compute),
            heads=disc_lib.DiscriminatorHeads(**dict(config.disc), dtype=compute),
            lpips=lp[0] if lp is not None else None,
            prediction_type=student.prediction_type,
            student_timesteps=tuple(int(t) for t in schedule_lib.student_timesteps(n)),
            lora_alpha=float(config.lora.alpha),
            lora_rank=int(config.lora.rank),
            alpha=float(config.alpha),
            beta=beta,
        )
        self.lora_pattern = config.lora.pattern or lora.DEFAULT_DECODER_PATTERN

        frozen = {"student": student_p, "teacher": encoder_params(teacher_p)}
        if lp is not None:
            frozen["lpips"] = lp[1]
        shard_kw = dict(min_shard_size=int(config.min_shard_size),
                        rules=tuple(tuple(r) for r in config.sharding_rules))
        self.frozen_shardings = sharding.param_shardings(frozen, self.mesh, **shard_kw)
        self.frozen = sharding.put(frozen, self.frozen_shardings)
        self.vae_shardings = sharding.param_shardings(vae_p, self.mesh, **shard_kw)
        self.vae_params = sharding.put(vae_p, self.vae_shardings)
        self._shard_kw = shard_kw
        self.frozen_refs = {"student": student_ref, "teacher": teacher_ref, "vae": vae_ref,
                            "latent_lpips": {"path": config.latent_lpips_weights, "used": lp is not None}}
        self.gen_tx = make_optimizer(config.optimizer)
        self.disc_tx = make_optimizer(config.disc_optimizer)
        self.replicated = sharding.replicated(self.mesh)
        self.batch_sharding = sharding.batch_sharding(self.mesh, self.rules)

    # --- shapes and fingerprints -------------------------------------------------------------

    def check_schema(self, schema) -> None:
        """Fails early when the data do not fit the towers (channels, text width, k)."""
        st = self.setup.student
        if schema.latent_shape[-1] != st.in_channels:
            raise ValueError(f"data latents have {schema.latent_shape[-1]} channels, the student UNet "
                             f"takes {st.in_channels}")
        for name, unet in (("student", st), ("teacher", self.setup.teacher)):
            if schema.embed_shape[-1] != unet.cross_attention_dim:
                raise ValueError(f"data prompt embeds have width {schema.embed_shape[-1]}, the {name} "
                                 f"UNet's cross_attention_dim is {unet.cross_attention_dim}")
        if schema.k < 1:
            raise ValueError("the data have no retrieved neighbours (k=0); ImageRAGTurbo needs k >= 1")
        factor = 2 ** (len(st.block_out_channels) - 1)
        if schema.latent_shape[0] % factor or schema.latent_shape[1] % factor:
            raise ValueError(f"latent size {schema.latent_shape[:2]} is not a multiple of {factor}")

    def frozen_fingerprints(self) -> dict[str, Any]:
        """Paths and content hashes of the frozen towers (stored with every checkpoint)."""
        refs = json.loads(json.dumps(self.frozen_refs))
        refs["student"]["fingerprint"] = fingerprint(self.frozen["student"])
        refs["teacher"]["fingerprint"] = fingerprint(self.frozen["teacher"])
        return refs

    # --- state ---------------------------------------------------------------------------------

    def _init_fn(self, schema) -> Callable[[PyTree, PyTree], State]:
        """init(student_params, teacher_params) -> train state (pure; jitted with out_shardings)."""
        s, seed = self.setup, int(self.config.seed)
        h_, w_, c_ = schema.latent_shape
        ctx_shape = (1, *schema.embed_shape)

        def init(student_p: PyTree, teacher_p: PyTree) -> State:
            root = jax.random.PRNGKey(seed)
            k_ad, k_lora, k_disc = jax.random.split(jax.random.fold_in(root, 0), 3)
            z = jnp.zeros((1, h_, w_, c_), jnp.float32)
            ctx = jnp.zeros(ctx_shape, jnp.float32)
            h_shape = jax.eval_shape(
                lambda: sampling.unet_encode(s.student, student_p, z, jnp.zeros((1,), jnp.int32), ctx)[0])
            h = jnp.zeros(h_shape.shape, jnp.float32)
            h_retr = jnp.zeros((1, schema.k, *h_shape.shape[1:]), jnp.float32)
            adapter_p = s.adapter.init(k_ad, h, h_retr)["params"]
            lora_p = lora.init_lora(k_lora, student_p, self.lora_pattern, s.lora_rank)
            head_vars = disc_lib.init_heads(s.heads, k_disc, s.teacher, teacher_p, z, ctx,
                                            jnp.zeros((1, schema.pooled_dim), jnp.float32))
            params = {"adapter": adapter_p, "lora": lora_p, "disc": head_vars["params"],
                      "disc_stats": head_vars["batch_stats"]}
            return {
                "params": params,
                "gen_opt_state": self.gen_tx.init(_gen_params(params)),
                "disc_opt_state": self.disc_tx.init(params["disc"]),
                "step": jnp.zeros((), jnp.int32),
                "rng": jax.random.fold_in(root, 1),
            }

        return init

    def _jit_key(self, kind: str, schema, with_lr: bool = False, *extra: Any) -> tuple:
        """What a cached jitted function depends on: config (less the loop's fields), mesh, shapes."""
        cfg = json.loads(self.config.to_json_best_effort())
        for name in LOOP_FIELDS:
            cfg.pop(name, None)
        if not with_lr:  # the step reads the learning rates from the optimiser state
            cfg["optimizer"].pop("lr")
            cfg["disc_optimizer"].pop("lr")
        mesh = (tuple(self.mesh.shape.items()), tuple(d.id for d in self.mesh.devices.flat))
        shapes = (repr(sorted(schema.shapes().items())), schema.k, schema.pooled_dim)
        return (kind, json.dumps(cfg, sort_keys=True), mesh, shapes) + extra

    def _jitted_init(self, schema) -> tuple[Any, State]:
        """(jit(init, out_shardings), abstract state with shardings), cached per settings."""
        # Without the learning rates: init_state sets them (they are state, not program).
        key = self._jit_key("init", schema, False)
        if key not in _JIT_CACHE:
            init = self._init_fn(schema)
            abstract = jax.eval_shape(init, self.frozen["student"], self.frozen["teacher"])
            shardings = self.state_shardings(abstract)
            _JIT_CACHE[key] = (jax.jit(init, out_shardings=shardings),
                               sharding.with_shardings(abstract, shardings))
        return _JIT_CACHE[key]

    def abstract_state(self, schema) -> State:
        """ShapeDtypeStructs of the train state, carrying their shardings."""
        return self._jitted_init(schema)[1]

    def state_shardings(self, abstract: State) -> PyTree:
        """Trainable state follows the frozen rule (large leaves over 'fsdp', small replicated)."""
        return sharding.param_shardings(abstract, self.mesh, **self._shard_kw)

    def init_state(self, schema) -> State:
        """The initial train state, created directly in its shardings (never whole on one device)."""
        state = self._jitted_init(schema)[0](self.frozen["student"], self.frozen["teacher"])
        return with_learning_rates(state, self.config)

    # --- the step ------------------------------------------------------------------------------

    def batch_shardings(self, fields: Sequence[str]) -> dict[str, Any]:
        """The batch sharding for each field."""
        return {f: self.batch_sharding for f in fields}

    def shard_batch(self, batch: Mapping[str, np.ndarray]) -> dict[str, jax.Array]:
        """Host arrays (the global batch, same on every process) -> global arrays on the mesh."""
        return sharding.put(dict(batch), self.batch_shardings(list(batch)))

    def jitted_step(self, abstract: State, schema):
        """`jax.jit` of the train step with in/out shardings and the state donated (cached)."""
        fields = batch_fields(schema)
        key = self._jit_key("step", schema, False, fields)
        if key not in _JIT_CACHE:
            _JIT_CACHE[key] = self._make_jitted_step(abstract, fields)
        return _JIT_CACHE[key]

    def _make_jitted_step(self, abstract: State, fields: Sequence[str]):
        """A fresh `jax.jit` of the train step."""
        state_sh = jax.tree.map(lambda x: x.sharding, abstract)
        return jax.jit(
            make_train_step(self.setup, self.schedule, self.mesh, self.rules, self.gen_tx,
                            self.disc_tx, remat=self.config.remat,
                            lambda_mode=self.config.lambda_mode,
                            lpips_augment=bool(self.config.lpips_augment)),
            in_shardings=(state_sh, self.frozen_shardings, self.batch_shardings(fields)),
            out_shardings=(state_sh, self.replicated),
            donate_argnums=(0,),
        )

    def compile_step(self, abstract: State, schema, global_batch: int):
        """Ahead-of-time compiled step and its FLOPs per device per step.

        FLOPs come from the compiled executable's XLA cost analysis. Where that counts less than
        half of the unoptimised program's FLOPs (divided over the devices), the backend's cost
        model missed library calls (cuDNN convolutions on GPU) and the latter is used.
        """
        fields = batch_fields(schema)
        batch = abstract_batch(schema, global_batch, self.batch_shardings(fields))
        lowered = self.jitted_step(abstract, schema).lower(abstract, self.frozen, batch)
        compiled = lowered.compile()
        flops = compiled_flops(compiled)
        hlo_flops = compiled_flops(lowered) / self.mesh.size
        self.flops_compiled, self.flops_hlo = flops, hlo_flops
        return compiled, (hlo_flops if flops < 0.5 * hlo_flops else flops)

    def sample_fn(self):
        """jit(state, frozen, vae_params, batch) -> (target, neighbour 0, with, without retrieval) images."""
        s, sched, vae = self.setup, self.schedule, self.vae
        t0 = s.student_timesteps[0]

        def decode(vae_params, z):
            z = z.astype(jnp.float32) / vae.scaling_factor + vae.shift_factor
            return jnp.clip(vae.apply({"params": vae_params}, z, method=vae.decode), -1.0, 1.0)

        def sample(state, frozen, vae_params, batch):
            noise = batch["noise"] if "noise" in batch else jax.random.normal(
                jax.random.PRNGKey(1234), batch["latent"].shape, jnp.float32)
            h_retr = sampling.retrieved_hspace(s.student, frozen["student"], batch["retrieved_latents"],
                                               batch["retrieved_prompt_embeds"])
            lam = adapter_lib.retrieval_lambda(batch["pooled"], batch["retrieved_pooled"])
            unet_p = lora.merge(frozen["student"], state["params"]["lora"], s.lora_alpha, s.lora_rank)
            run = lambda l: sampling.imagerag_one_step(
                s.student, unet_p, s.adapter, state["params"]["adapter"], noise, batch["prompt_embeds"],
                h_retr, l, sched, s.prediction_type, timestep=t0)
            return {
                "target": decode(vae_params, batch["latent"]),
                "neighbour": decode(vae_params, batch["retrieved_latents"][:, 0]),
                "with_retrieval": decode(vae_params, run(lam)),
                "without_retrieval": decode(vae_params, run(jnp.zeros_like(lam))),
            }

        return jax.jit(sample, out_shardings=self.replicated)


def _gen_params(params: Mapping[str, Any]) -> dict[str, Any]:
    """The generator's trainable params (adapter + LoRA)."""
    return {"adapter": params["adapter"], "lora": params["lora"]}


def compiled_flops(compiled: Any) -> float:
    """FLOPs of one call from XLA's cost analysis of a Compiled (per device) or Lowered (global)."""
    try:
        cost = compiled.cost_analysis()
    except Exception:  # pylint: disable=broad-except  # some backends have no cost model
        return 0.0
    if isinstance(cost, (list, tuple)):
        cost = cost[0] if cost else {}
    return float((cost or {}).get("flops", 0.0))


def make_train_step(s: StepSetup, schedule: schedule_lib.NoiseSchedule, mesh: jax.sharding.Mesh,
                    rules: Sequence[tuple[str, Any]], gen_tx: optax.GradientTransformation,
                    disc_tx: optax.GradientTransformation, *, remat: str = "none",
                    lambda_mode: str = "mean",
                    lpips_augment: bool = True) -> Callable[[State, PyTree, PyTree], tuple[State, dict]]:
    """The pure train step `(state, frozen, batch) -> (state, metrics)` (see the module docstring)."""
    policy = REMAT_POLICIES[remat]
    maybe_remat = (lambda f: f) if policy is None else (lambda f: jax.checkpoint(f, policy=policy))
    ts = np.asarray(s.student_timesteps, np.int32)
    n_train = schedule.num_train_timesteps
    batch_c = lambda x: sharding.constrain(x, mesh, ("batch",), rules)

    @maybe_remat
    def generate(gen_params, student_p, h, skips, temb, h_retr, lam, x_t, t, context):
        """Adapter edit of the H-space, LoRA-merged decoder, x0 prediction (the trainable path)."""
        unet_p = lora.merge(student_p, gen_params["lora"], s.lora_alpha, s.lora_rank)
        delta = s.adapter.apply({"params": gen_params["adapter"]}, h, h_retr)
        edited = adapter_lib.inject(h, delta, lam)
        out = sampling.unet_decode(s.student, unet_p, edited, skips, temb, context)
        z_hat = schedule_lib.predict_x0(out.astype(jnp.float32), x_t, t, schedule, s.prediction_type)
        # How far the adapter moves the H-space, relative to its size (0 at initialisation).
        ratio = jnp.sqrt(jnp.mean(jnp.square((edited - h).astype(jnp.float32)))
                         / (jnp.mean(jnp.square(h.astype(jnp.float32))) + 1e-12))
        return batch_c(z_hat), ratio

    @maybe_remat
    def teacher_features(teacher_p, z_s, timesteps, context):
        """Frozen teacher-encoder stages of a noised latent (differentiable in z_s)."""
        return disc_lib.teacher_stages(s.teacher, teacher_p, z_s, timesteps, context)

    lpips_fn = None
    if s.lpips is not None and s.beta > 0:

        @maybe_remat
        def lpips_fn(lpips_vars, pred, target, rng):
            return losses.latent_lpips_loss(s.lpips, lpips_vars, pred, target, rng, augment=lpips_augment)

    def train_step(state: State, frozen: PyTree, batch: PyTree) -> tuple[State, dict]:
        step = state["step"]
        rng = jax.random.fold_in(state["rng"], step)
        k_noise, k_t, k_s, k_eps, k_lpips = jax.random.split(rng, 5)
        z0 = batch_c(batch["latent"].astype(jnp.float32))
        b = z0.shape[0]
        context, pooled = batch["prompt_embeds"], batch["pooled"]
        # Synthetic pairs carry the teacher's initial noise: the student maps the same noise.
        noise = batch["noise"].astype(jnp.float32) if "noise" in batch else \
            jax.random.normal(k_noise, z0.shape, jnp.float32)
        noise = batch_c(noise)
        if len(ts) == 1:
            t = jnp.full((b,), int(ts[0]), jnp.int32)
            x_t = noise
        else:
            t = jnp.asarray(ts)[jax.random.randint(k_t, (b,), 0, len(ts))]
            # The first student step starts from pure noise (inference's convention); later
            # steps from the target noised to their timestep.
            x_t = jnp.where((t == n_train - 1)[:, None, None, None], noise,
                            schedule_lib.add_noise(z0, noise, t, schedule))
        student_p, teacher_p = frozen["student"], frozen["teacher"]

        # Frozen, outside the differentiated function: no backward through the student encoder.
        h, skips, temb = sampling.unet_encode(s.student, student_p, x_t, t, context)
        h_retr = sampling.retrieved_hspace(s.student, student_p, batch["retrieved_latents"],
                                           batch["retrieved_prompt_embeds"])
        lam = adapter_lib.retrieval_lambda(pooled, batch["retrieved_pooled"], mode=lambda_mode)

        s_t = disc_lib.sample_discriminator_timesteps(k_s, b, n_train)
        eps = batch_c(jax.random.normal(k_eps, z0.shape, jnp.float32))
        head_vars = {"params": state["params"]["disc"], "batch_stats": state["params"]["disc_stats"]}

        def g_loss_fn(gen_params):
            z_hat, ratio = generate(gen_params, student_p, h, skips, temb, h_retr, lam, x_t, t, context)
            fake_s = schedule_lib.add_noise(z_hat, eps, s_t, schedule)
            stages = teacher_features(teacher_p, fake_s, s_t, context)
            fake_logits = s.heads.apply(head_vars, stages, s_t, pooled, update_stats=False)
            adv = losses.hinge_g_loss(fake_logits)
            distill = losses.smooth_l1(z_hat, z0)
            lp = lpips_fn(frozen["lpips"], z_hat, z0, k_lpips) if lpips_fn is not None else jnp.zeros(())
            total = losses.generator_loss(adv, distill, lp, s.alpha, s.beta)
            aux = dict(adv=adv, distill=distill, lpips=lp, ratio=ratio, z_hat=z_hat, stages=stages)
            return total, aux

        gen_params = _gen_params(state["params"])
        (g_loss, g_aux), g_grads = jax.value_and_grad(g_loss_fn, has_aux=True)(gen_params)

        # Discriminator: real z_s through the teacher; the fake stages are reused from the
        # generator's pass (same frozen teacher, same input), detached. Real and fake go through
        # the heads in one call, interleaved per example, so both see the same spectral norms
        # and the batch stays on its devices.
        real_s = schedule_lib.add_noise(z0, eps, s_t, schedule)
        real_stages = disc_lib.teacher_stages(s.teacher, teacher_p, real_s, s_t, context)
        fake_stages = jax.lax.stop_gradient(g_aux["stages"])
        pair = lambda r, f: jnp.stack([r, f], axis=1).reshape(2 * r.shape[0], *r.shape[1:])
        both = [pair(r, f) for r, f in zip(real_stages, fake_stages)]
        s2, pooled2 = jnp.repeat(s_t, 2), jnp.repeat(pooled, 2, axis=0)

        def d_loss_fn(disc_params):
            logits, mutated = s.heads.apply(
                {"params": disc_params, "batch_stats": head_vars["batch_stats"]}, both, s2, pooled2,
                update_stats=True, mutable=["batch_stats"])
            logits = logits.reshape(b, 2, -1)
            real, fake = logits[:, 0], logits[:, 1]
            return losses.hinge_d_loss(real, fake), (real, fake, mutated["batch_stats"])

        (d_loss, (real_logits, fake_logits, new_stats)), d_grads = jax.value_and_grad(
            d_loss_fn, has_aux=True)(state["params"]["disc"])

        g_updates, gen_opt = gen_tx.update(g_grads, state["gen_opt_state"], gen_params)
        new_gen = optax.apply_updates(gen_params, g_updates)
        d_updates, disc_opt = disc_tx.update(d_grads, state["disc_opt_state"], state["params"]["disc"])
        new_disc = optax.apply_updates(state["params"]["disc"], d_updates)
        new_state = {
            "params": {**new_gen, "disc": new_disc, "disc_stats": new_stats},
            "gen_opt_state": gen_opt,
            "disc_opt_state": disc_opt,
            "step": step + 1,
            "rng": state["rng"],
        }
        g_norm, d_norm = optax.tree.norm(g_grads), optax.tree.norm(d_grads)
        ok = jnp.isfinite(g_loss) & jnp.isfinite(d_loss) & jnp.isfinite(g_norm) & jnp.isfinite(d_norm)
        # A bad step changes nothing: the state stays the last good one (the loop then stops).
        new_state = jax.tree.map(lambda new, old: jnp.where(ok, new, old), new_state, state)
        acc_real, acc_fake = losses.discriminator_accuracy(real_logits, fake_logits)
        metrics = {
            "g_loss": g_loss, "g_adv": g_aux["adv"], "g_distill": g_aux["distill"],
            "g_lpips": g_aux["lpips"], "d_loss": d_loss, "d_acc_real": acc_real,
            "d_acc_fake": acc_fake, "d_logit_real": jnp.mean(real_logits),
            "d_logit_fake": jnp.mean(fake_logits), "lambda_mean": jnp.mean(lam),
            "lambda_min": jnp.min(lam), "lambda_max": jnp.max(lam),
            "hspace_edit_ratio": g_aux["ratio"], "g_grad_norm": g_norm, "d_grad_norm": d_norm,
            "g_lr": state["gen_opt_state"].hyperparams["learning_rate"],
            "d_lr": state["disc_opt_state"].hyperparams["learning_rate"],
            "ok": ok,
        }
        return new_state, metrics

    return train_step


# ---------------------------------------------------------------------------------------------
# The loop.
# ---------------------------------------------------------------------------------------------


class Preemption:
    """Turns SIGTERM into a flag the loop polls (save, then exit cleanly)."""

    def __init__(self):
        self.requested = False
        self._previous = None

    def _handler(self, signum, frame) -> None:
        logging.warning("received signal %d: saving a checkpoint and stopping", signum)
        self.requested = True

    def __enter__(self) -> "Preemption":
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGTERM, self._handler)
        return self

    def __exit__(self, *exc) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)


def initialize_distributed() -> None:
    """`jax.distributed.initialize()` when a multi-process launcher set it up (env or TPU pod)."""
    env = os.environ
    if env.get("JAX_COORDINATOR_ADDRESS") and env.get("JAX_NUM_PROCESSES"):
        # Plain machines (no SLURM/TPU metadata): the launcher names the count and this rank.
        jax.distributed.initialize(
            coordinator_address=env["JAX_COORDINATOR_ADDRESS"],
            num_processes=int(env["JAX_NUM_PROCESSES"]),
            process_id=int(env["JAX_PROCESS_ID"]),
        )
    elif env.get("JAX_COORDINATOR_ADDRESS") or env.get("SLURM_NTASKS", "1") != "1" or \
            len(env.get("TPU_WORKER_HOSTNAMES", "").split(",")) > 1:
        jax.distributed.initialize()


def _host(x: jax.Array) -> np.ndarray:
    """A replicated global array's value on this host."""
    return np.asarray(x.addressable_data(0)) if isinstance(x, jax.Array) else np.asarray(x)


def _data_state_for_restore(saved: Mapping[str, Any], mine: Mapping[str, Any]) -> dict[str, Any]:
    """The saved (process 0) iterator state mapped onto this process's pipeline."""
    if mine["process_count"] == 1:
        return dict(saved)
    out = dict(mine)
    for key in ("seed", "split", "per_host_batch", "process_count", "shuffle_buffer"):
        if saved.get(key) != mine[key]:
            raise ValueError(f"iterator state was saved with {key}={saved.get(key)!r}, this run "
                             f"has {mine[key]!r}")
    out["batches_consumed"] = saved["batches_consumed"]  # every host consumes the same count
    return out


def _check_finite(step: int, metrics: Mapping[str, jax.Array], ckpt: checkpoints.Checkpointer) -> None:
    """Raises FloatingPointError naming the step and the last good checkpoint if `ok` is false."""
    if bool(_host(metrics["ok"])):
        return
    values = {k: float(_host(v)) for k, v in metrics.items() if k != "ok"}
    ckpt.wait()
    last = ckpt.latest_step()
    where = f"step {last} in {ckpt.directory}" if last is not None else "none saved yet"
    raise FloatingPointError(
        f"non-finite loss or gradient at train step {step} (g_loss={values['g_loss']}, "
        f"d_loss={values['d_loss']}, g_grad_norm={values['g_grad_norm']}, "
        f"d_grad_norm={values['d_grad_norm']}); the state was not updated or saved. "
        f"Last good checkpoint: {where}.")


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> State:
    """Trains (resuming from workdir/checkpoints when present) and returns the final train state.

    SIGTERM (from here on, set-up included) makes the loop save a checkpoint and return early.
    """
    with Preemption() as preempt:
        return _train_and_evaluate(config, workdir, preempt)


def _train_and_evaluate(config: ml_collections.ConfigDict, workdir: str, preempt: Preemption) -> State:
    """The body of `train_and_evaluate`."""
    from clu import metric_writers

    from imagerag_jax.data import tfrecords
    from imagerag_jax.data.pipeline import InputPipeline

    workdir = os.path.abspath(workdir) if "://" not in workdir else workdir
    os.makedirs(workdir, exist_ok=True) if "://" not in workdir else None
    is_main = jax.process_index() == 0
    writer = metric_writers.create_default_writer(workdir, just_logging=not is_main)
    config_json = json.loads(config.to_json_best_effort())
    if is_main:
        writer.write_hparams({k: v for k, v in _flat_config(config_json).items()})

    mesh = sharding.make_mesh(config.mesh)
    logging.info("mesh %s over %d devices (%s)", dict(mesh.shape), mesh.size, jax.devices()[0].platform)
    trainer = Trainer(config, mesh)
    data_dir = config.data_dir
    if data_dir is None:
        if config.student_weights is not None:
            logging.warning("data_dir unset: training on random synthetic data")
        data_dir = write_synthetic_data(os.path.join(workdir, "data"), config)
    schema = tfrecords.Schema.from_dict(tfrecords.validate_manifest(data_dir, split=config.split)["schema"])
    trainer.check_schema(schema)
    gb = int(config.global_batch_size)
    shards = sharding.batch_shards(mesh, trainer.rules)
    if gb % shards:
        raise ValueError(f"global_batch_size {gb} is not a multiple of the {shards} batch shards")
    fields = batch_fields(schema)
    pipeline_kw = dict(mesh=mesh, batch_axes=sharding.batch_axes(mesh, trainer.rules), fields=fields,
                       dtype=np.float32)
    it = InputPipeline(data_dir, config.split, gb, seed=config.seed,
                       shuffle_buffer=config.shuffle_buffer, **pipeline_kw)

    ckpt = checkpoints.Checkpointer(os.path.join(workdir, "checkpoints"), config.keep_checkpoints,
                                    config.async_checkpoints)
    abstract = trainer.abstract_state(schema)
    frozen_refs = trainer.frozen_fingerprints()
    start = ckpt.latest_step()
    if start is not None:
        state, extra = ckpt.restore(start, abstract)
        state = with_learning_rates(state, config)
        _check_frozen(extra["frozen"], frozen_refs)
        it.set_state(_data_state_for_restore(extra["data_iter"], it.get_state()))
        logging.info("resumed from step %d (%s)", start, ckpt.directory)
    else:
        state = trainer.init_state(schema)
    step = int(_host(state["step"]))

    t0 = time.perf_counter()
    train_step, flops = trainer.compile_step(abstract, schema, gb)
    logging.info("compiled the train step in %.1f s; %.3g FLOP per device per step",
                 time.perf_counter() - t0, flops)
    sample_every = int(config.sample_every)
    sample, sample_batch = None, None
    if sample_every > 0:
        sample = trainer.sample_fn()
        n = -(-max(int(config.num_samples), 1) // shards) * shards
        sample_batch = next(InputPipeline(data_dir, config.split, n, seed=config.seed + 1,
                                          shuffle_buffer=1, **pipeline_kw))

    def save(at: int) -> None:
        ckpt.save(at, state, data_iter=it.get_state(), config=config_json, frozen=frozen_refs)

    total = int(config.total_steps)
    log_every, ckpt_every = max(int(config.log_every), 1), max(int(config.checkpoint_every), 1)
    history: list[tuple[int, dict]] = []
    pending: tuple[int, dict] | None = None
    t_last, steps_since = time.perf_counter(), 0
    try:
        while step < total:
            if preempt.requested or ckpt.reached_preemption(step):
                if pending is not None:
                    _check_finite(*pending, ckpt)
                ckpt.wait()
                if step not in ckpt.all_steps():  # SIGTERM right after a periodic save
                    save(step)
                    ckpt.wait()
                logging.warning("preempted: saved step %d, exiting", step)
                break
            batch = next(it)
            if step == config.debug_nan_step:  # test hook; the compiled step stays the same
                batch = _poison(batch)
            state, metrics = train_step(state, trainer.frozen, batch)
            # Check the previous step while this one runs (no host sync on the critical path).
            if pending is not None:
                _check_finite(*pending, ckpt)
            pending = (step, metrics)
            history.append(pending)
            step += 1
            steps_since += 1
            last = step == total
            do_log = step % log_every == 0 or last
            do_ckpt = step % ckpt_every == 0 or last
            do_sample = sample is not None and (step % sample_every == 0 or last)
            if not (do_log or do_ckpt or do_sample):
                continue
            _check_finite(*pending, ckpt)
            pending = None
            if do_log:
                dt = (time.perf_counter() - t_last) / steps_since
                scalars = _mean_metrics([m for _, m in history])
                scalars.update(step_time_s=dt, examples_per_s=gb / dt,
                               tflops_per_device=flops / dt / 1e12)
                writer.write_scalars(step, scalars)
                history.clear()
            if do_ckpt:
                save(step)
            if do_sample:
                _write_samples(writer, workdir, step, sample(state, trainer.frozen,
                                                             trainer.vae_params, sample_batch),
                               is_main)
            t_last, steps_since = time.perf_counter(), 0
    finally:
        ckpt.close()
        writer.flush()
    return state


@jax.jit
def _poison(batch: PyTree) -> PyTree:
    """The batch with NaN target latents (debug_nan_step): loss and gradients become NaN."""
    return {**batch, "latent": batch["latent"] * jnp.nan}


def _check_frozen(saved: Mapping[str, Any], current: Mapping[str, Any]) -> None:
    """Resuming with other frozen weights would silently change the objective: refuse."""
    for name in ("student", "teacher"):
        a, b = saved.get(name, {}).get("fingerprint"), current[name]["fingerprint"]
        if a is not None and a != b:
            raise ValueError(f"the {name} weights differ from the checkpoint's ({saved[name]} vs "
                             f"{current[name]}); resume with the same frozen weights")


def _mean_metrics(history: Sequence[Mapping[str, jax.Array]]) -> dict[str, float]:
    """Per-metric means over the steps since the last log (min/max for lambda's extremes)."""
    out = {}
    for key in history[0]:
        if key == "ok":
            continue
        vals = np.asarray([float(_host(m[key])) for m in history])
        out[key] = float(vals.min() if key == "lambda_min" else vals.max() if key == "lambda_max"
                         else vals.mean())
    return out


def _write_samples(writer, workdir: str, step: int, out: Mapping[str, jax.Array], is_main: bool) -> None:
    """PNG grids (target | neighbour | with | without retrieval) and the same in TensorBoard."""
    if not is_main:
        return
    arrays = {k: _host(v) for k, v in out.items()}
    n = arrays["target"].shape[0]
    stacked = np.concatenate([arrays[k] for k in ("target", "neighbour", "with_retrieval",
                                                  "without_retrieval")])
    grid = images.make_grid(images.to_uint8(stacked), columns=n)
    writer.write_images(step, {"samples": grid[None]})
    if "://" in workdir:  # PNG files only on a local filesystem; TensorBoard has the grid
        return
    folder = os.path.join(workdir, "samples")
    for name, arr in arrays.items():
        images.save_images(arr, os.path.join(folder, f"step_{step:07d}_{name}.png"), columns=n)
    images.save_png(grid, os.path.join(folder, f"step_{step:07d}.png"))


def _flat_config(d: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested config JSON -> {'a.b': scalar} for hparams."""
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, Mapping):
            out.update(_flat_config(v, key + "."))
        elif isinstance(v, (int, float, str, bool)) or v is None:
            out[key] = "None" if v is None else v
        else:
            out[key] = json.dumps(v)
    return out
