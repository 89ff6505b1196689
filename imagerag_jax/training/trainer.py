"""ImageRAGTurbo training: placement and compilation over the mesh, and the loop.

    from imagerag_jax import config_args
    from imagerag_jax.training import trainer
    state = trainer.train_and_evaluate(config_args.load_config("configs/tiny.py"), "/tmp/workdir")

The objective (the pure step, remat policies, optimisers) is `train_step.py`; the frozen towers
come from `towers.frozen_towers`. Here, `Trainer` places the frozen towers on the ('data', 'fsdp')
mesh, initialises the train state in its shardings (`jax.eval_shape` + `jit(out_shardings)`)
and compiles the step (in/out shardings, state donated); `train_and_evaluate` runs the loop:
input pipeline, orbax checkpoints (resume, SIGTERM), clu metrics (losses, D accuracy, lambda,
grad norms, step time, examples/s, TFLOP/s per device) and PNG sample grids with and without
retrieval.
"""

from __future__ import annotations

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

from imagerag_jax import images, sharding
from imagerag_jax.errors import UserError
from imagerag_jax.training import checkpoints
from imagerag_jax.models import flops as flops_lib
from imagerag_jax.models import lora
from imagerag_jax.diffusion import sampling
from imagerag_jax.weights import towers
from imagerag_jax.diffusion import schedule as schedule_lib
from imagerag_jax.training import step as step_lib
from imagerag_jax.models import adapter as adapter_lib
from imagerag_jax.models import discriminator as disc_lib
from imagerag_jax.models.latent_lpips import latent_lpips_or_none

PyTree = Any
State = dict[str, Any]

# Config fields the jitted functions do not depend on (the loop's); see Trainer._jit_key.
LOOP_FIELDS = ("total_steps", "log_every", "checkpoint_every", "keep_checkpoints",
               "async_checkpoints", "sample_every", "num_samples", "debug_nan_step", "data_dir",
               "data_mixture", "split", "shuffle_buffer", "synthetic", "global_batch_size", "peak_tflops",
               "database")
# Where the train step gets each neighbour's H-space: 'encode' runs the frozen student encoder on
# the neighbours' latents in the step; 'hspace' gathers it from the database's H-space cache
# (data/neighbour_feed.py), computed once per database entry.
RETRIEVED_BRANCHES = ("encode", "hspace")
# Jitted init/step functions per (config, mesh, shapes): a second Trainer with the same settings
# (a resumed run, a notebook re-run) reuses them instead of tracing the UNets again.
_JIT_CACHE: dict[tuple, Any] = {}


def abstract_batch(schema, global_batch: int, shardings: Mapping[str, Any]) -> dict[str, jax.ShapeDtypeStruct]:
    """ShapeDtypeStructs of a global float32 batch (for ahead-of-time compilation)."""
    shapes = schema.shapes()
    return {f: jax.ShapeDtypeStruct((global_batch, *shapes[f]), jnp.float32, sharding=shardings[f])
            for f in step_lib.batch_fields(schema)}


def random_batch(schema, global_batch: int, seed: int = 0) -> dict[str, np.ndarray]:
    """A host batch of standard-normal float32 fields (tests, benchmarks; no TensorFlow needed)."""
    rng = np.random.default_rng(seed)
    shapes = schema.shapes()
    return {f: rng.standard_normal((global_batch, *shapes[f]), np.float32)
            for f in step_lib.batch_fields(schema)}


