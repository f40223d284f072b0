"""Where a run's five outputs go, and how an earlier run's file is kept rather than overwritten.

With `--output_dir=DIR` the outputs get standard names inside DIR (`OUTPUT_FILE_NAMES`), the
same names `python3 -m sam_eos.cli.replot` writes. A file of a different run found at an output path
is renamed with the first free number before its extension (`raw.txt` -> `raw.1.txt`), so
nothing is lost and the name still opens in the right program.
"""

import os

X_AXES = ("steps", "hours")  # the plots' x-axis: steps, or hours of training time
OUTPUT_FILE_NAMES = {  # TrainConfig.outputs field -> file name inside --output_dir
    "raw_data": "raw.txt",
    "eigs_curve": "eigs.pdf",
    "eigs_se_only": "eigs_se_only.pdf",
    "alignment_curve": "alignment.pdf",
    "loss_curve": "loss.pdf",
}
DENSITY_FILE_NAME = "density.pdf"  # drawn only with the spectral densities
LAYERS_FILE_NAME = "layers.pdf"  # drawn only with the layers' sharpness
PLOT_FIELDS = ("eigs_curve", "eigs_se_only", "alignment_curve", "loss_curve")


def output_paths(output_dir: str, prefix: str = "") -> dict[str, str]:
    """The five output paths inside `output_dir` (field -> path), each name after `prefix`."""
    return {field: os.path.join(output_dir, prefix + name)
            for field, name in OUTPUT_FILE_NAMES.items()}


def numbered_path(path: str, number: int) -> str:
    """`path` with `.<number>` before its extension: numbered_path("d/raw.txt", 2) ==
    "d/raw.2.txt"; a name without extension gets it at the end ("d/raw" -> "d/raw.2")."""
    stem, extension = os.path.splitext(path)
    return f"{stem}.{number}{extension}"


def move_aside(path: str) -> str | None:
    """Renames an existing file at `path` to the first free `numbered_path(path, n)`, n >= 1,
    and returns the new path; None when there is no file (nothing to keep)."""
    if not path or not os.path.lexists(path):
        return None
    number = 1
    while os.path.lexists(numbered_path(path, number)):
        number += 1
    new_path = numbered_path(path, number)
    os.rename(path, new_path)
    return new_path


def raw_data_action(exists: bool, resuming: bool, same_run: bool) -> str:
    """What a starting run does with its raw-data path: "create" (no file), "append" (a resumed
    run continuing its own file), or "move_aside" (any other run's file, which is kept under a
    numbered name, and the run starts a new file)."""
    if not exists:
        return "create"
    return "append" if resuming and same_run else "move_aside"
