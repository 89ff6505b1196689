"""Latent LPIPS (paper Eq. 9): a perceptual distance computed directly on SD latents.

The network is E-LatentLPIPS (Kang et al. 2024, "Diffusion2GAN"; github mingukkang/elatentlpips):
torchvision's VGG16-BN ``features`` with a 4-channel first convolution and the first three
max-pools removed (latents are already 8x downsampled), read LPIPS-style at the end of each of
its five slices: channel-normalised features, squared differences, non-negative 1x1 linear heads,
spatial mean, summed over the slices -> one distance per example. BatchNorm runs in inference mode.

Inputs are latents in the UNet's space, i.e. VAE latents already multiplied by the scaling factor
0.18215 (E-LatentLPIPS' ``normalize=False`` convention). ``random_augment`` applies the same random
differentiable augmentation (flip, integer translation, cutout) to both inputs: the expectation
over T in Eq. 9. E-LatentLPIPS' optional extra L1 term (``add_l1_loss``) is not included: Eq. 10
already has the smooth-L1 distillation term.

Weights. The calibrated weights are CC-BY-NC and are NOT shipped with this project. Load them
with ``load_latent_lpips(path)`` (the ``sd21_latest_vgg16_tuned.pth`` file, or a .safetensors with
the same keys). Without a path, ``latent_lpips_or_none(None, beta)`` with ``beta > 0`` warns loudly
(logging.warning and warnings.warn) that beta is being set to 0 and returns None: a randomly
initialised perceptual network is never used silently.

Variable collections: ``'params'`` (``features_{i}`` conv kernel/bias and BatchNorm scale/bias,
named by the torchvision feature index i; ``lin{k}`` head kernels of shape (C_k,)) and
``'batch_stats'`` (``features_{i}`` BatchNorm running mean/var). Both are frozen.
"""

from __future__ import annotations

import logging
import os
import warnings
from typing import Any, Mapping, NamedTuple, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

Dtype = Any
VGG16_WIDTHS = (64, 128, 256, 512, 512)
VGG16_CONVS = (2, 2, 3, 3, 3)
# E-LatentLPIPS replaces the first three max-pools by identities; the last two remain and sit at
# the end of slices 4 and 5, so those stages are read after pooling.
VGG16_POOLS = (False, False, False, True, True)
NORMALIZE_EPS = 1e-8  # elatentlpips.normalize_tensor: x / sqrt(sum_c x^2 + eps)
BN_EPS = 1e-5
IGNORED_SUFFIXES = ("num_batches_tracked",)
IGNORED_PREFIXES = ("augment.",)


# ---------------------------------------------------------------------------------------------
# Key layout: torchvision vgg16_bn ``features`` indices inside E-LatentLPIPS' ``net.slice{k}``.
# ---------------------------------------------------------------------------------------------


TENSORS_PER_KIND = {
    "conv": ("weight", "bias"),
    "bn": ("weight", "bias", "running_mean", "running_var"),
    "lin": ("weight",),
}


class KeyEntry(NamedTuple):
    """One tensor group of the checkpoint: torch key prefix, Flax module name and its kind."""

    torch_prefix: str
    flax_name: str
    kind: str  # 'conv' | 'bn' | 'lin'


def feature_layout(convs_per_stage: Sequence[int] = VGG16_CONVS) -> list[list[tuple[int, int]]]:
    """Per stage, the (conv index, bn index) pairs of torchvision's ``vgg16_bn().features``.

    Each conv is followed by BatchNorm and ReLU (3 modules) and each stage ends with a max-pool
    (1 module, an Identity in the latent variant); indices count all of them.
    """
    stages, index = [], 0
    for n in convs_per_stage:
        pairs = []
        for _ in range(n):
            pairs.append((index, index + 1))
            index += 3
        index += 1  # the stage's (possibly removed) max-pool
        stages.append(pairs)
    return stages


def elatentlpips_key_table(convs_per_stage: Sequence[int] = VGG16_CONVS) -> list[KeyEntry]:
    """The explicit checkpoint <-> Flax mapping (edit here if the checkpoint layout differs).

    E-LatentLPIPS: ``net.slice{k+1}.{i}.weight/bias`` (conv i), ``net.slice{k+1}.{i+1}.weight/
    bias/running_mean/running_var`` (BatchNorm), ``lin{k}.model.1.weight`` (Dropout at 0, then a
    bias-free 1x1 conv C_k -> 1), as in richzhang's LPIPS ``NetLinLayer``.
    """
    table = []
    for k, pairs in enumerate(feature_layout(convs_per_stage)):
        for conv_i, bn_i in pairs:
            table.append(KeyEntry(f"net.slice{k + 1}.{conv_i}", f"features_{conv_i}", "conv"))
            table.append(KeyEntry(f"net.slice{k + 1}.{bn_i}", f"features_{bn_i}", "bn"))
        table.append(KeyEntry(f"lin{k}.model.1", f"lin{k}", "lin"))
    return table


