"""Row-stacked vectors: a block of vectors of one pytree layout, leaf by leaf.

A *vector* is a pytree of arrays (a params-shaped tree, or one flat [n] array). A block of r of
them is *row-stacked*: the same tree, each leaf with a leading rows axis, `[r, *leaf_shape]`.
A flat `[r, n]` array is the one-leaf case. The eigensolvers keep their bases and Ritz vectors
this way, so a product takes a row in the parameters' own layout (and sharding): nothing is
flattened into one `[n]` vector.

Every function here is a few elementwise or per-leaf operations, to trace inside a jit; dot
products sum over leaves. Single vectors use `optax.tree_utils` (`tree_vdot`, `tree_norm`,
`tree_add_scale`, ...).
"""

import math

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

from sam_eos.types import PyTree

# A rotation (`rotate`) of a leaf larger than this many entries per row runs in chunks.
ROTATION_COLUMNS = 2**14
ROTATION_CHUNKS = 64  # ... and in at most about this many chunks per leaf


def count(block: PyTree) -> int:
    """Rows of a row-stacked block (static)."""
    return jax.tree.leaves(block)[0].shape[0]


def size(block: PyTree) -> int:
    """Entries of one row, all leaves together (static): the dimension n of the space."""
    return sum(math.prod(leaf.shape[1:]) for leaf in jax.tree.leaves(block))


def dtype(block: PyTree) -> jnp.dtype:
    """The (common) dtype of a block's leaves."""
    return jnp.result_type(*jax.tree.leaves(block))


def zeros(r: int, like: PyTree, dtype_) -> PyTree:
    """r zero rows shaped as the vector `like` [r, *leaf_shape], in `dtype_`."""
    return jax.tree.map(lambda leaf: jnp.zeros((r, *jnp.shape(leaf)), dtype_), like)


def row(block: PyTree, j) -> PyTree:
    """Row j (a traced index allowed) as a vector."""
    return jax.tree.map(lambda leaf: leaf[j], block)


def set_row(block: PyTree, j, vector: PyTree) -> PyTree:
    """`block` with row j replaced by `vector` (in place under jit)."""
    return jax.tree.map(lambda leaf, x: leaf.at[j].set(x.astype(leaf.dtype)), block, vector)


def stack(vectors: list[PyTree]) -> PyTree:
    """The vectors as the rows of a block."""
    return jax.tree.map(lambda *leaves: jnp.stack(leaves), *vectors)


def dots(block: PyTree, vector: PyTree) -> jax.Array:
    """`[r]`: each row's dot product with `vector`, summed over leaves."""
    products = jax.tree.map(lambda b, v: jnp.tensordot(b, v.astype(b.dtype), axes=v.ndim),
                            block, vector)
    return sum(jax.tree.leaves(products))


def norms(block: PyTree) -> jax.Array:
    """`[r]`: each row's Euclidean norm."""
    squares = jax.tree.map(
        lambda leaf: jnp.sum(jnp.square(leaf), axis=tuple(range(1, leaf.ndim))), block)
    return jnp.sqrt(sum(jax.tree.leaves(squares)))


def combine(coefficients: jax.Array, block: PyTree) -> PyTree:
    """`coefficients @ block`: coefficients [r] give one vector, [m, r] a block of m rows."""
    return jax.tree.map(
        lambda leaf: jnp.tensordot(coefficients.astype(leaf.dtype), leaf, axes=1), block)


def _chunk_axis(shape: tuple[int, ...], avoid: frozenset[int]) -> int | None:
    """The axis of a leaf (of one row, `shape`) to rotate in chunks along: the longest one not
    in `avoid` (the sharded axes, whose slices would gather them); None: none."""
    axes = [a for a in range(len(shape)) if a not in avoid and shape[a] > 1]
    return max(axes, key=lambda a: shape[a], default=None)


