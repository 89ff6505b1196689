"""ImageRAGTurbo generation in JAX: prompt -> text encoder -> retrieval -> H-space adapter -> one step.

    from imagerag_jax.inference import rag
    pipe = rag.RagPipeline.from_run("/tmp/imagerag/train")            # the run's DB and index
    out = pipe(["a red square"], seed=0)           # out.images (B,H,W,3) in [-1,1], out.ids, out.lam
    pipe = rag.RagPipeline.from_export(DIR, database=DB, index=IDX)   # an `export` folder
    pipe = rag.RagPipeline.from_weights(SD_TURBO, database=DB, index=IDX)   # no adapter: injection

Modes: 'adapter' (the trained cross-attention adapter, h = h_tgt + λ·adapter(h_tgt, h_retr), Eq. 5),
'inject' (training-free slerp of the top neighbour's H-space with weight w, Eq. 3) and 'none'
(plain one step). The text encoder runs in one jit, the search on the host
(``retrieval/index.py``: ScaNN, exact or BM25 over the DB captions), and everything after it
(neighbours' H-space or the H-space cache, adapter, UNet, VAE decode) in one more jit whose batch
is padded to the local device count and sharded over them.

``dtype='bfloat16'`` (CLI ``--dtype``) computes the UNet, the adapter and the VAE in bf16 from the
same float32 params: the text encoder, the pooled-text cosine lambda and the search stay float32
(so bf16 retrieves the same neighbours as float32), and the H-space cache, keyed by the float32
params' fingerprint, is built in float32 and serves both.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import tempfile
import time
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

from imagerag_jax import jsonfiles, sharding, storage
from imagerag_jax.retrieval import hspace_cache
from imagerag_jax.diffusion import sampling
from imagerag_jax.weights import towers
from imagerag_jax.diffusion import schedule as schedule_lib
from imagerag_jax.errors import UserError
from imagerag_jax.models import adapter as adapter_lib
from imagerag_jax.retrieval import database as db_lib
from imagerag_jax.retrieval import index as index_lib
from imagerag_jax.retrieval import retriever as retriever_lib

MODES = ("adapter", "inject", "none")
COMPUTE_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}
DEFAULT_INJECTION_WEIGHT = 0.8  # the paper's fixed-w row (Sec. 3.2)


@dataclasses.dataclass
class RagOutput:
    """Images, latents and what was retrieved for one call."""

    images: np.ndarray | None  # (B,H,W,3) float32 in [-1, 1]; None when decode=False
    latents: np.ndarray  # (B,h,w,c) x0 latents
    ids: np.ndarray | None  # (B,k) DB ids of the neighbours; None in mode 'none'
    captions: list[list[str]] | None  # [B][k] the neighbours' captions
    scores: np.ndarray | None  # (B,k) index scores (dot products; BM25 scores for 'bm25')
    lam: np.ndarray | None  # (B,) λ: mean pooled-text cosine to the k neighbours
    w: float | None  # the injection weight of mode 'inject'
    mode: str
    seconds: dict[str, float]  # text, retrieval, denoise (incl. decode), total
    used_cache: bool  # the H-space cache supplied the neighbours' H-space
    prompts: list[str] = dataclasses.field(default_factory=list)


def check_database(db: db_lib.Database, *, encoders: db_lib.Encoders, latent_channels: int,
                   embed_dim: int) -> None:
    """Refuses a DB built with another text encoder, VAE or latent/embedding shape than the pipeline's."""
    latents, embeds = db.shapes["latents"], db.shapes["prompt_embeds"]
    if latents[-1] != latent_channels:
        raise db_lib.DatabaseError(
            f"{db.path} holds latents of shape {tuple(latents)}, but the pipeline's UNet takes "
            f"{latent_channels} channels: it was built with another VAE; rebuild it with this one")
    if embeds[-1] != embed_dim:
        raise db_lib.DatabaseError(
            f"{db.path} holds prompt embeddings of width {embeds[-1]}, but the pipeline's text "
            f"encoder gives {embed_dim}: it was built with another text encoder; rebuild it")
    db_lib.check_encoders(db.path, db.manifest, encoders)


