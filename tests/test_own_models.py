"""A researcher's own model: only trainable parameters enter the Hessian, and the recipes of the
README's "Tracking your own model" for Flax NNX and Equinox models with BatchNorm and Dropout
read the current batch statistics at every update.

The models are the NNX MNIST tutorial's layers, shrunk (a 3x3 convolution to 4 channels,
BatchNorm, ReLU, Dropout, a linear layer to 3 classes: 483 parameters on 6x6 images) so that
the dense Hessian checks every number. The images have mean 2 and standard deviation 3, so
the batch statistics move far from their initial (0, 1) within the training steps.
"""

import functools

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from jax.flatten_util import ravel_pytree

import sam_eos
from sam_eos import rows
from sam_eos.trainable import check_params

STEPS = 10  # training steps before the measurement; the statistics move with each


def images_and_labels():
    kx, ky = jax.random.split(jax.random.key(5))
    x = 2.0 + 3.0 * jax.random.normal(kx, (64, 6, 6, 1))
    return x, jax.random.randint(ky, (64,), 0, 3)


def cross_entropy(logits, labels):
    return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()


@functools.partial(jax.jit, static_argnums=0)
def dense_hessian(loss_fn, params, batch):
    flat, unravel = ravel_pytree(params)
    return jax.hessian(lambda f: loss_fn(unravel(f), batch))(flat)


def dense_top(loss_fn, params, batch) -> float:
    """The top eigenvalue of the dense Hessian of `loss_fn(params, batch)` in `params`."""
    return float(jnp.linalg.eigvalsh(dense_hessian(loss_fn, params, batch))[-1])


def plain(leaf):
    """A typed key's data, any other leaf itself: comparable arrays."""
    if jnp.issubdtype(leaf.dtype, jax.dtypes.prng_key):
        return jax.random.key_data(leaf)
    return leaf


def copy_of(tree):
    """Fresh arrays (NNX's split shares its Variables with the model, which training
    mutates)."""
    return jax.tree.map(jnp.copy, tree)


# ---------------------------------------------------------------------------------------------
# The check


@pytest.mark.parametrize("leaf, kind", [
    (jnp.zeros((), jnp.int32), "integer array int32[]"),
    (jnp.ones(3, bool), "bool array bool[3]"),
    (jax.random.key(0), "PRNG key array (key<fry>)"),
    (jax.random.PRNGKey(0), "integer array uint32[2]"),
    (3, "Python int"),
    (jnp.ones(2, jnp.complex64), "complex array"),
    ("relu", "a str, not an array"),
])
def test_a_leaf_that_is_not_a_floating_parameter_is_refused_by_path(leaf, kind):
    params = {"dense": {"w": jnp.ones((2, 2))}, "extra": leaf}
    with pytest.raises(ValueError, match=r"params\['extra'\]") as error:
        sam_eos.SharpnessTracker(lambda p, b: 0.0).init(params, jax.random.key(0))
    message = str(error.value)
    assert kind in message and "params['dense']" not in message
    assert "in its batch argument" in message  # says how to pass such state instead


def test_floating_parameters_of_every_precision_pass():
    check_params({"a": jnp.ones(2, jnp.float16), "b": jnp.ones(2, jnp.bfloat16),
                  "c": jnp.ones(2, jnp.float32), "d": np.ones(2, np.float64), "e": 1.0})
    check_params(jax.ShapeDtypeStruct((3,), jnp.float32))  # shapes alone: nothing traced


def test_the_other_entry_points_refuse_too():
    params = {"w": jnp.ones(3), "key": jax.random.key(0)}
    with pytest.raises(ValueError, match=r"params\['key'\]: a PRNG key"):
        sam_eos.layer_sharpness(lambda p, b: 0.0, params, None, jax.random.key(0))
    with pytest.raises(ValueError, match=r"params\['key'\]: a PRNG key"):
        sam_eos.hessian_trace(lambda p, b: 0.0, params, None, jax.random.key(0), 4)
    tracker = sam_eos.SharpnessTracker(lambda p, b: 0.0)
    state = tracker.init({"w": jnp.ones(3)}, jax.random.key(0))
    with pytest.raises(ValueError, match=r"params\['step'\]: an integer array"):
        tracker.update(state, {"w": jnp.ones(3), "step": jnp.int32(0)}, None)


