r"""Can the trainable path carry a neighbour? Fits it alone to smooth-L1 on a miniature's towers.

  python -m imagerag_jax.miniature.path_probe --config configs/compose.py:quick --workdir W \
      [--targets teacher|real] [--steps 500] [--variants lora,adapter,sincos:1e-2,oracle] \
      [--novel-examples 256]

Reads the finished towers of a compositional run in W (its `stages/`). Each example's neighbour
is the example itself: its H-space from the frozen student encoder at t = 0, as the trainer
computes a retrieved neighbour's. Variants (``name[:lr]``, lr default 1e-3): ``lora`` (the
decoder LoRA alone), ``adapter`` (the paper's adapter + LoRA), ``sincos`` (the adapter with its
sin-cos position code + LoRA), ``oracle`` (a per-cell MLP over [h, h_neighbour] + LoRA, which
sees the neighbour at the right cell). Each trains with Adam on smooth-L1 (no discriminator,
lambda 1) and reports on held-out pairs: the plain student, the variant with its own
neighbour, and the same model given another example's neighbour (what it takes from it).
Targets: ``teacher`` (the student's own distillation pairs) or ``real`` (real training canvases
with fresh noise, where the noise says nothing about the target). With novel digits
(`configs/compose.py:...,novel=D`) each variant is also scored on database canvases that hold
one, which no training example and no UNet tower has seen: smooth-L1, the judge's rate of drawn
novel digits and all four attributes right, with the canvas's own neighbour, another novel
canvas's, and no edit (the plain student with the fitted LoRA).
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import os
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from imagerag_jax import config_args
from imagerag_jax.models import lora
from imagerag_jax.training import losses
from imagerag_jax.diffusion import sampling
from imagerag_jax.diffusion import schedule as schedule_lib
from imagerag_jax.miniature import compose, compose_report, compose_run, stages
from imagerag_jax.models import adapter as adapter_lib
from imagerag_jax.models import layers

PyTree = Any
VARIANTS = ("lora", "adapter", "sincos", "oracle")
NOVEL_EXAMPLES = 256  # database canvases with a novel digit scored per variant (at most)


class CellMLP(nn.Module):
    """The oracle edit: an MLP per H-space cell over [LN(h), LN(h_neighbour)], zero at init."""

    hidden: int = 256

    @nn.compact
    def __call__(self, h: jax.Array, h_retr: jax.Array) -> jax.Array:
        x = jnp.concatenate([layers.layer_norm(name="norm_tgt")(h),
                             layers.layer_norm(name="norm_retr")(h_retr[:, 0])], axis=-1)
        x = nn.gelu(nn.Dense(self.hidden, name="hidden")(x))
        return nn.Dense(h.shape[-1], kernel_init=nn.initializers.zeros, name="out")(x)


def probe_data(config: Any, workdir: str, targets: str, limit: int, seed: int = 0,
               novel_examples: int = NOVEL_EXAMPLES) -> dict[str, Any]:
    """Towers, and per example: noise, target latent, text states, h, skips, temb, own H-space
    (and the first `novel_examples` database canvases with a novel digit, if the run has one)."""
    if not os.path.exists(os.path.join(workdir, "stages", "student", "done.json")):
        raise FileNotFoundError(f"{workdir} has no finished student: run the miniature there first")
    if targets not in ("teacher", "real"):
        raise ValueError(f"targets must be 'teacher' or 'real', got {targets!r}")
    towers = compose_run.train_towers(config, workdir)  # every stage is finished: loads them
    table = towers.table  # every composition's captions (compose_run.train_towers)
    if targets == "teacher":
        with np.load(os.path.join(workdir, "stages", "student", "pairs.npz")) as f:
            rows, latents, noise = f["rows"][:limit], f["latents"][:limit], f["noise"][:limit]
    else:
        train = compose_run.splits(config)["train"]
        rng = np.random.default_rng([seed, 3])
        rows = table.rows(train.compositions[:limit], rng)
        latents = np.asarray(stages.encode_latents(towers.vae, towers.vae_p,
                                                   compose.as_float(train.images[:limit])))
        noise = rng.standard_normal(latents.shape).astype(np.float32)
    data = dict(towers=towers, train=config.train, **_examples(towers, table.ids[rows], latents, noise))
    novel = tuple(config.splits.get("novel_digits", ()))
    if novel:
        db = compose_run.splits(config)["database"]
        pick = np.nonzero(db.classes == compose.CLASSES.index("novel"))[0][:novel_examples]
        rng = np.random.default_rng([seed, 5])
        ids = table.ids[table.rows(db.compositions[pick], rng)]
        lat = np.asarray(stages.encode_latents(towers.vae, towers.vae_p, compose.as_float(db.images[pick])))
        data["novel"] = dict(digits=novel, compositions=db.compositions[pick],
                             judge=compose_report.load_judge(workdir, int(config.data_seed),
                                                             int(config.image_size), int(config.classifier["epochs"])),
                             **_examples(towers, ids, lat, rng.standard_normal(lat.shape).astype(np.float32)))
    return data


# Towers and data go in as arguments, never as closure constants: XLA then compiles each program
# once for every probe of the same shapes (both targets, every novel scoring) instead of folding
# the weights into each one.
_encode = jax.jit(sampling.unet_encode, static_argnums=0)
EXAMPLE_KEYS = ("noise", "latents", "context", "h", "skips", "temb", "own")


def _examples(towers: Any, ids: np.ndarray, latents: np.ndarray, noise: np.ndarray) -> dict[str, Any]:
    """Noise, target latents, text states, h and skips at t = 999, the target's own H-space at t = 0."""
    context, _ = stages.embed_ids(towers.text, towers.text_p, ids)
    unet, params = towers.unet, towers.student_p
    full = lambda v: jnp.full((len(ids),), v, jnp.int32)
    h, skips, temb = _encode(unet, params, jnp.asarray(noise), full(999), jnp.asarray(context))
    own, _, _ = _encode(unet, params, jnp.asarray(latents), full(0), jnp.asarray(context))
    return dict(noise=jnp.asarray(noise), latents=jnp.asarray(latents), context=jnp.asarray(context),
                h=h, skips=skips, temb=temb, own=own)


