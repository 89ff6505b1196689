"""Speed and memory benchmarks against the PyTorch reference (`python -m imagerag_jax.benchmark`)."""
