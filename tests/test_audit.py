"""Audited checks: a warm check that converges on the second eigenvalue of a near-degenerate
top cluster is caught by its audit, which re-solves cold from a fresh random vector. The
default check does not miss it (its random start row finds the turned top); without random
rows (`lanczos.DEFAULT_RANDOM_ROWS = 0`, the single-vector solver) it does, and the audit is what
catches it."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sam_eos import lanczos
from sam_eos.errors import InputError
from sam_eos.loop import check, train
from sam_eos.loop.feed import Placement
from sam_eos.reports import raw_data, summary

NUM_PARAMS = 40
# A near-degenerate top pair (1.0, 0.99) well above the rest of the spectrum. (With 0.999 a
# cold solve from a random vector may itself stop on a mix of the pair: the audit then still
# reports the disagreement, but the value it keeps depends on the key.)
SECOND = 0.99
SPECTRUM = np.concatenate([[1.0, SECOND], np.linspace(0.5, 0.01, NUM_PARAMS - 2)])


def quadratic_loss(params, batch):
    """0.5 w^T diag(d) w with d = batch: the Hessian is diag(batch) at every point."""
    return 0.5 * jnp.sum(batch * params["w"] ** 2)


def forced_miss(audit_every: int, check_index: int):
    """One check warm-started from a block orthogonal to the top eigenvector e_1 (e_2, e_3,
    e_4: the old top directions after the cluster turned)."""
    params = {"w": jnp.ones(NUM_PARAMS) / np.sqrt(NUM_PARAMS)}
    batch = jnp.asarray(SPECTRUM, jnp.float32)
    config = train.TrainConfig(step_size=1.0, eigensolver_audit_every=audit_every)
    state = check.initial_state(params, (), config)
    rows = state.ritz_vectors.shape[0]
    state = state._replace(ritz_vectors=jnp.eye(NUM_PARAMS, dtype=jnp.float32)[1:1 + rows])
    key = jax.random.PRNGKey(0)
    hessian_check = check.compile_check(quadratic_loss, config, state, batch, key,
                                        Placement(None))
    measurement, _ = hessian_check.take(state, batch, key, 1, lambda: False, check_index)
    return measurement.columns, measurement.products


def test_the_default_warm_check_finds_the_turned_top_eigenvector():
    measured, _ = forced_miss(audit_every=0, check_index=1)
    assert bool(measured["converged"])
    assert float(measured["eigenvalues"][0]) == pytest.approx(1.0, abs=1e-5)


@pytest.fixture
def single_start_row(monkeypatch):
    """The solver without random start rows: one warm vector, as before band Lanczos."""
    monkeypatch.setattr(lanczos, "DEFAULT_RANDOM_ROWS", 0)


def test_an_unaudited_single_row_check_misses_the_turned_top_beyond_its_bound(single_start_row):
    # What the audits are for: the residual bound cannot see an eigenvalue the Krylov space
    # barely holds. The check converges on 0.99 and reports a bound far below its error.
    measured, _ = forced_miss(audit_every=0, check_index=1)
    top = float(measured["eigenvalues"][0])
    assert bool(measured["converged"])
    assert top == pytest.approx(SECOND, abs=2e-4)
    assert 1.0 - top > 3 * float(measured["error_bound"])
    assert "audit_error" not in measured


def test_an_audited_check_reports_a_bound_that_covers_the_miss(single_start_row):
    measured, products = forced_miss(audit_every=1, check_index=1)
    top = float(measured["eigenvalues"][0])
    # The cold solve finds the top; the two disagree beyond their bounds, so the row says so:
    # the top, a bound that covers the warm check's error, and converged 0 (the raw data then
    # holds a note).
    assert top == pytest.approx(1.0, abs=1e-5)
    assert measured["audit_error"] == pytest.approx(top - SECOND, rel=0.05)
    assert 1.0 - top <= 3 * float(measured["error_bound"])
    assert not bool(measured["converged"])
    assert int(measured["hessian_vector_products"]) == products  # the audit's counted too
    unaudited, warm_products = forced_miss(audit_every=1, check_index=0)  # never the first
    assert "audit_error" not in unaudited and products > warm_products


def test_a_run_audits_every_tenth_check_and_summarizes_the_audits(tmp_path):
    from tests.conftest import two_layer_loss as mlp_loss
    from tests.conftest import two_layer_problem as mlp_problem

    params, batch = mlp_problem()
    config = train.TrainConfig(step_size=0.1, rho=0.05, max_steps=20,
                               hessian_check_every_steps=1,
                               outputs=train.Outputs(raw_data=str(tmp_path / "raw.txt")))
    result = train.run(mlp_loss, params, train.FullBatch(batch), config)
    _, columns, rows = raw_data.read_raw_data(result.raw_data)
    assert columns == raw_data.column_names(1)
    assert columns.index("audit_error") == columns.index("converged") - 1
    errors = rows[:, columns.index("audit_error")]
    audited = [int(step) for step, e in zip(rows[:, columns.index("step")], errors,
                                            strict=True) if math.isfinite(e)]
    assert audited == [10, 20]
    assert np.all(np.abs(errors[np.isfinite(errors)]) < 1e-4)  # no miss on this problem
    written = summary.summarize(result.rows, steps=result.steps, test_name="error",
                                test_value=None, seconds=result.seconds)
    assert written["audits"] == 2
    assert written["worst_audit_error"] == pytest.approx(float(np.nanmax(errors)))
    assert any(line.startswith("Audits: 2 checks also solved cold")
               for line in summary.summary_lines(written))


def test_audits_are_off_without_warm_starts_and_when_asked():
    assert not train.TrainConfig(step_size=1.0, eigensolver_audit_every=0).audits()
    assert not train.TrainConfig(step_size=1.0, eigensolver_warm_start=False).audits()
    assert not train.TrainConfig(step_size=1.0, eigensolver="power").audits()
    assert "audit_error" not in raw_data.column_names(1, audits=False)
    with pytest.raises(InputError, match="--eigensolver_audit_every must be an integer >= 0"):
        train.TrainConfig(step_size=1.0, eigensolver_audit_every=-1)
