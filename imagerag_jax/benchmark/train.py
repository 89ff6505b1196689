"""``python -m imagerag_jax.benchmark train --config tiny|sd21``: the train step's speed and memory.

Builds the trainer of configs/tiny.py or configs/imageragturbo_sd21.py (random frozen towers:
'sd21' uses SD 2.1-sized ones), compiles the step ahead of time, runs it on random batches and
reports the median step time, examples/s, achieved TFLOP/s per device (FLOPs from the compiled
step's XLA cost analysis, per device), XLA's memory analysis of the step and the peak memory
(process RSS on CPU, the allocator's peak on GPU/TPU). No TensorFlow, TFRecords or checkpoints.

  python -m imagerag_jax.benchmark train --config tiny
  python -m imagerag_jax.benchmark train --config sd21 --per-device-batch 1 --remat full --steps 2
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import json
import os
import resource
import statistics
import time
from pathlib import Path
from typing import Any

from imagerag_jax.benchmark import common

CONFIGS = {"tiny": ("tiny.py", None), "sd21": ("imageragturbo_sd21.py", "random")}


@dataclasses.dataclass(frozen=True)
class DataShapes:
    """Per-example shapes (the part of tfrecords.Schema the trainer reads, without TensorFlow)."""

    latent_shape: tuple[int, ...]
    embed_shape: tuple[int, ...]
    pooled_dim: int
    k: int
    has_noise: bool

    @classmethod
    def of_config(cls, config: Any) -> "DataShapes":
        """The shapes of the config's synthetic set (`config.synthetic`)."""
        s = config.synthetic
        return cls(tuple(s.latent_shape), tuple(s.embed_shape), int(s.pooled_dim), int(s.k),
                   bool(s.has_noise))

    @property
    def fields(self) -> tuple[str, ...]:
        base = ("latent", "prompt_embeds", "pooled", "retrieved_latents", "retrieved_prompt_embeds",
                "retrieved_pooled")
        return base + (("noise",) if self.has_noise else ())

    def shapes(self) -> dict[str, tuple[int, ...]]:
        k = self.k
        out = {"latent": self.latent_shape, "prompt_embeds": self.embed_shape,
               "pooled": (self.pooled_dim,), "retrieved_latents": (k, *self.latent_shape),
               "retrieved_prompt_embeds": (k, *self.embed_shape), "retrieved_pooled": (k, self.pooled_dim)}
        if self.has_noise:
            out["noise"] = self.latent_shape
        return out


