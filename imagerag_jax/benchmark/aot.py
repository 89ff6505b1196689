"""``python -m imagerag_jax.benchmark aot``: the train step compiled ahead of time for a TPU slice.

The pod before the pod: with libtpu installed (``pip install -e ".[tpu]"``), XLA's TPU compiler runs
on this CPU for a topology that is not here (``jax.experimental.topologies.get_topology_desc``),
the way MaxText's and MaxDiffusion's ``compile_topology`` work. The trainer's own placement and
compilation (`training.trainer.Trainer`: the ('data', 'fsdp') mesh, the train state from
`jax.eval_shape` of its init with its shardings, the step jitted with in/out shardings and the
state donated) run on the topology's devices with abstract frozen towers (ShapeDtypeStructs:
no weights are read or drawn), and the compiled step reports

- per-chip HBM from ``memory_analysis()``: arguments (frozen towers, state, batch), outputs,
  the part of them aliased to donated arguments, temporaries, generated code, and their total
  against the chip's capacity;
- the TPU compiler's own step-time estimate (``cost_analysis()['optimal_seconds']``) and, from it,
  images/s per chip and the implied MFU (FLOPs per chip per step over the estimate and the chip's
  bf16 peak; which FLOPs were used is printed).

  python -m imagerag_jax.benchmark aot --config tiny --topology v5p:2x2x1
  python -m imagerag_jax.benchmark aot --config sd21 --topology v5p:4x4x4 --per-device-batch 8
  python -m imagerag_jax.benchmark aot --config sd21 --topology v5e:8x8 --per-device-batch 1,2,4 \\
      --remat full,dots --jsonl /tmp/aot.jsonl          # a grid, one compile per cell

Not modelled: the latent-LPIPS tower (its weights are not shipped; the trainer sets beta = 0
without them, as here), the input pipeline and the host.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
import sys
import time
from collections.abc import Sequence
from typing import Any

from imagerag_jax.errors import UserError
from imagerag_jax.models import flops as flops_lib

GIB = 2**30


@dataclasses.dataclass(frozen=True)
class Chip:
    """One TPU generation: HBM per chip, the page it comes from, its device kind in `flops`."""

    hbm_gib: float
    source: str
    # get_topology_desc's chip config: v4 and v5p chips hold two TensorCores that JAX drives as
    # one device ('megacore'); v5e and v6e chips have one TensorCore.
    chip_config: str
    kind: str  # the key of models/flops.PEAK_TFLOPS, the one table of bf16 peaks

    @property
    def peak_tflops(self) -> float:
        """The chip's dense bf16 peak per chip (TFLOP/s)."""
        return flops_lib.PEAK_TFLOPS[self.kind]


# Google Cloud's TPU pages (key specifications tables; "GB" there, read as GiB as JAX reports it).
CHIPS: dict[str, Chip] = {
    "v4": Chip(32, "https://cloud.google.com/tpu/docs/v4", "megacore", "TPU v4"),
    "v5e": Chip(16, "https://cloud.google.com/tpu/docs/v5e", "default", "TPU v5e"),
    "v5p": Chip(95, "https://cloud.google.com/tpu/docs/v5p", "megacore", "TPU v5p"),
    "v6e": Chip(32, "https://cloud.google.com/tpu/docs/v6e", "default", "TPU v6e"),
}
MEMORY_FIELDS = ("argument", "output", "alias", "temp", "generated_code")


def chip_of(topology: str) -> tuple[str, Chip]:
    """('v5p', its Chip) for a topology name 'v5p:4x4x4'; UserError for an unknown generation."""
    generation = topology.split(":", 1)[0].lower()
    if ":" not in topology or generation not in CHIPS:
        raise UserError(f"unknown TPU topology {topology!r}; expected GEN:AxB[xC] with GEN one of "
                        f"{sorted(CHIPS)}, e.g. v5p:2x2x1, v5e:4x4, v6e:8x8")
    return generation, CHIPS[generation]


def host_bounds(topology: str) -> tuple[int, int, int]:
    """Chips per host in each dimension: a 2x2 block (a 4-chip host), or the whole slice when smaller.

    libtpu's default (2, 2, 1) refuses slices smaller than one host, such as v5e:1x1.
    """
    try:
        dims = [int(d) for d in topology.split(":", 1)[1].lower().split("x")]
    except ValueError as e:
        raise UserError(f"bad TPU topology {topology!r}: expected GEN:AxB[xC]") from e
    dims = (dims + [1, 1, 1])[:3]
    return tuple(min(b, d) for b, d in zip((2, 2, 1), dims))


