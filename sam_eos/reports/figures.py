r"""The four PDF plots of one run, or of several overlaid (matplotlib, headless).

Plots are against steps (`x_axis="steps"`, the default) or training time (`x_axis="hours"`:
hours, minutes or seconds, whichever reads best, named on the axis); files without a `step`
column (the original program's) are drawn against time. Non-finite values are skipped; a plot
whose output path is empty is not drawn.

The eigenvalue plots draw the sharpness (operator norm), lambda_max where the two differ
(lambda_min dominated), the `batch_sharpness`, `sam_point_sharpness` and further eigenvalue
columns when present, the SAM edge and (eigs_curve) 2/eta. The linear y-axis is clipped so one
early outlier cannot squash the rest: its top is the smaller of the largest value and
`OFF_SCALE_FACTOR` times the scale (the largest of 2/eta, the SAM edge and the 95th percentile of
the second half of the checks), so the reference lines stay in view. Below zero the later
checks' lower tail sets the bottom likewise. Values beyond the axis are marked with a triangle
on its edge and counted in the title. Several runs share one figure: one colour per run,
labelled from its settings (GD or SAM rho, eta); one 2/eta line when they share eta.
"""

import dataclasses
import os
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
from matplotlib.figure import Figure

from sam_eos.errors import InputError
from sam_eos.reports.paths import X_AXES

OFF_SCALE_FACTOR = 2.0
BELOW_AXIS_FRACTION = 0.25
SHARPNESS_SERIES = (  # column, label, style; drawn when the column has a finite value
    ("hessian_norm", "sharpness (operator norm)", {"linestyle": "-", "marker": "."}),
    ("lambda_max", r"$\lambda_{\max}$", {"linestyle": "--", "marker": "x", "markersize": 3,
                                         "linewidth": 0.8}),
    ("batch_sharpness", "batch sharpness", {"linestyle": "-.", "marker": "+"}),
    ("sam_point_sharpness", "sharpness at the SAM point", {"linestyle": (0, (3, 1, 1, 1)),
                                                           "marker": "1"}),
)
SINGLE_RUN_COLOURS = {"hessian_norm": "C0", "sam_edge": "C1", "two_over_eta": "C2",
                      "effective_sharpness": "C9", "stability_threshold": "C8",
                      "lambda_max": "C3", "batch_sharpness": "C4", "sam_point_sharpness": "C5",
                      "g_alignment": "C0", "sg_alignment": "C1", "loss": "C0"}


@dataclasses.dataclass(frozen=True)
class RunData:
    """One run's raw data: settings, column names, rows [num_checks, num_columns]."""

    settings: dict[str, Any]
    columns: Sequence[str]
    rows: np.ndarray

    def column(self, name: str) -> np.ndarray | None:
        """The column's values (one per check), or None when the file has no such column."""
        if name not in self.columns:
            return None
        if self.rows.size == 0:
            return np.zeros((0,))
        return self.rows[:, list(self.columns).index(name)].astype(np.float64)


def check_plot_format(path: str, flag_name: str) -> None:
    """Fail now, not after training, if matplotlib cannot write a plot in `path`'s format."""
    extension = os.path.splitext(path)[1].lstrip(".").lower()
    supported = Figure().canvas.get_supported_filetypes()
    if extension not in supported:
        formats = ", ".join("." + name for name in sorted(supported))
        raise InputError(f"--{flag_name}={path}: plots can be written as {formats}; the path "
                         f"needs one of these extensions")


