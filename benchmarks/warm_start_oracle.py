"""How few HVPs can a warm-started check take? Eigensolver variants on the saved snapshots.

`python3 -m benchmarks.warm_start_oracle [--snapshots /tmp/warm_start_snapshots.npz]` reads the
snapshots of `benchmarks.warm_start_snapshots` (run it first) and, chaining warm starts from
check to check (each method from its own previous check's top `block` Ritz vectors; check 0
cold for all), runs in numpy (float64 vectors, float32 products):

- "lanczos": single-vector Lanczos from the sum of the unit rows plus 1e-2 noise, stopping on
  the error estimate of `sam_eos.lanczos` (min(res, res^2 / gap), the gap less the neighbour's
  residual), at least `block` steps: the current solver's algorithm;
- "davidson": Rayleigh-Ritz on the orthonormalised block (each row plus `noise` times a random
  unit vector; `block` HVPs), then one HVP per step on the orthogonalised residual of the top
  Ritz vector (or, "block davidson", of each of the top `block` Ritz vectors), stopping on the
  same estimate computed from the exact Ritz residuals of the whole space.

One method (`from_reference`) starts every check from the previous check's reference
eigenvectors (6, the best start a warm check could hold): the HVPs the move of the spectrum
alone costs. `--methods 0,2` runs a subset of METHODS (all of them took ~45 minutes on 2 busy
CPU cores, ~1 s per HVP; the results are in BENCHMARKS.md, warm-started checks).

For each it prints per check: the HVPs used when it stopped, the true relative error there,
its bound, and the "oracle" counts: the HVPs after which the top Ritz value's true error
(against the snapshots' 1e-8 reference) first falls below 1e-4 and 1e-5.
"""

from __future__ import annotations

import argparse
import pathlib
from typing import NamedTuple

import jax.numpy as jnp
import numpy as np

from benchmarks import warm_start_snapshots

MAX_HVPS = 60


class Trace(NamedTuple):
    """One check of one method."""

    stop_hvps: int  # HVPs when the bound first met the tolerance (MAX_HVPS: never)
    stop_error: float  # true relative error of the top Ritz value there
    stop_bound: float  # its bound there
    oracle_4: int  # HVPs until the true error < 1e-4 (MAX_HVPS + 1: never)
    oracle_5: int  # the same, < 1e-5
    vectors: np.ndarray  # [block, n] the top Ritz vectors at the stop


def unit(v: np.ndarray) -> np.ndarray:
    return v / np.linalg.norm(v)


def estimate_bound(theta: np.ndarray, residuals: np.ndarray, k: int = 1) -> float:
    """The solver's relative error estimate of the top k of Ritz values `theta` (descending)
    with residual norms `residuals`: min(res, res^2 / gap), gap = distance to each other Ritz
    value less that value's residual, relative to max |theta|."""
    bounds = []
    for i in range(k):
        others = np.delete(np.arange(len(theta)), i)
        gaps = np.abs(theta[i] - theta[others]) - residuals[others]
        gap = np.min(gaps) if len(others) else np.inf
        r = residuals[i]
        bounds.append(min(r, r**2 / gap) if np.isfinite(gap) and gap > 0 else r)
    return max(bounds) / max(np.abs(theta).max(), 1e-30)


def orthogonalise(basis: list[np.ndarray], w: np.ndarray) -> np.ndarray:
    """w minus its projection on the orthonormal rows of `basis` (twice)."""
    if not basis:
        return w
    z = np.stack(basis)
    for _ in range(2):
        w = w - z.T @ (z @ w)
    return w


class Subspace:
    """An orthonormal basis Z with the products HZ, and Rayleigh-Ritz on it."""

    def __init__(self, product):
        self.product, self.z, self.hz = product, [], []

    def add(self, w: np.ndarray, rng) -> None:
        w = orthogonalise(self.z, w)
        if np.linalg.norm(w) < 1e-8:  # dependent: a random direction instead
            w = orthogonalise(self.z, rng.standard_normal(w.shape))
        w = unit(orthogonalise(self.z, unit(w)))
        self.z.append(w)
        self.hz.append(self.product(w))

    def ritz(self):
        """(theta desc, Y [m, n] Ritz vectors, residual vectors [m, n])."""
        z, hz = np.stack(self.z), np.stack(self.hz)
        g = z @ hz.T
        theta, c = np.linalg.eigh((g + g.T) / 2)
        theta, c = theta[::-1], c[:, ::-1]
        y, hy = c.T @ z, c.T @ hz
        return theta, y, hy - theta[:, None] * y