def _open_retrieval(database: Any, index: Any) -> tuple[retriever_lib.Retriever | None, str | None]:
    """(Retriever, index path) from paths or opened objects; both or neither."""
    if (database is None) != (index is None):
        raise UserError("retrieval needs both a database and its index (--database DB --index IDX)")
    if database is None:
        return None, None
    # Memory-mapped database, ScaNN files: a URL (gs://...) is read from a local copy.
    if isinstance(database, str) and storage.is_url(database):
        database = storage.stage(database, what="retrieval database")
    if isinstance(index, str) and storage.is_url(index):
        index = storage.stage(index, what="index")
    if isinstance(index, index_lib.Index):
        return retriever_lib.Retriever.open(database, index), "(in memory)"
    path = os.fspath(index)
    if not os.path.isfile(os.path.join(path, index_lib.META)):
        raise UserError(f"{path} is not a saved index (no {index_lib.META}); build one with build-db")
    return retriever_lib.Retriever.open(database, path), path


def _tokenizer_for(tok_dir: str | None, source: str | None) -> Any:
    """The CLIP tokenizer of a folder; the byte tokenizer of the random 'tiny' towers."""
    from imagerag_jax.models.clip_text import Tokenizer
    from imagerag_jax.weights import random_pipeline

    if tok_dir is not None:
        return Tokenizer.from_pretrained(tok_dir)
    if source is not None and source.startswith("random:"):
        with tempfile.TemporaryDirectory(prefix="imagerag-tokenizer-") as tmp:
            return Tokenizer.from_pretrained(random_pipeline.write_byte_tokenizer(tmp))
    raise UserError(f"no tokenizer for the text encoder {source}: pass a tokenizer folder (--tokenizer)")


def _run_retrieval_paths(config: Any, workdir: str) -> tuple[str | None, str | None]:
    """(database, index) paths the run's TFRecord manifest records; (None, None) for synthetic data."""
    from imagerag_jax.data import mixture

    index = (mixture.run_manifest(config, workdir) or {}).get("index") or {}
    return (index.get("database") or {}).get("path"), index.get("path")


def _vae_label(ref: dict[str, Any]) -> str:
    """The label build-db gives a VAE: org/name@<commit> for hub weights, else its absolute path,
    or random:preset:seed."""
    if ref.get("hub"):
        return ref["hub"]
    if ref.get("path"):
        return os.path.abspath(ref["path"])
    return f"random:{ref.get('random_preset')}:{ref.get('seed')}"


def _load_adapter(folder: str) -> tuple[adapter_lib.HSpaceAdapter, dict[str, Any], dict[str, Any]]:
    """(module, params, config) of an export's adapter/ (``weights/to_torch.save_adapter``)."""
    from imagerag_jax.weights import convert, to_torch

    cfg_path = os.path.join(folder, "config.json")
    cfg = jsonfiles.read_versioned(cfg_path, to_torch.ADAPTER_FORMAT, to_torch.ADAPTER_VERSION,
                                   what="adapter config", hint="re-export the run")
    adapter = adapter_lib.from_config(cfg)
    c = int(cfg["channels"])
    h = jnp.zeros((1, 2, 2, c), jnp.float32)
    shapes = convert.param_shapes(lambda: adapter.init(jax.random.PRNGKey(0), h, h[:, None]))
    tensors = convert.iter_safetensors(os.path.join(folder, to_torch.ADAPTER_WEIGHTS))
    params = convert.torch_to_flax(tensors, shapes, component="adapter")
    return adapter, params, cfg


