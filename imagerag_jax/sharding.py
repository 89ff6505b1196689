"""Device mesh, batch and parameter shardings for training (docs/design.md, "Sharding").

The mesh has the axes ('data', 'fsdp'); their sizes come from the config, -1 meaning "the rest of
the devices". The batch is split over both axes. Parameters follow a simple rule instead of
per-module logical annotations (the SD modules are converted checkpoints without axis names):
a parameter with at least ``min_shard_size`` elements is split over 'fsdp' along its largest
dimension that the axis size divides; smaller ones are replicated. Optional regex rules on the
parameter path ("a/b/kernel") override the rule ('fsdp' or 'replicate'), first match wins.

Activations get their sharding from logical names mapped by rules (default: 'batch' -> both mesh
axes), so a config can, e.g., keep the batch on 'data' only.

It imports nothing of the project (the lowest floor), and also owns `initialize_distributed`
and `host_value`, the multi-process basics the trainer and the jobs share.
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from imagerag_jax.errors import UserError

MESH_AXES = ("data", "fsdp")
BATCH_AXES = ("data", "fsdp")
# Elements: 2**18 fp32 values = 1 MiB. Below that, gathering costs more than replication saves.
DEFAULT_MIN_SHARD_SIZE = 2**18
# Logical activation axis -> mesh axes. Only 'batch' is used by the trainer today.
DEFAULT_LOGICAL_RULES: tuple[tuple[str, Any], ...] = (("batch", BATCH_AXES),)
STRATEGIES = ("fsdp", "replicate")

MeshSpec = Sequence[tuple[str, int]] | Mapping[str, int]


# ---------------------------------------------------------------------------------------------
# Mesh.
# ---------------------------------------------------------------------------------------------


def mesh_shape(spec: MeshSpec, num_devices: int) -> dict[str, int]:
    """Resolves the axis sizes of `spec` (one may be -1: the remaining devices) for `num_devices`."""
    items = list(spec.items()) if isinstance(spec, Mapping) else [tuple(a) for a in spec]
    names = [n for n, _ in items]
    if len(set(names)) != len(names):
        raise UserError(f"duplicate mesh axis names in {items}")
    unknown = [n for n, s in items if s == -1]
    if len(unknown) > 1:
        raise UserError(f"at most one mesh axis may be -1, got {unknown}")
    fixed = math.prod(s for _, s in items if s != -1)
    if any(s == 0 or s < -1 for _, s in items):
        raise UserError(f"mesh axis sizes must be positive or -1, got {items}")
    if num_devices % fixed:
        raise UserError(f"mesh {items} does not divide {num_devices} devices")
    rest = num_devices // fixed
    sizes = {n: (rest if s == -1 else s) for n, s in items}
    if math.prod(sizes.values()) != num_devices:
        raise UserError(f"mesh {sizes} uses {math.prod(sizes.values())} of {num_devices} devices; "
                         "make one axis -1 or make the sizes multiply to the device count")
    return sizes


def make_mesh(spec: MeshSpec = (("data", -1), ("fsdp", 1)),
              devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A Mesh over `devices` (default: all) with the config's axis names and sizes."""
    devices = list(jax.devices() if devices is None else devices)
    sizes = mesh_shape(spec, len(devices))
    shape = tuple(sizes.values())
    try:
        # Topology-aware placement (ICI rings on TPU); needs the full device set of the platform.
        from jax.experimental import mesh_utils

        arr = mesh_utils.create_device_mesh(shape, devices)
    except (AssertionError, ValueError, NotImplementedError):
        arr = np.asarray(devices, dtype=object).reshape(shape)
    return Mesh(arr, tuple(sizes))


# ---------------------------------------------------------------------------------------------
# Batch and activation shardings.
# ---------------------------------------------------------------------------------------------


def logical_to_mesh(logical: Sequence[str | None],
                    rules: Sequence[tuple[str, Any]] = DEFAULT_LOGICAL_RULES,
                    mesh: Mesh | None = None) -> P:
    """PartitionSpec for logical axis names (None = unsharded); mesh axes missing from `mesh` drop."""
    table = dict(rules)
    out = []
    for name in logical:
        axes = table.get(name) if name is not None else None
        if axes is None:
            out.append(None)
            continue
        axes = (axes,) if isinstance(axes, str) else tuple(axes)
        if mesh is not None:
            axes = tuple(a for a in axes if a in mesh.axis_names)
        out.append(axes if len(axes) > 1 else (axes[0] if axes else None))
    return P(*out)


def batch_spec(mesh: Mesh, rules: Sequence[tuple[str, Any]] = DEFAULT_LOGICAL_RULES) -> P:
    """Leading (batch) dimension split over the batch mesh axes, the rest unsplit."""
    return logical_to_mesh(("batch",), rules, mesh)


def batch_sharding(mesh: Mesh, rules: Sequence[tuple[str, Any]] = DEFAULT_LOGICAL_RULES) -> NamedSharding:
    """NamedSharding of every batch array (leading dimension = examples)."""
    return NamedSharding(mesh, batch_spec(mesh, rules))


def batch_axes(mesh: Mesh, rules: Sequence[tuple[str, Any]] = DEFAULT_LOGICAL_RULES) -> tuple[str, ...]:
    """The mesh axes the batch is split over (for InputStream's `batch_axes`)."""
    spec = batch_spec(mesh, rules)[0]
    return () if spec is None else ((spec,) if isinstance(spec, str) else tuple(spec))