class Trainer:
    """Everything `train_and_evaluate` needs except the loop; importable for Colab and tests.

        trainer = Trainer(config)                       # loads/places the frozen towers
        state = trainer.init_state(schema)              # sharded init (eval_shape + out_shardings)
        step, flops = trainer.compile_step(trainer.abstract_state(schema), schema, batch_size)
        state, metrics = step(state, trainer.frozen, trainer.shard_batch(host_batch))
        images, scalars = trainer.sample_fn()(state, trainer.frozen, trainer.vae_params, batch)

    `schema` is a `data.tfrecords.Schema` (or any object with its shape fields and `shapes()`).
    Attributes: `frozen` (student, teacher encoder, [lpips]) and `vae_params` placed on the mesh
    with `frozen_shardings` / `vae_shardings`; `setup` (modules and static numbers of the step).
    """

    def __init__(self, config: ml_collections.ConfigDict, mesh: jax.sharding.Mesh | None = None,
                 frozen_towers: towers.FrozenTowers | None = None):
        # frozen_towers: given instead of loaded; with ShapeDtypeStruct params the Trainer is
        # abstract (compile_step only: ahead-of-time compilation for a TPU topology, benchmark/aot.py).
        self.config = config
        self.mesh = mesh if mesh is not None else sharding.make_mesh(config.mesh)
        self.rules = tuple(tuple(r) for r in config.logical_rules)
        self.schedule = schedule_lib.scaled_linear_schedule()
        compute = towers.DTYPES[config.compute_dtype]
        frozen_towers = frozen_towers if frozen_towers is not None else towers.frozen_towers(config)
        student, student_p = frozen_towers.student.module, frozen_towers.student.params
        teacher, teacher_p = frozen_towers.teacher.module, frozen_towers.teacher.params
        self.vae, vae_p = frozen_towers.vae.module, frozen_towers.vae.params
        lp = latent_lpips_or_none(config.latent_lpips_weights, config.beta)
        beta = float(config.beta) if lp is not None else 0.0
        check_config(config, self.mesh)
        n = int(config.student_steps)
        self.setup = step_lib.StepSetup(
            student=student,
            teacher=teacher,
            adapter=adapter_lib.from_config(config.adapter, dtype=compute),
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

        frozen = {"student": student_p, "teacher": teacher_p}
        if lp is not None:
            frozen["lpips"] = lp[1]
        shard_kw = dict(min_shard_size=int(config.min_shard_size),
                        rules=tuple(tuple(r) for r in config.sharding_rules))
        self.frozen_shardings = sharding.param_shardings(frozen, self.mesh, **shard_kw)
        self.frozen = sharding.put(frozen, self.frozen_shardings)
        self.vae_shardings = sharding.param_shardings(vae_p, self.mesh, **shard_kw)
        self.vae_params = sharding.put(vae_p, self.vae_shardings)
        self._shard_kw = shard_kw
        self.frozen_refs = {"student": frozen_towers.student.ref,
                            "teacher": frozen_towers.teacher.ref, "vae": frozen_towers.vae.ref,
                            "latent_lpips": {"path": config.latent_lpips_weights, "used": lp is not None}}
        self.gen_tx = step_lib.make_optimizer(config.optimizer)
        self.disc_tx = step_lib.make_optimizer(config.disc_optimizer)
        self.replicated = sharding.replicated(self.mesh)
        self.batch_sharding = sharding.batch_sharding(self.mesh, self.rules)

    # --- shapes and fingerprints -------------------------------------------------------------

    def check_schema(self, schema) -> None:
        """Fails early when the data do not fit the towers (channels, text width, k)."""
        st = self.setup.student
        if schema.latent_shape[-1] != st.in_channels:
            raise UserError(f"data latents have {schema.latent_shape[-1]} channels, the student UNet "
                             f"takes {st.in_channels}")
        for name, unet in (("student", st), ("teacher", self.setup.teacher)):
            if schema.embed_shape[-1] != unet.cross_attention_dim:
                raise UserError(f"data prompt embeds have width {schema.embed_shape[-1]}, the {name} "
                                 f"UNet's cross_attention_dim is {unet.cross_attention_dim}")
        if schema.k < 1:
            raise UserError("the data have no retrieved neighbours (k=0); ImageRAGTurbo needs k >= 1")
        factor = 2 ** (len(st.block_out_channels) - 1)
        if schema.latent_shape[0] % factor or schema.latent_shape[1] % factor:
            raise UserError(f"latent size {schema.latent_shape[:2]} is not a multiple of {factor}")

    def frozen_fingerprints(self) -> dict[str, Any]:
        """Paths and content hashes of the frozen towers (stored with every checkpoint)."""
        refs = json.loads(json.dumps(self.frozen_refs))
        refs["student"]["fingerprint"] = towers.fingerprint(self.frozen["student"])
        refs["teacher"]["fingerprint"] = towers.fingerprint(self.frozen["teacher"])
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
                "gen_opt_state": self.gen_tx.init(step_lib.generator_params(params)),
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
        # Device ids repeat across platforms (a CPU and a described TPU topology, benchmark/aot.py).
        mesh = (tuple(self.mesh.shape.items()),
                tuple((d.platform, d.device_kind, d.id) for d in self.mesh.devices.flat))
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
        return step_lib.with_learning_rates(state, self.config)

    # --- the step ------------------------------------------------------------------------------

    def batch_shardings(self, fields: Sequence[str]) -> dict[str, Any]:
        """The batch sharding for each field."""
        return {f: self.batch_sharding for f in fields}

    def shard_batch(self, batch: Mapping[str, np.ndarray]) -> dict[str, jax.Array]:
        """Host arrays (the global batch, same on every process) -> global arrays on the mesh."""
        return sharding.put(dict(batch), self.batch_shardings(list(batch)))

    def jitted_step(self, abstract: State, schema):
        """`jax.jit` of the train step with in/out shardings and the state donated (cached)."""
        fields = step_lib.batch_fields(schema)
        key = self._jit_key("step", schema, False, fields)
        if key not in _JIT_CACHE:
            _JIT_CACHE[key] = self._make_jitted_step(abstract, fields)
        return _JIT_CACHE[key]

    def _make_jitted_step(self, abstract: State, fields: Sequence[str]):
        """A fresh `jax.jit` of the train step."""
        state_sh = jax.tree.map(lambda x: x.sharding, abstract)
        return jax.jit(
            step_lib.make_train_step(self.setup, self.schedule, self.mesh, self.rules, self.gen_tx,
                            self.disc_tx, remat=self.config.remat,
                            lpips_augment=bool(self.config.lpips_augment),
                            self_neighbour=bool(self.config.self_neighbour),
                            arm=str(self.config.arm),
                            prompt_dropout=float(self.config.prompt_dropout),
                            grad_accum_steps=int(self.config.grad_accum_steps)),
            in_shardings=(state_sh, self.frozen_shardings, self.batch_shardings(fields)),
            out_shardings=(state_sh, self.replicated),
            donate_argnums=(0,),
        )

    def compile_step(self, abstract: State, schema, global_batch: int):
        """Ahead-of-time compiled step and its FLOPs per device per step.

        FLOPs come from the compiled executable's XLA cost analysis. Where that counts less than
        half of the unoptimised program's FLOPs (divided over the devices), the backend's cost
        model missed library calls (cuDNN convolutions on GPU) and the latter is used. The cost
        analysis counts a loop body once, so with `grad_accum_steps` > 1 both counts are scaled by
        it (the optimiser updates outside the micro-batch loop, small, are then overcounted).
        """
        fields = step_lib.batch_fields(schema)
        batch = abstract_batch(schema, global_batch, self.batch_shardings(fields))
        lowered = self.jitted_step(abstract, schema).lower(abstract, self.frozen, batch)
        compiled = lowered.compile()
        accum = int(self.config.grad_accum_steps)
        flops = compiled_flops(compiled) * accum
        hlo_flops = compiled_flops(lowered) / self.mesh.size * accum
        self.flops_compiled, self.flops_hlo = flops, hlo_flops
        return compiled, (hlo_flops if flops < 0.5 * hlo_flops else flops)

    def analytic_flops(self, schema, global_batch: int) -> flops_lib.StepFlops:
        """The train step's FLOPs counted from the models' shapes (`models/flops.py`), by phase.

        Unlike XLA's cost analysis this counts every backend alike (GPU cost models leave out
        cuDNN convolutions), so the MFU it gives compares across devices. The forward passes that
        remat repeats are not counted: MFU is the model's FLOPs, whatever the policy.
        """
        per_device = (global_batch // sharding.batch_shards(self.mesh, self.rules)
                      // int(self.config.grad_accum_steps))
        return flops_lib.train_step_flops_from_setup(
            self.setup, schema, batch=per_device, lora_pattern=self.lora_pattern,
            remat="none", backend=jax.default_backend(), arm=str(self.config.arm))

    def sample_fn(self):
        """jit(state, frozen, vae_params, batch) -> (images, scalars): the target, neighbour 0 and
        the student's one step with and without retrieval as images; the neighbour sensitivity
        (``neighbour_sensitivity``) as scalars.

        Neighbour sensitivity (``sampling.neighbour_sensitivity``): how far the one-step
        prediction (latent x0) moves when every example's retrieved neighbours are replaced by
        another example's (rolled by one over the batch, lambda kept), relative to how far it is
        from the plain student's (the frozen SD-Turbo step: no LoRA, no adapter). Near 0: the
        trained student ignores what it retrieves. Needs >= 2 examples.
        """
        s, sched, vae = self.setup, self.schedule, self.vae
        t0 = s.student_timesteps[0]

        def decode(vae_params, z):
            return vae.apply({"params": vae_params}, z, method=vae.decode_latents)

        def sample(state, frozen, vae_params, batch):
            noise = batch["noise"] if "noise" in batch else jax.random.normal(
                jax.random.PRNGKey(1234), batch["latent"].shape, jnp.float32)
            h_retr = batch["retrieved_hspace"] if "retrieved_hspace" in batch else \
                sampling.retrieved_hspace(s.student, frozen["student"], batch["retrieved_latents"],
                                          batch["retrieved_prompt_embeds"])
            lam = adapter_lib.retrieval_lambda(batch["pooled"], batch["retrieved_pooled"])
            unet_p = lora.merge(frozen["student"], state["params"]["lora"], s.lora_alpha, s.lora_rank)
            run = lambda l, h=h_retr, p=unet_p: sampling.imagerag_one_step(
                s.student, p, s.adapter, state["params"]["adapter"], noise, batch["prompt_embeds"],
                h, l, sched, s.prediction_type, timestep=t0)
            with_retrieval = run(lam)
            scalars = sampling.neighbour_sensitivity(
                with_retrieval, run(lam, h=jnp.roll(h_retr, 1, axis=0)),
                run(jnp.zeros_like(lam), p=frozen["student"]))
            return {
                "target": decode(vae_params, batch["latent"]),
                "neighbour": decode(vae_params, batch["retrieved_latents"][:, 0]),
                "with_retrieval": decode(vae_params, with_retrieval),
                "without_retrieval": decode(vae_params, run(jnp.zeros_like(lam))),
            }, scalars

        return jax.jit(sample, out_shardings=self.replicated)


def compiled_flops(compiled: Any) -> float:
    """FLOPs of one call from XLA's cost analysis of a Compiled (per device) or Lowered (global)."""
    try:
        cost = compiled.cost_analysis()
    except Exception:  # pylint: disable=broad-except  # some backends have no cost model
        return 0.0
    if isinstance(cost, (list, tuple)):
        cost = cost[0] if cost else {}
    return float((cost or {}).get("flops", 0.0))


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


def _data_state_for_restore(saved: Mapping[str, Any], mine: Mapping[str, Any]) -> dict[str, Any]:
    """The saved (process 0) iterator state mapped onto this process's pipeline."""
    if mine["process_count"] == 1:
        return dict(saved)
    out = dict(mine)
    for key in ("seed", "split", "per_host_batch", "process_count", "shuffle_buffer", "weights"):
        if saved.get(key) != mine.get(key):
            raise ValueError(f"iterator state was saved with {key}={saved.get(key)!r}, this run "
                             f"has {mine.get(key)!r}")
    out["batches_consumed"] = saved["batches_consumed"]  # every host consumes the same count
    return out


def _check_finite(step: int, metrics: Mapping[str, jax.Array], ckpt: checkpoints.Checkpointer) -> None:
    """Raises FloatingPointError naming the step and the last good checkpoint if `ok` is false."""
    if bool(sharding.host_value(metrics["ok"])):
        return
    values = {k: float(sharding.host_value(v)) for k, v in metrics.items() if k != "ok"}
    ckpt.wait()
    last = ckpt.latest_step()
    where = f"step {last} in {ckpt.directory}" if last is not None else "none saved yet"
    raise FloatingPointError(
        f"non-finite loss or gradient at train step {step} (g_loss={values['g_loss']}, "
        f"d_loss={values['d_loss']}, g_grad_norm={values['g_grad_norm']}, "
        f"d_grad_norm={values['d_grad_norm']}); the state was not updated or saved. "
        f"Last good checkpoint: {where}.")


def check_config(config: ml_collections.ConfigDict,
                 mesh: jax.sharding.Mesh | None = None) -> jax.sharding.Mesh:
    """Refuses config values the step cannot take, before anything is loaded or written.

    Args:
        config: the training config.
        mesh: the mesh the run uses (default: `config.mesh` over every device).

    Returns:
        The mesh, whose batch shards each of the `grad_accum_steps` micro-batches of the global
        batch splits over.
    """
    if config.remat not in step_lib.REMAT_POLICIES:
        raise UserError(f"unknown remat {config.remat!r}; expected one of "
                        f"{sorted(step_lib.REMAT_POLICIES)}")
    if config.retrieved_branch not in RETRIEVED_BRANCHES:
        raise UserError(f"unknown retrieved_branch {config.retrieved_branch!r}; expected one of "
                        f"{', '.join(RETRIEVED_BRANCHES)}")
    if config.retrieved_branch == "hspace" and config.self_neighbour:
        raise UserError("self_neighbour puts the example's own latent in as neighbour 0, which the "
                        "H-space cache does not hold; use retrieved_branch='encode'")
    accum = config.grad_accum_steps
    if not isinstance(accum, int) or isinstance(accum, bool) or accum < 1:
        raise UserError(f"grad_accum_steps must be an integer >= 1, got {accum!r}")
    mesh = mesh if mesh is not None else sharding.make_mesh(config.mesh)  # a misfit is a UserError
    shards = sharding.batch_shards(mesh, tuple(tuple(r) for r in config.logical_rules))
    batch = int(config.global_batch_size)
    # Each of the `accum` micro-batches is split over the batch shards like a whole batch.
    if batch % (accum * shards):
        where = f"{shards} batch shards of mesh {dict(mesh.shape)}"
        if accum == 1:
            raise UserError(f"global_batch_size {batch} is not a multiple of the {where}")
        raise UserError(f"global_batch_size {batch} does not split into grad_accum_steps={accum} "
                        f"micro-batches over the {where}: it must be a multiple of "
                        f"{accum} x {shards} = {accum * shards}")
    return mesh


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> State:
    """Trains (resuming from workdir/checkpoints when present) and returns the final train state.

    SIGTERM (from here on, set-up included) makes the loop save a checkpoint and return early.
    """
    with Preemption() as preempt:
        return _train_and_evaluate(config, workdir, preempt)


def _train_and_evaluate(config: ml_collections.ConfigDict, workdir: str, preempt: Preemption) -> State:
    """The body of `train_and_evaluate`."""
    from clu import metric_writers

    from imagerag_jax.data import mixture, neighbour_feed, synthetic
    from imagerag_jax.data.input_stream import InputStream, data_schema, retrieval_manifest

    mesh = check_config(config)  # a bad value leaves no half-made workdir behind
    workdir = os.path.abspath(workdir) if "://" not in workdir else workdir
    os.makedirs(workdir, exist_ok=True) if "://" not in workdir else None
    is_main = jax.process_index() == 0
    writer = metric_writers.create_default_writer(workdir, just_logging=not is_main)
    config_json = json.loads(config.to_json_best_effort())
    if is_main:
        writer.write_hparams({k: v for k, v in _flat_config(config_json).items()})

    logging.info("mesh %s over %d devices (%s)", dict(mesh.shape), mesh.size, jax.devices()[0].platform)
    trainer = Trainer(config, mesh)
    sets = mixture.config_sets(config, workdir)
    if config.data_dir is None and not config.data_mixture:
        if config.student_weights is not None:
            logging.warning("data_dir unset: training on random synthetic data")
        synthetic.write_synthetic_data(sets[0][0], config)
    # One set reads as its directory (the state of runs before mixtures), several as a mixture.
    data = sets[0][0] if len(sets) == 1 and not config.data_mixture else sets
    stored = data_schema(data, config.split)
    # Neighbours stored by id, or the H-space branch: each host gathers them from its database.
    feed = neighbour_feed.open_feed(retrieval_manifest(data, config.split), stored,
                                    hspace=config.retrieved_branch == "hspace",
                                    database=config.database, student_params=trainer.frozen["student"])
    schema = feed.schema(stored) if feed is not None else stored
    trainer.check_schema(schema)
    gb = int(config.global_batch_size)
    shards = sharding.batch_shards(mesh, trainer.rules)  # check_config has checked that gb splits
    fields = step_lib.batch_fields(schema)
    pipeline_kw = dict(mesh=mesh, batch_axes=sharding.batch_axes(mesh, trainer.rules), dtype=np.float32)
    it = InputStream(data, config.split, gb, seed=config.seed, shuffle_buffer=config.shuffle_buffer,
                     fields=fields, neighbour_feed=feed, **pipeline_kw)

    ckpt = checkpoints.Checkpointer(os.path.join(workdir, checkpoints.DIRECTORY),
                                    config.keep_checkpoints, config.async_checkpoints)
    abstract = trainer.abstract_state(schema)
    frozen_refs = trainer.frozen_fingerprints()
    start = ckpt.latest_step()
    if start is not None:
        state, extra = ckpt.restore(start, abstract)
        state = step_lib.with_learning_rates(state, config)
        towers.check_frozen(extra["frozen"], frozen_refs)
        it.set_state(_data_state_for_restore(extra["data_iter"], it.get_state()))
        logging.info("resumed from step %d (%s)", start, ckpt.directory)
    else:
        state = trainer.init_state(schema)
    step = int(sharding.host_value(state["step"]))

    t0 = time.perf_counter()
    train_step, flops = trainer.compile_step(abstract, schema, gb)
    logging.info("compiled the train step in %.1f s; %.3g FLOP per device per step",
                 time.perf_counter() - t0, flops)
    flops_per_example = trainer.analytic_flops(schema, gb).per_example
    peak = config.get("peak_tflops") or flops_lib.peak_tflops()
    logging.info("train step: %.3g FLOP per example (analytic); peak %s", flops_per_example,
                 f"{peak:g} TFLOP/s per device" if peak else "unknown for this device: no MFU")
    sample_every = int(config.sample_every)
    sample, sample_batch = None, None
    if sample_every > 0:
        sample = trainer.sample_fn()
        n = -(-max(int(config.num_samples), 1) // shards) * shards
        # The grids show neighbour 0 as an image: the sample batch has the latents too.
        # The same database and cache, opened once (staged, checked, fingerprinted).
        sample_feed = None if feed is None else neighbour_feed.NeighbourFeed(
            feed.database, feed.cache, with_latents=True)
        sample_fields = tuple(dict.fromkeys(fields + ("retrieved_latents", "retrieved_prompt_embeds")))
        sample_batch = next(InputStream(data, config.split, n, seed=config.seed + 1, shuffle_buffer=1,
                                        fields=sample_fields, neighbour_feed=sample_feed, **pipeline_kw))

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
                per_device = gb / dt / mesh.size
                scalars.update(step_time_s=dt, examples_per_s=gb / dt,
                               tflops_per_device=flops / dt / 1e12,
                               model_tflops_per_device=flops_per_example * per_device / 1e12)
                if peak:
                    scalars["mfu"] = flops_lib.mfu(flops_per_example, per_device, peak)
                writer.write_scalars(step, scalars)
                logging.info("%s", progress_line(step, total, scalars))
                history.clear()
            if do_ckpt:
                save(step)
            if do_sample:
                grids, sensitivity = sample(state, trainer.frozen, trainer.vae_params, sample_batch)
                _write_samples(writer, workdir, step, grids, is_main)
                if len(sample_batch["latent"]) > 1:  # one example has no other's neighbours
                    sensitivity = {k: float(v) for k, v in sensitivity.items()}
                    writer.write_scalars(step, sensitivity)
                    logging.info("step %d | neighbour sensitivity %.3g (shuffled neighbours move "
                                 "x0 by %.3g, plain student %.3g away)", step,
                                 sensitivity["neighbour_sensitivity"],
                                 sensitivity["neighbour_sensitivity/shuffled_distance"],
                                 sensitivity["neighbour_sensitivity/plain_distance"])
            t_last, steps_since = time.perf_counter(), 0
    finally:
        ckpt.close()
        writer.flush()
    return state


def progress_line(step: int, total: int, scalars: Mapping[str, float]) -> str:
    """The one log line per `log_every`: step, images/s, MFU, the losses and lambda."""
    parts = [f"step {step}/{total}", f"{scalars['examples_per_s']:.3g} img/s"]
    if "mfu" in scalars:
        parts.append(f"MFU {100 * scalars['mfu']:.1f}%")
    losses = [f"{k} {scalars[k]:.4g}" for k in ("g_loss", "g_adv", "g_distill", "g_lpips", "d_loss")
              if k in scalars]
    parts.append(" ".join(losses))
    if "lambda_mean" in scalars:
        parts.append(f"lambda {scalars['lambda_mean']:.3f} ({scalars['lambda_min']:.3f}-"
                     f"{scalars['lambda_max']:.3f})")
    return " | ".join(parts)


@jax.jit
def _poison(batch: PyTree) -> PyTree:
    """The batch with NaN target latents (debug_nan_step): loss and gradients become NaN."""
    return {**batch, "latent": batch["latent"] * jnp.nan}


def _mean_metrics(history: Sequence[Mapping[str, jax.Array]]) -> dict[str, float]:
    """Per-metric means over the steps since the last log (min/max for lambda's extremes)."""
    out = {}
    for key in history[0]:
        if key == "ok":
            continue
        vals = np.asarray([float(sharding.host_value(m[key])) for m in history])
        out[key] = float(vals.min() if key == "lambda_min" else vals.max() if key == "lambda_max"
                         else vals.mean())
    return out


def _write_samples(writer, workdir: str, step: int, out: Mapping[str, jax.Array], is_main: bool) -> None:
    """PNG grids (target | neighbour | with | without retrieval) and the same in TensorBoard."""
    if not is_main:
        return
    arrays = {k: sharding.host_value(v) for k, v in out.items()}
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