def topology_devices(topology: str) -> list[Any]:
    """The devices of a TPU topology, described by libtpu (no TPU needed)."""
    generation, chip = chip_of(topology)
    # Describing a topology opens no TPU, but libtpu still takes /tmp/libtpu_lockfile, which any
    # other process with libtpu loaded (a jax started without JAX_PLATFORMS=cpu) may hold.
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
    try:
        from jax.experimental import topologies

        desc = topologies.get_topology_desc(platform="tpu", topology_name=topology,
                                            chip_config_name=chip.chip_config,
                                            chips_per_host_bounds=host_bounds(topology))
    except ImportError as e:
        raise UserError(f"AOT compilation for TPUs needs jax.experimental.topologies ({e})") from e
    except Exception as e:  # pylint: disable=broad-except  # libtpu missing or a bad shape
        hint = ("; install libtpu: pip install -e \".[tpu]\"" if "libtpu" in str(e).lower()
                or "platform" in str(e).lower() else "")
        raise UserError(f"cannot describe TPU topology {topology!r}: {e}{hint}") from e
    return list(desc.devices)


def abstract_towers(config: Any) -> Any:
    """The config's frozen towers (`towers.FrozenTowers`) with ShapeDtypeStruct params.

    Random-tower configs only (the AOT configs): 'tiny' towers are built (small, cached) and
    their params made abstract; 'sd21' modules are the ones `towers.frozen_towers` builds, their
    params the `jax.eval_shape` of init, so nothing SD-sized is allocated.
    """
    import jax

    from imagerag_jax.weights import towers

    abstract = lambda tree, dtype=None: jax.tree.map(  # noqa: E731
        lambda x: jax.ShapeDtypeStruct(x.shape, dtype or x.dtype), tree)
    if config.random_preset == "tiny":
        built = towers.frozen_towers(config)
        for tower in (built.student, built.teacher, built.vae):
            tower.params = abstract(tower.params)
        return built
    if config.random_preset != "sd21":
        raise UserError(f"aot compiles random towers ('tiny' or 'sd21'), not {config.random_preset!r}")
    from imagerag_jax.models.unet import UNet
    from imagerag_jax.models.vae import AutoencoderKL
    from imagerag_jax.weights import convert
    from imagerag_jax.weights.from_torch import unet_dummy_inputs

    compute = towers.DTYPES[config.compute_dtype]
    stored = towers.DTYPES[config.frozen_param_dtype]
    seed = int(config.random_seed)

    def shapes_of(module: Any, inputs: Sequence[Any]) -> Any:
        return abstract(convert.param_shapes(lambda: module.init(jax.random.PRNGKey(0), *inputs)), stored)

    def ref(tower_seed: int) -> dict[str, Any]:
        return {"path": None, "random_preset": "sd21", "seed": tower_seed, "abstract": True}

    # Student and teacher are the same SD 2.1 UNet: its init is traced once.
    unet = UNet(dtype=compute, prediction_type=config.random_prediction_type)
    unet_shapes = shapes_of(unet, unet_dummy_inputs(unet))
    vae = AutoencoderKL(dtype=compute)
    return towers.FrozenTowers(
        towers.Tower(unet, unet_shapes, ref(seed)),
        towers.Tower(unet, towers.encoder_params(unet_shapes), ref(seed + 1)),
        towers.Tower(vae, shapes_of(vae, vae.dummy_inputs()), ref(seed)))


def memory_gib(compiled: Any) -> dict[str, float]:
    """Per-chip memory of a compiled executable in GiB, and 'total' = arguments + outputs - aliased + temporaries + code."""
    mem = compiled.memory_analysis()
    out = {name: float(getattr(mem, f"{name}_size_in_bytes", 0) or 0) / GIB for name in MEMORY_FIELDS}
    out["total"] = out["argument"] + out["output"] - out["alias"] + out["temp"] + out["generated_code"]
    return out


def cost(compiled: Any) -> dict[str, float]:
    """The compiled program's cost analysis (per chip): flops, bytes accessed, optimal_seconds."""
    analysis = compiled.cost_analysis()
    if isinstance(analysis, (list, tuple)):
        analysis = analysis[0] if analysis else {}
    analysis = analysis or {}
    return {k: float(analysis.get(k, 0.0)) for k in ("flops", "bytes accessed", "optimal_seconds")}


def analytic_flops(trainer: Any, shapes: Any, per_device_batch: int) -> float:
    """Model FLOPs of one step per chip from `models.flops` (no remat recompute: MFU counts the
    model's FLOPs, not the forward passes remat repeats)."""
    return float(flops_lib.train_step_flops_from_setup(
        trainer.setup, shapes, batch=per_device_batch, lora_pattern=trainer.lora_pattern,
        remat="none", backend="tpu").total)


