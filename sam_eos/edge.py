r"""Edges of stability: each optimizer's threshold, and the SAM and USAM edges built on one.

Linearise an optimizer on a quadratic with curvature lambda along one direction. It is stable
while lambda stays below a threshold T (`stability_threshold`):

    optimizer  update (optax)                                  threshold T
    sgd        w -= eta g                                      2 / eta
    momentum   t = g + beta t;  w -= eta t                     (2 + 2 beta) / eta
    nesterov   t = g + beta t;  w -= eta (g + beta t)          (2 + 2 beta) / ((1 + 2 beta) eta)
    adam       w -= eta m_hat / (sqrt(v_hat) + eps)            (2 + 2 b1) / ((1 - b1) eta)

For Adam, T bounds the *preconditioned* sharpness lambda_max(P^-1 H) with the preconditioner
P = diag(sqrt(v_hat) + eps) held fixed (Cohen et al. 2022, "Adaptive gradient methods at the
edge of stability": 38 / eta at b1 = 0.9). The momentum threshold is Cohen et al. 2021's
(appendix); the Nesterov one is derived below for optax's formulation.

A SAM perturbation changes the curvature that counts. With the gradient taken at
w + rho_eff g, the linearised update sees H + rho_eff H^2, so the edge in lambda is the root of

    lambda + rho_eff lambda^2 = T,

with rho_eff = rho / ||g|| for SAM (`sam_edge`; the paper's SAM edge when T = 2 / eta) and
rho_eff = rho for unnormalised SAM (`usam_edge`; eta lambda (1 + rho lambda) = 2, Agarwala and
Dauphin 2023, at T = 2 / eta). With T from momentum or Adam these compositions are this
package's linearisation, not a published result.

Derivation of the Nesterov threshold. optax's `sgd(eta, momentum=beta, nesterov=True)` keeps
t' = g + beta t and steps w' = w - eta (g + beta t'). With g = lambda w and a = eta lambda the
state (w, t) evolves by

    w' = (1 - a (1 + beta)) w - eta beta^2 t,      t' = lambda w + beta t,

whose characteristic polynomial is z^2 - (1 + beta - a (1 + beta)) z + beta (1 - a). Both roots
lie in the unit disc while p(1) = a > 0, |beta (1 - a)| < 1 and p(-1) = 2 + 2 beta -
a (1 + 2 beta) > 0; for 0 <= beta < 1 the last binds first, so a < (2 + 2 beta) / (1 + 2 beta).
The same steps give heavy ball's p(-1) = 2 + 2 beta - a, and Adam's (momentum on the
preconditioned gradient, a = eta lambda / P) p(-1) = 2 + 2 b1 - (1 - b1) a.
"""

import jax
import jax.numpy as jnp
import numpy as np

OPTIMIZERS = ("sgd", "momentum", "nesterov", "adam")
# The hyperparameters each optimizer's threshold depends on (others are errors).
THRESHOLD_HYPERPARAMETERS = {"sgd": (), "momentum": ("momentum",), "nesterov": ("momentum",),
                             "adam": ("b1",)}


def stability_threshold(optimizer: str, step_size: float, **hyperparameters: float) -> float:
    """The largest stable curvature T of `optimizer` with step size eta (see the module's table).

    Args:
      optimizer: "sgd", "momentum" (heavy ball), "nesterov" (optax's formulation) or "adam".
      step_size: eta > 0.
      **hyperparameters: `momentum=beta` in [0, 1) for "momentum" and "nesterov" (required);
        `b1` in [0, 1) for "adam" (default 0.9). Any other is a ValueError.
    Returns:
      T in units of curvature (1 / step-size units): for "adam" a bound on the preconditioned
      sharpness lambda_max(P^-1 H), for the others on lambda_max(H).
    """
    if optimizer not in OPTIMIZERS:
        raise ValueError(f"unknown optimizer {optimizer!r}; choose one of {OPTIMIZERS}")
    allowed = THRESHOLD_HYPERPARAMETERS[optimizer]
    unknown = sorted(set(hyperparameters) - set(allowed))
    if unknown:
        raise ValueError(f"{optimizer}'s threshold takes {allowed or 'no hyperparameters'}, "
                         f"not {unknown}")
    if not step_size > 0:
        raise ValueError(f"step_size must be positive, not {step_size}")
    if optimizer == "sgd":
        return 2.0 / step_size
    if optimizer == "adam":
        b1 = _fraction("b1", hyperparameters.get("b1", 0.9))
        return (2.0 + 2.0 * b1) / ((1.0 - b1) * step_size)
    if "momentum" not in hyperparameters:
        raise ValueError(f"{optimizer}'s threshold needs momentum=")
    beta = _fraction("momentum", hyperparameters["momentum"])
    if optimizer == "momentum":
        return (2.0 + 2.0 * beta) / step_size
    return (2.0 + 2.0 * beta) / ((1.0 + 2.0 * beta) * step_size)


