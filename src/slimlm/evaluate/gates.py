"""Gates: compare a stage's metric with an absolute bound or with the teacher's / previous stage's value."""

from __future__ import annotations

from typing import Any

from slimlm.stage import Gate


def metric_value(metrics: dict[str, Any], name: str) -> float | None:
    """Look up a metric by dotted name (`agreement.top1`) in a nested metrics dict."""
    value: Any = metrics
    for part in name.split("."):
        if not isinstance(value, dict) or part not in value:
            return None
        value = value[part]
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None


def check_gate(gate: Gate, metrics: dict, teacher: dict, previous: dict) -> dict[str, Any]:
    """One verdict: the measured value, every bound it was held to, and whether it passed."""
    value = metric_value(metrics, gate.metric)
    bounds: list[tuple[str, float]] = []  # (operator, bound)
    if gate.min is not None:
        bounds.append((">=", gate.min))
    if gate.max is not None:
        bounds.append(("<=", gate.max))
    reference = None
    if gate.relative_to is not None:
        reference = metric_value(teacher if gate.relative_to == "teacher" else previous, gate.metric)
        if reference is not None:
            if gate.min_ratio is not None:
                bounds.append((">=", gate.min_ratio * reference))
            if gate.max_ratio is not None:
                bounds.append(("<=", gate.max_ratio * reference))
    measurable = value is not None and (gate.relative_to is None or reference is not None)
    passed = measurable and all(value >= b if op == ">=" else value <= b for op, b in bounds)
    return {
        "gate": describe_gate(gate),
        "metric": gate.metric,
        "value": value,
        "reference": reference,
        "bounds": [f"{op} {b:.6g}" for op, b in bounds],
        "passed": bool(passed),
    }


def describe_gate(gate: Gate) -> str:
    parts = []
    if gate.min is not None:
        parts.append(f"{gate.metric} >= {gate.min:g}")
    if gate.max is not None:
        parts.append(f"{gate.metric} <= {gate.max:g}")
    if gate.min_ratio is not None:
        parts.append(f"{gate.metric} >= {gate.min_ratio:g} x {gate.relative_to}")
    if gate.max_ratio is not None:
        parts.append(f"{gate.metric} <= {gate.max_ratio:g} x {gate.relative_to}")
    return " and ".join(parts)


def failure_message(stage: str, verdict: dict[str, Any]) -> str:
    if verdict["value"] is None:
        return f"gate '{verdict['gate']}' after stage '{stage}' failed: {verdict['metric']} was not measured"
    if verdict["reference"] is None and "x " in verdict["gate"]:
        return f"gate '{verdict['gate']}' after stage '{stage}' failed: the reference value of {verdict['metric']} is missing"
    ref = f" (reference {verdict['reference']:.6g})" if verdict["reference"] is not None else ""
    return (
        f"gate '{verdict['gate']}' after stage '{stage}' failed: measured {verdict['metric']} = "
        f"{verdict['value']:.6g}, required {' and '.join(verdict['bounds'])}{ref}. The stage's output is kept; "
        f"relax the gate or change the stage, then run again"
    )
