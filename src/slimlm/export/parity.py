"""The export measured against the PyTorch model it came from, on held-out text, and in its clients."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import torch

from slimlm import arch
from slimlm.edge import EdgeModel
from slimlm.evaluate.agreement import teacher_agreement
from slimlm.export.clients import check_clients, describe_verdict
from slimlm.progress import status
from slimlm.sources.models import load_tokenizer
from slimlm.stage import StageContext

if TYPE_CHECKING:
    from slimlm.export.config import ExportConfig


def measure_parity(config: ExportConfig, context: StageContext, model, out: Path) -> dict:
    if config.parity is None:
        return {}
    blocks = parity_blocks(config, context, model)
    edge = EdgeModel(out)
    metrics = parity(model, edge, blocks, config.parity.greedy_steps)
    metrics["onnx_bytes"] = int(sum(p.stat().st_size for p in out.iterdir() if p.name.startswith("model.onnx")))
    report_parity(metrics)
    if config.clients:
        status("running the export in its clients (transformers.js, Optimum, onnxruntime-genai)")
        prompt = blocks[0, : min(16, blocks.shape[1])].tolist()
        metrics["clients"] = check_clients(edge, prompt, config.parity.greedy_steps, blocks[0].tolist())
        status("clients: " + "; ".join(f"{c}: {describe_verdict(v)}" for c, v in metrics["clients"].items()))
    return metrics


def parity_blocks(config: ExportConfig, context: StageContext, model) -> torch.Tensor:
    return context.data.blocks(
        config.parity.data,
        load_tokenizer(context.input_dir),
        bos_per_window=arch.needs_bos_per_window(model.config),
        seq_len=config.parity.seq_len,
        max_tokens=config.parity.max_tokens,
    )


def report_parity(metrics: dict) -> None:
    status(
        f"parity: max |logit diff| {metrics['max_logit_diff']:.3g}, top-1 agreement {metrics['top1_agreement']:.4f}, "
        f"KL {metrics['kl']:.3g}, greedy {metrics['greedy_agreement']:.3f}"
    )


@torch.inference_mode()
def parity(model, edge, blocks: torch.Tensor, greedy_steps: int) -> dict[str, float]:
    """The export (`edge`: an EdgeModel, or a GGUF in its runtime) against its PyTorch parent `model` on held-out
    `blocks`: both have `logits(ids)` and `generate_ids(prompt, steps)`."""
    # the PyTorch parent plays the teacher: KL(parent || export), one block at a time
    agreement = teacher_agreement(
        lambda ids: edge.logits(ids.numpy()), lambda ids: model(input_ids=ids, use_cache=False).logits, blocks, 1
    )
    prompt = blocks[0, : min(16, blocks.shape[1])]
    expected = model.generate(
        prompt[None], attention_mask=torch.ones_like(prompt[None]), max_new_tokens=greedy_steps, do_sample=False
    )[0, prompt.numel() :].tolist()
    produced = list(edge.generate_ids(prompt.tolist(), greedy_steps))
    same = sum(a == b for a, b in zip(expected, produced, strict=False)) / max(len(expected), len(produced), 1)
    return {
        "max_logit_diff": agreement["max_logit_diff"],
        "top1_agreement": agreement["top1"],
        "kl": agreement["kl"],
        "greedy_agreement": same,
        "greedy_tokens": {"pytorch": expected, "export": produced},
    }
