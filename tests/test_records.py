"""The raw-data file: loads by name (numpy, pandas), old and original files, the summary line."""

import errno
import math

import numpy as np
import pytest

from sam_eos.edge import sam_edge
from sam_eos.reports import raw_data

COLUMNS = raw_data.column_names(2)
SETTINGS = {"rho": 0.1, "step_size": 0.5, "seed": 3, "run_name": "unit"}


def row(step: int, sharpness: float, **changes) -> dict[str, float]:
    values = dict.fromkeys(COLUMNS, 0.25)
    values.update(time_hours=step / 100, hessian_norm=sharpness, two_over_eta=4.0,
                  sam_edge=3.0, loss=1.0 / (1 + step), step=float(step), lambda_max=sharpness,
                  lambda_min=-0.5, hessian_vector_products=37.0, eig_2=sharpness / 2)
    values.update(changes)
    return values


def write(path, rows, settings=SETTINGS, notes=()):
    writer = raw_data.RawDataWriter(str(path), COLUMNS, settings)
    for i, values in enumerate(rows):
        if i in dict(notes):
            writer.note(dict(notes)[i])
        writer.row(values)
    writer.close()


def test_the_first_line_names_the_columns_and_counts_are_integers(tmp_path):
    path = tmp_path / "raw.txt"
    write(path, [row(0, 1.5), row(50, 2.5, loss=math.nan)])
    lines = path.read_text().splitlines()
    assert lines[0].split() == COLUMNS
    assert lines[1].startswith("# sam_eos raw data") and lines[2].startswith("# settings: ")
    first = dict(zip(COLUMNS, lines[3].split(), strict=True))
    assert first["step"] == "0" and first["hessian_vector_products"] == "37"
    second = dict(zip(COLUMNS, lines[4].split(), strict=True))
    assert second["step"] == "50" and second["loss"] == "nan"
    assert second["hessian_norm"] == "2.5" and second["time_hours"] == "0.5"
    assert raw_data.format_value(math.nan, integer=True) == "nan"
    assert raw_data.format_value(2.5, integer=True) == "2.5"  # not a whole number: kept
    assert raw_data.format_value(-math.inf) == "-inf"


def test_numpy_and_pandas_one_liners_load_by_name(tmp_path):
    """The README's one-liners, on a file with a note between rows and a summary at the end."""
    pandas = pytest.importorskip("pandas")
    path = tmp_path / "raw.txt"
    write(path, [row(0, 1.5), row(10, 2.5), row(20, math.nan)],
          notes=[(2, "check at step 20 failed: # of products exceeded")])
    raw_data.append_summary(str(path), {"checks": 3})

    data = np.genfromtxt(path, names=True)
    assert list(data.dtype.names) == COLUMNS
    np.testing.assert_array_equal(data["step"], [0, 10, 20])
    np.testing.assert_array_equal(data["hessian_norm"], [1.5, 2.5, np.nan])

    frame = pandas.read_csv(path, sep=r"\s+", comment="#")
    assert list(frame.columns) == COLUMNS
    assert frame["step"].tolist() == [0, 10, 20] and frame["step"].dtype.kind == "i"
    assert frame["hessian_vector_products"].dtype.kind == "i"
    np.testing.assert_array_equal(frame["hessian_norm"], [1.5, 2.5, np.nan])

    assert np.loadtxt(path, skiprows=1).shape == (3, len(COLUMNS))


def test_read_raw_data_reads_this_format_and_ignores_notes_and_summary(tmp_path):
    path = tmp_path / "raw.txt"
    write(path, [row(0, 1.5), row(10, 2.5)], notes=[(1, "something")])
    raw_data.append_summary(str(path), {"checks": 2, "final_loss": math.inf})
    settings, columns, rows = raw_data.read_raw_data(str(path))
    assert settings == SETTINGS and columns == COLUMNS
    assert rows.shape == (2, len(COLUMNS))
    np.testing.assert_array_equal(rows[:, COLUMNS.index("step")], [0, 10])
    assert raw_data.read_summary(str(path)) == {"checks": 2, "final_loss": None}


def test_read_raw_data_reads_files_written_before_the_names_line(tmp_path):
    path = tmp_path / "old.txt"
    path.write_text(
        "# sam_eos raw data: one row per Hessian check\n"
        '# settings: {"rho": 0.05, "seed": 7}\n'
        "# columns: time_hours hessian_norm two_over_eta sam_edge grad_norm loss g_alignment "
        "sg_alignment step lambda_max lambda_min hessian_vector_products\n"
        "0.0 1.25 20.0 19.0 0.5 2.3 0.1 0.2 0.0 1.25 -0.5 30.0\n"
        "# note: check at step 10 failed\n"
        "0.01 nan 20.0 nan nan nan nan nan 10.0 nan nan nan\n"
    )
    settings, columns, rows = raw_data.read_raw_data(str(path))
    assert settings == {"rho": 0.05, "seed": 7}
    assert columns == raw_data.column_names(1)[:12]  # the columns of the time
    assert rows.shape == (2, 12) and rows[0, 1] == 1.25 and rows[1, 8] == 10.0
    assert raw_data.read_summary(str(path)) is None


