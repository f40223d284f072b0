"""Track sharpness inside your own training loop: an optax.adam loop on a small MLP over
generated data, measuring Adam's preconditioned sharpness every few steps against its edge.

    python3 examples/track_your_own_loop.py [--steps 300] [--every 25] [--learning_rate 0.01]

Adam's stability depends on the preconditioned sharpness lambda_max(P^-1 H), with P Adam's own
sqrt(v_hat) + eps, and its edge is (2 + 2 b1) / ((1 - b1) eta) = 38 / eta at b1 = 0.9.
"""

import argparse

import jax
import jax.numpy as jnp
import optax

import sam_eos


def init_mlp(key, sizes):
    keys = jax.random.split(key, len(sizes) - 1)
    return [{"w": jax.random.normal(k, (m, n)) / jnp.sqrt(m), "b": jnp.zeros(n)}
            for k, m, n in zip(keys, sizes[:-1], sizes[1:], strict=True)]


def loss_fn(params, batch):
    x, y = batch
    for layer in params[:-1]:
        x = jnp.tanh(x @ layer["w"] + layer["b"])
    prediction = x @ params[-1]["w"] + params[-1]["b"]
    return jnp.mean((prediction - y) ** 2)


def generated_data(key, num_examples=256, dim=8):
    kx, kw = jax.random.split(key)
    x = jax.random.normal(kx, (num_examples, dim))
    y = jnp.sin(x @ jax.random.normal(kw, (dim, 1)))
    return x, y


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--every", type=int, default=25)
    parser.add_argument("--learning_rate", type=float, default=0.01)
    args = parser.parse_args()

    key = jax.random.key(0)
    params = init_mlp(key, [8, 32, 32, 1])
    batch = generated_data(jax.random.fold_in(key, 1))
    b1, b2, eps = 0.9, 0.999, 1e-8
    optimizer = optax.adam(args.learning_rate, b1=b1, b2=b2, eps=eps)
    opt_state = optimizer.init(params)

    @jax.jit
    def train_step(params, opt_state, batch):
        loss, grads = jax.value_and_grad(loss_fn)(params, batch)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    edge = sam_eos.stability_threshold("adam", args.learning_rate, b1=b1)
    tracker = sam_eos.SharpnessTracker(loss_fn, k=1)
    tracker_state = tracker.init(params, jax.random.fold_in(key, 2))
    print(f"Adam, eta={args.learning_rate:g}: edge (2 + 2 b1) / ((1 - b1) eta) = {edge:.1f}")
    for step in range(1, args.steps + 1):
        params, opt_state, loss = train_step(params, opt_state, batch)
        if step % args.every == 0:
            preconditioner = sam_eos.adam_preconditioner(opt_state, b2=b2, eps=eps)
            result, tracker_state = tracker.update(tracker_state, params, batch,
                                                   preconditioner=preconditioner)
            sharpness = float(result.eigenvalues[0])
            print(f"step {step:4d}  loss {float(loss):.5f}  preconditioned sharpness "
                  f"{sharpness:9.2f}  / edge {sharpness / edge:5.3f}  "
                  f"({int(result.hessian_vector_products)} HVPs)")


if __name__ == "__main__":
    main()
