"""The image classifiers: architecture, initialisation, squared loss and chunked test error."""

import haiku as hk
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from image_classification import model
from sam_eos.errors import InputError

SIZES = dict(
    mlp_depth=4, mlp_width=1000, cnn_num_blocks=2, cnn_layers_per_block=2, cnn_feature_multiplier=16
)
# Haiku's truncated normal samples in [-2, 2] standard deviations and rescales them by the
# standard deviation of that truncated distribution, so the weights' standard deviation is the
# Glorot one and their magnitude is at most 2 / 0.8796 of it.
TRUNCATION_STDDEV = 0.87962566103423978


def _network(architecture: str, num_classes: int = 10, **overrides) -> hk.Transformed:
    return model.make_network(architecture, num_classes, **{**SIZES, **overrides})


def _init(network: hk.Transformed, shape: tuple[int, ...], seed: int = 0):
    """Parameters, initialised in one compiled call (much faster than eagerly, op by op)."""
    return jax.jit(network.init)(jax.random.PRNGKey(seed), jnp.zeros(shape, jnp.float32))


def _shapes(network: hk.Transformed, shape: tuple[int, ...]):
    """The parameters' shapes, `{module: {name: shape}}`, traced without computing anything."""
    images = jax.ShapeDtypeStruct(shape, jnp.float32)
    params = jax.eval_shape(network.init, jax.random.PRNGKey(0), images)
    return jax.tree_util.tree_map(lambda p: p.shape, params)


def _is_shape(node) -> bool:
    return isinstance(node, tuple)


def test_unknown_architecture_is_an_input_error_listing_the_choices():
    with pytest.raises(InputError, match="MLP, CNN") as error:
        _network("resnet")
    assert "'resnet'" in str(error.value)


def test_architecture_name_is_case_insensitive():
    mlp = _shapes(_network("mlp", mlp_width=8), (1, 4, 4, 1))
    cnn = _shapes(_network("Cnn", cnn_feature_multiplier=2), (1, 4, 4, 1))
    assert "output" in mlp and "hidden_0" in mlp
    assert "conv_0_0" in cnn and "layer_norm_1_1" in cnn


@pytest.mark.parametrize("overrides", [dict(mlp_depth=1), dict(mlp_width=0)])
def test_bad_mlp_sizes_are_input_errors(overrides):
    with pytest.raises(InputError):
        _network("MLP", **overrides)


def test_bad_cnn_sizes_are_input_errors():
    with pytest.raises(InputError, match="cnn_num_blocks"):
        _network("CNN", cnn_num_blocks=0)


def test_mlp_parameter_count_and_shapes():
    shapes = _shapes(_network("MLP"), (1, 28, 28, 1))
    count = sum(np.prod(shape) for shape in jax.tree_util.tree_leaves(shapes, is_leaf=_is_shape))
    assert count == 784 * 1000 + 1000 + 2 * (1000 * 1000 + 1000) + 1000 * 10 + 10
    assert {name: p["w"] for name, p in shapes.items()} == {
        "hidden_0": (784, 1000),
        "hidden_1": (1000, 1000),
        "hidden_2": (1000, 1000),
        "output": (1000, 10),
    }


@pytest.mark.parametrize("depth", [2, 3, 6])
def test_mlp_layer_count_follows_depth(depth):
    shapes = _shapes(_network("MLP", mlp_depth=depth, mlp_width=5), (2, 3, 3, 2))
    assert sorted(shapes) == sorted([f"hidden_{i}" for i in range(depth - 1)] + ["output"])
    assert shapes["hidden_0"] == {"w": (18, 5), "b": (5,)}
    assert shapes["output"] == {"w": (5, 10), "b": (10,)}


def test_mlp_initialisation_is_glorot_normal_with_zero_biases():
    params = _init(_network("MLP"), (1, 28, 28, 1), seed=3)
    for name, (fan_in, fan_out) in {
        "hidden_0": (784, 1000),
        "hidden_1": (1000, 1000),
        "output": (1000, 10),
    }.items():
        w = np.asarray(params[name]["w"], np.float64)
        glorot_std = np.sqrt(2 / (fan_in + fan_out))
        assert np.all(np.asarray(params[name]["b"]) == 0)
        assert abs(w.mean()) < 0.05 * glorot_std
        assert w.std() == pytest.approx(glorot_std, rel=0.04)
        assert np.abs(w).max() <= 2 * glorot_std / TRUNCATION_STDDEV * (1 + 1e-5)
        assert np.abs(w).max() > 1.9 * glorot_std / TRUNCATION_STDDEV  # truncated, not normal


