"""A tracker update on FSDP-sharded parameters against one device; prints one JSON object.

Run by tests/test_sharded_solver.py in a subprocess with
XLA_FLAGS=--xla_force_host_platform_device_count=4 (set before JAX is imported) and
OPENBLAS_NUM_THREADS=1. An MLP's leaves are sharded over a 4-device mesh axis "fsdp" (weights
along one axis or the other, biases along theirs or replicated), and its batch along its rows.
"""

import json
import re

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

import sam_eos
import sam_eos.tree

SIZES = (32, 512, 512, 10)  # 284,682 parameters
BATCH = 64
SPECS = {  # each leaf's PartitionSpec: sharded along one axis, or replicated
    "layer_0": {"w": P(None, "fsdp"), "b": P("fsdp")},
    "layer_1": {"w": P("fsdp", None), "b": P("fsdp")},
    "layer_2": {"w": P("fsdp", None), "b": P()},
}


def make_problem():
    """Params and a batch of a tanh MLP, in host memory."""
    rng = np.random.default_rng(0)
    params = {f"layer_{i}": {"w": rng.normal(size=(a, b)).astype(np.float32) / np.sqrt(a),
                             "b": 0.1 * rng.normal(size=(b,)).astype(np.float32)}
              for i, (a, b) in enumerate(zip(SIZES[:-1], SIZES[1:], strict=True))}
    x = rng.normal(size=(BATCH, SIZES[0])).astype(np.float32)
    y = rng.integers(0, SIZES[-1], size=BATCH)
    return params, (x, y)


def loss(params, batch):
    x, y = batch
    for i in range(len(SIZES) - 1):
        layer = params[f"layer_{i}"]
        x = x @ layer["w"] + layer["b"]
        if i < len(SIZES) - 2:
            x = jnp.tanh(x)
    return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(x), y[:, None], axis=1))


def spec_of(array) -> tuple:
    """A leaf's PartitionSpec as a tuple padded with None to its rank (comparable); () on a
    single device."""
    if not isinstance(array.sharding, NamedSharding):
        return ()
    spec = tuple(array.sharding.spec)
    return spec + (None,) * (array.ndim - len(spec))


def specs(tree) -> list[list[str | None]]:
    """Each leaf's padded PartitionSpec, as JSON lists."""
    return [list(spec_of(leaf)) for leaf in jax.tree.leaves(tree)]


def run_tracker(params, batch):
    """Two updates (cold, then warm): their results, the state and the compiled update."""
    tracker = sam_eos.SharpnessTracker(loss, k=1)
    state = tracker.init(params, jax.random.key(0))
    init_specs = specs(state.ritz_vectors)
    shardings = sam_eos.rows.vector_shardings(params)
    compiled = tracker._update.lower(state, params, batch, None, None, (),
                                     shardings=shardings).compile()
    first, state = compiled(state, params, batch, None, None, ())  # `tracker.update`'s call
    second, state = compiled(state, params, batch, None, None, ())
    return first, second, state, init_specs, compiled


def all_gathers(text: str) -> list[int]:
    """The element counts of every all-gather's result in an HLO text."""
    counts = []
    for shape in re.findall(r"= f32\[([\d,]*)\]\S* all-gather(?:-start)?\(", text):
        counts.append(int(np.prod([int(d) for d in shape.split(",") if d])))
    return counts


def main():
    params, batch = make_problem()
    num_params = sum(leaf.size for leaf in jax.tree.leaves(params))
    mesh = Mesh(np.array(jax.devices()), ("fsdp",))
    sharded_params = jax.tree.map(lambda a, s: jax.device_put(a, NamedSharding(mesh, s)),
                                  params, SPECS)
    sharded_batch = jax.device_put(batch, NamedSharding(mesh, P("fsdp")))
    one = jax.devices()[0]
    single = run_tracker(jax.device_put(params, one), jax.device_put(batch, one))
    sharded = run_tracker(sharded_params, sharded_batch)

    _, second, state, init_specs, compiled = sharded
    text = compiled.as_text()
    flat_shapes = re.findall(rf"f32\[[\d,]*\b{num_params}\b[\d,]*\]", text)
    gathers = all_gathers(text)
    errors = [float(np.abs(np.asarray(s.eigenvalues) - np.asarray(u.eigenvalues)).max()
                    / np.abs(np.asarray(u.eigenvalues)).max())
              for s, u in zip(sharded[:2], single[:2], strict=True)]
    alignment = float(sam_eos.tree.alignment(jax.device_get(second.direction),
                                        jax.device_get(single[1].direction)))
    print(json.dumps({
        "device_count": jax.device_count(),
        "num_params": num_params,
        "eigenvalue": float(second.eigenvalues[0]),
        "relative_errors": errors,
        "products": [int(r.hessian_vector_products) for r in (*sharded[:2], *single[:2])],
        "direction_alignment": alignment,
        "param_specs": specs(sharded_params),
        "init_state_specs": init_specs,
        "state_specs": specs(state.ritz_vectors),
        "direction_specs": specs(second.direction),
        "flat_shapes": flat_shapes,
        "all_gathers": len(gathers),
        "largest_all_gather": max(gathers, default=0),
        "largest_leaf": max(leaf.size for leaf in jax.tree.leaves(params)),
        "all_to_alls": len(re.findall(r" all-to-all\(", text)),
        "collective_permutes": len(re.findall(r" collective-permute(?:-start)?\(", text)),
        "temp_bytes_sharded": compiled.memory_analysis().temp_size_in_bytes,
        "temp_bytes_single": single[4].memory_analysis().temp_size_in_bytes,
    }))


if __name__ == "__main__":
    main()
