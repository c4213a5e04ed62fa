"""Gates: compare a stage's metric with an absolute bound or with the teacher's / previous stage's value."""

from __future__ import annotations

from slimlm.evaluate.catalogue import metric_value
from slimlm.manifest import GateVerdict
from slimlm.stage import Gate


def above_chance_recovery(value: float, reference: float, chance: float) -> float:
    """How much of the reference's margin over chance a score keeps: (value - chance) / (reference - chance)."""
    return (value - chance) / (reference - chance)


def check_gate(gate: Gate, metrics: dict, teacher: dict, previous: dict) -> GateVerdict:
    """One verdict: the measured value, every bound it was held to, and whether it passed."""
    value = metric_value(metrics, gate.metric)
    bounds: list[tuple[str, float]] = []  # (operator, bound)
    if gate.min is not None:
        bounds.append((">=", gate.min))
    if gate.max is not None:
        bounds.append(("<=", gate.max))
    reference, chance, recovery = None, 0.0, None
    if gate.above_chance:  # the task's chance level, recorded next to its accuracy
        chance = metric_value(metrics, gate.metric.rsplit(".", 1)[0] + ".chance")
    if gate.relative_to is not None and chance is not None:
        reference = metric_value(teacher if gate.relative_to == "teacher" else previous, gate.metric)
        if reference is not None:
            # ratio r of the reference's margin over chance: value >= chance + r x (reference - chance)
            if gate.min_ratio is not None:
                bounds.append((">=", chance + gate.min_ratio * (reference - chance)))
            if gate.max_ratio is not None:
                bounds.append(("<=", chance + gate.max_ratio * (reference - chance)))
            if gate.above_chance and value is not None and reference != chance:
                recovery = above_chance_recovery(value, reference, chance)
    measurable = value is not None and (gate.relative_to is None or reference is not None)
    passed = measurable and all(value >= b if op == ">=" else value <= b for op, b in bounds)
    return GateVerdict(
        gate=describe_gate(gate),
        metric=gate.metric,
        value=value,
        relative_to=gate.relative_to,
        reference=reference,
        bounds=[f"{op} {b:.6g}" for op, b in bounds],
        passed=bool(passed),
        above_chance=gate.above_chance,
        chance=chance if gate.above_chance else None,
        recovery=recovery,
    )


def describe_gate(gate: Gate) -> str:
    parts = []
    if gate.min is not None:
        parts.append(f"{gate.metric} >= {gate.min:g}")
    if gate.max is not None:
        parts.append(f"{gate.metric} <= {gate.max:g}")
    of = "above-chance recovery vs " if gate.above_chance else "x "
    if gate.min_ratio is not None:
        parts.append(f"{gate.metric} >= {gate.min_ratio:g} {of}{gate.relative_to}")
    if gate.max_ratio is not None:
        parts.append(f"{gate.metric} <= {gate.max_ratio:g} {of}{gate.relative_to}")
    return " and ".join(parts)


def failure_message(stage: str, verdict: GateVerdict) -> str:
    failed = f"gate '{verdict.gate}' after stage '{stage}' failed"
    if verdict.value is None:
        return f"{failed}: {verdict.metric} was not measured"
    if verdict.above_chance and verdict.chance is None:
        return f"{failed}: {verdict.metric} has no chance level (not a multiple-choice task)"
    if verdict.reference is None and verdict.relative_to is not None:
        return f"{failed}: the reference value of {verdict.metric} is missing"
    ref = f" (reference {verdict.reference:.6g})" if verdict.reference is not None else ""
    if verdict.recovery is not None:
        ref += f"; above-chance recovery {verdict.recovery:.3f} (chance {verdict.chance:.4g})"
    return (
        f"{failed}: measured {verdict.metric} = {verdict.value:.6g}, required {' and '.join(verdict.bounds)}{ref}. "
        "The stage's output is kept; relax the gate or change the stage, then run again"
    )


def describe_verdict(verdict: GateVerdict) -> str:
    """What was measured, for the run log and the report: `0.91`, `0.91, above-chance recovery 0.713`, `not measured`."""
    if verdict.value is None:
        return "not measured"
    text = f"{verdict.value:.6g}"
    return text + (f", above-chance recovery {verdict.recovery:.3f}" if verdict.recovery is not None else "")
