"""layer_sharpness and layer_shares against the dense Hessian of a small MLP."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import sam_eos
from sam_eos.layers import group_indices
from tests.conftest import LAYERS, dense_hessian
from tests.conftest import layered_tanh_loss as tanh_mlp_loss
from tests.conftest import make_layered_problem as make_problem

KEY = jax.random.key(0)


@pytest.fixture(scope="module")
def problem():
    params, batch = make_problem()
    return params, batch, dense_hessian(tanh_mlp_loss, params, batch)


def test_each_layer_matches_its_dense_diagonal_block(problem):
    params, batch, hessian = problem
    sharpness, info = sam_eos.layer_sharpness(tanh_mlp_loss, params, batch, KEY,
                                              tolerance=1e-7, num_matvecs=300)
    assert list(sharpness) == list(LAYERS)
    for name, index in group_indices(params).items():
        block = hessian[np.ix_(index, index)]
        expected = np.linalg.eigvalsh(block)[-1]
        assert float(sharpness[name]) == pytest.approx(expected, rel=1e-4, abs=1e-6)
        assert bool(info[name].converged)
        assert info[name].ritz_vectors.shape[1] == index.size
    # The blocks differ: the measurement is per layer, not the whole network's sharpness.
    values = [float(v) for v in sharpness.values()]
    assert max(values) - min(values) > 1e-2 * max(values)


def test_shares_of_the_top_eigenvector_match_the_dense_one_and_sum_to_one(problem):
    params, batch, hessian = problem
    info = sam_eos.top_eigenvalues(tanh_mlp_loss, params, batch, KEY, 1, tolerance=1e-7,
                                   num_matvecs=300)
    shares = sam_eos.layer_shares(info[1])
    top = np.linalg.eigh(hessian)[1][:, -1]
    for name, index in group_indices(params).items():
        assert float(shares[name]) == pytest.approx(np.sum(top[index] ** 2), abs=1e-4)
    # ||v_G||^2 / ||v||^2 summed over the groups: float32 sums of 215 squares in two orders
    # that depend on XLA's vector width, each within ~(215 / width) eps ~ 3e-6 (measured here:
    # 9e-8); a group missed or counted twice is off by its share, 0.17 or more.
    assert sum(float(v) for v in shares.values()) == pytest.approx(1.0, abs=1e-5)


def test_a_one_layer_model_equals_top_eigenvalues():
    params, (x, y) = make_problem(sizes=(5, 4))
    params = {"linear": params[LAYERS[0]]}

    def linear_loss(p, batch):
        x, y = batch
        return jnp.mean((x @ p["linear"]["w"] + p["linear"]["b"] - y) ** 2)

    sharpness, _ = sam_eos.layer_sharpness(linear_loss, params, (x, y), KEY, tolerance=1e-7)
    eigenvalues, _, _ = sam_eos.top_eigenvalues(linear_loss, params, (x, y), KEY, 1,
                                                tolerance=1e-7)
    assert float(sharpness["linear"]) == pytest.approx(float(eigenvalues[0]), rel=1e-5)
    assert float(sam_eos.layer_shares(params)["linear"]) == pytest.approx(1.0)


def test_a_grouping_splits_weights_from_biases(problem):
    params, batch, hessian = problem
    by_kind = lambda path: path.split("'")[-2]  # noqa: E731 - "['mlp/~/linear_0']['w']" -> "w"
    sharpness, _ = sam_eos.layer_sharpness(tanh_mlp_loss, params, batch, KEY, group=by_kind,
                                           tolerance=1e-7, num_matvecs=300)
    assert sorted(sharpness) == ["b", "w"]
    for name, index in group_indices(params, by_kind).items():
        expected = np.linalg.eigvalsh(hessian[np.ix_(index, index)])[-1]
        assert float(sharpness[name]) == pytest.approx(expected, rel=1e-4, abs=1e-6)


def test_bad_groupings_fail_before_compiling(problem):
    params, batch, _ = problem
    with pytest.raises(ValueError, match="single array"):
        sam_eos.layer_sharpness(lambda p, b: jnp.sum(p ** 2), jnp.ones(3), batch, KEY)
    with pytest.raises(ValueError, match="names no parameter"):
        sam_eos.layer_sharpness(tanh_mlp_loss, params, batch, KEY, group=lambda path: None)
    with pytest.raises(ValueError, match="single array"):
        sam_eos.layer_shares(jnp.ones(3))


def test_a_warm_start_from_the_last_ritz_vectors_needs_fewer_products(problem):
    params, batch, _ = problem
    _, first = sam_eos.layer_sharpness(tanh_mlp_loss, params, batch, KEY, tolerance=1e-6)
    moved = jax.tree.map(lambda p: p * 1.001, params)
    cold, cold_info = sam_eos.layer_sharpness(tanh_mlp_loss, moved, batch, KEY, tolerance=1e-6)
    warm, warm_info = sam_eos.layer_sharpness(
        tanh_mlp_loss, moved, batch, KEY, tolerance=1e-6,
        start_vectors={name: info.ritz_vectors for name, info in first.items()})
    for name in LAYERS:
        assert float(warm[name]) == pytest.approx(float(cold[name]), rel=1e-4)
    assert (sum(int(i.hessian_vector_products) for i in warm_info.values())
            < sum(int(i.hessian_vector_products) for i in cold_info.values()))


def test_the_tracker_per_layer_matches_the_dense_blocks_and_starts_warm(problem):
    params, batch, hessian = problem
    tracker = sam_eos.SharpnessTracker(tanh_mlp_loss, num_matvecs=300, tolerance=1e-7,
                                       per_layer=True)
    state = tracker.init(params, jax.random.key(1))
    assert [v.shape[1] for v in state.layer_ritz_vectors] == [
        i.size for i in group_indices(params).values()]
    first, state = tracker.update(state, params, batch)
    assert list(first.layer_sharpness) == list(LAYERS)
    top = np.linalg.eigh(hessian)[1][:, -1]
    layer_products = 0
    for name, index in group_indices(params).items():
        expected = np.linalg.eigvalsh(hessian[np.ix_(index, index)])[-1]
        assert float(first.layer_sharpness[name]) == pytest.approx(expected, rel=1e-4)
        assert float(first.layer_shares[name]) == pytest.approx(np.sum(top[index] ** 2),
                                                                abs=1e-4)
        assert bool(first.layer_info[name].converged)
        layer_products += int(first.layer_info[name].hessian_vector_products)
    # Float32 sums of squares in two orders, as in the test of layer_shares.
    assert sum(float(v) for v in first.layer_shares.values()) == pytest.approx(1.0, abs=1e-5)
    # The whole network's solve and every layer's count in the products.
    assert int(first.hessian_vector_products) > layer_products > 0
    scalars = first.scalars()
    assert scalars[f"sharpness/layer_sharpness/{LAYERS[0]}"] == pytest.approx(
        float(first.layer_sharpness[LAYERS[0]]))
    assert f"sharpness/layer_share/{LAYERS[2]}" in scalars
    # Warm: the same point again needs fewer products for the layers.
    second, _ = tracker.update(state, params, batch)
    assert sum(int(second.layer_info[n].hessian_vector_products) for n in LAYERS) < \
        layer_products
    for name in LAYERS:
        assert float(second.layer_sharpness[name]) == pytest.approx(
            float(first.layer_sharpness[name]), rel=1e-5)


def test_the_tracker_refuses_a_state_from_other_layers_and_a_bad_per_layer(problem):
    params, batch, _ = problem
    tracker = sam_eos.SharpnessTracker(tanh_mlp_loss, per_layer=True)
    other = sam_eos.SharpnessTracker(
        tanh_mlp_loss, per_layer=lambda path: "weights" if "'w'" in path else "biases")
    state = other.init(params, jax.random.key(0))
    with pytest.raises(ValueError, match="per-layer Ritz vectors"):
        tracker.update(state, params, batch)
    with pytest.raises(ValueError, match="per_layer"):
        sam_eos.SharpnessTracker(tanh_mlp_loss, per_layer="yes")
    plain = sam_eos.SharpnessTracker(tanh_mlp_loss)
    result, state = plain.update(plain.init(params, jax.random.key(0)), params, batch)
    assert result.layer_sharpness is None and state.layer_ritz_vectors == ()
