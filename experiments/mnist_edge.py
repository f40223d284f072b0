"""The paper's central MNIST result at CPU scale: GD rides 2/eta, SAM rides the SAM edge.

    python3 -m experiments.mnist_edge --data_dir=../shared/data/tfds

Trains the paper's MLP (ReLU, squared loss; here 3 x 200 hidden units) full-batch on the first
2000 training images twice, with GD and with SAM (same step size and seed), checking the
Hessian every `--check_every` steps. Prints, for the second half of each run, the median of
sharpness / (2/eta) (GD) and sharpness / SAM edge (SAM), and draws both runs into one PNG.
Everything goes into `--output_dir` (default out/mnist_edge under the current directory):
raw_gd.txt, raw_sam.txt and mnist_edge.png; the README's figure is made with
`--figure=docs/mnist_edge.png`. Progress lines (a bar on a terminal) every
`--progress_every_seconds` of training.
"""

import argparse
import os

import jax
import numpy as np
from absl import logging
from matplotlib.figure import Figure

from image_classification import dataset, model
from sam_eos.loop import train


def parse_args(description: str = __doc__, name: str = "mnist_edge", *, mlp_width: int = 200,
               step_size: float = 1.0, check_every: int = 100) -> argparse.Namespace:
    """The MNIST experiments' arguments (this one's defaults, or another experiment's: its
    docstring, its `name` for the output folder and figure, and its defaults)."""
    parser = argparse.ArgumentParser(description=description.split("\n\n")[0])
    parser.add_argument("--data_dir", default=None, help="TFDS data directory with mnist.")
    parser.add_argument("--num_examples", type=int, default=2000)
    parser.add_argument("--mlp_width", type=int, default=mlp_width)
    parser.add_argument("--step_size", type=float, default=step_size)
    parser.add_argument("--rho", type=float, default=0.1)
    parser.add_argument("--steps", type=int, default=2000)
    parser.add_argument("--check_every", type=int, default=check_every)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output_dir", default=os.path.join("out", name),
                        help="Folder for the raw data and the figure.")
    parser.add_argument("--figure", default=None,
                        help=f"Where to write the figure (default: OUTPUT_DIR/{name}.png).")
    parser.add_argument("--progress_every_seconds", type=float, default=30.0,
                        help="Seconds of training between progress lines (0: off).")
    return parser.parse_args()


def load_problem(data_dir: str | None, num_examples: int, mlp_width: int):
    """The first `num_examples` MNIST training images as one full batch, and the paper's MLP
    (ReLU, 3 hidden layers of `mlp_width`, squared loss): `(data, network)`."""
    data = dataset.load("mnist", data_dir=data_dir, batch_size=num_examples,
                        mini_training_set_num_batches=1)
    network = model.make_network("MLP", data.num_classes, mlp_depth=4, mlp_width=mlp_width,
                                 cnn_num_blocks=1, cnn_layers_per_block=1,
                                 cnn_feature_multiplier=1)
    return data, network


def run_one(args, data, network, rho: float) -> np.ndarray:
    """One full-batch run; returns its rows as (step, sharpness, sam_edge, 2/eta, loss)."""
    params = jax.jit(network.init)(jax.random.PRNGKey(args.seed), data.train_images[:1])
    name = "sam" if rho > 0 else "gd"
    config = train.TrainConfig(
        step_size=args.step_size, rho=rho, time_limit_in_hours=1.0, max_steps=args.steps,
        hessian_check_every_steps=args.check_every, seed=args.seed,
        progress_every_seconds=args.progress_every_seconds,
        outputs=train.Outputs(raw_data=os.path.join(args.output_dir, f"raw_{name}.txt")),
        run_name=f"MLP on {args.num_examples} MNIST images, rho={rho:g}, eta={args.step_size:g}",
    )
    result = train.run(model.make_loss_fn(network), params,
                       train.FullBatch((data.train_images, data.train_labels)), config)
    columns = ("step", "hessian_norm", "sam_edge", "two_over_eta", "loss")
    return np.array([[row[c] for c in columns] for row in result.rows])


def main() -> None:
    args = parse_args()
    logging.set_verbosity(logging.INFO)  # the checks' and progress lines
    os.makedirs(args.output_dir, exist_ok=True)
    figure_path = args.figure or os.path.join(args.output_dir, "mnist_edge.png")
    data, network = load_problem(args.data_dir, args.num_examples, args.mlp_width)
    gd = run_one(args, data, network, 0.0)
    sam = run_one(args, data, network, args.rho)
    half_gd, half_sam = gd[len(gd) // 2:], sam[len(sam) // 2:]
    gd_ratio = np.median(half_gd[:, 1] / half_gd[:, 3])
    sam_ratio = np.median(half_sam[:, 1] / half_sam[:, 2])
    sam_vs_gd_edge = np.median(half_sam[:, 1] / half_sam[:, 3])
    print(f"{len(data.train_images)} images, MLP 3x{args.mlp_width}, eta={args.step_size:g}, "
          f"rho={args.rho:g}, {args.steps} steps, checks every {args.check_every}")
    print(f"GD : median sharpness / (2/eta)   over the second half = {gd_ratio:.3f}")
    print(f"SAM: median sharpness / SAM edge  over the second half = {sam_ratio:.3f}")
    print(f"SAM: median sharpness / (2/eta)   over the second half = {sam_vs_gd_edge:.3f}")
    print(f"final training loss: GD {gd[-1, 4]:.5f}, SAM {sam[-1, 4]:.5f}")

    figure = Figure(figsize=(7, 4.2))
    ax = figure.subplots()
    ax.plot(gd[:, 0], gd[:, 1], "C0.-", label="GD sharpness")
    ax.plot(sam[:, 0], sam[:, 1], "C3.-", label=f"SAM sharpness (rho={args.rho:g})")
    ax.plot(sam[:, 0], sam[:, 2], "C1--", label="SAM edge")
    ax.axhline(2 / args.step_size, color="C2", linestyle=":", label="2/eta")
    ax.set_xlabel("step")
    ax.set_ylabel("top Hessian eigenvalue")
    ax.set_title(f"MLP on {len(data.train_images)} MNIST images, full batch, "
                 f"eta={args.step_size:g}", fontsize=10)
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    figure.tight_layout()
    os.makedirs(os.path.dirname(figure_path) or ".", exist_ok=True)
    figure.savefig(figure_path, dpi=110)
    print("files written:")
    for path in (os.path.join(args.output_dir, "raw_gd.txt"),
                 os.path.join(args.output_dir, "raw_sam.txt"), figure_path):
        print(f"  {os.path.abspath(path)}")


if __name__ == "__main__":
    main()
