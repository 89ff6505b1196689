"""The miniature's pre-training stages: tiny VAE, CLIP-style text encoder, teacher UNet, turbo student.

Each stage trains with `fit.fit` in `workdir/stages/<name>/`, resumes from its checkpoint, and on
completion writes `final.msgpack` (the params) and `done.json` (its config and statistics); a
finished stage is loaded instead of retrained. The towers are the same Flax modules as the real
SD ones (`models/`), only smaller, so every later step runs the production code.
"""

from __future__ import annotations

import json
import os
from typing import Any, Callable, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import serialization

from imagerag_jax import jsonfiles
from imagerag_jax.training import losses
from imagerag_jax.diffusion import schedule as schedule_lib
from imagerag_jax.miniature import data as data_lib
from imagerag_jax.miniature import fit as fit_lib
from imagerag_jax.models import clip_text
from imagerag_jax.models.clip_text import CLIPTextTransformer, Tokenizer
from imagerag_jax.models.unet import CROSS_DOWN, CROSS_UP, UNet
from imagerag_jax.models.vae import AutoencoderKL
from imagerag_jax.data import encoders, sources
from imagerag_jax.weights import random_pipeline

PyTree = Any
LATENT_CHANNELS = 4
PREDICTION_TYPES = ("epsilon", "v_prediction")  # what the miniature's UNets can be trained to predict


# ------------------------------------------------------------------------------------------------
# Modules from the config.
# ------------------------------------------------------------------------------------------------


def make_vae(cfg: Mapping[str, Any], scaling_factor: float = 1.0) -> AutoencoderKL:
    """The tiny AutoencoderKL (downsampling 2**(len(channels)-1))."""
    return AutoencoderKL(block_out_channels=tuple(cfg["channels"]), layers_per_block=cfg["layers"],
                         latent_channels=LATENT_CHANNELS, norm_num_groups=cfg["groups"],
                         scaling_factor=float(scaling_factor))


def make_text(cfg: Mapping[str, Any]) -> CLIPTextTransformer:
    """The tiny CLIP text transformer over the byte-level vocabulary."""
    v = random_pipeline.TINY_VOCAB_SIZE
    return CLIPTextTransformer(vocab_size=v, hidden_size=cfg["hidden"], intermediate_size=2 * cfg["hidden"],
                               num_hidden_layers=cfg["layers"], num_attention_heads=cfg["heads"],
                               eos_token_id=v - 1)


