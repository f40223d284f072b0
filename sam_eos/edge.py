"""The SAM edge of stability (Long and Bartlett, 2024, Theorem 2)."""

import jax
import jax.numpy as jnp
import numpy as np


def sam_edge(grad_norm, step_size, rho):
    """The sharpness at which SAM with step size eta and radius rho is at the edge of stability.

    The paper writes it `(||g|| / (2 rho)) * (sqrt(1 + 8 rho / (eta ||g||)) - 1)`. With
    `t = 8 rho / (eta ||g||)`, `sqrt(1 + t) - 1 = t / (sqrt(1 + t) + 1)`, so it equals

        (4 / eta) / (1 + sqrt(1 + t)),

    which is exact at `rho = 0` (`2 / eta`, whatever `||g||`), has no cancellation for tiny
    `rho` or huge `||g||`, lies below `2 / eta` for `rho > 0`, and tends to 0 as `||g|| -> 0`
    (exactly 0 at `||g|| = 0`, `rho > 0`) without dividing by zero.

    Args:
      grad_norm: ||g||, the norm of the full-batch (or minibatch) gradient, >= 0.
      step_size: eta > 0.
      rho: the SAM radius, >= 0.
    Returns:
      The SAM edge, broadcast over the inputs: a jax array when any input is one (so it can be
      used under jit), otherwise a numpy float64 value.
    """
    use_jax = any(isinstance(x, jax.Array) for x in (grad_norm, step_size, rho))
    xp = jnp if use_jax else np
    grad_norm, step_size, rho = (xp.asarray(x) for x in (grad_norm, step_size, rho))
    if not use_jax:
        grad_norm, step_size, rho = (x.astype(np.float64) for x in (grad_norm, step_size, rho))
    scaled_grad = step_size * grad_norm
    positive = scaled_grad > 0
    safe = xp.where(positive, scaled_grad, 1.0)
    # t = 8 rho / (eta ||g||); at ||g|| = 0 it is +inf for rho > 0 (edge 0) and 0 for rho = 0.
    t = xp.where(positive, 8.0 * rho / safe, xp.where(rho > 0, xp.inf, 0.0))
    return (4.0 / step_size) / (1.0 + xp.sqrt(1.0 + t))
