"""``python -m imagerag_jax.benchmark gpu``: the prepared GPU check, one JSON in at most ~8 minutes.

Sections, each guarded (a failure is recorded in the JSON with its traceback and the next one
runs; the JSON is rewritten after every section, so a killed run keeps what it finished):

* ``unet``: the SD 2.1 UNet forward (random SD 2.1-config weights, converted from the diffusers
  model so both sides hold the same ones), batch 1, 64x64 latents: ours in bf16 against
  diffusers in fp16 (or ``--torch-dtype bfloat16``) with SDPA attention on the same GPU;
* ``pipeline``: the one-step text-to-image path at 512 px (text encoder, one UNet step at
  t = 999, VAE decode), ours against the same modules in diffusers/transformers;
* ``rag``: ImageRAGTurbo's denoiser with the H-space cache against the plain step and the
  uncached one (`benchmark.rag`'s pipeline and timing, batch 1, k = 1 and 4);
* ``train``: the SD 2.1-sized train step (`benchmark.train`'s trainer, random towers) in bf16 at
  per-device batch 8 and 16 for every remat policy: step time, images/s, MFU from the analytic
  FLOPs of `models.flops` and the device's bf16 peak, and peak device memory.

Every timed figure is a median after warm-up (compilation excluded; reported apart). FLOPs are
`models.flops`' analytic counts (XLA's GPU cost analysis omits cuDNN convolutions). Peak device
memory: ``memory_stats()['peak_bytes_in_use']`` for JAX, a process-wide high-water mark (JAX
cannot reset it), so the train variants run in increasing order of XLA's planned memory and each
records the mark after it; ``torch.cuda.max_memory_allocated`` (reset per measure) for PyTorch.
JAX does not preallocate GPU memory here (``XLA_PYTHON_CLIENT_PREALLOCATE=false``), so that the
two frameworks share the GPU.

Needs jax (with its GPU plugin), flax, optax, orbax-checkpoint, torch, transformers, and the
pure-Python ``diffusers`` and ``ml_collections`` (the configs); never TensorFlow, ScaNN or clu.

  python -m imagerag_jax.benchmark gpu --json gpu_check.json
  python -m imagerag_jax.benchmark gpu --tiny --json /tmp/tiny.json     # every section on CPU, tiny shapes
"""

from __future__ import annotations

import argparse
import concurrent.futures
import dataclasses
import datetime
import json
import os
import statistics
import tempfile
import time
import traceback
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from imagerag_jax.benchmark import common

SECTIONS = ("unet", "pipeline", "rag", "train")
REMAT_POLICIES = ("full", "dots", "dots_no_batch", "none")  # training.step.REMAT_POLICIES, config default first
DEFAULT_BUDGET_S = 450.0  # leaves ~30 s of the 8 minutes for start-up and the last section's tail


@dataclasses.dataclass
class Settings:
    """What one run measures; `for_mode` gives the GPU and the tiny defaults."""

    preset: str  # 'sd21' | 'tiny' (benchmark.models / benchmark.rag / benchmark.train names)
    latent: int
    runs: int
    warmup: int
    train_batches: tuple[int, ...]
    remat: tuple[str, ...]
    rag_ks: tuple[int, ...]
    train_steps: int
    torch_dtype: str
    compile_workers: int
    budget_s: float

    @classmethod
    def for_mode(cls, tiny: bool, **overrides: Any) -> "Settings":
        """Defaults of the SD 2.1 GPU check, or of the seconds-long CPU run at tiny shapes."""
        if tiny:
            # One of everything: the point is that every section runs, not the figures.
            base = cls("tiny", 8, 1, 1, (1,), ("none",), (1,), 1, "float32", 1, DEFAULT_BUDGET_S)
        else:
            base = cls("sd21", 64, 10, 2, (8, 16), REMAT_POLICIES, (1, 4), 5, "float16", 4, DEFAULT_BUDGET_S)
        return dataclasses.replace(base, **{k: v for k, v in overrides.items() if v is not None})


# ---------------------------------------------------------------------------------------------
# Guarded sections.
# ---------------------------------------------------------------------------------------------


