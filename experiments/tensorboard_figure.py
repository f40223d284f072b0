"""Draws a run's TensorBoard scalars from its event files, as TensorBoard's scalar panels do.

    ./run.sh --tensorboard_dir=/tmp/sam_eos_tb
    python3 -m experiments.tensorboard_figure --log_dir=/tmp/sam_eos_tb \
        --figure=docs/tensorboard.png

Reads the points with `sam_eos.reports.tensorboard_writer.read_scalars` (what TensorBoard
shows after a resume's purge) and draws, over the step, the sharpness beside its edges
(lambda_max, sam_edge, two_over_eta) and the loss: the curves `tensorboard --logdir` shows.
"""

import argparse

from matplotlib.figure import Figure

from sam_eos.reports.tensorboard_writer import read_scalars

PANELS = (("sharpness and its edges", ("lambda_max", "sam_edge", "two_over_eta")),
          ("training loss", ("loss",)))


def draw(log_dir: str, figure_path: str) -> None:
    scalars = read_scalars(log_dir)
    figure = Figure(figsize=(10, 3.6), layout="constrained")
    for axes, (title, tags) in zip(figure.subplots(1, len(PANELS)), PANELS, strict=True):
        for tag in tags:
            if tag in scalars:
                steps, values = scalars[tag]
                axes.plot(steps, values, marker=".", label=tag)
        axes.set(title=title, xlabel="step")
        axes.grid(alpha=0.3)
        axes.legend()
    figure.suptitle(f"TensorBoard scalars of {log_dir} (drawn from its event files)")
    figure.savefig(figure_path, dpi=110)
    print(f"wrote {figure_path}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--log_dir", required=True)
    parser.add_argument("--figure", default="tensorboard.png")
    args = parser.parse_args()
    draw(args.log_dir, args.figure)


if __name__ == "__main__":
    main()
