"""The recipe's `evaluation:` section: what is measured on the teacher and on every stage's output.

    evaluation:
      perplexity: {data: eval, max_tokens: 4096}
      agreement: {data: eval, max_tokens: 2048}         # top-1 agreement and KL(teacher || student)
      speed: {prompt_tokens: 128, new_tokens: 32, batch_size: 4}
      lm_eval:
        limit: 200
        tasks:
          - hellaswag                                    # lm-eval's own task (needs the hub)
          - {name: docs_cloze, data: eval}               # built from a data source's documents
          - {name: piqa, file: piqa.jsonl, text: "Question: {{goal}}\\nAnswer:", choices: "{{choices}}", target: "{{gold}}"}

Everything that can be checked without loading a model is checked here, at `slimlm plan` time.
"""

from __future__ import annotations

import functools
import json
from pathlib import Path
from typing import Literal

from pydantic import Field, field_validator, model_validator

from slimlm.evaluate.catalogue import (
    AGREEMENT,
    MULTIPLE_CHOICE_METRICS,
    PEAK_MEMORY,
    PERPLEXITY,
    PERPLEXITY_METRICS,
    SPEED,
)
from slimlm.evaluate.templates import template_fields, template_problem
from slimlm.stage import PLAIN_NAME, Strict

# Metrics lm-eval reports for the task types slimlm writes itself; `chance` is slimlm's (1/choices averaged).


class PerplexityEval(Strict):
    data: str
    max_tokens: int = Field(8192, ge=16)
    seq_len: int | None = Field(None, ge=8)
    stride: int | None = Field(None, ge=1, description="sliding-window stride; non-overlapping windows if unset")
    batch_size: int = Field(4, ge=1)


class AgreementEval(Strict):
    """Top-1 token agreement and mean KL(teacher || student) on held-out text."""

    data: str
    max_tokens: int = Field(2048, ge=16)
    seq_len: int | None = Field(None, ge=8)
    batch_size: int = Field(4, ge=1)


class SpeedEval(Strict):
    """Prefill and decode tokens/s (medians of `repeats`) at batch 1 and at `batch_size`, and peak memory."""

    prompt_tokens: int = Field(128, ge=1)
    new_tokens: int = Field(32, ge=2)
    batch_size: int = Field(4, ge=1)
    repeats: int = Field(3, ge=1)
    threads: int | None = Field(None, ge=1, description="CPU threads; all cores if unset")


class TaskSpec(Strict):
    """One lm-eval task: a built-in one by name, a local jsonl file, or one built from a recipe data source."""

    name: str = Field(pattern=PLAIN_NAME)
    file: str | None = Field(None, description="a local jsonl file, one example per line")
    data: str | None = Field(None, description="a recipe data source; its documents become the task")
    type: Literal["multiple_choice", "perplexity"] = "multiple_choice"
    text: str | None = Field(None, description="Jinja template of the prompt (lm-eval's doc_to_text)")
    choices: str | None = Field(None, description="Jinja template of the list of choices (doc_to_choice)")
    target: str | None = Field(
        None, description="Jinja template of the gold choice's index, or of the text to score (doc_to_target)"
    )
    num_fewshot: int | None = Field(None, ge=0)
    limit: int | None = Field(None, ge=1, description="evaluate the first N examples")
    # Tasks built from `data:` (multiple choice): the opening words of a document, which continuation follows?
    context_words: int = Field(48, ge=1)
    continuation_words: int = Field(12, ge=1)
    num_choices: int = Field(4, ge=2)

    @model_validator(mode="after")
    def _one_source(self) -> TaskSpec:
        if self.file and self.data:
            raise ValueError("a task reads either `file:` or `data:`, not both")
        if self.file:
            needed = ("text", "choices", "target") if self.type == "multiple_choice" else ("target",)
            missing = [f for f in needed if getattr(self, f) is None]
            if missing:
                raise ValueError(
                    f"a local {self.type} task needs the templates {', '.join(missing)} "
                    '(Jinja over the jsonl fields, e.g. text: "{{question}}", choices: "{{choices}}", target: "{{gold}}")'
                )
        elif self.data is None and any(v is not None for v in (self.text, self.choices, self.target)):
            raise ValueError("templates (text, choices, target) belong to local tasks; add `file:` or `data:`")
        return self

    @property
    def builtin(self) -> bool:
        return self.file is None and self.data is None

    def metric_names(self) -> tuple[str, ...]:
        if self.builtin:
            return ()  # lm-eval decides; checked when the task has run
        return MULTIPLE_CHOICE_METRICS if self.type == "multiple_choice" else PERPLEXITY_METRICS


class LmEvalSpec(Strict):
    tasks: list[TaskSpec] = Field(min_length=1)
    batch_size: int = Field(8, ge=1)
    limit: int | None = Field(None, ge=1, description="default `limit` for every task")
    num_fewshot: int | None = Field(None, ge=0, description="default `num_fewshot` for every task")

    @field_validator("tasks", mode="before")
    @classmethod
    def _names_as_tasks(cls, tasks):
        return [{"name": t} if isinstance(t, str) else t for t in tasks] if isinstance(tasks, list) else tasks


