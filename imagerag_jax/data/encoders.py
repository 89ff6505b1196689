"""The jitted batch functions of the offline jobs: VAE latents, text embeddings, teacher samples.

    encode_images(vae, params, uint8 images)   -> scaled VAE mean latents (float32)
    encode_text(text_encoder, params, ids)     -> (hidden states, L2-normalised pooled embedding)
    teacher_latents(spec, unet, text, ...)     -> the teacher's multi-step CFG samples from noise

One jit each, with the modules static; `Encoder` pads host batches to one fixed size (one compiled
shape per function), splits them over every local device and trims the outputs. `build_db` and `precompute` encode through these, so
the database and the training examples agree exactly, and the digits miniature samples its teacher
with `teacher_latents`. `example_noise` is the teacher's initial noise, a function of the seed and
the example id only (whichever host draws it).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from imagerag_jax.diffusion import sampling
from imagerag_jax.weights import towers
from imagerag_jax.diffusion.schedule import make_schedule


def _vae_latents(vae: Any, params: Any, images: jax.Array) -> jax.Array:
    """uint8 [B, H, W, 3] -> scaled mean latents [B, h, w, C] float32."""
    x = images.astype(jnp.float32) / 127.5 - 1.0
    return vae.apply({"params": params}, x, method=vae.encode_latents)


encode_images = jax.jit(_vae_latents, static_argnums=0)
encode_images.__doc__ = "Jitted: uint8 images [B, H, W, 3] -> scaled VAE mean latents (float32)."


def _text_embeddings(text: Any, params: Any, token_ids: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Token ids [B, L] -> (hidden states [B, L, D] float32, L2-normalised pooled [B, D])."""
    hidden, pooled = text.apply({"params": params}, token_ids)
    pooled = pooled.astype(jnp.float32)
    pooled = pooled / jnp.maximum(jnp.linalg.norm(pooled, axis=-1, keepdims=True), 1e-12)
    return hidden.astype(jnp.float32), pooled


encode_text = jax.jit(_text_embeddings, static_argnums=0)
encode_text.__doc__ = "Jitted: token ids [B, L] -> (hidden [B, L, D], normalised pooled [B, D])."


class TeacherSpec(NamedTuple):
    """Static settings of the teacher sampler."""

    sampler: str  # 'ddim' | 'euler'
    steps: int
    guidance: float
    prediction_type: str


def _teacher_sample(spec: TeacherSpec, unet: Any, text: Any, unet_params: Any, text_params: Any,
                    token_ids: jax.Array, uncond_ids: jax.Array, noise: jax.Array) -> jax.Array:
    """Multi-step teacher sampling with CFG from `noise`: the synthetic target latents z0."""
    context, _ = text.apply({"params": text_params}, token_ids)
    uncond, _ = text.apply({"params": text_params}, uncond_ids)
    apply_fn = lambda x, t, c: unet.apply({"params": unet_params}, x, t, c)
    schedule = make_schedule("scaled_linear")
    uncond = uncond if spec.guidance > 1.0 else None
    out = sampling.multistep_sample(apply_fn, noise, context, uncond, schedule, spec.sampler,
                                    spec.steps, spec.guidance, spec.prediction_type)
    return out.astype(jnp.float32)


teacher_latents = jax.jit(_teacher_sample, static_argnums=(0, 1, 2))
teacher_latents.__doc__ = "Jitted: teacher DDIM/Euler + CFG from the given noise -> latents."


def pad_rows(x: np.ndarray, size: int) -> np.ndarray:
    """Pads the leading axis to `size` by repeating the last row (static shapes under jit)."""
    if len(x) == size:
        return x
    return np.concatenate([x, np.repeat(x[-1:], size - len(x), axis=0)])


