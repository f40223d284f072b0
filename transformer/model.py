"""Decoder-only (causal) transformer for character-level language modelling, in Haiku.

Token embedding + learned positional embedding; `num_layers` pre-LayerNorm blocks of causal
multi-head self-attention and a GELU MLP (hidden width 4 * model_size), each with a residual
connection; a final LayerNorm and an untied Linear read-out to the 128 ASCII logits.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterable

import haiku as hk
import jax
import jax.numpy as jnp
import numpy as np

from transformer.dataset import PAD_TOKEN, VOCAB_SIZE

Params = hk.Params
Batch = tuple[jax.Array, jax.Array]
LossFn = Callable[[Params, Batch], jax.Array]


def _layer_norm(name: str) -> hk.LayerNorm:
    return hk.LayerNorm(axis=-1, create_scale=True, create_offset=True, name=name)


def make_network(
    *, num_layers: int, num_heads: int, key_size: int, model_size: int, sequence_length: int
) -> hk.Transformed:
    """The language model as a pure function pair (no RNG in apply).

    `init(rng, inputs)` makes the parameters; `apply(params, inputs)` maps int32 token codes
    [B, T] (T <= sequence_length) to logits float32 [B, T, VOCAB_SIZE]. Position t attends only
    to positions <= t holding non-pad tokens.
    """

    def forward(inputs: jax.Array) -> jax.Array:
        _, length = inputs.shape
        if length > sequence_length:
            raise ValueError(
                f"Input length {length} exceeds the model's sequence_length {sequence_length}."
            )
        embed_init = hk.initializers.TruncatedNormal(stddev=0.02)
        block_init = hk.initializers.VarianceScaling(2 / num_layers)

        token_embeddings = hk.Embed(VOCAB_SIZE, model_size, w_init=embed_init, name="embed")(
            inputs
        )
        with hk.name_scope("positional_embed"):
            positional = hk.get_parameter(
                "embeddings", [sequence_length, model_size], init=embed_init
            )  # [sequence_length, D], params["positional_embed"]["embeddings"]
        h = token_embeddings + positional[:length]  # [B, T, D]

        # [B, 1, T, T]: key s is visible to query t iff s <= t and token s is not padding.
        causal = np.tril(np.ones((length, length), dtype=bool))
        not_pad = inputs != PAD_TOKEN
        mask = jnp.logical_and(not_pad[:, None, None, :], causal[None, None, :, :])

        for i in range(num_layers):
            x = _layer_norm(f"block_{i}_ln_attention")(h)
            x = hk.MultiHeadAttention(
                num_heads=num_heads,
                key_size=key_size,
                model_size=model_size,
                w_init=block_init,
                name=f"block_{i}_attention",
            )(x, x, x, mask=mask)
            h = h + x
            x = _layer_norm(f"block_{i}_ln_mlp")(h)
            x = hk.Linear(4 * model_size, w_init=block_init, name=f"block_{i}_mlp_hidden")(x)
            x = jax.nn.gelu(x)
            x = hk.Linear(model_size, w_init=block_init, name=f"block_{i}_mlp_output")(x)
            h = h + x
        h = _layer_norm("ln_final")(h)
        return hk.Linear(VOCAB_SIZE, name="output")(h)

    return hk.without_apply_rng(hk.transform(forward))


def make_loss_fn(network: hk.Transformed) -> LossFn:
    """`loss(params, (inputs, targets))`: mean negative log-likelihood (nats) over the non-pad
    targets; inputs, targets int32 [B, T]. A batch that is all padding gives 0, not NaN.

    Make it once and reuse it: it is a static argument of jitted code, so a new one recompiles.
    """

    def loss_fn(params: Params, batch: Batch) -> jax.Array:
        inputs, targets = batch
        logits = network.apply(params, inputs)  # [B, T, V]
        log_probs = jax.nn.log_softmax(logits, axis=-1)
        nll = -jnp.take_along_axis(log_probs, targets[..., None], axis=-1)[..., 0]  # [B, T]
        weights = (targets != PAD_TOKEN).astype(nll.dtype)
        return jnp.sum(nll * weights) / jnp.maximum(jnp.sum(weights), 1.0)

    return loss_fn


@functools.lru_cache(maxsize=32)
def _jitted_loss(network_or_loss_fn: hk.Transformed | LossFn) -> LossFn:
    if isinstance(network_or_loss_fn, hk.Transformed):
        network_or_loss_fn = make_loss_fn(network_or_loss_fn)
    return jax.jit(network_or_loss_fn)


def summed_loss(
    network_or_loss_fn: hk.Transformed | LossFn,
    params: Params,
    batches: Iterable[tuple[np.ndarray, np.ndarray]],
) -> tuple[float, int]:
    """(sum of the loss over non-pad target tokens, number of those tokens) over `batches`:
    the parts of `evaluate_loss`, to add up over processes that each evaluate some batches.
    The jitted loss is cached per network / loss function, so evaluations do not recompile."""
    loss_fn = _jitted_loss(network_or_loss_fn)
    total = jnp.zeros((), jnp.float32)
    count = 0
    for inputs, targets in batches:
        tokens = int(np.count_nonzero(np.asarray(targets) != PAD_TOKEN))
        if tokens:
            total = total + loss_fn(params, (inputs, targets)) * tokens
            count += tokens
    return float(total), count


def evaluate_loss(
    network_or_loss_fn: hk.Transformed | LossFn,
    params: Params,
    batches: Iterable[tuple[np.ndarray, np.ndarray]],
) -> float:
    """Mean loss per non-pad target token over all `batches` (e.g. `dataset.test_batches`), so
    each test crop counts once even when the last batch is smaller."""
    total, count = summed_loss(network_or_loss_fn, params, batches)
    if count == 0:
        raise ValueError("evaluate_loss got no non-pad target tokens to evaluate on.")
    return total / count