def method_label(settings: dict[str, Any]) -> str:
    """The base optimizer and SAM variant the settings name: "GD", "momentum 0.9 + SAM
    rho=0.05", "Adam b1=0.9 + USAM rho=0.01" (runs without an optimizer setting are GD)."""
    optimizer, rho = settings.get("optimizer", "sgd"), settings.get("rho") or 0
    beta, b1 = settings.get("momentum", 0.9), settings.get("adam_b1", 0.9)
    base = {"momentum": f"momentum {beta:g}", "nesterov": f"Nesterov {beta:g}",
            "adam": f"Adam b1={b1:g}"}.get(optimizer, "GD")
    if rho == 0:
        return base
    variant = "USAM" if settings.get("sam_variant") == "usam" else "SAM"
    return f"{variant} rho={rho:g}" if base == "GD" else f"{base} + {variant} rho={rho:g}"


def run_label(settings: dict[str, Any]) -> str:
    """A run's legend name from its settings: "GD, eta=1", "momentum 0.9 + SAM rho=0.1, eta=1"."""
    rho, eta = settings.get("rho"), settings.get("step_size")
    parts = []
    if rho is not None:
        parts.append(method_label(settings))
    if eta is not None:
        parts.append(f"eta={eta:g}")
    return ", ".join(parts) or str(settings.get("run_name", "run"))


def time_unit(longest_hours: float) -> tuple[float, str]:
    """(factor from hours, unit name) that reads best for a run of `longest_hours`."""
    if longest_hours >= 1.0:
        return 1.0, "hours"
    if longest_hours >= 1.0 / 60:
        return 60.0, "minutes"
    return 3600.0, "seconds"


def _finite(values: np.ndarray) -> np.ndarray:
    return values[np.isfinite(values)]