# ---------------------------------------------------------------------------------------------
# The network.
# ---------------------------------------------------------------------------------------------


def normalize_channels(x: jax.Array, eps: float = NORMALIZE_EPS) -> jax.Array:
    """Unit-norm feature vector per position (LPIPS' normalize_tensor)."""
    return x * jax.lax.rsqrt(jnp.sum(jnp.square(x), axis=-1, keepdims=True) + eps)


class LatentLPIPS(nn.Module):
    """E-LatentLPIPS distance between two latent batches (B,H,W,C) -> (B,); inference-mode BN."""

    widths: Sequence[int] = VGG16_WIDTHS
    convs_per_stage: Sequence[int] = VGG16_CONVS
    pools: Sequence[bool] = VGG16_POOLS
    dtype: Dtype = jnp.float32

    def setup(self) -> None:
        if not len(self.widths) == len(self.convs_per_stage) == len(self.pools):
            raise ValueError("widths, convs_per_stage and pools need one entry per stage")
        convs, norms = {}, {}
        for width, pairs in zip(self.widths, feature_layout(self.convs_per_stage)):
            for conv_i, bn_i in pairs:
                convs[conv_i] = nn.Conv(
                    width, (3, 3), padding=((1, 1), (1, 1)), dtype=self.dtype, name=f"features_{conv_i}"
                )
                norms[conv_i] = nn.BatchNorm(
                    use_running_average=True, epsilon=BN_EPS, dtype=self.dtype, name=f"features_{bn_i}"
                )
        self.convs, self.norms = convs, norms
        # Non-negative init: LPIPS heads are weights of non-negative squared differences.
        self.lins = [
            self.param(f"lin{k}", nn.initializers.constant(1.0 / width), (width,), jnp.float32)
            for k, width in enumerate(self.widths)
        ]

    def features(self, x: jax.Array) -> list[jax.Array]:
        """The five slice outputs (relu1_2 ... relu5_3, the last two after max-pooling)."""
        x = x.astype(self.dtype)
        outs = []
        for pairs, pool in zip(feature_layout(self.convs_per_stage), self.pools):
            for conv_i, _ in pairs:
                x = nn.relu(self.norms[conv_i](self.convs[conv_i](x)))
            if pool:
                x = nn.max_pool(x, (2, 2), strides=(2, 2), padding="VALID")
            outs.append(x)
        return outs

    def __call__(self, x: jax.Array, y: jax.Array) -> jax.Array:
        """Per-example distance d(x, y) >= 0 (one network pass on the concatenated batch)."""
        batch = x.shape[0]
        feats = self.features(jnp.concatenate([x, y], axis=0))
        total = jnp.zeros((batch,), jnp.float32)
        for feat, weight in zip(feats, self.lins):
            feat = normalize_channels(feat.astype(jnp.float32))
            diff = jnp.square(feat[:batch] - feat[batch:])
            total = total + jnp.mean(diff @ weight, axis=(1, 2))
        return total


# ---------------------------------------------------------------------------------------------
# Augmentation (the T of Eq. 9).
# ---------------------------------------------------------------------------------------------


class AugmentParams(NamedTuple):
    """Per-example augmentation draws shared by both inputs."""

    flip: jax.Array  # (B,) bool
    shift: jax.Array  # (B, 2) int: (dy, dx)
    cut_center: jax.Array  # (B, 2) int: (cy, cx)


def _draw(rng: jax.Array, batch: int, h: int, w: int, max_shift: tuple[int, int]) -> AugmentParams:
    """Samples flips, integer shifts in [-max, max] and cutout centres for a batch.

    One uniform draw per example, mapped to each discrete choice: a single RNG kernel instead of
    five (each costs seconds of XLA compilation on CPU).
    """
    u = jax.random.uniform(rng, (batch, 5))
    pick = lambda col, n: jnp.minimum(jnp.floor(u[:, col] * n).astype(jnp.int32), n - 1)
    dy = pick(1, 2 * max_shift[0] + 1) - max_shift[0]
    dx = pick(2, 2 * max_shift[1] + 1) - max_shift[1]
    return AugmentParams(
        u[:, 0] < 0.5, jnp.stack([dy, dx], -1), jnp.stack([pick(3, h), pick(4, w)], -1)
    )


