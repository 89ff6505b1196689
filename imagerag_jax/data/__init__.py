"""Data: sources, the offline jobs (build_db, precompute), the TFRecord schema, the input pipeline.

Submodules are imported explicitly (`from imagerag_jax.data import build_db`): `tfrecords`,
`pipeline` and `synthetic` import TensorFlow at import time (`precompute` only when it writes),
which `sources`, `encoders` and `build_db` never need.
"""