@dataclasses.dataclass(frozen=True)
class _Path:
    """A variant's trainable path: what its programs close over (hashable, a static argument)."""

    variant: str
    edit: nn.Module
    unet: nn.Module
    lora_alpha: float
    lora_rank: int


def _x0(path: _Path, p: PyTree, frozen: PyTree, d: dict[str, Any], idx: jax.Array, nbr: jax.Array,
        edited: bool = True) -> jax.Array:
    """The one-step x0 of examples `idx` given neighbours `nbr`'s own H-space (edited: the edit on)."""
    h = d["h"][idx]
    if path.variant != "lora" and edited:
        h = h + path.edit.apply({"params": p["edit"]}, h, d["own"][nbr][:, None])
    unet = path.unet
    unet_p = lora.merge(frozen, p["lora"], path.lora_alpha, path.lora_rank)
    out = sampling.unet_decode(unet, unet_p, h, [s[idx] for s in d["skips"]], d["temb"][idx],
                               d["context"][idx])
    t = jnp.full((idx.shape[0],), 999, jnp.int32)
    return schedule_lib.predict_x0(out, d["noise"][idx], t, schedule_lib.scaled_linear_schedule(),
                                   unet.prediction_type)


def _loss(path: _Path, p: PyTree, frozen: PyTree, d: dict[str, Any], idx: jax.Array,
          nbr: jax.Array) -> jax.Array:
    return losses.smooth_l1(_x0(path, p, frozen, d, idx, nbr), d["latents"][idx])


# Module-level programs with the path and the learning rate static: every probe of the same
# variant and shapes in a process (both targets, the novel scoring) reuses one compilation.
_x0_jit = jax.jit(_x0, static_argnums=(0, 6))
_loss_jit = jax.jit(_loss, static_argnums=0)


@functools.partial(jax.jit, static_argnums=(0, 1))
def _adam_step(path: _Path, lr: float, p: PyTree, opt: PyTree, frozen: PyTree, d: dict[str, Any],
               idx: jax.Array) -> tuple[PyTree, PyTree, jax.Array]:
    loss, grads = jax.value_and_grad(_loss, argnums=1)(path, p, frozen, d, idx, idx)
    updates, opt = optax.adam(lr).update(grads, opt, p)
    return optax.apply_updates(p, updates), opt, loss


