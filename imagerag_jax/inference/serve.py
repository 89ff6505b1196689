"""The local demo page: a prompt, its one-step image beside the retrieved neighbours (Gradio)."""

from __future__ import annotations

import os
from typing import Any

import numpy as np

from imagerag_jax import images
from imagerag_jax.errors import UserError

MAX_K = 8
EXAMPLES = 6  # example prompts offered under the prompt box
EMPTY_PROMPT = "The prompt is empty: type a prompt, then press Generate."
MODE_HELP = {
    "adapter": "adapter: the trained H-space adapter mixes in the neighbours, scaled by λ",
    "inject": "inject: the neighbours' H-space is blended in with weight w",
    "none": "none: plain one-step generation, no retrieval",
}
# Scale the generated image to its panel: a tiny run's 64 px images would otherwise sit in a corner.
CSS = "#generated img { width: 100%; height: 100%; object-fit: contain; }"


def _gradio():
    """Import gradio with telemetry off: the page is local and the machine may have no internet."""
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    import gradio

    return gradio


def supported_modes(pipe) -> list[str]:
    """The modes the pipeline can run: 'adapter' needs a trained adapter, retrieval a database."""
    return list(pipe.modes())


def max_k(pipe) -> int:
    """The k slider's top: at most MAX_K neighbours and never more than the database holds."""
    return max(1, min(MAX_K, len(pipe.database))) if pipe.database is not None else 1


def example_prompts(pipe, count: int = EXAMPLES) -> list[str]:
    """Distinct captions of the pipeline's database, spread over it, to offer as example prompts.

    A miniature run draws only what its database describes: its captions tell a visitor what to ask
    for. Only a few rows are read (evenly spaced), so a database of millions costs no more.

    Args:
        pipe: The RagPipeline the page serves.
        count: The most prompts to return.

    Returns:
        Up to `count` distinct, non-empty captions in database order; none without a database.
    """
    db = pipe.database
    if db is None or not len(db) or count < 1:
        return []
    # More candidate rows than needed: neighbouring rows of a database often share a caption.
    rows = np.unique(np.linspace(0, len(db) - 1, num=min(len(db), 8 * count)).round().astype(int))
    distinct = list(dict.fromkeys(c.strip() for c in db.captions(rows) if c.strip()))
    if len(distinct) <= count:
        return distinct
    # Evenly over the distinct captions, not the first few: a sorted database starts with one kind.
    return [distinct[i] for i in np.linspace(0, len(distinct) - 1, num=count).round().astype(int)]


def generate(pipe, prompt: str, mode: str, k: float, w: float, seed: float):
    """One prompt -> (image uint8 HxWx3, [(neighbour uint8, 'caption · score')], λ, seconds)."""
    if not (prompt or "").strip():
        raise _user_error(EMPTY_PROMPT)
    try:
        out = pipe([prompt], seed=int(seed), k=int(k), mode=mode, w=float(w))
    except UserError as e:  # a bad setting is the user's to fix: show it, keep the page alive
        raise _user_error(str(e)) from e
    image = images.to_uint8(out.images)[0]
    gallery = []
    if out.ids is not None:
        neighbours = images.to_uint8(pipe.neighbour_images(out.ids[:1]))[0]
        gallery = [(img, f"{caption} · {float(score):.3f}")
                   for img, caption, score in zip(neighbours, out.captions[0], out.scores[0])]
    lam = None if out.lam is None else float(np.asarray(out.lam)[0])
    seconds = {name: round(float(s), 4) for name, s in out.seconds.items()}
    return image, gallery, lam, seconds


def _user_error(message: str):
    """A gradio.Error shown on the page (and raised by gradio_client) without a server traceback."""
    gr = _gradio()
    try:
        return gr.Error(message, print_exception=False)
    except TypeError:  # Gradio 5 before print_exception
        return gr.Error(message)


def _gradio6() -> bool:
    """Gradio 6 moved css to launch() and show_api to api_visibility."""
    return int(_gradio().__version__.split(".")[0]) >= 6


def _private() -> dict[str, Any]:
    """Kwargs that keep a UI-only event out of the HTTP API."""
    return {"api_visibility": "private"} if _gradio6() else {"show_api": False}