def _rotate_leaf(leaf: jax.Array, mixing: jax.Array, avoid: frozenset[int]) -> jax.Array:
    """`mixing @ leaf` over the rows axis, written over `leaf` in place a chunk at a time (a
    chunk along one axis of the leaf, about 1/ROTATION_CHUNKS of it but at least
    ROTATION_COLUMNS entries per row): the temporaries hold one chunk, not a second leaf."""
    shape = leaf.shape[1:]
    entries = math.prod(shape)
    axis = _chunk_axis(shape, avoid)
    if axis is None or entries <= ROTATION_COLUMNS:
        return jnp.tensordot(mixing.astype(leaf.dtype), leaf, axes=1)
    extent, per_slice = shape[axis], entries // shape[axis]
    target = max(ROTATION_COLUMNS, -(-entries // ROTATION_CHUNKS))
    width = min(extent, max(1, -(-target // per_slice)))
    chunks = -(-extent // width)
    index = jnp.arange(width).reshape((width,) + (1,) * (len(shape) - axis - 1))

    def rotate(i, leaf):
        begin = jnp.minimum(i * width, extent - width)  # the last chunk overlaps the one before
        chunk = jax.lax.dynamic_slice_in_dim(leaf, begin, width, axis=axis + 1)
        done = begin + index < i * width  # rotated with the chunk before
        rotated = jnp.where(done, chunk, jnp.tensordot(mixing.astype(leaf.dtype), chunk, axes=1))
        return jax.lax.dynamic_update_slice_in_dim(leaf, rotated, begin, axis=axis + 1)

    return jax.lax.fori_loop(0, chunks, rotate, leaf)


def rotate(block: PyTree, mixing: jax.Array, shardings: tuple | None = None) -> PyTree:
    """`mixing @ block` for a small square `mixing` [r, r], in place leaf by leaf (chunks of
    each large leaf along an axis its sharding in `shardings`, one entry per leaf of a row,
    leaves whole: see `vector_shardings`)."""
    leaves, treedef = jax.tree.flatten(block)
    avoid = [frozenset()] * len(leaves) if shardings is None else [
        sharded_axes(s) for s in shardings]
    return jax.tree.unflatten(treedef, [_rotate_leaf(leaf, mixing, a)
                                        for leaf, a in zip(leaves, avoid, strict=True)])


def _hash_uniform(key_words: jax.Array, shape: tuple[int, ...], offset: int, dtype_
                  ) -> jax.Array:
    """Uniform entries in [-1/2, 1/2) of `shape`: a hash of each entry's position (row-major,
    plus `offset`) and the two words `key_words`, elementwise."""
    strides = [math.prod(shape[a + 1:]) for a in range(len(shape))]
    position = jnp.full(shape, offset, jnp.uint32)
    for axis, stride in enumerate(strides):
        position = position + jax.lax.broadcasted_iota(jnp.uint32, shape, axis) * jnp.uint32(
            stride)
    x = position * jnp.uint32(0x9E3779B1) + key_words[0]
    for multiplier in (0x85EBCA6B, 0xC2B2AE35):  # murmur3's finaliser, twice
        x = (x ^ (x >> 16)) * jnp.uint32(multiplier)
        x = x ^ (x >> 13)
    x = (x ^ key_words[1]) * jnp.uint32(0x27D4EB2F)
    x = x ^ (x >> 15)
    return (x >> 8).astype(dtype_) * (2.0**-24) - 0.5


def random_vector(key: jax.Array, like: PyTree, dtype_) -> PyTree:
    """A vector shaped as `like` (a vector), uniform entries in [-1/2, 1/2) in `dtype_`: a hash
    of each entry's position in the flattened (`ravel_pytree`) order and two random words from
    `key`, one elementwise pass per leaf. The same numbers in any layout of the same vector,
    and no temporaries beyond it (`jax.random.normal` holds several)."""
    words = jax.random.bits(key, (2,), jnp.uint32)
    leaves, treedef = jax.tree.flatten(like)
    offsets = np.cumsum([0] + [math.prod(jnp.shape(leaf)) for leaf in leaves])
    return jax.tree.unflatten(treedef, [
        _hash_uniform(words, jnp.shape(leaf), int(offset) % 2**32, dtype_)
        for leaf, offset in zip(leaves, offsets, strict=False)])


# ---------------------------------------------------------------------------------------------
# Layouts: params-shaped rows, or flat [r, n] ones in `ravel_pytree(params)` order


def shaped_as(tree: PyTree, params: PyTree, *, stacked: bool = False) -> bool:
    """Whether `tree` has the structure of `params` and each leaf its parameter's shape (with
    `stacked`, behind one leading rows axis)."""
    leaves, treedef = jax.tree.flatten(tree)
    like, like_treedef = jax.tree.flatten(params)
    skip = 1 if stacked else 0
    return treedef == like_treedef and all(
        len(jnp.shape(t)) == len(jnp.shape(p)) + skip and jnp.shape(t)[skip:] == jnp.shape(p)
        for t, p in zip(leaves, like, strict=True))


def is_stacked(block: PyTree, params: PyTree) -> bool:
    """Whether `block` is row-stacked in the layout of `params` (each leaf [r, *leaf_shape]);
    else it is flat [r, num_params]. For params of one [n] leaf both are the same."""
    return shaped_as(block, params, stacked=True)


def ravel(block: PyTree) -> jax.Array:
    """A row-stacked block as flat rows [r, n] (leaves in `ravel_pytree` order), its dtype."""
    leaves = jax.tree.leaves(block)
    return jnp.concatenate([leaf.reshape(leaf.shape[0], -1) for leaf in leaves], axis=1)


def unravel(flat: jax.Array, params: PyTree) -> PyTree:
    """Flat rows [r, num_params] (`ravel_pytree(params)` order) row-stacked in the layout of
    `params`, in the rows' own dtype (`ravel_pytree`'s unravel casts to the params' dtypes)."""
    leaves, treedef = jax.tree.flatten(params)
    shapes = [jnp.shape(leaf) for leaf in leaves]
    ends = np.cumsum([math.prod(shape) for shape in shapes])
    pieces = jnp.split(flat, ends[:-1], axis=1)
    return jax.tree.unflatten(treedef, [piece.reshape((flat.shape[0], *shape))
                                        for piece, shape in zip(pieces, shapes, strict=True)])


# ---------------------------------------------------------------------------------------------
# Shardings: a row-stacked leaf is sharded as its parameter, its rows axis replicated


def vector_shardings(params: PyTree) -> tuple[NamedSharding | None, ...] | None:
    """Each leaf's `NamedSharding` (a static, hashable description of the layout a solve keeps
    its vectors in), or None when no leaf carries one (single-device or traced params)."""
    shardings = tuple(getattr(leaf, "sharding", None) for leaf in jax.tree.leaves(params))
    shardings = tuple(s if isinstance(s, NamedSharding) else None for s in shardings)
    return shardings if any(s is not None for s in shardings) else None


def rows_sharding(sharding: NamedSharding) -> NamedSharding:
    """The sharding of a row-stacked leaf whose rows are sharded as `sharding`: the leading
    rows axis replicated."""
    return NamedSharding(sharding.mesh, PartitionSpec(None, *sharding.spec))


def sharded_axes(sharding: NamedSharding | None) -> frozenset[int]:
    """The axes of a leaf `sharding` splits over devices."""
    if sharding is None:
        return frozenset()
    return frozenset(axis for axis, name in enumerate(sharding.spec) if name is not None)


def constrain(tree: PyTree, shardings: tuple | None, *, stacked: bool) -> PyTree:
    """`tree` (a vector, or a block when `stacked`) constrained to `shardings` (per leaf, as
    `vector_shardings`; None entries and None: left to XLA). Trace inside a jit."""
    if shardings is None:
        return tree
    leaves, treedef = jax.tree.flatten(tree)
    return jax.tree.unflatten(treedef, [
        leaf if s is None else jax.lax.with_sharding_constraint(
            leaf, rows_sharding(s) if stacked else s)
        for leaf, s in zip(leaves, shardings, strict=True)])
