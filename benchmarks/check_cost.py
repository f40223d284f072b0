"""What a Hessian check costs and how accurate it is, along a GD and a SAM trajectory: our
Lanczos warm-started from the previous check, our Lanczos cold, and the original's estimator
(power iteration on finite differences, `sam_eos.power_iteration`), each against a long reference
Lanczos run at every check. Also draws `docs/check_cost.png`."""

import functools
import os

import jax
import numpy as np
import optax
from jax.flatten_util import ravel_pytree
from matplotlib.figure import Figure

from benchmarks import problems
from benchmarks.harness import REPO_ROOT, Context, format_seconds, timed
from sam_eos import top_eigenvalues
from sam_eos.loop.feed import FullBatchFeed
from sam_eos.loop.steps import make_train_steps
from sam_eos.power_iteration import eigen_info, power_iteration

NAME = "check_cost"
TITLE = "Check cost and error along GD and SAM trajectories"
STEP_SIZE, RHO = 1.0, 0.1
METHODS = ("warm Lanczos", "cold Lanczos", "original (power)")
FIGURE = REPO_ROOT / "docs" / "check_cost.png"


def trajectory(loss_fn, params, batch, rho: float, checks: int, every: int) -> list:
    """Parameters at `checks` points `every` full-batch steps apart (SGD with step 1)."""
    optimizer = optax.sgd(STEP_SIZE)
    steps = make_train_steps(loss_fn, optimizer, rho, FullBatchFeed.select)
    opt_state, points = optimizer.init(params), [params]
    for _ in range(checks - 1):
        _, params, opt_state, _, _ = steps(params, opt_state, batch, 0, every)
        points.append(params)
    return points


def solve(loss_fn, method: str, params, batch, key, start):
    """One check by `method`; `start`: the previous warm check's Ritz vectors (None: cold)."""
    if method == "original (power)":
        found = power_iteration(loss_fn, params, batch, key)
        info = eigen_info(found, ravel_pytree(found.direction)[0][None])
        return found.magnitudes, found.direction, info
    options = {"warm Lanczos": {"start_vectors": start}, "cold Lanczos": {}}[method]
    return top_eigenvalues(loss_fn, params, batch, key, **options)


def measure_along(loss_fn, points, batch) -> dict[str, list[dict]]:
    """Per method, per point: products, seconds and relative error of lambda_1."""
    key = jax.random.key(0)
    results: dict[str, list[dict]] = {method: [] for method in METHODS}
    start = None
    for i, params in enumerate(points):
        reference = float(top_eigenvalues(loss_fn, params, batch, key, 1, num_matvecs=400,
                                          tolerance=1e-7)[0][0])
        check_key = jax.random.fold_in(key, i)
        if i == 0:  # compile every solver once, untimed
            for method in METHODS:
                timed(functools.partial(solve, loss_fn, method, params, batch, check_key, start))
        for method in METHODS:
            seconds, (values, _, info) = timed(
                functools.partial(solve, loss_fn, method, params, batch, check_key, start))
            results[method].append({
                "products": int(info.hessian_vector_products), "seconds": seconds,
                "error": abs(float(values[0]) - reference) / abs(reference),
                "reference": reference})
            if method == "warm Lanczos":
                start = info.ritz_vectors
    return results


def draw(runs: dict[str, dict[str, list[dict]]], every: int, title: str) -> None:
    """Products, seconds and error per check, one column per run (GD, SAM)."""
    figure = Figure(figsize=(9, 7.2))
    axes = figure.subplots(3, 2, sharex=True)
    panels = (("products", "products per check\n(HVPs; power: finite differences)", False),
              ("seconds", "seconds per check", False),
              ("error", "relative error of lambda_1", True))
    for column, (run, results) in enumerate(runs.items()):
        for j, method in enumerate(METHODS):
            steps = np.arange(len(results[method])) * every
            style = dict(color=f"C{j}", marker="o", markersize=3, label=method)
            for row, (key, _, log) in enumerate(panels):
                values = [max(r[key], 1e-9) if log else r[key] for r in results[method]]
                (axes[row, column].semilogy if log else axes[row, column].plot)(
                    steps, values, **style)
        axes[0, column].set_title(run, fontsize=9)
        axes[2, column].axhline(1e-4, color="0.3", linestyle=":", label="1e-4 asked of a check")
        axes[2, column].set_xlabel("step")
    for row, (_, label, _) in enumerate(panels):
        axes[row, 0].set_ylabel(label, fontsize=8)
    axes[2, 1].legend(fontsize=7)
    for ax in axes.flat:
        ax.grid(alpha=0.3)
    figure.suptitle(title + "\n(the first check of each run includes no compile: every solver "
                    "was compiled before)", fontsize=9)
    figure.tight_layout()
    FIGURE.parent.mkdir(exist_ok=True)
    figure.savefig(FIGURE, dpi=100)


def run(context: Context) -> dict:
    width, images = (100, 1000) if context.quick else (200, 2000)
    checks, every = (6, 100) if context.quick else (11, 100)
    (x, y), source = problems.mnist_batch(context.data_dir, images)
    network, loss_fn = problems.make_mlp(width, 4)
    batch = jax.device_put((x, y))
    params = network.init(jax.random.PRNGKey(0), x[:1])
    runs = {}
    for run_name, rho in (("GD", 0.0), (f"SAM rho={RHO:g}", RHO)):
        points = trajectory(loss_fn, params, batch, rho, checks, every)
        runs[run_name] = measure_along(loss_fn, points, batch)
    label = (f"MLP 3x{width} ({problems.num_params(params):,} params), {images} images "
             f"({source}), eta {STEP_SIZE:g}, a check every {every} steps")
    if os.environ.get("SAM_EOS_BENCHMARK_FIGURE", "1") == "1":
        draw(runs, every, label)
    rows, headline = [], []
    for run_name, results in runs.items():
        for method in METHODS:
            later = results[method][1:]  # after the first check (warm starts need one before)
            seconds = np.median([r["seconds"] for r in later])
            products = np.median([r["products"] for r in later])
            worst = max(r["error"] for r in results[method])
            rows.append([run_name, method, f"{products:g}", format_seconds(seconds),
                         f"{np.median([r['error'] for r in later]):.1e}", f"{worst:.1e}"])
            headline.append([f"Check along {run_name}: {method}",
                             f"{format_seconds(seconds)}, {products:g} products, "
                             f"worst error {worst:.1e}"])
    return {"title": TITLE, "headline": headline,
            "columns": ["run", "method", "median products", "median seconds",
                        "median rel. error", "worst rel. error"],
            "rows": rows, "figure": "docs/check_cost.png",
            "notes": f"{label}. Medians over checks 2 to {checks} (the first has nothing to "
                     "start warm from); reference: Lanczos to tolerance 1e-7 at each check. "
                     "A power-iteration product is a central finite difference (two "
                     "gradients); an HVP is one forward-over-reverse pass.",
            "per_check": runs}
