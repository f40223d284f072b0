"""Track sharpness in a Flax NNX training loop: an MLP trained by `nnx.Optimizer` with optax
Adam on generated data, its Hessian's top eigenvalue and Adam's preconditioned sharpness
measured every few steps against Adam's edge, written to TensorBoard.

    python3 examples/flax_nnx_loop.py [--steps 400] [--every 25] [--tensorboard_dir DIR]

`nnx.split(model, nnx.Param, ...)` gives a static graph, the parameters' pytree and the rest
of the model's state (empty for this MLP; BatchNorm's statistics and Dropout's RNG state for a
CNN); the tracker measures in the parameters, with a loss that merges them back into a model
with the current rest, passed in the batch (README, "Tracking your own model"). Adam's edge is
(2 + 2 b1) / ((1 - b1) eta), 38 / eta at b1 = 0.9, on lambda_max(P^-1 H) with P = sqrt(v_hat)
+ eps read from the optimizer's state.
"""

import argparse

import jax
import jax.numpy as jnp
import optax
from flax import nnx

import sam_eos

B1, B2, EPS = 0.9, 0.999, 1e-8


class MLP(nnx.Module):
    def __init__(self, sizes: list[int], rngs: nnx.Rngs):
        self.layers = nnx.List([nnx.Linear(m, n, rngs=rngs)
                                for m, n in zip(sizes[:-1], sizes[1:], strict=True)])

    def __call__(self, x):
        for layer in self.layers[:-1]:
            x = jnp.tanh(layer(x))
        return self.layers[-1](x)


def generated_data(key, num_examples: int = 256, dim: int = 8):
    kx, kw = jax.random.split(key)
    x = jax.random.normal(kx, (num_examples, dim))
    return x, jnp.sin(x @ jax.random.normal(kw, (dim, 1)))


def mean_squared_error(model, batch):
    x, y = batch
    return jnp.mean((model(x) - y) ** 2)


def run(steps: int = 400, every: int = 25, learning_rate: float = 0.01,
        tensorboard_dir: str = "") -> list[dict[str, float]]:
    """Trains and measures; returns one dict of scalars per measurement (also printed)."""
    model = MLP([8, 32, 32, 1], nnx.Rngs(0))
    optimizer = nnx.Optimizer(model, optax.adam(learning_rate, b1=B1, b2=B2, eps=EPS),
                              wrt=nnx.Param)
    batch = generated_data(jax.random.key(1))
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)

    def loss_fn(params, batch):  # a pure function of the parameters' pytree
        batch, rest = batch  # the model's other state, current at each update
        return mean_squared_error(nnx.merge(graphdef, params, rest, copy=True), batch)

    @nnx.jit
    def train_step(model, optimizer, batch):
        loss, grads = nnx.value_and_grad(mean_squared_error)(model, batch)
        optimizer.update(model, grads)
        return loss

    edge = sam_eos.stability_threshold("adam", learning_rate, b1=B1)
    sharpness = sam_eos.SharpnessTracker(loss_fn, k=1)
    effective = sam_eos.SharpnessTracker(loss_fn, k=1)
    sharpness_state = sharpness.init(params, jax.random.key(2))
    effective_state = effective.init(params, jax.random.key(3))
    writer = _writer(tensorboard_dir)
    records = []
    for step in range(1, steps + 1):
        loss = train_step(model, optimizer, batch)
        if step % every:
            continue
        _, params, rest = nnx.split(model, nnx.Param, ...)
        # nnx.Optimizer's state holds optax's ScaleByAdamState, laid out like the parameters.
        preconditioner = sam_eos.adam_preconditioner(optimizer.opt_state, b2=B2, eps=EPS)
        result, sharpness_state = sharpness.update(sharpness_state, params, (batch, rest))
        adam, effective_state = effective.update(effective_state, params, (batch, rest),
                                                 preconditioner=preconditioner)
        record = {"loss": float(loss), **result.scalars("sharpness"),
                  **adam.scalars("effective_sharpness"), "stability_threshold": edge}
        record["edge_ratio"] = record["effective_sharpness/lambda_1"] / edge
        records.append(record)
        _report(writer, step, record)
    if writer is not None:
        writer.close()
    return records


def _writer(tensorboard_dir: str):
    if not tensorboard_dir:
        return None
    from tensorboardX import SummaryWriter  # pip install tensorboardX

    return SummaryWriter(tensorboard_dir)


def _report(writer, step: int, record: dict[str, float]) -> None:
    print(f"step {step:4d}  loss {record['loss']:.5f}  lambda_max "
          f"{record['sharpness/lambda_1']:8.3f}  preconditioned "
          f"{record['effective_sharpness/lambda_1']:9.2f}  edge ratio {record['edge_ratio']:.3f}")
    if writer is not None:
        for name, value in record.items():
            writer.add_scalar(name, value, step)
        writer.flush()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=400)
    parser.add_argument("--every", type=int, default=25)
    parser.add_argument("--learning_rate", type=float, default=0.01)
    parser.add_argument("--tensorboard_dir", default="")
    args = parser.parse_args()
    records = run(args.steps, args.every, args.learning_rate, args.tensorboard_dir)
    second_half = [r["edge_ratio"] for r in records[len(records) // 2:]]
    print(f"effective sharpness / Adam's edge over the second half: mean "
          f"{sum(second_half) / len(second_half):.3f}")


if __name__ == "__main__":
    main()
