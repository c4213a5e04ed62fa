"""The recipe's evaluation section run on one model artifact (PyTorch, ONNX or GGUF).

Size and parameters always; perplexity, teacher agreement, lm-eval tasks and speed when the recipe
asks. An ONNX artifact is scored through onnxruntime and a GGUF through llama.cpp (`ExportedCausalLM`),
so a gate after export measures the exported model, not its PyTorch parent.
"""

from __future__ import annotations

import gc
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from slimlm.arch import needs_bos_per_window
from slimlm.artifacts import config_digest, file_digest
from slimlm.errors import RecipeError
from slimlm.evaluate.exported_model import is_exported
from slimlm.evaluate.perplexity import perplexity, torch_logits
from slimlm.evaluate.size import parameter_counts, size_on_disk
from slimlm.evaluate.spec import resolve_path
from slimlm.progress import status, track
from slimlm.sources.models import load_model, load_tokenizer

if TYPE_CHECKING:
    from slimlm.recipe import Recipe
    from slimlm.sources.text import DataStore


def evaluation_digest(recipe: Recipe) -> str:
    """Changes whenever re-evaluation is needed: the evaluation section, the data it reads, local task files."""
    ev = recipe.evaluation.model_dump(mode="json")
    data = {name: spec.model_dump(mode="json") for name, spec in recipe.data.items()}
    tasks = recipe.evaluation.lm_eval.tasks if recipe.evaluation.lm_eval else []
    files = {t.name: file_digest(resolve_path(t.file)) for t in tasks if t.file}
    return config_digest({"evaluation": ev, "data": data, "dtype": recipe.dtype, "task_files": files})


@dataclass
class Evaluator:
    """Evaluates artifacts for one run; local lm-eval tasks are written once, into `tasks_dir`."""

    recipe: Recipe
    data: DataStore
    device: str
    tasks_dir: Path

    def __post_init__(self) -> None:
        if self.recipe.evaluation.lm_eval:
            from slimlm.evaluate.tasks import write_local_tasks

            write_local_tasks(self.recipe.evaluation.lm_eval, self.data, self.tasks_dir)

    def _load(self, path: Path):
        if is_exported(path):
            from slimlm.evaluate.exported_model import ExportedCausalLM

            return ExportedCausalLM(path)
        return load_model(
            path, dtype=self.recipe.dtype, device=self.device, trust_remote_code=self.recipe.trust_remote_code
        )

    def evaluate(self, path: Path, teacher_dir: Path | None = None) -> dict[str, Any]:
        """Metrics of the artifact at `path`; agreement is measured against `teacher_dir` (none for the teacher)."""
        ev, recipe = self.recipe.evaluation, self.recipe
        metrics: dict[str, Any] = {"size_bytes": size_on_disk(path)}
        seconds: dict[str, float] = {}  # where an evaluation's time goes, part by part
        clock = time.perf_counter()

        def lap(part: str) -> None:
            nonlocal clock
            seconds[part] = round(time.perf_counter() - clock, 2)
            clock = time.perf_counter()

        model = self._load(path)
        if not is_exported(path):
            metrics.update(parameter_counts(model))
        tokenizer = load_tokenizer(path, trust_remote_code=recipe.trust_remote_code)
        bos = needs_bos_per_window(model.config)
        lap("load")
        if ev.perplexity is not None:
            spec = ev.perplexity
            seq_len = spec.seq_len or recipe.data[spec.data].seq_len
            if spec.stride is None:
                tokens = self.data.blocks(
                    spec.data, tokenizer, bos_per_window=bos, seq_len=seq_len, max_tokens=spec.max_tokens
                )
            else:  # a sliding window scores one stream; no per-window BOS
                tokens = self.data.stream(spec.data, tokenizer, max_tokens=spec.max_tokens)
            result = perplexity(
                torch_logits(model),
                tokens,
                seq_len=seq_len,
                stride=spec.stride,
                batch_size=spec.batch_size,
                progress=track,
            )
            metrics["perplexity"] = result["perplexity"]
            metrics["perplexity_detail"] = {"tokens": result["tokens"], "method": result["method"], "data": spec.data}
            lap("perplexity")
        if ev.agreement is not None and teacher_dir is not None:
            from slimlm.evaluate.agreement import teacher_agreement

            spec = ev.agreement
            blocks = self.data.blocks(
                spec.data, tokenizer, bos_per_window=bos, seq_len=spec.seq_len, max_tokens=spec.max_tokens
            )
            teacher = self._load(teacher_dir)
            metrics["agreement"] = teacher_agreement(
                torch_logits(model), torch_logits(teacher), blocks, spec.batch_size, progress=track
            )
            del teacher
            lap("agreement")
        if ev.lm_eval is not None:
            from slimlm.evaluate.tasks import run_tasks

            status(f"lm-eval: {', '.join(t.name for t in ev.lm_eval.tasks)}")
            metrics["tasks"] = run_tasks(model, tokenizer, ev.lm_eval, self.tasks_dir)
            lap("lm_eval")
        context = getattr(model.config, "max_position_embeddings", None)
        del model
        gc.collect()  # the speed measurement starts a process of its own; give it the memory back first
        if ev.speed is not None:
            length = ev.speed.prompt_tokens + ev.speed.new_tokens
            if isinstance(context, int) and length > context:  # a longer prompt would only fill memory
                raise RecipeError(
                    f"evaluation.speed: prompt_tokens + new_tokens is {length}, more than the model's context of "
                    f"{context} tokens; lower them"
                )
            from slimlm.evaluate.speed import measure_speed

            status("measuring prefill and decode speed")
            speed = measure_speed(
                path, ev.speed, dtype=recipe.dtype, device=self.device, trust_remote_code=recipe.trust_remote_code
            )
            if speed is None:
                status("speed: not measured (a GGUF's speed is llama.cpp's: pip install 'slimlm\\[llama]')")
            else:
                metrics["speed"] = speed
            lap("speed")
        metrics["evaluation_seconds"] = seconds
        return metrics
