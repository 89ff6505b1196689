"""The training record options at SD 2.1 shapes: bytes per example, train FLOPs, the paper's disk.

Printed by ``python -m imagerag_jax.benchmark precompute`` (``--records-only`` prints this alone).
Bytes are measured: a random example of each option's `tfrecords.Schema` serialised as the
precompute job writes it (the `tf.train.Example` framing included; a 60-character caption),
with the teacher's noise (synthetic pairs) and without (real pairs). FLOPs per example are
`models.flops.train_step_flops` at SD 2.1 shapes with the SD config's adapter, heads and latent
LPIPS (model FLOPs, no remat). The paper's job: 3M synthetic + 0.5M real training examples, and a
0.63M-entry database that options reading by id keep on every training host (its arrays, and
its float16 H-space cache where the option uses it).

Options (docs/design.md, "Record options"):

* ``inline``: every neighbour's latent, prompt embeddings and pooled embedding in the record; the
  step runs the frozen student encoder on the k neighbours (the format before the options).
* ``inline_hspace``: every neighbour's H-space in the record instead (the schema reads and
  trains on it; precompute does not write it: it is the largest option).
* ``ids``: the neighbours' ids and scores only; each host gathers their arrays from its
  database copy (`data.neighbour_feed`); the step still encodes them.
* ``ids_hspace``: ids only; each host gathers their H-space from the database's H-space cache:
  no encoder on neighbours in the step (the SD config's default).
* ``tokens`` (considered, not built): ``ids_hspace`` with the target's prompt as 77 token ids
  instead of its 77x1024 embeddings, the frozen text encoder run in the step.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np

# The paper's data (Sec. 4.1) and database (benchmark/precompute.py's job).
SYNTHETIC_EXAMPLES, REAL_EXAMPLES, DB_ENTRIES = 3_000_000, 500_000, 630_000
LATENT, EMBED, POOLED, K = (64, 64, 4), (77, 1024), 1024, 4
CAPTION = "a photograph of a red fox sitting in tall grass at golden hour"[:60]
MB = 1e6


@dataclasses.dataclass(frozen=True)
class Option:
    """One record option: how neighbours are stored and where the step gets their H-space."""

    name: str
    description: str
    neighbours: str  # tfrecords.Schema.neighbours
    hspace_inline: bool  # the record carries the neighbours' H-space
    step_encodes_neighbours: bool
    host_database: bool  # every training host keeps the database
    host_cache: bool  # ... and its H-space cache
    built: bool = True


OPTIONS = (
    Option("inline", "neighbours' latents + prompt embeds in the record", "inline", False, True,
           False, False),
    Option("inline_hspace", "neighbours' H-space in the record", "inline", True, False, False, False),
    Option("ids", "neighbour ids; arrays from the host's database", "ids", False, True, True, False),
    Option("ids_hspace", "neighbour ids; H-space from the host's cache", "ids", False, False, True,
           True),
    Option("tokens", "ids_hspace + the prompt as token ids (text encoder in the step)", "ids", False,
           False, True, True, built=False),
)


def hspace_shape() -> tuple[int, int, int]:
    """The SD 2.1 UNet's mid-block output at 64x64 latents: (8, 8, 1280)."""
    from imagerag_jax.models import flops as flops_lib
    from imagerag_jax.models.unet import UNet

    hw = flops_lib.unet_hspace_hw(UNet(), LATENT[:2])
    return (*hw, UNet().block_out_channels[-1])


def record_bytes(option: Option, has_noise: bool) -> int:
    """Serialised bytes of one SD 2.1-shaped example of `option` (k = 4)."""
    from imagerag_jax.data import tfrecords

    schema = tfrecords.Schema(LATENT, EMBED, POOLED, K, has_noise, option.neighbours,
                              hspace_shape() if option.hspace_inline else None)
    ex = tfrecords.random_example(schema, np.random.default_rng(0), example_id=123_456_789)
    ex["prompt"] = CAPTION
    n = len(tfrecords.serialize_example(ex, schema))
    if option.name == "tokens":  # the embeddings' bytes out, 77 int32 token ids in
        n += 77 * 4 - int(np.prod(EMBED)) * 2
    return n


