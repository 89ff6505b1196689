"""rag.RagPipeline: a trained tiny run generates with retrieval in JAX like the exported PyTorch runtime.

(a) from_run: the neighbours are the index's, λ is Eq. 5's, the adapter changes the image, and
the image equals the torch runtime's on the same prompt, noise and neighbours (fp32 bar); (b)
from_export = from_run; (c) modes: inject at w = 1 and none are the plain one step, from_weights
has no adapter mode; (d) noise per prompt does not depend on the batch; (e) a DB built with other
towers, a missing run and bad arguments fail with one clear error; (f) 8 fake devices = 1.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from imagerag_jax.export import to_diffusers
from imagerag_jax.inference import rag
from imagerag_jax.diffusion import sampling
from imagerag_jax.errors import UserError
from imagerag_jax.models import adapter as adapter_lib
from imagerag_jax.retrieval import database as db_lib
from imagerag_jax.retrieval import index as index_lib
from tests import rag_fixtures
from tests.helpers import assert_parity, nchw, parity_error
from tests import helpers

ROOT = Path(__file__).resolve().parents[1]
MEASURED: dict[str, float] = {}


@pytest.fixture(scope="module")
def made(rag_run):
    return rag_run


@pytest.fixture(scope="module")
def pipe(rag_pipe):
    return rag_pipe


@pytest.fixture(scope="module", autouse=True)
def report():
    yield
    print("\nmax |diff|: " + ", ".join(f"{k}={v:.2e}" for k, v in MEASURED.items()))


def check(name: str, out, ref) -> None:
    MEASURED[name] = parity_error(out, ref)[0]
    assert_parity(out, ref)


PROMPTS = ["a blue circle", "a photo of a dog and a cat"]


def test_a_retrieval_lambda_and_adapter(pipe, made):
    assert pipe.mode == "adapter" and pipe.k == 2 and pipe.modes() == ("adapter", "inject", "none")
    out = pipe(PROMPTS, seed=3)
    assert out.images.shape == (2, *pipe.image_size, 3) and out.latents.shape == (2, 8, 8, 4)
    assert out.ids.shape == (2, 2) and out.scores.shape == (2, 2) and out.lam.shape == (2,)
    # A prompt that is a DB caption finds itself first, with cosine 1.
    db = db_lib.Database(made["db"])
    assert out.captions[0][0] == "a blue circle" and out.ids[0, 0] == db.ids[1]
    assert out.scores[0, 0] == pytest.approx(1.0, abs=1e-5)
    # The ids are the index's on the pooled text embeddings; λ is Eq. 5's on the gathered rows.
    hidden, pooled = pipe._encode(pipe._params["text"], pipe.tokenizer(PROMPTS))
    ids, _ = index_lib.Index.load(made["index"]).search(np.asarray(pooled), 2)
    np.testing.assert_array_equal(out.ids, ids)
    assert out.captions == [db.captions(db.rows_for_ids(r)) for r in ids]
    got = db.gather(db.rows_for_ids(ids))
    lam = np.asarray(adapter_lib.retrieval_lambda(pooled, got["pooled"]))
    np.testing.assert_allclose(out.lam, lam, atol=1e-6)
    plain = pipe(PROMPTS, seed=3, mode="none")
    assert plain.ids is None and plain.lam is None
    MEASURED["adapter_effect"] = float(np.abs(out.latents - plain.latents).max())
    assert MEASURED["adapter_effect"] > 1e-4, "the trained adapter changes nothing"


def test_a_jax_image_equals_the_exported_torch_runtime(pipe, made, tmp_path_factory):
    torch = pytest.importorskip("torch")
    from imagerag_jax.export import torch_runtime as rt

    out_dir = str(tmp_path_factory.mktemp("export") / "export")
    to_diffusers.export_run(made["workdir"], out_dir)
    torch.set_num_threads(1)
    tpipe = rt.ImageRAGTurboPipeline.from_pretrained(out_dir, database=made["db"], index=made["index"])
    noise = pipe.noise(len(PROMPTS), seed=5)
    ref = tpipe(PROMPTS, noise=torch.from_numpy(np.ascontiguousarray(nchw(noise))))
    out = pipe(PROMPTS, noise=noise)
    np.testing.assert_array_equal(out.ids, ref.retrieved_ids)
    check("lambda", out.lam, ref.lam.numpy())
    check("x0", nchw(out.latents), ref.latents.numpy())
    check("images", nchw(out.images), ref.images.numpy())
    # (b) the export read back in JAX is the same pipeline.
    epipe = rag.RagPipeline.from_export(out_dir, database=made["db"], index=made["index"])
    assert epipe.k == pipe.k and epipe.timestep == pipe.timestep
    eout = epipe(PROMPTS, noise=noise)
    np.testing.assert_array_equal(eout.ids, out.ids)
    check("export_images", eout.images, out.images)


def test_c_inject_and_none_modes(pipe, made):
    plain = pipe(PROMPTS, seed=1, mode="none")
    full_target = pipe(PROMPTS, seed=1, mode="inject", w=1.0)
    check("inject_w1_is_plain", full_target.latents, plain.latents)
    assert full_target.w == 1.0 and full_target.ids.shape == (2, 2)
    half = pipe(PROMPTS, seed=1, mode="inject", w=0.5)
    assert np.abs(half.latents - plain.latents).max() > 1e-3
    # The plain mode is the UNet's one step on the run's (LoRA-merged) weights.
    x0 = sampling.one_step(lambda x, t, c: pipe.unet.apply({"params": pipe._params["unet"]}, x, t, c),
                           pipe.noise(2, 1), pipe._encode(pipe._params["text"],
                                                          pipe.tokenizer(PROMPTS))[0],
                           pipe.schedule, pipe.unet.prediction_type)
    check("plain_one_step", plain.latents, x0)


def test_c_from_weights_is_training_free_injection(made, tmp_path):
    from imagerag_jax.weights import random_pipeline

    folder = random_pipeline.write_random_pipeline(str(tmp_path / "pipe"))
    db = rag_fixtures.write_db(str(tmp_path / "db"), rag_fixtures.CAPTIONS)
    db_lib.Database(db)  # readable
    with open(os.path.join(db, "manifest.json")) as f:
        manifest = json.load(f)
    label = manifest["text_encoder"].rsplit("#", 1)[0]
    assert label == "random:tiny:0"
    index = rag_fixtures.write_index(db, str(tmp_path / "index"), kind="bm25")
    wpipe = rag.RagPipeline.from_weights(folder, database=db, index=index, k=1)
    assert wpipe.mode == "inject" and wpipe.modes() == ("inject", "none")
    out = wpipe(["a photo of a cat"], seed=0)
    assert out.captions[0][0] == "a photo of a cat" and out.w == rag.DEFAULT_INJECTION_WEIGHT
    with pytest.raises(UserError, match="no trained adapter"):
        wpipe(["a photo of a cat"], mode="adapter")


def test_d_noise_per_prompt_is_independent_of_the_batch(pipe):
    both = pipe(PROMPTS, seed=7)
    second = pipe(PROMPTS[1:], seed=8)
    np.testing.assert_allclose(second.images[0], both.images[1], atol=1e-5)


def test_e_database_of_other_towers_is_refused(made, tmp_path):
    other = rag_fixtures.write_db(str(tmp_path / "db_seed1"), rag_fixtures.CAPTIONS, text_seed=1)
    idx = rag_fixtures.write_index(other, str(tmp_path / "idx_seed1"))
    with pytest.raises(db_lib.DatabaseError, match="text_encoder .*rebuild the database"):
        rag.RagPipeline.from_run(made["workdir"], database=other, index=idx)
    arch = rag_fixtures.write_db(str(tmp_path / "db_arch"), rag_fixtures.CAPTIONS,
                                 text_identity="/models/other#0123456789abcdef")
    idx = rag_fixtures.write_index(arch, str(tmp_path / "idx_arch"))
    with pytest.raises(db_lib.DatabaseError, match="/models/other#0123456789abcdef"):
        rag.RagPipeline.from_run(made["workdir"], database=arch, index=idx)
    # An index of another database.
    small = rag_fixtures.write_db(str(tmp_path / "db_small"), rag_fixtures.CAPTIONS[:3])
    small_idx = rag_fixtures.write_index(small, str(tmp_path / "idx_small"))
    with pytest.raises(db_lib.DatabaseError, match="does not match the database"):
        rag.RagPipeline.from_run(made["workdir"], database=made["db"], index=small_idx)


def test_e_bad_arguments_fail_clearly(pipe, made, tmp_path):
    with pytest.raises(UserError, match="not a folder"):
        rag.RagPipeline.from_run(str(tmp_path / "missing"))
    with pytest.raises(UserError, match="both a database and its index"):
        rag.RagPipeline.from_run(made["workdir"], database=made["db"])
    with pytest.raises(UserError, match="not an export folder"):
        rag.RagPipeline.from_export(str(tmp_path))
    with pytest.raises(UserError, match="non-empty"):
        pipe(["a cat", "  "])
    with pytest.raises(UserError, match="k must be in"):
        pipe(["a cat"], k=7)
    with pytest.raises(UserError, match="unknown mode"):
        pipe(["a cat"], mode="teacher")
    with pytest.raises(UserError, match="w must be in"):
        pipe(["a cat"], mode="inject", w=1.5)


def test_e_run_without_database_generates_plainly(made):
    bare = rag.RagPipeline.from_run(made["workdir"])
    assert bare.modes() == ("none",) and bare.mode == "none"
    assert bare(["a cat"], seed=0).images.shape == (1, *bare.image_size, 3)
    with pytest.raises(UserError, match="no retrieval database"):
        bare(["a cat"], mode="adapter")


def test_f_eight_devices_equal_one(pipe, made, tmp_path):
    prompts = ["a blue circle", "a photo of a cat", "a red square"]  # 3: padded to 8
    ref = pipe(prompts, seed=11)
    script = f"""
import json, sys
import numpy as np, jax
from imagerag_jax.inference import rag
pipe = rag.RagPipeline.from_run({made['workdir']!r}, database={made['db']!r}, index={made['index']!r})
assert pipe.num_devices == 8 == len(jax.local_devices()), pipe.num_devices
out = pipe({prompts!r}, seed=11)
np.savez({str(tmp_path / 'eight.npz')!r}, images=out.images, ids=out.ids)
"""
    env = {**os.environ, "XLA_FLAGS": helpers.xla_flags(8),
           "JAX_PLATFORMS": "cpu", "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = np.load(tmp_path / "eight.npz")
    np.testing.assert_array_equal(got["ids"], ref.ids)
    check("eight_devices", got["images"], ref.images)
