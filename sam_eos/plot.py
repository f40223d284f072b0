"""Redraws a run's four PDFs from its raw-data file.

    python3 -m sam_eos.plot --raw_data=/tmp/raw.txt

writes next to the raw data (`/tmp/raw_eigs.pdf`, `/tmp/raw_eigs_se_only.pdf`,
`/tmp/raw_alignment.pdf`, `/tmp/raw_loss.pdf`) unless the output flags say otherwise.
"""

import os
import sys

from absl import app, flags

from sam_eos.errors import EXIT_BAD_INPUT, InputError
from sam_eos.plots import draw_plots
from sam_eos.records import check_output_path, read_raw_data

RAW_DATA = flags.DEFINE_string("raw_data", None, "Raw-data file written by a run.")
OUTPUTS = {
    "eigs_curve": flags.DEFINE_string("eigs_curve_output", None, "Default: <raw>_eigs.pdf."),
    "eigs_se_only": flags.DEFINE_string(
        "eigs_se_only_output", None, "Default: <raw>_eigs_se_only.pdf."
    ),
    "alignment_curve": flags.DEFINE_string(
        "alignment_curve_output", None, "Default: <raw>_alignment.pdf."
    ),
    "loss_curve": flags.DEFINE_string("loss_curve_output", None, "Default: <raw>_loss.pdf."),
}
SUFFIXES = {
    "eigs_curve": "_eigs.pdf",
    "eigs_se_only": "_eigs_se_only.pdf",
    "alignment_curve": "_alignment.pdf",
    "loss_curve": "_loss.pdf",
}


def main(argv: list[str]) -> None:
    del argv
    try:
        if not RAW_DATA.value or not os.path.isfile(RAW_DATA.value):
            raise InputError(f"--raw_data={RAW_DATA.value} is not a file")
        stem = os.path.splitext(RAW_DATA.value)[0]
        outputs = {}
        for name, flag in OUTPUTS.items():
            outputs[name] = stem + SUFFIXES[name] if flag.value is None else flag.value
            check_output_path(outputs[name], flag.name)
        try:
            settings, columns, rows = read_raw_data(RAW_DATA.value)
        except ValueError as error:
            message = f"--raw_data={RAW_DATA.value} is not a raw-data file: {error}"
            raise InputError(message) from error
    except InputError as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(EXIT_BAD_INPUT)
    for path in draw_plots(rows, columns, settings, outputs):
        print(f"wrote {path}")


if __name__ == "__main__":
    app.run(main)
