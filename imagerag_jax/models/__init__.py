"""Flax Linen ports of the Stable Diffusion 2.x towers and the ImageRAGTurbo modules."""
