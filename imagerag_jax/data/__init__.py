"""Image-text sources, the TFRecord schema and the tf.data input pipeline.

Submodules are imported explicitly (`from imagerag_jax.data import tfrecords`): `tfrecords` and
`pipeline` import TensorFlow, which `sources` does not need.
"""
