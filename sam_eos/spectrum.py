"""Curvature beyond the top eigenvalue: Hessian trace, spectral density, batch sharpness and
sharpness at the SAM point.

Every measurement is a pure function of `(loss_fn, params, batch...)`, jit-compiled once per
shape (static: `loss_fn` and integer sizes), on the exact Hessian-vector products of
`sam_eos.hessian.hessian_operator`.

What comes from matfree (0.6.3) and what is ours, and why:

- Trace: matfree's stochastic trace estimators (`matfree.stochtrace`). The default is XTrace
  (Epperly, Tropp and Webber, 2024), the exchangeable successor of Hutch++: half of the products
  build a low-rank approximation, the other half estimate the rest, and every probe is used for
  both, with a leave-one-out standard error. On the test MLP's Hessian (1,013 parameters)
  XTrace's standard error at 200 products is a quarter of Hutchinson's, whose cost for 2 %
  would be thousands of products. Hutchinson with Rademacher probes (PyHessian's estimator, its
  textbook standard error) is `method="hutchinson"`. matfree takes flat vectors or pytrees;
  we hand it our flat matvec, so the products are ours.
- Spectral density: our own Lanczos (`sam_eos.lanczos.tridiagonal`, the cycle that
  `top_eigenvalues` runs, with no stopping test), not matfree's `tridiag_sym`. One Lanczos in
  the project, and ours has a breakdown test: when the
  Krylov space becomes invariant it continues from an orthogonal random direction, where
  matfree's `tridiag_sym` divides by the residual norm (an exact breakdown, e.g. a probe that is
  an eigenvector, gives nan there; tests/test_spectrum.py has that case). Gauss quadrature
  nodes and weights are the eigenvalues of T and the squared first components of its
  eigenvectors (Golub and Meurant): ours, a few lines.
- Batch sharpness and SAM-point sharpness: matfree has nothing for them; they are one product
  per batch and one `top_eigenvalues` call.

Memory: the trace holds about 4 x num_matvecs / 2 flat vectors (XTrace's probes, their products
and a QR basis; Hutchinson: 2 x num_matvecs) and runs each half's products as one vmapped
batch; the density holds one Lanczos basis, (num_matvecs + 1) x num_params numbers, probes
running one after another.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax.tree_utils as otu
from matfree import stochtrace

from sam_eos import eigensolver, hessian, lanczos, sam, trainable
from sam_eos.lanczos import EigenInfo
from sam_eos.types import LossFn, PyTree

TRACE_METHODS = ("xtrace", "hutchinson")
# The Monte-Carlo rule for batch sharpness: stop once the standard error of the mean is at
# most this fraction of |mean| (and at least MIN_BATCHES values are in), or at the cap.
BATCH_SHARPNESS_RELATIVE_ERROR = 0.01
MIN_BATCHES = 2


# ---------------------------------------------------------------------------------------------
# Trace


def trace_probes(num_matvecs: int, method: str = "xtrace") -> int:
    """Probe vectors a trace estimate of `num_matvecs` products uses (XTrace: two products each)."""
    if method not in TRACE_METHODS:
        raise ValueError(f"unknown trace method {method!r}; choose one of {TRACE_METHODS}")
    probes = num_matvecs // 2 if method == "xtrace" else num_matvecs
    if probes < 2:
        raise ValueError(
            f"{method} needs at least 2 probes; num_matvecs={num_matvecs} gives {probes}"
        )
    return probes


@functools.partial(jax.jit, static_argnames=("loss_fn", "num_matvecs", "method", "hvp_mode"))
def hessian_trace(
    loss_fn: LossFn,
    params: PyTree,
    batch: PyTree,
    key: jax.Array,
    num_matvecs: int,
    method: str = "xtrace",
    hvp_mode: str = "auto",
) -> tuple[jax.Array, jax.Array]:
    """`(estimate, standard_error)` of tr H (float scalars) from `num_matvecs` exact products.

    method: "xtrace" (default; `num_matvecs // 2` unit-sphere probes scaled to norm sqrt(n),
    two products each, leave-one-out standard error) or "hutchinson" (`num_matvecs`
    Rademacher probes, standard error std / sqrt(num_matvecs)). XTrace needs
    `num_matvecs < num_params` or it forms the whole Hessian (matfree does so when the
    probes are half the dimension or more: exact, at num_params products).
    """
    trainable.check_params(params)  # at trace time
    flat_params, _, matvec = hessian.hessian_operator(
        loss_fn, params, batch, hessian.resolve_hvp_mode(hvp_mode)
    )
    probes = trace_probes(num_matvecs, method)
    if method == "xtrace":
        sampler = stochtrace.sampler_sphere(flat_params, num=probes)
        estimate = stochtrace.estimator_leave_one_out_mean_and_sem(
            stochtrace.leave_one_out_xtrace(), sampler
        )
    else:
        sampler = stochtrace.sampler_signs(flat_params, num=probes)
        estimate = stochtrace.estimator_monte_carlo_mean_and_sem(
            stochtrace.monte_carlo_trace(), sampler
        )
    return estimate(matvec, key)


# ---------------------------------------------------------------------------------------------
# Spectral density (stochastic Lanczos quadrature)


def gauss_quadrature(alpha: jax.Array, beta: jax.Array) -> tuple[jax.Array, jax.Array]:
    """`(nodes [m], weights [m])` of the Lanczos tridiagonal T (diagonal alpha [m], off-diagonal
    beta [m-1]): T's eigenvalues and the squared first components of its unit eigenvectors,
    which sum to 1."""
    t = jnp.diag(alpha) + jnp.diag(beta, 1) + jnp.diag(beta, -1)
    nodes, vectors = jnp.linalg.eigh(t)
    return nodes, vectors[0] ** 2


@functools.partial(
    jax.jit, static_argnames=("loss_fn", "num_probes", "num_matvecs", "hvp_mode")
)
def spectral_density(
    loss_fn: LossFn,
    params: PyTree,
    batch: PyTree,
    key: jax.Array,
    num_probes: int,
    num_matvecs: int,
    hvp_mode: str = "auto",
) -> tuple[jax.Array, jax.Array]:
    """`(nodes, weights)`, each float [num_probes, num_matvecs]: stochastic Lanczos quadrature.

    Probe p is a Rademacher vector; its row holds the Gauss quadrature of the spectral measure
    of H seen from it (weights sum to 1), so the mean over probes of sum(weights * f(nodes))
    estimates tr f(H) / num_params. `density_on_grid` smooths them. Costs
    num_probes x num_matvecs products (num_matvecs <= num_params).
    """
    trainable.check_params(params)  # at trace time
    flat_params, _, matvec = hessian.hessian_operator(
        loss_fn, params, batch, hessian.resolve_hvp_mode(hvp_mode)
    )
    n = flat_params.size

    def one_probe(probe_key):
        sign_key, lanczos_key = jax.random.split(probe_key)
        probe = jax.random.rademacher(sign_key, (n,), flat_params.dtype) / jnp.sqrt(n)
        alpha, beta = lanczos.tridiagonal(matvec, probe, lanczos_key, steps=num_matvecs)
        return gauss_quadrature(alpha, beta)

    return jax.lax.map(one_probe, jax.random.split(key, num_probes))


def density_on_grid(
    nodes: jax.Array, weights: jax.Array, grid: jax.Array, width: float | jax.Array
) -> jax.Array:
    """float [len(grid)]: the spectral density smoothed by a Gaussian of standard deviation
    `width`, the mean over probes of sum_k weights[p, k] N(grid; nodes[p, k], width^2).

    Integrates to 1 over a grid that covers the nodes by a few widths.
    """
    offsets = (grid[None, None, :] - nodes[..., None]) / width
    kernels = jnp.exp(-0.5 * offsets**2) / (width * jnp.sqrt(2 * jnp.pi))
    return jnp.mean(jnp.sum(weights[..., None] * kernels, axis=1), axis=0)


# ---------------------------------------------------------------------------------------------
# Batch sharpness


def gradient_curvature(loss_fn: LossFn, params: PyTree, batch: PyTree) -> jax.Array:
    """g^T H g / ||g||^2 of one batch (g its gradient, H its Hessian): one gradient, one product
    (nan for a zero gradient)."""
    gradient_fn = lambda p: jax.grad(loss_fn)(p, batch)  # noqa: E731
    gradient, curvature = jax.jvp(gradient_fn, (params,), (gradient_fn(params),))
    return otu.tree_vdot(gradient, curvature) / otu.tree_vdot(gradient, gradient)


@functools.partial(jax.jit, static_argnames=("loss_fn",))
def batch_sharpness_samples(loss_fn: LossFn, params: PyTree, batches: PyTree) -> jax.Array:
    """float [B]: g_b^T H_b g_b / ||g_b||^2 for each batch b stacked along the leading axis of
    every leaf of `batches` (one gradient and one product each, one batch at a time)."""
    return jax.lax.map(lambda batch: gradient_curvature(loss_fn, params, batch), batches)


@functools.partial(jax.jit, static_argnames=("loss_fn",))
def batch_sharpness(loss_fn: LossFn, params: PyTree, batches: PyTree) -> jax.Array:
    """Batch sharpness (Andreyev and Beneventano, 2024): the mean over the B stacked batches of
    g_B^T H_B g_B / ||g_B||^2 (float scalar); B products."""
    return jnp.mean(batch_sharpness_samples(loss_fn, params, batches))


def mean_and_standard_error(samples: np.ndarray | jax.Array) -> tuple[float, float]:
    """`(mean, standard error of the mean)` of samples [m] (host side; error inf for m < 2)."""
    samples = np.asarray(samples, np.float64)
    if samples.size < 2:
        return float(np.mean(samples)) if samples.size else float("nan"), float("inf")
    return float(np.mean(samples)), float(np.std(samples, ddof=1) / np.sqrt(samples.size))


def enough_batches(
    samples: np.ndarray | jax.Array,
    max_batches: int,
    relative_error: float = BATCH_SHARPNESS_RELATIVE_ERROR,
) -> bool:
    """The Monte-Carlo stopping rule (host side, between chunks of `batch_sharpness_samples`):
    stop at `max_batches` values, or once at least MIN_BATCHES are in and the standard error of
    their mean is at most `relative_error` x |mean|. A nan value (a diverged run) stops too."""
    samples = np.asarray(samples)
    if samples.size >= max_batches or np.any(np.isnan(samples)):
        return True
    if samples.size < MIN_BATCHES:
        return False
    mean, standard_error = mean_and_standard_error(samples)
    return standard_error <= relative_error * abs(mean)


# ---------------------------------------------------------------------------------------------
# Sharpness at the SAM point


@functools.partial(jax.jit, static_argnames=("loss_fn", "variant"))
def sam_point(loss_fn: LossFn, params: PyTree, batch: PyTree, rho: float | jax.Array,
              variant: str = "sam") -> PyTree:
    """The point where SAM takes its gradient: w + rho g / (||g|| + 1e-5) ("sam") or
    w + rho g ("usam"), g = grad L(w)."""
    return sam.perturbed_params(params, jax.grad(loss_fn)(params, batch), rho, variant)


def sam_point_sharpness(
    loss_fn: LossFn, params: PyTree, batch: PyTree, key: jax.Array, rho: float | jax.Array,
    variant: str = "sam", **solver_options
) -> tuple[jax.Array, EigenInfo]:
    """The top Hessian eigenvalue at the SAM point `sam_point(...)`: `(value, EigenInfo)`.

    `solver_options` go to `sam_eos.top_eigenvalues` (k is 1; e.g. tolerance,
    num_matvecs, start_vectors for a warm start). Costs one gradient plus the solver's
    products. `loss_fn` is static: pass the same function object on every call.
    """
    point = sam_point(loss_fn, params, batch, rho, variant)
    eigenvalues, _, info = eigensolver.top_eigenvalues(loss_fn, point, batch, key, 1,
                                                       **solver_options)
    return eigenvalues[0], info
