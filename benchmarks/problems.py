"""The models and batches the benchmarks use.

Real data comes from `<data_dir>/tfds` (the TFDS MNIST stand-in) and
`<data_dir>/tinyshakespeare/train.txt`; when either is missing, generated data of the same
shapes stands in, so the benchmarks run anywhere (the `source` strings say which was used).
"""

from __future__ import annotations

import pathlib

import haiku as hk
import jax
import jax.numpy as jnp
import numpy as np

from image_classification import model as image_model
from sam_eos.types import LossFn, PyTree
from transformer import dataset as text_dataset
from transformer import model as text_model

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]
DEFAULT_DATA_DIR = REPO_ROOT.parent / "shared" / "data"
MNIST_SHAPE = (28, 28, 1)
NUM_CLASSES = 10
# The transformer program's defaults.
TRANSFORMER_SIZES = dict(num_layers=6, num_heads=8, key_size=32, model_size=128)
SEQUENCE_LENGTH = 64


# ---------------------------------------------------------------------------------------------
# Image classification


def make_mlp(width: int, depth: int) -> tuple[hk.Transformed, LossFn]:
    """The image-classification MLP (`depth` dense layers of `width` units) and its loss."""
    network = image_model.make_network(
        "MLP", NUM_CLASSES, mlp_depth=depth, mlp_width=width, cnn_num_blocks=1,
        cnn_layers_per_block=1, cnn_feature_multiplier=1,
    )
    return network, image_model.make_loss_fn(network)


def synthetic_mnist(num_images: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Centred uniform-noise images and one-hot labels from a fixed random linear teacher."""
    rng = np.random.default_rng(seed)
    images = rng.random((num_images, *MNIST_SHAPE), dtype=np.float32)
    images -= images.mean(axis=0)
    teacher = rng.normal(size=(int(np.prod(MNIST_SHAPE)), NUM_CLASSES)).astype(np.float32)
    labels = np.argmax(images.reshape(num_images, -1) @ teacher, axis=1)
    return images, np.eye(NUM_CLASSES, dtype=np.float32)[labels]


def mnist_batch(data_dir: pathlib.Path, num_images: int) -> tuple[tuple[np.ndarray, ...], str]:
    """`((images [N, 28, 28, 1], one_hot [N, 10]), source)`: the first `num_images` training
    images of the TFDS MNIST stand-in, or generated ones if it cannot be read."""
    tfds_dir = data_dir / "tfds"
    if (tfds_dir / "mnist").is_dir():
        from image_classification import dataset as image_dataset

        try:
            data = image_dataset.load(
                "mnist", data_dir=str(tfds_dir.resolve()), batch_size=num_images,
                mini_training_set_num_batches=1,
            )
            if len(data.train_images) == num_images:
                return (data.train_images, data.train_labels), "MNIST"
        except Exception as error:  # noqa: BLE001 - fall back to generated data
            print(f"# could not load MNIST ({type(error).__name__}: {error}); generating data")
    return synthetic_mnist(num_images), "generated images (no MNIST data)"


# ---------------------------------------------------------------------------------------------
# Transformer


def make_transformer() -> tuple[hk.Transformed, LossFn]:
    """The transformer program's default language model and its loss."""
    network = text_model.make_network(**TRANSFORMER_SIZES, sequence_length=SEQUENCE_LENGTH)
    return network, text_model.make_loss_fn(network)


def text_batch(
    data_dir: pathlib.Path, batch_size: int
) -> tuple[tuple[np.ndarray, np.ndarray], str]:
    """`((inputs, targets) int32 [batch_size, 64], source)`: the first training batch of
    tiny Shakespeare, or random printable ASCII if the corpus is missing."""
    path = data_dir / "tinyshakespeare" / "train.txt"
    if path.is_file():
        text = text_dataset.read_ascii_text(str(path))
        source = "tiny Shakespeare"
    else:
        rng = np.random.default_rng(0)
        codes = rng.integers(32, 127, size=batch_size * (SEQUENCE_LENGTH + 1) * 10)
        text = bytes(codes.astype(np.uint8)).decode("ascii")
        source = "random ASCII (no tiny Shakespeare)"
    batches = text_dataset.TrainBatches(
        text, batch_size=batch_size, sequence_length=SEQUENCE_LENGTH, seed=0
    )
    return next(batches), source


# ---------------------------------------------------------------------------------------------
# Tiny model


def make_tiny_problem(
    num_examples: int = 64, num_inputs: int = 16, hidden: int = 16, num_outputs: int = 4
) -> tuple[LossFn, PyTree, tuple[np.ndarray, np.ndarray]]:
    """A 2-layer tanh network with a few hundred parameters, squared loss, random data:
    `(loss_fn, params, batch)` with numpy params and batch."""
    rng = np.random.default_rng(0)
    params = {
        "w1": (rng.normal(size=(num_inputs, hidden)) / np.sqrt(num_inputs)).astype(np.float32),
        "b1": np.zeros((hidden,), np.float32),
        "w2": (rng.normal(size=(hidden, num_outputs)) / np.sqrt(hidden)).astype(np.float32),
        "b2": np.zeros((num_outputs,), np.float32),
    }
    x = rng.normal(size=(num_examples, num_inputs)).astype(np.float32)
    y = rng.normal(size=(num_examples, num_outputs)).astype(np.float32)

    def loss_fn(params: PyTree, batch: tuple[jax.Array, jax.Array]) -> jax.Array:
        inputs, targets = batch
        hidden_units = jnp.tanh(inputs @ params["w1"] + params["b1"])
        return jnp.mean((hidden_units @ params["w2"] + params["b2"] - targets) ** 2)

    return loss_fn, params, (x, y)


def num_params(params: PyTree) -> int:
    return sum(int(np.size(leaf)) for leaf in jax.tree.leaves(params))
