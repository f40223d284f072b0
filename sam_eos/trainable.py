"""The Hessian is taken in every leaf of `params`: only trainable parameters belong there.

`check_params` refuses, before anything is traced or compiled, a params pytree with a leaf that
is not a trainable floating-point parameter:

- an integer or bool array (a step counter, a mask, a raw `jax.random.PRNGKey`), a typed PRNG
  key (`jax.random.key`), a complex array, or anything that is not an array;
- state that Flax NNX or Equinox keeps beside the parameters and that is a float array, so that
  no dtype betrays it: an `nnx.Variable` that is not an `nnx.Param` (`nnx.BatchStat`, the
  running statistics of `nnx.BatchNorm`; `nnx.RngCount` and `nnx.RngKey`, a `nnx.Dropout`'s or
  `nnx.Rngs`' state; `nnx.Cache`, `nnx.Intermediate`, ...), an `eqx.nn.State`, or an
  `eqx.nn.StateIndex` that still holds its initial value (a stateful Equinox layer built
  without `eqx.nn.make_with_state`).

Floating-point leaves of every precision (float16, bfloat16, float32, float64) and Python
floats pass. Running statistics and RNG state are not what the gradient trains: in `params`
they would add rows and columns to the Hessian (the issue that brought this check in measured
+20 % on a BatchNorm CNN). They go to the loss in its `batch` argument instead, so that every
call reads their current value (README, "Tracking your own model").

Neither flax nor equinox is imported here: their types are recognised only when the caller has
imported them already.
"""

import sys

import jax
import numpy as np

from sam_eos.types import PyTree

_MAX_LISTED = 8  # offending leaves named one by one in the message; the rest are counted


def _flax_state(node) -> str | None:
    """What an NNX node that is not a trainable parameter is, or None."""
    nnx = sys.modules.get("flax.nnx")
    if nnx is None:
        return None
    if isinstance(node, nnx.Variable):
        kind = type(node)
    else:  # flax < 0.12 keeps VariableState objects in a State, the Variable type in .type
        variable_state = vars(nnx).get("VariableState")  # not the deprecated alias of 0.12
        if variable_state is None or not isinstance(node, variable_state):
            return None
        kind = node.type
    if issubclass(kind, nnx.Param):
        return None
    return f"an nnx.{kind.__name__}, not an nnx.Param"


def _equinox_state(node) -> str | None:
    """What an Equinox stateful-layer node is, or None."""
    eqx = sys.modules.get("equinox")
    if eqx is None:
        return None
    if isinstance(node, eqx.nn.State):
        return "an eqx.nn.State (the state of stateful layers such as eqx.nn.BatchNorm)"
    if isinstance(node, eqx.nn.StateIndex):
        return ("an eqx.nn.StateIndex holding its initial state (a stateful layer such as "
                "eqx.nn.BatchNorm, built without eqx.nn.make_with_state)")
    return None


def _framework_state(node) -> str | None:
    """A Flax NNX or Equinox node that holds state rather than trainable parameters, with at
    least one array in it (an emptied `eqx.nn.StateIndex` is harmless), or None."""
    what = _flax_state(node) or _equinox_state(node)
    if what is None or not any(hasattr(leaf, "dtype") for leaf in jax.tree.leaves(node)):
        return None
    return what


def _leaf_problem(leaf) -> str | None:
    """Why `leaf` cannot be a trainable parameter, or None when it can."""
    state = _framework_state(leaf)
    if state is not None:
        return state
    if isinstance(leaf, bool):
        return "a Python bool"
    if isinstance(leaf, int):
        return "a Python int"
    if isinstance(leaf, float):
        return None
    dtype = getattr(leaf, "dtype", None)
    if dtype is None or not hasattr(leaf, "shape"):
        return (f"a {type(leaf).__name__}, not an array (split a model into its arrays "
                f"first: nnx.split, eqx.partition)")
    if jax.dtypes.issubdtype(dtype, jax.dtypes.prng_key):
        return f"a PRNG key array ({dtype})"
    if jax.dtypes.issubdtype(dtype, np.floating):
        return None
    if jax.dtypes.issubdtype(dtype, np.bool_):
        return f"a bool array {dtype}{list(leaf.shape)} (a mask or a flag)"
    if jax.dtypes.issubdtype(dtype, np.integer):
        return (f"an integer array {dtype}{list(leaf.shape)} (a counter, an index or a raw "
                f"jax.random.PRNGKey)")
    if jax.dtypes.issubdtype(dtype, np.complexfloating):
        return (f"a complex array {dtype}{list(leaf.shape)}: pass its real and imaginary parts "
                f"as two float leaves")
    return f"an array of dtype {dtype}, not floating-point"


def check_params(params: PyTree, name: str = "params") -> None:
    """Raises ValueError, naming `name` and each offending leaf's path, unless every leaf of
    `params` is a trainable floating-point parameter (module docstring).

    Runs in Python on shapes and types only (no device work, nothing compiled); traced arrays
    pass as their concrete ones would.
    """
    found = jax.tree_util.tree_flatten_with_path(
        params, is_leaf=lambda node: _framework_state(node) is not None)[0]
    problems = [(f"{name}{jax.tree_util.keystr(path)}", what) for path, leaf in found
                if (what := _leaf_problem(leaf)) is not None]
    if not problems:
        return
    listed = [f"  {path}: {what}" for path, what in problems[:_MAX_LISTED]]
    if len(problems) > _MAX_LISTED:
        listed.append(f"  ... and {len(problems) - _MAX_LISTED} more")
    advice = []
    if any(what.startswith("an nnx.") for _, what in problems):
        advice.append(
            "With Flax NNX, split out the parameters: `graphdef, params, rest = "
            "nnx.split(model, nnx.Param, ...)`, and pass `params` (a variable type of your own "
            "that is trained must subclass nnx.Param).")
    if any(what.startswith("an eqx.") for _, what in problems):
        advice.append(
            "With Equinox, build a stateful model with `model, state = "
            "eqx.nn.make_with_state(Model)(...)` and pass `eqx.partition(model, "
            "eqx.is_inexact_array)[0]`; the eqx.nn.State goes in the batch.")
    advice.append(
        "Hand the rest (batch statistics, RNG state, keys, counters) to the loss in its batch "
        "argument, e.g. `(batch, rest)`, so that every call reads its current value: a loss "
        "that closes over it keeps the value it had when the loss was compiled. The README's "
        "section \"Tracking your own model\" has the recipes for BatchNorm and Dropout.")
    raise ValueError(
        f"{name} must hold only trainable floating-point parameters (the Hessian is taken in "
        f"every leaf of {name}); {len(problems)} "
        f"{'leaf is' if len(problems) == 1 else 'leaves are'} not:\n"
        + "\n".join(listed) + "\n" + "\n".join(advice))