# ---------------------------------------------------------------------------------------------
# Flax NNX


class NNXModel(nnx.Module):
    """The NNX MNIST tutorial's layers, shrunk."""

    def __init__(self, rngs: nnx.Rngs):
        self.conv = nnx.Conv(1, 4, kernel_size=(3, 3), rngs=rngs)
        self.batch_norm = nnx.BatchNorm(4, momentum=0.9, rngs=rngs)
        self.dropout = nnx.Dropout(0.2, rngs=rngs)
        self.linear = nnx.Linear(4 * 6 * 6, 3, rngs=rngs)

    def __call__(self, x):
        x = self.dropout(nnx.relu(self.batch_norm(self.conv(x))))
        return self.linear(x.reshape(x.shape[0], -1))


@nnx.jit
def nnx_train_step(model, optimizer, x, y):
    model.train()  # batch statistics (the running ones move), a new dropout mask
    loss, grads = nnx.value_and_grad(lambda m: cross_entropy(m(x), y))(model)
    optimizer.update(model, grads)
    return loss


def nnx_recipe(model):
    """The README's recipe: `(graphdef, eval-mode loss, training-mode loss)`."""
    graphdef, _, _ = nnx.split(model, nnx.Param, ...)

    def loss_fn(params, batch):  # the eval-mode loss: running statistics, no dropout
        (x, y), rest = batch
        model = nnx.merge(graphdef, params, rest, copy=True)  # copy: never mutate the caller's
        model.eval()
        return cross_entropy(model(x), y)

    def training_loss_fn(params, batch):  # batch statistics and the dropout mask of `key`
        (x, y), rest, key = batch
        model = nnx.merge(graphdef, params, rest, copy=True)
        model.train()
        nnx.reseed(model, dropout=key)
        return cross_entropy(model(x), y)

    return graphdef, loss_fn, training_loss_fn


@pytest.fixture(scope="module")
def nnx_trained():
    """The model after `STEPS` steps of SGD with momentum, its state of step 0, and the
    recipe's two losses (built once: the compiled functions are reused across tests)."""
    x, y = images_and_labels()
    model = NNXModel(nnx.Rngs(params=0, dropout=1))
    optimizer = nnx.Optimizer(model, optax.sgd(0.1, momentum=0.9), wrt=nnx.Param)
    initial = copy_of(nnx.split(model, nnx.Param, ...)[2])
    for _ in range(STEPS):
        nnx_train_step(model, optimizer, x, y)
    return model, initial, nnx_recipe(model)[1:]


def test_nnx_split_of_everything_is_refused_naming_the_state():
    model = NNXModel(nnx.Rngs(params=0, dropout=1))
    _, everything = nnx.split(model)
    with pytest.raises(ValueError) as error:
        sam_eos.SharpnessTracker(lambda p, b: 0.0).init(everything, jax.random.key(0))
    message = str(error.value)
    for path, kind in [("['batch_norm']['mean']", "nnx.BatchStat"),
                       ("['batch_norm']['var']", "nnx.BatchStat"),
                       ("['dropout']['rngs']['count']", "nnx.RngCount"),
                       ("['dropout']['rngs']['key']", "nnx.RngKey")]:
        assert f"params{path}: an {kind}, not an nnx.Param" in message
    assert "nnx.split(model, nnx.Param, ...)" in message
    assert "4 leaves are not" in message  # the parameters themselves pass


def test_nnx_recipe_measures_the_eval_loss_at_the_current_statistics(nnx_trained):
    model, initial, (loss_fn, _) = nnx_trained
    x, y = images_and_labels()
    tracker = sam_eos.SharpnessTracker(loss_fn)
    _, params, rest = nnx.split(model, nnx.Param, ...)
    state = tracker.init(params, jax.random.key(0))
    result, state = tracker.update(state, params, ((x, y), rest))
    # Only the nnx.Param entries are in the Hessian, not the running statistics.
    num_params = sum(leaf.size for leaf in jax.tree.leaves(nnx.state(model, nnx.Param)))
    assert rows.size(state.ritz_vectors) == num_params == 483
    now = dense_top(loss_fn, params, ((x, y), rest))
    at_step_0 = dense_top(loss_fn, params, ((x, y), initial))
    assert bool(result.converged)
    np.testing.assert_allclose(float(result.eigenvalues[0]), now, rtol=1e-4)
    # Statistics frozen at step 0 would read another number.
    assert abs(at_step_0 - now) > 0.05 * now, (at_step_0, now)


