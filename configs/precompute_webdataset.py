r"""Offline jobs on local img2dataset webdataset shards: the retrieval DB, then training TFRecords.

  python -m imagerag_jax.main build-db --workdir W \
      --config 'configs/precompute_webdataset.py:paths=/data/openimages/*.tar' \
      --config.encoder_weights=/ckpt/sd-turbo
  python -m imagerag_jax.main precompute --workdir W \
      --config 'configs/precompute_webdataset.py:paths=/data/openimages/*.tar,train_paths=/data/laion/*.tar,teacher' \
      --config.encoder_weights=/ckpt/sd-turbo --config.teacher_weights=/ckpt/stable-diffusion-2-1-base

Arg string (comma-separated): ``paths=GLOB`` (the database's shards; required), ``train_paths=GLOB``
(the training examples' shards; default ``paths``), ``image_size=N`` (512), ``k=N`` (4),
``num_shards=N`` (TFRecord shards, 64), ``teacher`` (synthetic latents from the teacher at CFG
7.5 instead of VAE latents of the images), and the metadata filters of
`data/img2dataset.py`: ``min_side=N``, ``max_pwatermark=X``, ``max_punsafe=X``,
``min_aesthetic=X``, also config fields of both sources (``--config.db.source.min_side=64``;
None, the default, is no filter). Everything else is `configs/precompute_digits.py`'s.
"""

import ml_collections

from imagerag_jax.config_args import load_sibling, parse_arg

# The metadata filters of data/img2dataset.py and their types.
FILTERS = {"min_side": int, "max_pwatermark": float, "max_punsafe": float, "min_aesthetic": float}


def get_config(arg=None):
    """The webdataset precompute config; see the module docstring for `arg`."""
    arg = parse_arg(arg, paths="", train_paths="", image_size=512, k=4, num_shards=64, teacher=False,
                    min_side=0, max_pwatermark=-1.0, max_punsafe=-1.0, min_aesthetic=-1.0)
    if not arg.paths:
        raise ValueError("configs/precompute_webdataset.py needs paths=GLOB (img2dataset .tar shards)")
    config = load_sibling(__file__, "precompute_digits").get_config(
        f"image_size={arg.image_size},k={arg.k},num_shards={arg.num_shards}"
        + (",teacher" if arg.teacher else ""))
    # Every filter is a config field (None: no filter), so `--config.db.source.min_side=64` works too.
    given = {"min_side": arg.min_side or None,
             **{name: (arg[name] if arg[name] >= 0 else None)
                for name in ("max_pwatermark", "max_punsafe", "min_aesthetic")}}
    source = lambda paths: ml_collections.ConfigDict(
        {"kind": "webdataset", "paths": paths, "image_size": arg.image_size,
         **{name: ml_collections.FieldReference(given[name], field_type=kind)
            for name, kind in FILTERS.items()}})
    with config.unlocked():
        config.db.source = source(arg.paths)
        config.source = source(arg.train_paths or arg.paths)
        config.batch_size = 32
        # At SD 2.1 shapes a record with its k = 4 neighbours inline is ~1.0 MB, ~0.23 MB with
        # their ids (the trainer gathers them from its database copy): docs/design.md.
        config.neighbours = "ids"
    config.lock()
    return config
