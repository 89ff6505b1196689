"""Functional LoRA on Flax parameter trees: choose kernels by a path regex, init (A, B), merge.

LoRA params mirror the selected kernels' paths, each kernel becoming ``{'a': A, 'b': B}``:
Dense kernel (in, out): A (in, r), B (r, out); conv kernel (kh, kw, in, out): A (kh, kw, in, r),
B (r, out). The kernel delta is A·B contracted over r (``einsum('hwir,ro->hwio')`` for convs, i.e.
a kh x kw conv to r channels followed by a 1x1 conv), and ``merge`` returns
W + (alpha / rank)·A·B. B starts at zero, so merged params equal the base params bit for bit.
Merging is a pure jnp function of the trees: use it inside a jitted, differentiated train step
(gradients reach A and B) and for export.
"""

from __future__ import annotations

import functools
import re
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util
from flax.core import FrozenDict, freeze

Params = Mapping[str, Any]

# The UNet decoder (up blocks) kernels the paper fine-tunes with LoRA (Sec. 3.4): in every
# up_blocks_i, the transformer blocks' attention projections (attn1/attn2 to_q, to_k, to_v,
# to_out_0), their GEGLU feed-forward (ff/net_0/proj, ff/net_2) and the resnets' 3x3 convs
# (conv1, conv2). Excluded: mid and down blocks (the encoder and H-space stay frozen so the
# retrieved branch and the adapter see the same features), norms, biases, proj_in/proj_out,
# time_emb_proj, conv_shortcut and upsamplers. Matched with re.search on '/'-joined paths such
# as 'up_blocks_1/attentions_0/transformer_blocks_0/attn1/to_q/kernel'.
DEFAULT_DECODER_PATTERN = (
    r"^up_blocks_\d+/(?:"
    r"attentions_\d+/transformer_blocks_\d+/(?:attn[12]/to_(?:q|k|v|out_0)|ff/net_0/proj|ff/net_2)"
    r"|resnets_\d+/conv[12]"
    r")/kernel$"
)


def flatten(tree: Params) -> dict[str, Any]:
    """Nested dict -> {'a/b/c': leaf}."""
    return traverse_util.flatten_dict(tree, sep="/")


def unflatten(flat: Mapping[str, Any]) -> dict[str, Any]:
    """{'a/b/c': leaf} -> nested dict."""
    return traverse_util.unflatten_dict(dict(flat), sep="/")


def select_paths(base_params: Params, pattern: str) -> list[str]:
    """Sorted '/'-joined paths of the 2-D (Dense) and 4-D (conv) kernels matching ``pattern``."""
    regex = re.compile(pattern)
    flat = flatten(base_params)
    paths = sorted(
        p for p, leaf in flat.items()
        if p.endswith("kernel") and np.ndim(leaf) in (2, 4) and regex.search(p)
    )
    if not paths:
        kernels = sorted(p for p in flat if p.endswith("kernel"))
        shown = ", ".join(kernels[:8]) + (", ..." if len(kernels) > 8 else "")
        raise ValueError(
            f"LoRA pattern {pattern!r} matches no 2-D/4-D kernel; {len(kernels)} kernels exist, "
            f"e.g. {shown}"
        )
    return paths


def init_lora(
    rng: jax.Array, base_params: Params, pattern: str, rank: int, dtype: Any = jnp.float32
) -> dict[str, Any]:
    """{path...: {'a', 'b'}} for the kernels matching ``pattern``: A kaiming-uniform, B zeros.

    A ~ U(-1/sqrt(fan_in), 1/sqrt(fan_in)), fan_in = in (Dense) or kh*kw*in (conv): PEFT's default
    (kaiming_uniform with a=sqrt(5)), so learning rates transfer from PyTorch LoRA recipes.
    LoRA params are kept in ``dtype`` (fp32) even for bf16 base weights.
    """
    if rank < 1:
        raise ValueError(f"LoRA rank must be >= 1, got {rank}")
    flat = flatten(base_params)
    paths = select_paths(base_params, pattern)
    shapes = tuple(tuple(int(d) for d in np.shape(flat[p])) for p in paths)
    a_mats = _draw_a(rng, shapes, rank, jnp.dtype(dtype))
    out = {
        path: {"a": a, "b": jnp.zeros((rank, shape[-1]), dtype)}
        for path, shape, a in zip(paths, shapes, a_mats)
    }
    return unflatten(out)


@functools.partial(jax.jit, static_argnums=(1, 2, 3))
def _draw_a(rng: jax.Array, shapes: tuple, rank: int, dtype: Any) -> list[jax.Array]:
    """Every A, U(+-1/sqrt(fan_in)), from ONE uniform draw: one small program, traceable (eval_shape/jit)."""
    sizes = [int(np.prod(s[:-1])) * rank for s in shapes]
    u = jax.random.uniform(rng, (sum(sizes),), jnp.float32, minval=-1.0, maxval=1.0)
    out, offset = [], 0
    for shape, size in zip(shapes, sizes):
        bound = 1.0 / np.sqrt(np.prod(shape[:-1]))
        out.append((u[offset:offset + size] * bound).reshape(shape[:-1] + (rank,)).astype(dtype))
        offset += size
    return out


def lora_delta(a: jax.Array, b: jax.Array) -> jax.Array:
    """A·B over the rank axis: (in,r)x(r,out) -> (in,out); (kh,kw,in,r)x(r,out) -> (kh,kw,in,out)."""
    return jnp.tensordot(a, b, axes=1)


def lora_pairs(lora_params: Params) -> dict[str, tuple[jax.Array, jax.Array]]:
    """{kernel path: (A, B)} from a LoRA tree."""
    flat = flatten(lora_params)
    pairs = {}
    for path in flat:
        if path.endswith("/a"):
            kernel = path[: -len("/a")]
            if kernel + "/b" not in flat:
                raise ValueError(f"LoRA entry {kernel!r} has 'a' but no 'b'")
            pairs[kernel] = (flat[path], flat[kernel + "/b"])
    for path in flat:
        if not (path.endswith("/a") or path.endswith("/b")) or path[:-2] not in pairs:
            raise ValueError(f"unexpected LoRA leaf {path!r} (expected <kernel path>/a and /b)")
    return pairs


def merge(base_params: Params, lora_params: Params, alpha: float, rank: int) -> Params:
    """W + (alpha / rank)·A·B for every LoRA kernel; other leaves untouched; base tree and dtypes kept."""
    flat = flatten(base_params)
    scale = float(alpha) / float(rank)
    for path, (a, b) in lora_pairs(lora_params).items():
        if path not in flat:
            raise KeyError(f"LoRA kernel {path!r} is not in the base params")
        w = flat[path]
        if a.shape[-1] != rank or b.shape[0] != rank:
            raise ValueError(f"LoRA {path!r} has rank {a.shape[-1]}, merge was given rank={rank}")
        if a.shape[:-1] + b.shape[1:] != tuple(w.shape):
            raise ValueError(f"LoRA {path!r}: A{a.shape}·B{b.shape} does not fit the kernel {w.shape}")
        # Accumulate in fp32: a bf16 base kernel would otherwise round the small update away twice.
        delta = lora_delta(a.astype(jnp.float32), b.astype(jnp.float32))
        flat[path] = (w.astype(jnp.float32) + scale * delta).astype(w.dtype)
    merged = unflatten(flat)
    return freeze(merged) if isinstance(base_params, FrozenDict) else merged


def count_params(lora_params: Params) -> int:
    """Number of trainable LoRA scalars."""
    return int(sum(np.prod(np.shape(x)) for x in jax.tree_util.tree_leaves(lora_params)))
