"""H-space cache (hspace_cache.py): equals the encoder, resumes, extends, refuses what does not match.

(1) the cached features are `sampling.retrieved_hspace` rounded to float16; (2) a killed build
resumes at the committed count without re-encoding committed rows; (3) open_cache gives None for
other encoder params, an incomplete or stale cache, and the same cache after a decoder-LoRA merge;
(4) a grown database is extended, a rebuilt one started over, a bad path is one clear error;
(5) on 8 CPU devices the jitted batch is split over all of them and gives the same cache.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from imagerag_jax.retrieval import hspace_cache as hc
from imagerag_jax.models import lora
from imagerag_jax.diffusion import sampling
from imagerag_jax.weights import towers
from imagerag_jax.errors import UserError
from imagerag_jax.retrieval import database as db_lib
from tests import helpers

ROOT = Path(__file__).resolve().parents[1]
N, BATCH = 10, 4  # 3 batches (4, 4, 2): the last one is padded


@pytest.fixture(scope="module")
def tower():
    return towers.random_tower("unet", "tiny", 0)


def entries(start: int, n: int, d: int) -> dict:
    """n DB entries; entry i depends on i only, so a grown DB holds the same first rows."""
    rows = [np.random.default_rng(1000 + i) for i in range(start, start + n)]
    return dict(captions=[f"entry {i}" for i in range(start, start + n)],
                latents=np.stack([r.standard_normal((8, 8, 4)) for r in rows]).astype(np.float32),
                prompt_embeds=np.stack([r.standard_normal((77, d)) for r in rows]).astype(np.float32),
                pooled=np.stack([r.standard_normal(d) for r in rows]).astype(np.float32),
                ids=np.arange(start, start + n))


def write_db(path, d: int, start: int, counts, overwrite: bool = False) -> str:
    """Appends batches of `counts` entries from entry `start` (creating or resuming the DB)."""
    spec = db_lib.DatabaseSpec((8, 8, 4), (77, d), d)
    with db_lib.DatabaseWriter(str(path), spec, source="test", overwrite=overwrite, fsync=False) as w:
        for n in counts:
            w.append(**entries(start, n, d))
            start += n
    return str(path)


def direct(unet, params, db_path: str) -> np.ndarray:
    """retrieved_hspace of every entry, computed in one float32 call."""
    db = db_lib.Database.open(db_path)
    lat = jnp.asarray(db.latents, jnp.float32)[:, None]
    ctx = jnp.asarray(db.prompt_embeds, jnp.float32)[:, None]
    fn = jax.jit(lambda p, x, c: sampling.retrieved_hspace(unet, p, x, c))
    return np.asarray(fn(params, lat, ctx))[:, 0]


def assert_f16_close(got: np.ndarray, ref32: np.ndarray) -> None:
    """`got` is float16 and equals the float16 rounding of `ref32` up to an ulp at its scale."""
    assert got.dtype == np.float16 and got.shape == ref32.shape
    scale = float(np.abs(ref32).max())
    assert scale > 0
    np.testing.assert_allclose(got.astype(np.float32), ref32.astype(np.float16).astype(np.float32),
                               rtol=0, atol=2e-3 * scale)


@pytest.fixture(scope="module")
def built(tower, tmp_path_factory):
    """A 10-entry DB, its clean cache (batch 4) and the direct float32 reference."""
    unet, params = tower
    db = write_db(tmp_path_factory.mktemp("db") / "db", unet.cross_attention_dim, 0, (6, 4))
    path = hc.build_cache(db, unet, params, batch_size=BATCH, fsync=False)
    data = np.fromfile(os.path.join(path, hc.DATA), np.float16)
    return dict(db=db, path=path, data=data, ref=direct(unet, params, db))


def copy_db(db: str, dest) -> str:
    """The database without its caches."""
    shutil.copytree(db, dest, ignore=shutil.ignore_patterns(hc.CACHE_ROOT))
    return str(dest)


class Recorder:
    """Wraps make_encoder: records the latents of every encoder call, fails on call `fail_at`."""

    def __init__(self, monkeypatch, fail_at: int | None = None):
        self.latents: list[np.ndarray] = []
        real = hc.make_encoder

        def make(*args, **kwargs):
            enc = real(*args, **kwargs)

            class Counting:
                batch_size = enc.batch_size
                output_shape = staticmethod(enc.output_shape)

                def __call__(_, latents, embeds):
                    if fail_at is not None and len(self.latents) + 1 == fail_at:
                        raise KeyboardInterrupt("killed")
                    self.latents.append(np.asarray(latents))
                    return enc(latents, embeds)

            return Counting()

        monkeypatch.setattr(hc, "make_encoder", make)

    def rows(self) -> np.ndarray:
        return np.concatenate(self.latents) if self.latents else np.zeros((0, 8, 8, 4), np.float16)


def manifest(path: str) -> dict:
    return json.load(open(os.path.join(path, hc.MANIFEST)))


# ---------------------------------------------------------------------------------------------
# (1) The cache is the encoder's H-space.
# ---------------------------------------------------------------------------------------------


def test_cache_equals_retrieved_hspace(tower, built):
    unet, params = tower
    cache = hc.open_cache(built["db"], params)
    assert cache is not None and cache.path == built["path"] == hc.cache_dir(
        built["db"], hc.encoder_fingerprint(params))
    assert cache.count == N and cache.shape == built["ref"].shape[1:]
    assert cache.shape[-1] == unet.h_space_channels
    assert_f16_close(cache.gather(np.arange(N)), built["ref"])
    rows = np.array([[7, 1], [7, 9]])
    got = cache.gather(rows)
    assert got.shape == (2, 2, *cache.shape)
    np.testing.assert_array_equal(got, cache.gather(np.arange(N))[rows])
    with pytest.raises(IndexError, match="out of range"):
        cache.gather([0, N])
    assert os.path.getsize(os.path.join(built["path"], hc.DATA)) == N * hc.bytes_per_entry(cache.shape)
    m = manifest(built["path"])
    db_m = db_lib.Database.open(built["db"]).manifest
    assert (m["format"], m["version"], m["count"], m["dtype"]) == (hc.CACHE_FORMAT, 1, N, "float16")
    assert m["db"] == {"count": N, "created": db_m["created"]}
    assert m["fingerprint"] == cache.fingerprint


def test_size_at_sd_size():
    assert hc.bytes_per_entry((8, 8, 1280)) == 163_840
    assert hc.size_per_million((8, 8, 1280)) == "152.6 GiB (163.8 GB) per 1M entries (163,840 B/entry)"


# ---------------------------------------------------------------------------------------------
# (2) Resume.
# ---------------------------------------------------------------------------------------------


def test_killed_build_resumes_without_recomputing(tower, built, tmp_path, monkeypatch):
    unet, params = tower
    db = copy_db(built["db"], tmp_path / "db")
    with monkeypatch.context() as m:
        Recorder(m, fail_at=3)
        with pytest.raises(KeyboardInterrupt):
            hc.build_cache(db, unet, params, batch_size=BATCH, fsync=False)
    path = hc.cache_dir(db, hc.encoder_fingerprint(params))
    committed = manifest(path)["count"]
    assert 0 < committed < N and committed % BATCH == 0
    assert hc.open_cache(db, params) is None
    with open(os.path.join(path, hc.DATA), "ab") as f:  # a half-written batch past the commit
        f.write(b"\x7f" * 1000)

    rec = Recorder(monkeypatch)
    assert hc.build_cache(db, unet, params, batch_size=BATCH, fsync=False) == path
    np.testing.assert_array_equal(rec.rows(), db_lib.Database.open(db).latents[committed:])
    np.testing.assert_array_equal(np.fromfile(os.path.join(path, hc.DATA), np.float16), built["data"])

    # A manifest that commits fewer rows than the file holds, the rest garbage: only those redone.
    m = manifest(path)
    m["count"] = 6
    json.dump(m, open(os.path.join(path, hc.MANIFEST), "w"))
    row = hc.bytes_per_entry(m["shape"])
    with open(os.path.join(path, hc.DATA), "r+b") as f:
        f.seek(6 * row)
        f.write(np.random.default_rng(0).bytes(5 * row))
    rec = Recorder(monkeypatch)
    hc.build_cache(db, unet, params, batch_size=BATCH, fsync=False)
    assert sum(len(x) for x in rec.latents) == N - 6
    np.testing.assert_array_equal(rec.rows(), db_lib.Database.open(db).latents[6:])
    cache = hc.open_cache(db, params)
    assert_f16_close(cache.gather(np.arange(N)), built["ref"])

    rec = Recorder(monkeypatch)  # complete: nothing to do
    hc.build_cache(db, unet, params, batch_size=BATCH, fsync=False)
    assert rec.latents == []


# ---------------------------------------------------------------------------------------------
# (3) Which params a cache belongs to.
# ---------------------------------------------------------------------------------------------


def test_open_cache_matches_encoder_params_only(tower, built, tmp_path, caplog):
    unet, params = tower
    fp = hc.encoder_fingerprint(params)
    assert hc.open_cache(built["db"], fingerprint=fp) is not None

    other = {**params, "conv_in": {**params["conv_in"], "bias": params["conv_in"]["bias"] + 0.1}}
    assert hc.encoder_fingerprint(other) != fp
    with caplog.at_level(logging.INFO):
        assert hc.open_cache(built["db"], other) is None
    assert "no H-space cache" in caplog.text and fp in caplog.text  # names the cache that exists

    lora_p = lora.init_lora(jax.random.PRNGKey(1), params, lora.DEFAULT_DECODER_PATTERN, 4)
    flat = lora.flatten(lora_p)
    for i, key in enumerate(sorted(k for k in flat if k.endswith("/b"))):
        flat[key] = jnp.asarray(np.random.default_rng(i).standard_normal(flat[key].shape) * 0.3,
                                jnp.float32)
    merged = lora.merge(params, lora.unflatten(flat), 8.0, 4)
    assert towers.fingerprint(merged) != towers.fingerprint(params)  # the merge did change the UNet
    assert hc.encoder_fingerprint(merged) == fp
    assert hc.open_cache(built["db"], merged) is not None

    db = copy_db(built["db"], tmp_path / "db")
    shutil.copytree(os.path.join(built["db"], hc.CACHE_ROOT), os.path.join(db, hc.CACHE_ROOT))
    path = hc.cache_dir(db, fp)
    assert hc.open_cache(db, params) is not None
    m = manifest(path)
    json.dump({**m, "count": 5}, open(os.path.join(path, hc.MANIFEST), "w"))
    caplog.clear()
    with caplog.at_level(logging.INFO):
        assert hc.open_cache(db, params) is None
    assert "incomplete (5 of 10 entries)" in caplog.text

    os.truncate(os.path.join(path, hc.DATA), 100)
    json.dump(m, open(os.path.join(path, hc.MANIFEST), "w"))
    assert hc.open_cache(db, params) is None  # committed count, but the file was cut short

    open(os.path.join(path, hc.MANIFEST), "w").write("{not json")
    for call in (lambda: hc.open_cache(db, params),
                 lambda: hc.build_cache(db, unet, params, batch_size=BATCH, fsync=False)):
        with pytest.raises(UserError, match=f"{path}/manifest.json: not a readable JSON"):
            call()


# ---------------------------------------------------------------------------------------------
# (4) The database changes under the cache.
# ---------------------------------------------------------------------------------------------


def test_grown_db_extends_rebuilt_db_starts_over(tower, built, tmp_path, monkeypatch, caplog):
    unet, params = tower
    d = unet.cross_attention_dim
    db = write_db(tmp_path / "db", d, 0, (6,))
    path = hc.build_cache(db, unet, params, batch_size=BATCH, fsync=False)
    write_db(db, d, 6, (4,))  # resumes the writer: the same first rows, 4 more
    assert hc.open_cache(db, params) is None

    rec = Recorder(monkeypatch)
    hc.build_cache(db, unet, params, batch_size=BATCH, fsync=False)
    np.testing.assert_array_equal(rec.rows(), db_lib.Database.open(db).latents[6:])
    cache = hc.open_cache(db, params)
    assert cache.count == N and manifest(path)["db"]["count"] == N
    assert_f16_close(cache.gather(np.arange(N)), built["ref"])

    write_db(db, d, 20, (3,), overwrite=True)  # rebuilt: other entries, new 'created'
    caplog.clear()
    with caplog.at_level(logging.INFO):
        assert hc.open_cache(db, params) is None
    assert "database was rebuilt" in caplog.text
    rec = Recorder(monkeypatch)
    with caplog.at_level(logging.WARNING):
        hc.build_cache(db, unet, params, batch_size=BATCH, fsync=False)
    assert "Starting the H-space cache" in caplog.text and len(rec.rows()) == 3
    cache = hc.open_cache(db, params)
    assert cache.count == 3
    assert_f16_close(cache.gather(np.arange(3)), direct(unet, params, db))


def test_bad_db_path_is_one_clear_error(tower, tmp_path):
    unet, params = tower
    missing = str(tmp_path / "no_such_db")
    for call in (lambda: hc.build_cache(missing, unet, params),
                 lambda: hc.open_cache(missing, params)):
        with pytest.raises(db_lib.DatabaseError) as e:
            call()
        assert isinstance(e.value, UserError)
        assert str(e.value) == f"retrieval database {missing!r} does not exist"
    assert not os.path.exists(missing)


# ---------------------------------------------------------------------------------------------
# (5) Sharded over 8 devices.
# ---------------------------------------------------------------------------------------------


SHARDED_SCRIPT = """
    import shutil, sys
    import jax, numpy as np
    from imagerag_jax.retrieval import hspace_cache as hc
    from imagerag_jax.weights import towers
    from imagerag_jax.retrieval import database as db_lib
    assert jax.device_count() == 8, jax.devices()
    db = sys.argv[1]
    unet, params = towers.random_tower("unet", "tiny", 0)
    enc = hc.make_encoder(unet, params, 3)
    assert enc.batch_size == 8
    d = db_lib.Database.open(db)
    out = enc(d.latents[:5], d.prompt_embeds[:5])
    assert out.shape[0] == 8 and len(out.sharding.device_set) == 8, out.sharding
    assert {s.data.shape[0] for s in out.addressable_shards} == {1}
    hc.build_cache(db, unet, params, batch_size=3, fsync=False, progress=False)
    print("SHARDED OK")
"""


def test_build_on_eight_devices(built, tmp_path):
    db = copy_db(built["db"], tmp_path / "db")
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""),
           "JAX_PLATFORMS": "cpu", "XLA_FLAGS": helpers.xla_flags(8)}
    res = subprocess.run([sys.executable, "-c", textwrap.dedent(SHARDED_SCRIPT), db], env=env,
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 0 and "SHARDED OK" in res.stdout, (res.stdout + res.stderr)[-3000:]
    cache = hc.open_cache(db, fingerprint=os.path.basename(built["path"]))
    assert cache is not None
    assert_f16_close(cache.gather(np.arange(N)), built["ref"])
