r"""ImageRAGTurbo on SD-Turbo (paper Sec. 3.4 and 4.1): 1-step student, SD 2.1-base teacher.

The paper's settings are ``configs/base.py``'s (see its docstring for which are the paper's and
which are ours). Frozen: SD-Turbo UNet (student), SD 2.1-base UNet encoder (teacher /
discriminator backbone), latent LPIPS (E-LatentLPIPS, CC-BY-NC, not shipped). The data are the
TFRecords of the precompute job (synthetic teacher pairs with their noise + real pairs, k
retrieved neighbours each).

  python -m imagerag_jax.main train --config configs/imageragturbo_sd21.py \
      --workdir gs://BUCKET/imageragturbo_sd21 \
      --config.student_weights=/ckpt/sd-turbo --config.vae_weights=/ckpt/sd-turbo \
      --config.teacher_weights=/ckpt/stable-diffusion-2-1-base \
      --config.latent_lpips_weights=/ckpt/sd21_latest_vgg16_tuned.pth \
      --config.data_dir=gs://BUCKET/imagerag_tfrecords

Arg string ``configs/imageragturbo_sd21.py:random``: frozen towers whose path is unset become
random SD 2.1-sized modules and, without a data_dir, a small synthetic TFRecord set at SD shapes
is written to workdir/data (benchmarks and memory checks; the result means nothing).
"""

from imagerag_jax.config_args import load_sibling


def get_config(arg=None):
    """The paper's configuration; ``arg='random'`` uses random SD 2.1-sized frozen towers."""
    if arg not in (None, "", "random"):
        raise ValueError(f"unknown config arg {arg!r}; expected nothing or 'random'")
    config = load_sibling(__file__, "base").get_config()
    if arg == "random":
        config.random_preset = "sd21"
    return config
