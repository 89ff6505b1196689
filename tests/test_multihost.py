"""Two processes x 4 fake CPU devices (jax.distributed + gloo) train like one process x 8 devices.

Each of the two processes calls `jax.distributed.initialize(coordinator_address="127.0.0.1:PORT",
num_processes=2, process_id=i)` and runs `trainer_lib.train_and_evaluate` for 3 steps on a (2, 4)
('data', 'fsdp') mesh, its `InputStream` reading only its own TFRecord shard (2 shards written
once beforehand by a single process). The reference is one process with 8 fake devices running the
same `train_and_evaluate` on the same mesh shape and data.

Why the reference emulates the host split: one process reading both shards would interleave the two
files and shuffle the mixed stream, so its global batches would hold other examples (and the step's
per-row noise makes the loss order-dependent). In the two-process run global batch i is
[process 0's local batch i, process 1's local batch i] (rows follow the mesh's device order, whose
first 4 devices belong to process 0; the driver checks this). The reference therefore replaces
`InputStream` with one that builds, in one process, exactly those rows: the streams of
process_index 0 and 1 (process_count=2, same seed and shuffle buffer), concatenated and put on the
mesh. Everything else (model, step, mesh shape, loop) is the same code.

Compared: per-step losses (log_every=1, captured from the loop's `_mean_metrics`) on both processes,
and the final trainable params. Tolerances as tests/test_sharding.py: relative loss error < 1e-4,
max |param difference| < 1e-5 (float32 reductions in another order across hosts, ~1e-6).
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
from tests import helpers

ROOT = Path(__file__).resolve().parents[1]
TIMEOUT_S = 240  # per phase; a hung collective fails the test instead of blocking it

DRIVER = r"""
import importlib.util, json, os, sys
mode, pid, port, data_dir, workdir = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4], sys.argv[5]
import jax
jax.config.update("jax_cpu_collectives_implementation", "gloo")
if mode == "multi":
    jax.distributed.initialize(coordinator_address=f"127.0.0.1:{port}", num_processes=2,
                               process_id=pid, initialization_timeout=120)
import numpy as np
from jax.experimental import multihost_utils
from imagerag_jax.training import trainer as trainer_lib
from imagerag_jax.data import input_stream, synthetic

spec = importlib.util.spec_from_file_location("tiny", os.path.join("configs", "tiny.py"))
tiny = importlib.util.module_from_spec(spec); spec.loader.exec_module(tiny)
cfg = tiny.get_config()
cfg.data_dir = data_dir
cfg.synthetic.num_shards = 2
cfg.global_batch_size = 8
cfg.total_steps = 3
cfg.log_every = 1
cfg.checkpoint_every = 1000  # the last step still saves (multi-host orbax save included)
cfg.async_checkpoints = False
cfg.sample_every = 0
cfg.mesh = (("data", 2), ("fsdp", 4))
cfg.min_shard_size = 256  # FSDP-shard the tiny towers too

assert len(jax.devices()) == 8 and jax.process_count() == (2 if mode == "multi" else 1)
if mode == "ref":
    synthetic.write_synthetic_data(data_dir, cfg)  # once, by this single process

    OneHost = input_stream.InputStream

    class TwoHostStream:
        # The two hosts' streams in one process: global batch = [host 0 rows, host 1 rows].
        def __init__(self, data_dir, split, gb, *, mesh, batch_axes, **kw):
            self.parts = [OneHost(data_dir, split, gb, process_index=p,
                                   process_count=2, **kw) for p in range(2)]
            self.sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(tuple(batch_axes)))

        def __iter__(self):
            return self

        def __next__(self):
            a, b = (next(p) for p in self.parts)
            return {k: jax.device_put(np.concatenate([a[k], b[k]]), self.sharding) for k in a}

        def get_state(self):
            return self.parts[0].get_state()

    input_stream.InputStream = TwoHostStream

losses = []
mean_metrics = trainer_lib._mean_metrics
def recording(history):
    out = mean_metrics(history)
    losses.append(out)
    return out
trainer_lib._mean_metrics = recording

owners = [d.process_index for d in trainer_lib.sharding.make_mesh(cfg.mesh).devices.flat]
state = trainer_lib.train_and_evaluate(cfg, workdir)
params = multihost_utils.process_allgather(state["params"], tiled=True)
flat = {jax.tree_util.keystr(p): np.asarray(x) for p, x in jax.tree_util.tree_leaves_with_path(params)}
np.savez(os.path.join(workdir, f"params_{mode}_{pid}.npz"), **flat)
with open(os.path.join(workdir, f"losses_{mode}_{pid}.json"), "w") as f:
    json.dump({"losses": losses, "owners": owners, "step": int(np.asarray(state["step"].addressable_data(0))),
               "files": [] if mode == "ref" else [os.path.basename(x) for x in
                         input_stream.InputStream(data_dir, "train", 8).files]}, f)
