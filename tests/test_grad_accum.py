"""Gradient accumulation: micro-batches give the big batch's update; a batch that does not split is refused.

The bar (issue 28): the tiny config, global batch 8, 3 steps; grad_accum_steps=4 trains the same
params as grad_accum_steps=1. The step is called directly (its own jit, the Trainer's towers and
initial state) with plain SGD for both players: AdamW divides every gradient element by its own
running magnitude, so it would hide a sum-instead-of-mean mistake (a constant factor) and would
turn float summation noise in elements whose gradient nearly cancels into percent-level param
differences (measured: 1.6e-2 on one LoRA leaf after 3 steps), while SGD's params differ exactly
as much as the accumulated gradients do.

Each of the 3 steps starts both variants from the same state (the big batch's trajectory): the
discriminator is piecewise linear (leaky ReLU, hinge), so two free-running trajectories that differ
by float summation order (1e-6) agree only until one activation near a kink takes the other side;
measured here, free-running steps 1 and 2 agree to 2.6e-6 and step 3 to 5.8e-3, all of it in one
discriminator head. Compared step by step, any error in the accumulation shows at its own size.
"""

from __future__ import annotations

import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from imagerag_jax import config_args, main
from imagerag_jax.data import synthetic
from imagerag_jax.errors import UserError
from imagerag_jax.training import losses
from imagerag_jax.training import step as step_lib
from imagerag_jax.training import trainer as trainer_lib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = os.path.join(ROOT, "configs", "tiny.py")
BATCH, STEPS = 8, 3


@pytest.fixture(scope="module")
def tiny():
    """(Trainer, schema, initial state with SGD optimiser states) of the tiny config at batch 8."""
    cfg = config_args.load_config(f"{TINY}:batch={BATCH}")
    trainer = trainer_lib.Trainer(cfg)
    schema = synthetic.synthetic_schema(cfg)
    state = trainer.init_state(schema)
    # Replicated on the mesh, as the step returns them: the second call then reuses the first
    # call's compilation instead of compiling again for other input shardings.
    opt = jax.device_put((SGD.init(step_lib.generator_params(state["params"])),
                          SGD.init(state["params"]["disc"])), trainer.replicated)
    state = {**state, "gen_opt_state": opt[0], "disc_opt_state": opt[1]}
    return trainer, schema, state


SGD = optax.inject_hyperparams(optax.sgd)(learning_rate=0.05)


def sgd_step(tiny, accum: int):
    """The jitted train step with SGD for both players at `accum` micro-batches of the batch."""
    trainer = tiny[0]
    return jax.jit(step_lib.make_train_step(trainer.setup, trainer.schedule, trainer.mesh, trainer.rules,
                                            SGD, SGD, grad_accum_steps=accum))


def relative_difference(a: dict, b: dict) -> tuple[float, str]:
    """The largest max|a - b| / max|a| over the leaves, and the leaf's path."""
    worst, where = 0.0, ""
    for (path, x), y in zip(jax.tree_util.tree_leaves_with_path(a), jax.tree.leaves(b), strict=True):
        x, y = np.asarray(x), np.asarray(y)
        rel = float(np.max(np.abs(x - y)) / max(float(np.max(np.abs(x))), 1e-30))
        worst, where = max((worst, where), (rel, jax.tree_util.keystr(path)))
    return worst, where


def test_four_micro_batches_train_the_params_of_one_batch(tiny):
    trainer, schema, state = tiny
    big_step, micro_step = sgd_step(tiny, 1), sgd_step(tiny, 4)
    leaves = jax.tree_util.tree_leaves_with_path(state["params"])
    assert {jax.tree_util.keystr(p)[:8] for p, _ in leaves} >= {"['adapte", "['lora']", "['disc']"}
    for i in range(STEPS):
        batch = trainer.shard_batch(trainer_lib.random_batch(schema, BATCH, seed=i))
        big, big_metrics = big_step(state, trainer.frozen, batch)
        micro, micro_metrics = micro_step(state, trainer.frozen, batch)
        worst, where = relative_difference(big["params"], micro["params"])
        print(f"step {i + 1}: max relative difference over the trainable leaves {worst:.3g} ({where})")
        assert worst <= 1e-4, (i + 1, worst, where)
        # The metrics are the big batch's: means over the micro-batches, lambda's extremes over all.
        assert float(big_metrics["ok"]) == float(micro_metrics["ok"]) == 1.0
        for key, value in big_metrics.items():
            assert np.isclose(float(micro_metrics[key]), float(value), rtol=1e-4, atol=1e-6), \
                (i + 1, key, float(micro_metrics[key]), float(value))
        state = big
    # The params moved (LoRA B and the adapter's output start at zero), so the check has teeth.
    assert np.any(np.asarray(state["params"]["adapter"]["to_out"]["kernel"]))