def guarded(fn: Callable[[], dict[str, Any]]) -> dict[str, Any]:
    """``{'status': 'ok', 'seconds': s, **fn()}``, or ``{'status': 'error', 'error', 'traceback'}``."""
    t0 = time.perf_counter()
    try:
        out = {"status": "ok", **fn()}
    except Exception as e:  # pylint: disable=broad-except  # recorded; the other sections still run
        out = {"status": "error", "error": f"{type(e).__name__}: {e}",
               "traceback": traceback.format_exc()[-6000:]}
    out["seconds"] = time.perf_counter() - t0
    return out


def run_sections(sections: Mapping[str, Callable[[], dict[str, Any]]], result: dict[str, Any],
                 budget_s: float, write: Callable[[dict[str, Any]], None], start: float) -> dict[str, Any]:
    """Runs each section guarded, in order, while the budget lasts; writes the result after each."""
    result.setdefault("sections", {})
    for name, fn in sections.items():
        elapsed = time.perf_counter() - start
        if elapsed > budget_s:
            result["sections"][name] = {"status": "skipped",
                                        "reason": f"time budget: {elapsed:.0f} s of {budget_s:.0f} s spent"}
        else:
            print(f"== {name} ({elapsed:.0f} s in)", flush=True)
            result["sections"][name] = guarded(fn)
            status = result["sections"][name]["status"]
            error = f" ({result['sections'][name]['error']})" if status == "error" else ""
            print(f"   {name}: {status}{error}", flush=True)
        result["wall_s"] = time.perf_counter() - start
        write(result)
    return result


# ---------------------------------------------------------------------------------------------
# Shared measurement helpers.
# ---------------------------------------------------------------------------------------------


def _torch_device(tiny: bool) -> str:
    import torch

    return "cuda" if torch.cuda.is_available() and not tiny else "cpu"


def _sync_torch(device: str) -> None:
    import torch

    if device == "cuda":
        torch.cuda.synchronize()


def _torch_dtype(name: str, device: str):
    import torch

    # Half precision on CPU is slow or unsupported for some kernels; the tiny run stays fp32.
    return {"float16": torch.float16, "bfloat16": torch.bfloat16}.get(name, torch.float32) \
        if device == "cuda" else torch.float32


def _time_reference(run: Callable[[], Any], device: str, runs: int, warmup: int
                    ) -> tuple[Any, dict[str, Any], float | None]:
    """(first output as NHWC float numpy, timing, peak GiB on CUDA) of a torch callable.

    The output call comes before the peak-memory reset, so the peak is that of the timed calls.
    """
    import torch

    out = run().float().cpu().numpy().transpose(0, 2, 3, 1)
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    timing = common.time_fn(run, runs, warmup=warmup)
    mem = torch.cuda.max_memory_allocated() / 2**30 if device == "cuda" else None
    return out, timing, mem


def _jax_peak() -> dict[str, Any]:
    """The JAX device's peak (process-wide high-water mark) or the process max RSS on CPU."""
    from imagerag_jax.benchmark.train import peak_memory_bytes

    peak, kind = peak_memory_bytes()
    return {"peak_memory_gib": peak / 2**30, "peak_memory_kind": kind}


def _throughput(timing: dict[str, float], flops: float, examples: int, peak: float | None) -> dict[str, Any]:
    """Achieved TFLOP/s, examples/s and MFU (None without a known peak) of a timed call."""
    from imagerag_jax.models import flops as flops_lib

    per_s = examples / timing["median_s"]
    tflops = flops / timing["median_s"] / 1e12
    return {"examples_per_s": per_s, "tflops_per_s": tflops,
            "mfu": None if peak is None else flops_lib.mfu(flops / examples, per_s, peak)}


def _compare(ours: dict[str, Any], ref: dict[str, Any] | None) -> dict[str, Any]:
    """Our median over the reference's, when there is one."""
    if ref is None or "median_s" not in ref:
        return {}
    return {"ratio_ours_over_reference": ours["median_s"] / ref["median_s"]}