class Evaluation(Strict):
    perplexity: PerplexityEval | None = None
    agreement: AgreementEval | None = None
    speed: SpeedEval | None = None
    lm_eval: LmEvalSpec | None = None

    def metric_names(self) -> set[str]:
        """Names a gate may use. `tasks.NAME.*` stands for a built-in task's metrics, known once it has run."""
        names: set[str] = set()
        if self.perplexity:
            names.add(PERPLEXITY)
        if self.agreement:
            names |= set(AGREEMENT)
        if self.speed:
            for suffix in ("", f"_b{self.speed.batch_size}"):  # the batched figures carry the batch size
                names |= {f"{name}{suffix}" for name in SPEED}
            names.add(PEAK_MEMORY)
        for task in self.lm_eval.tasks if self.lm_eval else []:
            metrics = task.metric_names() or ("*",)
            names |= {f"tasks.{task.name}.{m}" for m in metrics}
        return names

    def data_references(self) -> dict[tuple, str]:
        refs: dict[tuple, str] = {}
        for key in ("perplexity", "agreement"):
            section = getattr(self, key)
            if section is not None:
                refs[("evaluation", key, "data")] = section.data
        for i, task in enumerate(self.lm_eval.tasks if self.lm_eval else []):
            if task.data is not None:
                refs[("evaluation", "lm_eval", "tasks", i, "data")] = task.data
        return refs


def metric_is_known(metric: str, names: set[str]) -> bool:
    return metric in names or any(n.endswith(".*") and metric.startswith(n[:-1]) for n in names)


def task_problems(spec: LmEvalSpec) -> dict[tuple, str]:
    """Plan-time checks of the tasks: local files exist and have the fields the templates use; built-in names exist."""
    problems: dict[tuple, str] = {}
    for i, task in enumerate(spec.tasks):
        refused = _refused_template(task)
        if refused:  # a template that could run code or exhaust memory is refused before anything reads the file
            field, message = refused
            problems[("evaluation", "lm_eval", "tasks", i, field)] = message
        elif task.file is not None:
            problem = _local_file_problem(task, resolve_path(task.file))
            if problem:
                problems[("evaluation", "lm_eval", "tasks", i, "file")] = problem
    builtin = [(i, t.name) for i, t in enumerate(spec.tasks) if t.builtin]
    if builtin:
        known = list(builtin_task_index())
        for i, name in builtin:
            if name not in known:
                import difflib

                hint = difflib.get_close_matches(name, known, n=3)
                problems[("evaluation", "lm_eval", "tasks", i, "name")] = (
                    f"lm-eval has no task named {name!r}"
                    + (f"; did you mean {', '.join(hint)}?" if hint else "")
                    + " For your own data, give the task a `file:` (jsonl) or `data:` (a recipe data source)"
                )
    return problems


def _refused_template(task: TaskSpec) -> tuple[str, str] | None:
    """(field, message) for the first of a task's templates that slimlm refuses, or None."""
    for field in ("text", "choices", "target"):
        template = getattr(task, field)
        problem = template_problem(template) if template is not None else None
        if problem:
            return field, (
                f"template {template!r} {problem}; a template may use the record's fields ({{{{goal}}}}, "
                "{{choices[0]}}), literals, if/for and plain filters"
            )
    return None


def resolve_path(file: str) -> Path:
    """Task files, like data sources, are relative to the working directory; lm-eval gets absolute paths."""
    return Path(file).expanduser().resolve()


@functools.cache
def builtin_task_index() -> dict:
    """lm-eval's index of its own tasks and groups (name -> entry with the task's YAML config); takes seconds."""
    from lm_eval.tasks import TaskManager

    return dict(TaskManager().task_index)


def gate_metric_names(evaluation: Evaluation) -> set[str]:
    """`Evaluation.metric_names`, with built-in tasks' metrics read from lm-eval's task configs where it has them."""
    names = evaluation.metric_names()
    for task in evaluation.lm_eval.tasks if evaluation.lm_eval else []:
        entry = builtin_task_index().get(task.name) if task.builtin else None
        cfg = getattr(entry, "cfg", None) or {}
        metrics = [m["metric"] for m in cfg.get("metric_list", []) if isinstance(m.get("metric"), str)]
        if metrics:  # a group, or a task that computes its metrics in code, keeps the wildcard
            names.discard(f"tasks.{task.name}.*")
            extra = ["chance"] if cfg.get("output_type") == "multiple_choice" else []
            names |= {f"tasks.{task.name}.{m}" for m in metrics + extra}
    return names


def _local_file_problem(task: TaskSpec, path: Path) -> str | None:
    if not path.is_file():
        return f"task file {path} does not exist"
    try:
        with path.open() as f:
            first = next((line for line in f if line.strip()), None)
        if first is None:
            return f"task file {path} is empty"
        example = json.loads(first)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        return f"task file {path} is not jsonl (one JSON object per line): {e}"
    if not isinstance(example, dict):
        return f"task file {path}: each line must be a JSON object"
    for field in ("text", "choices", "target"):
        template = getattr(task, field)
        if template is None:
            continue
        try:
            missing = sorted(template_fields(template) - set(example))
        except Exception as e:  # a Jinja syntax error
            return f"template {field}: {template!r} does not parse: {e}"
        if missing:
            return (
                f"template {field}: {template!r} uses {', '.join(missing)}, but the examples in {path.name} "
                f"have the fields {', '.join(sorted(example))}"
            )
    return None
