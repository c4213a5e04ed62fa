"""The recipe's evaluation section run on one model artifact (PyTorch or ONNX): size, parameters, perplexity."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from slimlm.arch import needs_bos_per_window
from slimlm.artifacts import config_digest
from slimlm.evaluate.perplexity import perplexity, torch_logits
from slimlm.evaluate.size import parameter_counts, size_on_disk
from slimlm.progress import track
from slimlm.sources.models import load_model, load_tokenizer

if TYPE_CHECKING:
    from slimlm.recipe import Recipe
    from slimlm.sources.text import DataStore


def evaluation_digest(recipe: Recipe) -> str:
    """Changes whenever re-evaluation is needed: the evaluation section or the data it reads."""
    ev = recipe.evaluation.model_dump(mode="json")
    data = {name: spec.model_dump(mode="json") for name, spec in recipe.data.items()}
    return config_digest({"evaluation": ev, "data": data, "dtype": recipe.dtype})


def is_onnx(path: Path) -> bool:
    return (Path(path) / "model.onnx").is_file()


def onnx_logits(path: Path):
    """A logits function backed by onnxruntime, so gates after export measure the exported model itself."""
    import torch

    from slimlm.edge import EdgeModel

    model = EdgeModel(path)
    return lambda ids: torch.from_numpy(model.logits(ids.numpy()))


def evaluate_artifact(path: Path, recipe: Recipe, data: DataStore, device: str) -> dict[str, Any]:
    from transformers import AutoConfig

    metrics: dict[str, Any] = {"size_bytes": size_on_disk(path)}
    trust = recipe.trust_remote_code
    if is_onnx(path):
        logits_fn = onnx_logits(path)
    else:
        model = load_model(path, dtype=recipe.dtype, device=device, trust_remote_code=trust)
        metrics.update(parameter_counts(model))
        logits_fn = torch_logits(model)
    ppl = recipe.evaluation.perplexity
    if ppl is not None:
        tokenizer = load_tokenizer(path, trust_remote_code=trust)
        seq_len = ppl.seq_len or recipe.data[ppl.data].seq_len
        bos = needs_bos_per_window(AutoConfig.from_pretrained(path, trust_remote_code=trust))
        if ppl.stride is None:
            tokens = data.blocks(ppl.data, tokenizer, bos_per_window=bos, seq_len=seq_len, max_tokens=ppl.max_tokens)
        else:  # a sliding window scores one stream; no per-window BOS
            tokens = data.stream(ppl.data, tokenizer, max_tokens=ppl.max_tokens)
        result = perplexity(
            logits_fn, tokens, seq_len=seq_len, stride=ppl.stride, batch_size=ppl.batch_size, progress=track
        )
        metrics["perplexity"] = result["perplexity"]
        metrics["perplexity_detail"] = {"tokens": result["tokens"], "method": result["method"], "data": ppl.data}
    return metrics
