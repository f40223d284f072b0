"""A near-degenerate top cluster: the default k = 1 solve finds its top eigenvalue, from a warm
block orthogonal to it and from any cold key, and its bound covers its error (band Lanczos
with a random start row, `sam_eos.lanczos.start_rows`)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sam_eos import top_eigenvalues

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
    rng = np.random.default_rng(size)
    spectrum = rng.uniform(0.0, 0.8, 1000)
    spectrum[:size] = np.linspace(1.0, 0.99, size)
    spectrum = rng.permutation(spectrum)
    for key in range(3):
        error, bound, _ = solve(spectrum, key)
        assert error < 1e-4, (key, error)
        assert honest(error, bound), (key, error, bound)