def eigenvalue_limits(
    series: Sequence[np.ndarray], references: Sequence[np.ndarray]
) -> tuple[float, float] | None:
    """The eigenvalue plots' y-range (bottom, top), by the module docstring's rule; None leaves
    matplotlib's. `series`: the drawn eigenvalue columns in check order; `references`: the drawn
    SAM edge and 2/eta columns."""
    values = np.concatenate([_finite(v) for v in (*series, *references)] or [np.zeros(0)])
    if values.size == 0:
        return None
    later = np.concatenate([_finite(v[len(v) // 2:]) for v in series] or [np.zeros(0)])
    reference_values = np.concatenate([_finite(v) for v in references] or [np.zeros(0)])
    scale = max([float(np.max(reference_values))] if reference_values.size else [0.0])
    if later.size:
        scale = max(scale, float(np.quantile(later, 0.95)))
    largest = float(np.max(values))
    top = min(1.05 * largest, OFF_SCALE_FACTOR * scale) if scale > 0 else 1.05 * largest
    smallest = float(np.min(values))
    # Below zero likewise: the later checks' 5th percentile plus a margin of BELOW_AXIS_FRACTION
    # of the top, so one early negative value (a batch sharpness of -40 at step 0) cannot squash.
    low = min(0.0, float(np.quantile(later, 0.05))) if later.size else 0.0
    bottom = 0.0 if smallest >= 0 else max(1.05 * smallest, 1.05 * low - BELOW_AXIS_FRACTION * top)
    if not top > bottom:
        return None
    return bottom, top


def _common_title(runs: Sequence[RunData]) -> str:
    names = [str(run.settings.get("run_name", "sam_eos run")) for run in runs]
    if len(set(names)) == 1:
        return names[0]
    prefixes = {name.split(":")[0] for name in names}
    return prefixes.pop() if len(prefixes) == 1 else ""


def _x_data(runs: Sequence[RunData], x_axis: str) -> tuple[list[np.ndarray], str, str]:
    """(x values per run, axis label, unit for notes); "steps" without step columns gives time."""
    if x_axis not in X_AXES:
        raise ValueError(f"x_axis must be one of {X_AXES} (got {x_axis!r})")
    if x_axis == "steps" and all(run.column("step") is not None for run in runs):
        return [run.column("step") for run in runs], "step", "step"
    hours = [run.column("time_hours") for run in runs]
    hours = [np.zeros(len(run.rows)) if h is None else h for h, run in zip(hours, runs,
                                                                             strict=True)]
    longest = max((float(np.max(_finite(h))) for h in hours if _finite(h).size), default=0.0)
    factor, unit = time_unit(longest)
    return [h * factor for h in hours], f"training time ({unit})", unit


def _draw(ax, x: np.ndarray, y: np.ndarray | None, **style) -> bool:
    """Plots the finite points of (x, y); False (nothing drawn) when there are none."""
    if y is None:
        return False
    finite = np.isfinite(x) & np.isfinite(y)
    if not np.any(finite):
        return False
    ax.plot(x[finite], y[finite], **style)
    return True


def _differs(a: np.ndarray | None, b: np.ndarray | None) -> bool:
    """Whether column a has a finite value not equal to b's (so both are worth drawing)."""
    if a is None or b is None:
        return a is not None
    finite = np.isfinite(a)
    return bool(np.any(finite & ~np.isclose(a, b, rtol=1e-9, atol=0.0)))


class _Figure:
    """Draws one plot kind for several runs: colours, labels, x data."""

    def __init__(self, runs: Sequence[RunData], xs: list[np.ndarray], ax):
        self.runs, self.xs, self.ax = runs, xs, ax
        self.several = len(runs) > 1
        self.labels = [run_label(run.settings) for run in runs]
        self.off_scale: list[tuple[float, float]] = []  # (value, x) above the y-range
        self.below_scale: list[tuple[float, float]] = []  # (value, x) below it

    def style(self, i: int, column: str, label: str, **style) -> dict[str, Any]:
        """One colour per run when there are several (series differ by style), else per column."""
        colour = f"C{i % 10}" if self.several else SINGLE_RUN_COLOURS.get(column, "C6")
        return {"color": colour, "label": f"{self.labels[i]}: {label}" if self.several else label,
                **style}

    def eigenvalues(self, with_two_over_eta: bool) -> None:
        ax = self.ax
        drawn: list[tuple[np.ndarray, np.ndarray]] = []  # (x, eigenvalues) per series
        references: list[np.ndarray] = []
        etas = {float(v) for run in self.runs for v in _finite(_column_or_empty(run,
                                                                                "two_over_eta"))}
        one_two_over_eta = with_two_over_eta and self.several and len(etas) == 1
        for i, (run, x) in enumerate(zip(self.runs, self.xs, strict=True)):
            norm = run.column("hessian_norm")
            threshold = run.column("stability_threshold")
            if threshold is not None:  # another method: its effective sharpness and edge
                drawn += self._effective(i, run, x, threshold)
            adam = run.settings.get("optimizer") == "adam"
            for column, label, style in () if adam else SHARPNESS_SERIES:
                values = run.column(column)
                if column == "lambda_max" and not _differs(values, norm):
                    continue
                if _draw(ax, x, values, **self.style(i, column, label, **style)):
                    drawn.append((x, values))
            further = [name for name in run.columns if name.startswith("eig_")]
            for j, name in enumerate(further):
                style = self.style(i, name, f"eigenvalue {name[4:]}", marker=".",
                                   linewidth=0.6, alpha=0.7)
                if not self.several:
                    style["color"] = f"C{(j + 6) % 10}"
                if _draw(ax, x, run.column(name), **style):
                    drawn.append((x, run.column(name)))
            edge, two_over_eta = run.column("sam_edge"), run.column("two_over_eta")
            edge_label = "SAM edge" if threshold is None else "composed edge (lambda units)"
            differs = _differs(edge, two_over_eta if threshold is None else threshold)
            if not with_two_over_eta or differs:  # GD: the edge is 2/eta; rho 0: it is T
                if _draw(ax, x, edge, **self.style(i, "sam_edge", edge_label, linestyle="--")):
                    references.append(edge)
            if threshold is not None:
                references.append(threshold)
            elif with_two_over_eta and not one_two_over_eta:
                if _draw(ax, x, two_over_eta, **self.style(i, "two_over_eta", r"$2/\eta$",
                                                            linestyle=":")):
                    references.append(two_over_eta)
        if one_two_over_eta:
            value = etas.pop()
            ax.axhline(value, color="0.2", linestyle=":", label=r"$2/\eta$")
            references.append(np.array([value]))
        ax.set_ylabel("eigenvalue")
        self._clip(drawn, references)

    def _effective(self, i: int, run: RunData, x: np.ndarray,
                   threshold: np.ndarray) -> list[tuple[np.ndarray, np.ndarray]]:
        """Draws the effective sharpness and threshold T; returns the series drawn (y-range)."""
        effective = run.column("effective_sharpness")
        method = method_label(run.settings)
        drawn = []
        if _draw(self.ax, x, effective, **self.style(
                i, "effective_sharpness", "effective sharpness", marker="s", markersize=3)):
            drawn.append((x, effective))
        _draw(self.ax, x, threshold, **self.style(
            i, "stability_threshold", f"edge of {method}: T", linestyle="-.", linewidth=1.2))
        return drawn

    def _clip(self, drawn: list[tuple[np.ndarray, np.ndarray]],
              references: list[np.ndarray]) -> None:
        """Sets the y-range (`eigenvalue_limits`) and marks the values above it."""
        limits = eigenvalue_limits([values for _, values in drawn], references)
        if limits is None:
            return
        bottom, top = limits
        self.ax.set_ylim(bottom, top)
        points = [(float(y), float(x)) for xs, values in drawn
                  for x, y in zip(xs, values, strict=True) if np.isfinite(x) and np.isfinite(y)]
        self.off_scale = [(y, x) for y, x in points if y > top]
        self.below_scale = [(y, x) for y, x in points if y < bottom]
        for marked, edge, marker in ((self.off_scale, top, "^"),
                                     (self.below_scale, bottom, "v")):
            if marked:
                xs = [x for _, x in marked]
                self.ax.plot(xs, [edge] * len(xs), linestyle="none", marker=marker,
                             color="0.3", clip_on=False, label="_off scale")

    def alignment(self) -> None:
        for i, (run, x) in enumerate(zip(self.runs, self.xs, strict=True)):
            g, sg = run.column("g_alignment"), run.column("sg_alignment")
            _draw(self.ax, x, g, **self.style(i, "g_alignment", "gradient", marker="."))
            if _differs(sg, g):  # at rho = 0 the SAM gradient is the gradient
                _draw(self.ax, x, sg, **self.style(i, "sg_alignment", "SAM gradient",
                                                   marker=".", linestyle="--"))
        self.ax.set_ylabel("alignment with the principal direction")
        self.ax.set_ylim(-0.02, 1.02)

    def loss(self) -> None:
        losses = []
        for i, (run, x) in enumerate(zip(self.runs, self.xs, strict=True)):
            loss = _column_or_empty(run, "loss")
            if _draw(self.ax, x, loss, **self.style(i, "loss", "training loss", marker=".")):
                losses.append(_finite(loss))
        if losses and all(np.all(loss > 0) for loss in losses):
            self.ax.set_yscale("log")
        self.ax.set_ylabel("training loss (on the check's batch)")


def _column_or_empty(run: RunData, name: str) -> np.ndarray:
    values = run.column(name)
    return np.zeros(0) if values is None else values


def _off_scale_note(above: list[tuple[float, float]], below: list[tuple[float, float]],
                    unit: str) -> str:
    """The title's note on values outside the y-range: how many, and the most extreme."""
    def where(x: float) -> str:
        return f"step {x:g}" if unit == "step" else f"{x:.3g} {unit}"

    notes = []
    for points, side, extreme, word in ((above, "above", max, "largest"),
                                        (below, "below", min, "smallest")):
        if points:
            value, x = extreme(points)
            count = len(points)
            notes.append(f"{count} value{'s' if count != 1 else ''} {side} the axis "
                         f"({word} {value:.4g} at {where(x)})")
    return "\n".join(notes)  # one line each: two on one line run past the figure


def make_figure(name: str, runs: Sequence[RunData], x_axis: str = "steps"):
    """The matplotlib Figure of plot `name` (from PLOT_NAMES) with every run overlaid, against
    `x_axis` ("steps" or "hours"); the caller saves it."""
    kinds: dict[str, Callable[[_Figure], None]] = {
        "eigs_curve": lambda drawing: drawing.eigenvalues(with_two_over_eta=True),
        "eigs_se_only": lambda drawing: drawing.eigenvalues(with_two_over_eta=False),
        "alignment_curve": _Figure.alignment,
        "loss_curve": _Figure.loss,
    }
    xs, x_label, unit = _x_data(runs, x_axis)
    figure = Figure(figsize=(6.4, 4.2))
    ax = figure.subplots()
    drawing = _Figure(runs, xs, ax)
    kinds[name](drawing)
    ax.set_xlabel(x_label)
    title = _common_title(runs)
    if drawing.off_scale or drawing.below_scale:
        note = _off_scale_note(drawing.off_scale, drawing.below_scale, unit)
        title = f"{title}\n{note}" if title else note
    _finish(figure, ax, title)
    return figure


def _finish(figure, ax, title: str) -> None:
    """Every figure's title, legend (when a line has a label), grid and layout."""
    ax.set_title(title, fontsize=9)
    if any(not line.get_label().startswith("_") for line in ax.lines):
        ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    figure.tight_layout()


def _save(figure: Figure, path: str) -> None:
    """Writes `figure` to `path` (a matplotlib Figure outside pyplot: no global state)."""
    figure.savefig(path)


def draw_runs(runs: Sequence[RunData], outputs: dict[str, str], x_axis: str = "steps") -> list[str]:
    """Draws the plots named in `outputs` (PLOT_NAMES key -> file path; empty skips), every run
    overlaid, against `x_axis` ("steps" or "hours"); returns the paths written. Raises
    RuntimeError naming the plots that failed (after drawing the others)."""
    written, failed = [], []
    for name, path in outputs.items():
        if not path:
            continue
        try:
            _save(make_figure(name, runs, x_axis), path)
            written.append(path)
        except (OSError, ValueError) as error:  # one plot failing must not stop the others
            failed.append(f"{path}: {error}")
    if failed:
        raise RuntimeError("could not draw " + "; ".join(failed))
    return written


def draw_plots(rows: np.ndarray, columns: Sequence[str], settings: dict[str, Any],
               outputs: dict[str, str], x_axis: str = "steps") -> list[str]:
    """Draws one run's plots named in `outputs` (PLOT_NAMES key -> PDF path); returns the paths
    written. `rows`: [num_checks, num_columns] raw data; `columns`: their names; `settings`: the
    run's (its `run_name` becomes the title); `x_axis`: "steps" or "hours"."""
    rows = np.asarray(rows, np.float64)
    if rows.size == 0:
        rows = np.zeros((0, len(columns)))
    return draw_runs([RunData(settings, list(columns), rows)], outputs, x_axis)


# ---------------------------------------------------------------------------------------------
# The fifth plot: spectral densities (stochastic Lanczos quadrature)

MAX_DENSITY_CURVES = 5
DENSITY_GRID_POINTS = 1000
DENSITY_WIDTH_FRACTION = 0.01  # kernel width, as a fraction of the drawn eigenvalue range
DENSITY_FLOOR_FRACTION = 1e-7  # the log y-axis starts this far below the highest density


def evenly_spaced(count: int, most: int = MAX_DENSITY_CURVES) -> list[int]:
    """Up to `most` indices into `count` items, evenly spaced, first and last included."""
    if count <= 0:
        return []
    return sorted({int(i) for i in np.linspace(0, count - 1, min(count, most)).round()})


def density_grid(checks: Sequence[dict[str, np.ndarray]]) -> tuple[np.ndarray, float]:
    """(grid [DENSITY_GRID_POINTS], kernel width): the eigenvalue range of the checks' nodes
    and finite marks, widened by 5 % each side."""
    values = np.concatenate([np.ravel(c["nodes"]) for c in checks]
                            + [_finite(np.asarray(c["marks"], np.float64)) for c in checks])
    low, high = float(np.min(values)), float(np.max(values))
    span = max(high - low, 1e-12 * max(abs(high), 1.0), 1e-12)
    grid = np.linspace(low - 0.05 * span, high + 0.05 * span, DENSITY_GRID_POINTS)
    return grid, DENSITY_WIDTH_FRACTION * span


def smoothed_density(nodes: np.ndarray, weights: np.ndarray, grid: np.ndarray,
                     width: float) -> np.ndarray:
    """The Gaussian-smoothed SLQ density on `grid` (as `sam_eos.spectrum.density_on_grid`, on
    the host in float64)."""
    offsets = (grid[None, None, :] - np.asarray(nodes, np.float64)[..., None]) / width
    kernels = np.exp(-0.5 * offsets**2) / (width * np.sqrt(2 * np.pi))
    return np.mean(np.sum(np.asarray(weights, np.float64)[..., None] * kernels, axis=1), axis=0)


def make_density_figure(checks: dict[int, dict[str, np.ndarray]], title: str = ""):
    """The Figure of the densities at up to MAX_DENSITY_CURVES evenly spaced checks (step ->
    {"nodes", "weights", "marks": [lambda_max, 2/eta, SAM edge]}), log y: each check's lambda_max
    (dotted) and SAM edge (dashed) in its colour, 2/eta in black. The caller saves it."""
    ordered = sorted(checks.items())
    chosen = [ordered[i] for i in evenly_spaced(len(ordered))]
    figure = Figure(figsize=(6.4, 4.2))
    ax = figure.subplots()
    grid, width = density_grid([check for _, check in chosen])
    highest = 0.0
    two_over_eta = set()
    for i, (step, check) in enumerate(chosen):
        colour = f"C{i % 10}"
        density = smoothed_density(check["nodes"], check["weights"], grid, width)
        highest = max(highest, float(np.max(density)))
        ax.plot(grid, density, color=colour, label=f"step {step}")
        lambda_max, eta_mark, edge = (float(v) for v in check["marks"])
        first = i == 0
        if np.isfinite(lambda_max):
            ax.axvline(lambda_max, color=colour, linestyle=":", linewidth=1,
                       label=r"$\lambda_{\max}$ (dotted)" if first else "_lambda_max")
        if np.isfinite(edge) and not np.isclose(edge, eta_mark):
            ax.axvline(edge, color=colour, linestyle="--", linewidth=1,
                       label="SAM edge (dashed)" if first else "_sam_edge")
        if np.isfinite(eta_mark):
            two_over_eta.add(eta_mark)
    for j, value in enumerate(sorted(two_over_eta)):
        ax.axvline(value, color="0.1", linestyle="-.", linewidth=1,
                   label=r"$2/\eta$" if j == 0 else "_two_over_eta")
    ax.set_yscale("log")
    if highest > 0:
        ax.set_ylim(highest * DENSITY_FLOOR_FRACTION, highest * 3)
    ax.set_xlabel("eigenvalue")
    ax.set_ylabel("spectral density (SLQ, smoothed)")
    _finish(figure, ax, title)
    return figure


def draw_density(checks: dict[int, dict[str, np.ndarray]], path: str, title: str = "") -> bool:
    """Draws the density plot into `path`; False (nothing written) with no path or checks."""
    if not path or not checks:
        return False
    _save(make_density_figure(checks, title), path)
    return True


# ---------------------------------------------------------------------------------------------
# The layers plot: each layer's sharpness, and the top eigenvector's share per layer

LAYER_SHARPNESS_PREFIX, LAYER_SHARE_PREFIX = "layer_sharpness/", "layer_share/"


def layer_names_of(run: RunData) -> list[str]:
    """The layers a run's raw data measured (its `layer_sharpness/<layer>` columns), in order."""
    return [name[len(LAYER_SHARPNESS_PREFIX):] for name in run.columns
            if name.startswith(LAYER_SHARPNESS_PREFIX)]


def make_layers_figure(runs: Sequence[RunData], x_axis: str = "steps"):
    """The layers plot's Figure, one column per run that measured layers: on top each layer's
    sharpness (top eigenvalue of its diagonal Hessian block) with the network's lambda_max, the
    SAM edge and 2/eta; below, the top eigenvector's share per layer, stacked (summing to 1).
    Raises ValueError when no run has layer columns."""
    runs = [run for run in runs if layer_names_of(run)]
    if not runs:
        raise ValueError("no run has layer_sharpness columns (run with --layer_sharpness)")
    xs, x_label, _ = _x_data(runs, x_axis)
    figure = Figure(figsize=(4.6 * len(runs) + 1.8, 6.4))
    axes = figure.subplots(2, len(runs), squeeze=False, sharex="col", sharey="row")
    for column, (run, x) in enumerate(zip(runs, xs, strict=True)):
        top, bottom = axes[0, column], axes[1, column]
        _layer_sharpness_panel(top, run, x)
        _layer_shares_panel(bottom, run, x)
        top.set_title(run_label(run.settings) if len(runs) > 1 else "", fontsize=9)
        bottom.set_xlabel(x_label)
    axes[0, 0].set_ylabel("top eigenvalue of the layer's block")
    axes[1, 0].set_ylabel("top eigenvector's share")
    figure.suptitle(_common_title(runs), fontsize=9)
    for ax in axes.flat:
        ax.grid(alpha=0.3)
    axes[0, -1].legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    axes[1, -1].legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    figure.tight_layout()
    return figure


def _layer_sharpness_panel(ax, run: RunData, x: np.ndarray) -> None:
    drawn, references = [], []
    for j, name in enumerate(layer_names_of(run)):
        values = run.column(LAYER_SHARPNESS_PREFIX + name)
        if _draw(ax, x, values, color=f"C{j % 10}", marker=".", markersize=3, label=name):
            drawn.append(values)
    whole = run.column("lambda_max")
    if _draw(ax, x, whole, color="0.4", linewidth=0.8, label=r"whole network $\lambda_{\max}$"):
        drawn.append(whole)
    edge, two_over_eta = run.column("sam_edge"), run.column("two_over_eta")
    if _differs(edge, two_over_eta) and _draw(ax, x, edge, color="k", linestyle="--",
                                              linewidth=1, label="SAM edge"):
        references.append(edge)
    if _draw(ax, x, two_over_eta, color="k", linestyle=":", linewidth=1, label=r"$2/\eta$"):
        references.append(two_over_eta)
    limits = eigenvalue_limits(drawn, references)
    if limits is not None:
        ax.set_ylim(*limits)


def _layer_shares_panel(ax, run: RunData, x: np.ndarray) -> None:
    names = layer_names_of(run)
    shares = np.array([run.column(LAYER_SHARE_PREFIX + name) for name in names])
    keep = np.isfinite(x) & np.all(np.isfinite(shares), axis=0)
    if np.any(keep):
        ax.stackplot(x[keep], shares[:, keep], labels=names,
                     colors=[f"C{j % 10}" for j in range(len(names))], alpha=0.8)
    ax.set_ylim(0, 1)


def draw_layers(runs: Sequence[RunData], path: str, x_axis: str = "steps") -> bool:
    """Draws the layers plot into `path`; False (nothing written) with no path or layer columns."""
    if not path or not any(layer_names_of(run) for run in runs):
        return False
    _save(make_layers_figure(runs, x_axis), path)
    return True
