"""The trainer on the tiny config: frozen weights, overfitting, exact resume, NaN stop, CLI, SIGTERM.

Compilation dominates on CPU, so the tests share a persistent XLA compilation cache (a session
temp dir, also handed to the CLI subprocesses): runs with the same config reuse one compiled step.
"""

from __future__ import annotations

import importlib.util
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from imagerag_jax.training import checkpoints, trainer as trainer_lib
from imagerag_jax.models import lora
from imagerag_jax.data import synthetic

ROOT = Path(__file__).resolve().parents[1]


def load_config(name: str = "tiny", arg: str | None = None):
    """configs/<name>.py's get_config(arg) (configs/ is not a package)."""
    spec = importlib.util.spec_from_file_location(f"config_{name}", ROOT / "configs" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config(arg)


@pytest.fixture(scope="session")
def compile_cache(tmp_path_factory):
    """A persistent compilation cache for this session (in-process and for subprocesses)."""
    try:  # private: lets the settings apply even if this process compiled something already
        from jax._src.compilation_cache import reset_cache
    except ImportError:  # pragma: no cover
        reset_cache = lambda: None

    path = str(tmp_path_factory.mktemp("jax_cache"))
    names = ("jax_compilation_cache_dir", "jax_persistent_cache_min_compile_time_secs",
             "jax_persistent_cache_min_entry_size_bytes")
    old = {n: getattr(jax.config, n) for n in names}
    for n, v in zip(names, (path, 0.0, -1)):
        jax.config.update(n, v)
    reset_cache()
    yield path
    for n, v in old.items():
        jax.config.update(n, v)
    reset_cache()


def quiet_config(**changes):
    """The tiny config without sample grids, with `changes` applied (dotted keys allowed)."""
    cfg = load_config()
    cfg.sample_every = 0
    for key, value in changes.items():
        node = cfg
        *parents, leaf = key.split(".")
        for p in parents:
            node = node[p]
        node[leaf] = value
    return cfg


def host_tree(tree):
    return jax.tree.map(lambda x: np.array(x), tree)


def assert_trees_equal(a, b, what: str) -> None:
    la, lb = jax.tree_util.tree_leaves_with_path(a), jax.tree_util.tree_leaves(b)
    assert len(la) == len(lb), what
    for (path, x), y in zip(la, lb):
        assert np.array_equal(np.asarray(x), np.asarray(y)), f"{what}: {jax.tree_util.keystr(path)} differs"


# ---------------------------------------------------------------------------------------------
# The step.
# ---------------------------------------------------------------------------------------------


def test_step_keeps_frozen_weights_and_overfits_one_batch(compile_cache):
    # Generator lr 3e-3 and a frozen discriminator (lr 0): the generator objective is then fixed,
    # so its loss must fall on a repeated batch (with a training D the adversarial term moves).
    cfg = quiet_config(**{"optimizer.lr": 3e-3, "disc_optimizer.lr": 0.0})
    trainer = trainer_lib.Trainer(cfg)
    schema = synthetic.synthetic_schema(cfg)
    state = trainer.init_state(schema)
    step, flops = trainer.compile_step(trainer.abstract_state(schema), schema, cfg.global_batch_size)
    assert flops > 0
    batch = trainer.shard_batch(trainer_lib.random_batch(schema, cfg.global_batch_size))
    frozen0 = host_tree(trainer.frozen)
    vae0 = host_tree(trainer.vae_params)
    params0 = host_tree(state["params"])
    # Zero-initialised adapter output and LoRA B: step 0 is SD-Turbo exactly.
    assert not np.any(params0["adapter"]["to_out"]["kernel"])
    g_loss, distill = [], []
    for _ in range(30):
        state, metrics = step(state, trainer.frozen, batch)
        assert bool(metrics["ok"])
        g_loss.append(float(metrics["g_loss"]))
        distill.append(float(metrics["g_distill"]))
    assert_trees_equal(trainer.frozen, frozen0, "frozen towers")
    assert_trees_equal(trainer.vae_params, vae0, "vae")
    params = host_tree(state["params"])
    assert np.any(params["adapter"]["to_out"]["kernel"]), "adapter did not train"
    lora_b = [x for path, x in lora.flatten(params["lora"]).items() if path.endswith("/b")]
    assert lora_b and any(np.any(b) for b in lora_b), "LoRA B did not train"
    assert not all(np.array_equal(a, b) for a, b in
                   zip(jax.tree.leaves(params["disc_stats"]), jax.tree.leaves(params0["disc_stats"]))), \
        "spectral-norm stats did not update"
    assert int(state["step"]) == 30
    first, last = np.mean(g_loss[:5]), np.mean(g_loss[-5:])
    assert last < 0.9 * first, f"generator loss did not fall: {g_loss}"
    assert distill[-1] < distill[0]
    check_neighbour_sensitivity(trainer, state, trainer_lib.random_batch(schema, cfg.global_batch_size))


def check_neighbour_sensitivity(trainer, state, host_batch) -> None:
    """The sample function's neighbour sensitivity against the one-step sampler called directly:
    mean |x0(neighbours) - x0(neighbours rolled by one over the batch)| over mean |x0 - plain
    student's x0| (frozen UNet: no LoRA, no adapter), lambda kept."""
    from imagerag_jax.diffusion import sampling
    from imagerag_jax.models import adapter as adapter_lib

    s, frozen, params = trainer.setup, trainer.frozen["student"], state["params"]
    b = {k: jax.numpy.asarray(v) for k, v in host_batch.items()}
    h = sampling.retrieved_hspace(s.student, frozen, b["retrieved_latents"], b["retrieved_prompt_embeds"])
    lam = adapter_lib.retrieval_lambda(b["pooled"], b["retrieved_pooled"])
    merged = lora.merge(frozen, params["lora"], s.lora_alpha, s.lora_rank)
    x0 = lambda p, h, l: np.asarray(sampling.imagerag_one_step(
        s.student, p, s.adapter, params["adapter"], b["noise"], b["prompt_embeds"], h, l,
        trainer.schedule, s.prediction_type, timestep=s.student_timesteps[0]), np.float64)
    ours = x0(merged, h, lam)
    order = np.r_[len(h) - 1, :len(h) - 1]  # example i gets example i-1's neighbours
    moved = np.mean(np.abs(ours - x0(merged, h[order], lam)))
    from_plain = np.mean(np.abs(ours - x0(frozen, h, 0.0 * lam)))
    images, scalars = trainer.sample_fn()(state, trainer.frozen, trainer.vae_params, trainer.shard_batch(host_batch))
    assert set(images) == {"target", "neighbour", "with_retrieval", "without_retrieval"}
    assert moved > 1e-6 * np.mean(np.abs(ours)) and from_plain > 0, (moved, from_plain)
    np.testing.assert_allclose(float(scalars["neighbour_sensitivity/shuffled_distance"]), moved, rtol=1e-3)
    np.testing.assert_allclose(float(scalars["neighbour_sensitivity/plain_distance"]), from_plain, rtol=1e-3)
    np.testing.assert_allclose(float(scalars["neighbour_sensitivity"]), moved / from_plain, rtol=2e-3)


def first_step_metrics(config, schema, batch) -> dict[str, float]:
    """The metrics of one step from a fresh state of `config` on `batch`."""
    trainer = trainer_lib.Trainer(config)
    state = trainer.init_state(schema)
    step, _ = trainer.compile_step(trainer.abstract_state(schema), schema, config.global_batch_size)
    _, metrics = step(state, trainer.frozen, trainer.shard_batch(batch))
    return {name: float(v) for name, v in metrics.items()}


def test_self_neighbour_diagnostic_is_the_step_on_a_batch_holding_the_example(compile_cache):
    from imagerag_jax.training import step

    cfg = quiet_config()
    schema = synthetic.synthetic_schema(cfg)
    host = trainer_lib.random_batch(schema, cfg.global_batch_size)
    swapped = step.with_self_as_neighbour(host, host["latent"])
    assert np.array_equal(swapped["retrieved_latents"][:, 0], host["latent"])
    assert np.array_equal(swapped["retrieved_prompt_embeds"][:, 0], host["prompt_embeds"])
    assert np.array_equal(swapped["retrieved_pooled"][:, 0], host["pooled"])
    if schema.k > 1:
        assert np.array_equal(swapped["retrieved_latents"][:, 1:], host["retrieved_latents"][:, 1:])
    assert not np.array_equal(host["retrieved_latents"][:, 0], host["latent"])

    diagnostic = first_step_metrics(quiet_config(self_neighbour=True), schema, host)
    assert diagnostic == first_step_metrics(cfg, schema, swapped)
    assert diagnostic["lambda_mean"] != first_step_metrics(cfg, schema, host)["lambda_mean"]


def train_steps(config, schema, batches) -> tuple[list[dict[str, float]], dict]:
    """Per-step metrics and the final params of `config` trained from a fresh state on `batches`."""
    trainer = trainer_lib.Trainer(config)
    state = trainer.init_state(schema)
    step, _ = trainer.compile_step(trainer.abstract_state(schema), schema, config.global_batch_size)
    history = []
    for batch in batches:
        state, metrics = step(state, trainer.frozen, trainer.shard_batch(batch))
        history.append({name: float(v) for name, v in metrics.items()})
    return history, host_tree(state["params"])


def test_shuffled_arm_is_the_step_on_neighbours_rolled_over_the_batch(compile_cache):
    # Lambda stays each example's own; only the neighbours the adapter reads move. Three steps, so
    # that the adapter's output is no longer zero and the neighbours matter.
    cfg = quiet_config(**{"optimizer.lr": 3e-3})
    schema = synthetic.synthetic_schema(cfg)
    batches = [trainer_lib.random_batch(schema, cfg.global_batch_size, seed=i) for i in range(3)]
    rolled = [{**b, **{f: np.roll(b[f], 1, axis=0) for f in ("retrieved_latents", "retrieved_prompt_embeds")}}
              for b in batches]
    shuffled, p_shuffled = train_steps(quiet_config(arm="shuffled", **{"optimizer.lr": 3e-3}), schema, batches)
    retrieved, p_retrieved = train_steps(cfg, schema, rolled)
    own, _ = train_steps(cfg, schema, batches)
    for a, b in zip(shuffled, retrieved):
        for name in ("g_loss", "g_distill", "d_loss", "lambda_mean", "hspace_edit_ratio"):
            np.testing.assert_allclose(a[name], b[name], rtol=1e-5, atol=1e-7, err_msg=name)
    for a, b in zip(jax.tree.leaves(p_shuffled), jax.tree.leaves(p_retrieved)):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)
    assert shuffled[0]["lambda_mean"] == own[0]["lambda_mean"]
    assert abs(shuffled[-1]["g_distill"] - own[-1]["g_distill"]) > 1e-7  # the neighbours did matter


