"""imagerag-jax: ImageRAGTurbo (retrieval-augmented one-step text-to-image) in JAX/Flax."""

__version__ = "0.1.0"
