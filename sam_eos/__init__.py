"""sam_eos: watch Hessian sharpness while SAM, gradient descent or any optax optimizer trains.

The functional core, re-exported here, is pure functions over parameter pytrees:

- `sam`: the SAM gradient and step;
- `edge`: each optimizer's stability threshold, and the SAM and USAM edges built on one;
- `effective_sharpness`: the operator P^-1/2 (H + rho_eff H^2) P^-1/2 whose top eigenvalue
  meets that threshold at the edge;
- `hessian`: Hessian-vector products;
- `eigensolver`: the top eigenvalues, `top_eigenvalues`, and the warm-started `init` / `update`
  that every check runs (Lanczos, `lanczos`); `power_iteration`, the original's estimator;
- `layers`: which layer is at the edge: each layer's block sharpness and its share of a
  direction;
- `tracker`: `SharpnessTracker`, warm-started tracking inside any training loop;
- `trainable`: `check_params`, which refuses a params pytree holding anything but trainable
  floating-point parameters (running statistics, RNG state, keys, integers);
- `spectrum`: trace, spectral density, batch sharpness, sharpness at the SAM point.

The harness lives below: `sam_eos.loop` (the training loop), `sam_eos.reports` (raw data,
figures, summary) and `sam_eos.cli` (the programs' flags). Importing `sam_eos` loads none of
them, nor matplotlib, TensorFlow or Haiku.
"""

from sam_eos.edge import sam_edge, stability_threshold, usam_edge
from sam_eos.effective_sharpness import (
    adam_preconditioner,
    effective_radius,
    effective_sharpness_operator,
)
from sam_eos.eigensolver import SolverState, top_eigenvalues
from sam_eos.hessian import hessian_operator, hvp, product_noise_floor
from sam_eos.lanczos import EigenInfo
from sam_eos.layers import layer_shares, layer_sharpness
from sam_eos.sam import loss_gradient_and_sam_gradient, sam_gradient, sam_update
from sam_eos.spectrum import (
    batch_sharpness,
    hessian_trace,
    sam_point,
    sam_point_sharpness,
    spectral_density,
)
from sam_eos.tracker import SharpnessResult, SharpnessTracker, TrackerState
from sam_eos.trainable import check_params
from sam_eos.types import LossFn, PyTree

__all__ = [
    "EigenInfo",
    "LossFn",
    "PyTree",
    "SharpnessResult",
    "SharpnessTracker",
    "SolverState",
    "TrackerState",
    "adam_preconditioner",
    "batch_sharpness",
    "check_params",
    "effective_radius",
    "effective_sharpness_operator",
    "hessian_operator",
    "hessian_trace",
    "hvp",
    "layer_shares",
    "layer_sharpness",
    "loss_gradient_and_sam_gradient",
    "product_noise_floor",
    "sam_edge",
    "sam_gradient",
    "sam_point",
    "sam_point_sharpness",
    "sam_update",
    "spectral_density",
    "stability_threshold",
    "top_eigenvalues",
    "usam_edge",
]
