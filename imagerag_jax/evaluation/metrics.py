"""General image-generation metrics: Fréchet distance, CLIP score, feature networks, latency.

    frechet_distance(feats_real, feats_generated)                        # FD of two (N, F) sets
    CLIPScorer("/models/clip-vit-large-patch14").score(images, prompts)  # torchmetrics' CLIPScore
    fid_from_feature_fn(InceptionFeatures("/models/inception-2015-12-05.pt"), real, fake)
    time_per_image(jitted_generate, *args, repeats=5)                     # seconds per image

The paper's metrics (FID and CLIP score, latency per image) on any images. All models come from
local files; torch is imported only when the torch-backed scorers are used. The digits
miniature's judge, a classifier in whose feature space the Fréchet distance is also taken, is
`miniature/judge.py`.

Images are float NHWC in [-1, 1] (the pipeline's convention) or uint8 NHWC.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import numpy as np

from imagerag_jax import images as image_utils
from imagerag_jax.weights import hub

PIXEL_RANGES = ("[-1,1]", "[0,1]", "[0,255]")


# --------------------------------------------------------------------------- input checks


def check_images(images: Any, name: str = "images") -> np.ndarray:
    """A (B, H, W, C) array with B >= 1, else ValueError."""
    arr = np.asarray(images)
    if arr.ndim != 4 or arr.shape[0] == 0 or arr.shape[-1] not in (1, 3):
        raise ValueError(f"{name}: expected a non-empty (B, H, W, C) array with C in (1, 3), "
                         f"got shape {arr.shape}")
    return arr


def signed_float(images: np.ndarray) -> np.ndarray:
    """uint8 [0, 255] or float [-1, 1] images -> float32 in [-1, 1]."""
    if images.dtype == np.uint8:
        return images.astype(np.float32) / 127.5 - 1.0
    return images.astype(np.float32)


# --------------------------------------------------------------------------- metrics


def _clip_eigenvalues(w: np.ndarray) -> np.ndarray:
    """Eigenvalues of a PSD matrix with those below the rounding floor set to 0.

    Singular covariances (N <= F) have many eigenvalues that are zero up to rounding, +-1e-15;
    their square roots (~3e-8 each) would add up, so they are zeroed with matrix_rank's tolerance.
    """
    floor = max(float(np.abs(w).max(initial=0.0)), 0.0) * len(w) * np.finfo(np.float64).eps
    return np.where(w > floor, w, 0.0)


def sqrtm_psd(matrix: Any) -> np.ndarray:
    """Symmetric square root of a symmetric PSD matrix via eigh (rounding-level eigenvalues -> 0)."""
    a = np.asarray(matrix, np.float64)
    a = (a + a.T) / 2  # rounding makes covariances slightly asymmetric
    w, v = np.linalg.eigh(a)
    return (v * np.sqrt(_clip_eigenvalues(w))) @ v.T


def trace_sqrt_product(sigma1: Any, sigma2: Any) -> float:
    """tr sqrt(S1 S2) for PSD S1, S2, as tr sqrt(sqrt(S1) S2 sqrt(S1)) (symmetric PSD, stable).

    S1 S2 is similar to sqrt(S1) S2 sqrt(S1), so they share eigenvalues; the latter is symmetric,
    so eigh applies and works for singular covariances (N < F) where sqrtm(S1 S2) is fragile.
    """
    r = sqrtm_psd(sigma1)
    m = r @ np.asarray(sigma2, np.float64) @ r
    w = np.linalg.eigvalsh((m + m.T) / 2)
    return float(np.sqrt(_clip_eigenvalues(w)).sum())


def feature_stats(feats: Any, name: str = "features") -> tuple[np.ndarray, np.ndarray]:
    """(mean (F,), unbiased covariance (F, F)) in float64 of (N, F) features, N >= 2."""
    x = np.asarray(feats, np.float64)
    if x.ndim != 2:
        raise ValueError(f"{name}: expected (N, F) features, got shape {x.shape}")
    if x.shape[0] < 2:
        raise ValueError(f"{name}: a covariance needs at least 2 samples, got {x.shape[0]}")
    if not np.isfinite(x).all():
        raise ValueError(f"{name}: features contain NaN or inf")
    return x.mean(axis=0), np.atleast_2d(np.cov(x, rowvar=False))


def frechet_distance_from_stats(mu1: Any, sigma1: Any, mu2: Any, sigma2: Any) -> float:
    """|mu1 - mu2|^2 + tr(S1) + tr(S2) - 2 tr sqrt(S1 S2), the Fréchet distance of two Gaussians."""
    mu1, mu2 = np.atleast_1d(np.asarray(mu1, np.float64)), np.atleast_1d(np.asarray(mu2, np.float64))
    s1, s2 = np.atleast_2d(np.asarray(sigma1, np.float64)), np.atleast_2d(np.asarray(sigma2, np.float64))
    f = mu1.shape[0]
    if mu1.ndim != 1 or mu2.shape != (f,):
        raise ValueError(f"means must be vectors of one length, got {mu1.shape} and {mu2.shape}")
    if s1.shape != (f, f) or s2.shape != (f, f):
        raise ValueError(f"covariances must be ({f}, {f}) to match the means, "
                         f"got {s1.shape} and {s2.shape}")
    diff = mu1 - mu2
    fd = diff @ diff + np.trace(s1) + np.trace(s2) - 2.0 * trace_sqrt_product(s1, s2)
    return float(max(fd, 0.0))  # >= 0 exactly; a tiny negative is rounding


def frechet_distance(feats_a: Any, feats_b: Any) -> float:
    """Fréchet distance between Gaussians fitted to two (N, F) feature sets (FID on Inception)."""
    mu1, s1 = feature_stats(feats_a, "feats_a")
    mu2, s2 = feature_stats(feats_b, "feats_b")
    if mu1.shape != mu2.shape:
        raise ValueError(f"feature dims differ: {mu1.shape[0]} vs {mu2.shape[0]}")
    return frechet_distance_from_stats(mu1, s1, mu2, s2)


def clip_scores(image_embeds: Any, text_embeds: Any) -> np.ndarray:
    """Per-pair 100 * cos(image_i, text_i) (N,), unclamped."""
    a, b = np.asarray(image_embeds, np.float64), np.asarray(text_embeds, np.float64)
    if a.ndim != 2 or a.shape != b.shape or a.shape[0] == 0:
        raise ValueError(f"expected paired (N, D) embeddings with N >= 1, "
                         f"got {a.shape} and {b.shape}")
    a = a / np.linalg.norm(a, axis=1, keepdims=True)
    b = b / np.linalg.norm(b, axis=1, keepdims=True)
    return 100.0 * (a * b).sum(axis=1)


def clip_score(image_embeds: Any, text_embeds: Any, *, clamp: str = "pair") -> float:
    """CLIPScore = mean over pairs of max(100 * cos(E_I, E_C), 0) (torchmetrics' documented form).

    clamp="mean" gives max(mean(100 * cos), 0), what torchmetrics' code computes; the two differ
    only when some pair has a negative cosine, which real CLIP models rarely produce.
    """
    s = clip_scores(image_embeds, text_embeds)
    if clamp == "pair":
        return float(np.maximum(s, 0.0).mean())
    if clamp == "mean":
        return float(max(s.mean(), 0.0))
    raise ValueError(f"clamp must be 'pair' or 'mean', got {clamp!r}")


# --------------------------------------------------------------------------- torch-backed models


def _require_file(path: str, what: str) -> None:
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{what} not found at {path!r}")


def _rgb_uint8(images: Any) -> np.ndarray:
    """(B, H, W, C) uint8 or float [-1, 1] images -> uint8 (B, H, W, 3)."""
    arr = check_images(images)
    if arr.dtype != np.uint8:
        arr = image_utils.to_uint8(arr)
    return np.repeat(arr, 3, axis=-1) if arr.shape[-1] == 1 else arr


class CLIPScorer:
    """A transformers CLIPModel + CLIPProcessor from a local folder; scores images vs prompts.

    The folder is what `save_pretrained` writes for the model and the processor (e.g. a download
    of openai/clip-vit-large-patch14, torchmetrics' default), or that hub id itself, which
    `hub.resolve` takes from the hub cache (or fetches, unless HF_HUB_OFFLINE is set).
    """

    def __init__(self, model_dir: str, *, device: str = "cpu", batch_size: int = 32):
        model_dir = hub.local_path(model_dir, ("clip",))  # a folder, or a hub id (fetched once)
        _require_file(os.path.join(model_dir, "config.json"), "CLIP model folder (config.json)")
        import torch  # pylint: disable=g-import-not-at-top
        from transformers import CLIPModel, CLIPProcessor  # pylint: disable=g-import-not-at-top
        self.torch, self.device, self.batch_size = torch, device, batch_size
        self.model = CLIPModel.from_pretrained(model_dir, local_files_only=True).eval().to(device)
        self.processor = CLIPProcessor.from_pretrained(model_dir, local_files_only=True)
        self.max_length = self.model.config.text_config.max_position_embeddings

    def image_embeds(self, images: Any) -> np.ndarray:
        """Projected image embeddings (N, D) (not normalised)."""
        arr, out = _rgb_uint8(images), []
        for i in range(0, len(arr), self.batch_size):
            pix = self.processor(images=list(arr[i:i + self.batch_size]), return_tensors="pt")
            with self.torch.no_grad():
                # vision_model + visual_projection: the same on transformers 4.x and 5.x, whose
                # get_image_features return types differ.
                pooled = self.model.vision_model(
                    pixel_values=pix["pixel_values"].to(self.device)).pooler_output
                out.append(self.model.visual_projection(pooled).float().cpu().numpy())
        return np.concatenate(out)

    def text_embeds(self, prompts: Sequence[str]) -> np.ndarray:
        """Projected text embeddings (N, D) (not normalised); prompts truncated to the context."""
        prompts, out = list(prompts), []
        for i in range(0, len(prompts), self.batch_size):
            tok = self.processor.tokenizer(prompts[i:i + self.batch_size], padding=True,
                                           truncation=True, max_length=self.max_length,
                                           return_tensors="pt")
            with self.torch.no_grad():
                pooled = self.model.text_model(
                    input_ids=tok["input_ids"].to(self.device),
                    attention_mask=tok["attention_mask"].to(self.device)).pooler_output
                out.append(self.model.text_projection(pooled).float().cpu().numpy())
        return np.concatenate(out)

    def scores(self, images: Any, prompts: Sequence[str]) -> np.ndarray:
        """Per-pair 100 * cos (N,)."""
        arr = check_images(images)
        if len(prompts) != arr.shape[0]:
            raise ValueError(f"{arr.shape[0]} images but {len(prompts)} prompts")
        return clip_scores(self.image_embeds(arr), self.text_embeds(prompts))

    def score(self, images: Any, prompts: Sequence[str], *, clamp: str = "pair") -> float:
        """CLIPScore of images against their prompts (see `clip_score`)."""
        arr = check_images(images)
        if len(prompts) != arr.shape[0]:
            raise ValueError(f"{arr.shape[0]} images but {len(prompts)} prompts")
        return clip_score(self.image_embeds(arr), self.text_embeds(prompts), clamp=clamp)


# LAION's aesthetic predictor (github.com/christophschuhmann/improved-aesthetic-predictor,
# sac+logos+ava1-l14-linearMSE.pth): an nn.Sequential whose Linear layers sit at these indices
# (Dropout between them, no activation), on CLIP ViT-L/14's 768-d image embedding, L2-normalised.
AESTHETIC_LINEAR_LAYERS = (0, 2, 4, 6, 7)


class AestheticScorer:
    """The LAION aesthetic score (the paper's AES) of images: the predictor's affine layers in
    float64 on a CLIP model's L2-normalised image embeddings.

    Args:
        predictor: the predictor's state-dict file (``torch.save`` of its MLP, keys
            ``layers.{0,2,4,6,7}.{weight,bias}``).
        clip: the `CLIPScorer` of the CLIP model it was trained on (ViT-L/14 for LAION's), or
            several: the first whose embedding width is the predictor's input is used.
    """

    def __init__(self, predictor: str, clip: "CLIPScorer | Sequence[CLIPScorer]"):
        _require_file(predictor, "aesthetic predictor (.pth state dict)")
        import torch  # pylint: disable=g-import-not-at-top

        try:
            state = torch.load(predictor, map_location="cpu", weights_only=True)
        except Exception as e:  # a pickle, zip or truncation error: one message naming the file
            raise ValueError(f"not a torch state dict ({e})") from e
        state = state.get("state_dict", state) if isinstance(state, dict) else state
        keys = [f"layers.{i}.{p}" for i in AESTHETIC_LINEAR_LAYERS for p in ("weight", "bias")]
        missing = [k for k in keys if k not in state]
        if missing:
            raise ValueError(f"not LAION's aesthetic predictor: no {', '.join(missing[:3])}")
        self.layers = [(state[f"layers.{i}.weight"].double().numpy(), state[f"layers.{i}.bias"].double().numpy())
                       for i in AESTHETIC_LINEAR_LAYERS]
        clips = [clip] if isinstance(clip, CLIPScorer) else list(clip)
        width = self.layers[0][0].shape[1]
        self.clip = next((c for c in clips if c.model.config.projection_dim == width), None)
        if self.clip is None:
            given = ", ".join(f"{c.model.config.projection_dim}-d" for c in clips)
            raise ValueError(f"the predictor takes {width}-d embeddings, the CLIP model gives "
                             f"{given} (LAION's takes CLIP ViT-L/14's 768)")

    def scores(self, images: Any) -> np.ndarray:
        """Per-image aesthetic score (N,)."""
        x = self.clip.image_embeds(check_images(images)).astype(np.float64)
        x = x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)
        for w, b in self.layers:
            x = x @ w.T + b
        return x[:, 0]


class TorchFeatures:
    """Wraps a torch module (N, 3, H, W) -> features as a numpy feature function on NHWC images.

    pixel_range is what the module expects: "[-1,1]", "[0,1]" or "[0,255]" (the last rounded to
    integers, as images saved to PNG would be); size, if given, bilinearly resizes first.
    """

    def __init__(self, module: Any, *, pixel_range: str = "[-1,1]", size: int | None = None,
                 call_kwargs: Mapping[str, Any] | None = None, device: str = "cpu",
                 batch_size: int = 50):
        if pixel_range not in PIXEL_RANGES:
            raise ValueError(f"pixel_range must be one of {PIXEL_RANGES}, got {pixel_range!r}")
        import torch  # pylint: disable=g-import-not-at-top
        self.torch, self.module = torch, module.eval().to(device)
        self.pixel_range, self.size, self.device = pixel_range, size, device
        self.call_kwargs, self.batch_size = dict(call_kwargs or {}), batch_size

    @classmethod
    def from_torchscript(cls, path: str, **kwargs: Any) -> "TorchFeatures":
        """Loads a TorchScript file (torch.jit.save), or a hub repo's one, as the feature network."""
        path = hub.torchscript_file(path).path
        _require_file(path, "TorchScript feature network")
        import torch  # pylint: disable=g-import-not-at-top
        return cls(torch.jit.load(path, map_location=kwargs.get("device", "cpu")), **kwargs)

    def _prepare(self, images: np.ndarray):
        x = signed_float(images)
        if x.shape[-1] == 1:
            x = np.repeat(x, 3, axis=-1)
        if self.pixel_range == "[0,1]":
            x = (x + 1.0) / 2.0
        elif self.pixel_range == "[0,255]":
            x = image_utils.to_uint8(x).astype(np.float32)
        t = self.torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2))).to(self.device)
        if self.size is not None and tuple(t.shape[2:]) != (self.size, self.size):
            t = self.torch.nn.functional.interpolate(t, size=(self.size, self.size),
                                                     mode="bilinear", align_corners=False)
        return t

    def __call__(self, images: Any) -> np.ndarray:
        """Features (N, F) float64 (trailing singleton dims, e.g. pool3's 1x1, flattened)."""
        arr, out = check_images(images), []
        for i in range(0, len(arr), self.batch_size):
            with self.torch.no_grad():
                feats = self.module(self._prepare(arr[i:i + self.batch_size]), **self.call_kwargs)
            out.append(feats.reshape(feats.shape[0], -1).double().cpu().numpy())
        return np.concatenate(out)