def load_config(name: str) -> Any:
    """get_config of configs/<file> (next to the package in a checkout)."""
    filename, arg = CONFIGS[name]
    path = Path(__file__).resolve().parents[2] / "configs" / filename
    spec = importlib.util.spec_from_file_location(f"config_{name}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config(arg)


def peak_memory_bytes() -> tuple[int, str]:
    """(peak bytes, what was measured): the accelerator allocator's peak, else the process max RSS."""
    import jax

    dev = jax.local_devices()[0]
    if dev.platform != "cpu":
        stats = dev.memory_stats() or {}
        if "peak_bytes_in_use" in stats:
            return int(stats["peak_bytes_in_use"]), f"{dev.platform} peak_bytes_in_use"
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, "process max RSS"


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Compile and time the train step; returns the measurements."""
    import jax

    from imagerag_jax import sharding
    from imagerag_jax.training import trainer as trainer_lib
    from imagerag_jax.benchmark.common import machine_description

    config = load_config(args.config)
    if args.remat is not None:
        config.remat = args.remat
    if args.dtype is not None:
        config.compute_dtype = args.dtype
        config.frozen_param_dtype = args.dtype
    if args.k is not None:
        config.synthetic.k = args.k
    spec = config.mesh if args.mesh is None else json.loads(args.mesh)
    try:
        mesh = sharding.make_mesh(spec)
    except ValueError as e:  # e.g. the sd21 config's fsdp=8 on one device
        print(f"config mesh {spec} does not fit {len(jax.devices())} device(s) ({e}); using all for 'data'")
        mesh = sharding.make_mesh((("data", -1), ("fsdp", 1)))
    batch = args.per_device_batch * sharding.batch_shards(mesh, tuple(tuple(r) for r in config.logical_rules))
    config.global_batch_size = batch
    shapes = DataShapes.of_config(config)

    trainer, abstract, state, setup_s = build_trainer(config, mesh, shapes)
    print(f"  (set up in {setup_s:.1f} s; compiling)", flush=True)
    t0 = time.perf_counter()
    step, flops = trainer.compile_step(abstract, shapes, batch)
    compile_s = time.perf_counter() - t0
    print(f"  (compiled in {compile_s:.1f} s; running)", flush=True)
    mem = step.memory_analysis()
    xla_mem = {}
    if mem is not None:
        for name in ("argument_size_in_bytes", "output_size_in_bytes", "alias_size_in_bytes",
                     "temp_size_in_bytes", "generated_code_size_in_bytes"):
            xla_mem[name] = int(getattr(mem, name, 0) or 0)
    batches = [trainer.shard_batch(trainer_lib.random_batch(shapes, batch, seed=i)) for i in range(2)]

    times = []
    for i in range(args.warmup + args.steps):
        t1 = time.perf_counter()
        state, metrics = step(state, trainer.frozen, batches[i % 2])
        jax.block_until_ready(metrics)
        if i >= args.warmup:
            times.append(time.perf_counter() - t1)
    peak, peak_kind = peak_memory_bytes()
    median = statistics.median(times)
    result = {
        "config": args.config,
        "device": machine_description(),
        "machine": common.machine_info(),
        "devices": mesh.size,
        "mesh": dict(mesh.shape),
        "global_batch": batch,
        "per_device_batch": args.per_device_batch,
        "k": shapes.k,
        "latent_shape": list(shapes.latent_shape),
        "remat": config.remat,
        "compute_dtype": config.compute_dtype,
        "setup_s": setup_s,
        "compile_s": compile_s,
        "step_time_median_s": median,
        "step_time_min_s": min(times),
        "examples_per_s": batch / median,
        "flops_per_device_per_step": flops,
        "tflops_per_device": flops / median / 1e12,
        "peak_memory_gib": peak / 2**30,
        "peak_memory_kind": peak_kind,
        "xla_memory_analysis_bytes": xla_mem,
        "g_loss": float(metrics["g_loss"]),
        "finite": bool(metrics["ok"]),
    }
    return result


def build_trainer(config: Any, mesh: Any, shapes: DataShapes) -> tuple[Any, Any, Any, float]:
    """(Trainer, abstract state, initial state, seconds taken) for `shapes` on `mesh`."""
    from imagerag_jax.training import trainer as trainer_lib

    t0 = time.perf_counter()
    trainer = trainer_lib.Trainer(config, mesh)
    trainer.check_schema(shapes)
    abstract = trainer.abstract_state(shapes)
    state = trainer.init_state(shapes)
    return trainer, abstract, state, time.perf_counter() - t0


def main(argv: list[str]) -> None:
    """Parse flags, run, print (and optionally write) the result."""
    parser = argparse.ArgumentParser(prog="python -m imagerag_jax.benchmark train")
    parser.add_argument("--config", choices=sorted(CONFIGS), default="tiny")
    parser.add_argument("--per-device-batch", type=int, default=1)
    parser.add_argument("--steps", type=int, default=3, help="timed steps")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--remat", default=None, help="override config.remat (none|full|dots|dots_no_batch)")
    parser.add_argument("--dtype", default=None, help="override compute and frozen dtypes (float32|bfloat16)")
    parser.add_argument("--k", type=int, default=None, help="retrieved neighbours per example")
    parser.add_argument("--mesh", default=None, help='JSON mesh, e.g. [["data", -1], ["fsdp", 1]]')
    parser.add_argument("--json", help="also write the result to this JSON file")
    args = parser.parse_args(argv)
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    print(common.machine_block(common.machine_info()), flush=True)
    result = run(args)
    mem = result["xla_memory_analysis_bytes"]
    print(f"== train step, {args.config} on {result['device']} ({result['devices']} device(s), "
          f"mesh {result['mesh']})")
    print(f"  global batch {result['global_batch']} (k={result['k']}, latents {result['latent_shape']}), "
          f"remat {result['remat']}, compute {result['compute_dtype']}")
    print(f"  setup {result['setup_s']:.1f} s, compile {result['compile_s']:.1f} s")
    print(f"  step: median {result['step_time_median_s']:.3f} s, min {result['step_time_min_s']:.3f} s, "
          f"{result['examples_per_s']:.2f} examples/s")
    print(f"  {result['flops_per_device_per_step'] / 1e9:.3f} GFLOP per device per step -> "
          f"{result['tflops_per_device']:.3f} TFLOP/s per device")
    print(f"  peak memory {result['peak_memory_gib']:.2f} GiB ({result['peak_memory_kind']}); XLA: "
          + ", ".join(f"{k.replace('_size_in_bytes', '')} {v / 2**30:.2f} GiB" for k, v in mem.items()))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
