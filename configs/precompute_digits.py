r"""Offline jobs on scikit-learn's bundled digits: retrieval DB + index, then training TFRecords.

With no weights configured, the tiny random pipeline (``weights/random_pipeline.py``) encodes
16 px digits to 8x8x4 latents with 77x32 prompt embeddings: the shapes of ``configs/tiny.py``'s
synthetic data, so the output can be trained on (the numbers mean nothing). Set
``encoder_weights`` (a diffusers SD 2.x folder or single file) for real encodings.

  python -m imagerag_jax.main build-db   --config configs/precompute_digits.py --workdir /tmp/digits
  python -m imagerag_jax.main precompute --config configs/precompute_digits.py --workdir /tmp/digits

Arg string (comma-separated; bare names are booleans): ``quick`` (small limits and 2 teacher
steps, a smoke run in seconds), ``teacher`` (synthetic latents from the teacher instead of VAE
latents of the digits), ``image_size=N``, ``k=N``, ``num_shards=N``,
e.g. ``configs/precompute_digits.py:quick,teacher``.
"""

import ml_collections
from ml_collections import config_dict

from imagerag_jax.config_args import parse_arg


def get_config(arg=None):
    """The digits precompute config; see the module docstring for `arg`."""
    arg = parse_arg(arg, quick=False, teacher=False, image_size=16, k=2, num_shards=4)
    config = ml_collections.ConfigDict()
    config.seed = 0  # the teacher's noise per example

    # Towers, each `<tower>_weights` as in a training config. encoder_weights: the VAE + text
    # encoder of the DB and the examples (None: the tiny random pipeline of `random_preset` and
    # `random_seed`, written to workdir/random_pipeline_{preset}_{seed}). teacher_weights: the
    # multi-step teacher for latents='teacher' (None: `encoder_weights`).
    config.encoder_weights = config_dict.placeholder(str)
    config.tokenizer = config_dict.placeholder(str)  # tokenizer folder for single-file weights
    config.teacher_weights = config_dict.placeholder(str)
    config.random_preset = "tiny"
    config.random_seed = 0
    config.compute_dtype = "float32"  # or bfloat16

    config.image_size = arg.image_size  # every image is centre-cropped and resized to this
    config.batch_size = 16 if arg.quick else 64  # padded: one compiled shape per batch function

    # The retrieval database (build_db): entries from the digits' 'database' split.
    config.db = ml_collections.ConfigDict()
    config.db.source = ml_collections.ConfigDict(dict(kind="digits", split="database",
                                                      size=arg.image_size))
    config.db.dir = config_dict.placeholder(str)  # None: workdir/db
    config.db.limit = 96 if arg.quick else 0  # max entries (0: the whole source)
    config.db.overwrite = False  # True: wipe and rebuild instead of resuming
    config.db.fsync = True
    # Multi-host: the database is built in parts, one raw range each (0: one per process; one
    # process with 0 or 1: no parts); process 0 waits for them this long, then concatenates.
    config.db.num_parts = 0
    config.db.wait_timeout_s = 24 * 3600

    # Its index over the pooled embeddings (retrieval/index.py's config), saved to workdir/index.
    config.index = ml_collections.ConfigDict()
    config.index.kind = "auto"  # auto | scann | exact | bm25
    config.index.num_leaves = config_dict.placeholder(int)
    config.index.leaves_to_search = config_dict.placeholder(int)
    config.index.reorder_k = config_dict.placeholder(int)
    config.index_dir = config_dict.placeholder(str)  # None: workdir/index

    # Training examples (precompute): the digits' 'train' split -> TFRecords in workdir/data.
    config.source = ml_collections.ConfigDict(dict(kind="digits", split="train",
                                                   size=arg.image_size))
    config.max_source_items = 64 if arg.quick else 0  # raw source items read (0: all)
    config.data_dir = config_dict.placeholder(str)  # None: workdir/data
    config.split = "train"
    config.num_shards = arg.num_shards
    config.latents = "teacher" if arg.teacher else "vae"  # vae: real images | teacher: synthetic
    config.k = arg.k  # retrieved neighbours per example (0: no retrieval fields)
    # inline: the neighbours' arrays in each record | ids: their ids only, gathered from the
    # database by the trainer (docs/design.md, "Record options")
    config.neighbours = "inline"
    config.exclude_duplicate_images = True  # also drop DB entries with the example's image hash
    config.teacher = ml_collections.ConfigDict(dict(
        sampler="ddim", steps=2 if arg.quick else 25, guidance=7.5, negative_prompt=""))

    config.lock()
    return config
