r"""The curvature an optimizer's stability depends on: P^-1/2 (H + rho_eff H^2) P^-1/2.

`sam_eos.edge` explains the composition: a SAM perturbation of effective radius rho_eff makes
the linearised update see H + rho_eff H^2, and a diagonal preconditioner P (Adam's
sqrt(v_hat) + eps) makes it see that operator in P's metric. Its top eigenvalue, the *effective
sharpness*, is at the edge of stability when it equals the optimizer's `stability_threshold`:

    optimizer  variant  operator                          edge
    sgd        none     H                                 2 / eta
    momentum   sam      H + (rho / ||g||) H^2             (2 + 2 beta) / eta
    adam       usam     P^-1/2 (H + rho H^2) P^-1/2       (2 + 2 b1) / ((1 - b1) eta)

Each product costs one Hessian-vector product, two when rho_eff is not a static 0.
"""

from collections.abc import Callable

import jax
import jax.numpy as jnp
import optax
from jax.flatten_util import ravel_pytree

from sam_eos.hessian import hessian_operator
from sam_eos.sam import is_static_zero
from sam_eos.types import LossFn, Matvec, PyTree

SAM_VARIANTS = ("none", "sam", "usam")


def effective_radius(variant: str, rho: float | jax.Array, grad_norm: float | jax.Array):
    """rho_eff of a SAM variant: rho / ||g|| for "sam", rho for "usam", 0 for "none".

    For "sam", ||g|| = 0 gives +inf when rho > 0 (the edge is then 0) and 0 when rho = 0.
    Returns a Python 0.0 for "none" (so the operator skips the H^2 term at trace time).
    """
    if variant not in SAM_VARIANTS:
        raise ValueError(f"unknown SAM variant {variant!r}; choose one of {SAM_VARIANTS}")
    if variant == "none" or is_static_zero(rho):
        return 0.0
    if variant == "usam":
        return rho
    grad_norm = jnp.asarray(grad_norm)
    positive = grad_norm > 0
    return jnp.where(positive, rho / jnp.where(positive, grad_norm, 1.0),
                     jnp.where(jnp.asarray(rho) > 0, jnp.inf, 0.0))


def products_per_matvec(rho_eff) -> int:
    """Hessian-vector products one effective-sharpness product costs (1, or 2 with H^2)."""
    return 1 if rho_eff is None or is_static_zero(rho_eff) else 2


def effective_sharpness_operator(
    loss_fn: LossFn,
    params: PyTree,
    batch: PyTree,
    *,
    rho_eff: float | jax.Array = 0.0,
    preconditioner: PyTree | None = None,
    hvp_mode: str = "auto",
) -> tuple[jax.Array, Callable[[jax.Array], PyTree], Matvec]:
    """`(flat_params [n], unravel, matvec)`: matvec v -> P^-1/2 (H + rho_eff H^2) P^-1/2 v.

    Args:
      loss_fn, params, batch: H is the Hessian of `loss_fn(params, batch)` in `params`.
      rho_eff: the perturbation's effective radius (`effective_radius`); a Python 0 leaves
        out the H^2 term at trace time (one HVP per product instead of two).
      preconditioner: None (P = I) or a params-shaped pytree of positive diagonal entries
        (e.g. `adam_preconditioner`).
      hvp_mode: as `sam_eos.hessian.hessian_operator`.
    Trace inside a jit; the operator is symmetric, so Lanczos applies.
    """
    flat_params, unravel, hessian_matvec = hessian_operator(loss_fn, params, batch, hvp_mode)
    if preconditioner is None:
        scale = None
    else:
        flat_p = ravel_pytree(preconditioner)[0].astype(flat_params.dtype)
        scale = jax.lax.rsqrt(flat_p)

    def matvec(v: jax.Array) -> jax.Array:
        u = v if scale is None else scale * v
        hu = hessian_matvec(u)
        if not is_static_zero(rho_eff):
            hu = hu + rho_eff * hessian_matvec(hu)
        return hu if scale is None else scale * hu

    return flat_params, unravel, matvec


def _adam_state(opt_state: PyTree) -> optax.ScaleByAdamState:
    found = [s for s in jax.tree.leaves(
        opt_state, is_leaf=lambda x: isinstance(x, optax.ScaleByAdamState))
        if isinstance(s, optax.ScaleByAdamState)]
    if len(found) != 1:
        raise ValueError(f"expected one optax ScaleByAdamState in the optimizer state, found "
                         f"{len(found)}")
    return found[0]


def adam_preconditioner(opt_state: PyTree, *, b2: float = 0.999, eps: float = 1e-8) -> PyTree:
    """Adam's diagonal preconditioner P = sqrt(v_hat) + eps, read from an optax Adam state.

    `v_hat = nu / (1 - b2^count)` is the bias-corrected second moment that optax's
    `scale_by_adam` divided the last update by (its state holds that step's `nu` and `count`).
    `b2` and `eps` must be the optimizer's own (the state does not record them). Before the
    first step (count 0) Adam has applied no preconditioner: every entry is then nan.
    Returns a params-shaped pytree of positive entries.
    """
    state = _adam_state(opt_state)
    count = jnp.asarray(state.count)
    correction = jnp.where(count > 0, 1.0 - b2 ** count.astype(jnp.float32), jnp.nan)
    return jax.tree.map(lambda nu: jnp.sqrt(nu / correction.astype(nu.dtype)) + eps, state.nu)
