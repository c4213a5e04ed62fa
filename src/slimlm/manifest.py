"""The run record: each stage folder's `manifest.json`, written and read here and nowhere else.

A manifest says what ran (the stage's config and its digest), on what (the input's digest), what it
produced (the output's digest and artifact), what it measured, and its gate verdicts. The runner
skips a stage whose manifest still matches; `slimlm status` and the report read nothing else.
A manifest that is not the record slimlm writes (damaged, hand-edited into nonsense) reads as None,
and the stage runs again.
"""

from __future__ import annotations

import dataclasses
import functools
import typing
from dataclasses import dataclass, field
from pathlib import Path
from types import UnionType
from typing import Any, Union

from slimlm.artifacts import MANIFEST, RunLayout, read_json, write_json_atomic
from slimlm.evaluate.catalogue import NUMERIC_METRICS, NUMERIC_SECTIONS, TEXT_METRICS


@dataclass
class GateVerdict:
    """One gate held against a stage's metrics: the measured value, every bound it was held to, the outcome."""

    gate: str  # as described to the user: `perplexity <= 2 x teacher`
    metric: str
    value: float | None  # None: not measured
    relative_to: str | None
    reference: float | None  # the teacher's or previous stage's value of the metric
    bounds: list[str]  # `>= 0.9`, ...
    passed: bool
    above_chance: bool = False
    chance: float | None = None  # for above_chance gates: the task's chance level...
    recovery: float | None = None  # ...and (value - chance) / (reference - chance)


@dataclass
class Manifest:
    """What one stage (or the teacher, index 0) produced and measured."""

    stage: str
    kind: str
    status: str = "done"  # done, or gate_failed
    metrics: dict[str, Any] = field(default_factory=dict)
    gates: list[GateVerdict] = field(default_factory=list)
    artifact_path: str = ""  # where the artifact is (the teacher's: the resolved model folder)
    input_digest: str = ""
    output_digest: str = ""
    evaluation_digest: str = ""
    started: str = ""
    finished: str = ""
    seconds: float = 0.0
    versions: dict[str, str] = field(default_factory=dict)
    seed: int = 0
    model: str | None = None  # the teacher's: the recipe's model spec
    index: int | None = None  # the stages': position in the recipe, 1-based
    config: dict[str, Any] | None = None
    config_digest: str | None = None
    artifact: str | None = None  # relative to the stage folder: model, onnx
    artifact_format: str | None = None
    teacher_path: str | None = None
    stage_metrics: dict[str, Any] = field(default_factory=dict)  # what the stage itself reported

    @property
    def failed_gates(self) -> list[GateVerdict]:
        return [v for v in self.gates if not v.passed]

    def to_json(self) -> dict[str, Any]:
        return {k: v for k, v in dataclasses.asdict(self).items() if v is not None}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Manifest:
        known = {f.name for f in dataclasses.fields(cls)}
        values = {k: v for k, v in data.items() if k in known}
        values["gates"] = [_verdict(g) for g in data.get("gates", [])]
        return cls(**values)


def _verdict(data: dict[str, Any]) -> GateVerdict:
    known = {f.name for f in dataclasses.fields(GateVerdict)}
    values = {k: v for k, v in data.items() if k in known}
    values.setdefault("above_chance", "chance" in data)  # manifests written before this field said so by the key
    return GateVerdict(**values)


def damaged_metrics(metrics: Any) -> str | None:
    """Why a manifest's metrics cannot be read back (a headline value that is not a number), or None."""

    def number(value) -> bool:
        return isinstance(value, (int, float)) and not isinstance(value, bool)

    if not isinstance(metrics, dict):
        return f"its metrics are {type(metrics).__name__}, not a mapping"
    for key in NUMERIC_METRICS:
        if key in metrics and not number(metrics[key]):
            return f"metric {key} is {metrics[key]!r}, not a number"
    for section in NUMERIC_SECTIONS:
        values = metrics.get(section, {})
        if not isinstance(values, dict) or not all(number(v) or k in TEXT_METRICS for k, v in values.items()):
            return f"metric section {section} is not a mapping of numbers"
    tasks = metrics.get("tasks", {})
    if not isinstance(tasks, dict) or not all(
        isinstance(values, dict) and all(number(v) for v in values.values()) for values in tasks.values()
    ):
        return "metric section tasks is not a mapping of tasks to numbers"
    return None


_GATE_KEYS = ("gate", "metric", "value", "relative_to", "reference", "bounds", "passed")


def manifest_problem(manifest: Any) -> str | None:
    """Why a manifest's content cannot be read back as the record slimlm writes, or None."""
    if not isinstance(manifest, dict):
        return f"a JSON {type(manifest).__name__}, not an object"
    if not isinstance(manifest.get("stage"), str) or not isinstance(manifest.get("kind"), str):
        return "it names no stage and kind"
    if problem := damaged_metrics(manifest.get("metrics", {})):
        return problem
    gates = manifest.get("gates", [])
    if not isinstance(gates, list) or not all(
        isinstance(g, dict) and isinstance(g.get("passed"), bool) and all(k in g for k in _GATE_KEYS) for g in gates
    ):
        return "its gate verdicts are not the records slimlm writes"
    for name, kinds in _field_types().items():  # a hand-edited field would fail later, in the runner or the report
        value = manifest.get(name)
        if value is not None and (not isinstance(value, kinds) or isinstance(value, bool) and bool not in kinds):
            return f"its field {name} is {value!r}, not a {' or '.join(k.__name__ for k in kinds)}"
    return None


@functools.cache
def _field_types() -> dict[str, tuple[type, ...]]:
    """Each Manifest field's type(s) as isinstance takes them: `str | None` -> (str,), `dict[str, Any]` -> (dict,)."""
    kinds = {}
    for name, hint in typing.get_type_hints(Manifest).items():
        members = (
            [a for a in typing.get_args(hint) if a is not type(None)]
            if typing.get_origin(hint) in (Union, UnionType)
            else [hint]
        )
        kinds[name] = tuple(typing.get_origin(m) or m for m in members)
    kinds["seconds"] = (int, float)  # JSON writes 12.0 as 12
    return kinds


def read_manifest(path: Path) -> Manifest | None:
    """A manifest, or None where it is missing or damaged (then the stage runs again)."""
    data = read_json(path)
    return None if manifest_problem(data) else Manifest.from_json(data)


def stage_manifest(layout: RunLayout, index: int, name: str) -> Manifest | None:
    return read_manifest(layout.stage_dir(index, name) / MANIFEST)


def write_manifest(folder: Path, manifest: Manifest) -> None:
    write_json_atomic(Path(folder) / MANIFEST, manifest.to_json())