def batch_shards(mesh: Mesh, rules: Sequence[tuple[str, Any]] = DEFAULT_LOGICAL_RULES) -> int:
    """How many pieces the batch is cut into (global batch must be a multiple)."""
    return math.prod(mesh.shape[a] for a in batch_axes(mesh, rules))


def replicated(mesh: Mesh) -> NamedSharding:
    """Fully replicated sharding (scalars, small state)."""
    return NamedSharding(mesh, P())


def constrain(x: jax.Array, mesh: Mesh, logical: Sequence[str | None],
              rules: Sequence[tuple[str, Any]] = DEFAULT_LOGICAL_RULES) -> jax.Array:
    """`with_sharding_constraint` by logical names (inside jit); a no-op on a one-device mesh."""
    if mesh.size == 1:
        return x
    return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, logical_to_mesh(logical, rules, mesh)))


# ---------------------------------------------------------------------------------------------
# Parameter shardings.
# ---------------------------------------------------------------------------------------------


def fsdp_spec(shape: Sequence[int], axis_size: int, min_shard_size: int = DEFAULT_MIN_SHARD_SIZE,
              axis: str = "fsdp") -> P:
    """Splits the largest dimension divisible by `axis_size` over `axis`; P() if small or none fits."""
    shape = tuple(int(s) for s in shape)
    if axis_size <= 1 or math.prod(shape) < min_shard_size:
        return P()
    # Largest dimension first; among equal sizes the last one (output features of a kernel), so that
    # the choice is stable whatever the layout of the input dimensions.
    order = sorted(range(len(shape)), key=lambda i: (shape[i], i), reverse=True)
    for i in order:
        if shape[i] % axis_size == 0:
            spec = [None] * len(shape)
            spec[i] = axis
            return P(*spec)
    return P()


def path_str(path: Sequence[Any]) -> str:
    """'a/b/kernel' for a jax key path (dict keys, attributes, sequence indices)."""
    parts = []
    for k in path:
        for attr in ("key", "name", "idx"):
            if hasattr(k, attr):
                parts.append(str(getattr(k, attr)))
                break
        else:
            parts.append(str(k))
    return "/".join(parts)


def param_specs(tree: Any, mesh: Mesh, *, min_shard_size: int = DEFAULT_MIN_SHARD_SIZE,
                rules: Sequence[tuple[str, str]] = (), axis: str = "fsdp") -> Any:
    """PartitionSpec per leaf (arrays or ShapeDtypeStructs) by the size rule and regex overrides."""
    for _, strategy in rules:
        if strategy not in STRATEGIES:
            raise ValueError(f"unknown sharding strategy {strategy!r}; expected one of {STRATEGIES}")
    compiled = [(re.compile(pattern), strategy) for pattern, strategy in rules]
    axis_size = mesh.shape.get(axis, 1)

    def spec(path, leaf) -> P:
        name = path_str(path)
        strategy = next((s for r, s in compiled if r.search(name)), "fsdp")
        if strategy == "replicate" or not np.shape(leaf):
            return P()
        return fsdp_spec(np.shape(leaf), axis_size, min_shard_size, axis)

    return jax.tree_util.tree_map_with_path(spec, tree)


def param_shardings(tree: Any, mesh: Mesh, **kwargs) -> Any:
    """NamedSharding per leaf (see `param_specs`)."""
    return jax.tree.map(lambda s: NamedSharding(mesh, s), param_specs(tree, mesh, **kwargs),
                        is_leaf=lambda x: isinstance(x, P))


def put(tree: Any, shardings: Any) -> Any:
    """Places host or device arrays as global arrays with the given shardings (multi-host safe).

    Every process must hold the same values (frozen weights loaded from the same files).
    A `jax.ShapeDtypeStruct` leaf stays abstract and gets the sharding (ahead-of-time compilation
    for devices this process cannot address, `benchmark/aot.py`).
    """

    def one(x, sharding):
        if isinstance(x, jax.ShapeDtypeStruct):
            return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding)
        if isinstance(x, jax.Array) and x.is_fully_addressable and jax.process_count() == 1:
            return jax.device_put(x, sharding)
        host = np.asarray(x)
        return jax.make_array_from_callback(host.shape, sharding, lambda idx: host[idx])

    return jax.tree.map(one, tree, shardings)


def with_shardings(abstract: Any, shardings: Any) -> Any:
    """ShapeDtypeStructs carrying `shardings` (for orbax restore targets and AOT lowering)."""
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                        abstract, shardings)


def host_value(x: Any) -> np.ndarray:
    """A replicated global array's value on this host (numpy passes through)."""
    return np.asarray(x.addressable_data(0)) if isinstance(x, jax.Array) else np.asarray(x)


def initialize_distributed() -> None:
    """`jax.distributed.initialize()` when a multi-process launcher set it up (env or TPU pod)."""
    env = os.environ
    if env.get("JAX_COORDINATOR_ADDRESS") and env.get("JAX_NUM_PROCESSES"):
        # Plain machines (no SLURM/TPU metadata): the launcher names the count and this rank.
        jax.distributed.initialize(
            coordinator_address=env["JAX_COORDINATOR_ADDRESS"],
            num_processes=int(env["JAX_NUM_PROCESSES"]),
            process_id=int(env["JAX_PROCESS_ID"]),
        )
    elif env.get("JAX_COORDINATOR_ADDRESS") or env.get("SLURM_NTASKS", "1") != "1" or \
            len(env.get("TPU_WORKER_HOSTNAMES", "").split(",")) > 1:
        jax.distributed.initialize()