def test_cnn_shapes_channels_and_layer_norms():
    network = _network("CNN")
    images = jax.random.normal(jax.random.PRNGKey(1), (2, 32, 32, 3))

    @jax.jit
    def init_and_apply(key, images):
        params = network.init(key, images)
        return params, network.apply(params, images)

    params, logits = init_and_apply(jax.random.PRNGKey(0), images)
    assert logits.shape == (2, 10) and np.isfinite(logits).all()
    expected_in_out = {"0_0": (3, 16), "0_1": (16, 16), "1_0": (16, 32), "1_1": (32, 32)}
    for layer, (channels_in, channels_out) in expected_in_out.items():
        assert params[f"conv_{layer}"]["w"].shape == (3, 3, channels_in, channels_out)
        assert np.all(np.asarray(params[f"conv_{layer}"]["b"]) == 0)
        norm = params[f"layer_norm_{layer}"]
        assert np.all(np.asarray(norm["scale"]) == 1) and norm["scale"].shape == (channels_out,)
        assert np.all(np.asarray(norm["offset"]) == 0) and norm["offset"].shape == (channels_out,)
    # Two 2x2 poolings take 32x32 to 8x8; nothing else has parameters.
    assert params["output"]["w"].shape == (8 * 8 * 32, 10)
    assert len(params) == 2 * len(expected_in_out) + 1


def test_cnn_pooling_pads_odd_sizes():
    shapes = _shapes(_network("CNN", cnn_num_blocks=3, cnn_layers_per_block=1), (1, 28, 28, 1))
    # SAME pooling: 28 -> 14 -> 7 -> 4, with 16 * 2**2 = 64 channels at the end.
    assert shapes["output"]["w"] == (4 * 4 * 64, 10)
    assert shapes["conv_2_0"]["w"] == (3, 3, 32, 64)


def _numpy_mlp(params, images: np.ndarray, depth: int) -> np.ndarray:
    x = images.reshape(len(images), -1)
    for i in range(depth - 1):
        x = np.maximum(x @ params[f"hidden_{i}"]["w"] + params[f"hidden_{i}"]["b"], 0)
    return x @ params["output"]["w"] + params["output"]["b"]


def test_loss_is_mean_squared_error_against_one_hot_labels():
    network = _network("MLP", num_classes=4, mlp_depth=3, mlp_width=7)
    rng = np.random.default_rng(0)
    images = rng.normal(size=(6, 5, 5, 2)).astype(np.float32)
    one_hot = np.eye(4, dtype=np.float32)[rng.integers(0, 4, size=6)]
    params = _init(network, images.shape)
    # Non-zero biases, so the numpy forward pass checks they are used.
    params = jax.tree_util.tree_map(lambda p: p + 0.1, params)
    params_np = jax.tree_util.tree_map(lambda p: np.asarray(p, np.float64), params)
    logits = _numpy_mlp(params_np, images.astype(np.float64), depth=3)
    expected = np.sum((logits - one_hot) ** 2) / (6 * 4)

    loss_fn = model.make_loss_fn(network)
    loss, gradient = jax.jit(jax.value_and_grad(loss_fn))(params, (images, one_hot))
    assert float(loss) == pytest.approx(expected, rel=1e-5)
    assert all(np.isfinite(g).all() for g in jax.tree_util.tree_leaves(gradient))


def test_test_error_counts_argmax_mistakes_in_chunks():
    network = _network("MLP", num_classes=5, mlp_depth=2, mlp_width=6)
    rng = np.random.default_rng(1)
    images = rng.normal(size=(23, 4, 4, 1)).astype(np.float32)
    params = _init(network, images.shape, seed=2)
    predictions = np.asarray(network.apply(params, images)).argmax(axis=1)
    labels = predictions.copy()
    wrong = np.array([0, 4, 5, 11, 20, 22])  # 22 is in the last, short chunk for batch_size 5
    labels[wrong] = (labels[wrong] + 1) % 5
    labels = labels.astype(np.int32)
    for batch_size in [5, 23, 100]:
        error = model.test_error(network, params, images, labels, batch_size)
        assert error == pytest.approx(len(wrong) / 23)
    assert model.test_error(network, params, images, predictions, 5) == 0.0
