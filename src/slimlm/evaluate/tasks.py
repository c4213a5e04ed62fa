"""lm-eval tasks on any stage's model: built-in tasks by name, local jsonl tasks, and tasks built from recipe data.

Local tasks are written as lm-eval YAML files (absolute `data_files` paths, since lm-eval resolves
them against the working directory) into the run's `tasks/` folder, where `lm_eval --include_path`
can run them again by hand. The model goes to lm-eval as a loaded object (`HFLM(pretrained=model)`),
so a pruned, distilled or ONNX-exported model is scored exactly as lm-eval scores any HF model.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import yaml

from slimlm.errors import StageFailed
from slimlm.evaluate.catalogue import PERPLEXITY_METRICS
from slimlm.evaluate.spec import LmEvalSpec, TaskSpec, resolve_path
from slimlm.evaluate.templates import sandboxed_lm_eval
from slimlm.progress import library_bars


def write_local_tasks(spec: LmEvalSpec, data, out_dir: Path) -> None:
    """One `<name>.yaml` per local task (and `<name>.jsonl` for tasks built from a data source)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    for task in spec.tasks:
        if task.builtin:
            continue
        if task.file is not None:
            data_file = resolve_path(task.file)
        else:
            data_file = out_dir / f"{task.name}.jsonl"
            examples = (
                continuation_examples(data.documents(task.data), task)
                if task.type == "multiple_choice"
                else [{"text": doc} for doc in data.documents(task.data)]
            )
            if not examples:
                from slimlm.errors import SourceError

                raise SourceError(
                    f"task {task.name!r}: data source {task.data!r} has no document of "
                    f"{task.context_words + task.continuation_words}+ words to build questions from; "
                    "lower context_words/continuation_words or use a larger source"
                )
            data_file.write_text("".join(json.dumps(e) + "\n" for e in examples))
        (out_dir / f"{task.name}.yaml").write_text(yaml.safe_dump(task_config(task, data_file), sort_keys=False))


def task_config(task: TaskSpec, data_file: Path) -> dict[str, Any]:
    """The lm-eval task definition of a local task."""
    config: dict[str, Any] = {
        "task": task.name,
        "dataset_path": "json",
        "dataset_kwargs": {"data_files": {"test": str(data_file)}},
        "test_split": "test",
    }
    if task.type == "multiple_choice":
        built = task.file is None
        config.update(
            output_type="multiple_choice",
            doc_to_text="{{context}}" if built else task.text,
            doc_to_choice="{{choices}}" if built else task.choices,
            doc_to_target="{{gold}}" if built else task.target,
            metric_list=[{"metric": m, "aggregation": "mean", "higher_is_better": True} for m in ("acc", "acc_norm")],
        )
    else:
        config.update(
            output_type="loglikelihood_rolling",
            doc_to_text="",
            doc_to_target="{{text}}" if task.file is None else task.target,
            metric_list=[{"metric": m} for m in PERPLEXITY_METRICS],  # lm-eval's defaults aggregate these
        )
    if task.num_fewshot:
        config["fewshot_split"] = "test"
    config["metadata"] = {"version": 1.0}
    return config


def continuation_examples(documents: list[str], task: TaskSpec) -> list[dict[str, Any]]:
    """Cloze questions from text: the opening words of a passage, and which of N continuations really follows.

    Distractors are spans of the same length from other passages, so a model that has learned the
    text's language scores well above chance (1/N) and one that has not sits at chance.
    """
    rng = random.Random(task.name)  # the same questions on every run and every machine
    span = task.context_words + task.continuation_words
    passages = []
    for doc in documents:
        words = doc.split()
        passages += [words[i : i + span] for i in range(0, len(words) - span + 1, span)]
    if len(passages) < task.num_choices:
        return []
    examples = []
    for i, words in enumerate(passages):
        others = rng.sample([j for j in range(len(passages)) if j != i], task.num_choices - 1)
        choices = [" ".join(words[task.context_words :])]
        choices += [" ".join(passages[j][task.context_words :]) for j in others]
        order = list(range(task.num_choices))
        rng.shuffle(order)
        examples.append(
            {
                "context": " ".join(words[: task.context_words]),
                "choices": [choices[k] for k in order],
                "gold": order.index(0),
            }
        )
    return examples


