"""Mesh and sharding rules, and the same train step on 1 device and on a (2, 4) mesh of 8."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from imagerag_jax import sharding
from tests import helpers

ROOT = Path(__file__).resolve().parents[1]


class FakeMesh:
    """What param_specs / logical_to_mesh read from a mesh (axis names and sizes)."""

    def __init__(self, **shape):
        self.shape = shape
        self.axis_names = tuple(shape)


def test_mesh_shape_resolves_minus_one():
    assert sharding.mesh_shape((("data", -1), ("fsdp", 4)), 8) == {"data": 2, "fsdp": 4}
    assert sharding.mesh_shape({"data": 2, "fsdp": -1}, 8) == {"data": 2, "fsdp": 4}
    assert sharding.mesh_shape((("data", 1), ("fsdp", 1)), 1) == {"data": 1, "fsdp": 1}
    with pytest.raises(ValueError, match="does not divide"):
        sharding.mesh_shape((("data", -1), ("fsdp", 3)), 8)
    with pytest.raises(ValueError, match="at most one"):
        sharding.mesh_shape((("data", -1), ("fsdp", -1)), 8)
    with pytest.raises(ValueError, match="uses 2 of 8"):
        sharding.mesh_shape((("data", 1), ("fsdp", 2)), 8)


def test_make_mesh_on_the_local_devices():
    mesh = sharding.make_mesh((("data", -1), ("fsdp", 1)))
    assert mesh.axis_names == ("data", "fsdp")
    assert mesh.size == len(jax.devices())
    assert sharding.batch_axes(mesh) == ("data", "fsdp")
    assert sharding.batch_shards(mesh) == len(jax.devices())


def test_fsdp_spec_shards_the_largest_divisible_axis_of_big_params():
    assert sharding.fsdp_spec((320, 1280), 4, min_shard_size=1000) == P(None, "fsdp")
    assert sharding.fsdp_spec((3, 3, 640, 320), 4, min_shard_size=1000) == P(None, None, "fsdp", None)
    # 1280 is the largest but 4 does not divide 1278: the next largest divisible axis.
    assert sharding.fsdp_spec((1278, 320), 4, min_shard_size=1000) == P(None, "fsdp")
    assert sharding.fsdp_spec((7, 9), 4, min_shard_size=1) == P()  # nothing divisible
    assert sharding.fsdp_spec((320, 1280), 4, min_shard_size=10**6) == P()  # small: replicated
    assert sharding.fsdp_spec((320, 1280), 1, min_shard_size=1) == P()  # no fsdp axis


def test_param_specs_threshold_and_regex_rules():
    mesh = FakeMesh(data=2, fsdp=4)
    tree = {"big": {"kernel": np.zeros((64, 128))}, "small": {"bias": np.zeros((128,))},
            "norm": {"scale": np.zeros((4096,))}, "step": np.zeros(())}
    specs = sharding.param_specs(tree, mesh, min_shard_size=1000)
    assert specs["big"]["kernel"] == P(None, "fsdp")
    assert specs["small"]["bias"] == P()
    assert specs["norm"]["scale"] == P("fsdp")
    assert specs["step"] == P()
    specs = sharding.param_specs(tree, mesh, min_shard_size=1000, rules=((r"^norm/", "replicate"),))
    assert specs["norm"]["scale"] == P() and specs["big"]["kernel"] == P(None, "fsdp")
    with pytest.raises(ValueError, match="unknown sharding strategy"):
        sharding.param_specs(tree, mesh, rules=((".*", "tp"),))


def test_logical_rules_map_batch_to_mesh_axes():
    mesh = FakeMesh(data=2, fsdp=4)
    assert sharding.logical_to_mesh(("batch", None), mesh=mesh) == P(("data", "fsdp"), None)
    assert sharding.logical_to_mesh(("batch",), (("batch", "data"),), mesh) == P("data")
    # Axes the mesh lacks are dropped, so a rule set works on smaller meshes too.
    assert sharding.logical_to_mesh(("batch",), mesh=FakeMesh(data=8)) == P("data")


# ---------------------------------------------------------------------------------------------
# One device vs a (2, 4) mesh of fake CPU devices: same losses and parameters.
# ---------------------------------------------------------------------------------------------

EQUIVALENCE_SCRIPT = r"""
import importlib.util, json, sys
import jax, numpy as np
from imagerag_jax import sharding
from imagerag_jax.training import trainer as trainer_lib
from imagerag_jax.data import synthetic

