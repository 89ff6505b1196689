"""imagerag-jax: retrieval-augmented one-step text-to-image generation (ImageRAGTurbo) in JAX/Flax."""

import platform
import sys

from setuptools import find_packages, setup

# ScaNN ships Linux x86_64 wheels only, and needs TensorFlow 2.20 beside it (2.21 breaks it).
SCANN = ["scann==1.4.2"] if sys.platform.startswith("linux") and platform.machine() == "x86_64" else []

RUNTIME = [
    "jax>=0.7",
    "flax>=0.10",
    "optax>=0.2.4",
    "orbax-checkpoint>=0.11",
    "ml_collections>=1.0",
    "clu>=0.0.12",
    "transformers>=4.45",
    "tensorflow-cpu~=2.20.0",
    "tensorflow-datasets>=4.9",
    "safetensors>=0.4",
    "huggingface_hub>=0.24",  # weights by hub id (org/name[@revision])
    "numpy>=1.26",
    "pillow>=10",
    "pyarrow>=14",  # parquet prompt lists
    "tqdm>=4.66",
    "scikit-learn>=1.4",
    "bm25s>=0.2",
    "absl-py>=2.1",
    "importlib_resources>=6",  # tensorflow-datasets imports it when preparing a dataset
] + SCANN

# Accelerator builds of JAX, over the core's range (jax>=0.7; CUDA 13 wheels start at 0.7.2). Each
# jax release's own extra pins the jaxlib and plugin (jax-cuda1x-plugin, libtpu) built for it, so pip
# picks matching versions. Resolved here with tensorflow-cpu 2.20 and scann 1.4.2 (pip --dry-run,
# docs/recipes.md "Install"): jax 0.10.2 with jax-cuda13-plugin / jax-cuda12-plugin 0.10.2, libtpu 0.0.42.1.
ACCELERATORS = {
    "cuda13": ["jax[cuda13]>=0.7.2"],  # NVIDIA GPUs, CUDA 13 wheels from pip
    "cuda12": ["jax[cuda12]>=0.7"],    # NVIDIA GPUs whose driver predates CUDA 13
    "tpu": ["jax[tpu]>=0.7"],          # Cloud TPU VMs; also `benchmark aot` compiling for a TPU on a CPU
}

TORCH = ["torch>=2.4", "diffusers>=0.31"]
SERVE = ["gradio>=5"]  # the demo page (`main serve`); gradio_client comes with it
TEST = TORCH + SERVE + ["pytest>=8", "pytest-xdist>=3.5", "scipy>=1.11", "nbclient>=0.10",
                        "nbformat>=5.10", "ipykernel>=6.29"]

setup(
    name="imagerag-jax",
    version="0.1.0",
    description=__doc__,
    long_description=open("README.md").read() if __import__("os").path.exists("README.md") else "",
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["imagerag_jax", "imagerag_jax.*"]),
    install_requires=RUNTIME,
    extras_require={"torch": TORCH, "serve": SERVE, "test": TEST, **ACCELERATORS},
    license="Apache-2.0",
)