def _describe(pipe) -> str:
    """One Markdown line naming what the page serves (from RagPipeline.describe())."""
    info = pipe.describe()
    keys = ("source", "database", "index_kind", "hspace_cache", "devices", "dtype")
    return " · ".join(f"**{key}** `{info[key]}`" for key in keys
                      if info.get(key) not in (None, "", "float32"))  # bf16 is worth a mention


def build_demo(pipe):
    """The page for `pipe` (gradio.Blocks): prompt + settings in; image, neighbours, λ, time."""
    gr = _gradio()
    modes = supported_modes(pipe)
    default_mode = pipe.mode if pipe.mode in modes else modes[0]
    top_k = max_k(pipe)
    default_k = min(max(1, int(pipe.k or 1)), top_k)
    retrieval = lambda m: m != "none"

    style = {} if _gradio6() else {"css": CSS}
    with gr.Blocks(title="ImageRAG-Turbo", analytics_enabled=False, **style) as demo:
        gr.Markdown("## ImageRAG-Turbo: one-step generation with retrieved neighbours")
        summary = _describe(pipe)
        if summary:
            gr.Markdown(summary)
        with gr.Row():
            with gr.Column(scale=1):
                examples = example_prompts(pipe)
                prompt = gr.Textbox(label="prompt", lines=2,
                                    placeholder=examples[0] if examples else "a photo of ...")
                if examples:  # what this run can draw: its database's own captions
                    gr.Examples([[e] for e in examples], inputs=[prompt],
                                label="example prompts (captions from the database)")
                mode = gr.Radio(modes, value=default_mode, label="mode",
                                info=MODE_HELP[default_mode])
                k = gr.Slider(1, top_k, value=default_k, step=1, label="k (neighbours)",
                              interactive=retrieval(default_mode) and top_k > 1)
                w = gr.Slider(0.0, 1.0, value=float(pipe.w), step=0.05, label="w (inject weight)",
                              interactive=default_mode == "inject")
                seed = gr.Number(value=0, precision=0, label="seed")
                button = gr.Button("Generate", variant="primary")
            with gr.Column(scale=2):
                with gr.Row():
                    image = gr.Image(label="generated", type="numpy", format="png", height=360,
                                     interactive=False, elem_id="generated")
                    neighbours = gr.Gallery(label="retrieved neighbours (caption · score)",
                                            format="png", columns=2, object_fit="contain",
                                            height="auto", interactive=False)
                with gr.Row():
                    lam = gr.Number(label="λ", precision=4, interactive=False)
                    seconds = gr.JSON(label="latency in seconds (a new mode or k compiles first)")

        def on_mode(m: str):
            """Enable only the sliders the chosen mode reads."""
            return (gr.update(info=MODE_HELP[m]),
                    gr.update(interactive=retrieval(m) and top_k > 1),
                    gr.update(interactive=m == "inject"))

        mode.change(on_mode, mode, [mode, k, w], queue=False, **_private())
        inputs, outputs = [prompt, mode, k, w, seed], [image, neighbours, lam, seconds]

        def run(prompt: str, mode: str, k: float, w: float, seed: float):
            """One image for `prompt`, its neighbours (caption · score), λ and the latency."""
            return generate(pipe, prompt, mode, k, w, seed)

        button.click(run, inputs, outputs, api_name="generate")
        prompt.submit(run, inputs, outputs, **_private())
    return demo


def serve(pipe, *, host: str = "127.0.0.1", port: int | None = 7860, share: bool = False,
          block: bool = True) -> str:
    """Launch the page; block until Ctrl-C, or return its local URL at once when block=False."""
    demo = build_demo(pipe)
    # One generation at a time: the JAX programs and the H-space cache are not shared safely.
    demo.queue(default_concurrency_limit=1)
    try:
        _, url, _ = demo.launch(server_name=host, server_port=port, share=share,
                                prevent_thread_lock=True, inbrowser=False,
                                **({"css": CSS} if _gradio6() else {}))
    except OSError as e:
        raise UserError(f"--port {port}: cannot listen on {host}:{port} (in use?); pass another "
                        "--port") from e
    if block:
        demo.block_thread()
    return url
