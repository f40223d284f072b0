"""Snapshots of the warm-start benchmark's run, so eigensolver experiments need not retrain.

`python3 -m benchmarks.warm_start_snapshots [--out /tmp/warm_start_snapshots.npz]` trains the
run of `benchmarks.warm_start` once (MLP 3 x 200, 2000 MNIST images, SAM eta 0.5 rho 0.1, 1000
steps) and saves, at each of its check steps (0, 50, ..., 1000):

- `params` [checks, n]: the flat parameters (`ravel_pytree` order);
- a reference from a cold Lanczos solve at tolerance 1e-8 (up to 300 HVPs, 6 Ritz vectors):
  `ref_vectors` [checks, 6, n], their Rayleigh quotients `ref_values` [checks, 6] (descending)
  and residual norms `ref_residuals` [checks, 6], the solver's `ref_bound` and `ref_hvps`.

`load` reads the file back with a jitted flat Hessian-vector product `hvp(params, v)`.
"""

from __future__ import annotations

import argparse
import pathlib
import sys
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.flatten_util import ravel_pytree

from benchmarks import problems, warm_start
from sam_eos import hessian

DEFAULT_OUT = pathlib.Path("/tmp/warm_start_snapshots.npz")
REFERENCE_VECTORS = 6


def flat_hvp(loss_fn, batch, unravel):
    """A jitted `(flat_params [n], v [n]) -> H v [n]` (exact, jvp of the gradient)."""

    def product(flat_params, v):
        _, _, matvec = hessian.hessian_operator(loss_fn, unravel(flat_params), batch,
                                                "forward_over_reverse")
        return matvec(v)

    return jax.jit(product)


def rayleigh(hvp, flat_params, vectors: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Rayleigh quotients and residual norms of the unit rows of `vectors`, in float64 (a
    float32 sum over 239,410 terms is off by ~5e-6 relative)."""
    vectors = vectors.astype(np.float64)
    products = np.stack([np.asarray(hvp(flat_params, jnp.asarray(v, jnp.float32)), np.float64)
                         for v in vectors])
    values = np.einsum("in,in->i", vectors, products)
    return values, np.linalg.norm(products - values[:, None] * vectors, axis=1)


def reference(loss_fn, params, batch, hvp, key):
    """`(values [6], residuals [6], vectors [6, n], bound, hvps)` of a cold 1e-8 solve."""
    _, _, info = hessian.top_eigenvalues(
        loss_fn, params, batch, 1, tolerance=warm_start.REFERENCE_TOLERANCE,
        max_iterations=warm_start.REFERENCE_ITERATIONS, key=key, return_info=True,
        block_size=REFERENCE_VECTORS, hvp_mode="forward_over_reverse")
    vectors = np.asarray(info.ritz_vectors)
    values, residuals = rayleigh(hvp, ravel_pytree(params)[0], vectors)
    order = np.argsort(-values)
    return (values[order], residuals[order], vectors[order], float(info.error_bound),
            int(info.matrix_vector_products))


def save(out: pathlib.Path, num_steps: int, every: int, data_dir: pathlib.Path) -> None:
    """Trains the run once and writes the snapshots and references to `out` (.npz)."""
    setup = warm_start.make_run(data_dir)
    unravel = ravel_pytree(setup.params)[1]
    hvp = flat_hvp(setup.loss_fn, setup.batch, unravel)
    columns = {name: [] for name in ("steps", "params", "ref_values", "ref_residuals",
                                     "ref_vectors", "ref_bound", "ref_hvps")}
    for step, params in warm_start.check_points(setup, num_steps, every):
        found = reference(setup.loss_fn, params, setup.batch, hvp,
                          jax.random.PRNGKey(10**6 + step))
        row = (step, np.asarray(ravel_pytree(params)[0]), *found)
        for name, value in zip(columns, row, strict=True):
            columns[name].append(value)
        print(f"step {step}: top {np.round(found[0], 5)}, residuals {found[1].max():.1e}, "
              f"bound {found[3]:.0e}, {found[4]} HVPs", file=sys.stderr, flush=True)
    np.savez(out, source=setup.source, every=every,
             **{name: np.stack(values) for name, values in columns.items()})


class Snapshots(NamedTuple):
    """The saved run: arrays as in the module docstring, and the product `hvp(params, v)`."""

    steps: np.ndarray
    params: np.ndarray
    ref_values: np.ndarray
    ref_residuals: np.ndarray
    ref_vectors: np.ndarray
    hvp: object
    source: str


def load(path: pathlib.Path = DEFAULT_OUT,
         data_dir: pathlib.Path = problems.DEFAULT_DATA_DIR) -> Snapshots:
    """The snapshots at `path`, with the run's flat Hessian-vector product."""
    data = np.load(path)
    setup = warm_start.make_run(data_dir)
    unravel = ravel_pytree(setup.params)[1]
    return Snapshots(data["steps"], data["params"], data["ref_values"], data["ref_residuals"],
                     data["ref_vectors"], flat_hvp(setup.loss_fn, setup.batch, unravel),
                     str(data["source"]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=pathlib.Path, default=DEFAULT_OUT)
    parser.add_argument("--steps", type=int, default=1000)
    parser.add_argument("--every", type=int, default=50)
    parser.add_argument("--data_dir", type=pathlib.Path, default=problems.DEFAULT_DATA_DIR)
    args = parser.parse_args()
    save(args.out, args.steps, args.every, args.data_dir)


if __name__ == "__main__":
    main()
