"""A near-degenerate top cluster: the default k = 1 solve finds its top eigenvalue, from a warm
block orthogonal to it and from any cold key, and its bound covers its error (band Lanczos
with a random start row, `sam_eos.lanczos.start_rows`)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sam_eos import SharpnessTracker, top_eigenvalues

BROKEN_FACTOR = 3.0  # a bound is broken when the error exceeds 3x it ...
FLOAT_RESOLUTION = 1e-6  # ... and float32 rounding


def quadratic_loss(params, batch):
    """0.5 w^T diag(d) w with d = batch: the Hessian is diag(batch) at every point."""
    return 0.5 * jnp.sum(batch * params["w"] ** 2)


def solve(spectrum: np.ndarray, key: int, start=None) -> tuple[float, float, bool]:
    """`(relative error of the top eigenvalue, its bound, converged)` of a default k = 1 solve."""
    params = {"w": jnp.zeros(spectrum.size, jnp.float32)}
    values, _, info = top_eigenvalues(quadratic_loss, params, jnp.asarray(spectrum, jnp.float32),
                                      jax.random.key(key), 1, start_vectors=start)
    top = spectrum.max()
    return abs(float(values[0]) - top) / top, float(info.error_bound), bool(info.converged)


def cluster_spectrum(size: int) -> np.ndarray:
    """1000 eigenvalues in random order: `size` spread evenly over [0.99, 1.0], the rest
    uniform in [0, 0.8]."""
    rng = np.random.default_rng(size)
    spectrum = rng.uniform(0.0, 0.8, 1000)
    spectrum[:size] = np.linspace(1.0, 0.99, size)
    return rng.permutation(spectrum)


def honest(error: float, bound: float) -> bool:
    return error <= BROKEN_FACTOR * bound or error <= FLOAT_RESOLUTION


def test_the_swapped_pair_is_found_from_a_warm_block_orthogonal_to_the_top():
    # The top pair 1.0 and 0.999 above a spread bulk; the warm block holds e_2, e_3, e_4, the
    # old top directions after the pair turned: the single-vector solver converged on 0.999
    # with a bound of about 5e-6.
    spectrum = np.concatenate([[1.0, 0.999], np.linspace(0.5, 0.01, 38)])
    start = {"w": jnp.eye(spectrum.size, dtype=jnp.float32)[1:4]}
    for key in range(4):
        for block in (start, None):  # warm, then cold
            error, bound, converged = solve(spectrum, key, block)
            assert converged
            assert error < 1e-4, (key, block is None, error)
            assert honest(error, bound), (key, error, bound)


@pytest.mark.parametrize("size", [1, 2, 3, 5, 8])
def test_the_top_of_a_cluster_within_one_percent_comes_with_an_honest_bound(size):
    spectrum = cluster_spectrum(size)
    for key in range(3):
        error, bound, _ = solve(spectrum, key)
        assert error < 1e-4, (key, error)
        assert honest(error, bound), (key, error, bound)


def edge_tracker_on(spectrum: np.ndarray, edge: float, key: int, **options):
    """Two updates of a k="edge" tracker on diag(spectrum): the second warm."""
    tracker = SharpnessTracker(quadratic_loss, k="edge", **options)
    params = {"w": jnp.zeros(spectrum.size, jnp.float32)}
    state = tracker.init(params, jax.random.key(key))
    batch = jnp.asarray(spectrum, jnp.float32)
    results = []
    for _ in range(2):
        result, state = tracker.update(state, params, batch, edge=edge)
        results.append(result)
    return results


@pytest.mark.parametrize("size", [1, 2, 3, 5, 8])
def test_the_edge_following_k_counts_a_cluster_above_the_line_and_finds_each(size):
    # The cluster above 0.9 x edge (edge 1.0), the bulk below 0.8.
    spectrum = cluster_spectrum(size)
    for result in edge_tracker_on(spectrum, 1.0, key=size):
        assert int(result.edge_count) == size
        eigenvalues = np.asarray(result.eigenvalues)
        np.testing.assert_allclose(eigenvalues[:size], np.linspace(1.0, 0.99, size), atol=1e-4)
        assert np.all(np.isnan(eigenvalues[size:]))
        assert bool(result.converged)
        assert result.scalars()["sharpness/edge_count"] == size


def test_the_count_follows_the_line_and_stops_at_the_cap():
    spectrum = np.concatenate([[2.0, 1.9, 1.5, 1.2], np.linspace(0.8, 0.0, 200)])
    first, second = edge_tracker_on(spectrum, 2.0, key=0, edge_fraction=0.7)
    assert int(first.edge_count) == int(second.edge_count) == 3  # 2.0, 1.9, 1.5 >= 1.4
    # Nothing above the line: the count is 0 and the top eigenvalue is still reported.
    (below, _) = edge_tracker_on(spectrum, 4.0, key=0)
    assert int(below.edge_count) == 0
    assert float(below.eigenvalues[0]) == pytest.approx(2.0, rel=1e-4)
    assert np.all(np.isnan(np.asarray(below.eigenvalues)[1:]))
    (capped, _) = edge_tracker_on(spectrum, 1.0, key=0, max_k=2)
    assert int(capped.edge_count) == 2
    np.testing.assert_allclose(np.asarray(capped.eigenvalues), [2.0, 1.9], rtol=1e-4)


def test_edge_options_are_checked_before_compiling():
    for fraction in (0.0, -0.5, 1.5, True, "0.9"):
        with pytest.raises(ValueError, match="edge_fraction must be in"):
            SharpnessTracker(quadratic_loss, k="edge", edge_fraction=fraction)
    for cap in (0, -1, 2.0, True):
        with pytest.raises(ValueError, match="max_k"):
            SharpnessTracker(quadratic_loss, k="edge", max_k=cap)
    params = {"w": jnp.zeros(4)}
    edge = SharpnessTracker(quadratic_loss, k="edge", max_k=1)
    with pytest.raises(ValueError, match="edge is required with k='edge'"):
        edge.update(edge.init(params, jax.random.key(0)), params, jnp.ones(4))
    plain = SharpnessTracker(quadratic_loss)
    with pytest.raises(ValueError, match="edge is only used with k='edge'"):
        plain.update(plain.init(params, jax.random.key(0)), params, jnp.ones(4), edge=1.0)