def _relative_diff(a: Any, b: Any) -> float:
    """max |a - b| / max(1, max |b|) in float64 (the parity measure of docs/design.md)."""
    import numpy as np

    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.abs(a - b).max() / max(1.0, float(np.abs(b).max())))


def _cast(tree: Any, dtype: Any) -> Any:
    """Float leaves of a param tree cast to `dtype` and placed on the default device."""
    import jax
    import jax.numpy as jnp

    return jax.tree.map(lambda x: jnp.asarray(x, dtype) if jnp.issubdtype(x.dtype, jnp.floating)
                        else jnp.asarray(x), tree)


# ---------------------------------------------------------------------------------------------
# Sections.
# ---------------------------------------------------------------------------------------------


def section_unet(s: Settings, tiny: bool, peak: float | None) -> dict[str, Any]:
    """The UNet forward, batch 1: ours (bf16) against diffusers (fp16/bf16, SDPA)."""
    import jax
    import jax.numpy as jnp
    import numpy as np
    import torch

    from imagerag_jax.benchmark import models
    from imagerag_jax.models import flops as flops_lib

    torch.manual_seed(0)
    model = models.torch_unet(s.preset)
    unet, params = models.to_flax("unet", model, "auto", dtype=jnp.bfloat16)
    params = _cast(params, jnp.bfloat16)
    rng = np.random.default_rng(0)
    x = rng.standard_normal((1, 4, s.latent, s.latent), dtype=np.float32)
    ctx = rng.standard_normal((1, 77, unet.cross_attention_dim), dtype=np.float32)
    fwd = jax.jit(lambda p, x, t, c: unet.apply({"params": p}, x, t, c))
    xj, tj, cj = jnp.asarray(x.transpose(0, 2, 3, 1)), jnp.full((1,), 999), jnp.asarray(ctx)
    t0 = time.perf_counter()
    out = np.asarray(fwd(params, xj, tj, cj).astype(jnp.float32))
    compile_s = time.perf_counter() - t0
    ours = common.time_fn(lambda: fwd(params, xj, tj, cj).block_until_ready(), s.runs, warmup=s.warmup)
    fl = flops_lib.unet_forward(unet, 1, (s.latent, s.latent)).forward
    result = {"flops": fl, "ours": {**ours, "dtype": "bfloat16", "compile_s": compile_s,
                                    **_throughput(ours, fl, 1, peak), **_jax_peak()}}

    def reference() -> dict[str, Any]:
        device = _torch_device(tiny)
        dtype = _torch_dtype(s.torch_dtype, device)
        tm = model.to(device=device, dtype=dtype)
        xt = torch.from_numpy(x).to(device, dtype)
        tt = torch.full((1,), 999, device=device)
        ct = torch.from_numpy(ctx).to(device, dtype)
        processors = sorted({type(p).__name__ for p in tm.attn_processors.values()})

        def run():
            with torch.inference_mode():
                y = tm(xt, tt, ct).sample
            _sync_torch(device)
            return y

        ref_out, timing, mem = _time_reference(run, device, s.runs, s.warmup)
        return {**timing, "device": device, "dtype": str(dtype).replace("torch.", ""),
                "attention_processors": processors, "max_memory_allocated_gib": mem,
                **_throughput(timing, fl, 1, peak), "relative_diff_vs_ours": _relative_diff(out, ref_out)}

    result["reference"] = guarded(reference)
    result.update(_compare(result["ours"], result["reference"]))
    _free_torch(model)
    return result


