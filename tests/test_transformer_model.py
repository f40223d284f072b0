"""Tests for transformer.model: shapes, causality, pad masking, the loss and a short training."""

import math

import haiku as hk
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from transformer import dataset, model

SEQUENCE_LENGTH = 16
MODEL_SIZE = 16


@pytest.fixture(scope="module")
def network() -> hk.Transformed:
    return model.make_network(
        num_layers=2,
        num_heads=2,
        key_size=8,
        model_size=MODEL_SIZE,
        sequence_length=SEQUENCE_LENGTH,
    )


@pytest.fixture(scope="module")
def params(network):
    return jax.jit(network.init)(jax.random.PRNGKey(0), jnp.ones((1, SEQUENCE_LENGTH), jnp.int32))


@pytest.fixture(scope="module")
def apply(network):
    return jax.jit(network.apply)


@pytest.fixture(scope="module")
def loss_fn(network):
    return model.make_loss_fn(network)


@pytest.fixture(scope="module")
def jit_loss(loss_fn):
    return jax.jit(loss_fn)


def random_tokens(seed: int, shape: tuple[int, ...]) -> np.ndarray:
    """Non-pad token codes 1..127, int32."""
    return np.random.default_rng(seed).integers(1, 128, size=shape).astype(np.int32)


def test_output_shape(apply, params):
    for length in (SEQUENCE_LENGTH, 5):  # shorter inputs use the first rows of the positions
        logits = apply(params, random_tokens(0, (2, length)))
        assert logits.shape == (2, length, dataset.VOCAB_SIZE)
        assert logits.dtype == jnp.float32
        assert np.all(np.isfinite(logits))


def test_input_longer_than_sequence_length_is_rejected(network, params):
    with pytest.raises(ValueError, match="exceeds the model's sequence_length"):
        network.apply(params, random_tokens(0, (1, SEQUENCE_LENGTH + 1)))


def test_parameter_shapes(params):
    shapes = jax.tree_util.tree_map(lambda a: a.shape, params)
    layer_norm = {"scale": (MODEL_SIZE,), "offset": (MODEL_SIZE,)}
    assert shapes["embed"]["embeddings"] == (128, MODEL_SIZE)
    assert shapes["positional_embed"]["embeddings"] == (SEQUENCE_LENGTH, MODEL_SIZE)
    for i in range(2):
        assert shapes[f"block_{i}_attention/query"]["w"] == (MODEL_SIZE, 2 * 8)
        assert shapes[f"block_{i}_attention/linear"]["w"] == (2 * 8, MODEL_SIZE)
        assert shapes[f"block_{i}_mlp_hidden"]["w"] == (MODEL_SIZE, 4 * MODEL_SIZE)
        assert shapes[f"block_{i}_mlp_output"]["w"] == (4 * MODEL_SIZE, MODEL_SIZE)
        assert shapes[f"block_{i}_ln_attention"] == layer_norm
        assert shapes[f"block_{i}_ln_mlp"] == layer_norm
    assert "block_2_mlp_hidden" not in shapes
    assert shapes["ln_final"] == layer_norm
    assert shapes["output"] == {"w": (MODEL_SIZE, 128), "b": (128,)}  # untied read-out


def test_embedding_initialisation_scale(params):
    # TruncatedNormal(0.02), truncated at 2 standard deviations.
    for table in (params["embed"]["embeddings"], params["positional_embed"]["embeddings"]):
        assert np.max(np.abs(table)) <= 0.04 + 1e-6
        assert 0.01 < float(np.std(table)) < 0.025


def test_causality(apply, params):
    tokens = random_tokens(1, (2, SEQUENCE_LENGTH))
    base = np.asarray(apply(params, tokens))
    for k in (0, 7, SEQUENCE_LENGTH - 1):
        changed = tokens.copy()
        changed[:, k] = changed[:, k] % 127 + 1  # a different non-pad token
        logits = np.asarray(apply(params, changed))
        np.testing.assert_allclose(logits[:, :k], base[:, :k], atol=1e-5)
        assert np.max(np.abs(logits[:, k] - base[:, k])) > 1e-3


def test_pad_inputs_are_not_attended_to(apply, params):
    # A pad key is masked out, so the pad token's embedding row can only affect the logits at the
    # pad positions themselves (whose own residual stream starts from it).
    tokens = random_tokens(2, (2, SEQUENCE_LENGTH))
    tokens[0, 3] = tokens[1, 9] = dataset.PAD_TOKEN
    changed = jax.tree_util.tree_map(lambda a: a, params)
    direction = jax.random.normal(jax.random.PRNGKey(1), (MODEL_SIZE,))
    changed["embed"] = {"embeddings": params["embed"]["embeddings"].at[0].add(direction)}
    base = np.asarray(apply(params, tokens))
    logits = np.asarray(apply(changed, tokens))
    keep = tokens != dataset.PAD_TOKEN
    np.testing.assert_allclose(logits[keep], base[keep], atol=1e-5)
    assert np.max(np.abs(logits[0, 3] - base[0, 3])) > 1e-3


