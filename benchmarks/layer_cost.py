"""What `--layer_sharpness` costs: a check with every layer's sharpness against a plain check,
along a SAM trajectory, both warm-started from their own previous check (`SharpnessTracker`
with and without `per_layer`), timed side by side at each check. The target: at most
(number of layers + 1) x a plain check."""

import functools

import jax
import numpy as np

from benchmarks import problems
from benchmarks.check_cost import RHO, trajectory
from benchmarks.harness import Context, format_seconds, timed
from sam_eos import SharpnessTracker
from sam_eos.layers import group_indices

NAME = "layer_cost"
TITLE = "Cost of a check with the layers' sharpness (--layer_sharpness)"


def measure_along(loss_fn, points, batch) -> list[dict]:
    """Per point: seconds and products of a plain and a per-layer check, each warm from its
    own previous check; the two are timed one after the other at every point."""
    trackers = {"plain": SharpnessTracker(loss_fn),
                "per layer": SharpnessTracker(loss_fn, per_layer=True)}
    states = {name: tracker.init(points[0], jax.random.key(0))
              for name, tracker in trackers.items()}
    for name, tracker in trackers.items():  # compile, untimed, from a throwaway state
        timed(functools.partial(tracker.update, states[name], points[0], batch))
    rows = []
    for params in points:
        row = {}
        for name, tracker in trackers.items():
            seconds, (result, states[name]) = timed(
                functools.partial(tracker.update, states[name], params, batch))
            row[name] = {"seconds": seconds,
                         "products": int(result.hessian_vector_products),
                         "lambda_max": float(result.eigenvalues[0])}
        rows.append(row)
    return rows


def run(context: Context) -> dict:
    width, images = (100, 1000) if context.quick else (200, 2000)
    checks, every = (8, 50) if context.quick else (21, 50)
    (x, y), source = problems.mnist_batch(context.data_dir, images)
    network, loss_fn = problems.make_mlp(width, 4)
    batch = jax.device_put((x, y))
    params = network.init(jax.random.PRNGKey(0), x[:1])
    layers = len(group_indices(params))
    points = trajectory(loss_fn, params, batch, RHO, checks, every)
    results = measure_along(loss_fn, points, batch)[1:]  # after the first (cold) check
    seconds = {name: float(np.median([r[name]["seconds"] for r in results]))
               for name in ("plain", "per layer")}
    products = {name: float(np.median([r[name]["products"] for r in results]))
                for name in ("plain", "per layer")}
    per_check = [r["per layer"]["seconds"] / r["plain"]["seconds"] for r in results]
    ratio = seconds["per layer"] / seconds["plain"]
    label = (f"MLP 3x{width} ({problems.num_params(params):,} params, {layers} layers), "
             f"{images} images ({source}), SAM rho {RHO:g}, eta 1, a check every {every} steps")
    rows = [[name, f"{products[name]:g}", format_seconds(seconds[name])]
            for name in ("plain", "per layer")]
    rows.append(["ratio (per layer / plain)", f"{products['per layer'] / products['plain']:.2f}",
                 f"{ratio:.2f} (target <= {layers + 1})"])
    return {"title": TITLE,
            "headline": [["--layer_sharpness check / plain check",
                          f"{ratio:.2f}x the time ({layers} layers: target <= {layers + 1}x)"]],
            "columns": ["check", "median products", "median seconds"], "rows": rows,
            "notes": f"{label}. Medians over checks 2 to {checks} (the first is cold); the "
                     "two checks are timed one after the other at each point, and the "
                     f"per-check time ratio ranges {min(per_check):.2f} to "
                     f"{max(per_check):.2f}. A per-layer check is the plain check plus one "
                     "Lanczos solve per layer on its diagonal block; each block product is "
                     "one full Hessian-vector product.",
            "per_check": results}
