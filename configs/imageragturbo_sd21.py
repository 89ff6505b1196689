r"""ImageRAGTurbo on SD-Turbo (paper Sec. 3.4 and 4.1): 1-step student, SD 2.1-base teacher.

Paper settings: global batch 2048, 20k iterations, AdamW with constant lr 1e-5 for the student
(H-space adapter + decoder LoRA) and for the discriminator heads, alpha 2.5, beta 1.0, one
student step (t = 999). Frozen: SD-Turbo UNet (student), SD 2.1-base UNet encoder (teacher /
discriminator backbone), latent LPIPS (E-LatentLPIPS, CC-BY-NC, not shipped). The data are the
TFRecords of the precompute job (synthetic teacher pairs with their noise + real pairs, k
retrieved neighbours each).

  python -m imagerag_jax.main train --config configs/imageragturbo_sd21.py \
      --workdir gs://BUCKET/imageragturbo_sd21 \
      --config.student_weights=/ckpt/sd-turbo --config.vae_weights=/ckpt/sd-turbo \
      --config.teacher_weights=/ckpt/stable-diffusion-2-1-base \
      --config.latent_lpips_weights=/ckpt/sd21_latest_vgg16_tuned.pth \
      --config.data_dir=gs://BUCKET/imagerag_tfrecords

Arg string ``configs/imageragturbo_sd21.py:random``: frozen towers whose path is unset become
random SD 2.1-sized modules and, without a data_dir, a small synthetic TFRecord set at SD shapes
is written to workdir/data (benchmarks and memory checks; the result means nothing).

Not given by the paper (our choices, flagged as such): LoRA rank/alpha (64/64), discriminator
head width (256), AdamW betas/eps/weight decay (PyTorch defaults), the mesh and remat policy.
"""

import ml_collections
from ml_collections import config_dict


def get_config(arg=None):
    """The paper's configuration; ``arg='random'`` uses random SD 2.1-sized frozen towers."""
    random = arg == "random"
    if arg not in (None, "", "random"):
        raise ValueError(f"unknown config arg {arg!r}; expected nothing or 'random'")
    config = ml_collections.ConfigDict()
    config.seed = 0

    config.student_weights = config_dict.placeholder(str)  # SD-Turbo (diffusers folder or unet/)
    config.teacher_weights = config_dict.placeholder(str)  # SD 2.1-base
    config.vae_weights = config_dict.placeholder(str)  # sample grids; None: student folder's vae/
    config.latent_lpips_weights = config_dict.placeholder(str)  # sd21_latest_vgg16_tuned.pth
    # Where a path is None: 'none' refuses to start (the paper needs the real towers).
    config.random_preset = "sd21" if random else "none"
    config.random_prediction_type = "epsilon"
    config.student_steps = 1

    config.data_dir = config_dict.placeholder(str)
    # The paper's mixture (Sec. 4.1), teacher pairs at CFG 7.5 and real pairs, instead of data_dir:
    # --config.data_mixture="(('gs://B/synthetic', 0.5), ('gs://B/real', 0.5))" (weights: ours).
    config.data_mixture = ()
    config.split = "train"
    config.shuffle_buffer = 4096
    config.synthetic = ml_collections.ConfigDict(dict(
        num_examples=64, num_shards=4, latent_shape=(64, 64, 4), embed_shape=(77, 1024),
        pooled_dim=1024, k=4, has_noise=True))
    config.global_batch_size = 2048
    config.total_steps = 20_000

    config.alpha = 2.5
    config.beta = 1.0
    config.lambda_mode = "mean"
    config.lpips_augment = True
    config.self_neighbour = False  # diagnostic: neighbour 0 = the example itself (train_step.py)
    config.prompt_dropout = 0.0  # not in the paper: zero the student's prompt with this probability
    adamw = dict(lr=1e-5, b1=0.9, b2=0.999, eps=1e-8, weight_decay=0.01, grad_clip_norm=0.0)
    # adapter_lr_multiplier: the adapter's lr = lr * this (train_step.make_optimizer).
    config.optimizer = ml_collections.ConfigDict(dict(adamw, adapter_lr_multiplier=1.0))
    config.disc_optimizer = ml_collections.ConfigDict(dict(adamw))

    config.adapter = ml_collections.ConfigDict(dict(num_heads=8, head_dim=0, attention_impl="auto",
                                                    positional="none"))
    config.lora = ml_collections.ConfigDict(dict(rank=64, alpha=64.0, pattern=""))
    config.disc = ml_collections.ConfigDict(dict(
        hidden=256, num_convs=2, time_dim=256, cond_dim=256, power_iterations=1))

    # 64 accelerators: batch over all of them, frozen towers sharded over groups of 8.
    config.mesh = (("data", -1), ("fsdp", 8))
    config.logical_rules = (("batch", ("data", "fsdp")),)
    config.min_shard_size = 2**18
    config.sharding_rules = ()
    config.remat = "full"
    config.compute_dtype = "bfloat16"
    config.frozen_param_dtype = "bfloat16"

    config.log_every = 50
    config.checkpoint_every = 1000
    config.keep_checkpoints = 3
    config.async_checkpoints = True
    config.sample_every = 1000
    config.num_samples = 8
    config.debug_nan_step = -1

    config.lock()
    return config