def fit_variant(data: dict[str, Any], variant: str, lr: float, steps: int, *, batch: int = 64,
                held_out: int = 256, seed: int = 0) -> dict[str, Any]:
    """Train one variant; smooth-L1 on the held-out examples (plain student, own, other neighbour).

    The adapter and the LoRA are the run's (`config.train.adapter`, `config.train.lora`).
    """
    if variant not in VARIANTS:
        raise ValueError(f"unknown variant {variant!r}; choose from {', '.join(VARIANTS)}")
    n = int(data["noise"].shape[0])
    held_out = min(held_out, n // 2)
    train_idx, eval_idx = np.arange(n - held_out), jnp.arange(n - held_out, n)
    towers = data["towers"]
    student_p = towers.student_p
    train = data["train"]
    edit = CellMLP() if variant == "oracle" else adapter_lib.from_config(
        {**dict(train.adapter), "positional": "sincos" if variant == "sincos" else "none"})
    path = _Path(variant, edit, towers.unet, float(train.lora.alpha), int(train.lora.rank))
    key = jax.random.PRNGKey(seed)
    params = {"edit": edit.init(key, data["h"][:1], data["own"][:1, None])["params"],
              "lora": lora.init_lora(key, student_p, train.lora.pattern or lora.DEFAULT_DECODER_PATTERN,
                                     path.lora_rank)}
    examples = {k: data[k] for k in EXAMPLE_KEYS}
    plain = float(_loss_jit(path, params, student_p, examples, eval_idx, eval_idx))  # edit, LoRA start at 0
    opt, rng = optax.adam(lr).init(params), np.random.default_rng([seed, 7])
    for _ in range(steps):
        params, opt, _ = _adam_step(path, lr, params, opt, student_p, examples,
                                    jnp.asarray(rng.choice(train_idx, batch)))
    out = {"plain": plain, "own": float(_loss_jit(path, params, student_p, examples, eval_idx, eval_idx)),
           "other": float(_loss_jit(path, params, student_p, examples, eval_idx, jnp.roll(eval_idx, 1)))}
    if "novel" in data:
        nov = data["novel"]
        nov_examples = {k: nov[k] for k in EXAMPLE_KEYS}
        idx = jnp.arange(nov["noise"].shape[0])
        for name, nbr, edited in (("own", idx, True), ("other", jnp.roll(idx, 1), True), ("no_edit", idx, False)):
            x0 = _x0_jit(path, params, student_p, nov_examples, idx, nbr, edited)
            pred = compose.judge(nov["judge"], stages.decode_latents(towers.vae, towers.vae_p, x0))
            scores = compose.score(pred, nov["compositions"], np.zeros(len(idx), np.int64), nov["digits"])
            out[f"novel_{name}"] = {"smooth_l1": float(losses.smooth_l1(x0, nov["latents"])),
                                    "novel_digit": scores["novel_digit_accuracy"],
                                    "all_correct": scores["all_correct"]}
    return out


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    """The command line above; prints one JSON line per variant and returns them."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", required=True)
    parser.add_argument("--workdir", required=True)
    parser.add_argument("--targets", default="teacher", choices=("teacher", "real"))
    parser.add_argument("--steps", type=int, default=500)
    parser.add_argument("--limit", type=int, default=1024, help="examples (the last 256 held out)")
    parser.add_argument("--variants", default="lora,adapter,sincos:1e-2,oracle")
    parser.add_argument("--novel-examples", type=int, default=NOVEL_EXAMPLES,
                        help="database canvases with a novel digit to score (at most)")
    args = parser.parse_args(argv)
    if args.novel_examples < 1:  # a negative slice bound would silently drop canvases instead
        parser.error(f"--novel-examples must be at least 1, got {args.novel_examples}")
    data = probe_data(config_args.load_config(args.config), args.workdir, args.targets, args.limit,
                      novel_examples=args.novel_examples)
    out = []
    for spec in args.variants.split(","):
        name, _, lr = spec.partition(":")
        row = {"variant": name, "lr": float(lr or 1e-3), "targets": args.targets, "steps": args.steps,
               **fit_variant(data, name, float(lr or 1e-3), args.steps)}
        print(json.dumps(row), flush=True)
        out.append(row)
    return out


if __name__ == "__main__":
    main()