def run_tasks(model, tokenizer, spec: LmEvalSpec, tasks_dir: Path) -> dict[str, dict[str, Any]]:
    """Evaluate `model` (a PyTorch causal LM or ExportedCausalLM) on the spec's tasks; metrics per task."""
    if not any(t.builtin for t in spec.tasks):  # local tasks never need the hub; built-in ones fetch their datasets
        os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    from lm_eval.models.huggingface import HFLM

    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=spec.batch_size)
    with _quiet_lm_eval(), sandboxed_lm_eval():
        return _evaluate(lm, spec, tasks_dir)


def _evaluate(lm, spec: LmEvalSpec, tasks_dir: Path) -> dict[str, dict[str, Any]]:
    import lm_eval
    from lm_eval.tasks import TaskManager

    manager = TaskManager(include_path=str(tasks_dir), include_defaults=any(t.builtin for t in spec.tasks))
    metrics: dict[str, dict[str, Any]] = {}
    # simple_evaluate takes one limit and one num_fewshot, so tasks that share them run together.
    groups: dict[tuple, list[TaskSpec]] = {}
    for task in spec.tasks:
        key = (task.limit or spec.limit, task.num_fewshot if task.num_fewshot is not None else spec.num_fewshot)
        groups.setdefault(key, []).append(task)
    for (limit, fewshot), tasks in groups.items():
        names = [t.name for t in tasks]
        try:
            out = lm_eval.simple_evaluate(
                model=lm,
                tasks=names,
                num_fewshot=fewshot,
                limit=limit,
                task_manager=manager,
                bootstrap_iters=1000,
                log_samples=True,
            )
        except Exception as e:  # e.g. a built-in task's dataset that cannot be downloaded
            hint = (
                "; built-in tasks download their datasets from the Hugging Face hub: without it, define the task "
                "locally (file: or data:)"
                if any(t.builtin for t in tasks)
                else ""
            )
            raise StageFailed(f"lm-eval could not evaluate {', '.join(names)}: {type(e).__name__}: {e}{hint}") from e
        metrics.update(task_metrics(out))
    return metrics


@contextlib.contextmanager
def _quiet_lm_eval() -> Iterator[None]:
    """lm-eval's request loop gets a progress bar like slimlm's others and its per-document bars go quiet; it
    does not ask git for the commit of the working directory (which prints `fatal: not a git repository`
    outside one, and says nothing about the model)."""
    from lm_eval import evaluator

    modules = ("lm_eval.models.huggingface", "lm_eval.api.model", "lm_eval.api.task")
    original = getattr(evaluator, "get_git_commit_hash", None)
    if original is not None:
        evaluator.get_git_commit_hash = lambda: None
    try:
        with library_bars(modules, shown=("Running loglikelihood requests",)):
            yield
    finally:
        if original is not None:
            evaluator.get_git_commit_hash = original


def task_metrics(out: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Flatten lm-eval's results ("acc,none": 0.5) into {task: {acc: 0.5, chance: 0.25, samples: 200}}."""
    metrics: dict[str, dict[str, Any]] = {}
    for task, result in out["results"].items():
        values: dict[str, Any] = {}
        for key, value in result.items():
            metric, _, filter_name = key.partition(",")
            if not filter_name or not isinstance(value, (int, float)) or isinstance(value, bool):
                continue
            values[metric if filter_name == "none" else f"{metric}_{filter_name}"] = float(value)
        samples = out.get("samples", {}).get(task)
        if samples:
            values["samples"] = len(samples)
            if out["configs"][task].get("output_type") == "multiple_choice":
                # one response per choice; chance is 1/choices averaged over the questions asked
                values["chance"] = sum(1 / len(s["filtered_resps"]) for s in samples) / len(samples)
        metrics[task] = values
    return metrics
