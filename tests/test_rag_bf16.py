"""Generation with retrieval in bfloat16 (`RagPipeline(dtype='bfloat16')`, CLI `--dtype bfloat16`).

The UNet, adapter and VAE compute in bf16 from the float32 params; the text encoder, lambda and
the search stay float32, so bf16 retrieves the same neighbours with the same lambda, and its images
are float32's within bf16's precision (about 3 significant digits per op, through the tiny UNet
and VAE: the bound below is loose on purpose, a broken path is off by the whole image range).
The H-space cache a bf16 pipeline builds is the float32 encoder's, byte for byte.
"""

from __future__ import annotations

import shutil

import numpy as np
import pytest

from imagerag_jax import main
from imagerag_jax.errors import UserError
from imagerag_jax.inference import rag

PROMPTS = ["a blue circle", "a photo of a dog and a cat"]
MEASURED: dict[str, float] = {}


@pytest.fixture(scope="module")
def bf16_pipe(rag_run):
    return rag.RagPipeline.from_run(rag_run["workdir"], database=rag_run["db"], index=rag_run["index"],
                                    dtype="bfloat16")


@pytest.fixture(scope="module", autouse=True)
def report():
    yield
    print("\nbf16 vs fp32 max |diff|: " + ", ".join(f"{k}={v:.2e}" for k, v in MEASURED.items()))


def test_bf16_retrieves_what_fp32_does_and_draws_close_to_it(rag_pipe, bf16_pipe):
    assert bf16_pipe.describe()["dtype"] == "bfloat16" and rag_pipe.describe()["dtype"] == "float32"
    assert bf16_pipe.fingerprint == rag_pipe.fingerprint  # the params are float32's
    for mode in ("adapter", "inject"):
        ref, out = rag_pipe(PROMPTS, seed=3, mode=mode), bf16_pipe(PROMPTS, seed=3, mode=mode)
        assert out.images.dtype == np.float32 and out.latents.dtype == np.float32
        np.testing.assert_array_equal(out.ids, ref.ids)
        np.testing.assert_array_equal(out.scores, ref.scores)
        np.testing.assert_allclose(out.lam, ref.lam, rtol=0, atol=1e-6)
        MEASURED[f"{mode}_images"] = float(np.abs(out.images - ref.images).max())
        MEASURED[f"{mode}_latents"] = float(np.abs(out.latents - ref.latents).max())
        scale = float(np.abs(ref.latents).max())
        assert MEASURED[f"{mode}_latents"] <= 0.05 * scale, (mode, MEASURED, scale)
        assert MEASURED[f"{mode}_images"] <= 0.1, (mode, MEASURED)  # images in [-1, 1]
        assert float(np.abs(out.images - ref.images).mean()) <= 0.02
    # bf16 is not silently float32.
    assert MEASURED["adapter_latents"] > 0


def test_a_bf16_pipeline_builds_the_float32_cache(rag_run, tmp_path):
    dbs = [shutil.copytree(rag_run["db"], tmp_path / name) for name in ("fp32", "bf16")]
    caches = []
    for db, dtype in zip(dbs, ("float32", "bfloat16")):
        pipe = rag.RagPipeline.from_run(rag_run["workdir"], database=str(db), index=rag_run["index"],
                                        dtype=dtype)
        path = pipe.build_cache(batch_size=4)
        caches.append((tmp_path / path / "hspace.bin").read_bytes())
        assert pipe.cache is not None  # generation now reads it (test_rag_cli: used_cache)
    assert caches[0] == caches[1]


def test_unknown_dtype_is_refused(rag_run):
    with pytest.raises(UserError, match="unknown compute dtype 'float16'"):
        rag.RagPipeline.from_run(rag_run["workdir"], database=rag_run["db"], index=rag_run["index"],
                                 dtype="float16")


def test_generate_with_retrieval_takes_dtype_on_the_cli(rag_run, tmp_path, capsys):
    out = tmp_path / "bf16.png"
    status = main.run_cli(["main", "generate", f"--run={rag_run['workdir']}", f"--database={rag_run['db']}",
                           f"--index={rag_run['index']}", "--prompt=a red square", "--dtype=bfloat16",
                           f"--out={out}", "--nocache"])
    captured = capsys.readouterr()
    assert status == 0, captured.err
    assert out.is_file() and "lambda" in captured.out