def compile_one(config_name: str, topology: str, per_device_batch: int, *, remat: str | None = None,
                dtype: str | None = None, k: int | None = None, mesh_spec: Any = None,
                grad_accum_steps: int = 1, devices: Sequence[Any] | None = None) -> dict[str, Any]:
    """Compiles the train step of `config_name` for `topology` and returns its figures.

    Args:
        config_name: 'tiny' or 'sd21' (`benchmark.train.CONFIGS`, random towers).
        topology: e.g. 'v5p:4x4x4' (see `CHIPS` for the generations).
        per_device_batch: examples per chip per micro-batch.
        remat: remat policy (default: the config's).
        dtype: compute and frozen-param dtype (default: the config's).
        k: retrieved neighbours per example (default: the config's synthetic k).
        mesh_spec: mesh axes, e.g. [['data', -1], ['fsdp', 8]] (default: the config's).
        grad_accum_steps: micro-batches per step (the global batch is their sum).
        devices: the topology's devices, when already described.

    Returns:
        A JSON-able dict: topology, chip, mesh, batch, per-chip memory (GiB) and capacity, the
        compiler's step-time estimate, images/s per chip, FLOPs and MFU, compile seconds.
    """
    import jax

    from imagerag_jax import sharding
    from imagerag_jax.benchmark import train as train_bench
    from imagerag_jax.training import trainer as trainer_lib

    generation, chip = chip_of(topology)
    devices = list(devices) if devices is not None else topology_devices(topology)
    config = train_bench.load_config(config_name)
    if remat is not None:
        config.remat = remat
    if dtype is not None:
        config.compute_dtype = config.frozen_param_dtype = dtype
    if k is not None:
        config.synthetic.k = k
    spec = config.mesh if mesh_spec is None else mesh_spec
    mesh = sharding.make_mesh(spec, devices)
    shards = sharding.batch_shards(mesh, tuple(tuple(r) for r in config.logical_rules))
    config.grad_accum_steps = grad_accum_steps
    global_batch = per_device_batch * shards * grad_accum_steps
    config.global_batch_size = global_batch
    shapes = train_bench.DataShapes.of_config(config)

    t0 = time.perf_counter()
    trainer = trainer_lib.Trainer(config, mesh, frozen_towers=abstract_towers(config))
    trainer.check_schema(shapes)
    state = trainer.abstract_state(shapes)
    compiled, _ = trainer.compile_step(state, shapes, global_batch)
    compile_s = time.perf_counter() - t0

    mem = memory_gib(compiled)
    costs = cost(compiled)
    step_s = costs["optimal_seconds"]
    model_flops = analytic_flops(trainer, shapes, per_device_batch)
    if model_flops is not None:
        flops, flops_source = model_flops * grad_accum_steps, "analytic, models/flops.py"
    else:
        flops, flops_source = costs["flops"], "XLA cost analysis, counts remat recompute"
    images_per_s = per_device_batch * grad_accum_steps / step_s if step_s > 0 else None
    mfu = flops / step_s / (chip.peak_tflops * 1e12) if step_s > 0 else None
    return {
        "config": config_name,
        "topology": topology,
        "chip": generation,
        "device_kind": devices[0].device_kind,
        "chips": len(devices),
        "mesh": dict(mesh.shape),
        "per_device_batch": per_device_batch,
        "grad_accum_steps": grad_accum_steps,
        "global_batch": global_batch,
        "k": shapes.k,
        "latent_shape": list(shapes.latent_shape),
        "remat": config.remat,
        "compute_dtype": config.compute_dtype,
        "memory_gib": mem,
        "hbm_gib": chip.hbm_gib,
        "fits": mem["total"] <= chip.hbm_gib,
        "optimal_seconds": step_s,
        "images_per_s_per_chip": images_per_s,
        "flops_per_chip_per_step": flops,
        "flops_source": flops_source,
        "xla_flops_per_chip_per_step": costs["flops"],
        "bytes_accessed_per_chip": costs["bytes accessed"],
        "peak_tflops": chip.peak_tflops,
        "mfu": mfu,
        "compile_s": compile_s,
        "jax": jax.__version__,
        "libtpu": _libtpu_version(),
    }


def _libtpu_version() -> str | None:
    """The installed libtpu's version (None when not installed)."""
    from importlib import metadata

    for name in ("libtpu", "libtpu-nightly"):
        try:
            return metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return None