def _translate(z: jax.Array, shift: jax.Array, max_shift: tuple[int, int]) -> jax.Array:
    """Moves each image by its integer (dy, dx), filling with zeros (pad, then dynamic slice)."""
    _, h, w, c = z.shape
    sy, sx = max_shift
    padded = jnp.pad(z, ((0, 0), (sy, sy), (sx, sx), (0, 0)))
    one = lambda img, s: jax.lax.dynamic_slice(img, (sy - s[0], sx - s[1], 0), (h, w, c))
    return jax.vmap(one)(padded, shift)


def _cutout_mask(center: jax.Array, h: int, w: int, size: tuple[int, int]) -> jax.Array:
    """(B,H,W,1) mask: 0 inside a size[0] x size[1] box around each centre (may be clipped), 1 outside."""
    top = center[:, 0] - size[0] // 2
    left = center[:, 1] - size[1] // 2
    rows = jnp.arange(h)[None, :]
    cols = jnp.arange(w)[None, :]
    in_rows = (rows >= top[:, None]) & (rows < top[:, None] + size[0])
    in_cols = (cols >= left[:, None]) & (cols < left[:, None] + size[1])
    inside = in_rows[:, :, None] & in_cols[:, None, :]
    return (~inside)[..., None]


def random_augment(
    rng: jax.Array,
    x: jax.Array,
    y: jax.Array,
    *,
    flip: bool = True,
    translate: float = 0.125,
    cutout: float = 0.5,
) -> tuple[jax.Array, jax.Array]:
    """The same random flip / translation / cutout on x and y per example; jittable, differentiable.

    ``translate``: max shift as a fraction of H and W (0 disables); ``cutout``: box side as a
    fraction of H and W (0 disables). All operations are linear in the input (select, pad+slice,
    mask), so gradients pass to x and y.
    """
    b, h, w, _ = x.shape
    max_shift = (int(round(translate * h)), int(round(translate * w)))
    size = (int(round(cutout * h)), int(round(cutout * w)))
    params = _draw(rng, b, h, w, max_shift)

    def apply(z: jax.Array) -> jax.Array:
        if flip:
            z = jnp.where(params.flip[:, None, None, None], z[:, :, ::-1], z)
        if max_shift[0] or max_shift[1]:
            z = _translate(z, params.shift, max_shift)
        if size[0] and size[1]:
            z = z * _cutout_mask(params.cut_center, h, w, size).astype(z.dtype)
        return z

    return apply(x), apply(y)


# ---------------------------------------------------------------------------------------------
# Checkpoint conversion and loading.
# ---------------------------------------------------------------------------------------------


def _strip_prefix(state_dict: Mapping[str, Any]) -> dict[str, np.ndarray]:
    """numpy float32 tensors, without a DataParallel 'module.' prefix."""
    out = {}
    for key, value in state_dict.items():
        key = key[len("module."):] if key.startswith("module.") else key
        out[key] = np.asarray(value.detach().cpu().numpy() if hasattr(value, "detach") else value)
    return out


def _infer_convs_per_stage(sd: Mapping[str, np.ndarray]) -> tuple[int, ...]:
    """Convs per slice: the 4-d ``net.slice{k}.{i}.weight`` tensors (BatchNorm weights are 1-d)."""
    counts: dict[int, int] = {}
    for key, value in sd.items():
        parts = key.split(".")
        if len(parts) == 4 and parts[0] == "net" and parts[1].startswith("slice") and parts[3] == "weight":
            slice_k = int(parts[1][len("slice"):])
            counts[slice_k] = counts.get(slice_k, 0) + (np.ndim(value) == 4)
    return tuple(counts[k] for k in sorted(counts)) if counts else VGG16_CONVS


