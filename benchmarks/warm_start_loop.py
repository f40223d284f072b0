"""Warm-started checks measured through the training loop (`train.run`, the programs' flags).

`python3 -m benchmarks.warm_start_loop [--steps 1000] [--every 50]` trains the MNIST MLP 3 x 200
(squared loss) full batch on the first 2000 images of the MNIST stand-in with SAM (eta 0.5,
rho 0.1), a check every `--every` steps, four times: warm Lanczos (the default), cold Lanczos
(`eigensolver_warm_start=False`), power iteration, and a cold reference at tolerance 1e-8. It
prints one markdown table from the raw data's `hessian_vector_products` and `check_seconds`
columns; the worst error is of lambda_max against the reference run's at the same step.
"""

import argparse
import pathlib
import tempfile

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks import problems
from sam_eos.loop import train
from sam_eos.reports.raw_data import read_raw_data

STEP_SIZE, RHO, NUM_IMAGES = 0.5, 0.1, 2000
RUNS = {
    "warm Lanczos (defaults)": {},
    "cold Lanczos (--eigensolver_warm_start=false)": {"eigensolver_warm_start": False},
    "power (--eigensolver=power)": {"eigensolver": "power"},
    "reference: cold Lanczos, tolerance 1e-8": {
        "eigensolver_warm_start": False, "eigensolver_tolerance": 1e-8,
        "eigensolver_max_iterations": 300},
}


def run_table(steps: int, every: int, data_dir: pathlib.Path, directory: str) -> dict:
    """Each run's raw-data columns by name."""
    network, loss_fn = problems.make_mlp(200, 4)
    (images, labels), _ = problems.mnist_batch(data_dir, NUM_IMAGES)
    batch = (jnp.asarray(images), jnp.asarray(labels))
    params = network.init(jax.random.PRNGKey(0), batch[0][:1])
    tables = {}
    for index, (name, changes) in enumerate(RUNS.items()):
        raw = f"{directory}/raw_{index}.txt"
        config = train.TrainConfig(
            step_size=STEP_SIZE, rho=RHO, max_steps=steps, hessian_check_every_steps=every,
            time_limit_in_hours=10.0, outputs=train.Outputs(raw_data=raw), **changes)
        train.run(loss_fn, params, train.FullBatch(batch), config)
        _, columns, table = read_raw_data(raw)
        tables[name] = {column: table[:, i] for i, column in enumerate(columns)}
    return tables


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=1000)
    parser.add_argument("--every", type=int, default=50)
    parser.add_argument("--data_dir", default=str(problems.DEFAULT_DATA_DIR))
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as directory:
        tables = run_table(args.steps, args.every, pathlib.Path(args.data_dir), directory)
    reference = tables.pop("reference: cold Lanczos, tolerance 1e-8")["lambda_max"]
    power_seconds = np.sum(tables["power (--eigensolver=power)"]["check_seconds"])
    print("| run | checks | median HVPs after the first | worst error vs reference | "
          "total check s | vs power |")
    print("|---|---|---|---|---|---|")
    for name, table in tables.items():
        error = np.max(np.abs(table["lambda_max"] - reference) / np.abs(reference))
        seconds = np.sum(table["check_seconds"])
        print(f"| {name} | {len(table['step'])} | "
              f"{np.median(table['hessian_vector_products'][1:]):g} | {error:.1e} | "
              f"{seconds:.2f} | {seconds / power_seconds:.2f}x |")


if __name__ == "__main__":
    main()
