"""Pytree arithmetic: the vector-space view of parameter pytrees.

Every function takes and returns pytrees with the same structure as the parameters (or scalars)
and is pure and jit-friendly. Sums are accumulated in the leaves' dtype.
"""


import jax
import jax.numpy as jnp

from sam_eos.types import PyTree


def dot(a: PyTree, b: PyTree) -> jax.Array:
    """Euclidean inner product <a, b> of two pytrees of the same structure (a scalar)."""
    leaves = jax.tree.leaves(jax.tree.map(lambda x, y: jnp.vdot(x, y), a, b))
    return sum(leaves, jnp.zeros((), dtype=jnp.result_type(*leaves)))


def norm(a: PyTree) -> jax.Array:
    """Euclidean norm ||a|| of a pytree (a scalar)."""
    return jnp.sqrt(dot(a, a))


def add(a: PyTree, b: PyTree) -> PyTree:
    """a + b, leaf by leaf."""
    return jax.tree.map(jnp.add, a, b)


def scale(alpha: jax.Array | float, a: PyTree) -> PyTree:
    """alpha * a for a scalar alpha."""
    return jax.tree.map(lambda x: alpha * x, a)


def axpy(alpha: jax.Array | float, x: PyTree, y: PyTree) -> PyTree:
    """alpha * x + y, leaf by leaf."""
    return jax.tree.map(lambda u, v: alpha * u + v, x, y)


def alignment(a: PyTree, b: PyTree) -> jax.Array:
    """|<a, b>| / (||a|| ||b||): the absolute cosine between two pytrees, in [0, 1].

    Returns 0 when either is the zero vector rather than dividing by zero.
    """
    denominator = norm(a) * norm(b)
    safe = jnp.where(denominator > 0, denominator, 1.0)
    return jnp.where(denominator > 0, jnp.abs(dot(a, b)) / safe, 0.0)


def random_unit_direction(key: jax.Array, like: PyTree) -> PyTree:
    """A direction drawn uniformly from the unit sphere of the space of pytrees shaped as `like`."""
    leaves, treedef = jax.tree.flatten(like)
    keys = jax.random.split(key, len(leaves))
    gaussian = [jax.random.normal(k, x.shape, x.dtype) for k, x in zip(keys, leaves, strict=True)]
    direction = jax.tree.unflatten(treedef, gaussian)
    return scale(1.0 / norm(direction), direction)