def convert_elatentlpips_state_dict(
    state_dict: Mapping[str, Any], convs_per_stage: Sequence[int] = VGG16_CONVS
) -> dict[str, Any]:
    """E-LatentLPIPS torch state dict -> {'params', 'batch_stats'} for ``LatentLPIPS``.

    Follows ``elatentlpips_key_table``; raises KeyError listing missing keys and ValueError on
    unused ones (``num_batches_tracked`` and the augmentation pipe's ``augment.*`` buffers, present
    when a constructed ``ELatentLPIPS`` module's state dict was saved, are ignored).
    """
    sd = _strip_prefix(state_dict)
    params: dict[str, Any] = {}
    stats: dict[str, Any] = {}
    used = set()

    def take(key: str) -> np.ndarray:
        used.add(key)
        return np.asarray(sd[key], np.float32)

    table = elatentlpips_key_table(convs_per_stage)
    missing = [
        f"{e.torch_prefix}.{s}" for e in table for s in TENSORS_PER_KIND[e.kind] if f"{e.torch_prefix}.{s}" not in sd
    ]
    if missing:
        raise KeyError(f"E-LatentLPIPS checkpoint lacks {len(missing)} keys, e.g. {missing[:4]}")
    for e in table:
        p = e.torch_prefix
        if e.kind == "conv":  # OIHW -> HWIO
            kernel = take(p + ".weight").transpose(2, 3, 1, 0)
            params[e.flax_name] = {"kernel": kernel, "bias": take(p + ".bias")}
        elif e.kind == "bn":
            params[e.flax_name] = {"scale": take(p + ".weight"), "bias": take(p + ".bias")}
            stats[e.flax_name] = {"mean": take(p + ".running_mean"), "var": take(p + ".running_var")}
        else:  # (1, C, 1, 1) -> (C,)
            weight = take(p + ".weight").reshape(-1)
            if (weight < 0).any():
                logging.warning("latent LPIPS head %s has negative weights; distances may be < 0", p)
            params[e.flax_name] = weight
    ignored = lambda k: k.endswith(IGNORED_SUFFIXES) or k.startswith(IGNORED_PREFIXES)
    unused = [k for k in sd if k not in used and not ignored(k)]
    if unused:
        raise ValueError(f"unexpected keys in E-LatentLPIPS checkpoint: {unused[:8]}")
    to_jnp = lambda tree: jax.tree_util.tree_map(jnp.asarray, tree)
    return {"params": to_jnp(params), "batch_stats": to_jnp(stats)}


def latent_lpips_from_state_dict(state_dict: Mapping[str, Any]) -> tuple[LatentLPIPS, dict[str, Any]]:
    """(module, variables) with stage widths and conv counts read from the checkpoint's shapes."""
    sd = _strip_prefix(state_dict)
    convs = _infer_convs_per_stage(sd)
    widths = tuple(int(sd[f"lin{k}.model.1.weight"].shape[1]) for k in range(len(convs)))
    module = LatentLPIPS(widths=widths, convs_per_stage=convs)
    return module, convert_elatentlpips_state_dict(sd, convs)


def _read_state_dict(path: str) -> Mapping[str, Any]:
    """Tensors from .safetensors, or from a torch pickle (.pth/.pt/.tar; needs torch)."""
    if path.endswith(".safetensors"):
        from safetensors.numpy import load_file

        return load_file(path)
    import torch  # only the pickle format needs it

    obj = torch.load(path, map_location="cpu", weights_only=True)
    if isinstance(obj, Mapping) and "state_dict" in obj and isinstance(obj["state_dict"], Mapping):
        obj = obj["state_dict"]
    return obj


def load_latent_lpips(path: str) -> tuple[LatentLPIPS, dict[str, Any]]:
    """(module, variables) from an E-LatentLPIPS checkpoint (e.g. sd21_latest_vgg16_tuned.pth)."""
    if not os.path.exists(path):
        raise FileNotFoundError(f"latent LPIPS checkpoint not found: {path}")
    return latent_lpips_from_state_dict(_read_state_dict(path))


def latent_lpips_or_none(path: str | None, beta: float) -> tuple[LatentLPIPS, dict[str, Any]] | None:
    """Loaded network when it will be used; None (with a loud warning if beta > 0) otherwise."""
    if beta <= 0:
        return None
    if path is None:
        message = (
            f"latent LPIPS weights not given (beta={beta}): SETTING BETA TO 0 and training without "
            "the latent LPIPS term of Eq. 10. The E-LatentLPIPS weights are CC-BY-NC and not shipped; "
            "pass the path to sd21_latest_vgg16_tuned.pth to enable it."
        )
        logging.warning(message)
        warnings.warn(message, RuntimeWarning, stacklevel=2)
        return None
    return load_latent_lpips(path)