def test_loss_ignores_pad_targets(apply, params, jit_loss):
    inputs = random_tokens(3, (2, SEQUENCE_LENGTH))
    targets = random_tokens(4, (2, SEQUENCE_LENGTH))
    targets[0, 5:] = dataset.PAD_TOKEN
    targets[1, :2] = dataset.PAD_TOKEN
    log_probs = np.asarray(jax.nn.log_softmax(apply(params, inputs), axis=-1), np.float64)
    nll = [
        -log_probs[b, t, targets[b, t]]
        for b in range(2)
        for t in range(SEQUENCE_LENGTH)
        if targets[b, t] != dataset.PAD_TOKEN
    ]
    assert len(nll) == 2 * SEQUENCE_LENGTH - 11 - 2
    loss = float(jit_loss(params, (inputs, targets)))
    assert loss == pytest.approx(np.mean(nll), rel=1e-5)


def test_loss_of_all_pad_targets_is_zero_not_nan(params, jit_loss):
    inputs = random_tokens(5, (2, SEQUENCE_LENGTH))
    targets = np.zeros_like(inputs)
    assert float(jit_loss(params, (inputs, targets))) == 0.0


def test_initial_loss_is_about_log_vocab_size(params, jit_loss):
    inputs = random_tokens(6, (32, SEQUENCE_LENGTH))
    targets = random_tokens(7, (32, SEQUENCE_LENGTH))
    loss = float(jit_loss(params, (inputs, targets)))
    # The read-out has haiku's default init (logit variance ~0.77 after the final LayerNorm),
    # which adds about var/2 nats to log(128).
    assert math.log(128) - 0.1 < loss < math.log(128) + 0.6
    # With a zero read-out the prediction is uniform: exactly log(128), up to the float32 mean
    # of 512 equal terms, whose roundings need not cancel, summed in an order set by XLA's
    # vector width: up to 512 eps / 2 = 3e-5 relative (measured here: 3.2e-6).
    zeroed = dict(params)
    zeroed["output"] = jax.tree_util.tree_map(jnp.zeros_like, params["output"])
    assert float(jit_loss(zeroed, (inputs, targets))) == pytest.approx(math.log(128), rel=1e-4)


def test_evaluate_loss_weights_batches_by_tokens(network, params, loss_fn, apply):
    text = "".join(chr(32 + (i * 31) % 95) for i in range(7 * (SEQUENCE_LENGTH + 1) + 5))
    batches = dataset.test_batches(text, batch_size=2, sequence_length=SEQUENCE_LENGTH)
    assert [b[0].shape[0] for b in batches] == [2, 2, 2, 1]
    # Pad targets count for nothing: pad the last 7 targets of the last (smaller) batch.
    last_targets = batches[-1][1].copy()
    last_targets[-1, -7:] = dataset.PAD_TOKEN
    batches[-1] = (batches[-1][0], last_targets)
    inputs = np.concatenate([b[0] for b in batches])
    targets = np.concatenate([b[1] for b in batches])
    log_probs = np.asarray(jax.nn.log_softmax(apply(params, inputs), axis=-1), np.float64)
    nll = -np.take_along_axis(log_probs, targets[..., None], axis=-1)[..., 0]
    expected = float(np.mean(nll[targets != dataset.PAD_TOKEN]))  # each token counts once
    assert model.evaluate_loss(loss_fn, params, batches) == pytest.approx(expected, rel=1e-5)
    # Its parts add up over any split of the batches (processes each evaluating some).
    parts = [model.summed_loss(loss_fn, params, batches[i::2]) for i in range(2)]
    assert sum(count for _, count in parts) == np.count_nonzero(targets != dataset.PAD_TOKEN)
    assert sum(total for total, _ in parts) / sum(count for _, count in parts) == pytest.approx(
        expected, rel=1e-5
    )
    # Given the network instead, it builds (and caches) the loss itself.
    assert model.evaluate_loss(network, params, batches[:1]) == pytest.approx(
        model.evaluate_loss(loss_fn, params, batches[:1]), rel=1e-6
    )


def test_gradient_descent_learns_repetitive_text():
    sequence_length = 32
    text = "".join(f"the cat sat on the mat {i % 7}.\n" for i in range(1500))
    train, test = dataset.split_corpus(text, test_lines=100)
    batches = dataset.TrainBatches(train, batch_size=16, sequence_length=sequence_length, seed=0)
    network = model.make_network(
        num_layers=2, num_heads=2, key_size=16, model_size=32, sequence_length=sequence_length
    )
    loss_fn = model.make_loss_fn(network)
    params = network.init(jax.random.PRNGKey(0), next(batches)[0])
    learning_rate = 0.1

    @jax.jit
    def step(params, batch):
        loss, grads = jax.value_and_grad(loss_fn)(params, batch)
        return jax.tree_util.tree_map(lambda p, g: p - learning_rate * g, params, grads), loss

    test_set = dataset.test_batches(test, batch_size=16, sequence_length=sequence_length)
    initial_test_loss = model.evaluate_loss(loss_fn, params, test_set)
    losses = []
    for _ in range(40):
        params, loss = step(params, next(batches))
        losses.append(float(loss))
    assert losses[0] > 4.5
    assert np.mean(losses[-5:]) < 2.0
    final_test_loss = model.evaluate_loss(loss_fn, params, test_set)
    assert initial_test_loss > 4.5 and final_test_loss < 2.0
