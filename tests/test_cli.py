"""The ``generate`` command end to end on a random-weight pipeline folder (in-process, `run_cli`),
and the real ``python -m imagerag_jax.main`` on a bad override (one error line, exit 2)."""

from __future__ import annotations

import os
import subprocess
import sys
from types import SimpleNamespace

import numpy as np
import pytest
from PIL import Image

from imagerag_jax import main
from imagerag_jax.weights import random_pipeline

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENV = {**os.environ, "JAX_PLATFORMS": "cpu", "TF_CPP_MIN_LOG_LEVEL": "2"}


@pytest.fixture
def run_cli(capsys, monkeypatch, tmp_path):
    """`main SUBCOMMAND --flags` in this process (cwd: tmp_path) -> (returncode, stdout, stderr)."""
    monkeypatch.chdir(tmp_path)  # a relative --out (default out.png) lands in the test's folder

    def run(*args: str) -> SimpleNamespace:
        returncode = main.run_cli(["main", *args])
        out = capsys.readouterr()
        return SimpleNamespace(returncode=returncode, stdout=out.out, stderr=out.err)

    return run


@pytest.fixture(scope="module")
def pipeline_dir(tmp_path_factory):
    return random_pipeline.write_random_pipeline(str(tmp_path_factory.mktemp("pipe")))


def test_generate_one_step_grid(run_cli, pipeline_dir, tmp_path):
    out = tmp_path / "grid.png"
    res = run_cli("generate", f"--weights={pipeline_dir}", "--prompt=a cat", "--prompt=a dog",
                  "--batch=3", "--height=32", f"--out={out}")
    assert res.returncode == 0, res.stderr[-3000:]
    img = np.asarray(Image.open(out))
    # Tiny VAE has a 2x downsampling factor; 3 images of 32x32 tile as 2x2 with 2px gaps.
    assert img.shape == (66, 66, 3)
    assert img.std() > 0


def test_generate_multistep_cfg_is_deterministic(run_cli, pipeline_dir, tmp_path):
    outs = []
    for i in range(2):
        out = tmp_path / f"img{i}.png"
        res = run_cli("generate", f"--weights={pipeline_dir}", "--steps=3", "--guidance=5",
                      "--sampler=ddim", "--seed=7", "--height=32", f"--out={out}")
        assert res.returncode == 0, res.stderr[-3000:]
        outs.append(np.asarray(Image.open(out)))
    assert outs[0].shape == (32, 32, 3)
    np.testing.assert_array_equal(outs[0], outs[1])


def test_generate_rejects_a_path_that_is_not_a_model(run_cli, tmp_path):
    (tmp_path / "notes.txt").write_text("hello")
    res = run_cli("generate", f"--weights={tmp_path}")
    assert res.returncode == 2
    assert "is not a Stable Diffusion pipeline" in res.stderr
    assert "Traceback" not in res.stderr
    res = run_cli("generate", f"--weights={tmp_path / 'notes.txt'}")
    assert res.returncode == 2 and "Traceback" not in res.stderr


def test_unknown_subcommand(run_cli):
    res = run_cli("paint")
    assert res.returncode == 2 and res.stderr.startswith("error: unknown subcommand 'paint'; usage:")


def test_real_command_line_bad_override_is_one_error_line(tmp_path):
    """The process itself (not `run_cli`): exit status 2, one stderr line, no workdir."""
    workdir = tmp_path / "run"
    res = subprocess.run(
        [sys.executable, "-m", "imagerag_jax.main", "train", "--config", "configs/tiny.py",
         "--config.remat=bogus", "--workdir", str(workdir)],
        cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=300)
    lines = res.stderr.splitlines()
    assert res.returncode == 2, res.stderr[-3000:]
    assert len(lines) == 1 and lines[0].startswith("error: unknown remat 'bogus'"), res.stderr[-3000:]
    assert not workdir.exists()


def test_cli_writes_what_the_library_function_returns(run_cli, pipeline_dir, tmp_path):
    """`generate` is `generate.text_to_images` plus a PNG: the same pixels from Python."""
    from imagerag_jax import images
    from imagerag_jax.inference import generate

    out = tmp_path / "cli.png"
    res = run_cli("generate", f"--weights={pipeline_dir}", "--prompt=a red bird", "--steps=2",
                  "--guidance=3", "--seed=3", "--height=32", f"--out={out}")
    assert res.returncode == 0, res.stderr[-3000:]
    pipe = generate.load_pipeline(pipeline_dir)
    ours = generate.text_to_images(pipe, ["a red bird"], seed=3, steps=2, guidance=3.0, height=32)
    np.testing.assert_array_equal(np.asarray(Image.open(out)), images.to_uint8(ours)[0])


def test_generate_bad_arguments_are_one_error_line(run_cli, pipeline_dir, tmp_path):
    res = run_cli("generate", f"--weights={pipeline_dir}", "--height=31")
    assert res.returncode == 2 and "Traceback" not in res.stderr
    assert "multiples of" in res.stderr and res.stderr.count("error:") == 1
    assert not (tmp_path / "out.png").exists()


def test_export_flag_is_out_dir_and_generate_out_is_a_file(run_cli, tmp_path):
    res = run_cli("export", f"--workdir={tmp_path}")
    assert res.returncode == 2 and "--out_dir" in res.stderr


