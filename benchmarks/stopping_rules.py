"""How few products can a warm check take? Stopping rules replayed on one Krylov sequence.

Along the SAM and GD trajectories of `check_misses`, each check's warm start (the previous
point's tight Ritz vectors, combined by `lanczos.start_vector`) is run for a fixed number of
Lanczos steps (`lanczos.tridiagonal`), and the tridiagonal's prefixes are read in float64 as
each stopping rule would read them:

- oracle: the first step whose top Ritz value is within 1e-4 of a tight cold solve (no rule
  can stop earlier and be right; it needs the answer);
- residual-gap: sam_eos's rule, min(res, res^2 / gap) per Ritz value, gap to the next Ritz
  value less that value's residual, below the tolerance at two steps in a row;
- cluster: a block quadratic bound, ||R_m||^2 / eta_m for the top m Ritz values taken together
  (R_m their residuals, eta_m the gap below the m-th less the next residual), the smallest
  over m <= 3; it does not lose the gap to a near-degenerate neighbour, so it stops sooner.

Power iteration (the original's estimator) runs at the same points for its product count.
Every rule reads the same sequence, so the differences are the rules' alone.
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import logging

from benchmarks import problems
from sam_eos import lanczos, top_eigenvalues
from sam_eos.eigensolver import DEFAULT_START_NOISE, DEFAULT_TOLERANCE
from sam_eos.hessian import hessian_operator
from sam_eos.loop.feed import FullBatchFeed
from sam_eos.loop.steps import make_train_steps
from sam_eos.power_iteration import power_iteration
from sam_eos.rows import ravel as ravel_rows

NAME = "stopping_rules"
TITLE = "Stopping rules on one Krylov sequence: how few products a right answer needs"
ACCURACY = 1e-4  # relative error a check must reach
TOLERANCE = DEFAULT_TOLERANCE
MIN_STEPS = 3  # the solver's first possible stop for k = 1 (a block of 3 Ritz vectors)
MAX_CLUSTER = 3
SETTINGS = {"SAM (eta 0.5, rho 0.1)": (0.5, 0.1, 0), "GD (eta 1)": (1.0, 0.0, 2)}


def trajectory(loss_fn, params, batch, eta, rho, steps, every):
    """Parameters every `every` steps of full-batch SGD (SAM when rho > 0)."""
    optimizer = optax.sgd(eta)
    train_steps = make_train_steps(loss_fn, optimizer, rho, FullBatchFeed.select)
    opt_state, points = optimizer.init(params), [params]
    for _ in range(steps // every):
        _, params, opt_state, _, _ = train_steps(params, opt_state, batch, 0, every)
        points.append(params)
    return points


def ritz_bounds(alpha: np.ndarray, beta: np.ndarray, j: int) -> dict[str, float]:
    """The top Ritz value after j steps and each rule's relative error bound for it. The
    residual-gap rule is the solver's own (`lanczos._gaps` and `lanczos._error_bound`, with its
    condition on the bottom Ritz value when that may be the largest in magnitude)."""
    t = np.diag(alpha[:j]) + np.diag(beta[:j - 1], 1) + np.diag(beta[:j - 1], -1)
    values, vectors = np.linalg.eigh(t)
    values, vectors = values[::-1], vectors[:, ::-1]
    residuals = np.abs(beta[j - 1] * vectors[-1])
    norm = max(abs(values[0]), abs(values[-1]))
    single = solver_bound(values, residuals, 0)
    if j > 1 and abs(values[-1]) + residuals[-1] >= abs(values[0]):
        single = max(single, solver_bound(values, residuals, j - 1))
    cluster = single
    for m in range(2, min(j, MAX_CLUSTER + 1)):
        below = values[m - 1] - np.max(values[m:] + residuals[m:])
        if below > 0:
            cluster = min(cluster, np.sum(residuals[:m] ** 2) / below)
    return {"top": values[0], "residual-gap": single / norm, "cluster": cluster / norm}


def solver_bound(values: np.ndarray, residuals: np.ndarray, i: int) -> float:
    """The solver's error bound of Ritz value i (absolute): min(res, res^2 / gap)."""
    values, residuals = jnp.asarray(values), jnp.asarray(residuals)
    gap = lanczos._gaps(values[i:i + 1], values, residuals, jnp.ones(values.shape, bool))
    return float(lanczos._error_bound(residuals[i:i + 1], gap)[0])


def stops(rows: list[dict], reference: float) -> dict[str, tuple[int, float, float]]:
    """Per rule, (products, relative error, bound) where it stops; the oracle's bound is nan."""
    out = {}
    for r in rows:
        if abs(r["top"] - reference) / reference <= ACCURACY:
            out["oracle"] = (r["j"], abs(r["top"] - reference) / reference, np.nan)
            break
    for rule in ("residual-gap", "cluster"):
        previous = np.inf
        for r in rows:
            bound = max(r[rule], previous)
            if r["j"] >= MIN_STEPS and bound <= TOLERANCE:
                out[rule] = (r["j"], abs(r["top"] - reference) / reference, bound)
                break
            previous = r[rule]
    return out