def report(r: dict[str, Any]) -> str:
    """The lines printed for one compiled configuration."""
    m = r["memory_gib"]
    lines = [
        f"== AOT train step, {r['config']} on {r['topology']} ({r['chips']} x {r['device_kind']}, "
        f"mesh {r['mesh']}): per-device batch {r['per_device_batch']}"
        + (f" x {r['grad_accum_steps']} micro-batches" if r["grad_accum_steps"] > 1 else "")
        + f" (global {r['global_batch']}, k={r['k']}), remat {r['remat']}, {r['compute_dtype']}",
        f"  HBM per chip: arguments {m['argument']:.2f} GiB, outputs {m['output']:.2f} GiB "
        f"(aliased to donated arguments {m['alias']:.2f}), temporaries {m['temp']:.2f} GiB, "
        f"code {m['generated_code']:.2f} GiB -> total {m['total']:.2f} GiB of {r['hbm_gib']:g} GiB "
        f"({100 * m['total'] / r['hbm_gib']:.0f}%){'' if r['fits'] else '  DOES NOT FIT'}",
    ]
    if r["optimal_seconds"] > 0:
        lines.append(
            f"  compiler's step-time estimate {r['optimal_seconds'] * 1e3:.1f} ms -> "
            f"{r['images_per_s_per_chip']:.1f} images/s per chip; "
            f"{r['flops_per_chip_per_step'] / 1e12:.3f} TFLOP per chip per step ({r['flops_source']}) "
            f"-> MFU {100 * r['mfu']:.1f}% of {r['peak_tflops']:g} TFLOP/s")
    else:
        lines.append("  no step-time estimate (the compiler's cost analysis has no optimal_seconds)")
    lines.append(f"  compiled in {r['compile_s']:.1f} s on this CPU (jax {r['jax']}, libtpu {r['libtpu']})")
    return "\n".join(lines)


def _ints(text: str) -> list[int]:
    """'1,2,4' -> [1, 2, 4]."""
    return [int(x) for x in text.split(",") if x]


def main(argv: list[str]) -> None:
    """Parse flags, compile every (batch, remat) cell, print each (and append JSON lines)."""
    from imagerag_jax.benchmark import train as train_bench

    parser = argparse.ArgumentParser(prog="python -m imagerag_jax.benchmark aot")
    parser.add_argument("--config", choices=sorted(train_bench.CONFIGS), default="tiny")
    parser.add_argument("--topology", default="v5p:2x2x1",
                        help=f"GEN:AxB[xC], GEN in {sorted(CHIPS)} (e.g. v5p:4x4x4, v5e:16x16)")
    parser.add_argument("--per-device-batch", default="1", help="one or more, comma-separated")
    parser.add_argument("--remat", default=None, help="one or more of none|full|dots|dots_no_batch")
    parser.add_argument("--dtype", default=None, help="compute and frozen dtype (float32|bfloat16)")
    parser.add_argument("--k", type=int, default=None, help="retrieved neighbours per example")
    parser.add_argument("--mesh", default=None, help='JSON mesh, e.g. [["data", -1], ["fsdp", 8]]')
    parser.add_argument("--grad-accum-steps", type=int, default=1)
    parser.add_argument("--jsonl", help="append one JSON line per compiled cell to this file")
    args = parser.parse_args(argv)
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    try:
        _run(args)
    except UserError as e:  # the CLI's one error path: one line, exit status 2
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)


def _run(args: argparse.Namespace) -> None:
    """Every (remat, batch) cell of the parsed flags: compile, print, append JSON."""
    mesh = json.loads(args.mesh) if args.mesh else None
    devices = topology_devices(args.topology)
    remats = args.remat.split(",") if args.remat else [None]
    for remat in remats:
        for batch in _ints(args.per_device_batch):
            try:
                result = compile_one(args.config, args.topology, batch, remat=remat, dtype=args.dtype,
                                     k=args.k, mesh_spec=mesh, grad_accum_steps=args.grad_accum_steps,
                                     devices=devices)
            except UserError:
                raise
            except Exception as e:  # pylint: disable=broad-except  # e.g. the TPU compiler's OOM
                print(f"== {args.config} on {args.topology}, per-device batch {batch}, remat "
                      f"{remat}: compile failed: {type(e).__name__}: {str(e)[:2000]}", flush=True)
                result = {"config": args.config, "topology": args.topology, "per_device_batch": batch,
                          "remat": remat, "error": f"{type(e).__name__}: {str(e)[:2000]}"}
            else:
                print(report(result), flush=True)
            if args.jsonl:
                result["date"] = datetime.date.today().isoformat()
                with open(args.jsonl, "a") as f:
                    f.write(json.dumps(result) + "\n")
