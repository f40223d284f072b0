"""Type aliases shared by the whole package."""

from collections.abc import Callable
from typing import Any

import jax

PyTree = Any
"""A pytree of arrays: parameters, a batch, a direction in parameter space."""

LossFn = Callable[[PyTree, PyTree], jax.Array]
"""`loss_fn(params, batch) -> scalar`: the loss whose Hessian (in `params`) is measured."""

Matvec = Callable[[jax.Array], jax.Array]
"""A symmetric linear operator on flat vectors: `v [n] -> A v [n]`."""
