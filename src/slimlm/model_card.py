"""A Hugging Face model card (`README.md`) in every model and export folder a stage writes.

The card's YAML front matter follows the hub's convention (base_model, library_name, pipeline_tag, tags,
license), built with huggingface_hub's `ModelCardData`; the body gives the lineage (the stages and their
settings), the stage's measured metrics and gate verdicts next to the teacher's, and how to load the
artifact, naming only the runtimes that were run on it here. The card is excluded from the stage's output
digest (artifacts.dir_digest), so it can be rewritten when a rerun re-checks the gates.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from slimlm.artifacts import CARD, atomic_write
from slimlm.evaluate.catalogue import headline_values, plain_number
from slimlm.evaluate.gates import describe_verdict
from slimlm.export.clients import describe_verdict as describe_client
from slimlm.manifest import Manifest
from slimlm.stage import GGUF, HF_QUANTIZED, ONNX


def tags_of(manifest: Manifest) -> list[str]:
    """What a stage did to the model, as hub tags."""
    config = manifest.config or {}
    if manifest.kind == "prune":
        return ["pruned"]
    if manifest.kind == "distill":
        return ["distilled", "lora" if config.get("method") in ("lora", "qlora") else "full-finetune"]
    if manifest.kind == "cast":
        return [str(config.get("dtype"))]
    if manifest.kind == "bitsandbytes":
        return ["bitsandbytes", f"{config.get('bits')}bit"]
    if manifest.kind == "export" and config.get("format") == "gguf":
        return ["gguf", str(config.get("quantize"))]
    if manifest.kind == "export":
        quantize = config.get("quantize")
        return ["onnx", *(["onnxruntime-genai"] if config.get("format") == "onnx-genai" else [])] + (
            [quantize] if quantize and quantize != "none" else []
        )
    return []


def card_text(
    recipe_name: str, manifest: Manifest, lineage: list[Manifest], settings: dict[str, str], facts: dict[str, str]
) -> str:
    """The card for `manifest`'s artifact; `lineage` is the chain of stages from the teacher to it (teacher first),
    `settings` each stage's settings as the plan shows them."""
    from huggingface_hub import ModelCardData

    teacher = lineage[0]
    tags = ["slimlm"] + [t for m in lineage[1:] for t in tags_of(m)]
    data = ModelCardData(
        base_model=facts.get("base_model"),
        library_name={ONNX: "onnx", GGUF: "gguf"}.get(manifest.artifact_format or "", "transformers"),
        pipeline_tag="text-generation",
        tags=list(dict.fromkeys(tags)),
        license=facts.get("license"),
    )
    lines = [f"# {recipe_name}: {manifest.stage}", ""]
    lines += [f"Made by [slimlm](https://pypi.org/project/slimlm/) from `{teacher.model}` through:", ""]
    for m in lineage[1:]:
        lines.append(f"1. `{m.stage}` ({m.kind}): {settings.get(m.stage, '')}")
    lines += ["", "## Measured here", "", "| metric | this model | teacher |", "|---|---|---|"]
    mine, theirs = headline_values(manifest.metrics), headline_values(teacher.metrics)
    for name, value in mine.items():
        reference = plain_number(theirs[name]) if name in theirs else "-"
        lines.append(f"| {name} | {plain_number(value)} | {reference} |")
    if manifest.gates:
        lines += ["", "## Gates", "", "| gate | measured | verdict |", "|---|---|---|"]
        for v in manifest.gates:
            lines.append(f"| {v.gate} | {describe_verdict(v)} | {'pass' if v.passed else 'FAIL'} |")
    lines += ["", "## How to load it", ""] + _loading(manifest)
    return f"---\n{data.to_yaml()}\n---\n\n" + "\n".join(lines) + "\n"


def _loading(manifest: Manifest) -> list[str]:
    """Only runtimes that ran this artifact here: transformers (slimlm evaluates a model directory with it), slimlm's
    edge runtime (the export's parity check), and the clients the export stage ran it in and found to agree."""
    if manifest.artifact_format == ONNX:
        lines = [
            "slimlm's edge runtime (onnxruntime and tokenizers, no torch), which measured this export's parity:",
            "",
            "```bash",
            f'slimlm generate {manifest.artifact_path} "Once upon a time"',
            "```",
            "",
        ]
        clients: dict[str, Any] = manifest.metrics.get("clients") or {}
        lines.append("The export stage ran it in these clients, against slimlm generate:")
        lines.append("")
        for client, verdict in clients.items():
            if isinstance(verdict, dict):
                lines.append(f"- {client}: {describe_client(verdict)}")
        if not clients:
            lines.append("- none (transformers.js, Optimum and onnxruntime-genai are not checked: `clients: false`)")
        return lines
    if manifest.artifact_format == GGUF:
        return _loading_gguf(manifest)
    lines = ["```python", "from transformers import AutoModelForCausalLM, AutoTokenizer", ""]
    lines += [
        f'model = AutoModelForCausalLM.from_pretrained("{manifest.artifact_path}")',
        f'tokenizer = AutoTokenizer.from_pretrained("{manifest.artifact_path}")',
        "```",
    ]
    if manifest.artifact_format == HF_QUANTIZED:
        lines += ["", "The weights are bitsandbytes-quantized: load it where bitsandbytes is installed (a GPU host)."]
    return lines


def _loading_gguf(manifest: Manifest) -> list[str]:
    path = f"{manifest.artifact_path}/model.gguf"
    if manifest.metrics.get("runtime") == "llama.cpp":
        return [
            "llama.cpp, which measured this export's parity (through llama-cpp-python):",
            "",
            "```python",
            "from llama_cpp import Llama",
            "",
            f'llm = Llama(model_path="{path}")',
            "```",
        ]
    return [
        "transformers, which read the file back (dequantized) to measure this export's parity; llama.cpp was not",
        "installed, so the file is not checked in llama.cpp:",
        "",
        "```python",
        "from transformers import AutoConfig, AutoModelForCausalLM",
        "",
        f'config = AutoConfig.from_pretrained("{manifest.artifact_path}")  # its GGUF reader maps no explicit head_dim',
        f'model = AutoModelForCausalLM.from_pretrained("{manifest.artifact_path}", gguf_file="model.gguf", config=config)',
        "```",
    ]


def write_card(folder: Path, text: str) -> None:
    with atomic_write(Path(folder) / CARD) as tmp:  # a rerun rewrites the card of a committed stage in place
        tmp.write_text(text)
