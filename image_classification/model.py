"""The paper's image classifiers (an MLP and a CNN, in Haiku), their squared loss and test error.

Images are float32 `[B, H, W, C]`, logits float32 `[B, num_classes]`. The loss is the squared
error between the logits and one-hot labels, averaged over the batch and the classes.
"""

import functools
from collections.abc import Callable

import haiku as hk
import jax
import jax.numpy as jnp
import numpy as np
import optax

from sam_eos.errors import InputError
from sam_eos.types import PyTree

ARCHITECTURES = ("MLP", "CNN")


def _glorot_normal() -> hk.initializers.Initializer:
    """Glorot (Xavier) normal: truncated normal with variance 2 / (fan_in + fan_out)."""
    return hk.initializers.VarianceScaling(1.0, "fan_avg", "truncated_normal")


def _mlp(images: jax.Array, num_classes: int, depth: int, width: int) -> jax.Array:
    """`depth` dense layers: `depth - 1` ReLU layers of `width` units, then a linear output."""
    x = hk.Flatten()(images)
    for layer in range(depth - 1):
        x = jax.nn.relu(hk.Linear(width, w_init=_glorot_normal(), name=f"hidden_{layer}")(x))
    return hk.Linear(num_classes, w_init=_glorot_normal(), name="output")(x)


def _cnn(
    images: jax.Array, num_classes: int, num_blocks: int, layers_per_block: int, multiplier: int
) -> jax.Array:
    """Blocks of [3x3 conv, ReLU, LayerNorm] layers then 2x2 max pooling; a linear output.

    Block `i` has `2**i * multiplier` channels, so the spatial size halves as channels double.
    """
    x = images
    for block in range(num_blocks):
        for layer in range(layers_per_block):
            name = f"{block}_{layer}"
            x = hk.Conv2D(
                2**block * multiplier,
                kernel_shape=3,
                padding="SAME",
                w_init=_glorot_normal(),
                name=f"conv_{name}",
            )(x)
            x = jax.nn.relu(x)
            x = hk.LayerNorm(
                axis=-1, create_scale=True, create_offset=True, name=f"layer_norm_{name}"
            )(x)
        x = hk.max_pool(x, window_shape=(1, 2, 2, 1), strides=(1, 2, 2, 1), padding="SAME")
    x = hk.Flatten()(x)
    return hk.Linear(num_classes, w_init=_glorot_normal(), name="output")(x)


def _require_positive(**sizes: int) -> None:
    for name, value in sizes.items():
        if value < 1:
            raise InputError(f"{name} must be at least 1, got {value}.")


def make_network(
    architecture: str,
    num_classes: int,
    *,
    mlp_depth: int,
    mlp_width: int,
    cnn_num_blocks: int,
    cnn_layers_per_block: int,
    cnn_feature_multiplier: int,
) -> hk.Transformed:
    """The classifier as a pure `(init(rng, images), apply(params, images))` pair.

    `architecture` is "MLP" or "CNN" (any case); only that architecture's sizes are used and
    checked. `apply(params, images [B, H, W, C] float32) -> logits [B, num_classes]`.
    """
    kind = architecture.upper()
    if kind == "MLP":
        if mlp_depth < 2:
            raise InputError(f"mlp_depth must be at least 2 (hidden and output), got {mlp_depth}.")
        _require_positive(mlp_width=mlp_width)
        forward = functools.partial(_mlp, num_classes=num_classes, depth=mlp_depth, width=mlp_width)
    elif kind == "CNN":
        _require_positive(
            cnn_num_blocks=cnn_num_blocks,
            cnn_layers_per_block=cnn_layers_per_block,
            cnn_feature_multiplier=cnn_feature_multiplier,
        )
        forward = functools.partial(
            _cnn,
            num_classes=num_classes,
            num_blocks=cnn_num_blocks,
            layers_per_block=cnn_layers_per_block,
            multiplier=cnn_feature_multiplier,
        )
    else:
        raise InputError(
            f"Unknown architecture {architecture!r}; choose one of {', '.join(ARCHITECTURES)}."
        )
    return hk.without_apply_rng(hk.transform(forward))


def make_loss_fn(network: hk.Transformed) -> Callable[[PyTree, tuple], jax.Array]:
    """`loss_fn(params, (images [B, H, W, C], one_hot [B, K])) -> scalar` mean squared error.

    The mean is over the batch and the classes. Make it once: it is a static argument of jitted
    training steps, so a fresh closure would compile them again.
    """

    def loss_fn(params: PyTree, batch: tuple[jax.Array, jax.Array]) -> jax.Array:
        images, one_hot_labels = batch
        return optax.squared_error(network.apply(params, images), one_hot_labels).mean()

    return loss_fn


@functools.partial(jax.jit, static_argnums=0)
def _num_errors(apply_fn: Callable, params: PyTree, images: jax.Array, labels: jax.Array):
    """Number of examples in the chunk whose argmax logit is not the label."""
    predictions = jnp.argmax(apply_fn(params, images), axis=-1)
    return jnp.sum(predictions != labels)


def count_test_errors(
    network: hk.Transformed,
    params: PyTree,
    images: np.ndarray,
    labels: np.ndarray,
    batch_size: int,
) -> int:
    """How many of `images [M, H, W, C]` have an argmax logit other than `labels [M]` (ints).

    Evaluated in chunks of `batch_size` examples (the last may be smaller) to bound memory.
    """
    counts = [
        _num_errors(network.apply, params, images[i : i + batch_size], labels[i : i + batch_size])
        for i in range(0, len(labels), batch_size)
    ]
    return sum(int(count) for count in counts)


def test_error(
    network: hk.Transformed,
    params: PyTree,
    images: np.ndarray,
    labels: np.ndarray,
    batch_size: int,
) -> float:
    """Fraction of `images [M, H, W, C]` whose argmax logit differs from `labels [M]` (ints),
    evaluated in chunks of `batch_size` examples."""
    if len(labels) == 0:
        raise ValueError("test_error needs at least one test example.")
    return count_test_errors(network, params, images, labels, batch_size) / len(labels)


# Not a pytest test, despite the name.
test_error.__test__ = False
