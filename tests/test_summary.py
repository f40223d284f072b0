"""The run summary: medians over the second half of the checks, log lines, the JSON line."""

import math

from sam_eos.reports import raw_data
from sam_eos.reports.summary import summarize, summary_lines


def rows(sharpness, edge=5.0, two_over_eta=10.0):
    return [{"hessian_norm": s, "sam_edge": edge, "two_over_eta": two_over_eta, "loss": 1 / (i + 1)}
            for i, s in enumerate(sharpness)]


def test_medians_over_the_second_half_of_the_checks():
    # 5 checks: the last 3 (sharpness 4, 6, 5.5) count; the early 100 does not.
    summary = summarize(rows([100.0, 1.0, 4.0, 6.0, 5.5]), steps=400, test_name="error",
                        test_value=0.03, seconds={"compile": 2.0, "steps": 10.0, "checks": 3.5})
    assert summary["checks"] == 5 and summary["steps"] == 400
    assert summary["median_sharpness_over_sam_edge"] == 5.5 / 5.0
    assert summary["median_sharpness_over_two_over_eta"] == 5.5 / 10.0
    assert summary["final_loss"] == 1 / 5
    assert summary["test"] == {"name": "error", "value": 0.03}
    assert summary["seconds"] == {"compile": 2.0, "steps": 10.0, "checks": 3.5}


def test_failed_checks_are_skipped_and_nothing_measured_gives_none():
    summary = summarize(rows([1.0, 2.0, math.nan, 4.0]), steps=3, test_name="loss",
                        test_value=None, seconds={}, final_loss=0.25)
    assert summary["median_sharpness_over_sam_edge"] == 4.0 / 5.0  # nan skipped
    assert summary["final_loss"] == 0.25 and summary["seconds"]["checks"] == 0.0
    empty = summarize([], steps=0, test_name="loss", test_value=None, seconds={})
    assert empty["median_sharpness_over_sam_edge"] is None and empty["final_loss"] is None


def test_summary_lines_read_as_sentences():
    summary = summarize(rows([1.0, 4.0, 6.0]), steps=1, test_name="error", test_value=0.0312,
                        seconds={"compile": 12.34, "steps": 100.2, "checks": 40.1})
    assert summary_lines(summary) == [
        "Summary: 3 checks in 1 step.",
        "Sharpness, median over the last 2 checks: 0.5 x 2/eta, 1 x the SAM edge.",
        "Final training loss 0.3333; test error 0.0312.",
        "Time: compile 12.3 s, steps 100.2 s, checks 40.1 s (total 152.6 s).",
    ]
    summary["test"]["value"] = None
    assert summary_lines(summary)[2].endswith("test error n/a.")


def test_the_summary_is_the_raw_datas_last_line_and_reads_back(tmp_path):
    path = tmp_path / "raw.txt"
    writer = raw_data.RawDataWriter(str(path), ["step", "loss"], {"rho": 0.0})
    writer.row({"step": 0, "loss": 1.0})
    writer.close()
    summary = summarize([{"hessian_norm": 1.0, "sam_edge": 2.0, "two_over_eta": 2.0,
                          "loss": math.nan}], steps=1, test_name="loss", test_value=math.inf,
                        seconds={"compile": 1.0})
    raw_data.append_summary(str(path), summary)
    assert path.read_text().splitlines()[-1].startswith("# summary: {")
    read = raw_data.read_summary(str(path))
    assert read["median_sharpness_over_sam_edge"] == 0.5
    assert read["test"] == {"name": "loss", "value": None}  # inf is not JSON: null
    assert raw_data.read_raw_data(str(path))[2].tolist() == [[0.0, 1.0]]