class RagPipeline:
    """Prompts -> ImageRAGTurbo images (see the module docstring); build with a ``from_*`` method."""

    MODES = MODES

    def __init__(self, *, unet: Any, unet_params: Any, vae: Any, vae_params: Any, text: Any,
                 text_params: Any, tokenizer: Any, source: str, text_label: str, vae_label: str,
                 adapter: adapter_lib.HSpaceAdapter | None = None, adapter_params: Any = None,
                 database: Any = None, index: Any = None, k: int | None = None,
                 w: float = DEFAULT_INJECTION_WEIGHT, timestep: int = 999,
                 schedule: schedule_lib.NoiseSchedule | None = None,
                 latent_size: tuple[int, int] | None = None, cache: bool = True,
                 devices: Sequence[jax.Device] | None = None, dtype: str = "float32",
                 steps: int = 1, guidance: float = 0.0, sampler: str = "euler"):
        if dtype not in COMPUTE_DTYPES:
            raise UserError(f"unknown compute dtype {dtype!r}; choose one of {'|'.join(COMPUTE_DTYPES)}")
        if text is None:
            raise UserError(f"{source} has no text encoder: generation needs one (pass --weights of "
                            "a pipeline folder with text_encoder/ and tokenizer/)")
        self.dtype = dtype
        # Mode 'none' may sample in several steps with classifier-free guidance (e.g. the SD 2.1
        # teacher's row, 50 steps at 7.5); the retrieval modes are one-step methods.
        sampling.check_sampler(sampler)
        if int(steps) < 1:
            raise UserError(f"steps must be >= 1, got {steps}")
        self.steps, self.guidance, self.sampler = int(steps), float(guidance), sampler
        self.multistep = self.steps > 1 or self.guidance > 1.0
        # The cache's H-space is the float32 encoder's whatever the compute dtype (one cache per
        # fingerprint); bf16 changes only the modules' compute dtype, never the params.
        self._cache_unet = unet
        if dtype != "float32":
            compute = COMPUTE_DTYPES[dtype]
            unet, vae = unet.clone(dtype=compute), vae.clone(dtype=compute)
            adapter = adapter.clone(dtype=compute) if adapter is not None else None
        self.unet, self.vae, self.text, self.tokenizer = unet, vae, text, tokenizer
        self.adapter, self.source = adapter, source
        self.schedule = schedule or schedule_lib.scaled_linear_schedule()
        self.timestep, self.w = int(timestep), float(w)
        self.retriever, self.index_path = _open_retrieval(database, index)
        self.database = None if self.retriever is None else self.retriever.database
        self.index = None if self.retriever is None else self.retriever.index
        self.k = int(k if k is not None else 1)
        if self.database is not None:
            encoders = db_lib.Encoders(
                towers.module_identity(text_label, text), towers.module_identity(vae_label, vae),
                towers.fingerprint(text_params), towers.fingerprint(vae_params))
            check_database(self.database, encoders=encoders, latent_channels=int(unet.in_channels),
                           embed_dim=int(unet.cross_attention_dim))
            latent_size = tuple(self.database.shapes["latents"][:2])
        self.latent_shape = (*(latent_size or (64, 64)), int(unet.in_channels))
        f = vae.downsample_factor
        self.image_size = (self.latent_shape[0] * f, self.latent_shape[1] * f)
        self.mode = "adapter" if adapter is not None and self.database is not None else (
            "inject" if self.database is not None else "none")
        if self.multistep:
            self.mode = "none"

        devices = list(devices or jax.local_devices())
        self.mesh = sharding.make_mesh((("data", -1),), devices)
        self._batch = NamedSharding(self.mesh, P("data"))
        put = lambda tree: jax.device_put(tree, NamedSharding(self.mesh, P()))
        self._params = put({"unet": unet_params, "vae": vae_params, "text": text_params,
                            "adapter": adapter_params if adapter is not None else {}})
        self.fingerprint = hspace_cache.encoder_fingerprint(unet_params)
        self.cache = None
        if cache and self.database is not None:
            self.cache = hspace_cache.open_cache(self.database.path, fingerprint=self.fingerprint)
            if self.cache is not None:
                logging.info("H-space cache %s: the neighbours' H-space is read, not computed",
                             self.cache.path)
            else:
                logging.info("no H-space cache for this student beside %s: computing the neighbours' "
                             "H-space on the fly (build one with `main build-cache`)", self.database.path)
        self._encode = jax.jit(self._encode_fn)
        if self.guidance > 1.0:  # CFG's unconditional context: the empty prompt's, once
            self._params["uncond"] = self._encode(self._params["text"], self._pad(tokenizer([""])))[0][:1]
        self._denoise = jax.jit(self._denoise_fn, static_argnames=("mode", "cached", "decode"))
        self._decode = jax.jit(lambda vae_p, z: vae.apply({"params": vae_p}, z,
                                                          method=vae.decode_latents).astype(jnp.float32))

    # --- construction -------------------------------------------------------------------------

    @classmethod
    def from_run(cls, workdir: str, step: int | None = None, *, database: Any = None,
                 index: Any = None, k: int | None = None, **kwargs: Any) -> RagPipeline:
        """A training workdir's checkpoint (default: latest) with the towers the trainer resolved.

        The database and index default to those the run's TFRecords were retrieved from.
        """
        from imagerag_jax.export import to_diffusers

        if not storage.isdir(workdir):  # a local folder or a URL (gs://...)
            raise UserError(f"{workdir} is not a folder: pass a training workdir (--run W)")
        run = to_diffusers.load_run(workdir, step)
        text, text_p, tok_dir, text_source = towers.text_tower(run.config)
        if database is None and index is None:
            database, index = _run_retrieval_paths(run.config, workdir)
            if database is None:
                logging.warning("the run records no retrieval database (synthetic data): pass "
                                "database= and index= (--database, --index) to retrieve")
                database = index = None
            else:
                logging.info("the run's database %s, index %s", database, index)
        latent = run.config.synthetic
        return cls(unet=run.student, unet_params=run.merged_unet_params(), vae=run.vae,
                   vae_params=run.vae_params, text=text, text_params=text_p,
                   tokenizer=_tokenizer_for(tok_dir, text_source) if text is not None else None,
                   source=f"run:{run.workdir}@{run.step}", text_label=text_source or "",
                   vae_label=_vae_label(run.frozen_refs.get("vae", {})), adapter=run.adapter,
                   adapter_params=run.adapter_params,
                   database=database, index=index, k=k if k is not None else (run.trained_k or 1),
                   timestep=run.timestep,
                   latent_size=tuple(latent["latent_shape"][:2]) if "latent_shape" in latent else None,
                   **kwargs)

    @classmethod
    def from_export(cls, path: str, *, database: Any = None, index: Any = None,
                    k: int | None = None, **kwargs: Any) -> RagPipeline:
        """An ``export`` folder: its merged UNet, VAE, text encoder, tokenizer and adapter."""
        from imagerag_jax import weights
        from imagerag_jax.export import to_diffusers

        manifest = os.path.join(path, to_diffusers.MANIFEST)
        if not os.path.isfile(manifest):
            raise UserError(f"{path} is not an export folder (no {to_diffusers.MANIFEST}); write one with "
                            "`main export`")
        meta = jsonfiles.read_versioned(manifest, to_diffusers.EXPORT_FORMAT, to_diffusers.EXPORT_VERSION,
                                        what="export manifest", hint="re-export the run")
        unet, unet_p = weights.load_unet(path)
        vae, vae_p = weights.load_vae(path)
        text = text_p = tokenizer = None
        if os.path.isdir(os.path.join(path, "text_encoder")):
            text, text_p = weights.load_text_encoder(path)
            tokenizer = _tokenizer_for(os.path.join(path, "tokenizer") if os.path.isdir(
                os.path.join(path, "tokenizer")) else None, meta.get("text_encoder"))
        adapter, adapter_p, acfg = _load_adapter(os.path.join(path, "adapter"))
        return cls(unet=unet, unet_params=unet_p, vae=vae, vae_params=vae_p, text=text,
                   text_params=text_p, tokenizer=tokenizer, source=f"export:{os.path.abspath(path)}",
                   text_label=meta.get("text_encoder") or "",
                   vae_label=_vae_label((meta.get("frozen") or {}).get("vae", {})), adapter=adapter,
                   adapter_params=adapter_p, database=database, index=index,
                   k=k if k is not None else (acfg.get("k") or 1),
                   timestep=int(acfg.get("timestep", meta.get("timestep", 999))), **kwargs)

    @classmethod
    def from_weights(cls, path: str, *, database: Any = None, index: Any = None,
                     tokenizer: str | None = None, k: int = 1, w: float = DEFAULT_INJECTION_WEIGHT,
                     **kwargs: Any) -> RagPipeline:
        """Any SD 2.x / SD-Turbo weights: with a DB and index, training-free direct injection;
        without, the plain one-step pipeline (mode 'none', the paper's SD-Turbo baseline)."""
        from imagerag_jax import weights

        pipe = weights.load_pipeline(path, tokenizer_path=tokenizer)
        if pipe.tokenizer is None:
            raise UserError(f"{path} has no tokenizer/ folder: pass a tokenizer folder (--tokenizer)")
        label = pipe.source  # the absolute path, or org/name@<commit> for a hub id
        return cls(unet=pipe.unet, unet_params=pipe.unet_params, vae=pipe.vae,
                   vae_params=pipe.vae_params, text=pipe.text_encoder, text_params=pipe.text_params,
                   tokenizer=pipe.tokenizer, source=f"weights:{label}", text_label=label,
                   vae_label=label, database=database, index=index, k=k, w=w, **kwargs)

    # --- the jitted parts ---------------------------------------------------------------------

    def _encode_fn(self, text_p: Any, ids: jax.Array) -> tuple[jax.Array, jax.Array]:
        """Token ids -> (prompt embeds (B,L,D), L2-normalised pooled (B,D)) as the DB stores them."""
        hidden, pooled = self.text.apply({"params": text_p}, ids)
        pooled = pooled.astype(jnp.float32)
        pooled = pooled / jnp.maximum(jnp.linalg.norm(pooled, axis=-1, keepdims=True), 1e-12)
        return hidden, pooled

    def _denoise_fn(self, params: Any, noise: jax.Array, context: jax.Array, pooled: jax.Array,
                    retrieved: dict[str, jax.Array], w: jax.Array, *, mode: str, cached: bool,
                    decode: bool) -> dict[str, jax.Array]:
        """One UNet step (+ the retrieved branch, adapter or injection) and the VAE decode."""
        unet, unet_p = self.unet, params["unet"]
        out = {}
        if mode == "none" and self.multistep:
            uncond = (jnp.broadcast_to(params["uncond"], context.shape).astype(context.dtype)
                      if self.guidance > 1.0 else None)
            x0 = sampling.multistep_sample(lambda x, t, c: unet.apply({"params": unet_p}, x, t, c),
                                           noise, context, uncond, self.schedule, self.sampler,
                                           self.steps, self.guidance, unet.prediction_type)
        elif mode == "none":
            x0 = sampling.hspace_edit_x0(unet, unet_p, noise, self.timestep, context, lambda h: h,
                                         self.schedule, unet.prediction_type)
        else:
            if cached:
                h_retr = retrieved["hspace"].astype(jnp.float32)
            else:
                h_retr = sampling.retrieved_hspace(unet, unet_p,
                                                   retrieved["latents"].astype(jnp.float32),
                                                   retrieved["prompt_embeds"].astype(jnp.float32))
            out["lam"] = adapter_lib.retrieval_lambda(pooled, retrieved["pooled"])
            if mode == "adapter":
                x0 = sampling.imagerag_one_step(unet, unet_p, self.adapter, params["adapter"], noise,
                                                context, h_retr, out["lam"], self.schedule,
                                                unet.prediction_type, timestep=self.timestep)
            else:
                x0 = sampling.direct_injection_one_step(unet, unet_p, noise, context, h_retr[:, 0], w,
                                                        self.schedule, unet.prediction_type,
                                                        timestep=self.timestep)
        out["latents"] = x0.astype(jnp.float32)
        if decode:
            out["images"] = self.vae.apply({"params": params["vae"]}, x0,
                                           method=self.vae.decode_latents).astype(jnp.float32)
        return out

    # --- generation ---------------------------------------------------------------------------

    @property
    def num_devices(self) -> int:
        return self.mesh.devices.size

    def modes(self) -> tuple[str, ...]:
        """The modes this pipeline can run: 'adapter' needs an adapter, both need a database, and
        a multi-step (or guided) pipeline runs 'none' only."""
        if self.database is None or self.multistep:
            return ("none",)
        return MODES if self.adapter is not None else ("inject", "none")

    def noise(self, batch: int, seed: int) -> np.ndarray:
        """(B,h,w,c) float32: prompt j's noise from PRNGKey(seed + j), whatever the batch size."""
        keys = jnp.stack([jax.random.PRNGKey(seed + j) for j in range(batch)])
        return np.asarray(jax.vmap(lambda key: jax.random.normal(key, self.latent_shape))(keys))

    def _pad(self, x: np.ndarray) -> jax.Array:
        """x padded along the batch (with its last row) to a multiple of the device count, sharded."""
        x = np.asarray(x)
        n = -(-len(x) // self.num_devices) * self.num_devices
        if len(x) < n:
            x = np.concatenate([x, np.repeat(x[-1:], n - len(x), axis=0)])
        return jax.device_put(x, self._batch)

    def retrieve(self, prompts: Sequence[str], pooled: np.ndarray, k: int) -> dict[str, Any]:
        """Top-k neighbours: ids, scores, rows, captions and the gathered DB arrays."""
        return self.retriever.retrieve(self.retriever.queries(pooled, prompts), k, captions=True)

    def __call__(self, prompts: Sequence[str] | str, *, seed: int = 0, noise: Any = None,
                 k: int | None = None, mode: str | None = None, w: float | None = None,
                 decode: bool = True) -> RagOutput:
        """One-step images for `prompts` (noise from `seed`, see `noise`, unless given (B,h,w,c))."""
        t_start = time.perf_counter()
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        if not prompts or any(not isinstance(p, str) or not p.strip() for p in prompts):
            raise UserError("every prompt must be a non-empty string")
        mode = mode or self.mode
        if mode not in MODES:
            raise UserError(f"unknown mode {mode!r}; choose one of {'|'.join(MODES)}")
        if mode not in self.modes():
            why = ("multi-step sampling: the retrieval modes are one step" if self.multistep else
                   "no retrieval database/index" if self.database is None else "no trained adapter")
            raise UserError(f"mode {mode!r} needs what this pipeline lacks ({why}); it can run "
                            f"{'|'.join(self.modes())}")
        k = self.k if k is None else int(k)
        if mode != "none" and not 1 <= k <= self.database.count:
            raise UserError(f"k must be in [1, {self.database.count}] (the database size), got {k}")
        w = self.w if w is None else float(w)
        if mode == "inject" and not 0.0 <= w <= 1.0:
            raise UserError(f"the injection weight w must be in [0, 1], got {w}")
        b = len(prompts)
        noise = self.noise(b, seed) if noise is None else np.asarray(noise, np.float32)
        if noise.shape != (b, *self.latent_shape):
            raise UserError(f"noise has shape {noise.shape}, expected {(b, *self.latent_shape)}")

        t0 = time.perf_counter()
        ids = self._pad(self.tokenizer(prompts))
        context, pooled = self._encode(self._params["text"], ids)
        pooled_host = np.asarray(pooled)[:b]
        t1 = time.perf_counter()
        retrieved, got, cached = {}, None, False
        if mode != "none":
            got = self.retrieve(prompts, pooled_host, k)
            cached = self.cache is not None
            retrieved["pooled"] = self._pad(got["pooled"])
            if cached:
                retrieved["hspace"] = self._pad(self.cache.gather(got["rows"]))
            else:
                retrieved["latents"] = self._pad(got["latents"])
                retrieved["prompt_embeds"] = self._pad(got["prompt_embeds"])
        t2 = time.perf_counter()
        out = self._denoise(self._params, self._pad(noise), context, pooled, retrieved,
                            jnp.float32(w), mode=mode, cached=cached, decode=decode)
        out = {name: np.asarray(v)[:b] for name, v in out.items()}
        t3 = time.perf_counter()
        seconds = {"text": t1 - t0, "retrieval": t2 - t1, "denoise": t3 - t2, "total": t3 - t_start}
        return RagOutput(
            images=out.get("images"), latents=out["latents"],
            ids=None if got is None else np.asarray(self.database.ids)[got["rows"]],
            captions=None if got is None else got["captions"],
            scores=None if got is None else np.asarray(got["scores"]), lam=out.get("lam"),
            w=w if mode == "inject" else None, mode=mode, seconds=seconds, used_cache=cached,
            prompts=prompts)

    def neighbour_images(self, ids: np.ndarray) -> np.ndarray:
        """(B,k,H,W,3) in [-1, 1]: the DB latents of `ids` decoded by the pipeline's VAE."""
        if self.database is None:
            raise UserError("this pipeline has no retrieval database")
        ids = np.asarray(ids, np.int64)
        latents = self.database.gather(self.database.rows_for_ids(ids.reshape(-1)))["latents"]
        images = np.asarray(self._decode(self._params["vae"],
                                         self._pad(latents.astype(np.float32))))[:len(latents)]
        return images.reshape(*ids.shape, *images.shape[1:])

    def describe(self) -> dict[str, Any]:
        """What generates: source, retrieval database and index, k, mode, w, cache, devices."""
        return {
            "source": self.source, "mode": self.mode, "modes": list(self.modes()), "k": self.k,
            "w": self.w, "timestep": self.timestep, "latent_shape": list(self.latent_shape),
            "database": None if self.database is None else os.path.abspath(self.database.path),
            "index": self.index_path, "index_kind": None if self.index is None else self.index.kind,
            "hspace_cache": None if self.cache is None else self.cache.path,
            "student_encoder_fingerprint": self.fingerprint, "devices": self.num_devices,
            "dtype": self.dtype, "steps": self.steps, "guidance": self.guidance,
            "sampler": self.sampler if self.multistep else None,
            "adapter": None if self.adapter is None else {
                "block": self.adapter.block,
                "parameters": int(sum(np.size(x) for x in jax.tree.leaves(self._params["adapter"])))},
        }

    def build_cache(self, batch_size: int = 16) -> str:
        """Builds (or resumes) the H-space cache of the pipeline's DB for its student; uses it after."""
        if self.database is None:
            raise UserError("building an H-space cache needs a retrieval database (--database)")
        path = hspace_cache.build_cache(self.database.path, self._cache_unet, self._params["unet"],
                                        batch_size=batch_size, mesh=self.mesh)
        self.cache = hspace_cache.open_cache(self.database.path, fingerprint=self.fingerprint)
        return path

    def neighbour_grid(self, out: RagOutput) -> np.ndarray:
        """uint8 grid: per row, the generated image (prompt, λ) beside its neighbours (caption, score)."""
        from imagerag_jax import images

        if out.ids is None:
            raise UserError(f"mode {out.mode!r} retrieves nothing: there are no neighbours to show")
        neighbours = images.to_uint8(self.neighbour_images(out.ids))
        generated = images.to_uint8(out.images)[:, None]
        lam = out.lam if out.lam is not None else np.full(len(out.ids), np.nan)
        # The numbers on a line of their own, the text whole below them (labelled_grid wraps it).
        labels = [[f"lambda={lam[i]:.3f}" + (f" w={out.w:g}" if out.w is not None else "") + "\n"
                   + (out.prompts[i] if i < len(out.prompts) else "")]
                  + [f"score={s:.3f}\n{c}" for c, s in zip(out.captions[i], out.scores[i])]
                  for i in range(len(out.ids))]
        return images.labelled_grid(np.concatenate([generated, neighbours], axis=1), labels)
