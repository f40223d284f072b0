"""A run's summary: what it measured, in a few numbers (a dict, and log lines).

`summarize` is pure: the loop passes its rows and what only it knows (test metric, times);
`sam_eos.reports.raw_data.append_summary` writes the result as the raw data's last line.
"""

import math
from collections.abc import Mapping, Sequence
from typing import Any

TIME_PARTS = ("compile", "steps", "checks")


def _median(values: Sequence[float]) -> float | None:
    finite = sorted(v for v in values if math.isfinite(v))
    if not finite:
        return None
    middle = len(finite) // 2
    return finite[middle] if len(finite) % 2 else 0.5 * (finite[middle - 1] + finite[middle])


def _ratio(numerator: float, denominator: float) -> float:
    if not (math.isfinite(numerator) and math.isfinite(denominator)) or denominator == 0:
        return math.nan
    return numerator / denominator


def summarize(
    rows: Sequence[Mapping[str, float]],
    *,
    steps: int,
    test_name: str,
    test_value: float | None,
    seconds: Mapping[str, float],
    final_loss: float | None = None,
) -> dict[str, Any]:
    """The summary of a run from its raw-data rows (dicts column -> value).

    Args:
      rows: the checks, in order.
      steps: steps taken.
      test_name, test_value: the test metric (e.g. "error", 0.031); None when not computed.
      seconds: wall-clock seconds by part, keys `TIME_PARTS` (compile, steps, checks).
      final_loss: the last training loss; default the loss of the last check that has one.
    Returns:
      {"checks", "steps", "median_sharpness_over_two_over_eta",
      "median_sharpness_over_sam_edge" (both over the second half of the checks, the last
      ceil(n / 2), ignoring failed checks; None without one), with another method's rows
      also "median_effective_sharpness_over_threshold" (1 at its edge), with audited checks
      "audits" (how many) and "worst_audit_error" (the largest audit_error), "final_loss",
      "test": {"name", "value"}, "seconds": {part: seconds}}.
    """
    later = rows[len(rows) // 2:]
    if final_loss is None:
        losses = [row["loss"] for row in rows if math.isfinite(row.get("loss", math.nan))]
        final_loss = losses[-1] if losses else None
    summary = {
        "checks": len(rows),
        "steps": int(steps),
        "median_sharpness_over_two_over_eta": _median(
            [_ratio(row["hessian_norm"], row["two_over_eta"]) for row in later]),
        "median_sharpness_over_sam_edge": _median(
            [_ratio(row["hessian_norm"], row["sam_edge"]) for row in later]),
    }
    if any("stability_threshold" in row for row in rows):
        summary["median_effective_sharpness_over_threshold"] = _median(
            [_ratio(row.get("effective_sharpness", math.nan),
                    row.get("stability_threshold", math.nan)) for row in later])
    audits = [row["audit_error"] for row in rows
              if math.isfinite(row.get("audit_error", math.nan))]
    if audits:
        summary["audits"], summary["worst_audit_error"] = len(audits), max(audits)
    return {
        **summary,
        "final_loss": final_loss,
        "test": {"name": test_name, "value": test_value},
        "seconds": {part: float(seconds.get(part, 0.0)) for part in TIME_PARTS},
    }


def _number(value: float | None, spec: str = ".4g") -> str:
    return "n/a" if value is None or not math.isfinite(value) else format(value, spec)


def summary_lines(summary: Mapping[str, Any]) -> list[str]:
    """The summary as log lines, e.g.

        Summary: 12 checks in 500 steps.
        Sharpness, median over the last 6 checks: 0.9812 x 2/eta, 1.021 x the SAM edge.
        Final training loss 0.01234; test error 0.0312.
        Time: compile 12.3 s, steps 100.2 s, checks 40.1 s (total 152.6 s).
    """
    checks = summary["checks"]
    later = checks - checks // 2
    test = summary["test"]
    seconds = summary["seconds"]
    times = ", ".join(f"{part} {seconds[part]:.1f} s" for part in TIME_PARTS)
    return [
        f"Summary: {checks} check{'s' if checks != 1 else ''} in {summary['steps']} "
        f"step{'s' if summary['steps'] != 1 else ''}.",
        f"Sharpness, median over the last {later} check{'s' if later != 1 else ''}: "
        f"{_number(summary['median_sharpness_over_two_over_eta'])} x 2/eta, "
        f"{_number(summary['median_sharpness_over_sam_edge'])} x the SAM edge.",
        *([f"Effective sharpness, median over the last {later} check"
           f"{'s' if later != 1 else ''}: "
           f"{_number(summary['median_effective_sharpness_over_threshold'])} x the threshold."]
          if "median_effective_sharpness_over_threshold" in summary else []),
        *([f"Audits: {summary['audits']} check{'s' if summary['audits'] != 1 else ''} also "
           f"solved cold; worst audit error {summary['worst_audit_error']:.2g}."]
          if "audits" in summary else []),
        f"Final training loss {_number(summary['final_loss'])}; test {test['name']} "
        f"{_number(test['value'])}.",
        f"Time: {times} (total {sum(seconds[part] for part in TIME_PARTS):.1f} s).",
    ]