def section_pipeline(s: Settings, tiny: bool, peak: float | None) -> dict[str, Any]:
    """Text encoder + one UNet step + VAE decode at 8 x latent px, batch 1, both frameworks."""
    import jax
    import jax.numpy as jnp
    import numpy as np
    import torch

    from imagerag_jax.benchmark import models
    from imagerag_jax.diffusion import sampling
    from imagerag_jax.diffusion import schedule as schedule_lib
    from imagerag_jax.models import flops as flops_lib

    torch.manual_seed(0)
    tm_text, tm_unet, tm_vae = (models.torch_text(s.preset), models.torch_unet(s.preset),
                                models.torch_vae(s.preset))
    bf16 = jnp.bfloat16
    text, text_p = models.to_flax("text_encoder", tm_text, dtype=bf16)
    unet, unet_p = models.to_flax("unet", tm_unet, "auto", dtype=bf16)
    vae, vae_p = models.to_flax("vae", tm_vae, dtype=bf16)
    text_p, unet_p, vae_p = _cast(text_p, bf16), _cast(unet_p, bf16), _cast(vae_p, bf16)
    sched = schedule_lib.scaled_linear_schedule()
    acp = float(sched.alphas_cumprod[999])
    cfg = models.TEXT_CONFIGS[s.preset]
    ids = np.random.default_rng(0).integers(0, cfg["vocab_size"] - 2, (1, 77)).astype(np.int64)
    ids[:, 10] = cfg["eos_token_id"]
    noise = np.random.default_rng(1).standard_normal((1, 4, s.latent, s.latent), dtype=np.float32)

    @jax.jit
    def generate(text_p, unet_p, vae_p, ids, noise):
        ctx = text.apply({"params": text_p}, ids)[0]
        apply_fn = lambda x, t, c: unet.apply({"params": unet_p}, x, t, c)
        z0 = sampling.one_step(apply_fn, noise, ctx, sched, unet.prediction_type)
        return vae.apply({"params": vae_p}, z0, method=vae.decode_latents)

    ij, nj = jnp.asarray(ids, jnp.int32), jnp.asarray(noise.transpose(0, 2, 3, 1))
    t0 = time.perf_counter()
    out = np.asarray(generate(text_p, unet_p, vae_p, ij, nj))
    compile_s = time.perf_counter() - t0
    ours = common.time_fn(lambda: generate(text_p, unet_p, vae_p, ij, nj).block_until_ready(), s.runs,
                          warmup=s.warmup)
    parts = {"text_encoder": flops_lib.clip_text(text, 1, 77).forward,
             "unet": flops_lib.unet_forward(unet, 1, (s.latent, s.latent)).forward,
             "vae_decoder": flops_lib.vae_decoder(vae, 1, (s.latent, s.latent)).forward}
    fl = sum(parts.values())
    result = {"image_px": 8 * s.latent, "flops": fl, "flops_parts": parts,
              "ours": {**ours, "dtype": "bfloat16", "compile_s": compile_s, **_throughput(ours, fl, 1, peak),
                       **_jax_peak()}}

    def reference() -> dict[str, Any]:
        device = _torch_device(tiny)
        dtype = _torch_dtype(s.torch_dtype, device)
        mods = [m.to(device=device, dtype=dtype) for m in (tm_text, tm_unet, tm_vae)]
        it = torch.from_numpy(ids).to(device)
        nt = torch.from_numpy(noise).to(device, dtype)
        tt = torch.full((1,), 999, device=device)

        def run():
            with torch.inference_mode():
                ctx = mods[0](it).last_hidden_state
                eps = mods[1](nt, tt, ctx).sample
                x0 = (nt - float(np.sqrt(1 - acp)) * eps) / float(np.sqrt(acp))
                img = mods[2].decode(x0 / 0.18215).sample.clamp(-1, 1)
            _sync_torch(device)
            return img

        ref_out, timing, mem = _time_reference(run, device, s.runs, s.warmup)
        return {**timing, "device": device, "dtype": str(dtype).replace("torch.", ""),
                "max_memory_allocated_gib": mem, **_throughput(timing, fl, 1, peak),
                "relative_diff_vs_ours": _relative_diff(out, ref_out)}

    result["reference"] = guarded(reference)
    result.update(_compare(result["ours"], result["reference"]))
    _free_torch(tm_text, tm_unet, tm_vae)
    return result


