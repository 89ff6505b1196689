"""Random TFRecords at a training config's shapes: training and benchmarks without real data."""

from __future__ import annotations

import logging
import os

import jax
import ml_collections
import numpy as np

from imagerag_jax.data import tfrecords


def synthetic_schema(config: ml_collections.ConfigDict) -> tfrecords.Schema:
    """The tfrecords.Schema of the synthetic set (config.synthetic)."""
    s = config.synthetic
    return tfrecords.Schema(tuple(s.latent_shape), tuple(s.embed_shape), int(s.pooled_dim), int(s.k),
                            bool(s.has_noise))


def write_synthetic_data(out_dir: str, config: ml_collections.ConfigDict) -> str:
    """Random TFRecords at the config's synthetic shapes (once: an existing set is reused)."""
    if os.path.exists(os.path.join(out_dir, tfrecords.MANIFEST)):
        return out_dir
    if jax.process_index() == 0:
        schema = synthetic_schema(config)
        rng = np.random.default_rng(config.seed)
        n = int(config.synthetic.num_examples)
        examples = (tfrecords.random_example(schema, rng, i) for i in range(n))
        tfrecords.write_examples(out_dir, config.split, examples, schema,
                                 num_shards=max(int(config.synthetic.num_shards), jax.process_count()),
                                 source={"synthetic": True, "seed": config.seed})
        logging.info("wrote %d synthetic examples to %s", n, out_dir)
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices("imagerag_synthetic_data")
    return out_dir