def make_unet(cfg: Mapping[str, Any], text_dim: int) -> UNet:
    """The tiny UNet (cross-attention in every block), eps or v prediction (cfg's prediction_type)."""
    n = len(cfg["channels"])
    return UNet(block_out_channels=tuple(cfg["channels"]), down_block_types=(CROSS_DOWN,) * n,
                up_block_types=(CROSS_UP,) * n, layers_per_block=cfg["layers"],
                num_attention_heads=tuple(c // cfg["head_dim"] for c in cfg["channels"]),
                cross_attention_dim=text_dim, norm_num_groups=cfg["groups"],
                prediction_type=cfg.get("prediction_type", "epsilon"))


class PixelTower(nn.Module):
    """The image side of the CLIP-style text training: an MLP on grayscale (or RGB) pixels."""

    dim: int
    hidden: int = 256
    colour: bool = False  # RGB input: the compositional captions name colours

    @nn.compact
    def __call__(self, images: jax.Array) -> jax.Array:
        x = images if self.colour else images.mean(-1)
        x = x.reshape(images.shape[0], -1)
        return nn.Dense(self.dim)(nn.gelu(nn.Dense(self.hidden)(x)))


class SideQueries(nn.Module):
    """A learned query per canvas side attending over the caption's token states.

    The text side of the per-half contrastive loss: it can only match a half if the token
    states (what the UNet cross-attends to) say which digit and colour stand on which side.
    """

    dim: int
    sides: int = 2

    @nn.compact
    def __call__(self, hidden: jax.Array, mask: jax.Array) -> jax.Array:
        d = hidden.shape[-1]
        queries = self.param("queries", nn.initializers.normal(1.0), (self.sides, d))
        keys = nn.Dense(d)(hidden)
        logits = jnp.einsum("sd,bld->bsl", queries, keys) / np.sqrt(d)
        weights = jax.nn.softmax(jnp.where(mask[:, None], logits, -1e9), axis=-1)
        return nn.Dense(self.dim)(jnp.einsum("bsl,bld->bsd", weights, hidden))  # [b, sides, dim]


# ------------------------------------------------------------------------------------------------
# Stage bookkeeping.
# ------------------------------------------------------------------------------------------------


class Stage:
    """A stage folder: done.json + final.msgpack once finished."""

    def __init__(self, workdir: str, name: str, cfg: Mapping[str, Any]):
        self.dir = os.path.join(workdir, "stages", name)
        self.name, self.cfg = name, json.loads(json.dumps(dict(cfg), default=list))

    @property
    def done(self) -> bool:
        """True when the stage finished (with this config)."""
        path = os.path.join(self.dir, "done.json")
        if not os.path.exists(path):
            return False
        with open(path) as f:
            saved = json.load(f)["config"]
        if saved != self.cfg:
            raise ValueError(f"stage {self.name!r} in {self.dir} was trained with another config "
                             f"({saved} != {self.cfg}); use a fresh --workdir or delete that folder")
        return True

    def load(self, template: PyTree) -> tuple[PyTree, dict[str, Any]]:
        """(final params, stats) of a finished stage."""
        with open(os.path.join(self.dir, "final.msgpack"), "rb") as f:
            params = serialization.from_bytes(template, f.read())
        with open(os.path.join(self.dir, "done.json")) as f:
            return params, json.load(f)["stats"]

    def finish(self, params: PyTree, stats: Mapping[str, Any]) -> None:
        """Write the final params, then done.json (the commit point)."""
        os.makedirs(self.dir, exist_ok=True)
        fit_lib.save_state(os.path.join(self.dir, "final.msgpack"), params)
        jsonfiles.write_atomic(os.path.join(self.dir, "done.json"),
                               {"config": self.cfg, "stats": dict(stats)}, sort_keys=False, indent=1)


def _init(module: nn.Module, seed: int, *args: Any) -> PyTree:
    return jax.jit(module.init)(jax.random.PRNGKey(seed), *args)["params"]


def _run(stage: Stage, init: PyTree | Callable[[], PyTree], loss_fn, batch_fn, *, seed: int,
         progress: bool, ema: float = 0.0) -> tuple[PyTree, dict[str, Any]]:
    """Load a finished stage or train it (resumable) and mark it finished.

    `init` is the starting params, or a function making them: a finished stage then reads its
    params into the shapes alone (`jax.eval_shape`), with no random init compiled or run.
    """
    if stage.done:
        return stage.load(jax.eval_shape(init) if callable(init) else init)
    if callable(init):
        init = init()
    c = stage.cfg
    tx = fit_lib.adam(c["lr"], warmup=c.get("warmup", 0), weight_decay=c.get("weight_decay", 0.0))
    params, stats = fit_lib.fit(stage.dir, init, loss_fn, batch_fn, c["steps"], tx, seed=seed,
                                ema_decay=ema, desc=stage.name, progress=progress)
    stage.finish(params, stats)
    return params, stats


# ------------------------------------------------------------------------------------------------
# 1. VAE.
# ------------------------------------------------------------------------------------------------


def train_vae(workdir: str, cfg: Mapping[str, Any], images: np.ndarray, *, seed: int,
              progress: bool = True) -> tuple[AutoencoderKL, PyTree, dict[str, Any]]:
    """L1 reconstruction + a small KL; the scaling factor is set to 1/std of the latents (as SD's)."""
    stage = Stage(workdir, "vae", cfg)
    vae = make_vae(cfg)
    init = lambda: _init(vae, seed, jnp.zeros((1, *images.shape[1:])))

    def loss_fn(params, batch, rng):
        x = batch["images"]
        mean, logvar = vae.apply({"params": params}, x, method=vae.encode)
        z = vae.sample_latent(mean, logvar, rng)
        rec = vae.apply({"params": params}, z, method=vae.decode)
        l1 = jnp.mean(jnp.abs(rec - x))
        kl = 0.5 * jnp.mean(jnp.square(mean) + jnp.exp(logvar) - 1.0 - logvar)
        return l1 + cfg["kl_weight"] * kl, {"l1": l1, "kl": kl}

    batch_fn = lambda step: {"images": images[data_lib.batch_indices(len(images), cfg["batch"], step, seed)]}
    params, stats = _run(stage, init, loss_fn, batch_fn, seed=seed, progress=progress)
    if "scaling_factor" not in stats:
        mean = encode_latents(vae.clone(scaling_factor=1.0), params, images)
        stats = {**stats, "scaling_factor": float(1.0 / np.std(mean))}
        stage.finish(params, stats)
    return make_vae(cfg, stats["scaling_factor"]), params, stats


_encode_jit = jax.jit(lambda vae, p, x: vae.apply({"params": p}, x, method=vae.encode_latents),
                      static_argnums=0)
_decode_jit = jax.jit(lambda vae, p, z: vae.apply({"params": p}, z, method=vae.decode),
                      static_argnums=0)


def encode_latents(vae: AutoencoderKL, params: PyTree, images: np.ndarray, *,
                   batch: int = 256) -> np.ndarray:
    """Images in [-1, 1] -> scaled mean latents (what the UNets see), `batch` images per call."""
    out = [np.asarray(_encode_jit(vae, params, jnp.asarray(images[i:i + batch])))
           for i in range(0, len(images), batch)]
    return np.concatenate(out)


def decode_latents(vae: AutoencoderKL, params: PyTree, latents: np.ndarray | jax.Array,
                   batch: int = 256) -> np.ndarray:
    """Scaled latents -> images in [-1, 1] (clipped), `batch` latents per call."""
    # Unscaled on the host: an exact division (XLA would multiply by the reciprocal), which keeps
    # the miniature's reported numbers those of its first runs.
    latents = vae.from_latent_space(np.asarray(latents))
    out = [np.asarray(_decode_jit(vae, params, jnp.asarray(latents[i:i + batch])))
           for i in range(0, len(latents), batch)]
    return np.clip(np.concatenate(out), -1.0, 1.0)


# ------------------------------------------------------------------------------------------------
# 2. Text encoder (CLIP-style contrastive training against a pixel tower).
# ------------------------------------------------------------------------------------------------


class CaptionTable:
    """Every (label, wording) caption tokenised once: batches index rows instead of tokenising.

    `captions[label]` lists the wordings of a label (default: the digits' templates).
    """

    def __init__(self, tokenizer: Tokenizer, captions: list[list[str]] | None = None):
        if captions is None:
            captions = [[sources.digit_caption(d, v) for v in range(len(sources.DIGIT_TEMPLATES))]
                        for d in range(10)]
        self.templates = len(captions[0])
        if any(len(c) != self.templates for c in captions):
            raise ValueError("every label needs the same number of caption wordings")
        self.captions = [c for per_label in captions for c in per_label]
        self.ids = np.asarray(tokenizer(self.captions), np.int32)
        self.empty_ids = np.asarray(tokenizer([""]), np.int32)

    def rows(self, labels: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        """A random wording of each label, as table rows."""
        return np.asarray(labels) * self.templates + rng.integers(0, self.templates, len(labels))


def _unit(x: jax.Array) -> jax.Array:
    return x / jnp.linalg.norm(x, axis=-1, keepdims=True)


def _symmetric_infonce(logits: jax.Array, same: jax.Array) -> jax.Array:
    """CLIP's symmetric InfoNCE; `same[i, j]` marks pairs with the same content (all positives)."""
    target = same / jnp.sum(same, axis=-1, keepdims=True)
    ce = lambda lg: jnp.mean(jax.nn.logsumexp(lg, -1) - jnp.sum(target * lg, -1))
    return 0.5 * (ce(logits) + ce(logits.T))


def train_text(workdir: str, cfg: Mapping[str, Any], table: CaptionTable, images: np.ndarray,
               labels: np.ndarray, *, seed: int, side_labels: np.ndarray | None = None,
               progress: bool = True) -> tuple[CLIPTextTransformer, PyTree, dict[str, Any]]:
    """CLIP's symmetric InfoNCE between the pooled caption and an image embedding.

    Why trained and not frozen random: retrieval ranks the database by the cosine of pooled text
    embeddings (paper Sec. 4), which is only meaningful for a contrastively trained encoder like
    SD's OpenCLIP; a random one ranks by wording ("a scribbled ...") rather than by digit.

    With `cfg["sides"]` > 0 and `side_labels` [N, S] (what stands on each of the S vertical
    strips of an image), `SideQueries` over the token states are also matched to each strip, at
    that weight. Why: the pooled loss trains only the pooled token, so the other token states,
    which the UNet cross-attends to, need not say what goes where; SD's OpenCLIP learned that
    from billions of captions, a 2-layer encoder on a few thousand needs the signal directly
    (with the pooled loss alone the teacher drew the right digits ~40% of the time, and 98% when
    it was given the four attributes as tokens).
    """
    stage = Stage(workdir, "text", cfg)
    text = make_text(cfg)
    colour = bool(cfg.get("colour", False))
    tower = PixelTower(cfg["hidden"], colour=colour)
    side_weight = float(cfg.get("sides", 0.0))
    if side_weight and side_labels is None:
        raise ValueError("text config 'sides' > 0 needs side_labels (what stands on each side)")
    sides = side_labels.shape[1] if side_weight else 0
    if sides:
        if images.shape[2] % sides:
            raise ValueError(f"image width {images.shape[2]} does not split into {sides} sides")
        strip = images.shape[2] // sides
        side_tower, queries = PixelTower(cfg["hidden"], colour=colour), SideQueries(cfg["hidden"], sides)

    def init() -> PyTree:
        params = {"text": _init(text, seed, jnp.asarray(table.ids[:1])),
                  "image": _init(tower, seed + 1, jnp.zeros((1, *images.shape[1:]))),
                  "logit_scale": jnp.asarray(np.log(1 / 0.07), jnp.float32)}
        if sides:
            hidden0, _ = text.apply({"params": params["text"]}, jnp.asarray(table.ids[:1]))
            params["side_image"] = _init(side_tower, seed + 2,
                                         jnp.zeros((1, images.shape[1], strip, images.shape[3])))
            params["side_text"] = _init(queries, seed + 3, hidden0, jnp.ones((1, hidden0.shape[1]), bool))
        return params

    ids_table = jnp.asarray(table.ids)
    scale = lambda params: jnp.exp(jnp.minimum(params["logit_scale"], np.log(100.0)))

    def loss_fn(params, batch, rng):
        del rng
        ids = ids_table[batch["rows"]]
        hidden, pooled = text.apply({"params": params["text"]}, ids)
        img = tower.apply({"params": params["image"]}, batch["images"])
        logits = scale(params) * _unit(img) @ _unit(pooled).T
        target = jnp.arange(len(logits))
        loss = _symmetric_infonce(logits, jnp.eye(len(logits)))
        stats = {"acc": jnp.mean(jnp.argmax(logits, -1) == target)}
        if sides:
            eos = clip_text.eos_positions(ids, text.eos_token_id)
            mask = jnp.arange(ids.shape[1])[None] <= eos[:, None]
            per_side = queries.apply({"params": params["side_text"]}, hidden, mask)
            side_acc = []
            for s in range(sides):
                strip_img = batch["images"][:, :, s * strip:(s + 1) * strip]
                h = side_tower.apply({"params": params["side_image"]}, strip_img)
                lg = scale(params) * _unit(h) @ _unit(per_side[:, s]).T
                same = (batch["sides"][:, s, None] == batch["sides"][None, :, s]).astype(jnp.float32)
                loss = loss + side_weight / sides * _symmetric_infonce(lg, same)
                side_acc.append(jnp.mean(same[target, jnp.argmax(lg, -1)]))
            stats["side_acc"] = jnp.mean(jnp.stack(side_acc))
        return loss, stats

    def batch_fn(step):
        idx = data_lib.batch_indices(len(images), cfg["batch"], step, seed)
        rows = table.rows(labels[idx], np.random.default_rng([seed, 7, step]))
        batch = {"images": images[idx], "rows": rows}
        if sides:
            batch["sides"] = np.asarray(side_labels)[idx]
        return batch

    params, stats = _run(stage, init, loss_fn, batch_fn, seed=seed, progress=progress)
    return text, params["text"], stats


_text_jit = jax.jit(lambda text, p, ids: text.apply({"params": p}, ids), static_argnums=0)


def embed_ids(text: CLIPTextTransformer, params: PyTree, ids: np.ndarray, batch: int = 256
              ) -> tuple[np.ndarray, np.ndarray]:
    """Token ids -> (hidden states, L2-normalised pooled), as `encoders.encode_text` has them."""
    hid, pooled = [], []
    for i in range(0, len(ids), batch):
        h, p = _text_jit(text, params, jnp.asarray(ids[i:i + batch]))
        hid.append(np.asarray(h))
        pooled.append(np.asarray(p))
    p = np.concatenate(pooled)
    return np.concatenate(hid), p / np.maximum(np.linalg.norm(p, axis=-1, keepdims=True), 1e-12)


# ------------------------------------------------------------------------------------------------
# 3. Teacher (eps or v prediction, caption dropout for classifier-free guidance).
# ------------------------------------------------------------------------------------------------


def _contexts(text: CLIPTextTransformer, text_params: PyTree):
    """ids -> frozen text-encoder hidden states, inside the training step.

    Encoding in the step (not a table of every caption's states) keeps the jitted step free of
    large constants: the compositional miniature has tens of thousands of captions.
    """
    return lambda ids: jax.lax.stop_gradient(text.apply({"params": text_params}, ids)[0])


def denoising_target(prediction_type: str, z0: jax.Array, eps: jax.Array, t: jax.Array,
                     sched: schedule_lib.NoiseSchedule) -> jax.Array:
    """What a UNet of this prediction type regresses at x_t = add_noise(z0, eps, t): eps or v."""
    if prediction_type not in PREDICTION_TYPES:
        raise ValueError(f"the miniature's UNet predicts {' or '.join(PREDICTION_TYPES)}, not {prediction_type!r}")
    return eps if prediction_type == "epsilon" else schedule_lib.v_target(z0, eps, t, sched)


def train_teacher(workdir: str, cfg: Mapping[str, Any], unet: UNet, latents: np.ndarray,
                  labels: np.ndarray, text: CLIPTextTransformer, text_params: PyTree,
                  table: CaptionTable, *, seed: int, progress: bool = True
                  ) -> tuple[PyTree, dict[str, Any]]:
    """The DDPM eps objective over all 1000 timesteps on the VAE latents; EMA params are the teacher."""
    stage = Stage(workdir, "teacher", cfg)
    sched = schedule_lib.scaled_linear_schedule()
    encode = _contexts(text, text_params)
    empty = encode(jnp.asarray(table.empty_ids))[0]
    init = lambda: _init(unet, seed, jnp.zeros((1, *latents.shape[1:])), jnp.zeros((1,), jnp.int32), empty[None])

    def loss_fn(params, batch, rng):
        z0 = batch["latents"]
        k_t, k_eps, k_drop = jax.random.split(rng, 3)
        b = z0.shape[0]
        t = jax.random.randint(k_t, (b,), 0, sched.num_train_timesteps)
        eps = jax.random.normal(k_eps, z0.shape)
        drop = jax.random.uniform(k_drop, (b, 1, 1)) < cfg["uncond_prob"]
        ctx = jnp.where(drop, empty[None], encode(batch["ids"]))
        pred = unet.apply({"params": params}, schedule_lib.add_noise(z0, eps, t, sched), t, ctx)
        return jnp.mean(jnp.square(pred - denoising_target(unet.prediction_type, z0, eps, t, sched))), {}

    def batch_fn(step):
        idx = data_lib.batch_indices(len(latents), cfg["batch"], step, seed)
        rows = table.rows(labels[idx], np.random.default_rng([seed, 11, step]))
        return {"latents": latents[idx], "ids": table.ids[rows]}

    return _run(stage, init, loss_fn, batch_fn, seed=seed, progress=progress, ema=cfg["ema"])


def teacher_spec(steps: int, guidance: float, prediction_type: str) -> encoders.TeacherSpec:
    """The teacher's sampler (DDIM + CFG), as the precompute jobs run it."""
    return encoders.TeacherSpec("ddim", int(steps), float(guidance), prediction_type)


# ------------------------------------------------------------------------------------------------
# 4. Turbo student (one step at t=999, distilled from the teacher without retrieval).
# ------------------------------------------------------------------------------------------------


def teacher_pairs(workdir: str, cfg: Mapping[str, Any], unet: UNet, teacher_params: PyTree,
                  text: CLIPTextTransformer, text_params: PyTree, table: CaptionTable,
                  latent_shape: tuple[int, ...], *, seed: int, labels: np.ndarray | None = None,
                  progress: bool = True) -> dict[str, np.ndarray]:
    """(noise, caption row, teacher x0) pairs, cached in stages/student/pairs.npz.

    Prompts are drawn from `labels` (e.g. a training split's, with its frequencies; default:
    every row of the table uniformly).
    """
    from tqdm.auto import tqdm  # pylint: disable=g-import-not-at-top

    path = os.path.join(workdir, "stages", "student", "pairs.npz")
    if os.path.exists(path):
        with np.load(path) as f:
            if len(f["rows"]) == cfg["pairs"]:
                return dict(f)
    rng = np.random.default_rng([seed, 13])
    if labels is None:
        rows = rng.integers(0, len(table.ids), cfg["pairs"])
    else:
        rows = table.rows(rng.choice(np.asarray(labels), cfg["pairs"]), rng)
    noise = rng.standard_normal((cfg["pairs"], *latent_shape)).astype(np.float32)
    spec = teacher_spec(cfg["teacher_steps"], cfg["guidance"], unet.prediction_type)
    b = 256
    out = []
    for i in tqdm(range(0, len(rows), b), desc="teacher pairs", disable=not progress, leave=False):
        r, n = rows[i:i + b], noise[i:i + b]
        z = encoders.teacher_latents(spec, unet, text, teacher_params, text_params,
                                     encoders.pad_rows(table.ids[r], b), table.empty_ids,
                                     encoders.pad_rows(n, b))
        out.append(np.asarray(z)[:len(r)])
    pairs = {"rows": rows, "noise": noise, "latents": np.concatenate(out)}
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with jsonfiles.atomic_write(path, "wb") as f:
        np.savez(f, **pairs)
    return pairs


def train_student(workdir: str, cfg: Mapping[str, Any], unet: UNet, teacher_params: PyTree,
                  pairs: Mapping[str, np.ndarray], text: CLIPTextTransformer, text_params: PyTree,
                  table: CaptionTable, *, seed: int, progress: bool = True
                  ) -> tuple[PyTree, dict[str, Any]]:
    """Initialised from the teacher; smooth-L1 (Eq. 8) between its one-step x0 and the teacher's."""
    stage = Stage(workdir, "student", {k: v for k, v in cfg.items()})
    sched = schedule_lib.scaled_linear_schedule()
    encode = _contexts(text, text_params)
    t_max = sched.num_train_timesteps - 1

    def loss_fn(params, batch, rng):
        del rng
        noise = batch["noise"]
        t = jnp.full((noise.shape[0],), t_max, jnp.int32)
        out = unet.apply({"params": params}, noise, t, encode(batch["ids"]))
        x0 = schedule_lib.predict_x0(out, noise, t, sched, unet.prediction_type)
        return losses.smooth_l1(x0, batch["latents"]), {}

    def batch_fn(step):
        idx = data_lib.batch_indices(len(pairs["rows"]), cfg["batch"], step, seed)
        return {"noise": pairs["noise"][idx], "latents": pairs["latents"][idx],
                "ids": table.ids[pairs["rows"][idx]]}

    return _run(stage, teacher_params, loss_fn, batch_fn, seed=seed, progress=progress)
