"""Which layer is at the edge: GD and SAM on MNIST, each layer's sharpness and the top
eigenvector's share per layer at every check.

    python3 -m experiments.mnist_layers --data_dir=../shared/data/tfds

Trains the paper's MLP shape (ReLU, squared loss, 3 hidden layers; narrowed to `--mlp_width`
units) full-batch on the first `--num_examples` training images, with GD and with SAM (same
step size and seed), checking every `--check_every` steps with `--layer_sharpness` on. Over the
second half of each run (at the edge) it prints, for every layer (Haiku module), the median of
its share of the top eigenvector and of its sharpness (the top eigenvalue of its diagonal
Hessian block) over the run's edge: 2/eta for GD, the SAM edge for SAM. It writes raw_gd.txt,
raw_sam.txt (with the layer columns) and mnist_layers.png (both runs side by side, as
layers.pdf draws them) into `--output_dir` (default out/mnist_layers); the README's figure is
made with `--figure=docs/mnist_layers.png`.
"""

import os

import jax
import numpy as np
from absl import logging

from experiments.mnist_edge import load_problem, parse_args
from image_classification import model
from sam_eos.loop import measurements, train
from sam_eos.reports import figures, raw_data


def run_one(args, data, network, rho: float) -> figures.RunData:
    """One full-batch run with the layers' columns; its raw data as RunData."""
    params = jax.jit(network.init)(jax.random.PRNGKey(args.seed), data.train_images[:1])
    name = "sam" if rho > 0 else "gd"
    path = os.path.join(args.output_dir, f"raw_{name}.txt")
    config = train.TrainConfig(
        step_size=args.step_size, rho=rho, time_limit_in_hours=1.0, max_steps=args.steps,
        hessian_check_every_steps=args.check_every, seed=args.seed,
        progress_every_seconds=args.progress_every_seconds,
        spectrum=measurements.SpectrumOptions(layer_sharpness=True),
        outputs=train.Outputs(raw_data=path),
        run_name=f"MLP 3x{args.mlp_width} on {args.num_examples} MNIST images, "
                 f"eta={args.step_size:g}",
    )
    train.run(model.make_loss_fn(network), params,
              train.FullBatch((data.train_images, data.train_labels)), config)
    return figures.RunData(*raw_data.read_raw_data(path))


def at_the_edge(run: figures.RunData) -> dict[str, dict[str, float]]:
    """Per layer, over the run's second half: the median share of the top eigenvector and the
    median of the layer's sharpness over the run's edge (the SAM edge; 2/eta at rho 0)."""
    half = slice(len(run.rows) // 2, None)
    edge = run.column("sam_edge")[half]
    return {name: {"share": float(np.median(run.column(f"layer_share/{name}")[half])),
                   "sharpness / edge": float(np.median(
                       run.column(f"layer_sharpness/{name}")[half] / edge))}
            for name in figures.layer_names_of(run)}


def report(label: str, run: figures.RunData) -> None:
    half = slice(len(run.rows) // 2, None)
    whole = float(np.median(run.column("lambda_max")[half] / run.column("sam_edge")[half]))
    layers = at_the_edge(run)
    carrier = max(layers, key=lambda name: layers[name]["share"])
    print(f"{label}: whole network, median lambda_max / edge = {whole:.3f}; the top "
          f"eigenvector lies mostly in {carrier}")
    for name, values in layers.items():
        print(f"  {name:10s} share {values['share']:.3f}   sharpness / edge "
              f"{values['sharpness / edge']:.3f}")


def main() -> None:
    args = parse_args(__doc__, "mnist_layers", mlp_width=64, step_size=2.0, check_every=25)
    logging.set_verbosity(logging.INFO)
    os.makedirs(args.output_dir, exist_ok=True)
    figure_path = args.figure or os.path.join(args.output_dir, "mnist_layers.png")
    data, network = load_problem(args.data_dir, args.num_examples, args.mlp_width)
    gd = run_one(args, data, network, 0.0)
    sam = run_one(args, data, network, args.rho)
    print(f"{len(data.train_images)} images, MLP 3x{args.mlp_width}, eta={args.step_size:g}, "
          f"rho={args.rho:g}, {args.steps} steps, checks every {args.check_every}; medians "
          "over the second half (edge: 2/eta for GD, the SAM edge for SAM)")
    report("GD ", gd)
    report("SAM", sam)
    os.makedirs(os.path.dirname(figure_path) or ".", exist_ok=True)
    figures.make_layers_figure([gd, sam]).savefig(figure_path, dpi=110)
    print("files written:")
    for path in (os.path.join(args.output_dir, "raw_gd.txt"),
                 os.path.join(args.output_dir, "raw_sam.txt"), figure_path):
        print(f"  {os.path.abspath(path)}")


if __name__ == "__main__":
    main()