def _free_torch(*models: Any) -> None:
    """Drops PyTorch's cached GPU blocks so that JAX's allocator can use the memory next."""
    import gc

    import torch

    del models
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def section_rag(s: Settings) -> dict[str, Any]:
    """`benchmark.rag`'s denoiser rows at batch 1: plain, cache and no-cache per k (fp32 towers)."""
    from imagerag_jax.benchmark import rag as rag_bench

    with tempfile.TemporaryDirectory(prefix="imagerag-gpu-rag-") as root:
        pipe = rag_bench.build_pipeline(s.preset, root, entries=max(16, max(s.rag_ks)))
        t0 = time.perf_counter()
        pipe.build_cache()
        cache_s = time.perf_counter() - t0
        if pipe.cache is None:
            raise RuntimeError("build_cache left the pipeline without a usable H-space cache")
        group = {"part": "denoiser", "batch": 1, "ks": list(s.rag_ks), "modes": list(rag_bench.MODES),
                 "runs": s.runs}
        rows = rag_bench.run_group(pipe, pipe.cache, group)
        describe = pipe.describe()
    cached = {r["k"]: r["ratio_vs_plain"] for r in rows if r["mode"] == "cache"}
    return {"cache_build_s": cache_s, "rows": rows, "cache_ratio_vs_plain_by_k": cached,
            "pipeline": describe, "table": rag_bench.markdown_table(rows)}


def section_train(s: Settings, peak: float | None, start: float) -> dict[str, Any]:
    """The train step per (per-device batch, remat policy): compiled concurrently, timed one by one."""
    import jax

    from imagerag_jax import sharding
    from imagerag_jax.benchmark import train as train_bench
    from imagerag_jax.models import flops as flops_lib
    from imagerag_jax.training import step as step_lib
    from imagerag_jax.training import trainer as trainer_lib

    config = train_bench.load_config(s.preset)
    config.compute_dtype = config.frozen_param_dtype = "bfloat16"
    mesh = sharding.make_mesh((("data", -1), ("fsdp", 1)))
    shards = sharding.batch_shards(mesh, tuple(tuple(r) for r in config.logical_rules))
    config.global_batch_size = max(s.train_batches) * shards
    shapes = train_bench.DataShapes.of_config(config)
    trainer, abstract, state, setup_s = train_bench.build_trainer(config, mesh, shapes)
    t0 = time.perf_counter()
    fields = step_lib.batch_fields(shapes)

    # Lower one variant at a time (tracing holds the GIL, and the Trainer reads the remat policy
    # from its config when it jits the step), compile them concurrently (XLA releases the GIL).
    variants: dict[tuple[int, str], dict[str, Any]] = {}
    futures = {}
    with concurrent.futures.ThreadPoolExecutor(max_workers=max(1, s.compile_workers)) as pool:
        for remat in s.remat:
            for b in s.train_batches:
                key, rec = (b, remat), {"per_device_batch": b, "remat": remat, "global_batch": b * shards}
                variants[key] = rec
                try:
                    trainer.config.remat = remat
                    batch = trainer_lib.abstract_batch(shapes, b * shards, trainer.batch_shardings(fields))
                    t1 = time.perf_counter()
                    lowered = trainer.jitted_step(abstract, shapes).lower(abstract, trainer.frozen, batch)
                    rec["lower_s"] = time.perf_counter() - t1
                    futures[key] = (pool.submit(_timed_compile, lowered), time.perf_counter())
                except Exception as e:  # pylint: disable=broad-except
                    rec.update(status="error", error=f"lowering: {type(e).__name__}: {e}")
        for key, (future, submitted) in futures.items():
            try:
                compiled, compile_s = future.result()
                variants[key].update(compiled=compiled, compile_s=compile_s)
            except Exception as e:  # pylint: disable=broad-except
                variants[key].update(status="error", error=f"compile: {type(e).__name__}: {e}")
    compile_wall = time.perf_counter() - t0

    for rec in variants.values():
        if "compiled" in rec:
            rec["xla_memory_gib"] = _planned_gib(rec["compiled"])
    # JAX's peak_bytes_in_use only grows: run the smallest plans first so each mark is its own.
    order = sorted((k for k, r in variants.items() if "compiled" in r),
                   key=lambda k: variants[k]["xla_memory_gib"].get("total", 0.0))
    host_batches = {b: trainer.shard_batch(trainer_lib.random_batch(shapes, b * shards, seed=b))
                    for b in s.train_batches}
    for key in order:
        rec = variants[key]
        compiled = rec.pop("compiled")
        if time.perf_counter() - start > s.budget_s:
            rec.update(status="skipped", reason="time budget")
            continue
        try:
            times, metrics = [], None
            for i in range(1 + s.train_steps):
                t1 = time.perf_counter()
                state, metrics = compiled(state, trainer.frozen, host_batches[key[0]])
                jax.block_until_ready(metrics)
                if i:
                    times.append(time.perf_counter() - t1)
            median = statistics.median(times)
            # Executed FLOPs count the forward passes the remat policy repeats; MFU counts the
            # model's alone (remat 'none'), so the policies compare on one scale.
            count = lambda policy: flops_lib.train_step_flops_from_setup(
                trainer.setup, shapes, batch=key[0], lora_pattern=trainer.lora_pattern, remat=policy,
                backend=jax.default_backend()).per_example
            per_example, model_per_example = count(key[1]), count("none")
            per_s = key[0] / median  # per device
            rec.update(status="ok", step_time_median_s=median, step_time_min_s=min(times),
                       images_per_s_per_device=per_s, images_per_s=rec["global_batch"] / median,
                       flops_per_example=per_example, model_flops_per_example=model_per_example,
                       xla_flops_per_device_per_step=trainer_lib.compiled_flops(compiled),
                       tflops_per_s_per_device=per_example * per_s / 1e12,
                       mfu=None if peak is None else flops_lib.mfu(model_per_example, per_s, peak),
                       finite=bool(metrics["ok"]), **_jax_peak())
        except Exception as e:  # pylint: disable=broad-except  # e.g. out of memory at batch 16
            rec.update(status="error", error=f"{type(e).__name__}: {e}"[:2000])
            state = trainer.init_state(shapes)  # the failed call may have consumed the donated state
        finally:
            del compiled
    rows = [variants[k] for k in sorted(variants, key=lambda k: (s.remat.index(k[1]), k[0]))]
    return {"config": s.preset, "devices": mesh.size, "compute_dtype": "bfloat16", "k": shapes.k,
            "latent_shape": list(shapes.latent_shape), "setup_s": setup_s, "compile_wall_s": compile_wall,
            "steps_timed": s.train_steps, "variants": rows}


