"""The ImageRAGTurbo objective: the pure train step, its remat policies and the optimisers.

Latent adversarial distillation with retrieval (paper Sec. 3.3-3.4), as one pure function
``train_step(state, frozen, batch) -> (state, metrics)`` that ``train.Trainer`` jits over the mesh:

  x_t = noise (the example's teacher noise when it has one)      [t = 999; n-step: t ~ T_n]
  h, skips, temb = student.encode(x_t, t, text)                   frozen, no backward
  h_retr = student.encode(z0_retr, 0, text_retr)                  frozen, t = 0, k neighbours
  lam = mean_j cos(pooled, pooled_retr_j)                         Eq. 5's lambda
  z_hat = x0(student.decode(h + lam * adapter(h, h_retr), ...; W + LoRA))
  s ~ U{0..999}, eps ~ N(0, I): z_s = add_noise(z0, eps, s), z_hat_s = add_noise(z_hat, eps, s)
  G: hinge_g(D(z_hat_s)) + alpha * smoothL1(z_hat, z0) + beta * latentLPIPS(z_hat, z0)
  D: hinge_d(D(z_s), D(stop_grad(z_hat_s))), spectral-norm stats updated
  both optimisers step; a non-finite loss or gradient keeps the old state and is reported.

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
# What the step reads from a batch (ids and scores are not used by the objective).
BATCH_FIELDS = ("latent", "noise", "prompt_embeds", "pooled", "retrieved_latents",
                "retrieved_prompt_embeds", "retrieved_pooled")


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


def with_self_as_neighbour(batch: Mapping[str, jax.Array], latent: jax.Array) -> dict[str, jax.Array]:
    """The batch with neighbour 0 of each example replaced by the example itself."""
    out = dict(batch)
    for field, own in (("retrieved_latents", latent), ("retrieved_prompt_embeds", batch["prompt_embeds"]),
                       ("retrieved_pooled", batch["pooled"])):
        rest = batch[field][:, 1:]
        out[field] = jnp.concatenate([jnp.asarray(own, rest.dtype)[:, None], rest], axis=1)
    return out


def make_train_step(s: StepSetup, schedule: schedule_lib.NoiseSchedule, mesh: jax.sharding.Mesh,
                    rules: Sequence[tuple[str, Any]], gen_tx: optax.GradientTransformation,
                    disc_tx: optax.GradientTransformation, *, remat: str = "none",
                    lpips_augment: bool = True,
                    self_neighbour: bool = False,
                    prompt_dropout: float = 0.0) -> Callable[[State, PyTree, PyTree], tuple[State, dict]]:
    """The pure train step `(state, frozen, batch) -> (state, metrics)` (see the module docstring).

    ``self_neighbour`` (a diagnostic, never the method): neighbour 0 of every example is replaced
    by the example itself (its latent, prompt embeddings and pooled embedding), an upper bound on
    what the adapter can take from a retrieved neighbour.
    ``prompt_dropout`` (not in the paper; 0 = the paper): each example's prompt embeddings are
    zeroed for the student with this probability, so the target can only come from the retrieved
    neighbours; lambda, the discriminator and the targets still see the prompt.
    """
    if not 0.0 <= prompt_dropout <= 1.0:
        raise UserError(f"prompt_dropout must be in [0, 1], got {prompt_dropout}")
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
        def lpips_term(lpips_vars, pred, target, rng):
            return losses.latent_lpips_loss(s.lpips, lpips_vars, pred, target, rng, augment=lpips_augment)

        lpips_fn = lpips_term

    def train_step(state: State, frozen: PyTree, batch: PyTree) -> tuple[State, dict]:
        step = state["step"]
        rng = jax.random.fold_in(state["rng"], step)
        k_noise, k_t, k_s, k_eps, k_lpips = jax.random.split(rng, 5)
        z0 = batch_c(batch["latent"].astype(jnp.float32))
        b = z0.shape[0]
        context, pooled = batch["prompt_embeds"], batch["pooled"]
        student_context = context
        if prompt_dropout > 0:
            # A key of its own: the other draws stay those of a step without dropout.
            drop = jax.random.bernoulli(jax.random.fold_in(rng, 0x0D20), prompt_dropout, (b,))
            student_context = jnp.where(drop[:, None, None], jnp.zeros_like(context), context)
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
        h, skips, temb = sampling.unet_encode(s.student, student_p, x_t, t, student_context)
        if self_neighbour:
            batch = with_self_as_neighbour(batch, z0)
        h_retr = sampling.retrieved_hspace(s.student, student_p, batch["retrieved_latents"],
                                           batch["retrieved_prompt_embeds"])
        lam = adapter_lib.retrieval_lambda(pooled, batch["retrieved_pooled"])

        s_t = disc_lib.sample_discriminator_timesteps(k_s, b, n_train)
        eps = batch_c(jax.random.normal(k_eps, z0.shape, jnp.float32))
        head_vars = {"params": state["params"]["disc"], "batch_stats": state["params"]["disc_stats"]}

        def g_loss_fn(gen_params):
            z_hat, ratio = generate(gen_params, student_p, h, skips, temb, h_retr, lam, x_t, t,
                                    student_context)
            fake_s = schedule_lib.add_noise(z_hat, eps, s_t, schedule)
            stages = teacher_features(teacher_p, fake_s, s_t, context)
            fake_logits = s.heads.apply(head_vars, stages, s_t, pooled, update_stats=False)
            adv = losses.hinge_g_loss(fake_logits)
            distill = losses.smooth_l1(z_hat, z0)
            lp = lpips_fn(frozen["lpips"], z_hat, z0, k_lpips) if lpips_fn is not None else jnp.zeros(())
            total = losses.generator_loss(adv, distill, lp, s.alpha, s.beta)
            aux = dict(adv=adv, distill=distill, lpips=lp, ratio=ratio, z_hat=z_hat, stages=stages)
            return total, aux

        gen_params = generator_params(state["params"])
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