def test_nnx_a_loss_closed_over_the_statistics_freezes_them(nnx_trained):
    """The trap the recipe avoids: closed over, the statistics are constants of the loss
    compiled at the first update, and later updates keep reading them."""
    x, y = images_and_labels()
    model = NNXModel(nnx.Rngs(params=0, dropout=1))
    optimizer = nnx.Optimizer(model, optax.sgd(0.1, momentum=0.9), wrt=nnx.Param)
    _, _, (loss_fn, _) = nnx_trained  # the same model, trained alike
    _, params, rest = nnx.split(model, nnx.Param, ...)
    initial = copy_of(rest)
    frozen = sam_eos.SharpnessTracker(lambda p, b: loss_fn(p, (b, rest)))
    state = frozen.init(params, jax.random.key(0))
    _, state = frozen.update(state, params, (x, y))  # compiled at step 0
    for _ in range(STEPS):
        nnx_train_step(model, optimizer, x, y)
    _, params, current = nnx.split(model, nnx.Param, ...)
    result, _ = frozen.update(state, params, (x, y))
    now = dense_top(loss_fn, params, ((x, y), current))
    at_step_0 = dense_top(loss_fn, params, ((x, y), initial))
    np.testing.assert_allclose(float(result.eigenvalues[0]), at_step_0, rtol=1e-4)
    assert abs(at_step_0 - now) > 0.05 * now, (at_step_0, now)


def test_nnx_training_mode_operator_is_one_mask_per_key(nnx_trained):
    model, _, (_, training_loss_fn) = nnx_trained
    x, y = images_and_labels()
    _, params, rest = nnx.split(model, nnx.Param, ...)
    before = copy_of(rest)
    tracker = sam_eos.SharpnessTracker(training_loss_fn)
    state = tracker.init(params, jax.random.key(0))
    values = []
    for seed in (7, 8):
        batch = ((x, y), rest, jax.random.key(seed))
        result, state = tracker.update(state, params, batch)
        dense = dense_top(training_loss_fn, params, batch)
        np.testing.assert_allclose(float(result.eigenvalues[0]), dense, rtol=1e-4)
        values.append(dense)
    assert values[0] != values[1]  # each key its own mask, its own Hessian
    # The measurement left the model's statistics and RNG state as they were.
    after = jax.tree.leaves(jax.tree.map(plain, rest))
    for now, then in zip(after, jax.tree.leaves(jax.tree.map(plain, before)), strict=True):
        np.testing.assert_array_equal(now, then)


# ---------------------------------------------------------------------------------------------
# Equinox


class EqxModel(eqx.Module):
    """The same layers in Equinox, one example at a time, with a constant input shift that is
    a float array but not trained."""

    pixel_mean: jax.Array
    conv: eqx.nn.Conv2d
    batch_norm: eqx.nn.BatchNorm
    dropout: eqx.nn.Dropout
    linear: eqx.nn.Linear

    def __init__(self, key):
        k1, k2 = jax.random.split(key)
        self.pixel_mean = jnp.full((1, 1, 1), 2.0)
        self.conv = eqx.nn.Conv2d(1, 4, 3, padding=1, key=k1)
        self.batch_norm = eqx.nn.BatchNorm(4, axis_name="batch", momentum=0.9, mode="batch")
        self.dropout = eqx.nn.Dropout(0.2)
        self.linear = eqx.nn.Linear(4 * 6 * 6, 3, key=k2)

    def __call__(self, x, state, key=None):  # x [1, 6, 6]
        x, state = self.batch_norm(self.conv(x - self.pixel_mean), state)
        x = self.dropout(jax.nn.relu(x), key=key)
        return self.linear(x.reshape(-1)), state


