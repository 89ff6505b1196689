"""The ImageRAGTurbo objective: the pure train step, its remat policies and the optimisers.

Latent adversarial distillation with retrieval (paper Sec. 3.3-3.4), as one pure function
``train_step(state, frozen, batch) -> (state, metrics)`` that ``train.Trainer`` jits over the mesh:

  x_t = noise (the example's teacher noise when it has one)      [t = 999; n-step: t ~ T_n]
  h, skips, temb = student.encode(x_t, t, text)                   frozen, no backward
  h_retr = student.encode(z0_retr, 0, text_retr)                  frozen, t = 0, k neighbours
                                            (or the batch's retrieved_hspace, data.neighbour_feed)
  lam = mean_j cos(pooled, pooled_retr_j)                         Eq. 5's lambda
  z_hat = x0(student.decode(h + lam * adapter(h, h_retr), ...; W + LoRA))
  s ~ U{0..999}, eps ~ N(0, I): z_s = add_noise(z0, eps, s), z_hat_s = add_noise(z_hat, eps, s)
  G: hinge_g(D(z_hat_s)) + alpha * smoothL1(z_hat, z0) + beta * latentLPIPS(z_hat, z0)
  D: hinge_d(D(z_s), D(stop_grad(z_hat_s))), spectral-norm stats updated
  both optimisers step; a non-finite loss or gradient keeps the old state and is reported.

Every random draw of an example (noise, t, s, eps, the LPIPS augmentation, prompt dropout) comes
from its own key, fold_in(step key, its row in the global batch), so ``grad_accum_steps``
micro-batches (a scan inside the step, gradients and metrics averaged, both players' gradients
at the step's starting params) make the update of the whole batch.

Trainable: the H-space adapter and the student decoder's LoRA (the generator, one AdamW) and the
discriminator heads (another AdamW). Frozen (passed in ``frozen``): the student UNet, the teacher
UNet's encoder (the discriminator backbone) and latent LPIPS.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any, Callable

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from imagerag_jax import sharding
from imagerag_jax.errors import UserError
from imagerag_jax.models import lora
from imagerag_jax.training import losses
from imagerag_jax.diffusion import sampling
from imagerag_jax.diffusion import schedule as schedule_lib
from imagerag_jax.models import adapter as adapter_lib
from imagerag_jax.models import discriminator as disc_lib
from imagerag_jax.models.unet import UNet

PyTree = Any
State = dict[str, Any]

REMAT_POLICIES: dict[str, Callable[..., Any] | None] = {
    "none": None,
    # Each remat segment (student decoder + adapter, the teacher encoder under the generator's
    # D term, latent LPIPS) keeps only its inputs; its forward is recomputed in the backward pass.
    "full": jax.checkpoint_policies.nothing_saveable,
    "dots": jax.checkpoint_policies.dots_saveable,
    "dots_no_batch": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}
# What the step reads from a batch (ids and scores are not used by the objective). A batch has
# either the neighbours' latents and prompt embeddings (the step encodes them) or their H-space
# (`retrieved_hspace`, gathered from the H-space cache by `data.neighbour_feed`).
BATCH_FIELDS = ("latent", "noise", "prompt_embeds", "pooled", "retrieved_latents",
                "retrieved_prompt_embeds", "retrieved_pooled", "retrieved_hspace")


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


def scale_subtree(key: str, factor: float) -> optax.GradientTransformation:
    """Multiplies the updates of one top-level entry of the params (e.g. 'adapter') by `factor`."""

    def update_fn(updates, state, params=None):
        del params
        return {**updates, key: jax.tree.map(lambda u: u * factor, updates[key])}, state

    return optax.GradientTransformation(lambda params: optax.EmptyState(), update_fn)


def make_optimizer(cfg: Mapping[str, Any]) -> optax.GradientTransformation:
    """AdamW with a constant learning rate (paper: 1e-5), optional global-norm clipping.

    The learning rate lives in the optimiser state (inject_hyperparams): the compiled step does
    not depend on it, and a resumed run takes the config's value (`with_learning_rates`).
    ``adapter_lr_multiplier`` (generator only; default 1) scales the adapter's AdamW steps, so the
    adapter, trained from a zero output, can learn faster than the LoRA it shares the optimiser with.
    """
    clip = float(cfg["grad_clip_norm"])
    multiplier = float(cfg.get("adapter_lr_multiplier", 1.0))
    if multiplier <= 0:
        raise UserError(f"optimizer.adapter_lr_multiplier must be > 0, got {multiplier}")

    def adamw(learning_rate):
        tx = optax.adamw(learning_rate, b1=cfg["b1"], b2=cfg["b2"], eps=cfg["eps"],
                         weight_decay=cfg["weight_decay"])
        if multiplier != 1.0:
            tx = optax.chain(tx, scale_subtree("adapter", multiplier))
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


def batch_fields(schema) -> tuple[str, ...]:
    """The batch keys the step reads, given a data schema (noise only when stored)."""
    present = set(schema.fields)
    return tuple(f for f in BATCH_FIELDS if f in present)


def generator_params(params: Mapping[str, Any]) -> dict[str, Any]:
    """The generator's trainable params (adapter + LoRA)."""
    return {"adapter": params["adapter"], "lora": params["lora"]}