def test_no_adapter_arm_trains_the_lora_alone(compile_cache):
    cfg = quiet_config(**{"optimizer.lr": 3e-3})
    schema = synthetic.synthetic_schema(cfg)
    batches = [trainer_lib.random_batch(schema, cfg.global_batch_size, seed=i) for i in range(3)]
    alone, p_alone = train_steps(quiet_config(arm="no_adapter", **{"optimizer.lr": 3e-3}), schema, batches)
    with_adapter, p_with = train_steps(cfg, schema, batches)
    # Step 1: a fresh adapter edits nothing, so both arms take the same step.
    for name in ("g_loss", "g_distill", "d_loss"):
        np.testing.assert_allclose(alone[0][name], with_adapter[0][name], rtol=1e-5, err_msg=name)
    assert all(m["hspace_edit_ratio"] == 0.0 for m in alone)
    assert not np.any(p_alone["adapter"]["to_out"]["kernel"]) and np.any(p_with["adapter"]["to_out"]["kernel"])
    lora_b = [x for path, x in lora.flatten(p_alone["lora"]).items() if path.endswith("/b")]
    assert any(np.any(b) for b in lora_b), "LoRA B did not train"
    with pytest.raises(Exception, match="unknown arm 'random'"):
        train_steps(quiet_config(arm="random"), schema, batches[:1])


