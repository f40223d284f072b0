"""The four PDF plots of a run, drawn from its raw-data rows (matplotlib, headless).

Each plot is against training time, skips non-finite values (a diverged or failed check), and
is skipped entirely when its output path is empty.
"""

import os
from collections.abc import Sequence
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from sam_eos.errors import InputError  # noqa: E402

PLOT_NAMES = ("eigs_curve", "eigs_se_only", "alignment_curve", "loss_curve")


def check_plot_format(path: str, flag_name: str) -> None:
    """Fail now, not after training, if matplotlib cannot write a plot in `path`'s format."""
    extension = os.path.splitext(path)[1].lstrip(".").lower()
    figure = plt.figure()
    supported = figure.canvas.get_supported_filetypes()
    plt.close(figure)
    if extension not in supported:
        formats = ", ".join("." + name for name in sorted(supported))
        raise InputError(f"--{flag_name}={path}: plots can be written as {formats}; the path "
                         f"needs one of these extensions")


def _time_axis(hours: np.ndarray) -> tuple[np.ndarray, str]:
    """Training time in the unit that reads best: hours, minutes or seconds."""
    longest = float(np.nanmax(hours)) if hours.size else 0.0
    if longest >= 1.0:
        return hours, "training time (hours)"
    if longest >= 1.0 / 60:
        return hours * 60, "training time (minutes)"
    return hours * 3600, "training time (seconds)"


def _series(ax, x: np.ndarray, y: np.ndarray, **style) -> None:
    finite = np.isfinite(x) & np.isfinite(y)
    ax.plot(x[finite], y[finite], **style)


def draw_plots(
    rows: np.ndarray,
    columns: Sequence[str],
    settings: dict[str, Any],
    outputs: dict[str, str],
) -> list[str]:
    """Draws the plots named in `outputs` (keys from PLOT_NAMES, values PDF paths).

    Args:
      rows: [num_checks, num_columns] raw data; columns: their names; settings: the run's
        settings (its `run_name` becomes the title).
    Returns:
      The paths written.
    """
    data = {name: rows[:, i] for i, name in enumerate(columns)} if rows.size else {}
    empty = np.zeros((0,))
    column = lambda name: data.get(name, empty)  # noqa: E731
    time, time_label = _time_axis(column("time_hours"))
    title = settings.get("run_name", "sam_eos run")
    further = [name for name in columns if name.startswith("eig_")]
    written, failed = [], []

    def eigenvalues(ax) -> None:
        _series(ax, time, column("hessian_norm"), label="sharpness (Hessian operator norm)",
                color="C0", marker=".")
        for i, name in enumerate(further):
            _series(ax, time, column(name), label=f"eigenvalue {name[4:]}", color=f"C{i + 3}",
                    marker=".", linewidth=0.8)
        _series(ax, time, column("sam_edge"), label="SAM edge", color="C1", linestyle="--")

    def eigs_curve(ax) -> None:
        eigenvalues(ax)
        _series(ax, time, column("two_over_eta"), label="2/eta", color="C2", linestyle=":")
        ax.set_ylabel("eigenvalue")

    def eigs_se_only(ax) -> None:
        eigenvalues(ax)
        ax.set_ylabel("eigenvalue")

    def alignment_curve(ax) -> None:
        _series(ax, time, column("g_alignment"), label="gradient", color="C0", marker=".")
        _series(ax, time, column("sg_alignment"), label="SAM gradient", color="C1", marker=".")
        ax.set_ylabel("alignment with the principal direction")
        ax.set_ylim(-0.02, 1.02)

    def loss_curve(ax) -> None:
        loss = column("loss")
        _series(ax, time, loss, label="training loss", color="C0", marker=".")
        if np.any(np.isfinite(loss)) and np.all(loss[np.isfinite(loss)] > 0):
            ax.set_yscale("log")
        ax.set_ylabel("loss")

    drawers = {
        "eigs_curve": eigs_curve,
        "eigs_se_only": eigs_se_only,
        "alignment_curve": alignment_curve,
        "loss_curve": loss_curve,
    }
    for name, path in outputs.items():
        if not path:
            continue
        figure, ax = plt.subplots(figsize=(6.4, 4.2))
        try:
            drawers[name](ax)
            ax.set_xlabel(time_label)
            ax.set_title(title, fontsize=9)
            ax.legend(fontsize=8)
            ax.grid(alpha=0.3)
            figure.tight_layout()
            figure.savefig(path)
            written.append(path)
        except (OSError, ValueError) as error:  # one plot failing must not stop the others
            failed.append(f"{path}: {error}")
        finally:
            plt.close(figure)
    if failed:
        raise RuntimeError("could not draw " + "; ".join(failed))
    return written