# Training arms (config.arm): what the student is trained with. 'retrieved' is ImageRAGTurbo;
# the other two are controls that separate fine-tuning from retrieval (docs/findings.md).
ARMS = ("retrieved", "shuffled", "no_adapter")


def with_self_as_neighbour(batch: Mapping[str, jax.Array], latent: jax.Array) -> dict[str, jax.Array]:
    """The batch with neighbour 0 of each example replaced by the example itself."""
    out = dict(batch)
    for field, own in (("retrieved_latents", latent), ("retrieved_prompt_embeds", batch["prompt_embeds"]),
                       ("retrieved_pooled", batch["pooled"])):
        rest = batch[field][:, 1:]
        out[field] = jnp.concatenate([jnp.asarray(own, rest.dtype)[:, None], rest], axis=1)
    return out


# Metrics that are means over the batch's examples (equal micro-batches average into the batch's);
# edit_sq and h_sq are the mean squares the H-space edit ratio is made of.
MEAN_METRICS = ("g_loss", "g_adv", "g_distill", "g_lpips", "d_loss", "d_acc_real", "d_acc_fake",
                "d_logit_real", "d_logit_fake", "lambda_mean", "edit_sq", "h_sq")
# Purposes of the per-example keys: each random draw of an example has a stream of its own.
_NOISE, _STUDENT_T, _DISC_S, _EPS, _LPIPS, _DROP = range(6)


def example_keys(step_key: jax.Array, index: jax.Array) -> jax.Array:
    """One key per example: the step's key folded with the example's row in the global batch.

    Every draw of an example comes from its key alone, so it does not depend on which
    micro-batch (or device) the example is computed in: accumulating micro-batches reproduces
    the draws of one big batch.
    """
    return jax.vmap(jax.random.fold_in, in_axes=(None, 0))(step_key, index)


def _draw(keys: jax.Array, purpose: int, sample: Callable[[jax.Array], jax.Array]) -> jax.Array:
    """`sample(key)` for every example's key folded with `purpose`, stacked on a leading axis."""
    return jax.vmap(lambda k: sample(jax.random.fold_in(k, purpose)))(keys)


def micro_batches(tree: PyTree, count: int) -> PyTree:
    """Splits the leading (batch) axis of every leaf into `count` micro-batches, stacked first.

    Micro-batch a holds rows a, a + count, a + 2 count, ...: with the batch split over devices in
    contiguous blocks (of a multiple of `count` rows each), every device's block becomes `count`
    equal pieces of its own rows, so no example moves between devices.
    """
    def split(x: jax.Array) -> jax.Array:
        m = x.shape[0] // count
        return jnp.moveaxis(x.reshape(m, count, *x.shape[1:]), 1, 0)

    return jax.tree.map(split, tree)


