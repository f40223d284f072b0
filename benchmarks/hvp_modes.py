"""Exact Hessian-vector products: `jax.linearize` of the gradient once vs `jvp(grad)` each time.

`python3 -m benchmarks.hvp_modes [--products 5] [--rounds 7] [--transformer]` times, on JAX's
default backend, one jitted function per mode that forms `--products` products in a
`lax.fori_loop` (what one warm check does), for the MNIST MLP 3 x 200 on 2000 images and,
with `--transformer`, the default transformer on one batch of 8 x 64. Calls alternate between
the modes; it prints the median time per call and per product.
"""

from __future__ import annotations

import argparse
import functools
import pathlib
import time

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks import problems
from sam_eos import hessian

MODES = ("forward_over_reverse", "linearize")


@functools.partial(jax.jit, static_argnames=("loss_fn", "mode", "num_products"))
def repeated_products(loss_fn, params, batch, vector, *, mode, num_products):
    """`num_products` products H v, each fed the last (normalised): float [n]."""
    _, _, matvec = hessian.hessian_operator(loss_fn, params, batch, mode)

    def step(_, v):
        w = matvec(v)
        return w / jnp.linalg.norm(w)

    return jax.lax.fori_loop(0, num_products, step, vector)


def time_modes(loss_fn, params, batch, num_products: int, rounds: int) -> dict[str, float]:
    """Median seconds per call for each mode, calls interleaved (one untimed call first)."""
    vector = hessian.cold_start_vectors(params, 1)[0] + 1.0
    calls = {mode: functools.partial(repeated_products, loss_fn, params, batch, vector,
                                     mode=mode, num_products=num_products) for mode in MODES}
    for call in calls.values():
        jax.block_until_ready(call())
    seconds = {mode: [] for mode in MODES}
    for _ in range(rounds):
        for mode, call in calls.items():
            begin = time.perf_counter()
            jax.block_until_ready(call())
            seconds[mode].append(time.perf_counter() - begin)
    return {mode: float(np.median(s)) for mode, s in seconds.items()}


def report(name: str, timings: dict[str, float], num_products: int) -> None:
    cells = [f"{mode}: {1e3 * t:.0f} ms ({1e3 * t / num_products:.1f} ms per product)"
             for mode, t in timings.items()]
    ratio = timings["linearize"] / timings["forward_over_reverse"]
    print(f"| {name} | " + " | ".join(cells) + f" | {ratio:.2f} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--products", type=int, default=5)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--transformer", action="store_true")
    parser.add_argument("--data_dir", default=str(problems.DEFAULT_DATA_DIR))
    args = parser.parse_args()
    data_dir = pathlib.Path(args.data_dir)
    print(f"backend {jax.default_backend()}; {args.products} products per call, median of "
          f"{args.rounds} interleaved calls\n")
    print("| model | jvp(grad) | linearize once | linearize / jvp |")
    print("|---|---|---|---|")
    network, loss_fn = problems.make_mlp(200, 4)
    (images, labels), source = problems.mnist_batch(data_dir, 2000)
    batch = (jnp.asarray(images), jnp.asarray(labels))
    params = network.init(jax.random.PRNGKey(0), batch[0][:1])
    report(f"MLP 3x200, 2000 images ({source})",
           time_modes(loss_fn, params, batch, args.products, args.rounds), args.products)
    if args.transformer:
        network, loss_fn = problems.make_transformer()
        text, source = problems.text_batch(data_dir, 8)
        batch = tuple(jnp.asarray(t) for t in text)
        params = network.init(jax.random.PRNGKey(0), batch[0])
        report(f"transformer 6x128, batch 8x64 ({source})",
               time_modes(loss_fn, params, batch, args.products, args.rounds), args.products)


if __name__ == "__main__":
    main()
