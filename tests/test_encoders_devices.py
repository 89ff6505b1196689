"""The offline jobs' encoders run data-parallel over every local device (8 fake CPU devices)."""

import os
import subprocess
import sys
import textwrap
from tests import helpers

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

SCRIPT = textwrap.dedent("""
    import sys
    import jax
    import numpy as np
    from imagerag_jax.weights import towers
    from imagerag_jax.data import encoders

    assert jax.local_device_count() == 8
    models = towers.load_job_towers({}, sys.argv[1])
    every = encoders.Encoder(models, batch_size=5)  # rounded up to 8: one row per device
    one = encoders.Encoder(models, batch_size=5, devices=jax.local_devices()[:1])
    assert every.batch_size == 8 and one.batch_size == 5

    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (5, 32, 32, 3), dtype=np.uint8)
    captions = ["a red square", "two dogs", "", "a very long caption " * 5, "x"]
    lat = every.image_latents(images)
    assert len(lat.sharding.device_set) == 8 and lat.sharding.spec == jax.sharding.PartitionSpec("batch")
    assert sorted(s.data.shape[0] for s in lat.addressable_shards) == [1] * 8
    np.testing.assert_allclose(np.asarray(lat)[:5], one.images(images), atol=1e-5, rtol=1e-5)

    hidden, pooled = every.texts(captions)
    h1, p1 = one.texts(captions)
    np.testing.assert_allclose(hidden, h1, atol=1e-5, rtol=1e-5)
    np.testing.assert_allclose(pooled, p1, atol=1e-5, rtol=1e-5)

    spec = encoders.TeacherSpec("ddim", 2, 3.0, "epsilon")
    noise = encoders.example_noise(0, range(5), lat.shape[1:])
    z = every.teacher_sample(spec, captions, "", noise)
    assert len(z.sharding.device_set) == 8
    np.testing.assert_allclose(np.asarray(z)[:5], one.teacher(spec, captions, "", noise),
                               atol=1e-4, rtol=1e-4)
    # The towers' params were placed once on every device, not re-sent per batch.
    placed = every.placed_params("vae_params")
    every.images(images)
    assert every.placed_params("vae_params") is placed
    assert len(jax.tree.leaves(placed)[0].sharding.device_set) == 8
    print("ok")
""")


def test_encoders_split_batches_over_every_local_device(tmp_path):
    env = {**os.environ, "XLA_FLAGS": helpers.xla_flags(8),
           "JAX_PLATFORMS": "cpu", "PYTHONPATH": REPO}
    res = subprocess.run([sys.executable, "-c", SCRIPT, str(tmp_path)], capture_output=True,
                         text=True, env=env, timeout=600, cwd=REPO)
    assert res.returncode == 0 and res.stdout.strip().endswith("ok"), res.stderr[-3000:]