def test_prompt_dropout_zeroes_only_the_students_prompt(compile_cache):
    cfg = quiet_config()
    schema = synthetic.synthetic_schema(cfg)
    host = trainer_lib.random_batch(schema, cfg.global_batch_size)
    blank = {**host, "prompt_embeds": np.zeros_like(host["prompt_embeds"])}

    dropped, plain, zeroed = (first_step_metrics(quiet_config(prompt_dropout=1.0), schema, host),
                              first_step_metrics(cfg, schema, host), first_step_metrics(cfg, schema, blank))
    # At step 0 (zero adapter output and LoRA B) the distillation term is the student's own
    # one-step output: with every prompt dropped it is the output of a zero prompt.
    assert np.isclose(dropped["g_distill"], zeroed["g_distill"], rtol=1e-6, atol=0)
    assert not np.isclose(dropped["g_distill"], plain["g_distill"], rtol=1e-3, atol=0)
    # Lambda and the discriminator's real side still read the prompt.
    assert dropped["lambda_mean"] == plain["lambda_mean"]
    assert np.isclose(dropped["d_logit_real"], plain["d_logit_real"], rtol=1e-6, atol=1e-7)
    assert not np.isclose(zeroed["d_logit_real"], plain["d_logit_real"], rtol=1e-3, atol=0)
    bad = trainer_lib.Trainer(quiet_config(prompt_dropout=1.5))
    with pytest.raises(ValueError, match="prompt_dropout must be in"):
        bad.jitted_step(bad.abstract_state(schema), schema)


