"""Where a check's time goes: one Lanczos step against one product of the original's estimator.

Each case runs STEPS products in one compiled call (a `fori_loop`, as inside the solver), at a
point of the check_misses SAM trajectory's model (untrained parameters: a product's cost does
not depend on the point):

- gradient: one `jax.grad` (a power-iteration product is two: a central difference);
- power product: the original's finite-difference product (`finite_difference_hvp`);
- HVP: one exact Hessian-vector product (the solver's linearised gradient);
- Lanczos step: `lanczos.tridiagonal` for STEPS steps, each an HVP plus the orthogonalisation
  against the basis so far (the solver's own cycle, without its stopping test);
- HVPs in blocks of b: `vmap` of the HVP over b vectors, per vector (what a block Krylov
  start from the warm rows would pay per product).
"""

import jax
import jax.numpy as jnp
from jax.flatten_util import ravel_pytree

from benchmarks import problems
from benchmarks.harness import Context, format_seconds, interleaved_medians
from sam_eos import lanczos
from sam_eos.hessian import hessian_operator
from sam_eos.power_iteration import finite_difference_hvp

NAME = "solver_step"
TITLE = "Where a check's time goes: a Lanczos step against a power-iteration product"
STEPS = 24  # about a default SAM check's products (check_misses)
BLOCKS = (2, 4, 8)


def _unit(v: jax.Array) -> jax.Array:
    return v / jnp.linalg.norm(v)


def make_cases(loss_fn, params, batch) -> dict:
    """Name -> (compiled `f(params, batch, v)`, products per call) for every case."""
    unravel = ravel_pytree(params)[1]

    def repeat(product):
        return lambda p, b, v: jax.lax.fori_loop(0, STEPS, lambda _, w: _unit(product(p, b, w)),
                                                 v)

    def repeat_hvp(p, b, v):  # the operator built once, outside the loop, as in the solver
        matvec = hessian_operator(loss_fn, p, b)[2]
        return jax.lax.fori_loop(0, STEPS, lambda _, w: _unit(matvec(w)), v)

    def gradient(p, b, v):
        g = jax.grad(loss_fn)(jax.tree.map(lambda a, d: a + 1e-6 * d, p, unravel(v)), b)
        return ravel_pytree(g)[0]

    def power_product(p, b, v):
        return ravel_pytree(finite_difference_hvp(loss_fn, p, b, unravel(v)))[0]

    def lanczos_steps(p, b, v):
        return lanczos.tridiagonal(hessian_operator(loss_fn, p, b)[2], v, jax.random.key(0),
                                   steps=STEPS)

    def blocks(size):
        def run(p, b, v):
            matvec = jax.vmap(hessian_operator(loss_fn, p, b)[2])
            block = jnp.stack([jnp.roll(v, i) for i in range(size)])
            return jax.lax.fori_loop(0, STEPS, lambda _, w: jax.vmap(_unit)(matvec(w)), block)
        return run

    cases = {"gradient": (repeat(gradient), STEPS),
             "power product": (repeat(power_product), STEPS),
             "HVP": (repeat_hvp, STEPS),
             "Lanczos step": (lanczos_steps, STEPS)}
    cases.update({f"HVPs in blocks of {size}": (blocks(size), STEPS * size) for size in BLOCKS})
    return {name: (jax.jit(f), products) for name, (f, products) in cases.items()}


def run(context: Context) -> dict:
    width, images = (100, 1000) if context.quick else (200, 2000)
    (x, y), source = problems.mnist_batch(context.data_dir, images)
    network, loss_fn = problems.make_mlp(width, 4)
    batch = jax.device_put((x, y))
    params = network.init(jax.random.PRNGKey(0), x[:1])
    n = problems.num_params(params)
    start = _unit(jax.random.normal(jax.random.key(1), (n,)))
    cases = make_cases(loss_fn, params, batch)
    medians = interleaved_medians(
        {name: (lambda f=f: f(params, batch, start)) for name, (f, _) in cases.items()},
        context.repeats(3, 7))
    per_product = {name: medians[name] / products for name, (_, products) in cases.items()}
    power = per_product["power product"]
    rows = [[name, format_seconds(seconds), f"{seconds / power:.2f}x"]
            for name, seconds in per_product.items()]
    return {
        "title": TITLE,
        "headline": [
            ["Lanczos step / power-iteration product (time)",
             f"{per_product['Lanczos step'] / power:.2f}x "
             f"({format_seconds(per_product['Lanczos step'])} vs {format_seconds(power)}); an "
             f"HVP alone {per_product['HVP'] / power:.2f}x"],
            [f"HVPs in blocks of {BLOCKS[1]}, per vector / one HVP",
             f"{per_product[f'HVPs in blocks of {BLOCKS[1]}'] / per_product['HVP']:.2f}x"]],
        "columns": ["case", "median per product", "/ power product"],
        "rows": rows,
        "notes": f"MLP 3x{width} ({n:,} params), {images} images ({source}), full batch. "
                 f"Each case: {STEPS} products in one compiled loop, medians of interleaved "
                 "rounds, per product (per vector for the blocks). The Lanczos step's "
                 "orthogonalisation sweeps the rows so far, so its cost grows with the steps; "
                 f"{STEPS} is about a default SAM check's.",
        "results": {"seconds_per_product": per_product, "num_params": n},
    }
