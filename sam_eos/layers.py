"""Which layer is at the edge: the sharpness of each layer's diagonal Hessian block, and the
share of a direction (the top eigenvector) that lies in each layer.

A *group* is a set of parameter leaves. By default the groups are the first level of the
params pytree: the Haiku module names of a Haiku model (`{"mlp/~/linear_0": {"w", "b"}, ...}`),
a dict's keys, a list's or tuple's indices (as strings). `group` overrides this: a function
from a leaf's key path (`jax.tree_util.keystr` form, e.g. `"['mlp/~/linear_0']['w']"`) to its
group's name, or None to leave the leaf out.

`layer_sharpness` gives, for each group G, the top eigenvalue of H_GG, the block of the Hessian
whose rows and columns are G's parameters, with every other parameter held fixed. It runs the
same Lanczos as `sam_eos.top_eigenvalues` (`sam_eos.lanczos.solve`: the same stopping rule and
error bound) on exact block products: a tangent that is zero outside G, one Hessian-vector
product of the whole network, read back on G. The gradient is linearised once and every
group's solve reuses it.

Cost: one Lanczos solve per group, one after another inside one compiled function (the blocks
have different sizes, so they cannot be batched into one vmap); each product costs one full
Hessian-vector product. Compiled once per (params, batch) shape and grouping.
"""

from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
from jax.flatten_util import ravel_pytree

from sam_eos import eigensolver, hessian, lanczos, trainable
from sam_eos.lanczos import EigenInfo
from sam_eos.types import LossFn, PyTree

# `keystr(path) -> group name or None` for each parameter leaf.
Grouping = Callable[[str], str | None]


def _first_level_name(path: tuple) -> str:
    key = path[0]
    for attribute in ("key", "idx", "name"):
        if hasattr(key, attribute):
            return str(getattr(key, attribute))
    return jax.tree_util.keystr((key,))


def group_indices(params: PyTree, group: Grouping | None = None) -> dict[str, np.ndarray]:
    """Each group's positions in `ravel_pytree(params)[0]`: name -> int64 [n_group], in the
    order the groups first appear among the leaves.

    Raises ValueError (before anything is compiled) for params with no first level to split (a
    single array) or a grouping that names no parameter."""
    leaves = jax.tree_util.tree_flatten_with_path(params)[0]
    if not leaves:
        raise ValueError("params hold no arrays: there is no layer to measure")
    if group is None and any(len(path) == 0 for path, _ in leaves):
        raise ValueError("params are a single array, with no first level to split into layers;"
                         " pass a pytree (e.g. a dict of layers) or a `group` function")
    indices: dict[str, list[np.ndarray]] = {}
    offset = 0
    for path, leaf in leaves:
        size = int(np.size(leaf))
        name = _first_level_name(path) if group is None else group(jax.tree_util.keystr(path))
        if name is not None and size:
            indices.setdefault(str(name), []).append(np.arange(offset, offset + size))
        offset += size
    if not indices:
        raise ValueError("the grouping names no parameter: every leaf was left out (None)")
    return {name: np.concatenate(parts) for name, parts in indices.items()}


def cold_start_vectors(params: PyTree, group: Grouping | None = None,
                       num_matvecs: int = eigensolver.DEFAULT_NUM_MATVECS
                       ) -> dict[str, jax.Array]:
    """name -> float zeros [block, n_group]: `layer_sharpness`' `start_vectors` for a cold
    start, shaped like the Ritz vectors it returns (3 rows, fewer for a tiny group)."""
    dtype = eigensolver.solver_dtype(jax.eval_shape(lambda p: ravel_pytree(p)[0], params).dtype)
    # Built on the host and put on the device: no compile per layer shape.
    return {name: jax.device_put(np.zeros((min(eigensolver.warm_block_size(1),
                                               lanczos.basis_steps(index.size, num_matvecs)),
                                           index.size), dtype))
            for name, index in group_indices(params, group).items()}


def layer_shares(direction: PyTree, group: Grouping | None = None) -> dict[str, jax.Array]:
    """Each group's share ||v_G||^2 / ||v||^2 of `direction` (a params-shaped pytree, e.g. the
    top eigenvector `info.direction`): name -> float scalar. Over the default grouping, or any
    grouping that keeps every leaf, the shares sum to 1."""
    indices = group_indices(direction, group)
    shares = block_shares(ravel_pytree(direction)[0], block_arrays(indices))
    return dict(zip(indices, shares, strict=True))