# ---------------------------------------------------------------------------------------------
# The loop: resume, NaN.
# ---------------------------------------------------------------------------------------------


def test_resume_is_bitwise_exact(compile_cache, tmp_path):
    n = 4
    cfg = quiet_config(total_steps=2 * n, checkpoint_every=n, log_every=n)
    straight = trainer_lib.train_and_evaluate(cfg, str(tmp_path / "straight"))
    straight = host_tree(straight)
    # N steps, stop (as if killed after the step-N checkpoint), restart with 2N as the goal.
    first = trainer_lib.train_and_evaluate(quiet_config(total_steps=n, checkpoint_every=n, log_every=n),
                                     str(tmp_path / "resumed"))
    assert int(first["step"]) == n
    first = host_tree(first)
    resumed = host_tree(trainer_lib.train_and_evaluate(cfg, str(tmp_path / "resumed")))
    assert int(resumed["step"]) == 2 * n
    assert_trees_equal(resumed, straight, "resumed state")
    # The data position was restored too (same batches), and both runs consumed 2N batches.
    for run in ("straight", "resumed"):
        ck = checkpoints.Checkpointer(str(tmp_path / run / "checkpoints"))
        assert ck.latest_step() == 2 * n
        assert ck.restore_json(2 * n, "data_iter")["batches_consumed"] == 2 * n
        frozen = ck.restore_json(2 * n, "frozen")
        assert frozen["student"]["fingerprint"] and frozen["student"]["path"] is None
        ck.close()
    # The straight run's step-N checkpoint was written asynchronously while step N+1 ran on the
    # donated state: it must still hold step N's values.
    ck = checkpoints.Checkpointer(str(tmp_path / "straight" / "checkpoints"))
    trainer = trainer_lib.Trainer(cfg)
    at_n, _ = ck.restore(n, trainer.abstract_state(synthetic.synthetic_schema(cfg)))
    ck.close()
    assert_trees_equal(host_tree(at_n), first, "step-N checkpoint")