class InceptionFeatures(TorchFeatures):
    """Inception-v3 pool features from a TorchScript file, by default NVIDIA's FID export.

    Defaults fit `inception-2015-12-05.pt` (StyleGAN2-ADA/3 metrics, clean-fid): it takes
    images in [0, 255], resizes to 299 itself and returns 2048-d features with
    return_features=True. For another export pass its pixel_range / size / call_kwargs.
    """

    def __init__(self, path: str, *, pixel_range: str = "[0,255]", size: int | None = None,
                 call_kwargs: Mapping[str, Any] | None = None, device: str = "cpu",
                 batch_size: int = 50):
        path = hub.torchscript_file(path).path  # a local file, or a hub repo holding one
        _require_file(path, "Inception TorchScript file")
        import torch  # pylint: disable=g-import-not-at-top
        kwargs = {"return_features": True} if call_kwargs is None else call_kwargs
        super().__init__(torch.jit.load(path, map_location=device), pixel_range=pixel_range,
                         size=size, call_kwargs=kwargs, device=device, batch_size=batch_size)


def batched_features(feature_fn: Callable[[np.ndarray], Any], images: Any,
                     batch_size: int = 50) -> np.ndarray:
    """Runs feature_fn over images in batches -> float64 (N, F)."""
    arr = check_images(images)
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    out = []
    for i in range(0, len(arr), batch_size):
        f = np.asarray(feature_fn(arr[i:i + batch_size]), np.float64)
        out.append(f.reshape(f.shape[0], -1))
    return np.concatenate(out)


