"""The compiled parts of the loop: several SAM steps in one dispatch, and one Hessian check.

A check is two compiled functions: the eigensolver in bounded chunks (`make_eigensolver_chunk`,
warm or cold from one executable; the loop reads its stop flag between chunks), then the rest
of the measurement along the principal direction found (`make_measure`).

All are pure, jit-compiled functions of their arguments (parameters, data, a traced step
count), compiled ahead of time once per run (`compile_ahead`) before the training clock starts:
nothing run-varying is a shape, so no later call compiles again.
"""

import functools
import time
from collections.abc import Callable

import jax
import jax.numpy as jnp
import optax
import optax.tree_utils as otu
from absl import logging
from jax.flatten_util import ravel_pytree

from sam_eos import convolutions, eigensolver, power_iteration, tree
from sam_eos.edge import sam_edge, usam_edge
from sam_eos.effective_sharpness import adam_preconditioner, effective_radius
from sam_eos.loop.feed import Select
from sam_eos.sam import loss_gradient_and_sam_gradient
from sam_eos.types import LossFn


def make_train_steps(loss_fn: LossFn, optimizer: optax.GradientTransformation, rho: float,
                     select: Select, variant: str = "sam"):
    """A jitted `(params, opt_state, arrays, start, num_steps) -> (taken, params, opt_state,
    loss, finite)` running up to `num_steps` SAM steps in one `lax.while_loop`.

    Step j uses the batch `select(arrays, start + j)` (`sam_eos.loop.feed`); `start` and
    `num_steps` are int32 scalars, traced, so any count reuses one compiled program. The loop
    stops early, without updating, at the first step whose loss or gradient is not finite;
    `loss` is the loss at the last step it evaluated. `variant`: "sam" or "usam"
    (`sam_eos.sam.perturbed_params`).
    """

    # Inside the while loop, on the CPU, the convolutions in XLA's canonical layout, as a
    # standalone step's are (`sam_eos.convolutions`).
    @convolutions.for_backend
    def gradients(params, batch):
        return loss_gradient_and_sam_gradient(loss_fn, params, batch, rho, variant)

    @jax.jit
    def train_steps(params, opt_state, arrays, start, num_steps):
        def body(carry):
            i, params, opt_state, _, _ = carry
            batch = select(arrays, start + i)
            loss, _, sam_grad = gradients(params, batch)
            finite = jnp.isfinite(loss) & jnp.isfinite(otu.tree_norm(sam_grad))
            updates, new_opt_state = optimizer.update(sam_grad, opt_state, params)
            new_params = optax.apply_updates(params, updates)
            keep = lambda new, old: jax.tree.map(  # noqa: E731
                lambda a, b: jnp.where(finite, a, b), new, old
            )
            return (
                i + jnp.where(finite, 1, 0),
                keep(new_params, params),
                keep(new_opt_state, opt_state),
                loss.astype(jnp.float32),
                finite,
            )

        def cond(carry):
            i, _, _, _, finite = carry
            return (i < num_steps) & finite

        begin = (jnp.int32(0), params, opt_state, jnp.float32(0), jnp.bool_(True))
        return jax.lax.while_loop(cond, body, begin)

    return train_steps


# Lanczos products per compiled chunk of a check: the loop reads its stop flag between chunks,
# so a check on a slow model stays interruptible (a chunk of 50 products is seconds on a CPU for
# the MNIST MLPs). Each chunk restarts from the previous one's Ritz vectors and loses the rest of
# its Krylov space, so chunks hold more than a typical check: on the demo's SAM run (README) the
# check at step 300 took 71 products in chunks of 25 (32 at most), 36 in chunks of 50 or in one.
CHUNK_PRODUCTS = 50


