"""Redraws the four PDFs from raw-data files, one run or several overlaid (e.g. GD vs SAM),
and the fifth, the spectral densities, from a run's `<raw stem>_density.npz`.

    python3 -m sam_eos.cli.replot runs/gd/raw.txt                       # runs/gd/eigs.pdf, ...
    python3 -m sam_eos.cli.replot runs/gd/raw.txt runs/sam/raw.txt --output_dir=runs/both
    python3 -m sam_eos.cli.replot --original_format original_raw.txt    # the original's files

The files get the programs' names (`sam_eos.reports.paths.OUTPUT_FILE_NAMES`: eigs.pdf,
eigs_se_only.pdf, alignment.pdf, loss.pdf) in `--output_dir`, after `--output_prefix`. One file
draws next to itself by default; several need `--output_dir`. `--<plot>_output` names a plot's
path (empty: skip it). The density plot (density.pdf) is drawn from the densities file beside
the only raw-data file, or one given as an argument or `--density_data` (with or without raw
data); the layers plot (layers.pdf) when a run has layer columns (`--layer_sharpness`), one
column of panels per such run. `--density_output` and `--layers_output` name their paths.
"""

import os
import sys

from absl import app, flags

from sam_eos.cli.parsing import parse_flags
from sam_eos.errors import EXIT_BAD_INPUT, InputError
from sam_eos.reports.figures import (
    X_AXES,
    RunData,
    draw_density,
    draw_layers,
    draw_runs,
    layer_names_of,
)
from sam_eos.reports.paths import (
    DENSITY_FILE_NAME,
    LAYERS_FILE_NAME,
    OUTPUT_FILE_NAMES,
    PLOT_FIELDS,
    output_paths,
)
from sam_eos.reports.raw_data import (
    DENSITY_SUFFIX,
    check_output_path,
    density_data_path,
    read_density,
    read_original_raw_data,
    read_raw_data,
)


def define_flags() -> None:
    """Registers this program's absl flags; called when it runs, never on import."""
    flags.DEFINE_string("raw_data", None, "A raw-data file (or give files as arguments).")
    flags.DEFINE_string(
        "output_dir", None, "Write the plots here (default: the raw-data file's directory, "
        "when there is one file).")
    flags.DEFINE_string("output_prefix", "", "Put this before each file name.")
    flags.DEFINE_enum("plot_x", "steps", X_AXES, "The x-axis: steps, or training time.")
    flags.DEFINE_bool(
        "original_format", False, "The files were written by the original program (8 "
        "columns, no header, time in seconds); drawn against time.")
    flags.DEFINE_string(
        "density_data", None, "A densities file (<raw stem>_density.npz) to draw (default: "
        "the one beside the only raw-data file, if any).")
    flags.DEFINE_string(
        "density_output", None, f"The density plot's path (default: <output_dir>/<prefix>"
        f"{DENSITY_FILE_NAME}; empty: skip it).")
    flags.DEFINE_string(
        "layers_output", None, f"The layers plot's path, drawn when a run has layer columns "
        f"(default: <output_dir>/<prefix>{LAYERS_FILE_NAME}; empty: skip it).")
    for field in PLOT_FIELDS:
        flags.DEFINE_string(f"{field}_output", None, f"This plot's path (default: "
                            f"<output_dir>/<prefix>{OUTPUT_FILE_NAMES[field]}; empty: skip it).")


def plot_paths(raw_paths: list[str], output_dir: str | None, prefix: str,
               overrides: dict[str, str | None]) -> dict[str, str]:
    """Plot field -> path: `overrides` where given, else the standard name in `output_dir`
    (default: the directory of the only raw-data file)."""
    if output_dir is None:
        if len(raw_paths) > 1:
            raise InputError(f"{len(raw_paths)} raw-data files overlay into one set of plots: "
                             "pass --output_dir (and --output_prefix if you like) for them")
        output_dir = os.path.dirname(os.path.abspath(raw_paths[0]))
    standard = output_paths(output_dir, prefix)
    return {field: standard[field] if overrides.get(field) is None else overrides[field]
            for field in PLOT_FIELDS}


