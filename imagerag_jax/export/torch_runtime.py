"""PyTorch runtime for an exported ImageRAGTurbo folder (``imagerag_jax.export.to_diffusers``): adapter, hook, pipeline.

    import torch
    from imagerag_jax.export import torch_runtime as rt
    pipe = rt.ImageRAGTurboPipeline.from_pretrained("export/", database="W/db", index="W/index")
    out = pipe(["a handwritten digit seven"], generator=torch.Generator().manual_seed(0))
    rt.to_uint8(out.images)                     # (B, H, W, 3) uint8

The same math as the JAX path (``sampling.retrieved_hspace`` + ``sampling.imagerag_one_step``),
in diffusers' NCHW layout: the retrieved neighbours' H-space is the frozen UNet's mid-block output
for (z0_retr, t = 0, retrieved prompt embeds); one UNet step at t = 999 from x_t = noise runs with
a forward hook on ``unet.mid_block`` that returns h + lambda * adapter(h, h_retr) (Eq. 4-5); the
output becomes x0 with the scheduler's alphas and is decoded by the VAE.

torch, diffusers and transformers are needed here only: nothing in the package imports this module.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
from typing import Any, Iterator, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from imagerag_jax import jsonfiles
from imagerag_jax.models.adapter import BLOCKS, POSITIONAL, sincos_2d
from imagerag_jax.retrieval.retriever import Retriever
from imagerag_jax.weights import to_torch


# ---------------------------------------------------------------------------------------------
# The adapter (models/adapter.py in PyTorch).
# ---------------------------------------------------------------------------------------------


class AdapterTransformer(nn.Module):
    """SD's spatial transformer block returning its edit (no residual): GroupNorm, linear proj_in,
    diffusers' ``BasicTransformerBlock`` (self-attention, cross-attention to the context tokens,
    GEGLU), proj_out. Names as diffusers' ``Transformer2DModel``; models/layers.Transformer2D
    with ``residual=False``. NCHW in and out."""

    def __init__(self, channels: int, num_heads: int, head_dim: int, *, groups: int,
                 upcast_attention: bool, layer_norm_eps: float):
        super().__init__()
        from diffusers.models.attention import BasicTransformerBlock

        inner = num_heads * head_dim
        self.norm = nn.GroupNorm(groups, channels, eps=1e-6)
        self.proj_in = nn.Linear(channels, inner)
        self.transformer_blocks = nn.ModuleList([BasicTransformerBlock(
            inner, num_heads, head_dim, cross_attention_dim=channels, activation_fn="geglu",
            upcast_attention=upcast_attention, norm_eps=layer_norm_eps)])
        self.proj_out = nn.Linear(inner, channels)

    def forward(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        b, c, hh, ww = x.shape
        h = self.proj_in(self.norm(x).flatten(2).transpose(1, 2))
        for block in self.transformer_blocks:
            h = block(h, encoder_hidden_states=context)
        return self.proj_out(h).transpose(1, 2).reshape(b, c, hh, ww)


class HSpaceAdapter(nn.Module):
    """Cross-attention from target H-space tokens to the k retrieved maps' tokens (paper Eq. 4).

    Parameter names are those of the exported state dict: norm_tgt, norm_retr (LayerNorm),
    to_q, to_k, to_v (no bias), to_out (with bias). Inputs and output are NCHW. ``positional``
    'sincos' adds models/adapter.sincos_2d's fixed table to the normalised tokens, as the JAX module.
    ``block='transformer'`` (the paper's adapter, models/adapter.py): norm_retr, then
    ``AdapterTransformer`` named ``transformer`` on the target map with the neighbours' tokens as
    its cross-attention context.
    """

    def __init__(self, channels: int, num_heads: int, head_dim: int | None = None, *,
                 pre_norm: bool = True, upcast_attention: bool = False, layer_norm_eps: float = 1e-5,
                 positional: str = "none", block: str = "attention", groups: int = 32):
        super().__init__()
        if head_dim is None:
            if channels % num_heads:
                raise ValueError(f"{channels} channels cannot be split into {num_heads} heads")
            head_dim = channels // num_heads
        self.channels, self.num_heads, self.head_dim = channels, num_heads, head_dim
        if positional not in POSITIONAL:
            raise ValueError(f"unknown adapter positional {positional!r}; choose one of {POSITIONAL}")
        if block not in BLOCKS:
            raise ValueError(f"unknown adapter block {block!r}; choose one of {BLOCKS}")
        self.pre_norm, self.upcast_attention, self.positional = pre_norm, upcast_attention, positional
        self.block = block
        self.config: dict[str, Any] = {}
        inner = num_heads * head_dim
        if block == "transformer":
            if pre_norm:
                self.norm_retr = nn.LayerNorm(channels, eps=layer_norm_eps)
            self.transformer = AdapterTransformer(channels, num_heads, head_dim, groups=groups,
                                                  upcast_attention=upcast_attention,
                                                  layer_norm_eps=layer_norm_eps)
            return
        if pre_norm:
            self.norm_tgt = nn.LayerNorm(channels, eps=layer_norm_eps)
            self.norm_retr = nn.LayerNorm(channels, eps=layer_norm_eps)
        self.to_q = nn.Linear(channels, inner, bias=False)
        self.to_k = nn.Linear(channels, inner, bias=False)
        self.to_v = nn.Linear(channels, inner, bias=False)
        self.to_out = nn.Linear(inner, channels)

    def forward(self, h_tgt: torch.Tensor, h_retr: torch.Tensor) -> torch.Tensor:
        """(B,C,h,w), (B,k,C,h',w') [or (B,C,h',w') for k=1] -> delta (B,C,h,w)."""
        if h_retr.ndim == 4:
            h_retr = h_retr[:, None]
        if h_tgt.ndim != 4 or h_retr.ndim != 5:
            raise ValueError(f"expected h_tgt (B,C,h,w) and h_retr (B,k,C,h,w); got "
                             f"{tuple(h_tgt.shape)}, {tuple(h_retr.shape)}")
        b, c, hh, ww = h_tgt.shape
        if h_retr.shape[0] != b or h_retr.shape[2] != c:
            raise ValueError(f"h_retr {tuple(h_retr.shape)} does not match h_tgt {tuple(h_tgt.shape)} "
                             "in batch/channels")
        dtype = next(self.parameters()).dtype
        # Token order as the JAX (NHWC) module: row-major over (h, w); neighbours k-major.
        kv_in = h_retr.permute(0, 1, 3, 4, 2).reshape(b, -1, c).to(dtype)
        if self.block == "transformer":
            if self.pre_norm:
                kv_in = self.norm_retr(kv_in)
            return self.transformer(h_tgt.to(dtype), kv_in)
        q_in = h_tgt.flatten(2).transpose(1, 2).to(dtype)
        if self.pre_norm:
            q_in, kv_in = self.norm_tgt(q_in), self.norm_retr(kv_in)
        if self.positional == "sincos":
            k_maps, rh, rw = h_retr.shape[1], h_retr.shape[3], h_retr.shape[4]
            q_in = q_in + torch.from_numpy(sincos_2d(hh, ww, c)).to(q_in)
            kv_in = kv_in + torch.from_numpy(sincos_2d(rh, rw, c)).repeat(k_maps, 1).to(kv_in)
        split = lambda t: t.view(b, t.shape[1], self.num_heads, self.head_dim).transpose(1, 2)
        q, k, v = split(self.to_q(q_in)), split(self.to_k(kv_in)), split(self.to_v(kv_in))
        if self.upcast_attention:
            q, k, v = q.float(), k.float(), v.float()
        out = F.scaled_dot_product_attention(q, k, v).to(dtype)
        out = self.to_out(out.transpose(1, 2).reshape(b, hh * ww, self.num_heads * self.head_dim))
        return out.transpose(1, 2).reshape(b, c, hh, ww)


def load_adapter(path: str, *, device: str | torch.device | None = None,
                 dtype: torch.dtype = torch.float32) -> HSpaceAdapter:
    """The adapter of an export folder (or its adapter/ folder); ``adapter.config`` has its config."""
    from safetensors.torch import load_file

    folder = path if os.path.isfile(os.path.join(path, "config.json")) else os.path.join(path, "adapter")
    cfg_path = os.path.join(folder, "config.json")
    if not os.path.isfile(cfg_path):
        raise FileNotFoundError(f"{path} has no adapter (expected {cfg_path})")
    cfg = jsonfiles.read_versioned(cfg_path, to_torch.ADAPTER_FORMAT, to_torch.ADAPTER_VERSION,
                                   what="adapter config")
    adapter = HSpaceAdapter(cfg["channels"], cfg["num_heads"], cfg["head_dim"], pre_norm=cfg["pre_norm"],
                            upcast_attention=cfg["upcast_attention"],
                            layer_norm_eps=cfg["layer_norm_eps"],
                            positional=cfg.get("positional", "none"),
                            block=cfg.get("block", "attention"), groups=cfg.get("groups", 32))
    adapter.load_state_dict(load_file(os.path.join(folder, to_torch.ADAPTER_WEIGHTS)), strict=True)
    adapter.config = cfg
    return adapter.to(device=device, dtype=dtype).eval()


def retrieval_lambda(pooled_tgt: torch.Tensor, pooled_retr: torch.Tensor, mode: str = "mean") -> torch.Tensor:
    """Eq. 5's lambda: (B,) mean over k of cos(pooled_tgt (B,D), pooled_retr (B,k,D)); (B,k) per neighbour."""
    if mode not in ("mean", "per_neighbour"):
        raise ValueError(f"unknown lambda mode {mode!r}")
    unit = lambda x: x * torch.rsqrt(torch.clamp(x.float().square().sum(-1, keepdim=True), min=1e-24))
    sims = torch.einsum("bd,bkd->bk", unit(pooled_tgt.float()), unit(pooled_retr.float()))
    return sims if mode == "per_neighbour" else sims.mean(-1)


def inject(h: torch.Tensor, delta: torch.Tensor, lam: torch.Tensor | float) -> torch.Tensor:
    """Eq. 5: h + lambda * delta, lambda a scalar or per-example (B,); keeps h's dtype."""
    lam = torch.as_tensor(lam, device=h.device)
    if lam.ndim:
        lam = lam.reshape(lam.shape[0], *([1] * (h.ndim - 1)))
    return (h + lam * delta).to(h.dtype)


# ---------------------------------------------------------------------------------------------
# The UNet's H-space, and the hook that edits it.
# ---------------------------------------------------------------------------------------------


class _Captured(Exception):
    """Carries the mid-block output out of the UNet's forward (stops the decoder from running)."""

    def __init__(self, h: torch.Tensor):
        super().__init__("H-space captured")
        self.h = h


def unet_hspace(unet: nn.Module, sample: torch.Tensor, timesteps: torch.Tensor,
                context: torch.Tensor) -> torch.Tensor:
    """The UNet encoder's output (the mid block's, before any adapter hook), as diffusers computes it."""

    def capture(module, args, output):
        raise _Captured(output)

    # Prepended: runs before an adapter hook on the same block, so h is the unedited one.
    handle = unet.mid_block.register_forward_hook(capture, prepend=True)
    try:
        unet(sample, timesteps, encoder_hidden_states=context)
    except _Captured as c:
        return c.h
    finally:
        handle.remove()
    raise RuntimeError("the UNet's forward never reached its mid block")


def retrieved_hspace(unet: nn.Module, latents: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
    """H-space of every neighbour: (B,k,c,h,w) latents + (B,k,L,D) embeds at t = 0 -> (B,k,C,h',w')."""
    b, k = latents.shape[:2]
    if tuple(context.shape[:2]) != (b, k):
        raise ValueError(f"context {tuple(context.shape)} does not match latents {tuple(latents.shape)}")
    dtype = unet.dtype
    x = latents.reshape(b * k, *latents.shape[2:]).to(dtype)
    ctx = context.reshape(b * k, *context.shape[2:]).to(dtype)
    t = torch.zeros((b * k,), dtype=torch.long, device=x.device)
    h = unet_hspace(unet, x, t, ctx)
    return h.reshape(b, k, *h.shape[1:])


class AdapterHook:
    """A forward hook on ``unet.mid_block``: h -> h + lambda * adapter(h, h_retr) inside ``retrieval``.

        hook = attach_adapter(unet, adapter)
        with hook.retrieval(h_retr, lam):
            eps = unet(x_t, t, encoder_hidden_states=ctx).sample
        hook.remove()

    Outside ``retrieval`` the UNet is unchanged. The UNet's batch must equal h_retr's (no CFG
    doubling: ImageRAGTurbo's one step runs without guidance).
    """

    def __init__(self, unet: nn.Module, adapter: HSpaceAdapter):
        self.unet, self.adapter = unet, adapter
        self.h_retr: torch.Tensor | None = None
        self.lam: torch.Tensor | float | None = None
        self._handle = unet.mid_block.register_forward_hook(self._hook)

    def _hook(self, module: nn.Module, args: Any, output: torch.Tensor) -> torch.Tensor | None:
        if self.h_retr is None:
            return None
        return inject(output, self.adapter(output, self.h_retr), self.lam)

    @contextlib.contextmanager
    def retrieval(self, h_retr: torch.Tensor, lam: torch.Tensor | float) -> Iterator[None]:
        """Edits the H-space with these neighbours (B,k,C,h,w) and lambda (scalar or (B,)) inside."""
        self.h_retr, self.lam = h_retr, lam
        try:
            yield
        finally:
            self.h_retr, self.lam = None, None

    def remove(self) -> None:
        """Detaches the hook."""
        self._handle.remove()


def attach_adapter(unet: nn.Module, adapter: HSpaceAdapter) -> AdapterHook:
    """Registers the adapter hook on ``unet.mid_block`` (inactive until ``hook.retrieval(...)``)."""
    return AdapterHook(unet, adapter)


def predict_x0(model_output: torch.Tensor, x_t: torch.Tensor, timesteps: torch.Tensor,
               alphas_cumprod: torch.Tensor, prediction_type: str = "epsilon") -> torch.Tensor:
    """Clean-sample estimate (schedule.predict_x0): eps, v or sample prediction."""
    acp = alphas_cumprod.to(x_t.device)[timesteps].float().reshape(-1, *([1] * (x_t.ndim - 1)))
    alpha, sigma = acp.sqrt(), (1.0 - acp).sqrt()
    out, x = model_output.float(), x_t.float()
    if prediction_type == "epsilon":
        return (x - sigma * out) / alpha
    if prediction_type == "v_prediction":
        return alpha * x - sigma * out
    if prediction_type == "sample":
        return out
    raise ValueError(f"unknown prediction_type {prediction_type!r}")


# ---------------------------------------------------------------------------------------------
# The one-step pipeline.
# ---------------------------------------------------------------------------------------------


@dataclasses.dataclass
class ImageRAGTurboOutput:
    """Images in [-1, 1] (B,3,H,W), x0 latents (B,c,h,w), and what was retrieved."""

    images: torch.Tensor | None
    latents: torch.Tensor
    retrieved_ids: np.ndarray | None
    retrieval_scores: np.ndarray | None
    lam: torch.Tensor | None


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """(B,3,H,W) in [-1, 1] -> (B,H,W,3) uint8."""
    x = ((images.detach().float().cpu().clamp(-1, 1) + 1.0) * 127.5).round()
    return x.permute(0, 2, 3, 1).numpy().astype(np.uint8)


class ImageRAGTurboPipeline:
    """Prompt -> text encoder -> index search -> one UNet step with the adapter -> VAE decode.

    ``database``/``index``: our retrieval DB and its saved index (``retrieval/database.py``,
    ``retrieval/index.py``; paths or opened objects), built with this export's text encoder and
    VAE. Without them, or with k = 0, it is plain one-step SD-Turbo.
    """

    def __init__(self, unet: nn.Module, vae: nn.Module, text_encoder: nn.Module | None, tokenizer: Any,
                 alphas_cumprod: torch.Tensor, prediction_type: str, adapter: HSpaceAdapter, *,
                 database: Any = None, index: Any = None, timestep: int | None = None,
                 k: int | None = None):
        self.unet, self.vae, self.text_encoder, self.tokenizer = unet, vae, text_encoder, tokenizer
        self.alphas_cumprod, self.prediction_type = alphas_cumprod, prediction_type
        self.adapter = adapter
        self.hook = attach_adapter(unet, adapter)
        self.database, self.index = _open_database(database), _open_index(index)
        if self.database is not None and self.index is not None and self.index.count != self.database.count:
            raise ValueError(f"index ({self.index.count} entries) does not match the database "
                             f"({self.database.count})")
        self.timestep = int(timestep if timestep is not None else adapter.config.get("timestep", 999))
        self.k = int(k if k is not None else adapter.config.get("k") or 1)

    @classmethod
    def from_pretrained(cls, path: str, *, database: Any = None, index: Any = None,
                        device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32,
                        k: int | None = None) -> "ImageRAGTurboPipeline":
        """Loads an export folder: unet/, vae/, text_encoder/, tokenizer/, scheduler/, adapter/."""
        import diffusers
        import transformers

        load = lambda cls_, sub: cls_.from_pretrained(os.path.join(path, sub),
                                                      torch_dtype=dtype).to(device).eval()
        unet = load(diffusers.UNet2DConditionModel, "unet")
        vae = load(diffusers.AutoencoderKL, "vae")
        text = tokenizer = None
        if os.path.isdir(os.path.join(path, "text_encoder")):
            text = transformers.CLIPTextModel.from_pretrained(os.path.join(path, "text_encoder"))
            text = text.to(device, dtype).eval()
        if os.path.isdir(os.path.join(path, "tokenizer")):
            tokenizer = transformers.CLIPTokenizer.from_pretrained(os.path.join(path, "tokenizer"))
        with open(os.path.join(path, "scheduler", "scheduler_config.json")) as f:
            sched_cfg = json.load(f)
        scheduler = getattr(diffusers, sched_cfg.get("_class_name", "DDPMScheduler")).from_config(sched_cfg)
        adapter = load_adapter(path, device=device, dtype=dtype)
        return cls(unet, vae, text, tokenizer, scheduler.alphas_cumprod,
                   scheduler.config.prediction_type, adapter, database=database, index=index, k=k)

    @property
    def device(self) -> torch.device:
        return self.unet.device

    @torch.no_grad()
    def encode_prompt(self, prompts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """(prompt embeds (B,L,D): last hidden state, L2-normalised pooled (B,D)) as the DB stores them."""
        if self.text_encoder is None or self.tokenizer is None:
            raise ValueError("this export has no text encoder/tokenizer: pass prompt embeds to denoise()")
        ids = self.tokenizer(list(prompts), padding="max_length", truncation=True,
                             max_length=self.tokenizer.model_max_length, return_tensors="pt").input_ids
        out = self.text_encoder(ids.to(self.device))
        pooled = out.pooler_output.float()
        pooled = pooled / pooled.norm(dim=-1, keepdim=True).clamp(min=1e-12)
        return out.last_hidden_state, pooled

    def retrieve(self, pooled: torch.Tensor, k: int) -> dict[str, Any]:
        """Top-k DB entries per query: latents (B,k,c,h,w), prompt_embeds, pooled, ids and scores."""
        if self.database is None or self.index is None:
            raise ValueError("no retrieval database/index: pass database= and index=")
        got = Retriever(self.database, self.index).retrieve(pooled.detach().float().cpu().numpy(), k)
        ids, scores = got["ids"], got["scores"]
        as_t = lambda x: torch.from_numpy(np.asarray(x, np.float32)).to(self.device)
        # The DB stores NHWC latents (the JAX layout); diffusers wants NCHW.
        latents = as_t(got["latents"]).permute(0, 1, 4, 2, 3).contiguous()
        return {"latents": latents, "prompt_embeds": as_t(got["prompt_embeds"]),
                "pooled": as_t(got["pooled"]), "ids": ids, "scores": scores}

    @torch.no_grad()
    def denoise(self, noise: torch.Tensor, prompt_embeds: torch.Tensor,
                retr_latents: torch.Tensor | None = None, retr_embeds: torch.Tensor | None = None,
                lam: torch.Tensor | float | None = None) -> torch.Tensor:
        """x0 (B,c,h,w) of one UNet step at ``self.timestep`` from x_t = noise, adapter-edited H-space.

        ``retr_latents`` (B,k,c,h,w) and ``retr_embeds`` (B,k,L,D) are the neighbours, ``lam`` a
        scalar or (B,) (``retrieval_lambda``; 1 when None). Without neighbours it is the plain
        one-step output.
        """
        dtype = self.unet.dtype
        x = noise.to(self.device, dtype)
        ctx = prompt_embeds.to(self.device, dtype)
        t = torch.full((x.shape[0],), self.timestep, dtype=torch.long, device=x.device)
        if retr_latents is None:
            out = self.unet(x, t, encoder_hidden_states=ctx).sample
        else:
            h_retr = retrieved_hspace(self.unet, retr_latents.to(self.device), retr_embeds.to(self.device))
            with self.hook.retrieval(h_retr, 1.0 if lam is None else lam):
                out = self.unet(x, t, encoder_hidden_states=ctx).sample
        return predict_x0(out, x, t, self.alphas_cumprod, self.prediction_type)

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Scaled latents -> images in [-1, 1] (B,3,H,W)."""
        cfg = self.vae.config
        # The torch mirror of AutoencoderKL.decode_latents (models/vae.py): unscale, then decode.
        z = latents.to(self.vae.dtype) / cfg.scaling_factor + (getattr(cfg, "shift_factor", None) or 0.0)
        return self.vae.decode(z).sample.clamp(-1.0, 1.0)

    @torch.no_grad()
    def __call__(self, prompts: Sequence[str] | str, *, noise: torch.Tensor | None = None,
                 generator: torch.Generator | None = None, k: int | None = None,
                 latent_size: tuple[int, int] | None = None, decode: bool = True) -> ImageRAGTurboOutput:
        """One-step ImageRAGTurbo images for ``prompts`` (noise (B,c,h,w) drawn from ``generator`` if None)."""
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        k = self.k if k is None else int(k)
        embeds, pooled = self.encode_prompt(prompts)
        if noise is None:
            if latent_size is None:
                latent_size = (tuple(self.database.shapes["latents"][:2]) if self.database is not None
                               else (self.unet.config.sample_size,) * 2)
            shape = (len(prompts), self.unet.config.in_channels, *latent_size)
            noise = torch.randn(shape, generator=generator, dtype=torch.float32).to(self.device)
        if k > 0 and self.database is not None:
            retr = self.retrieve(pooled, k)
            lam = retrieval_lambda(pooled, retr["pooled"])
            latents = self.denoise(noise, embeds, retr["latents"], retr["prompt_embeds"], lam)
            ids, scores = retr["ids"], retr["scores"]
        else:
            latents, ids, scores, lam = self.denoise(noise, embeds), None, None, None
        return ImageRAGTurboOutput(images=self.decode(latents) if decode else None, latents=latents,
                                   retrieved_ids=ids, retrieval_scores=scores, lam=lam)


def _open_database(database: Any) -> Any:
    """A retrieval Database from a path (or the object itself)."""
    if database is None or not isinstance(database, (str, os.PathLike)):
        return database
    from imagerag_jax.retrieval.database import Database

    return Database(os.fspath(database))


def _open_index(index: Any) -> Any:
    """A retrieval Index from a saved folder (or the object itself)."""
    if index is None or not isinstance(index, (str, os.PathLike)):
        return index
    from imagerag_jax.retrieval.index import Index

    return Index.load(os.fspath(index))