def chunk_plan(eigensolver: str, budget: int) -> tuple[int, int]:
    """`(products per chunk, chunks at most)` for one check: equal chunks of at most
    CHUNK_PRODUCTS products, together within `budget` (`TrainConfig.solver_budget`). Power
    iteration runs in one chunk (its loop is one call, bounded by its iterations)."""
    if eigensolver == "power":
        return budget, 1
    chunks = -(-budget // CHUNK_PRODUCTS)
    return budget // chunks, chunks


def make_eigensolver_chunk(loss_fn: LossFn, *, k: int, method: str, num_matvecs: int,
                           tolerance: float, basis_size: int | None = None,
                           out_sharding: jax.sharding.Sharding | None = None):
    """A jitted `(params, batch, key, step, chunk, start_vectors, start_noise, noise_floor) ->
    EigenInfo` running one chunk of a check's eigensolver (`method` "lanczos":
    `sam_eos.eigensolver.update`; "power": the original's `power_iteration`, read as an
    `EigenInfo`), at most `num_matvecs` products.

    `start_vectors` float [block, n] (flat parameters): the previous check's or chunk's Ritz
    vectors, zeros for a cold start (one executable for both); `start_noise`: the random
    component's weight (0 to continue a chunked solve); `noise_floor`: the products' relative
    error (`hessian.product_noise_floor`). The random start comes from `fold_in(fold_in(key,
    step), chunk)`. `basis_size`: the Lanczos basis' vectors (None: the default). The result,
    this chunk's, is placed by `out_sharding` if given (on a mesh: replicated, as the start
    vectors).
    """

    @functools.partial(jax.jit, out_shardings=out_sharding)
    def eigensolver_chunk(params, batch, key, step, chunk, start_vectors, start_noise,
                          noise_floor):
        key = jax.random.fold_in(jax.random.fold_in(key, step), chunk)
        if method == "power":
            found = power_iteration.power_iteration(loss_fn, params, batch, key, tolerance, k=k,
                                                    num_matvecs=num_matvecs)
            return power_iteration.eigen_info(found, start_vectors)
        info, _ = eigensolver.update(
            loss_fn, params, batch, key, eigensolver.SolverState(start_vectors), k=k,
            num_matvecs=num_matvecs, tolerance=tolerance, noise_floor=noise_floor,
            start_noise=start_noise, basis_size=basis_size)
        return info

    return eigensolver_chunk


def make_measure(loss_fn: LossFn, *, rho: float, step_size: float, variant: str = "sam",
                 optimizer: str = "sgd", threshold: float | None = None):
    """A jitted `(params, batch, ritz_vectors) -> dict of scalars`: the loss, ||g||, the SAM
    edge and the alignments of the plain and SAM gradients with the principal direction,
    `ritz_vectors[0]` (flat [n], the eigensolver's top Ritz vector).

    With the base optimizer's `threshold` T (any run but plain SGD with the paper's SAM) it
    also returns `stability_threshold` and `rho_eff` (`sam_eos.effective_radius`), and the SAM
    edge is the composed one, lambda + rho_eff lambda^2 = T, in curvature units; nan for Adam,
    whose threshold bounds the preconditioned curvature instead."""

    def edge(grad_norm):
        if threshold is None:
            return sam_edge(grad_norm, jnp.float32(step_size), rho)
        if optimizer == "adam":
            return jnp.float32(jnp.nan)
        if variant == "usam":
            return jnp.float32(usam_edge(step_size, rho, threshold=threshold))
        return sam_edge(grad_norm, jnp.float32(step_size), rho, threshold=jnp.float32(threshold))

    @jax.jit
    def measure(params, batch, ritz_vectors):
        loss, gradient, sam_grad = loss_gradient_and_sam_gradient(loss_fn, params, batch, rho,
                                                                  variant)
        flat_params, unravel = ravel_pytree(params)
        direction = unravel(ritz_vectors[0].astype(flat_params.dtype))
        grad_norm = otu.tree_norm(gradient)
        measured = {
            "loss": loss,
            "grad_norm": grad_norm,
            "sam_edge": edge(grad_norm),
            "g_alignment": tree.alignment(gradient, direction),
            "sg_alignment": tree.alignment(sam_grad, direction),
        }
        if threshold is not None:
            measured["stability_threshold"] = jnp.float32(threshold)
            measured["rho_eff"] = jnp.asarray(
                effective_radius("usam" if variant == "usam" else "sam", rho, grad_norm),
                jnp.float32)
        return measured

    return measure


def make_effective_sharpness(loss_fn: LossFn, *, b2: float, eps: float, num_matvecs: int,
                             tolerance: float, perturbed: bool, basis_size: int | None = None,
                             out_sharding: jax.sharding.Sharding | None = None):
    """A jitted `(params, opt_state, batch, key, step, start_vectors, rho_eff, noise_floor) ->
    EigenInfo`: Adam's effective sharpness, the top eigenvalue of P^-1/2 (H + rho_eff H^2)
    P^-1/2 with P read from `opt_state` (`sam_eos.adam_preconditioner`), by
    `sam_eos.eigensolver.update` warm-started from `start_vectors` [block, n]. Without a
    perturbation (`perturbed` false, rho = 0) `rho_eff` is ignored and each product is one HVP
    instead of two. `basis_size`: the Lanczos basis' vectors (None: the default)."""

    @functools.partial(jax.jit, out_shardings=out_sharding)
    def effective(params, opt_state, batch, key, step, start_vectors, rho_eff, noise_floor):
        info, _ = eigensolver.update(
            loss_fn, params, batch, jax.random.fold_in(key, step),
            eigensolver.SolverState(start_vectors), num_matvecs=num_matvecs,
            tolerance=tolerance, noise_floor=noise_floor,
            rho_eff=rho_eff if perturbed else 0.0,
            preconditioner=adam_preconditioner(opt_state, b2=b2, eps=eps),
            basis_size=basis_size)
        return info

    return effective


def make_batch_at(select: Select):
    """A jitted `(arrays, row) -> batch`: the batch a check measures (the next step's)."""
    return jax.jit(select)


def compile_ahead(name: str, function, *args) -> Callable:
    """`function` (jitted) compiled for `args` now (`jit(...).lower(...).compile()`), with one
    log line giving the compile's duration in seconds. Later calls must match `args`' shapes,
    dtypes and placement; they never compile again."""
    started = time.perf_counter()
    compiled = function.lower(*args).compile()
    logging.info("Compiled %s in %.2f s.", name, time.perf_counter() - started)
    return compiled


def failing(error: BaseException) -> Callable:
    """A stand-in for a function that could not be compiled: every call raises `error`."""
    def fail(*args):
        del args
        raise error
    return fail
