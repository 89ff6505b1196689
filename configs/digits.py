r"""The CPU miniature: the whole ImageRAGTurbo method on scikit-learn's bundled digits.

Every tower is trained here from scratch on two CPU cores: a tiny AutoencoderKL (16 px RGB ->
8x8x4 latents), a tiny CLIP text encoder (contrastive, so retrieval by pooled-text cosine means
something), a teacher UNet (eps, CFG), a one-step "turbo" student distilled from it without
retrieval, then ImageRAGTurbo (adapter + decoder LoRA + discriminator) with the production trainer
on TFRecords written by the production precompute jobs (teacher latents, k retrieved neighbours
from a disjoint database split). Results: workdir/results.json, results.md and PNG grids.

  python -m imagerag_jax.main run --config configs/digits.py --workdir /tmp/digits
  python -m imagerag_jax.main run --config configs/digits.py:quick --workdir /tmp/digits_quick

Arg string: ``quick`` (fewer steps, <= 10 min), ``smoke`` (a few steps per stage: checks the
plumbing in tests, the numbers mean nothing), ``k=N`` neighbours.
Every stage resumes from its checkpoint when the command is run again with the same workdir.
"""

import ml_collections

from imagerag_jax.config_args import load_sibling, parse_arg


def rag_jobs(k, sampling, total_steps):
    """(precompute, train) configs of a miniature's ImageRAGTurbo stage on its own towers.

    Unlocked, for the caller to set its sources; `run` fills in the weight and data paths.
    """
    pre = load_sibling(__file__, "precompute_digits").get_config(
        f"image_size=16,k={k},num_shards=2,teacher")
    pre.unlock()
    pre.db.limit, pre.max_source_items, pre.batch_size = 0, 0, 128
    pre.teacher.update(dict(sampler="ddim", steps=sampling["steps"], guidance=sampling["guidance"]))
    # tiny's modules and lr (the paper's 1e-5 is for batch 2048) on the miniature's own towers.
    train = load_sibling(__file__, "tiny").get_config(f"total_steps={total_steps},batch=32")
    train.unlock()
    train.random_preset = "none"  # the towers come from workdir/models
    train.shuffle_buffer = 512
    train.log_every, train.checkpoint_every, train.sample_every = 50, 250, 0
    return pre, train


def smoke_stages(config):
    """A miniature's pre-training stages at smoke size: a few small steps, one UNet level."""
    for name in ("vae", "text", "teacher", "student"):
        config[name] = {**config[name], "steps": 3, "batch": 8}
    # One UNet level halves the UNets' compile time, most of a smoke run; the miniature's code is
    # the same (the UNet's down- and upsampling have their own parity tests).
    config.teacher = {**config.teacher, "channels": config.teacher["channels"][:1]}
    config.student = {**config.student, "pairs": 16, "teacher_steps": 2}


def get_config(arg=None):
    """The digits miniature; see the module docstring for `arg`."""
    arg = parse_arg(arg, quick=False, smoke=False, k=2)
    q = arg.quick
    config = ml_collections.ConfigDict()
    config.seed = 0
    config.image_size = 16  # digits are 8x8: 16 px RGB keeps every stroke, 8x8x4 latents
    config.progress = True

    # Splits (data/sources.py DIGITS_SPLITS): 'train' (50%) trains every tower and is the prompt
    # set of ImageRAGTurbo; 'database' (40%) is the retrieval database and also trains the VAE,
    # text encoder and teacher (as SD's towers saw far more than the finetuning set); 'eval' (10%)
    # is held out from everything and gives the evaluation prompts and real reference images.
    config.vae = dict(channels=(16, 32), layers=1, groups=8, kl_weight=1e-4, lr=1e-3, warmup=50,
                      batch=32, steps=400 if q else 1500)
    config.text = dict(hidden=64, layers=2, heads=2, lr=1e-3, warmup=20, batch=128,
                       steps=150 if q else 400)
    config.teacher = dict(channels=(32, 64), layers=1, head_dim=16, groups=8, lr=1e-3, warmup=100,
                          batch=32, steps=2000 if q else 4000, uncond_prob=0.1,
                          ema=0.995 if q else 0.999)
    config.sampling = dict(steps=15 if q else 25, guidance=3.0)  # the teacher's DDIM + CFG
    config.student = dict(pairs=1024 if q else 4096, teacher_steps=15 if q else 25, guidance=3.0,
                          lr=5e-4, warmup=50, batch=32, steps=800 if q else 2500)

    # ImageRAGTurbo: the production build-db -> precompute -> train path. `run` fills in the
    # weight and data paths (workdir/models/{turbo,teacher}, workdir/rag/...).
    config.k = arg.k
    config.precompute, config.train = rag_jobs(arg.k, config.sampling, 400 if q else 1000)

    # Evaluation on the held-out prompts.
    config.eval = dict(num_prompts=100 if q else 0,  # 0: the whole eval split (180)
                       injection_w=0.8, grid_per_digit=4, latency_repeats=5 if q else 20)
    config.classifier = dict(epochs=0)  # 0: miniature.judge.DigitClassifier's default

    if arg.smoke:
        smoke_stages(config)
        config.sampling = dict(steps=2, guidance=3.0)
        config.precompute.teacher.steps = 2
        config.precompute.max_source_items, config.precompute.db.limit = 24, 40
        config.train.total_steps, config.train.global_batch_size = 2, 4
        config.train.checkpoint_every = 2
        config.eval = dict(num_prompts=20, injection_w=0.8, grid_per_digit=2, latency_repeats=1)
        config.classifier = dict(epochs=1)
        config.progress = False
    config.lock()
    return config
