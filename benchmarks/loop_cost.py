"""What a product costs inside the solver's loop: a tracker update's time per HVP, and a bare
`fori_loop` of products through `sam_eos.hessian_operator`, against one jitted `sam_eos.hvp`,
on the Flax NNX MNIST tutorial's CNN (Conv, BatchNorm, Dropout, Linear) tracked by the
README's NNX recipe. Target: at most 1.3x.

Each loop case also runs with `sam_eos.convolutions`' rewrite off: XLA's CPU backend puts
convolutions into Eigen's canonical layout only in the entry computation, so inside the loop
the backward pass's convolutions compiled as naive loop nests (the cause of issue 41's 3x).
"""

import contextlib
import functools
from collections.abc import Callable, Iterator

import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax.flatten_util import ravel_pytree

import sam_eos
from benchmarks import problems
from benchmarks.harness import Context, format_seconds, interleaved_medians, timed
from sam_eos import convolutions
from sam_eos.hessian import resolve_hvp_mode

NAME = "loop_cost"
TITLE = "A product inside the solver's loop against a standalone jitted HVP (NNX CNN)"
LOOP_PRODUCTS = 10  # the bare fori_loop's products, as in the report
TARGET = 1.3


class CNN(nnx.Module):
    """The NNX MNIST tutorial's CNN, narrowed to the issue's 52k parameters (convolutions of 8
    and 16 channels, a hidden layer of 64; the tutorial's 32, 64 and 256 make 825k)."""

    def __init__(self, rngs: nnx.Rngs, channels: tuple[int, int] = (8, 16), hidden: int = 64):
        self.conv1 = nnx.Conv(1, channels[0], kernel_size=(3, 3), rngs=rngs)
        self.batch_norm1 = nnx.BatchNorm(channels[0], rngs=rngs)
        self.dropout1 = nnx.Dropout(rate=0.025, rngs=rngs)
        self.conv2 = nnx.Conv(channels[0], channels[1], kernel_size=(3, 3), rngs=rngs)
        self.batch_norm2 = nnx.BatchNorm(channels[1], rngs=rngs)
        self.avg_pool = functools.partial(nnx.avg_pool, window_shape=(2, 2), strides=(2, 2))
        self.linear1 = nnx.Linear(channels[1] * 7 * 7, hidden, rngs=rngs)
        self.dropout2 = nnx.Dropout(rate=0.025, rngs=rngs)
        self.linear2 = nnx.Linear(hidden, problems.NUM_CLASSES, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        """Logits [batch, 10] of images [batch, 28, 28, 1]."""
        x = self.avg_pool(nnx.relu(self.batch_norm1(self.dropout1(self.conv1(x)))))
        x = self.avg_pool(nnx.relu(self.batch_norm2(self.conv2(x))))
        x = nnx.relu(self.dropout2(self.linear1(x.reshape(x.shape[0], -1))))
        return self.linear2(x)


def nnx_problem(images: int, data_dir) -> tuple[Callable, dict, tuple, str]:
    """`(loss_fn, params, batch, source)` by the README's NNX recipe: the eval-mode loss,
    nnx.Param leaves as params, the running statistics and RNG state in the batch."""
    graphdef, params, rest = nnx.split(CNN(nnx.Rngs(params=0, dropout=1)), nnx.Param, ...)

    def loss_fn(params, batch):
        (x, y), rest = batch
        model = nnx.merge(graphdef, params, rest, copy=True)
        model.eval()
        return optax.softmax_cross_entropy(model(x), y).mean()

    (x, y), source = problems.mnist_batch(data_dir, images)
    return loss_fn, params, jax.device_put(((x, y), rest)), source


@contextlib.contextmanager
def rewrite_off() -> Iterator[None]:
    """Functions traced inside compile their products' convolutions as JAX writes them."""
    saved = convolutions.CANONICALISING_BACKENDS
    convolutions.CANONICALISING_BACKENDS = ()
    try:
        yield
    finally:
        convolutions.CANONICALISING_BACKENDS = saved


def loop_cases(loss_fn, params, batch) -> tuple[dict[str, Callable], int]:
    """Name -> call of each compiled loop case (traced and compiled here, untimed), and the
    products of one tracker update (a cold start: the same every call)."""
    flat = ravel_pytree(params)[0]
    start = flat / jnp.linalg.norm(flat)

    def products(p, b, v):
        matvec = sam_eos.hessian_operator(loss_fn, p, b)[2]
        return jax.lax.fori_loop(0, LOOP_PRODUCTS,
                                 lambda _, w: matvec(w) / jnp.linalg.norm(w), v)

    def update(tracker):
        return tracker.update(tracker.init(params, jax.random.key(0)), params, batch)[0]

    cases, count = {}, 0
    for label, context in (("", contextlib.nullcontext), (" (rewrite off)", rewrite_off)):
        with context():  # traced (and compiled) under it; later calls reuse the executable
            # A new function object each time: JAX reuses a function's trace across jits.
            loop = jax.jit(lambda p, b, v: products(p, b, v))
            timed(lambda loop=loop: loop(params, batch, start))
            tracker = sam_eos.SharpnessTracker(loss_fn)
            count = int(timed(functools.partial(update, tracker))[1].hessian_vector_products)
        cases[f"tracker update{label}"] = functools.partial(update, tracker)
        cases[f"fori_loop of {LOOP_PRODUCTS} products{label}"] = functools.partial(
            loop, params, batch, start)
    return cases, count


def run(context: Context) -> dict:
    images = 128
    loss_fn, params, batch, source = nnx_problem(images, context.data_dir)
    n = problems.num_params(params)
    vector = jax.tree.map(jnp.ones_like, params)
    hvp = jax.jit(sam_eos.hvp, static_argnums=0)
    cases, products = loop_cases(loss_fn, params, batch)
    medians = interleaved_medians(
        {"jitted hvp": lambda: hvp(loss_fn, params, batch, vector), **cases},
        context.repeats(5, 15))
    per_product = {"jitted hvp": (medians["jitted hvp"], 1)}
    for name, seconds in medians.items():
        if name != "jitted hvp":
            per_product[name] = (seconds, products if name.startswith("tracker") else
                                 LOOP_PRODUCTS)
    one = medians["jitted hvp"]
    ratio = {name: seconds / count / one for name, (seconds, count) in per_product.items()}
    rows = [[name, format_seconds(seconds), count, format_seconds(seconds / count),
             f"{ratio[name]:.2f}x"] for name, (seconds, count) in per_product.items()]
    update, loop = "tracker update", f"fori_loop of {LOOP_PRODUCTS} products"
    return {
        "title": TITLE,
        "headline": [[
            "Tracker update per HVP / one jitted hvp (NNX CNN, CPU)",
            f"{ratio[update]:.2f}x (target <= {TARGET}); {ratio[update + ' (rewrite off)']:.2f}x "
            "without the convolution rewrite"], [
            "A product in a fori_loop of hessian_operator / one jitted hvp (NNX CNN, CPU)",
            f"{ratio[loop]:.2f}x; {ratio[loop + ' (rewrite off)']:.2f}x without the rewrite"]],
        "columns": ["case", "median time", "HVPs", "per HVP", "/ jitted hvp"],
        "rows": rows,
        "notes": f"The NNX MNIST tutorial's CNN narrowed to {n:,} parameters (conv 8 and 16 "
                 f"channels, BatchNorm, Dropout, avg pool, linear 64 and 10), eval-mode loss "
                 f"by the README's NNX recipe, {images} images ({source}). Medians of "
                 "interleaved rounds; a tracker update is a cold start (the same products "
                 f"each call); hvp_mode auto ({resolve_hvp_mode('auto')}). "
                 "A loop's product reuses the linearised gradient's primal pass, the jitted "
                 "`sam_eos.hvp` runs its own, hence below 1x. \"rewrite off\": "
                 "`sam_eos.convolutions` disabled, so the backward pass's convolutions in "
                 "the while body keep JAX's dimension numbers, which XLA's CPU backend "
                 "canonicalises only in the entry computation, and compile as naive loop "
                 "nests.",
        "results": {"ratio": ratio, "num_params": n, "tracker_products": products},
    }