def test_mixture_of_teacher_and_real_sets_trains_and_resumes_exactly(compile_cache, tmp_path):
    from imagerag_jax.data import tfrecords

    base = quiet_config()
    teacher = synthetic.synthetic_schema(base)  # stores the teacher's noise
    real = tfrecords.Schema(teacher.latent_shape, teacher.embed_shape, teacher.pooled_dim, teacher.k)
    rng = np.random.default_rng(0)
    sets = []
    for name, schema, n in (("teacher", teacher, 24), ("real", real, 16)):
        out = str(tmp_path / name)
        tfrecords.write_examples(out, "train", (tfrecords.random_example(schema, rng, i) for i in range(n)),
                                 schema, 2, source="test")
        sets.append((out, 0.7 if name == "teacher" else 0.3))
    n = 2
    mixed = lambda steps: quiet_config(total_steps=steps, checkpoint_every=n, log_every=n,
                                       data_mixture=tuple(sets))
    straight = host_tree(trainer_lib.train_and_evaluate(mixed(2 * n), str(tmp_path / "straight")))
    trainer_lib.train_and_evaluate(mixed(n), str(tmp_path / "resumed"))
    resumed = host_tree(trainer_lib.train_and_evaluate(mixed(2 * n), str(tmp_path / "resumed")))
    assert_trees_equal(resumed, straight, "resumed mixture state")
    ck = checkpoints.Checkpointer(str(tmp_path / "resumed" / "checkpoints"))
    state = ck.restore_json(2 * n, "data_iter")
    ck.close()
    assert state["batches_consumed"] == 2 * n and state["weights"] == [0.7, 0.3]
    with pytest.raises(ValueError, match="weights"):  # the stream depends on the weights
        trainer_lib.train_and_evaluate(quiet_config(total_steps=3 * n, data_mixture=((sets[0][0], 0.5), sets[1])),
                                 str(tmp_path / "resumed"))
    with pytest.raises(ValueError, match="not both"):
        trainer_lib.train_and_evaluate(quiet_config(data_dir=sets[0][0], data_mixture=tuple(sets)),
                                 str(tmp_path / "both"))


def test_nan_stops_with_step_and_keeps_last_good_checkpoint(compile_cache, tmp_path):
    cfg = quiet_config(total_steps=10, checkpoint_every=2, log_every=2, debug_nan_step=5)
    with pytest.raises(FloatingPointError, match=r"train step 5\b.*Last good checkpoint: step 4"):
        trainer_lib.train_and_evaluate(cfg, str(tmp_path))
    ck = checkpoints.Checkpointer(str(tmp_path / "checkpoints"))
    assert ck.all_steps() == [2, 4], "nothing after the bad step may be saved"
    params = ck.manager.restore(4, args=ocp.args.Composite(params=ocp.args.StandardRestore()))["params"]
    assert all(np.all(np.isfinite(np.asarray(x))) for x in jax.tree.leaves(params))
    ck.close()


# ---------------------------------------------------------------------------------------------
# The command line: a complete tiny run, kill -9, SIGTERM, exact resume.
# ---------------------------------------------------------------------------------------------


def cli_env(cache_dir: str) -> dict[str, str]:
    return {**os.environ, "JAX_PLATFORMS": "cpu", "TF_CPP_MIN_LOG_LEVEL": "2",
            "JAX_COMPILATION_CACHE_DIR": cache_dir, "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
            "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": "-1"}


def wait_for(path: Path, proc: subprocess.Popen, marker: str, timeout: float = 240) -> str:
    """Polls the stderr file of `proc` until `marker` shows up (fails if the process ends first)."""
    deadline = time.time() + timeout
    text = ""
    while time.time() < deadline and proc.poll() is None:
        text = path.read_text()
        if marker in text:
            return text
        time.sleep(0.1)
    raise AssertionError(f"{marker!r} did not appear (rc={proc.poll()}):\n{text[-4000:]}")


