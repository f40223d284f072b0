"""The loop's state, a typed pytree of arrays: what a checkpoint holds.

Each `*ritz_vectors` entry is one solve's warm start, the `sam_eos.eigensolver.SolverState`
rows it left (zeros: cold), replicated like the parameters. Checkpoints store the state as a
dict of its present entries (`checkpoint_tree`), so one written before an entry existed still
restores (`sam_eos.loop.checkpoint.OPTIONAL_STATE`).
"""

from typing import Any, NamedTuple

import jax

from sam_eos.types import PyTree


class LoopState(NamedTuple):
    """The parameters, the optimizer's state and one warm start per measurement."""

    params: PyTree
    opt_state: PyTree
    ritz_vectors: jax.Array  # the main check's, float [k + 2 or fewer, num_params]
    effective_ritz_vectors: jax.Array | None = None  # Adam's effective sharpness (Adam runs)
    sam_point_ritz_vectors: jax.Array | None = None  # the SAM point's (SpectrumOptions)
    # each layer's, float [3 or fewer, n_layer], in the layers' order (SpectrumOptions)
    layer_ritz_vectors: tuple[jax.Array, ...] | None = None

    def checkpoint_tree(self) -> dict[str, Any]:
        """The entries a checkpoint holds: a dict of those present (not None)."""
        return {name: value for name, value in self._asdict().items() if value is not None}

    @classmethod
    def from_checkpoint_tree(cls, tree: dict[str, Any]) -> "LoopState":
        """The state a checkpoint's dict (`checkpoint_tree`) holds."""
        return cls(**tree)
