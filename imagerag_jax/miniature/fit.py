"""A small resumable training loop for the miniature's pre-training stages (VAE, text, teacher, student).

The ImageRAGTurbo stage uses the real trainer (`train.py`); these stages only have to produce
frozen towers, so one jitted `loss(params, batch, rng)` + optax + a msgpack checkpoint is enough.
"""

from __future__ import annotations

import json
import os
import time
from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import serialization

from imagerag_jax import jsonfiles

PyTree = Any
LossFn = Callable[[PyTree, Mapping[str, jax.Array], jax.Array], tuple[jax.Array, dict[str, jax.Array]]]
BatchFn = Callable[[int], Mapping[str, np.ndarray]]

STATE_FILE = "state.msgpack"
LOG_FILE = "log.jsonl"


def adam(lr: float, warmup: int = 0, weight_decay: float = 0.0, clip: float = 1.0) -> optax.GradientTransformation:
    """AdamW with a linear warmup to a constant rate and global-norm clipping."""
    sched = optax.linear_schedule(0.0, lr, warmup) if warmup > 0 else lr
    parts = [optax.clip_by_global_norm(clip)] if clip > 0 else []
    return optax.chain(*parts, optax.adamw(sched, weight_decay=weight_decay))


def ema_update(ema: PyTree, params: PyTree, decay: float) -> PyTree:
    """Exponential moving average of the params (what diffusion models sample with)."""
    return jax.tree.map(lambda e, p: decay * e + (1.0 - decay) * p, ema, params)


def save_state(path: str, state: PyTree) -> None:
    """Atomic msgpack write: a crash mid-write never leaves a half checkpoint."""
    with jsonfiles.atomic_write(path, "wb") as f:
        f.write(serialization.to_bytes(jax.device_get(state)))


def fit(
    out_dir: str,
    params: PyTree,
    loss_fn: LossFn,
    batch_fn: BatchFn,
    steps: int,
    tx: optax.GradientTransformation,
    *,
    seed: int = 0,
    ema_decay: float = 0.0,
    checkpoint_every: int = 500,
    desc: str = "train",
    progress: bool = True,
) -> tuple[PyTree, dict[str, Any]]:
    """Train `steps` steps (resuming from out_dir/state.msgpack); returns (params or EMA, stats).

    `batch_fn(step)` must be a pure function of the step so that a resumed run sees the same
    batches. The step runs in one `jax.jit`; the state is not donated, because `params` may be
    arrays the caller still uses (the student starts from the teacher's).
    """
    from tqdm.auto import tqdm  # pylint: disable=g-import-not-at-top

    os.makedirs(out_dir, exist_ok=True)
    state = {"params": params, "opt": tx.init(params), "step": np.int64(0),
             "ema": params if ema_decay > 0 else {}, "first_bad": np.int64(-1)}
    path = os.path.join(out_dir, STATE_FILE)
    if os.path.exists(path):
        with open(path, "rb") as f:
            state = serialization.from_bytes(state, f.read())
    start = int(state["step"])

    @jax.jit
    def step_fn(state, batch, rng):
        (loss, aux), grads = jax.value_and_grad(loss_fn, has_aux=True)(state["params"], batch, rng)
        updates, opt = tx.update(grads, state["opt"], state["params"])
        new_params = optax.apply_updates(state["params"], updates)
        ema = ema_update(state["ema"], new_params, ema_decay) if ema_decay > 0 else state["ema"]
        # A non-finite step freezes the state (the last good one) and records where it happened;
        # the host checks that flag at its next log point, so no per-step device sync is needed.
        ok = jnp.isfinite(loss) & (state["first_bad"] < 0)
        new = {"params": new_params, "opt": opt, "step": state["step"] + 1, "ema": ema,
               "first_bad": state["first_bad"]}
        new = jax.tree.map(lambda a, b: jnp.where(ok, a, b), new, state)
        new["first_bad"] = jnp.where(ok | (state["first_bad"] >= 0), state["first_bad"], state["step"])
        return new, {"loss": loss, **aux}

    state = jax.tree.map(jnp.asarray, state)
    key = jax.random.PRNGKey(seed)
    history: list[dict[str, float]] = []
    t0 = time.perf_counter()
    bar = tqdm(total=steps, initial=start, desc=desc, disable=not progress, leave=False)
    with open(os.path.join(out_dir, LOG_FILE), "a") as log:
        for step in range(start, steps):
            state, metrics = step_fn(state, {k: jnp.asarray(v) for k, v in batch_fn(step).items()},
                                     jax.random.fold_in(key, step))
            if (step + 1) % 50 == 0 or step + 1 == steps:
                m = {k: float(v) for k, v in metrics.items()}
                if int(state["first_bad"]) >= 0:
                    raise FloatingPointError(
                        f"{desc}: non-finite loss at step {int(state['first_bad']) + 1}; the "
                        f"checkpoint in {out_dir} holds the last good state")
                history.append({"step": step + 1, **m})
                log.write(json.dumps(history[-1]) + "\n")
                bar.set_postfix(loss=f"{m['loss']:.4f}")
            if (step + 1) % checkpoint_every == 0 or step + 1 == steps:
                save_state(path, state)
            bar.update(1)
    bar.close()
    final = state["ema"] if ema_decay > 0 else state["params"]
    stats = {"steps": steps, "resumed_from": start, "seconds": round(time.perf_counter() - t0, 2),
             "final": history[-1] if history else None}
    return jax.device_get(final), stats
