r"""Every field of an ImageRAGTurbo training config (``training/trainer.py``) at the paper's values.

The training configs start from this one and set only what differs: ``configs/tiny.py`` (tiny
random towers on CPU), ``configs/imageragturbo_sd21.py`` (the paper's run) and, through
``configs/digits.py``'s ``rag_jobs``, the miniatures' ImageRAGTurbo stage. A new field is added
here once, with its default; the trainer reads every field as an attribute.

Paper settings (Sec. 3.4 and 4.1): global batch 2048, 20k iterations, AdamW with constant lr 1e-5
for the student (H-space adapter + decoder LoRA) and for the discriminator heads, alpha 2.5,
beta 1.0, one student step (t = 999). Not given by the paper (our choices): LoRA rank/alpha
(64/64), discriminator head width (256), AdamW betas/eps/weight decay (PyTorch defaults), the
mesh and remat policy.
"""

import ml_collections
from ml_collections import config_dict


def get_config(arg=None):
    """The full training config, locked; ``arg`` is refused (the configs built on it take args)."""
    if arg:
        raise ValueError(f"configs/base.py takes no arg (got {arg!r}); use a config built on it")
    config = ml_collections.ConfigDict()
    config.seed = 0  # the trainable modules' init, the batches' order, dropout and noise

    # Frozen towers, each `<tower>_weights`: a diffusers folder (or its unet/) or single file.
    config.student_weights = config_dict.placeholder(str)  # SD-Turbo
    config.teacher_weights = config_dict.placeholder(str)  # SD 2.1-base
    config.vae_weights = config_dict.placeholder(str)  # sample grids; None: student folder's vae/
    config.latent_lpips_weights = config_dict.placeholder(str)  # sd21_latest_vgg16_tuned.pth
    # Where a path is None: random towers of this preset, 'tiny' | 'sd21' (SD 2.1-sized) | 'none'
    # (refuses to start: the paper needs the real towers), seeded by `random_seed` (student, VAE,
    # text encoder) and `random_seed + 1` (teacher): the offline jobs' random pipeline of the same
    # `random_seed` encodes the data these towers train on.
    config.random_preset = "none"
    config.random_seed = 0
    config.random_prediction_type = "epsilon"  # loaded weights carry their own
    config.student_steps = 1  # T_n: 1 -> [999]; n -> schedule.student_timesteps(n)

    # Data: the TFRecords of the precompute job (synthetic teacher pairs with their noise + real
    # pairs, k retrieved neighbours each). None (and no mixture): `synthetic` examples are written
    # to workdir/data and trained on.
    config.data_dir = config_dict.placeholder(str)
    # Or several TFRecord sets, ((data_dir, weight), ...), sampled by weight (data/mixture.py); the
    # paper's mixture (Sec. 4.1), teacher pairs at CFG 7.5 and real pairs:
    # --config.data_mixture="(('gs://B/synthetic', 0.5), ('gs://B/real', 0.5))" (weights: ours).
    config.data_mixture = ()
    config.split = "train"
    config.shuffle_buffer = 4096
    # Where the step gets each neighbour's H-space: 'encode' (the frozen student encoder on the
    # neighbours' latents, in the step) or 'hspace' (gathered from the database's H-space cache,
    # `main build-cache`: no encoder on neighbours in the step). Records that store neighbours by
    # id, and 'hspace', read the retrieval database on every host: `database` is its path there
    # (None: the path the records were precomputed with). docs/design.md, "Record options".
    config.retrieved_branch = "encode"
    config.database = config_dict.placeholder(str)
    config.synthetic = ml_collections.ConfigDict(dict(
        num_examples=64, num_shards=4, latent_shape=(64, 64, 4), embed_shape=(77, 1024),
        pooled_dim=1024, k=4, has_noise=True))
    config.global_batch_size = 2048
    # The global batch is computed as this many equal micro-batches (a scan inside the one jitted
    # step, memory of one micro-batch) whose gradients are averaged before both optimisers step:
    # the update of the whole batch. Each micro-batch splits over the mesh's batch shards, so
    # global_batch_size must be a multiple of grad_accum_steps x batch shards.
    config.grad_accum_steps = 1
    config.total_steps = 20_000

    # Objective (Eq. 10) and optimisers (AdamW, constant lr, one per player).
    config.alpha = 2.5
    config.beta = 1.0
    config.lpips_augment = True
    config.self_neighbour = False  # diagnostic: neighbour 0 = the example itself (training/step.py)
    # retrieved (ImageRAGTurbo) | shuffled | no_adapter: the controls of training/step.ARMS.
    config.arm = "retrieved"
    config.prompt_dropout = 0.0  # not in the paper: zero the student's prompt with this probability
    adamw = dict(lr=1e-5, b1=0.9, b2=0.999, eps=1e-8, weight_decay=0.01, grad_clip_norm=0.0)
    # adapter_lr_multiplier: the adapter's lr = lr * this (training/step.make_optimizer).
    config.optimizer = ml_collections.ConfigDict(dict(adamw, adapter_lr_multiplier=1.0))
    config.disc_optimizer = ml_collections.ConfigDict(dict(adamw))

    # Trainable modules.
    # The paper's adapter (Sec. 4.4, 36M parameters at 1,280 channels): SD's transformer block
    # reading the neighbours' tokens, 20 heads of 64 as SD 2.1's mid block (models/adapter.py).
    config.adapter = ml_collections.ConfigDict(dict(block="transformer", num_heads=20, head_dim=0,
                                                    groups=32, attention_impl="auto",
                                                    positional="none"))
    config.lora = ml_collections.ConfigDict(dict(rank=64, alpha=64.0, pattern=""))  # "": decoder
    config.disc = ml_collections.ConfigDict(dict(
        hidden=256, num_convs=2, time_dim=256, cond_dim=256, power_iterations=1))

    # Parallelism and numerics. 64 accelerators: batch over all of them, frozen towers sharded over
    # groups of 8.
    config.mesh = (("data", -1), ("fsdp", 8))
    config.logical_rules = (("batch", ("data", "fsdp")),)
    config.min_shard_size = 2**18
    config.sharding_rules = ()  # ((regex on 'a/b/kernel', 'fsdp' | 'replicate'), ...)
    config.remat = "full"  # none | full | dots | dots_no_batch
    config.compute_dtype = "bfloat16"
    config.frozen_param_dtype = "bfloat16"

    # Loop, logs, checkpoints, samples.
    config.log_every = 50
    # MFU in the logs: the chip's dense bf16 peak in TFLOP/s; None: looked up from the device kind
    # (models/flops.py PEAK_TFLOPS: H100, H200, A100, TPU v4/v5e/v5p/v6e), no MFU where unknown.
    config.peak_tflops = config_dict.placeholder(float)
    config.checkpoint_every = 1000
    config.keep_checkpoints = 3
    config.async_checkpoints = True
    config.sample_every = 1000  # 0: never (the last step always gets one when > 0)
    config.num_samples = 8
    config.debug_nan_step = -1  # >= 0: NaN target latents at that step (tests the NaN stop)

    config.lock()
    return config