def layer_sharpness(
    loss_fn: LossFn,
    params: PyTree,
    batch: PyTree,
    key: jax.Array,
    *,
    group: Grouping | None = None,
    num_matvecs: int = eigensolver.DEFAULT_NUM_MATVECS,
    tolerance: float = eigensolver.DEFAULT_TOLERANCE,
    hvp_mode: str = "auto",
    start_vectors: dict[str, jax.Array] | None = None,
    start_noise: float | jax.Array = eigensolver.DEFAULT_START_NOISE,
) -> tuple[dict[str, jax.Array], dict[str, EigenInfo]]:
    """The top eigenvalue of each group's diagonal Hessian block H_GG (curvature units).

    Args:
      loss_fn: `loss_fn(params, batch) -> scalar`, static (pass the same object each call).
      params, batch: the point and the data.
      key: PRNG key of the random starts (one per group, folded in by the group's position).
      group: the grouping (module docstring); default the first level of `params`.
      num_matvecs, tolerance: per group, as `sam_eos.top_eigenvalues` (Lanczos).
      hvp_mode: as `sam_eos.hessian.hessian_operator`.
      start_vectors: name -> float [block, n_group], the previous call's
        `info[name].ritz_vectors` (a warm start, as `top_eigenvalues`'); None: cold.
      start_noise: weight of the unit random vector added to each warm start.
    Returns:
      `(sharpness, info)`: name -> float scalar, and name -> `EigenInfo` (its error bound,
      relative to ||H_GG||, promises what `top_eigenvalues`' does; `ritz_vectors` hold the
      group's own coordinates, [block, n_group]).
    """
    trainable.check_params(params)
    indices = group_indices(params, group)
    for index in indices.values():
        lanczos.check_options(1, num_matvecs, tolerance, index.size)
    starts = cold_start_vectors(params, group, num_matvecs) if start_vectors is None else {
        name: start_vectors[name] for name in indices}
    found = _layer_sharpness(loss_fn, params, batch, key, jnp.float32(tolerance),
                             jnp.float32(start_noise), block_arrays(indices),
                             tuple(starts.values()), num_matvecs=num_matvecs,
                             hvp_mode=hessian.resolve_hvp_mode(hvp_mode))
    return ({name: info.eigenvalues[0] for name, info in zip(indices, found, strict=True)},
            dict(zip(indices, found, strict=True)))


def block_arrays(indices: dict[str, np.ndarray]) -> tuple[jax.Array, ...]:
    """`group_indices`' positions as int32 device arrays, in the groups' order: `solve_blocks`'
    `blocks` (passed as arguments, so a compiled solve holds only their sizes)."""
    return tuple(jax.device_put(np.asarray(index, np.int32)) for index in indices.values())


def solve_blocks(loss_fn: LossFn, params: PyTree, batch: PyTree, key: jax.Array,
                 tolerance: jax.Array, start_noise: jax.Array, blocks: tuple[jax.Array, ...],
                 starts: tuple[jax.Array, ...], *, num_matvecs: int, hvp_mode: str,
                 noise_floor: float | jax.Array = 0.0, basis_size: int | None = None
                 ) -> tuple[EigenInfo, ...]:
    """Pure (jit it, or call it inside a jitted function): each block's `EigenInfo` (k = 1),
    in `blocks`' order, on one linearisation of the gradient.

    `blocks`: int32 [n_group] positions in the flat parameters per group (`block_arrays`);
    `starts`: float [rows, n_group] per group, zeros for a cold start; `hvp_mode` resolved
    (`hessian.resolve_hvp_mode`); `noise_floor`: the products' relative error, as
    `top_eigenvalues`'; `basis_size`: each solve's Lanczos basis (None: the default). The
    random start of group i comes from `fold_in(key, i)`."""
    flat_params, _, matvec = hessian.hessian_operator(loss_fn, params, batch, hvp_mode)
    dtype = eigensolver.solver_dtype(flat_params.dtype)  # float32 for low-precision params
    found = []
    for position, (index, start) in enumerate(zip(blocks, starts, strict=True)):
        def block_matvec(v, index=index):
            tangent = jnp.zeros_like(flat_params).at[index].set(v.astype(flat_params.dtype))
            return matvec(tangent)[index].astype(dtype)

        info = lanczos.solve(
            block_matvec, start.astype(dtype), jax.random.fold_in(key, position), tolerance,
            jnp.asarray(noise_floor, dtype), start_noise.astype(dtype), k=1,
            num_matvecs=num_matvecs, block_size=start.shape[0], basis_size=basis_size)
        found.append(info._replace(ritz_vectors=info.ritz_vectors.astype(start.dtype)))
    return tuple(found)


def block_shares(flat_direction: jax.Array, blocks: tuple[jax.Array, ...]
                 ) -> tuple[jax.Array, ...]:
    """Pure: each block's share ||v_G||^2 / ||v||^2 of a flat direction [n], in `blocks`'
    order (`layer_shares` for flat vectors, e.g. a Ritz vector)."""
    total = jnp.vdot(flat_direction, flat_direction)
    return tuple(jnp.vdot(flat_direction[index], flat_direction[index]) / total
                 for index in blocks)


_layer_sharpness = jax.jit(solve_blocks, static_argnames=("loss_fn", "num_matvecs", "hvp_mode"))
