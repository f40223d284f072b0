"""Each optimizer at its own edge: the MNIST MLP under GD, momentum, Nesterov, Adam, SAM with
momentum and USAM, each run's effective sharpness measured against its own threshold T.

    python3 -m experiments.optimizer_edges --data_dir=../shared/data/tfds

Trains the paper's MLP (ReLU, squared loss; 3 x 200 here) full batch on the first 2000 MNIST
training images once per method (`METHODS`), checking every `--check_every` steps, and prints
each run's median of effective sharpness / T over the second half of its checks (1 at the
edge). Writes raw_<method>.txt into `--output_dir` (default out/optimizer_edges) and one figure,
`--figure` (default OUTPUT_DIR/optimizer_edges.png): effective sharpness / T against steps.

The step sizes put every SGD-family threshold at 2 to 4, a curvature this network reaches
within a few hundred steps; Adam's bounds the preconditioned sharpness, which is far larger.
"""

import argparse
import os

import jax
import numpy as np
from absl import logging
from matplotlib.figure import Figure

from experiments.mnist_edge import load_problem
from image_classification import model
from sam_eos.loop import train

METHODS = {  # name: TrainConfig settings
    "GD": dict(step_size=1.0),
    "momentum 0.9": dict(optimizer="momentum", momentum=0.9, step_size=1.9),
    "Nesterov 0.9": dict(optimizer="nesterov", momentum=0.9, step_size=0.68),
    "Adam": dict(optimizer="adam", step_size=1e-3),
    "SAM + momentum 0.6": dict(optimizer="momentum", momentum=0.6, step_size=0.8, rho=0.05),
    "USAM": dict(sam_variant="usam", step_size=1.0, rho=0.1),
}
SOURCES = {  # where each threshold comes from
    "GD": "2/eta (Cohen et al. 2021)",
    "momentum 0.9": "(2 + 2 beta)/eta (Cohen et al. 2021)",
    "Nesterov 0.9": "(2 + 2 beta)/((1 + 2 beta) eta) (derived here for optax's Nesterov)",
    "Adam": "(2 + 2 b1)/((1 - b1) eta) on P^-1 H (Cohen et al. 2022)",
    "SAM + momentum 0.6": "(2 + 2 beta)/eta on H + (rho/||g||) H^2 (our linearisation)",
    "USAM": "2/eta on H + rho H^2 (Agarwala and Dauphin 2023)",
}


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data_dir", default=None, help="TFDS data directory with mnist.")
    parser.add_argument("--num_examples", type=int, default=2000)
    parser.add_argument("--mlp_width", type=int, default=200)
    parser.add_argument("--steps", type=int, default=1000)
    parser.add_argument("--check_every", type=int, default=50)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--methods", default=",".join(METHODS),
                        help="Comma-separated names from METHODS (default: all).")
    parser.add_argument("--output_dir", default=os.path.join("out", "optimizer_edges"))
    parser.add_argument("--figure", default=None,
                        help="Default: OUTPUT_DIR/optimizer_edges.png.")
    parser.add_argument("--progress_every_seconds", type=float, default=30.0)
    return parser.parse_args()


def file_name(method: str) -> str:
    return "raw_" + "".join(c if c.isalnum() else "_" for c in method.lower()) + ".txt"


def run_method(args, data, network, method: str) -> np.ndarray:
    """One full-batch run; rows (step, effective sharpness / T, loss)."""
    params = jax.jit(network.init)(jax.random.PRNGKey(args.seed), data.train_images[:1])
    config = train.TrainConfig(
        time_limit_in_hours=1.0, max_steps=args.steps, hessian_check_every_steps=args.check_every,
        seed=args.seed, progress_every_seconds=args.progress_every_seconds,
        outputs=train.Outputs(raw_data=os.path.join(args.output_dir, file_name(method))),
        run_name=f"MLP on {args.num_examples} MNIST images: {method}", **METHODS[method])
    result = train.run(model.make_loss_fn(network), params,
                       train.FullBatch((data.train_images, data.train_labels)), config)
    rows = []
    for row in result.rows:
        # GD has no method columns: its effective sharpness is the sharpness, T = 2/eta.
        sharpness = row.get("effective_sharpness", row["lambda_max"])
        threshold = row.get("stability_threshold", row["two_over_eta"])
        rows.append((row["step"], sharpness / threshold, row["loss"]))
    return np.array(rows)


def second_half_median(rows: np.ndarray) -> float:
    return float(np.nanmedian(rows[len(rows) // 2:, 1]))


def draw(results: dict[str, np.ndarray], path: str, title: str) -> None:
    figure = Figure(figsize=(7.5, 4.4))
    ax = figure.subplots()
    for i, (method, rows) in enumerate(results.items()):
        finite = np.isfinite(rows[:, 1])
        ax.plot(rows[finite, 0], rows[finite, 1], ".-", color=f"C{i}", markersize=4,
                label=f"{method} (median {second_half_median(rows):.3f})")
    ax.axhline(1.0, color="0.2", linestyle=":", label="edge: effective sharpness = T")
    ax.set_xlabel("step")
    ax.set_ylabel("effective sharpness / threshold T")
    ax.set_ylim(0, 1.6)
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=7, loc="lower right")
    ax.grid(alpha=0.3)
    figure.tight_layout()
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    figure.savefig(path, dpi=110)


def main() -> None:
    args = parse_args()
    logging.set_verbosity(logging.INFO)
    os.makedirs(args.output_dir, exist_ok=True)
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        raise SystemExit(f"unknown methods {unknown}; choose from {list(METHODS)}")
    data, network = load_problem(args.data_dir, args.num_examples, args.mlp_width)
    results = {method: run_method(args, data, network, method) for method in methods}
    title = (f"MLP 3x{args.mlp_width} on {len(data.train_images)} MNIST images, full batch, "
             f"{args.steps} steps:\neach method's effective sharpness over its own threshold")
    figure_path = args.figure or os.path.join(args.output_dir, "optimizer_edges.png")
    draw(results, figure_path, title)
    print(f"{len(data.train_images)} images, MLP 3x{args.mlp_width}, {args.steps} steps, "
          f"checks every {args.check_every}")
    print("| method | settings | threshold T | median effective sharpness / T, 2nd half |")
    print("|---|---|---|---|")
    for method, rows in results.items():
        settings = ", ".join(f"{k} {v:g}" if isinstance(v, float) else f"{k} {v}"
                             for k, v in METHODS[method].items())
        print(f"| {method} | {settings} | {SOURCES[method]} | {second_half_median(rows):.3f} |")
    print("files written:")
    for path in [*(os.path.join(args.output_dir, file_name(m)) for m in methods), figure_path]:
        print(f"  {os.path.abspath(path)}")


if __name__ == "__main__":
    main()