def _fraction(name: str, value: float) -> float:
    if not 0.0 <= value < 1.0:
        raise ValueError(f"{name} must be in [0, 1), not {value}")
    return float(value)


def _module(*values):
    """jax.numpy when any value is traced (under jit), else numpy in float64 (concrete jax
    arrays too); None values stay None."""
    if any(isinstance(x, jax.core.Tracer) for x in values):
        return jnp, [None if x is None else jnp.asarray(x) for x in values]
    return np, [None if x is None else np.asarray(x, np.float64) for x in values]


def _quadratic_edge(xp, threshold, rho_eff):
    """The lambda >= 0 with lambda + rho_eff lambda^2 = threshold, as 2T / (1 + sqrt(1 + 4
    rho_eff T)): exact at rho_eff = 0, no cancellation for small rho_eff, 0 at rho_eff = inf."""
    return 2.0 * threshold / (1.0 + xp.sqrt(1.0 + 4.0 * rho_eff * threshold))


def sam_edge(grad_norm, step_size, rho, threshold=None):
    """The sharpness at which SAM is at the edge of stability: lambda + (rho / ||g||) lambda^2 = T.

    With `threshold=None`, T = 2 / eta and this is the paper's SAM edge (Long and Bartlett,
    2024, Theorem 2), `(||g|| / (2 rho)) (sqrt(1 + 8 rho / (eta ||g||)) - 1)`, computed as

        (4 / eta) / (1 + sqrt(1 + 8 rho / (eta ||g||))),

    which is exact at `rho = 0` (2 / eta, whatever ||g||), has no cancellation for tiny rho or
    huge ||g||, lies below T for rho > 0 and is 0 at ||g|| = 0 without dividing by zero.

    Args:
      grad_norm: ||g||, the norm of the full-batch (or minibatch) gradient, >= 0.
      step_size: eta > 0 (only used when `threshold` is None).
      rho: the SAM radius, >= 0.
      threshold: the base optimizer's T (`stability_threshold`, in curvature units); None:
        2 / eta, plain gradient descent.
    Returns:
      The edge in the units of `threshold`, broadcast over the inputs: a numpy float64 value
      (array) for any concrete inputs, jax arrays included; a jax array only when traced
      (under jit), where float64 is not available. With an Adam threshold
      T bounds the preconditioned sharpness, so the edge is in P^-1 H units: compare it with
      the top eigenvalue of `effective_sharpness_operator(..., preconditioner=P)`, never with
      the raw Hessian's lambda_max (whose units differ by the preconditioner's scale).
    """
    xp, (grad_norm, step_size, rho, threshold) = _module(grad_norm, step_size, rho, threshold)
    threshold = 2.0 / step_size if threshold is None else threshold
    positive = grad_norm > 0
    safe = xp.where(positive, grad_norm, 1.0)
    # rho_eff = rho / ||g||: +inf at ||g|| = 0 for rho > 0 (edge 0), 0 for rho = 0.
    rho_eff = xp.where(positive, rho / safe, xp.where(rho > 0, xp.inf, 0.0))
    return _quadratic_edge(xp, threshold, rho_eff)


def usam_edge(step_size, rho, threshold=None):
    """The sharpness at which unnormalised SAM, w - eta grad L(w + rho grad L(w)), is at the edge
    of stability: lambda + rho lambda^2 = T (eta lambda (1 + rho lambda) = 2 for T = 2 / eta).

    Args:
      step_size: eta > 0 (only used when `threshold` is None).
      rho: the USAM radius, >= 0 (multiplies the gradient itself, not its direction).
      threshold: the base optimizer's T; None: 2 / eta.
    Returns:
      The edge in curvature units, as `sam_edge`'s: numpy float64, a jax array when traced.
    """
    xp, (step_size, rho, threshold) = _module(step_size, rho, threshold)
    threshold = 2.0 / step_size if threshold is None else threshold
    return _quadratic_edge(xp, threshold, rho)
