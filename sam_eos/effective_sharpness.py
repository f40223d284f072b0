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

from sam_eos.hessian import tree_operator
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


def in_params_structure(tree: PyTree, params: PyTree) -> PyTree:
    """`tree`'s leaves in `params`' structure, matched in leaf order: an optimizer's state can
    hold them in containers of its own (an `nnx.Optimizer`'s `OptVariable`s against the model's
    `Param`s). ValueError unless the leaves' count and shapes match the parameters'."""
    leaves, structure = jax.tree.leaves(tree), jax.tree.structure(params)
    shapes = [jnp.shape(x) for x in leaves]
    expected = [jnp.shape(x) for x in jax.tree.leaves(params)]
    if shapes != expected:
        raise ValueError(f"the preconditioner's leaves (shapes {shapes}) do not match the "
                         f"parameters' (shapes {expected}), in leaf order")
    return jax.tree.unflatten(structure, leaves)


def effective_sharpness_matvec(
    loss_fn: LossFn,
    params: PyTree,
    batch: PyTree,
    *,
    rho_eff: float | jax.Array = 0.0,
    preconditioner: PyTree | None = None,
    hvp_mode: str = "auto",
) -> Callable[[PyTree], PyTree]:
    """matvec: a params-shaped vector v -> P^-1/2 (H + rho_eff H^2) P^-1/2 v, params-shaped,
    in the params' own layout and sharding (`effective_sharpness_operator`'s arguments).
    Trace inside a jit."""
    hessian_matvec = tree_operator(loss_fn, params, batch, hvp_mode)
    scale = None if preconditioner is None else jax.tree.map(
        lambda p, x: jax.lax.rsqrt(jnp.asarray(p, jnp.result_type(x))),
        in_params_structure(preconditioner, params), params)

    def scaled(v: PyTree) -> PyTree:
        return v if scale is None else jax.tree.map(jnp.multiply, scale, v)

    def matvec(v: PyTree) -> PyTree:
        hu = hessian_matvec(scaled(v))
        if not is_static_zero(rho_eff):
            hu = jax.tree.map(lambda a, b: a + rho_eff * b, hu, hessian_matvec(hu))
        return scaled(hu)

    return matvec


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
    Trace inside a jit; the operator is symmetric, so Lanczos applies. The flat form of
    `effective_sharpness_matvec`.
    """
    flat_params, unravel = ravel_pytree(params)
    matvec = effective_sharpness_matvec(loss_fn, params, batch, rho_eff=rho_eff,
                                        preconditioner=preconditioner, hvp_mode=hvp_mode)
    return flat_params, unravel, lambda v: ravel_pytree(matvec(unravel(v)))[0]


def _adam_states(opt_state: PyTree) -> list[tuple[str, optax.ScaleByAdamState]]:
    """Every optax ScaleByAdamState in `opt_state`, with its path (`opt_state...`)."""
    found = jax.tree_util.tree_flatten_with_path(
        opt_state, is_leaf=lambda x: isinstance(x, optax.ScaleByAdamState))[0]
    return [(f"opt_state{jax.tree_util.keystr(path)}", state) for path, state in found
            if isinstance(state, optax.ScaleByAdamState)]


def _is_masked(tree) -> bool:
    return isinstance(tree, optax.MaskedNode)


def _merge_masked(trees: list, names: list[str]):
    """One params-shaped tree from trees that each hold `optax.MaskedNode` where another one
    holds the values (the states of `optax.multi_transform`'s or `optax.masked`'s groups).
    Raises ValueError when two hold the same entry."""
    present = [(tree, name) for tree, name in zip(trees, names, strict=True)
               if not _is_masked(tree)]
    if len(present) <= 1:
        return present[0][0] if present else optax.MaskedNode()
    children = [jax.tree_util.tree_flatten(tree, is_leaf=lambda x, t=tree: x is not t)
                for tree, _ in present]
    treedef = children[0][1]
    if any(len(leaves) == 1 and leaves[0] is tree
           for (tree, _), (leaves, _) in zip(present, children, strict=True)) \
            or any(other != treedef for _, other in children):
        raise ValueError(
            f"the Adam states {', '.join(name for _, name in present)} each precondition the "
            f"same parameters; "
            f"pass the state of the one that preconditions the update, e.g. "
            f"adam_preconditioner({present[0][1]})")
    merged = [_merge_masked(list(group), [name for _, name in present])
              for group in zip(*(leaves for leaves, _ in children), strict=True)]
    return jax.tree_util.tree_unflatten(treedef, merged)


def _one_preconditioner(state: optax.ScaleByAdamState, b2: float, eps: float) -> PyTree:
    count = jnp.asarray(state.count)
    correction = jnp.where(count > 0, 1.0 - b2 ** count.astype(jnp.float32), jnp.nan)
    return jax.tree.map(lambda nu: jnp.sqrt(nu / correction.astype(nu.dtype)) + eps, state.nu)


def adam_preconditioner(opt_state: PyTree, *, b2: float = 0.999, eps: float = 1e-8) -> PyTree:
    """Adam's diagonal preconditioner P = sqrt(v_hat) + eps, read from an optax Adam state.

    `v_hat = nu / (1 - b2^count)` is the bias-corrected second moment that optax's
    `scale_by_adam` divided the last update by (its state holds that step's `nu` and `count`).
    `b2` and `eps` must be the optimizer's own (the state does not record them). Before the
    first step (count 0) Adam has applied no preconditioner: every entry is then nan.
    `opt_state` is any state that holds the Adam state: an `optax.adam` or `optax.adamw`
    chain's, or `nnx.Optimizer`'s `optimizer.opt_state`.

    `optax.multi_transform` (or `optax.masked`) with one Adam per group of parameters holds
    several Adam states, each masked to its group: P is read from each and put together, with
    the same `b2` and `eps` for all. The threshold then needs one learning rate: when the groups
    train with different rates eta_g, the update is eta_g m_hat / P_g, so multiply group g's
    entries of P by eta / eta_g to compare with `stability_threshold("adam", eta)`. A
    parameter that no Adam state preconditions (a group trained by another optimizer), or two
    Adam states over the same parameter (e.g. a chain of two Adams), is refused with a message
    naming the states.
    Returns a params-shaped pytree of positive entries.
    """
    found = _adam_states(opt_state)
    if not found:
        raise ValueError("opt_state holds no optax ScaleByAdamState: pass the state of an "
                         "optax.adam or optax.adamw optimizer (or nnx.Optimizer's opt_state)")
    names = [name for name, _ in found]
    merged = _merge_masked([_one_preconditioner(state, b2, eps) for _, state in found], names)
    uncovered = [jax.tree_util.keystr(path) for path, leaf in jax.tree_util.tree_flatten_with_path(
        merged, is_leaf=_is_masked)[0] if _is_masked(leaf)]
    if uncovered:
        shown = ", ".join(f"params{path}" for path in uncovered[:4])
        raise ValueError(
            f"no Adam state in opt_state ({', '.join(names)}) preconditions {shown}"
            f"{' and more' if len(uncovered) > 4 else ''}: another optimizer (or none) trains "
            f"them, so they are without a preconditioner and no one Adam threshold applies. "
            f"Measure the Hessian without a preconditioner, or track only the Adam-trained "
            f"parameters (a loss over them, the others passed in the batch)")
    return merged