def step_flops(retrieved_branch: bool, text_encoder: bool) -> float:
    """Model FLOPs of the SD config's train step per example (batch 1, no remat)."""
    from imagerag_jax.models import adapter as adapter_lib
    from imagerag_jax.models import discriminator as disc_lib
    from imagerag_jax.models import flops as flops_lib
    from imagerag_jax.models.clip_text import CLIPTextTransformer
    from imagerag_jax.models.latent_lpips import LatentLPIPS
    from imagerag_jax.models.unet import UNet
    from imagerag_jax.benchmark.train import load_config

    config = load_config("sd21")
    unet = UNet()
    total = flops_lib.train_step_flops(
        unet, unet, adapter_lib.from_config(config.adapter), disc_lib.DiscriminatorHeads(**dict(config.disc)),
        latent_shape=LATENT, context_len=EMBED[0], pooled_dim=POOLED, k=K, batch=1,
        lora_rank=int(config.lora.rank), lpips=LatentLPIPS(), retrieved_branch=retrieved_branch).total
    if text_encoder:
        total += flops_lib.clip_text(CLIPTextTransformer(), 1, EMBED[0]).forward
    return float(total)


def table() -> list[dict[str, Any]]:
    """One row per option: bytes, FLOPs and the paper's disk (see the module docstring)."""
    from imagerag_jax.retrieval import hspace_cache
    from imagerag_jax.retrieval import database as db_lib

    spec = db_lib.DatabaseSpec(LATENT, EMBED, POOLED)
    db_row = sum(int(np.prod(shape, dtype=np.int64)) * np.dtype(db_lib.ARRAYS[name][1]).itemsize
                 for name, shape in spec.shapes().items()) + len(CAPTION) + 8  # caption + offset
    cache_row = hspace_cache.bytes_per_entry(hspace_shape())
    flops = {(r, t): step_flops(r, t) for r in (True, False) for t in (False, True)}
    base = flops[(True, False)]
    rows = []
    for o in OPTIONS:
        synthetic, real = record_bytes(o, True), record_bytes(o, False)
        records = SYNTHETIC_EXAMPLES * synthetic + REAL_EXAMPLES * real
        host = DB_ENTRIES * ((db_row if o.host_database else 0) + (cache_row if o.host_cache else 0))
        f = flops[(o.step_encodes_neighbours, o.name == "tokens")]
        rows.append({"option": o.name, "description": o.description, "built": o.built,
                     "bytes_synthetic": synthetic, "bytes_real": real,
                     "train_flops_per_example": f, "flops_vs_inline": f / base,
                     "records_tb": records / 1e12, "per_host_gb": host / 1e9})
    return rows


def text(rows: list[dict[str, Any]]) -> str:
    """The table as printed."""
    head = (f"TRAINING RECORD OPTIONS at SD 2.1 shapes (latent {LATENT}, embeds {EMBED}, k = {K}); "
            f"the paper's job: {SYNTHETIC_EXAMPLES / 1e6:g}M synthetic (with noise) + "
            f"{REAL_EXAMPLES / 1e6:g}M real records, a {DB_ENTRIES / 1e6:g}M-entry database")
    lines = [head, f"{'option':<14} {'MB/example':>17} {'train GFLOP/ex':>15} {'vs inline':>9} "
                   f"{'records TB':>10} {'per host GB':>11}  what",
             f"{'':<14} {'synthetic / real':>17}"]
    for r in rows:
        lines.append(f"{r['option']:<14} {r['bytes_synthetic'] / MB:>8.3f} / {r['bytes_real'] / MB:<6.3f} "
                     f"{r['train_flops_per_example'] / 1e9:>15,.0f} {r['flops_vs_inline']:>9.3f} "
                     f"{r['records_tb']:>10.2f} {r['per_host_gb']:>11.1f}  {r['description']}"
                     + ("" if r["built"] else " [considered, not built]"))
    return "\n".join(lines)
