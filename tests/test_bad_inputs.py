"""Bad inputs, tried as a new user would: a ValueError naming the argument, before any compile."""

import jax
import jax.numpy as jnp
import pytest

import sam_eos
from sam_eos.power_iteration import power_iteration

KEY = jax.random.key(0)


def loss(params, batch):
    return 0.5 * jnp.sum((batch @ params["w"]) ** 2)


PARAMS, BATCH = {"w": jnp.ones(4)}, jnp.eye(4)


@pytest.mark.parametrize(("options", "message"), [
    ({"k": 0}, "k must be a positive int, not 0"),
    ({"k": 2.5}, "k must be a positive int, not 2.5"),
    ({"tolerance": -1.0}, "tolerance must be >= 0, not -1.0"),
    ({"num_matvecs": 0}, "num_matvecs must be a positive int, not 0"),
    ({"k": 3, "num_matvecs": 2}, "k=3 eigenvalues need num_matvecs >= k, not 2"),
    ({"k": 5}, "k=5 is more eigenvalues than num_params=4"),
])
def test_top_eigenvalues_names_the_bad_argument(options, message):
    with pytest.raises(ValueError, match=message):
        sam_eos.top_eigenvalues(loss, PARAMS, BATCH, KEY, **options)


@pytest.mark.parametrize(("options", "message"), [
    ({"k": 0}, "k must be a positive int, not 0"),
    ({"num_matvecs": 2.5}, "num_matvecs must be a positive int, not 2.5"),
    ({"k": 5}, "k=5 is more eigenvalues than num_params=4"),
])
def test_power_iteration_names_the_bad_argument(options, message):
    with pytest.raises(ValueError, match=message):
        power_iteration(loss, PARAMS, BATCH, KEY, **options)


def test_a_basis_too_small_for_k_is_named_before_compiling():
    params = {"w": jnp.zeros(200)}
    with pytest.raises(ValueError, match=r"basis_size must be an int >= k \+ 3 = 6"):
        sam_eos.top_eigenvalues(loss, params, jnp.eye(200), KEY, k=3, basis_size=4)
    with pytest.raises(ValueError, match="basis_size must be an int"):
        sam_eos.SharpnessTracker(loss, basis_size=2)


def test_tracker_refuses_bad_settings_keys_and_states():
    with pytest.raises(ValueError, match="k must be a positive int"):
        sam_eos.SharpnessTracker(loss, k=0)
    with pytest.raises(ValueError, match="tolerance must be >= 0"):
        sam_eos.SharpnessTracker(loss, tolerance=-1e-3)
    tracker = sam_eos.SharpnessTracker(loss)
    with pytest.raises(ValueError, match="key must be a PRNG key"):
        tracker.init(PARAMS, 0)
    state = tracker.init(PARAMS, jax.random.PRNGKey(0))  # a raw key is a key too
    with pytest.raises(ValueError, match="for other params: these have 5 entries"):
        tracker.update(state, {"w": jnp.ones(5)}, jnp.eye(5))
    result, _ = tracker.update(state, PARAMS, BATCH)
    assert float(result.eigenvalues[0]) == pytest.approx(1.0, rel=1e-5)