def test_micro_batches_take_every_row_once_and_stay_on_their_devices():
    # Micro-batch a holds rows a, a + count, ...: each device's block of rows splits into
    # `count` pieces of its own.
    rows = np.arange(16)
    split = np.asarray(step_lib.micro_batches(rows, 4))
    assert split.shape == (4, 4)
    assert sorted(split.ravel().tolist()) == rows.tolist()
    assert split[1].tolist() == [1, 5, 9, 13]
    # 2 devices hold rows 0-7 and 8-15: each micro-batch's first half comes from device 0.
    assert all(set(s[:2]) <= set(range(8)) and set(s[2:]) <= set(range(8, 16)) for s in split.tolist())
    # Per-example keys depend on the row alone, not on the micro-batch it is computed in.
    key = jax.random.PRNGKey(0)
    whole = np.asarray(step_lib.example_keys(key, rows))
    assert np.array_equal(np.asarray(step_lib.example_keys(key, split[1])), whole[split[1]])


class _SquaredDistance:
    """Stand-in perceptual network: per-example sum of squared differences."""

    def apply(self, variables, x, y):
        return jnp.sum(jnp.square(x - y), axis=(1, 2, 3))


def test_lpips_augmentation_keyed_per_example_does_not_depend_on_the_batch():
    # The tiny config has no LPIPS tower (beta 0): its per-example keying is checked here.
    x = jax.random.normal(jax.random.PRNGKey(1), (4, 8, 8, 4))
    y = x + jax.random.normal(jax.random.PRNGKey(2), x.shape)
    keys = step_lib.example_keys(jax.random.PRNGKey(3), jnp.arange(4))
    whole = losses.latent_lpips_loss(_SquaredDistance(), {}, x, y, keys)
    halves = [losses.latent_lpips_loss(_SquaredDistance(), {}, x[i::2], y[i::2], keys[i::2]) for i in (0, 1)]
    ones = [losses.latent_lpips_loss(_SquaredDistance(), {}, x[i:i + 1], y[i:i + 1], keys[i:i + 1])
            for i in range(4)]
    assert float(whole) == pytest.approx(float(np.mean(halves)), rel=1e-6)
    assert float(whole) == pytest.approx(float(np.mean(ones)), rel=1e-6)
    plain = losses.latent_lpips_loss(_SquaredDistance(), {}, x, y, keys, augment=False)
    assert float(whole) < float(plain)  # the augmentation (cutout) ran


def check(batch: int, accum: int, data: int, fsdp: int) -> None:
    cfg = config_args.load_config(f"{TINY}:batch={batch},accum={accum}")
    trainer_lib.check_config(cfg, jax.sharding.AbstractMesh((data, fsdp), ("data", "fsdp")))


def test_check_config_needs_micro_batches_that_split_over_the_devices():
    check(8, 4, 1, 1)
    check(16, 2, 2, 4)  # micro-batch 8 = 1 per device of a (2, 4) mesh
    check(64, 4, 2, 4)  # micro-batch 16 = 2 per device
    with pytest.raises(UserError, match=r"grad_accum_steps=4 micro-batches .* multiple of 4 x 8 = 32"):
        check(16, 4, 2, 4)  # micro-batch 4 over 8 devices
    with pytest.raises(UserError, match="grad_accum_steps=3"):
        check(8, 3, 1, 1)
    with pytest.raises(UserError, match="grad_accum_steps must be an integer >= 1"):
        check(8, 0, 1, 1)


def test_three_micro_batches_of_eight_are_refused_before_the_workdir(capsys, tmp_path):
    workdir = tmp_path / "run"
    status = main.run_cli(["main", "train", "--config", f"{TINY}:batch=8", "--config.grad_accum_steps=3",
                           "--workdir", str(workdir)])
    lines = capsys.readouterr().err.splitlines()
    assert status == 2 and len(lines) == 1, lines
    assert lines[0].startswith("error: global_batch_size 8 does not split into grad_accum_steps=3")
    assert not workdir.exists()


@pytest.mark.parametrize("layout, devices, accum", [("gpu8", 8, 32), ("v5p-64", 32, 4), ("gpu64", 64, 4)])
def test_sd21_layouts_make_the_papers_batch_on_their_devices(layout, devices, accum):
    cfg = config_args.load_config(os.path.join(ROOT, "configs", f"imageragturbo_sd21.py:{layout}"))
    assert (cfg.global_batch_size, cfg.grad_accum_steps, cfg.optimizer.lr) == (2048, accum, 1e-5)
    assert cfg.compute_dtype == cfg.frozen_param_dtype == "bfloat16" and cfg.remat == "full"
    mesh = jax.sharding.AbstractMesh((devices, 1), ("data", "fsdp"))
    trainer_lib.check_config(cfg, mesh)
    # Another global batch: the square-root rule for both AdamWs.
    half = config_args.load_config(os.path.join(ROOT, "configs", f"imageragturbo_sd21.py:{layout},batch=512"))
    assert half.optimizer.lr == half.disc_optimizer.lr == pytest.approx(0.5e-5)
    with pytest.raises(UserError, match="not 8 examples per device x 3 devices"):
        config_args.load_config(os.path.join(ROOT, "configs", "imageragturbo_sd21.py:gpu3"))