def eqx_partition(model):
    """`eqx.partition` on the inexact arrays, less the constant `pixel_mean`."""
    trainable = jax.tree.map(eqx.is_inexact_array, model)
    trainable = eqx.tree_at(lambda m: m.pixel_mean, trainable, replace=False)
    return eqx.partition(model, trainable)


def eqx_recipe(static):
    """The README's recipe: `(eval-mode loss, training-mode loss)`."""

    def loss_fn(params, batch):  # the eval-mode loss: running statistics, no dropout
        (x, y), state = batch
        model = eqx.nn.inference_mode(eqx.combine(params, static))
        logits, _ = jax.vmap(model, axis_name="batch", in_axes=(0, None),
                             out_axes=(0, None))(x, state)
        return cross_entropy(logits, y)

    def training_loss_fn(params, batch):  # batch statistics and the dropout masks of `key`
        (x, y), state, key = batch
        model = eqx.combine(params, static)
        keys = jax.random.split(key, x.shape[0])
        logits, _ = jax.vmap(model, axis_name="batch", in_axes=(0, None, 0),
                             out_axes=(0, None))(x, state, keys)
        return cross_entropy(logits, y)

    return loss_fn, training_loss_fn


@pytest.fixture(scope="module")
def eqx_trained():
    """`(params, static, state after STEPS steps, state of step 0, data, the recipe's two
    losses)`."""
    x, y = images_and_labels()
    x = jnp.moveaxis(x, -1, 1)  # channels first
    model, state = eqx.nn.make_with_state(EqxModel)(jax.random.key(0))
    params, static = eqx_partition(model)
    optimizer = optax.sgd(0.1, momentum=0.9)
    opt_state = optimizer.init(params)
    initial = state

    @jax.jit
    def step(params, opt_state, state, key):
        def loss(params):
            model = eqx.combine(params, static)
            keys = jax.random.split(key, x.shape[0])
            logits, state_ = jax.vmap(model, axis_name="batch", in_axes=(0, None, 0),
                                      out_axes=(0, None))(x, state, keys)
            return cross_entropy(logits, y), state_

        (_, state), grads = jax.value_and_grad(loss, has_aux=True)(params)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, state

    for i in range(STEPS):
        params, opt_state, state = step(params, opt_state, state, jax.random.key(100 + i))
    return params, static, state, initial, (x, y), eqx_recipe(static)


def test_eqx_a_stateful_layer_built_without_make_with_state_is_refused():
    model = EqxModel(jax.random.key(0))  # BatchNorm's StateIndex keeps its initial arrays
    params, _ = eqx.partition(model, eqx.is_inexact_array)
    with pytest.raises(ValueError, match=r"params\.batch_norm\.batch_state_index: an "
                                         r"eqx\.nn\.StateIndex") as error:
        check_params(params)
    assert "eqx.nn.make_with_state" in str(error.value)
    _, state = eqx.nn.make_with_state(EqxModel)(jax.random.key(0))
    with pytest.raises(ValueError, match=r"an eqx\.nn\.State"):
        check_params({"w": jnp.ones(2), "state": state})


def test_eqx_recipe_measures_the_eval_loss_at_the_current_statistics(eqx_trained):
    params, _, state, initial, data, (loss_fn, _) = eqx_trained
    tracker = sam_eos.SharpnessTracker(loss_fn)
    tracker_state = tracker.init(params, jax.random.key(0))
    result, tracker_state = tracker.update(tracker_state, params, (data, state))
    # Conv 36 + 4, BatchNorm's scale and shift 8, linear 432 + 3: no statistics, no shift.
    assert rows.size(tracker_state.ritz_vectors) == 483
    now = dense_top(loss_fn, params, (data, state))
    at_step_0 = dense_top(loss_fn, params, (data, initial))
    assert bool(result.converged)
    np.testing.assert_allclose(float(result.eigenvalues[0]), now, rtol=1e-4)
    assert abs(at_step_0 - now) > 0.05 * now, (at_step_0, now)


