"""A GPT-2-shaped decoder in plain JAX for the `scale` benchmark: tied token embeddings, learned
positions, pre-LayerNorm blocks with causal multi-head attention and a 4x GELU MLP, a final
LayerNorm, and next-token cross-entropy. Parameters are a dict pytree; `abstract` gives their
shapes without allocating, for XLA's ahead-of-time memory analysis."""

from __future__ import annotations

import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from sam_eos.types import LossFn, PyTree


class Size(NamedTuple):
    vocab: int
    context: int
    width: int
    layers: int
    heads: int


# GPT-2's shapes (vocabulary 50257, 1024 positions); "tiny" is a character-level toy.
SIZES = {
    "tiny": Size(65, 128, 64, 2, 4),
    "10M": Size(50257, 1024, 128, 6, 4),
    "30M": Size(50257, 1024, 384, 6, 6),
    "124M": Size(50257, 1024, 768, 12, 12),  # GPT-2 small
    "350M": Size(50257, 1024, 1024, 24, 16),  # GPT-2 medium
}
BATCH = (4, 128)  # sequences x tokens


def shapes(size: Size) -> dict:
    """The parameters' shapes, as a pytree of tuples."""
    d = size.width
    block = {"ln1_scale": (d,), "ln1_bias": (d,), "qkv_w": (d, 3 * d), "qkv_b": (3 * d,),
             "proj_w": (d, d), "proj_b": (d,), "ln2_scale": (d,), "ln2_bias": (d,),
             "fc_w": (d, 4 * d), "fc_b": (4 * d,), "out_w": (4 * d, d), "out_b": (d,)}
    return {"tokens": (size.vocab, d), "positions": (size.context, d), "ln_scale": (d,),
            "ln_bias": (d,), "blocks": [dict(block) for _ in range(size.layers)]}


def _is_shape(x) -> bool:
    return isinstance(x, tuple)


def init(size: Size, key: jax.Array) -> PyTree:
    """GPT-2's initialisation: normal(0.02) weights, unit scales, zero biases."""
    tree = shapes(size)
    leaves, treedef = jax.tree.flatten(tree, is_leaf=_is_shape)
    keys = jax.random.split(key, len(leaves))
    values = [0.02 * jax.random.normal(k, s) if len(s) == 2 else jnp.zeros(s)
              for k, s in zip(keys, leaves, strict=True)]
    params = jax.tree.unflatten(treedef, values)
    for block in params["blocks"]:
        block["ln1_scale"] = jnp.ones_like(block["ln1_scale"])
        block["ln2_scale"] = jnp.ones_like(block["ln2_scale"])
    params["ln_scale"] = jnp.ones_like(params["ln_scale"])
    return params


def abstract(size: Size, batch: tuple[int, int] = BATCH) -> tuple[PyTree, PyTree]:
    """`(params, batch)` as `jax.ShapeDtypeStruct`s (float32 params, int32 tokens)."""
    params = jax.tree.map(lambda s: jax.ShapeDtypeStruct(s, jnp.float32), shapes(size),
                          is_leaf=_is_shape)
    tokens = jax.ShapeDtypeStruct(batch, jnp.int32)
    return params, (tokens, tokens)


def num_params(size: Size) -> int:
    return sum(int(np.prod(s)) for s in jax.tree.leaves(shapes(size), is_leaf=_is_shape))


def _layer_norm(x, scale, bias):
    mean = x.mean(-1, keepdims=True)
    variance = ((x - mean) ** 2).mean(-1, keepdims=True)
    return (x - mean) * jax.lax.rsqrt(variance + 1e-5) * scale + bias


def make_loss(size: Size) -> LossFn:
    """`loss(params, (tokens, targets)) -> mean next-token cross-entropy` (nats)."""
    heads = size.heads

    def loss_fn(params, batch):
        tokens, targets = batch
        b, t = tokens.shape
        x = params["tokens"][tokens] + params["positions"][:t]
        d = x.shape[-1]
        causal = jnp.tril(jnp.ones((t, t), bool))
        for block in params["blocks"]:
            h = _layer_norm(x, block["ln1_scale"], block["ln1_bias"])
            q, k, v = jnp.split(h @ block["qkv_w"] + block["qkv_b"], 3, axis=-1)
            q, k, v = (u.reshape(b, t, heads, d // heads) for u in (q, k, v))
            scores = jnp.einsum("bthd,bshd->bhts", q, k) / math.sqrt(d // heads)
            weights = jax.nn.softmax(jnp.where(causal, scores, -1e9), axis=-1)
            attended = jnp.einsum("bhts,bshd->bthd", weights, v).reshape(b, t, d)
            x = x + attended @ block["proj_w"] + block["proj_b"]
            h = _layer_norm(x, block["ln2_scale"], block["ln2_bias"])
            x = x + jax.nn.gelu(h @ block["fc_w"] + block["fc_b"]) @ block["out_w"] + \
                block["out_b"]
        logits = _layer_norm(x, params["ln_scale"], params["ln_bias"]) @ params["tokens"].T
        log_probabilities = jax.nn.log_softmax(logits)
        return -jnp.mean(jnp.take_along_axis(log_probabilities, targets[..., None], -1))

    return loss_fn
