r"""Tiny random-weight ImageRAGTurbo training: the whole trainer end to end on CPU in under a minute.

Random tiny student/teacher UNets and VAE (``weights/random_pipeline.py``, preset 'tiny'), no
latent LPIPS (beta 0), and a synthetic TFRecord set written to
``workdir/data`` (latent 8x8x4, embeds 77x32, pooled 32, k=2, with teacher noise). The images are
noise; this config checks the machinery (sharding, checkpoints, resume, metrics, samples).
Every field not set here is ``configs/base.py``'s.

  python -m imagerag_jax.main train --config configs/tiny.py --workdir /tmp/imagerag_tiny

Overrides: ``--config.total_steps=100``, or the arg string ``configs/tiny.py:total_steps=100``.
"""

from imagerag_jax.config_args import load_sibling, parse_arg


def get_config(arg=None):
    """The tiny config; ``arg`` may set total_steps, batch, accum (grad_accum_steps) and mesh_fsdp."""
    arg = parse_arg(arg, total_steps=30, batch=4, accum=1, mesh_fsdp=1)
    config = load_sibling(__file__, "base").get_config()

    config.random_preset = "tiny"

    config.shuffle_buffer = 64
    config.synthetic.update(dict(num_examples=32, num_shards=2, latent_shape=(8, 8, 4),
                                 embed_shape=(77, 32), pooled_dim=32, k=2))
    config.global_batch_size = arg.batch
    config.grad_accum_steps = arg.accum
    config.total_steps = arg.total_steps

    # No latent LPIPS network exists for the tiny latent space; 1.0 with weights (see base).
    config.beta = 0.0
    config.optimizer.lr = config.disc_optimizer.lr = 1e-4

    config.adapter.block = "attention"  # the cross-attention adapter (models/adapter.py); the miniatures' too
    config.adapter.num_heads = 4
    config.lora.update(dict(rank=4, alpha=4.0))
    config.disc.update(dict(hidden=32, time_dim=32, cond_dim=32))

    config.mesh = (("data", -1), ("fsdp", arg.mesh_fsdp))
    config.remat = "none"
    config.compute_dtype = config.frozen_param_dtype = "float32"

    config.log_every = 10
    config.checkpoint_every = 10
    config.sample_every = 30
    config.num_samples = 4
    return config