def test_cli_end_to_end_kill9_sigterm_and_exact_resume(compile_cache, tmp_path):
    """A complete CLI run; resumed and killed with SIGKILL; resumed and stopped with SIGTERM;
    then finished in-process: bit for bit the state of one uninterrupted run."""
    workdir = tmp_path / "run"
    cmd = [sys.executable, "-m", "imagerag_jax.main", "train", "--config", str(ROOT / "configs/tiny.py"),
           "--workdir", str(workdir)]
    env = cli_env(compile_cache)
    res = subprocess.run(cmd + ["--config.total_steps=10", "--config.checkpoint_every=5",
                                "--config.log_every=5", "--config.sample_every=10",
                                "--config.peak_tflops=0.5"],
                         cwd=str(ROOT), env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-4000:]
    assert sorted(int(p.name) for p in (workdir / "checkpoints").iterdir() if p.name.isdigit()) == [5, 10]
    assert (workdir / "data" / "manifest.json").exists()
    assert list(workdir.glob("events.out.tfevents.*")), "no TensorBoard events"
    for name in ("", "_with_retrieval", "_without_retrieval", "_target", "_neighbour"):
        assert (workdir / "samples" / f"step_0000010{name}.png").exists(), name
    assert "g_loss=" in res.stderr and "tflops_per_device=" in res.stderr and " mfu=" in res.stderr
    assert "step 10 | neighbour sensitivity " in res.stderr, res.stderr[-3000:]
    line = next(l for l in res.stderr.splitlines() if "step 10/10 | " in l)
    assert " img/s | MFU " in line and "| g_loss " in line and " d_loss " in line and "| lambda " in line
    ck = checkpoints.Checkpointer(str(workdir / "checkpoints"))
    assert ck.restore_json(10, "config")["total_steps"] == 10
    ck.close()

    far = ["--config.total_steps=1000000", "--config.log_every=1", "--config.sample_every=0"]
    # kill -9 once a checkpoint past the first run's exists (possibly in the middle of a save).
    log = tmp_path / "kill.txt"
    with open(log, "w") as f:
        proc = subprocess.Popen(cmd + far + ["--config.checkpoint_every=4"], cwd=str(ROOT), env=env,
                                stdout=subprocess.DEVNULL, stderr=f)
        try:
            wait_for(log, proc, "checkpoint: saving step 16")
            proc.send_signal(signal.SIGKILL)
            assert proc.wait(timeout=60) == -signal.SIGKILL
        finally:
            proc.kill()
    assert "resumed from step 10" in log.read_text()
    ck = checkpoints.Checkpointer(str(workdir / "checkpoints"))
    killed_at = ck.latest_step()
    ck.close()
    assert killed_at >= 12 and killed_at % 4 == 0

    # Resume after the kill; SIGTERM once it trains: it saves where it is and exits with 0.
    log = tmp_path / "term.txt"
    with open(log, "w") as f:
        proc = subprocess.Popen(cmd + far + ["--config.checkpoint_every=100000"], cwd=str(ROOT),
                                env=env, stdout=subprocess.DEVNULL, stderr=f)
        try:
            wait_for(log, proc, f"] [{killed_at + 3}] ")
            proc.send_signal(signal.SIGTERM)
            rc = proc.wait(timeout=120)
        finally:
            proc.kill()
    text = log.read_text()
    assert f"resumed from step {killed_at}" in text
    assert rc == 0, text[-4000:]
    saved = int(text.split("preempted: saved step ")[1].split(",")[0])
    ck = checkpoints.Checkpointer(str(workdir / "checkpoints"))
    assert saved >= killed_at + 3 and ck.latest_step() == saved
    assert ck.restore_json(saved, "data_iter")["batches_consumed"] == saved
    ck.close()

    # Finish in-process and compare with one uninterrupted run: the same bits.
    goal = saved + 2
    cfg = quiet_config(total_steps=goal, checkpoint_every=1000, log_every=1000)
    resumed = host_tree(trainer_lib.train_and_evaluate(cfg, str(workdir)))
    straight = host_tree(trainer_lib.train_and_evaluate(cfg, str(tmp_path / "straight")))
    assert int(straight["step"]) == goal
    assert_trees_equal(resumed, straight, "interrupted three times vs straight")


def test_progress_line_names_step_speed_mfu_losses_and_lambda():
    scalars = {"examples_per_s": 123.456, "mfu": 0.4123, "g_loss": 1.5, "g_adv": -0.25,
               "g_distill": 1.75, "g_lpips": 0.0, "d_loss": 2.0, "lambda_mean": 0.9304,
               "lambda_min": 0.8, "lambda_max": 1.0, "step_time_s": 0.1}
    assert trainer_lib.progress_line(50, 1000, scalars) == (
        "step 50/1000 | 123 img/s | MFU 41.2% | g_loss 1.5 g_adv -0.25 g_distill 1.75 g_lpips 0 "
        "d_loss 2 | lambda 0.930 (0.800-1.000)")
    del scalars["mfu"]  # no known peak: no MFU
    assert "MFU" not in trainer_lib.progress_line(50, 1000, scalars)