def test_eqx_training_mode_operator_is_one_mask_per_key(eqx_trained):
    params, _, state, _, data, (_, training_loss_fn) = eqx_trained
    tracker = sam_eos.SharpnessTracker(training_loss_fn)
    tracker_state = tracker.init(params, jax.random.key(0))
    values = []
    for seed in (7, 8):
        batch = (data, state, jax.random.key(seed))
        result, tracker_state = tracker.update(tracker_state, params, batch)
        dense = dense_top(training_loss_fn, params, batch)
        np.testing.assert_allclose(float(result.eigenvalues[0]), dense, rtol=1e-4)
        values.append(dense)
    assert values[0] != values[1]


# ---------------------------------------------------------------------------------------------
# Adam's preconditioner from the optimizers such models train with


def adam_after_one_step(optimizer, params):
    state = optimizer.init(params)
    grads = jax.tree.map(lambda p: 0.5 * p, params)
    return optimizer.update(grads, state, params)[1]


def test_adam_preconditioner_puts_multi_transform_groups_together():
    params = {"body": {"w": jnp.ones((2, 3))}, "head": {"w": 2.0 * jnp.ones(4)}}
    groups = {"body": "slow", "head": "fast"}
    state = adam_after_one_step(optax.multi_transform(
        {"slow": optax.adam(1e-3), "fast": optax.adamw(1e-2)}, groups), params)
    alone = sam_eos.adam_preconditioner(adam_after_one_step(optax.adam(1e-3), params))
    together = sam_eos.adam_preconditioner(state)
    assert jax.tree.structure(together) == jax.tree.structure(params)
    for a, b in zip(jax.tree.leaves(together), jax.tree.leaves(alone), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-6)
    # A group another optimizer trains has no P: refused by name, with what to do.
    state = adam_after_one_step(optax.multi_transform(
        {"slow": optax.adam(1e-3), "fast": optax.sgd(1e-2)}, groups), params)
    with pytest.raises(ValueError, match=r"preconditions params\['head'\].*without a "
                                         r"preconditioner"):
        sam_eos.adam_preconditioner(state)
    state = adam_after_one_step(optax.chain(optax.adam(1e-3), optax.adam(1e-3)), params)
    with pytest.raises(ValueError, match=r"opt_state\[0\]\[0\], opt_state\[1\]\[0\] each "
                                         r"precondition the same parameters"):
        sam_eos.adam_preconditioner(state)


def test_adam_preconditioner_reads_nnx_optimizer_state():
    model = NNXModel(nnx.Rngs(params=0, dropout=1))
    optimizer = nnx.Optimizer(model, optax.adam(1e-3), wrt=nnx.Param)
    params = copy_of(nnx.split(model, nnx.Param, ...)[1])  # the update changes the model's
    grads = jax.tree.map(lambda p: 0.5 * p, params)
    optimizer.update(model, grads)
    reference = sam_eos.adam_preconditioner(adam_after_one_step(optax.adam(1e-3), params))
    np.testing.assert_allclose(ravel_pytree(sam_eos.adam_preconditioner(optimizer.opt_state))[0],
                               ravel_pytree(reference)[0], rtol=1e-6)
    # The tracker takes it as it comes (OptVariables, not Params): the same effective
    # sharpness as with the preconditioner in the parameters' own pytree type.
    _, loss_fn, _ = nnx_recipe(model)
    _, new_params, rest = nnx.split(model, nnx.Param, ...)
    x = jax.random.normal(jax.random.key(1), (8, 6, 6, 1))
    batch = ((x, jnp.arange(8) % 3), rest)
    tracker = sam_eos.SharpnessTracker(loss_fn, tolerance=1e-7)
    state = tracker.init(new_params, jax.random.key(0))
    as_state, _ = tracker.update(state, new_params, batch,
                                 preconditioner=sam_eos.adam_preconditioner(optimizer.opt_state))
    in_params = jax.tree.unflatten(jax.tree.structure(new_params), jax.tree.leaves(reference))
    state = tracker.init(new_params, jax.random.key(0))
    as_params, _ = tracker.update(state, new_params, batch, preconditioner=in_params)
    assert np.isfinite(float(as_params.eigenvalues[0]))
    np.testing.assert_allclose(as_state.eigenvalues, as_params.eigenvalues, rtol=1e-5)