def write_original(path, rho=0.1, eta=0.5):
    """Three rows as the original program wrote them: 8 columns, no header, seconds."""
    lines = []
    for seconds, g in ((12.0, 2.0), (1800.0, 1.0), (7200.0, 0.5)):
        edge = float(sam_edge(g, eta, rho))
        lines.append(f"{seconds} {0.9 * edge} {2 / eta} {edge} {g} 0.5 0.3 0.2")
    path.write_text("\n".join(lines) + "\n")


def test_original_program_files_read_with_time_in_hours_and_settings_inferred(tmp_path):
    path = tmp_path / "original.txt"
    write_original(path)
    settings, columns, rows = raw_data.read_original_raw_data(str(path))
    assert columns == list(raw_data.ORIGINAL_COLUMNS)
    np.testing.assert_allclose(rows[:, 0], [12 / 3600, 0.5, 2.0])
    np.testing.assert_allclose(rows[:, 2], 4.0)
    assert settings["step_size"] == 0.5 and settings["rho"] == pytest.approx(0.1, rel=1e-5)
    assert settings["source"] == "original program"
    write_original(path, rho=0.0)
    assert raw_data.read_original_raw_data(str(path))[0]["rho"] == 0.0
    with pytest.raises(ValueError, match="no column names"):
        raw_data.read_raw_data(str(path))  # without a header it is not taken for ours


def test_keep_first_rows_keeps_the_names_line_and_drops_the_summary(tmp_path):
    path = tmp_path / "raw.txt"
    write(path, [row(0, 1.5), row(10, 2.5), row(20, 3.5)], notes=[(2, "late note")])
    raw_data.append_summary(str(path), {"checks": 3})
    raw_data.keep_first_rows(str(path), 2)
    text = path.read_text()
    assert text.splitlines()[0].split() == COLUMNS
    assert "late note" not in text and "# summary:" not in text
    _, _, rows = raw_data.read_raw_data(str(path))
    np.testing.assert_array_equal(rows[:, COLUMNS.index("step")], [0, 10])
    raw_data.keep_first_rows(str(path), 0)
    assert raw_data.read_raw_data(str(path))[2].shape == (0, len(COLUMNS))


def test_is_same_run_compares_settings_but_not_the_resumable_ones(tmp_path):
    path = tmp_path / "raw.txt"
    write(path, [row(0, 1.5)], settings={**SETTINGS, "max_steps": 10})
    assert raw_data.is_same_run(str(path), {**SETTINGS, "max_steps": 20}, COLUMNS)
    assert not raw_data.is_same_run(str(path), {**SETTINGS, "rho": 0.2}, COLUMNS)
    assert not raw_data.is_same_run(str(path), SETTINGS | {"max_steps": 10}, COLUMNS[:-1])
    assert not raw_data.is_same_run(str(tmp_path / "missing.txt"), SETTINGS, COLUMNS)


def test_a_last_row_cut_short_is_dropped_by_readers_and_by_keep_first_rows(tmp_path):
    path = tmp_path / "raw.txt"
    writer = raw_data.RawDataWriter(str(path), COLUMNS, SETTINGS)
    for step in (0, 5):
        writer.row({**dict.fromkeys(COLUMNS, 1.5), "step": step})
    writer.close()
    writer.close()  # closing twice is harmless
    whole = path.read_text()
    path.write_text(whole + "2.5 3.5 4")  # a row whose write was cut short
    _, _, rows = raw_data.read_raw_data(str(path))
    assert rows[:, COLUMNS.index("step")].tolist() == [0, 5]
    assert raw_data.keep_first_rows(str(path), 5) == 2  # only two rows to keep
    assert path.read_text() == whole


def test_a_full_disk_fails_the_row_that_hits_it_and_close_does_not_fail_again(tmp_path):
    writer = raw_data.RawDataWriter(str(tmp_path / "raw.txt"), COLUMNS, SETTINGS)
    writer._file = open("/dev/full", "wb", buffering=0)  # noqa: SIM115 - the kernel's full disk
    with pytest.raises(OSError) as raised:
        writer.row(dict.fromkeys(COLUMNS, 1.0))
    assert raised.value.errno == errno.ENOSPC
    writer.close()  # no second error: nothing was buffered
