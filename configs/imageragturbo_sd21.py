r"""ImageRAGTurbo on SD-Turbo (paper Sec. 3.4 and 4.1): 1-step student, SD 2.1-base teacher.

The paper's settings are ``configs/base.py``'s (see its docstring for which are the paper's and
which are ours). Frozen: SD-Turbo UNet (student), SD 2.1-base UNet encoder (teacher /
discriminator backbone), latent LPIPS (E-LatentLPIPS, CC-BY-NC, not shipped). The data are the
TFRecords of the precompute job (synthetic teacher pairs with their noise + real pairs, k
retrieved neighbours each).

  python -m imagerag_jax.main train --config configs/imageragturbo_sd21.py:gpu8 \
      --workdir gs://BUCKET/imageragturbo_sd21 \
      --config.student_weights=/ckpt/sd-turbo --config.vae_weights=/ckpt/sd-turbo \
      --config.teacher_weights=/ckpt/stable-diffusion-2-1-base \
      --config.latent_lpips_weights=/ckpt/sd21_latest_vgg16_tuned.pth \
      --config.data_dir=gs://BUCKET/imagerag_tfrecords --config.database=/local/db

Each neighbour's H-space comes from the database's H-space cache (``retrieved_branch='hspace'``;
build it once with ``main build-cache --weights /ckpt/sd-turbo --database /local/db --index
/local/index``), and records that store their neighbours by id are filled from that database:
both on every host's local disk (docs/design.md, "Record options").

The arg string is a comma-separated list of:

- a layout, the machines the run is sized for (none: the paper's 64 GPUs, 32 examples per GPU in
  one step, frozen towers FSDP-sharded over groups of 8, as ``base.py`` has it):
  ``gpuN``: N GPUs of 80 GB (H100, H200, A100-80GB; ``gpu8`` is one node), 8 examples per GPU
  per micro-batch; ``v5p-N``: a TPU v5p slice of N TensorCores (N / 2 chips, JAX's devices;
  ``v5p-64`` is 32 chips), 16 examples per chip per micro-batch. Both replicate the frozen towers
  (``fsdp`` 1: the SD towers, about 3 GB in bf16, fit every device, and sharded ones would be
  all-gathered again in every micro-batch of the accumulation scan), compute and store the frozen
  towers in bf16, and rematerialise fully (``remat='full'``). ``grad_accum_steps`` makes up the
  global batch: 2048 / (micro-batch x devices), e.g. 32 on ``gpu8``, 4 on ``v5p-64``.
  PROVISIONAL: the per-device micro-batches are estimates (SD 2.1 at 64x64 latents, bf16, full
  remat), not measurements; the ahead-of-time memory table (``python -m imagerag_jax.benchmark
  aot``, docs/benchmarks.md) is where they should be chosen from. Override with ``per_device=M``.
- ``batch=N``: another global batch (default the paper's 2048); see the learning-rate rule.
- ``per_device=M``: the micro-batch per device of the layout.
- ``random``: frozen towers whose path is unset become random SD 2.1-sized modules and, without
  a data_dir, a small synthetic TFRecord set at SD shapes is written to workdir/data (benchmarks
  and memory checks; the result means nothing).

Learning-rate rule. The paper trains with AdamW at a constant 1e-5 for both players at a global
batch of 2048. Every layout keeps that batch, whatever the device count, by accumulating
micro-batches (the step averages their gradients before one update, exactly as one batch of
2048 would make it), so the paper's learning rate applies unchanged: this is the reason for
accumulating rather than rescaling. Only a different ``batch=N`` changes the learning rate, by
the square-root rule, lr = 1e-5 * sqrt(N / 2048), for both optimisers: for Adam-family
optimisers, whose update is normalised by the gradient's second moment, the batch size mainly
scales the gradient noise, and square-root scaling keeps the update's noise scale (Malladi et al.,
"On the SDEs and Scaling Rules for Adaptive Gradient Algorithms", NeurIPS 2022), whereas the
linear rule is SGD's. It is a starting point, not a tuned value; ``--config.optimizer.lr`` and
``--config.disc_optimizer.lr`` still override it.
"""

import math
import re

from imagerag_jax.config_args import load_sibling
from imagerag_jax.errors import UserError

PAPER_BATCH = 2048
PAPER_LR = 1e-5
# Per-device micro-batch of each accelerator family (PROVISIONAL, see the module docstring).
MICRO_BATCH = {"gpu": 8, "v5p": 16}


def parse(arg):
    """The arg string -> (layout, devices, per_device, batch, random); see the module docstring."""
    layout, devices, per_device, batch, random = None, None, None, PAPER_BATCH, False
    for item in filter(None, (arg or "").split(",")):
        key, eq, value = item.partition("=")
        gpu, tpu = re.fullmatch(r"gpu(\d+)", item), re.fullmatch(r"v5p-(\d+)", item)
        if item == "random":
            random = True
        elif gpu or tpu:
            if layout is not None:
                raise UserError(f"config arg {arg!r} names two layouts")
            layout = "gpu" if gpu else "v5p"
            devices = int(gpu.group(1)) if gpu else int(tpu.group(1)) // 2
            if devices < 1 or (tpu and int(tpu.group(1)) % 2):
                raise UserError(f"{item}: a layout needs >= 1 device (v5p-N counts 2 TensorCores a chip)")
        elif eq and key in ("batch", "per_device") and value.isdigit() and int(value) > 0:
            batch, per_device = (int(value), per_device) if key == "batch" else (batch, int(value))
        else:
            raise UserError(f"unknown config arg {item!r} in {arg!r}; expected gpuN, v5p-N, "
                            "batch=N, per_device=M and/or random")
    if per_device is not None and layout is None:
        raise UserError("per_device=M needs a layout (gpuN or v5p-N)")
    return layout, devices, per_device, batch, random


def get_config(arg=None):
    """The paper's configuration, sized for a layout by the arg string (see the module docstring)."""
    layout, devices, per_device, batch, random = parse(arg)
    config = load_sibling(__file__, "base").get_config()
    if random:
        config.random_preset = "sd21"
    else:
        # Each neighbour's H-space from the database's H-space cache (`main build-cache`): the
        # step does not run the frozen encoder on the k neighbours, about 2 of the ~6.5 UNet
        # passes an example costs at k = 4 (docs/design.md, "Record options"). The random
        # layout's synthetic data have no database: they keep the step's encoder.
        config.retrieved_branch = "hspace"
    config.global_batch_size = batch
    if batch != PAPER_BATCH:  # the square-root rule for AdamW (module docstring)
        config.optimizer.lr = config.disc_optimizer.lr = PAPER_LR * math.sqrt(batch / PAPER_BATCH)
    if layout is None:
        return config
    micro = per_device or MICRO_BATCH[layout]
    # A smaller global batch than micro x devices: one step, fewer examples per device.
    micro = min(micro, batch // devices) if batch >= devices else micro
    accum, rest = divmod(batch, micro * devices)
    if rest or accum < 1:
        raise UserError(f"global batch {batch} is not {micro} examples per device x {devices} devices "
                        f"x a whole number of micro-batches; choose batch=N or per_device=M to fit")
    config.grad_accum_steps = accum
    config.mesh = (("data", -1), ("fsdp", 1))
    config.remat = "full"
    config.compute_dtype = config.frozen_param_dtype = "bfloat16"
    return config
