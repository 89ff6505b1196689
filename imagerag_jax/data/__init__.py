"""Data: sources, the offline jobs (build_db, precompute), the TFRecord schema, the input pipeline.

Submodules are imported explicitly (`from imagerag_jax.data import build_db`): `tfrecords`,
`pipeline`, `precompute` and `synthetic` import TensorFlow, which `sources`, `encoders` and
`build_db` do not need.
"""