def read_run(path: str, original_format: bool) -> RunData:
    """One raw-data file as RunData; raises InputError when it cannot be read."""
    if not os.path.isfile(path):
        raise InputError(f"{path} is not a file")
    reader = read_original_raw_data if original_format else read_raw_data
    try:
        settings, columns, rows = reader(path)
    except ValueError as error:
        raise InputError(f"{path} is not a raw-data file: {error}") from error
    return RunData(settings, columns, rows)


def density_source(raw_paths: list[str], given: list[str]) -> str | None:
    """The densities file to draw: the one given (at most one), else the one beside the only
    raw-data file when it exists, else None."""
    if len(given) > 1:
        raise InputError(f"{len(given)} densities files given; the density plot draws one run")
    if given:
        if not os.path.isfile(given[0]):
            raise InputError(f"{given[0]} is not a file")
        return given[0]
    if len(raw_paths) == 1 and os.path.isfile(density_data_path(raw_paths[0])):
        return density_data_path(raw_paths[0])
    return None


def density_plot_path(source: str, output_dir: str | None, prefix: str,
                      override: str | None) -> str:
    """The density plot's path: `override` when given, else DENSITY_FILE_NAME after `prefix`
    in `output_dir` (default: the densities file's directory)."""
    if override is not None:
        return override
    directory = output_dir or os.path.dirname(os.path.abspath(source))
    return os.path.join(directory, prefix + DENSITY_FILE_NAME)


def layers_plot_path(runs: list[RunData], raw_paths: list[str], output_dir: str | None,
                     prefix: str, override: str | None) -> str:
    """The layers plot's path: '' when no run has layer columns, else `override` when given,
    else LAYERS_FILE_NAME after `prefix` in `output_dir` (default: the only raw-data file's)."""
    if not any(layer_names_of(run) for run in runs):
        return ""
    if override is not None:
        return override
    directory = output_dir or os.path.dirname(os.path.abspath(raw_paths[0]))
    return os.path.join(directory, prefix + LAYERS_FILE_NAME)


def main(argv: list[str]) -> None:
    values = flags.FLAGS
    arguments = ([values.raw_data] if values.raw_data else []) + list(argv[1:])
    raw_paths = [path for path in arguments if not path.endswith(DENSITY_SUFFIX)]
    given = [path for path in arguments if path.endswith(DENSITY_SUFFIX)]
    given += [values.density_data] if values.density_data else []
    try:
        if not raw_paths and not given:
            raise InputError("give raw-data files: python3 -m sam_eos.cli.replot RAW [RAW ...]")
        overrides = {field: values[f"{field}_output"].value for field in PLOT_FIELDS}
        outputs = (plot_paths(raw_paths, values.output_dir, values.output_prefix, overrides)
                   if raw_paths else {})
        for field, path in outputs.items():
            check_output_path(path, f"{field}_output")
        runs = [read_run(path, values.original_format) for path in raw_paths]
        source = density_source(raw_paths, given)
        density_path = (density_plot_path(source, values.output_dir, values.output_prefix,
                                          values.density_output) if source else "")
        check_output_path(density_path, "density_output")
        densities = _read_densities(source) if density_path else {}
        layers_path = layers_plot_path(runs, raw_paths, values.output_dir,
                                       values.output_prefix, values.layers_output)
        check_output_path(layers_path, "layers_output")
    except InputError as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(EXIT_BAD_INPUT)
    for path in draw_runs(runs, outputs, values.plot_x) if runs else []:
        print(f"wrote {path}")
    if draw_layers(runs, layers_path, values.plot_x):
        print(f"wrote {layers_path}")
    title = str(runs[0].settings.get("run_name", "")) if len(runs) == 1 else ""
    if draw_density(densities, density_path, title):
        print(f"wrote {density_path}")


def _read_densities(path: str) -> dict:
    try:
        return read_density(path)
    except (OSError, ValueError, KeyError) as error:
        raise InputError(f"{path} is not a densities file: {error}") from error


if __name__ == "__main__":
    define_flags()
    app.run(main, flags_parser=parse_flags)