print("DRIVER_DONE", mode, pid)
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def env(devices: int, cache: str) -> dict[str, str]:
    return {**os.environ, "JAX_PLATFORMS": "cpu", "TF_CPP_MIN_LOG_LEVEL": "2",
            "XLA_FLAGS": helpers.xla_flags(devices),
            "JAX_COMPILATION_CACHE_DIR": cache, "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
            "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": "-1"}


def run_all(cmds: list[list[str]], envs: list[dict], logs: list[Path]) -> None:
    """Runs the commands together; fails with their stderr on an error or after TIMEOUT_S."""
    procs, files = [], []
    for cmd, e, log in zip(cmds, envs, logs):
        f = open(log, "w")
        files.append(f)
        procs.append(subprocess.Popen(cmd, cwd=str(ROOT), env=e, stdout=f, stderr=subprocess.STDOUT))
    deadline = time.time() + TIMEOUT_S
    try:
        while any(p.poll() is None for p in procs):
            if time.time() > deadline or any(p.returncode not in (None, 0) for p in procs):
                break
            time.sleep(0.2)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
        for f in files:
            f.close()
    bad = [(i, p.returncode) for i, p in enumerate(procs) if p.returncode != 0]
    if bad:
        tails = "\n".join(f"--- process {i} (rc {rc}{', timed out' if rc == -9 else ''}):\n"
                          f"{logs[i].read_text()[-3000:]}" for i, rc in bad)
        raise AssertionError(f"driver(s) failed:\n{tails}")


def test_two_processes_match_one_process(tmp_path):
    cache, data = str(tmp_path / "jax_cache"), str(tmp_path / "data")
    driver = [sys.executable, "-c", DRIVER]
    ref_dir, multi_dir = tmp_path / "ref", tmp_path / "multi"
    ref_dir.mkdir(), multi_dir.mkdir()
    t0 = time.time()
    run_all([driver + ["ref", "0", "0", data, str(ref_dir)]], [env(8, cache)], [tmp_path / "ref.log"])
    t1 = time.time()
    port = str(free_port())
    run_all([driver + ["multi", str(i), port, data, str(multi_dir)] for i in range(2)],
            [env(4, cache)] * 2, [tmp_path / f"multi{i}.log" for i in range(2)])
    print(f"reference {t1 - t0:.1f} s, two processes {time.time() - t1:.1f} s")

    ref = json.loads((ref_dir / "losses_ref_0.json").read_text())
    hosts = [json.loads((multi_dir / f"losses_multi_{i}.json").read_text()) for i in range(2)]
    # Disjoint files per host, covering the set; process 0 owns the first half of the batch rows.
    assert hosts[0]["files"] and not set(hosts[0]["files"]) & set(hosts[1]["files"]), hosts
    assert hosts[0]["owners"] == [0] * 4 + [1] * 4, hosts[0]["owners"]
    assert ref["step"] == hosts[0]["step"] == hosts[1]["step"] == 3
    assert len(ref["losses"]) == 3
    keys = ("g_loss", "d_loss", "g_distill", "g_adv", "g_grad_norm", "d_grad_norm", "lambda_mean")
    for h in hosts:
        assert len(h["losses"]) == 3
        err = max(abs(a[k] - b[k]) / max(1.0, abs(a[k]))
                  for a, b in zip(ref["losses"], h["losses"]) for k in keys)
        print(f"max relative loss error {err:.2e}; g_loss {[l['g_loss'] for l in h['losses']]}")
        assert err < 1e-4, (ref["losses"], h["losses"])
    # The losses do change from step to step (the comparison is not of constants).
    assert len({round(l["g_loss"], 7) for l in ref["losses"]}) > 1, ref["losses"]

    p_ref = np.load(ref_dir / "params_ref_0.npz")
    for i in range(2):
        p = np.load(multi_dir / f"params_multi_{i}.npz")
        assert sorted(p.files) == sorted(p_ref.files)
        err = max(float(np.max(np.abs(p[k] - p_ref[k]))) for k in p_ref.files)
        print(f"process {i}: max |param difference| {err:.2e}")
        assert err < 1e-5, (i, err)
