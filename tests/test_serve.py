"""The demo page over HTTP: a tiny trained run and DB on 127.0.0.1, driven by gradio_client."""

from __future__ import annotations

import copy
import socket
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from imagerag_jax import images
from imagerag_jax.inference import serve
gradio = pytest.importorskip("gradio")
gradio_client = pytest.importorskip("gradio_client")

SEED, K, W = 5, 3, 0.6


def free_port() -> int:
    """A port nothing listens on now (the OS picks it)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def made(rag_run):
    return rag_run


@pytest.fixture(scope="module")
def pipe(rag_pipe):
    return rag_pipe


@pytest.fixture(scope="module")
def client(pipe):
    """The page launched without blocking; closed after the module's tests."""
    url = serve.serve(pipe, port=free_port(), block=False)
    assert url.startswith("http://127.0.0.1:"), url
    try:
        yield gradio_client.Client(url, verbose=False)
    finally:
        gradio.close_all()


def read(path: str) -> np.ndarray:
    return np.asarray(Image.open(path).convert("RGB"))


def test_generate_over_http_matches_the_pipeline(made, pipe, client):
    prompt = made["captions"][1]
    assert pipe.mode == "adapter"
    image, gallery, lam, seconds = client.predict(prompt, "adapter", K, W, SEED,
                                                  api_name="/generate")
    got = read(image)
    assert got.shape == (*pipe.image_size, 3)
    ref = pipe([prompt], seed=SEED, k=K, mode="adapter", w=W)
    want = images.to_uint8(ref.images)[0]
    assert np.abs(got.astype(int) - want.astype(int)).max() <= 1
    # A prompt equal to a DB caption retrieves that entry first; each neighbour names its caption.
    captions = [item["caption"] for item in gallery]
    assert len(captions) == K and captions[0].startswith(prompt)
    assert [c.split(" · ")[0] for c in captions] == ref.captions[0]
    want_nb = images.to_uint8(pipe.neighbour_images(ref.ids))[0]
    for item, nb in zip(gallery, want_nb):
        assert np.abs(read(item["image"]).astype(int) - nb.astype(int)).max() <= 1
    assert -1.0 <= lam <= 1.0 and lam == pytest.approx(float(ref.lam[0]), abs=1e-4)
    assert set(seconds) == {"text", "retrieval", "denoise", "total"} and seconds["total"] > 0


def test_mode_none_shows_no_neighbours_and_no_lambda(made, pipe, client):
    prompt = made["captions"][4]
    image, gallery, lam, seconds = client.predict(prompt, "none", K, W, SEED, api_name="/generate")
    assert gallery == [] and lam is None and seconds["retrieval"] >= 0
    want = images.to_uint8(pipe([prompt], seed=SEED, mode="none").images)[0]
    assert np.abs(read(image).astype(int) - want.astype(int)).max() <= 1


def test_empty_prompt_is_a_clear_error(client):
    with pytest.raises(gradio_client.exceptions.AppError, match="prompt is empty"):
        client.predict("   ", "adapter", 1, W, 0, api_name="/generate")


def test_only_the_generate_endpoint_is_public(client):
    assert list(client.view_api(return_format="dict", print_info=False)["named_endpoints"]) == [
        "/generate"]


def controls(demo) -> dict[str, dict]:
    """label -> props of the page's components, from the config the browser receives."""
    return {c["props"].get("label"): c["props"] for c in demo.config["components"]
            if c["props"].get("label")}


def test_controls_follow_the_pipeline(pipe):
    props = controls(serve.build_demo(pipe))
    assert [c[0] for c in props["mode"]["choices"]] == ["adapter", "inject", "none"]
    assert props["k (neighbours)"]["maximum"] == min(8, len(pipe.database)) == 6
    # Without an adapter the page offers injection and plain generation only.
    bare = copy.copy(pipe)
    bare.adapter, bare.mode = None, "inject"
    props = controls(serve.build_demo(bare))
    assert [c[0] for c in props["mode"]["choices"]] == ["inject", "none"]
    assert props["mode"]["value"] == "inject" and props["w (inject weight)"]["interactive"]


def test_the_page_offers_the_databases_captions_as_examples(pipe):
    props = controls(serve.build_demo(pipe))
    samples = [row[0] for row in props["example prompts (captions from the database)"]["samples"]]
    # A visitor sees what the run can draw: distinct captions of its own database.
    assert samples == serve.example_prompts(pipe) and 4 <= len(set(samples)) == len(samples) <= 6
    assert set(samples) <= set(pipe.database.captions())
    assert props["prompt"]["placeholder"] == samples[0]


def test_importing_serve_does_not_import_gradio():
    code = "import sys, imagerag_jax.inference.serve; print(sorted({'gradio', 'jax'} & set(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