class Encoder:
    """Runs the jitted batch functions of one pipeline data-parallel over this host's devices.

    Host batches are padded to `batch_size` rounded up to a multiple of the device count and
    split over a one-axis mesh of `devices` (default: every local device); the towers' params are
    replicated once per device. Rows are independent, so the result does not depend on the
    number of devices (up to float reassociation inside a device's kernels).
    """

    def __init__(self, models: towers.JobTowers, batch_size: int,
                 devices: Sequence[jax.Device] | None = None):
        self.models, self.pipe = models, models.pipe
        self.devices = list(devices) if devices is not None else jax.local_devices()
        n = len(self.devices)
        self.batch_size = -(-int(batch_size) // n) * n
        self.mesh = jax.sharding.Mesh(np.array(self.devices), ("batch",))
        self.batch_sharding = jax.sharding.NamedSharding(self.mesh, jax.sharding.PartitionSpec("batch"))
        self.replicated = jax.sharding.NamedSharding(self.mesh, jax.sharding.PartitionSpec())
        self._placed: dict[str, Any] = {}

    def placed_params(self, name: str) -> Any:
        """The pipeline's `name` params (vae_params, text_params, unet_params) on every device."""
        if name not in self._placed:
            self._placed[name] = jax.device_put(getattr(self.pipe, name), self.replicated)
        return self._placed[name]

    def sharded_rows(self, x: np.ndarray) -> jax.Array:
        """A host batch padded to `batch_size` and split over the devices."""
        return jax.device_put(pad_rows(x, self.batch_size), self.batch_sharding)

    def output_shapes(self, image_shape: Sequence[int]
                      ) -> tuple[tuple[int, ...], tuple[int, ...], int]:
        """(latent [h, w, C], prompt embeds [L, D], pooled D) of one image; traced, not compiled."""
        lat = jax.eval_shape(lambda x: _vae_latents(self.pipe.vae, self.pipe.vae_params, x),
                             jax.ShapeDtypeStruct((1, *image_shape), jnp.uint8))
        hid, pooled = jax.eval_shape(
            lambda t: _text_embeddings(self.pipe.text_encoder, self.pipe.text_params, t),
            jax.ShapeDtypeStruct((1, self.pipe.tokenizer.max_length), jnp.int32))
        return tuple(lat.shape[1:]), tuple(hid.shape[1:]), int(pooled.shape[-1])

    def image_latents(self, images: np.ndarray) -> jax.Array:
        """uint8 [b, H, W, 3] -> latents [batch_size, h, w, C] float32, sharded over the devices."""
        return encode_images(self.pipe.vae, self.placed_params("vae_params"), self.sharded_rows(images))

    def images(self, images: np.ndarray) -> np.ndarray:
        """uint8 [b, H, W, 3] -> latents [b, h, w, C] float32."""
        return np.asarray(self.image_latents(images))[:len(images)]

    def texts(self, captions: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        """Captions -> (prompt embeds [b, L, D], normalised pooled [b, D]) float32."""
        b = len(captions)
        ids = self.sharded_rows(self.pipe.tokenizer(list(captions)))
        hidden, pooled = encode_text(self.pipe.text_encoder, self.placed_params("text_params"), ids)
        return np.asarray(hidden)[:b], np.asarray(pooled)[:b]

    def teacher_sample(self, spec: TeacherSpec, captions: Sequence[str], negative_prompt: str,
                       noise: np.ndarray) -> jax.Array:
        """Teacher latents [batch_size, h, w, C] from `noise`, sharded over the devices."""
        ids = self.sharded_rows(self.pipe.tokenizer(list(captions)))
        uncond = jax.device_put(self.pipe.tokenizer([negative_prompt]), self.replicated)
        return teacher_latents(spec, self.pipe.unet, self.pipe.text_encoder,
                               self.placed_params("unet_params"), self.placed_params("text_params"), ids, uncond,
                               self.sharded_rows(noise.astype(np.float32)))

    def teacher(self, spec: TeacherSpec, captions: Sequence[str], negative_prompt: str,
                noise: np.ndarray) -> np.ndarray:
        """Teacher latents [b, h, w, C] from `noise` [b, h, w, C] (this pipeline is the teacher)."""
        return np.asarray(self.teacher_sample(spec, captions, negative_prompt, noise))[:len(captions)]


def example_noise(seed: int, example_ids: Sequence[int], shape: Sequence[int]) -> np.ndarray:
    """The teacher's initial noise per example id (f16-exact float16 [b, *shape])."""
    out = np.empty((len(example_ids), *shape), np.float16)
    for j, i in enumerate(example_ids):
        i = int(i)
        rng = np.random.default_rng([int(seed), i & 0xFFFFFFFF, (i >> 32) & 0xFFFFFFFF])
        out[j] = rng.standard_normal(tuple(shape), np.float32)
    return out
