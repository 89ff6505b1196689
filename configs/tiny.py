r"""Tiny random-weight ImageRAGTurbo training: the whole trainer end to end on CPU in under a minute.

Random tiny student/teacher UNets and VAE (``weights/random_pipeline.py``, preset 'tiny'), no
latent LPIPS (beta 0), and a synthetic TFRecord set written to
``workdir/data`` (latent 8x8x4, embeds 77x32, pooled 32, k=2, with teacher noise). The images are
noise; this config checks the machinery (sharding, checkpoints, resume, metrics, samples).

  python -m imagerag_jax.main train --config configs/tiny.py --workdir /tmp/imagerag_tiny

Overrides: ``--config.total_steps=100``, or the arg string ``configs/tiny.py:total_steps=100``.
"""

import ml_collections
from ml_collections import config_dict

from imagerag_jax.config_args import parse_arg


def get_config(arg=None):
    """The tiny config; ``arg`` may set total_steps, batch and mesh_fsdp."""
    arg = parse_arg(arg, total_steps=30, batch=4, mesh_fsdp=1)
    config = ml_collections.ConfigDict()
    config.seed = 0

    # Frozen towers: None = random modules of `random_preset` (student seed, teacher seed + 1).
    config.student_weights = config_dict.placeholder(str)
    config.teacher_weights = config_dict.placeholder(str)
    config.vae_weights = config_dict.placeholder(str)
    config.latent_lpips_weights = config_dict.placeholder(str)
    config.random_preset = "tiny"  # tiny | sd21 (random SD 2.1-sized towers) | none (paths required)
    config.random_prediction_type = "epsilon"  # loaded weights carry their own
    config.student_steps = 1  # T_n: 1 -> [999]; n -> schedule.student_timesteps(n)

    # Data: None writes `synthetic` examples to workdir/data (tiny shapes) and trains on them.
    config.data_dir = config_dict.placeholder(str)
    # Or several TFRecord sets, ((data_dir, weight), ...), sampled by weight (data/mixture.py).
    config.data_mixture = ()
    config.split = "train"
    config.shuffle_buffer = 64
    config.synthetic = ml_collections.ConfigDict(dict(
        num_examples=32, num_shards=2, latent_shape=(8, 8, 4), embed_shape=(77, 32), pooled_dim=32,
        k=2, has_noise=True))
    config.global_batch_size = arg.batch
    config.total_steps = arg.total_steps

    # Objective (Eq. 10) and optimisers (AdamW, constant lr, one per player).
    config.alpha = 2.5
    # No latent LPIPS network exists for the tiny latent space; 1.0 with weights (see sd21).
    config.beta = 0.0
    config.lambda_mode = "mean"
    config.lpips_augment = True
    config.self_neighbour = False  # diagnostic: neighbour 0 = the example itself (train_step.py)
    config.prompt_dropout = 0.0  # not in the paper: zero the student's prompt with this probability
    config.optimizer = ml_collections.ConfigDict(dict(
        lr=1e-4, b1=0.9, b2=0.999, eps=1e-8, weight_decay=0.01, grad_clip_norm=0.0,
        adapter_lr_multiplier=1.0))  # the adapter's lr = lr * this (train_step.make_optimizer)
    config.disc_optimizer = ml_collections.ConfigDict(dict(
        lr=1e-4, b1=0.9, b2=0.999, eps=1e-8, weight_decay=0.01, grad_clip_norm=0.0))

    # Trainable modules.
    config.adapter = ml_collections.ConfigDict(dict(num_heads=4, head_dim=0, attention_impl="auto",
                                                    positional="none"))
    config.lora = ml_collections.ConfigDict(dict(rank=4, alpha=4.0, pattern=""))  # "" = decoder default
    config.disc = ml_collections.ConfigDict(dict(
        hidden=32, num_convs=2, time_dim=32, cond_dim=32, power_iterations=1))

    # Parallelism and numerics.
    config.mesh = (("data", -1), ("fsdp", arg.mesh_fsdp))
    config.logical_rules = (("batch", ("data", "fsdp")),)
    config.min_shard_size = 2**18
    config.sharding_rules = ()  # ((regex on 'a/b/kernel', 'fsdp' | 'replicate'), ...)
    config.remat = "none"  # none | full | dots | dots_no_batch
    config.compute_dtype = "float32"
    config.frozen_param_dtype = "float32"

    # Loop, logs, checkpoints, samples.
    config.log_every = 10
    config.checkpoint_every = 10
    config.keep_checkpoints = 3
    config.async_checkpoints = True
    config.sample_every = 30  # 0: never (the last step always gets one when > 0)
    config.num_samples = 4
    config.debug_nan_step = -1  # >= 0: NaN target latents at that step (tests the NaN stop)

    config.lock()
    return config
