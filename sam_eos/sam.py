"""Sharpness-Aware Minimization: the perturbed gradient and one SAM step.

`loss_fn(params, batch) -> scalar` everywhere. With `rho = 0` (a Python number) SAM is plain
gradient descent and the second gradient evaluation is skipped at trace time.
"""


import jax
import optax.tree_utils as otu

from sam_eos.types import LossFn, PyTree

# Added to ||g|| before normalising, as in the paper's code, so a zero gradient does not divide
# by zero.
NORMALISATION_EPSILON = 1e-5
VARIANTS = ("sam", "usam")


def is_static_zero(rho) -> bool:
    """True for a Python number equal to 0: a term left out at trace time."""
    return isinstance(rho, (int, float)) and rho == 0


def loss_gradient_and_sam_gradient(
    loss_fn: LossFn, params: PyTree, batch: PyTree, rho: float, variant: str = "sam"
) -> tuple[jax.Array, PyTree, PyTree]:
    """(L(w), g = grad L(w), grad L at the perturbed point): two gradients, shared g.

    The perturbed point is `perturbed_params(w, g, rho, variant)`. With a Python `rho == 0`
    the SAM gradient is `g` itself (one gradient evaluation).
    """
    loss, gradient = jax.value_and_grad(loss_fn)(params, batch)
    if is_static_zero(rho):
        return loss, gradient, gradient
    point = perturbed_params(params, gradient, rho, variant)
    return loss, gradient, jax.grad(loss_fn)(point, batch)


def perturbed_params(params: PyTree, gradient: PyTree, rho: float | jax.Array,
                     variant: str = "sam") -> PyTree:
    """Where SAM takes its gradient: `params + rho * gradient / (||gradient|| + 1e-5)` for
    "sam" (the paper's), `params + rho * gradient` for "usam" (unnormalised SAM)."""
    if variant not in VARIANTS:
        raise ValueError(f"unknown SAM variant {variant!r}; choose one of {VARIANTS}")
    if variant == "usam":
        return otu.tree_add_scale(params, rho, gradient)
    return otu.tree_add_scale(params, rho / (otu.tree_norm(gradient) + NORMALISATION_EPSILON),
                              gradient)


def sam_gradient(loss_fn: LossFn, params: PyTree, batch: PyTree, rho: float,
                 variant: str = "sam") -> PyTree:
    """The SAM gradient: grad L at `perturbed_params(params, g, rho, variant)`, g = grad L
    (for "sam", `params + rho * g / (||g|| + 1e-5)`)."""
    return loss_gradient_and_sam_gradient(loss_fn, params, batch, rho, variant)[2]


def sam_update(
    loss_fn: LossFn, params: PyTree, batch: PyTree, step_size: float, rho: float,
    variant: str = "sam"
) -> PyTree:
    """One SAM step `params - step_size * sam_gradient`; gradient descent when `rho = 0`."""
    return otu.tree_add_scale(params, -step_size,
                              sam_gradient(loss_fn, params, batch, rho, variant))