def fid_from_feature_fn(feature_fn: Callable[[np.ndarray], Any], images_a: Any, images_b: Any,
                        batch_size: int = 50) -> float:
    """Fréchet distance between the feature_fn features of two image sets (FID with Inception)."""
    return frechet_distance(batched_features(feature_fn, images_a, batch_size),
                            batched_features(feature_fn, images_b, batch_size))


# --------------------------------------------------------------------------- latency


def _block(tree: Any) -> Any:
    """Waits for every JAX array in tree (other leaves pass through)."""
    for leaf in jax.tree_util.tree_leaves(tree):
        if hasattr(leaf, "block_until_ready"):
            leaf.block_until_ready()
    return tree


def _leading_dim(tree: Any) -> int:
    leaves = [x for x in jax.tree_util.tree_leaves(tree) if getattr(x, "ndim", 0) >= 1]
    if not leaves:
        raise ValueError("cannot infer the batch size from the outputs: pass batch=")
    return int(leaves[0].shape[0])


def time_per_image(fn: Callable[..., Any], *args: Any, repeats: int = 5,
                   batch: int | None = None) -> float:
    """Median wall seconds per image of fn(*args), after one untimed (compiling) call.

    Results are blocked on, since JAX dispatch is asynchronous. The batch size is the leading
    dimension of the first array output unless given.
    """
    if repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats}")
    out = _block(fn(*args))  # compile + first run; excluded
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        _block(fn(*args))
        times.append(time.perf_counter() - start)
    n = batch if batch is not None else _leading_dim(out)
    return float(np.median(times)) / n