def _copy_pipeline(src: str, dst) -> str:
    import shutil

    shutil.copytree(src, dst)
    return str(dst)


def test_truncated_weights_are_one_error_line_naming_the_file(run_cli, pipeline_dir, tmp_path):
    pipe = _copy_pipeline(pipeline_dir, tmp_path / "pipe")
    weights = os.path.join(pipe, "unet", "diffusion_pytorch_model.safetensors")
    with open(weights, "r+b") as f:
        f.truncate(os.path.getsize(weights) // 2)
    res = run_cli("generate", f"--weights={pipe}", "--height=32")
    assert res.returncode == 2 and "Traceback" not in res.stderr, res.stderr[-3000:]
    errors = [line for line in res.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and weights in errors[0] and "truncated" in errors[0]


def test_a_pickle_with_code_is_refused_without_advice_to_run_it(run_cli, pipeline_dir, tmp_path):
    import datetime

    torch = pytest.importorskip("torch")
    pipe = _copy_pipeline(pipeline_dir, tmp_path / "pipe")
    os.remove(os.path.join(pipe, "unet", "diffusion_pytorch_model.safetensors"))
    weights = os.path.join(pipe, "unet", "diffusion_pytorch_model.bin")
    torch.save({"conv_in.weight": torch.zeros(1), "callback": datetime.datetime(2022, 12, 7)}, weights)
    res = run_cli("generate", f"--weights={pipe}", "--height=32")
    assert res.returncode == 2 and "Traceback" not in res.stderr, res.stderr[-3000:]
    errors = [line for line in res.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and weights in errors[0] and "refuses it" in errors[0]
    assert "weights_only=False" not in res.stderr


def test_evaluate_plain_weights_without_a_database(run_cli, pipeline_dir, tmp_path):
    # The paper's SD-Turbo baseline row: --weights, --mode none, no database, MS-COCO prompts.
    import json

    from tests import helpers

    coco = tmp_path / "captions_val2017.json"
    helpers.write_coco_captions(coco, helpers.COCO)
    res = run_cli("evaluate", f"--weights={pipeline_dir}", "--mode=none", f"--prompts={coco}",
                  "--num_prompts=3", f"--out={tmp_path / 'eval'}")
    assert res.returncode == 0, res.stderr[-3000:]
    rows = [json.loads(line) for line in (tmp_path / "eval" / "index.jsonl").read_text().splitlines()]
    assert len(rows) == 3 and all((tmp_path / "eval" / r["file"]).is_file() for r in rows)
    assert json.loads((tmp_path / "eval" / "metrics.json").read_text())["count"] == 3
    res = run_cli("evaluate", f"--weights={pipeline_dir}", "--mode=inject", f"--prompts={coco}",
                  f"--out={tmp_path / 'eval2'}")
    assert res.returncode == 2 and res.stderr.count("error:") == 1 and "--mode inject needs --database" in res.stderr
    assert not (tmp_path / "eval2").exists()


def test_evaluate_teacher_row_samples_in_many_steps_with_guidance(run_cli, pipeline_dir, tmp_path):
    # The paper's SD 2.1 row through evaluate: --weights alone, --steps and --guidance; the images
    # are the plain multi-step sampler's (generate's) on the same noise.
    import json

    import jax.numpy as jnp

    from imagerag_jax import weights
    from imagerag_jax.diffusion import sampling
    from imagerag_jax.inference import rag

    prompts = tmp_path / "p.txt"
    prompts.write_text("a red bird\na blue car\n")
    res = run_cli("evaluate", f"--weights={pipeline_dir}", f"--prompts={prompts}", "--steps=3",
                  "--guidance=5", "--sampler=ddim", "--seed=2", f"--out={tmp_path / 'eval'}")
    assert res.returncode == 0, res.stderr[-3000:]
    settings = json.loads((tmp_path / "eval" / "run.json").read_text())["settings"]
    assert (settings["pipeline"]["steps"], settings["pipeline"]["guidance"], settings["pipeline"]["sampler"]) == (3, 5.0, "ddim")
    pipe = rag.RagPipeline.from_weights(pipeline_dir, steps=3, guidance=5.0, sampler="ddim")
    towers = weights.load_pipeline(pipeline_dir)
    noise = pipe.noise(2, 2)
    want = np.asarray(sampling.ids_to_images(
        towers, jnp.asarray(towers.tokenizer(["a red bird", "a blue car"])), jnp.asarray(towers.tokenizer(["", ""])),
        jnp.asarray(noise), steps=3, guidance=5.0, sampler="ddim"))
    got = pipe(["a red bird", "a blue car"], seed=2).images
    assert np.abs(got - want).max() <= 1e-4 * max(1.0, np.abs(want).max())
    assert np.abs(got - pipe(["a red bird", "a blue car"], seed=2, noise=noise).images).max() == 0
    res = run_cli("evaluate", f"--weights={pipeline_dir}", f"--prompts={prompts}", "--steps=3",
                  f"--database={tmp_path}", f"--index={tmp_path}", f"--out={tmp_path / 'eval3'}")
    assert res.returncode == 2 and "--steps need --weights without --database" in res.stderr
