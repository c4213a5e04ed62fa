"""The metric names every reader of a run shares, spelled once.

The runner measures `ALWAYS_MEASURED` on every model artifact; the evaluation section adds the rest.
`HEADLINES` are the figures a summary of a run shows, in this order: the runner's printout after each
stage, `slimlm plan`, `slimlm status` and the report's table all read them from here.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

PARAMS, NONEMBEDDING_PARAMS, SIZE = "params", "nonembedding_params", "size_bytes"
PERPLEXITY = "perplexity"
AGREEMENT = ("agreement.top1", "agreement.kl")
SPEED = ("speed.prefill_tokens_per_s", "speed.decode_tokens_per_s")
PEAK_MEMORY = "speed.peak_memory_bytes"

ALWAYS_MEASURED = (PARAMS, NONEMBEDDING_PARAMS, SIZE)
ALWAYS_MEASURED_EXPORT = (SIZE,)  # an ONNX graph's or GGUF file's parameters are not counted

# lm-eval task metrics: a multiple-choice task's, and a perplexity task's
MULTIPLE_CHOICE_METRICS = ("acc", "acc_norm", "chance")
PERPLEXITY_METRICS = ("word_perplexity", "byte_perplexity", "bits_per_byte")
TASK_HEADLINES = ("acc", "acc_norm", "word_perplexity", "bits_per_byte")  # shown first, in this order

# Metrics read as numbers (a manifest where they are not is damaged); speed.settings says how speed was measured.
NUMERIC_METRICS = (*ALWAYS_MEASURED, PERPLEXITY)
NUMERIC_SECTIONS = ("agreement", "speed")
TEXT_METRICS = ("settings",)


def number(metrics: dict[str, Any], name: str) -> int | float | None:
    """A metric by dotted name (`agreement.top1`) in a nested metrics dict, as stored, or None where it is not a number."""
    value: Any = metrics
    for part in name.split("."):
        if not isinstance(value, dict) or part not in value:
            return None
        value = value[part]
    return value if isinstance(value, (int, float)) and not isinstance(value, bool) else None


def metric_value(metrics: dict[str, Any], name: str) -> float | None:
    """A metric by dotted name as a float, or None where it is not a number."""
    value = number(metrics, name)
    return None if value is None else float(value)


@dataclass(frozen=True)
class Headline:
    """One figure of a run summary: its metric, its column header, and how it is written."""

    metric: str
    label: str
    fmt: str
    scale: float = 1.0
    in_status: bool = False  # also a column of `slimlm status` (which is kept narrow)
    versus_teacher: bool = False  # the report writes it with its ratio to the teacher's: `12.3 (0.52x)`

    def value(self, metrics: dict[str, Any]) -> float | None:
        value = metric_value(metrics, self.metric)
        return None if value is None else value * self.scale

    def cell(self, metrics: dict[str, Any]) -> str:
        value = self.value(metrics)
        if value is None:
            return ""
        return format(int(value), self.fmt) if self.fmt == "," else format(value, self.fmt)


HEADLINES = (
    Headline(SIZE, "size MB", ".1f", scale=1e-6, in_status=True, versus_teacher=True),
    Headline(PARAMS, "params", ",", in_status=True),
    Headline(PERPLEXITY, "perplexity", ".3f", in_status=True),
    Headline(AGREEMENT[0], "top-1 agreement", ".4f"),
    Headline(AGREEMENT[1], "KL", ".4f"),
    Headline(SPEED[0], "prefill tok/s", ".1f", versus_teacher=True),
    Headline(SPEED[1], "decode tok/s", ".1f", versus_teacher=True),
    Headline(PEAK_MEMORY, "peak MB", ".0f", scale=1e-6),
)


def task_headline(values: dict[str, Any]) -> str | None:
    """The metric a task is summarised by (accuracy for multiple choice), or None."""
    return next((m for m in TASK_HEADLINES if m in values), None)


def plain_number(value: int | float) -> str:
    """A figure as the run log and the model cards write it: `134,515,008`, `22.97`."""
    return f"{value:.4g}" if isinstance(value, float) else f"{value:,}"


def headline_values(metrics: dict[str, Any]) -> dict[str, int | float]:
    """The headline figures present in `metrics`, by metric name, each task's headline included."""
    shown = {h.metric: number(metrics, h.metric) for h in HEADLINES}
    for task, values in (metrics.get("tasks") or {}).items():
        if isinstance(values, dict) and (name := task_headline(values)):
            shown[f"tasks.{task}.{name}"] = number(values, name)
    return {k: v for k, v in shown.items() if v is not None}