def run_method(product, start: np.ndarray | None, truth: float, *, dim: int, method: str,
               block: int, noise: float, tolerance: float, rng) -> Trace:
    """One check: `method` from the rows of `start` (None: cold, a random vector)."""
    space = Subspace(product)
    if start is None or method == "lanczos":
        first = rng.standard_normal(dim)
        if start is not None:
            first = unit(np.sum([unit(r) for r in start], axis=0)) + noise * unit(first)
        space.add(first, rng)
        initial = 1
    else:
        for row in start:
            space.add(unit(row) + noise * unit(rng.standard_normal(row.shape)), rng)
        initial = len(start)
    stop, oracle, vectors = None, {4: None, 5: None}, None
    hvps = initial
    while True:
        theta, y, residual = space.ritz()
        norms = np.linalg.norm(residual, axis=1)
        bound = estimate_bound(theta, norms)
        error = abs(truth - theta[0]) / abs(truth)
        for exponent in oracle:
            if oracle[exponent] is None and error < 10.0**-exponent:
                oracle[exponent] = hvps
        if stop is None and hvps >= block and bound <= tolerance:
            stop, vectors = (hvps, error, bound), y[:block].copy()
        if (stop is not None and None not in oracle.values()) or hvps >= MAX_HVPS:
            break
        if method == "lanczos":
            space.add(space.hz[-1], rng)  # Krylov: H times the newest basis vector
            hvps += 1
        elif method == "davidson":
            space.add(residual[0], rng)
            hvps += 1
        else:  # block davidson
            for r in residual[:block]:
                space.add(r, rng)
            hvps += block
    if stop is None:
        stop, vectors = (hvps, error, bound), y[:block].copy()
    never = MAX_HVPS + 1
    return Trace(*stop, oracle[4] or never, oracle[5] or never, vectors)


class Method(NamedTuple):
    name: str
    method: str
    block: int
    noise: float
    tolerance: float
    # Start each check from the previous check's reference eigenvectors (the best a warm
    # start could hold), not from the method's own previous Ritz vectors.
    from_reference: bool = False


METHODS = (
    Method("lanczos (current), block 3, tol 1e-5", "lanczos", 3, 1e-2, 1e-5),
    Method("davidson, block 3, noise 1e-2, tol 1e-5", "davidson", 3, 1e-2, 1e-5),
    Method("davidson, block 3, noise 1e-2, tol 1e-4", "davidson", 3, 1e-2, 1e-4),
    Method("davidson, block 3, noise 0, tol 1e-4", "davidson", 3, 0.0, 1e-4),
    Method("davidson, block 5, noise 1e-2, tol 1e-4", "davidson", 5, 1e-2, 1e-4),
    Method("block davidson, block 3, noise 1e-2, tol 1e-4", "block", 3, 1e-2, 1e-4),
    Method("davidson from the previous reference top 6, noise 0, tol 1e-4", "davidson", 6,
           0.0, 1e-4, True),
    Method("lanczos (current), block 3, tol 1e-4", "lanczos", 3, 1e-2, 1e-4),
)


def measure(snapshots, methods) -> dict:
    """Every method chained over the checks: {name: [Trace per check]}."""
    results = {}
    for m in methods:
        rng = np.random.default_rng(0)
        traces, start = [], None
        for i in range(len(snapshots.steps)):
            params = jnp.asarray(snapshots.params[i])

            def product(v, params=params):
                return np.asarray(snapshots.hvp(params, jnp.asarray(v, jnp.float32)), np.float64)

            method = "lanczos" if start is None else m.method
            trace = run_method(product, start, float(snapshots.ref_values[i, 0]),
                               dim=snapshots.params.shape[1], method=method,
                               block=m.block, noise=m.noise, tolerance=m.tolerance, rng=rng)
            traces.append(trace)
            start = snapshots.ref_vectors[i, :m.block] if m.from_reference else trace.vectors
            print(f"{m.name} step {snapshots.steps[i]}: stop {trace.stop_hvps} "
                  f"err {trace.stop_error:.1e} bound {trace.stop_bound:.1e} "
                  f"oracle 1e-4 {trace.oracle_4} 1e-5 {trace.oracle_5}", flush=True)
        results[m.name] = traces
    return results


def summary(results) -> None:
    """One markdown row per method (checks after the first). The error/bound ratio is also
    given over errors >= 1e-6 only: below, the reference itself (float32 products) is about
    as uncertain as the error."""
    print("\n| method | HVPs at its stop: median (min-max) | worst true error |"
          " worst error/bound (errors >= 1e-6) | oracle 1e-4: median (min-max) |"
          " oracle 1e-5: median (min-max) |")
    print("|---|---|---|---|---|---|")
    for name, traces in results.items():
        later = traces[1:]
        stops = np.array([t.stop_hvps for t in later])
        errors = np.array([t.stop_error for t in later])
        ratios = errors / np.array([t.stop_bound for t in later])
        large = ratios[errors >= 1e-6]
        o4 = np.array([t.oracle_4 for t in later])
        o5 = np.array([t.oracle_5 for t in later])
        print(f"| {name} | {np.median(stops):g} ({stops.min()}-{stops.max()}) | "
              f"{errors.max():.1e} | {ratios.max():.2f} "
              f"({large.max() if large.size else float('nan'):.2f}) | {np.median(o4):g} "
              f"({o4.min()}-{o4.max()}) | {np.median(o5):g} ({o5.min()}-{o5.max()}) |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--snapshots", type=pathlib.Path, default=warm_start_snapshots.DEFAULT_OUT)
    parser.add_argument("--methods", default="", help="comma-separated indices into METHODS")
    args = parser.parse_args()
    snapshots = warm_start_snapshots.load(args.snapshots)
    chosen = [METHODS[int(i)] for i in args.methods.split(",")] if args.methods else METHODS
    summary(measure(snapshots, chosen))


if __name__ == "__main__":
    main()
