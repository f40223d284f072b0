"""Track sharpness in an Equinox training loop: an `eqx.nn.MLP` trained by SAM on top of
optax Adam (the SAM gradient from `sam_eos.sam_gradient`), on generated data; every few steps
the Hessian's top eigenvalue and the effective sharpness that SAM-on-Adam's stability depends
on, measured against Adam's edge and written to TensorBoard.

    python3 examples/equinox_loop.py [--steps 400] [--every 25] [--rho 0.01] [--tensorboard_dir DIR]

`eqx.partition(model, eqx.is_inexact_array)` gives the parameters' pytree and the rest; the
loss combines them back. With a SAM radius rho the linearised update sees
P^-1/2 (H + (rho / ||g||) H^2) P^-1/2 (`sam_eos.effective_sharpness`), whose top eigenvalue is
at the edge when it meets Adam's threshold (2 + 2 b1) / ((1 - b1) eta).
"""

import argparse

import equinox as eqx
import jax
import jax.numpy as jnp
import optax

import sam_eos

B1, B2, EPS = 0.9, 0.999, 1e-8


def generated_data(key, num_examples: int = 256, dim: int = 8):
    kx, kw = jax.random.split(key)
    x = jax.random.normal(kx, (num_examples, dim))
    return x, jnp.sin(x @ jax.random.normal(kw, (dim, 1)))


def run(steps: int = 400, every: int = 25, learning_rate: float = 0.01, rho: float = 0.01,
        tensorboard_dir: str = "") -> list[dict[str, float]]:
    """Trains and measures; returns one dict of scalars per measurement (also printed)."""
    model = eqx.nn.MLP(8, 1, width_size=32, depth=2, activation=jnp.tanh,
                       key=jax.random.key(0))
    params, static = eqx.partition(model, eqx.is_inexact_array)
    batch = generated_data(jax.random.key(1))

    def loss_fn(params, batch):  # a pure function of the parameters' pytree
        x, y = batch
        prediction = jax.vmap(eqx.combine(params, static))(x)
        return jnp.mean((prediction - y) ** 2)

    optimizer = optax.adam(learning_rate, b1=B1, b2=B2, eps=EPS)
    opt_state = optimizer.init(params)

    @eqx.filter_jit
    def train_step(params, opt_state, batch):
        loss, gradient, sam = sam_eos.loss_gradient_and_sam_gradient(loss_fn, params, batch,
                                                                     rho)
        updates, opt_state = optimizer.update(sam, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss, optax.tree.norm(gradient)

    edge = sam_eos.stability_threshold("adam", learning_rate, b1=B1)
    sharpness = sam_eos.SharpnessTracker(loss_fn, k=1)
    effective = sam_eos.SharpnessTracker(loss_fn, k=1)
    sharpness_state = sharpness.init(params, jax.random.key(2))
    effective_state = effective.init(params, jax.random.key(3))
    writer = _writer(tensorboard_dir)
    records = []
    for step in range(1, steps + 1):
        # The gradient norm is the one at the point the step started from.
        measured_params = params
        params, opt_state, loss, grad_norm = train_step(params, opt_state, batch)
        if step % every:
            continue
        # The operator the step just taken linearises: its point, its ||g||, the
        # preconditioner Adam divided that step's update by.
        preconditioner = sam_eos.adam_preconditioner(opt_state, b2=B2, eps=EPS)
        rho_eff = sam_eos.effective_radius("sam", rho, grad_norm)
        result, sharpness_state = sharpness.update(sharpness_state, measured_params, batch)
        adam, effective_state = effective.update(
            effective_state, measured_params, batch, rho_eff=rho_eff,
            preconditioner=preconditioner)
        record = {"loss": float(loss), "grad_norm": float(grad_norm),
                  **result.scalars("sharpness"), **adam.scalars("effective_sharpness"),
                  "stability_threshold": edge}
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
          f"{record['sharpness/lambda_1']:8.3f}  effective "
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
    parser.add_argument("--rho", type=float, default=0.01)
    parser.add_argument("--tensorboard_dir", default="")
    args = parser.parse_args()
    records = run(args.steps, args.every, args.learning_rate, args.rho, args.tensorboard_dir)
    second_half = [r["edge_ratio"] for r in records[len(records) // 2:]]
    print(f"effective sharpness / Adam's edge over the second half: mean "
          f"{sum(second_half) / len(second_half):.3f}")


if __name__ == "__main__":
    main()