spec = importlib.util.spec_from_file_location("tiny", sys.argv[1])
tiny = importlib.util.module_from_spec(spec); spec.loader.exec_module(tiny)
assert len(jax.devices()) == 8, jax.devices()

def run(mesh):
    cfg = tiny.get_config()
    cfg.global_batch_size = 8
    cfg.min_shard_size = 256  # shard even the tiny towers, so FSDP gathers are exercised
    trainer = trainer_lib.Trainer(cfg, mesh)
    schema = synthetic.synthetic_schema(cfg)
    abstract = trainer.abstract_state(schema)
    state = trainer.init_state(schema)
    step, _ = trainer.compile_step(abstract, schema, 8)
    losses = []
    for i in range(3):
        batch = trainer.shard_batch(trainer_lib.random_batch(schema, 8, seed=i))
        if i == 0:
            n_sharded = sum(s.spec != jax.sharding.PartitionSpec()
                            for s in jax.tree.leaves(trainer.frozen_shardings))
            shards = len(batch["latent"].addressable_shards)
        state, m = step(state, trainer.frozen, batch)
        losses.append({k: float(v) for k, v in m.items()})
    params = jax.tree.map(np.asarray, state["params"])
    return losses, params, n_sharded, shards

one = run(sharding.make_mesh((("data", 1), ("fsdp", 1)), jax.devices()[:1]))
many = run(sharding.make_mesh((("data", 2), ("fsdp", 4))))
loss_err = max(abs(a[k] - b[k]) / max(1.0, abs(a[k])) for a, b in zip(one[0], many[0]) for k in a)
flat1 = jax.tree_util.tree_leaves_with_path(one[1])
flat8 = jax.tree.leaves(many[1])
param_err = max(float(np.max(np.abs(x - y))) for (_, x), y in zip(flat1, flat8))
worst = max(((float(np.max(np.abs(x - y))), jax.tree_util.keystr(p)) for (p, x), y in zip(flat1, flat8)))
print(json.dumps({"loss_err": loss_err, "param_err": param_err, "worst": worst[1],
                  "sharded_frozen_leaves": many[2], "batch_shards": many[3], "one_shards": one[3],
                  "g_loss": [l["g_loss"] for l in one[0]], "g_loss8": [l["g_loss"] for l in many[0]]}))
"""


def test_one_device_and_2x4_mesh_give_the_same_step():
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "TF_CPP_MIN_LOG_LEVEL": "2",
           # 8 fake devices must be requested before jax initialises.
           "XLA_FLAGS": helpers.xla_flags(8)}
    res = subprocess.run([sys.executable, "-c", EQUIVALENCE_SCRIPT, str(ROOT / "configs/tiny.py")],
                         cwd=str(ROOT), env=env, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-4000:]
    out = json.loads(res.stdout.strip().splitlines()[-1])
    assert out["batch_shards"] == 8 and out["one_shards"] == 1
    assert out["sharded_frozen_leaves"] > 10, "the (2, 4) run did not shard the frozen towers"
    # Float32 sums in another order (sharded matmuls, cross-device reductions) differ by ~1e-6
    # relative; three AdamW steps of lr 1e-4 move each parameter by at most ~3e-4, so a parameter
    # difference below 1e-5 means the updates agree to a few percent at worst.
    assert out["loss_err"] < 1e-4, out
    assert out["param_err"] < 1e-5, out