def make_train_step(s: StepSetup, schedule: schedule_lib.NoiseSchedule, mesh: jax.sharding.Mesh,
                    rules: Sequence[tuple[str, Any]], gen_tx: optax.GradientTransformation,
                    disc_tx: optax.GradientTransformation, *, remat: str = "none",
                    lpips_augment: bool = True,
                    self_neighbour: bool = False,
                    arm: str = "retrieved",
                    prompt_dropout: float = 0.0,
                    grad_accum_steps: int = 1) -> Callable[[State, PyTree, PyTree], tuple[State, dict]]:
    """The pure train step `(state, frozen, batch) -> (state, metrics)` (see the module docstring).

    ``self_neighbour`` (a diagnostic, never the method): neighbour 0 of every example is replaced
    by the example itself (its latent, prompt embeddings and pooled embedding), an upper bound on
    what the adapter can take from a retrieved neighbour.
    ``arm``: ``'retrieved'`` (ImageRAGTurbo: each example's own neighbours); ``'shuffled'`` (the
    adapter reads the neighbours of the previous example of the (micro-)batch, rolled by one;
    lambda stays the example's own: only what is retrieved changes); ``'no_adapter'`` (no H-space
    edit: the same LoRA, losses and data without the adapter, the control the paper lacks; the
    adapter's params get zero gradients and the retrieved branch is not computed).
    ``prompt_dropout`` (not in the paper; 0 = the paper): each example's prompt embeddings are
    zeroed for the student with this probability, so the target can only come from the retrieved
    neighbours; lambda, the discriminator and the targets still see the prompt.
    ``grad_accum_steps``: the batch is computed as this many equal micro-batches in a
    `jax.lax.scan` (memory of one micro-batch) whose gradients and metrics are averaged; both
    optimisers then step once. Every random draw is keyed by the example's row in the batch and
    both players' gradients are taken at the step's starting params (the discriminator sees the
    generator's output before its update, as in one big batch), so the update is the big batch's
    up to float summation order.
    """
    if not 0.0 <= prompt_dropout <= 1.0:
        raise UserError(f"prompt_dropout must be in [0, 1], got {prompt_dropout}")
    if arm not in ARMS:
        raise UserError(f"unknown arm {arm!r}; choose one of {', '.join(ARMS)}")
    accum = int(grad_accum_steps)
    if accum < 1:
        raise UserError(f"grad_accum_steps must be >= 1, got {grad_accum_steps}")
    policy = REMAT_POLICIES[remat]
    maybe_remat = (lambda f: f) if policy is None else (lambda f: jax.checkpoint(f, policy=policy))
    ts = np.asarray(s.student_timesteps, np.int32)
    n_train = schedule.num_train_timesteps
    batch_c = lambda x: sharding.constrain(x, mesh, ("batch",), rules)

    @maybe_remat
    def generate(gen_params, student_p, h, skips, temb, h_retr, lam, x_t, t, context):
        """Adapter edit of the H-space, LoRA-merged decoder, x0 prediction (the trainable path)."""
        unet_p = lora.merge(student_p, gen_params["lora"], s.lora_alpha, s.lora_rank)
        if arm == "no_adapter":
            edited = h
        else:
            delta = s.adapter.apply({"params": gen_params["adapter"]}, h, h_retr)
            edited = adapter_lib.inject(h, delta, lam)
        out = sampling.unet_decode(s.student, unet_p, edited, skips, temb, context)
        z_hat = schedule_lib.predict_x0(out.astype(jnp.float32), x_t, t, schedule, s.prediction_type)
        # How far the adapter moves the H-space, relative to its size (0 at initialisation): the
        # two mean squares, so that micro-batches combine into the batch's ratio.
        edit_sq = jnp.mean(jnp.square((edited - h).astype(jnp.float32)))
        h_sq = jnp.mean(jnp.square(h.astype(jnp.float32)))
        return batch_c(z_hat), (edit_sq, h_sq)

    @maybe_remat
    def teacher_features(teacher_p, z_s, timesteps, context):
        """Frozen teacher-encoder stages of a noised latent (differentiable in z_s)."""
        return disc_lib.teacher_stages(s.teacher, teacher_p, z_s, timesteps, context)

    lpips_fn = None
    if s.lpips is not None and s.beta > 0:

        @maybe_remat
        def lpips_term(lpips_vars, pred, target, keys):
            return losses.latent_lpips_loss(s.lpips, lpips_vars, pred, target, keys, augment=lpips_augment)

        lpips_fn = lpips_term

    def micro_step(params: PyTree, frozen: PyTree, batch: PyTree, keys: jax.Array):
        """Both players' gradients and the metric terms of one (micro-)batch, at `params`.

        Returns (generator grads, discriminator grads, new spectral-norm stats, batch means,
        (lambda min, lambda max)); every mean is over this batch's examples.
        """
        keys = batch_c(keys)
        z0 = batch_c(batch["latent"].astype(jnp.float32))
        b = z0.shape[0]
        context, pooled = batch["prompt_embeds"], batch["pooled"]
        student_context = context
        if prompt_dropout > 0:
            drop = _draw(keys, _DROP, lambda k: jax.random.bernoulli(k, prompt_dropout))
            student_context = jnp.where(drop[:, None, None], jnp.zeros_like(context), context)
        # Synthetic pairs carry the teacher's initial noise: the student maps the same noise.
        noise = batch["noise"].astype(jnp.float32) if "noise" in batch else \
            _draw(keys, _NOISE, lambda k: jax.random.normal(k, z0.shape[1:], jnp.float32))
        noise = batch_c(noise)
        if len(ts) == 1:
            t = jnp.full((b,), int(ts[0]), jnp.int32)
            x_t = noise
        else:
            t = jnp.asarray(ts)[_draw(keys, _STUDENT_T, lambda k: jax.random.randint(k, (), 0, len(ts)))]
            # The first student step starts from pure noise (inference's convention); later
            # steps from the target noised to their timestep.
            x_t = jnp.where((t == n_train - 1)[:, None, None, None], noise,
                            schedule_lib.add_noise(z0, noise, t, schedule))
        student_p, teacher_p = frozen["student"], frozen["teacher"]

        # Frozen, outside the differentiated function: no backward through the student encoder.
        h, skips, temb = sampling.unet_encode(s.student, student_p, x_t, t, student_context)
        if self_neighbour:
            if "retrieved_hspace" in batch:
                raise UserError("self_neighbour replaces neighbour 0's latent, which a batch of "
                                "cached H-space does not carry; use retrieved_branch='encode'")
            batch = with_self_as_neighbour(batch, z0)
        lam = adapter_lib.retrieval_lambda(pooled, batch["retrieved_pooled"])
        if arm == "no_adapter":
            h_retr = None
        elif "retrieved_hspace" in batch:  # the encoder's output, computed once per DB entry
            h_retr = batch_c(batch["retrieved_hspace"].astype(jnp.float32))
        else:
            h_retr = sampling.retrieved_hspace(s.student, student_p, batch["retrieved_latents"],
                                               batch["retrieved_prompt_embeds"])
            if arm == "shuffled":
                h_retr = batch_c(jnp.roll(h_retr, 1, axis=0))

        # s ~ U{0..N-1} over all N training timesteps (paper Sec. 3.4), one per example.
        s_t = _draw(keys, _DISC_S, lambda k: disc_lib.sample_discriminator_timesteps(k, 1, n_train)[0])
        eps = batch_c(_draw(keys, _EPS, lambda k: jax.random.normal(k, z0.shape[1:], jnp.float32)))
        lpips_keys = _draw(keys, _LPIPS, lambda k: k)
        head_vars = {"params": params["disc"], "batch_stats": params["disc_stats"]}

        def g_loss_fn(gen_params):
            z_hat, sq = generate(gen_params, student_p, h, skips, temb, h_retr, lam, x_t, t,
                                 student_context)
            fake_s = schedule_lib.add_noise(z_hat, eps, s_t, schedule)
            stages = teacher_features(teacher_p, fake_s, s_t, context)
            fake_logits = s.heads.apply(head_vars, stages, s_t, pooled, update_stats=False)
            adv = losses.hinge_g_loss(fake_logits)
            distill = losses.smooth_l1(z_hat, z0)
            lp = lpips_fn(frozen["lpips"], z_hat, z0, lpips_keys) if lpips_fn is not None else jnp.zeros(())
            total = losses.generator_loss(adv, distill, lp, s.alpha, s.beta)
            aux = dict(adv=adv, distill=distill, lpips=lp, sq=sq, stages=stages)
            return total, aux

        (g_loss, g_aux), g_grads = jax.value_and_grad(g_loss_fn, has_aux=True)(generator_params(params))

        # Discriminator: real z_s through the teacher; the fake stages are reused from the
        # generator's pass (same frozen teacher, same input, the generator before its update),
        # detached. Real and fake go through the heads in one call, interleaved per example, so
        # both see the same spectral norms and the batch stays on its devices.
        real_s = schedule_lib.add_noise(z0, eps, s_t, schedule)
        real_stages = disc_lib.teacher_stages(s.teacher, teacher_p, real_s, s_t, context)
        fake_stages = jax.lax.stop_gradient(g_aux["stages"])
        pair = lambda r, f: jnp.stack([r, f], axis=1).reshape(2 * r.shape[0], *r.shape[1:])
        both = [pair(r, f) for r, f in zip(real_stages, fake_stages)]
        s2, pooled2 = jnp.repeat(s_t, 2), jnp.repeat(pooled, 2, axis=0)

        def d_loss_fn(disc_params):
            # The power iteration reads only the kernels and the stored vectors, never the
            # batch: every micro-batch computes the same new stats.
            logits, mutated = s.heads.apply(
                {"params": disc_params, "batch_stats": head_vars["batch_stats"]}, both, s2, pooled2,
                update_stats=True, mutable=["batch_stats"])
            logits = logits.reshape(b, 2, -1)
            real, fake = logits[:, 0], logits[:, 1]
            return losses.hinge_d_loss(real, fake), (real, fake, mutated["batch_stats"])

        (d_loss, (real_logits, fake_logits, new_stats)), d_grads = jax.value_and_grad(
            d_loss_fn, has_aux=True)(params["disc"])

        acc_real, acc_fake = losses.discriminator_accuracy(real_logits, fake_logits)
        edit_sq, h_sq = g_aux["sq"]
        values = (g_loss, g_aux["adv"], g_aux["distill"], g_aux["lpips"], d_loss, acc_real, acc_fake,
                  jnp.mean(real_logits), jnp.mean(fake_logits), jnp.mean(lam), edit_sq, h_sq)
        means = {k: jnp.asarray(v, jnp.float32) for k, v in zip(MEAN_METRICS, values, strict=True)}
        return g_grads, d_grads, new_stats, means, (jnp.min(lam), jnp.max(lam))

    def accumulated(params: PyTree, frozen: PyTree, batch: PyTree, step_key: jax.Array):
        """`micro_step` of the whole batch, as `accum` micro-batches averaged in a scan."""
        index = jnp.arange(batch["latent"].shape[0], dtype=jnp.int32)
        if accum == 1:
            return micro_step(params, frozen, batch, example_keys(step_key, index))
        micro_c = lambda x: sharding.constrain(x, mesh, (None, "batch"), rules)
        xs = jax.tree.map(micro_c, micro_batches((batch, index), accum))
        zeros = lambda tree: jax.tree.map(jnp.zeros_like, tree)

        def body(carry, x):
            g_sum, d_sum, _, m_sum, (lo, hi) = carry
            micro, idx = x
            g, d, stats, means, (mlo, mhi) = micro_step(params, frozen, micro, example_keys(step_key, idx))
            return (jax.tree.map(jnp.add, g_sum, g), jax.tree.map(jnp.add, d_sum, d), stats,
                    jax.tree.map(jnp.add, m_sum, means), (jnp.minimum(lo, mlo), jnp.maximum(hi, mhi))), None

        # Gradients have their params' structure and dtypes; the means are float32 scalars.
        init = (zeros(generator_params(params)), zeros(params["disc"]), params["disc_stats"],
                {k: jnp.zeros((), jnp.float32) for k in MEAN_METRICS},
                (jnp.asarray(jnp.inf, jnp.float32), jnp.asarray(-jnp.inf, jnp.float32)))
        (g_sum, d_sum, stats, m_sum, extremes), _ = jax.lax.scan(body, init, xs)
        mean = lambda tree: jax.tree.map(lambda v: v / accum, tree)
        return mean(g_sum), mean(d_sum), stats, mean(m_sum), extremes

    def train_step(state: State, frozen: PyTree, batch: PyTree) -> tuple[State, dict]:
        step = state["step"]
        params = state["params"]
        g_grads, d_grads, new_stats, means, (lam_min, lam_max) = accumulated(
            params, frozen, batch, jax.random.fold_in(state["rng"], step))

        gen_params = generator_params(params)
        g_updates, gen_opt = gen_tx.update(g_grads, state["gen_opt_state"], gen_params)
        new_gen = optax.apply_updates(gen_params, g_updates)
        d_updates, disc_opt = disc_tx.update(d_grads, state["disc_opt_state"], params["disc"])
        new_disc = optax.apply_updates(params["disc"], d_updates)
        new_state = {
            "params": {**new_gen, "disc": new_disc, "disc_stats": new_stats},
            "gen_opt_state": gen_opt,
            "disc_opt_state": disc_opt,
            "step": step + 1,
            "rng": state["rng"],
        }
        g_norm, d_norm = optax.tree.norm(g_grads), optax.tree.norm(d_grads)
        g_loss, d_loss = means["g_loss"], means["d_loss"]
        ok = jnp.isfinite(g_loss) & jnp.isfinite(d_loss) & jnp.isfinite(g_norm) & jnp.isfinite(d_norm)
        # A bad step changes nothing: the state stays the last good one (the loop then stops).
        new_state = jax.tree.map(lambda new, old: jnp.where(ok, new, old), new_state, state)
        edit_sq, h_sq = means.pop("edit_sq"), means.pop("h_sq")
        metrics = {
            **means, "lambda_min": lam_min, "lambda_max": lam_max,
            "hspace_edit_ratio": jnp.sqrt(edit_sq / (h_sq + 1e-12)),
            "g_grad_norm": g_norm, "d_grad_norm": d_norm,
            "g_lr": state["gen_opt_state"].hyperparams["learning_rate"],
            "d_lr": state["disc_opt_state"].hyperparams["learning_rate"],
            "ok": ok,
        }
        return new_state, metrics

    return train_step