def replay(loss_fn, points, batch, max_steps: int) -> list[dict]:
    """Each warm check's stops under every rule, and power iteration's products."""
    sequence = jax.jit(lambda p, start, key: lanczos.tridiagonal(
        hessian_operator(loss_fn, p, batch)[2], start, key, steps=max_steps + 1))
    checks = []
    for i in range(1, len(points)):
        key = jax.random.key(i)
        _, _, previous = top_eigenvalues(loss_fn, points[i - 1], batch, key, 1,
                                         num_matvecs=300, tolerance=1e-7)
        reference = float(top_eigenvalues(loss_fn, points[i], batch, jax.random.fold_in(key, 1),
                                          1, num_matvecs=300, tolerance=1e-7)[0][0])
        start = lanczos.start_vector(ravel_rows(previous.ritz_vectors), jax.random.fold_in(key, 2),
                                     jnp.float32(DEFAULT_START_NOISE))
        alpha, beta = (np.asarray(a, np.float64) for a in sequence(points[i], start, key))
        rows = [dict(j=j, **ritz_bounds(alpha, beta, j)) for j in range(1, max_steps + 1)]
        power = power_iteration(loss_fn, points[i], batch, key)
        checks.append({"step": i, **stops(rows, reference), "power": int(power.iterations)})
    return checks


def summarize(checks: list[dict]) -> dict:
    out = {"checks": len(checks),
           "power_median_products": float(np.median([c["power"] for c in checks]))}
    for rule in ("oracle", "residual-gap", "cluster"):
        found = [c[rule] for c in checks if rule in c]
        errors = np.array([f[1] for f in found])
        bounds = np.array([f[2] for f in found])
        out[rule] = {"stopped": len(found),
                     "median_products": float(np.median([f[0] for f in found])),
                     "worst_error": float(errors.max()),
                     "broken": int(np.sum((errors > 3 * bounds) & (errors > 1e-6)))}
    return out


def run(context) -> dict:
    width, images = (100, 1000) if context.quick else (200, 2000)
    steps, every, max_steps = (300, 50, 40) if context.quick else (1000, 50, 45)
    (x, y), source = problems.mnist_batch(context.data_dir, images)
    network, loss_fn = problems.make_mlp(width, 4)
    batch = jax.device_put((x, y))
    logging.set_verbosity(logging.WARNING)
    results, rows = {}, []
    for name, (eta, rho, seed) in SETTINGS.items():
        params = network.init(jax.random.PRNGKey(seed), x[:1])
        points = trajectory(loss_fn, params, batch, eta, rho, steps, every)
        results[name] = summarize(replay(loss_fn, points, batch, max_steps))
        r = results[name]
        for rule in ("oracle", "residual-gap", "cluster"):
            s = r[rule]
            rows.append([name, rule, f"{s['stopped']} of {r['checks']}",
                         f"{s['median_products']:g}", f"{s['worst_error']:.1e}",
                         "n/a" if rule == "oracle" else str(s["broken"]),
                         f"{r['power_median_products']:g}"])
    sam = results["SAM (eta 0.5, rho 0.1)"]
    gd = results["GD (eta 1)"]
    return {
        "title": TITLE,
        "headline": [
            ["Fewest products to 1e-4 (oracle), SAM, median",
             f"{sam['oracle']['median_products']:g} HVPs vs power's "
             f"{sam['power_median_products']:g}; residual-gap rule "
             f"{sam['residual-gap']['median_products']:g}"],
            ["Cluster bound's broken checks (SAM, GD)",
             f"{sam['cluster']['broken']}, {gd['cluster']['broken']}; worst error "
             f"{max(sam['cluster']['worst_error'], gd['cluster']['worst_error']):.1e}"]],
        "columns": ["trajectory", "rule", "stopped", "median HVPs", "worst error",
                    "bounds broken", "power's median products"],
        "rows": rows,
        "notes": f"MLP 3x{width}, {images} images ({source}), full batch, {steps} steps, a check "
                 f"every {every} (the first, cold, left out). Each check: the previous point's "
                 f"tight Ritz vectors as the warm block, {max_steps} Lanczos steps read as each "
                 f"rule would (tolerance {TOLERANCE:g}, two steps in a row, at least "
                 f"{MIN_STEPS}); errors against a cold solve to 1e-7. Broken: error > 3 x bound "
                 "and > 1e-6. Oracle: the first step within 1e-4.",
        "results": results}