def _timed_compile(lowered: Any) -> tuple[Any, float]:
    t0 = time.perf_counter()
    compiled = lowered.compile()
    return compiled, time.perf_counter() - t0


def _planned_gib(compiled: Any) -> dict[str, float]:
    """XLA's memory plan of a compiled step: arguments + outputs - aliased + temporaries (GiB)."""
    mem = compiled.memory_analysis()
    if mem is None:
        return {}
    get = lambda name: float(getattr(mem, f"{name}_size_in_bytes", 0) or 0) / 2**30
    out = {n: get(n) for n in ("argument", "output", "alias", "temp")}
    out["total"] = out["argument"] + out["output"] - out["alias"] + out["temp"]
    return out


# ---------------------------------------------------------------------------------------------
# Entry point.
# ---------------------------------------------------------------------------------------------


def summary(result: Mapping[str, Any]) -> str:
    """A few human-readable lines of the result."""
    lines = [f"GPU check ({result['mode']}) on {result['device']}, peak {result['peak_tflops']} TFLOP/s, "
             f"wall {result.get('wall_s', 0):.0f} s"]
    for name, sec in result.get("sections", {}).items():
        if sec["status"] != "ok":
            lines.append(f"  {name}: {sec['status']} {sec.get('error') or sec.get('reason') or ''}")
            continue
        if name in ("unet", "pipeline"):
            ref = sec.get("reference", {})
            lines.append(f"  {name}: ours {sec['ours']['median_s'] * 1e3:.1f} ms, reference "
                         + (f"{ref['median_s'] * 1e3:.1f} ms ({ref['dtype']}), ratio "
                            f"{sec['ratio_ours_over_reference']:.3f}" if ref.get("status") == "ok"
                            else f"{ref.get('status')}: {ref.get('error')}"))
        elif name == "rag":
            lines.append(f"  rag: cached denoiser / plain step by k: "
                         + ", ".join(f"k={k}: {v:.3f}" for k, v in sec["cache_ratio_vs_plain_by_k"].items()))
        elif name == "train":
            for v in sec["variants"]:
                if v.get("status") == "ok":
                    mfu = "n/a" if v["mfu"] is None else f"{v['mfu']:.1%}"
                    lines.append(f"  train b={v['per_device_batch']} remat={v['remat']}: "
                                 f"{v['step_time_median_s']:.3f} s/step, {v['images_per_s_per_device']:.1f} "
                                 f"img/s/device, MFU {mfu}, peak {v['peak_memory_gib']:.1f} GiB")
                else:
                    lines.append(f"  train b={v['per_device_batch']} remat={v['remat']}: {v.get('status')} "
                                 f"{v.get('error') or v.get('reason') or ''}")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Parses flags, runs the sections, writes and returns the JSON result."""
    p = argparse.ArgumentParser(prog="python -m imagerag_jax.benchmark gpu",
                                description=__doc__.split("\n\n")[0])
    p.add_argument("--tiny", action="store_true", help="every section at tiny shapes (CPU, seconds)")
    p.add_argument("--json", default="gpu_check.json", help="where the result goes")
    p.add_argument("--sections", nargs="+", choices=SECTIONS, default=list(SECTIONS))
    p.add_argument("--budget-s", type=float, help=f"start no section or train variant after this (default "
                                                   f"{DEFAULT_BUDGET_S:.0f})")
    p.add_argument("--runs", type=int, help="timed runs per measure (default 10; tiny 1)")
    p.add_argument("--train-batches", type=int, nargs="+", help="per-device batches (default 8 16; tiny 1)")
    p.add_argument("--remat", nargs="+", choices=REMAT_POLICIES, help="remat policies (default all; tiny none)")
    p.add_argument("--train-steps", type=int, help="timed train steps per variant (default 5; tiny 1)")
    p.add_argument("--torch-dtype", choices=("float16", "bfloat16"),
                   help="diffusers' dtype on GPU (default float16)")
    p.add_argument("--compile-workers", type=int, help="train steps compiled at once (default 4)")
    args = p.parse_args(argv)
    # Before JAX starts its backend: no preallocation, so PyTorch gets GPU memory too.
    os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    s = Settings.for_mode(args.tiny, runs=args.runs, budget_s=args.budget_s,
                          train_batches=tuple(args.train_batches) if args.train_batches else None,
                          remat=tuple(args.remat) if args.remat else None, train_steps=args.train_steps,
                          torch_dtype=args.torch_dtype, compile_workers=args.compile_workers)
    start = time.perf_counter()
    import jax

    from imagerag_jax.models import flops as flops_lib

    if args.tiny:
        # The tiny run is the CPU check of this script, also on a machine with a GPU.
        jax.config.update("jax_platforms", "cpu")
    machine = common.machine_info(("jax", "torch"))
    print(common.machine_block(machine), flush=True)
    dev = jax.devices()[0]
    peak = flops_lib.peak_tflops(dev.device_kind)
    result: dict[str, Any] = {
        "benchmark": "gpu", "mode": "tiny" if args.tiny else "sd21",
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "device": common.machine_description(machine), "platform": dev.platform,
        "device_kind": dev.device_kind, "peak_tflops": peak, "settings": dataclasses.asdict(s),
        "env": {k: os.environ.get(k) for k in ("XLA_PYTHON_CLIENT_PREALLOCATE", "XLA_FLAGS")},
        "machine": machine, "sections": {}}

    def write(res: dict[str, Any]) -> None:
        with open(args.json, "w") as f:
            json.dump(res, f, indent=2, default=str)

    sections = {"unet": lambda: section_unet(s, args.tiny, peak),
                "pipeline": lambda: section_pipeline(s, args.tiny, peak),
                "rag": lambda: section_rag(s),
                "train": lambda: section_train(s, peak, start)}
    run_sections({n: sections[n] for n in args.sections}, result, s.budget_s, write, start)
    print(summary(result), flush=True)
    print(f"wrote {args.json}", flush=True)
    return result
