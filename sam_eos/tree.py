"""What parameter pytrees need beyond `optax.tree_utils`: alignment and a random direction.

Sums, norms and linear combinations of pytrees come from `optax.tree_utils` (`tree_vdot`,
`tree_norm`, `tree_add_scale`, ...); this module holds only what optax does not offer.
"""

import jax
import jax.numpy as jnp
import optax.tree_utils as otu

from sam_eos.types import PyTree


def alignment(a: PyTree, b: PyTree) -> jax.Array:
    """|<a, b>| / (||a|| ||b||): the absolute cosine between two pytrees, in [0, 1].

    Returns 0 when either is the zero vector rather than dividing by zero.
    """
    denominator = otu.tree_norm(a) * otu.tree_norm(b)
    safe = jnp.where(denominator > 0, denominator, 1.0)
    return jnp.where(denominator > 0, jnp.abs(otu.tree_vdot(a, b)) / safe, 0.0)


def random_unit_direction(key: jax.Array, like: PyTree) -> PyTree:
    """A direction drawn uniformly from the unit sphere of the space of pytrees shaped as `like`."""
    direction = otu.tree_random_like(key, like, jax.random.normal)
    return otu.tree_scale(1.0 / otu.tree_norm(direction), direction)
