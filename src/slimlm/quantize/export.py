"""`kind: export` — ONNX with a KV cache (fp32, int8 or int4), checked against the PyTorch model it came from.

Two graphs, one quantization: `format: onnx` is the torch dynamo exporter's graph in Optimum's layout;
`format: onnx-genai` is onnxruntime-genai's builder's fused graph (faster to decode on CPUs). Both get
SmoothQuant, GPTQ, keep_8bit and the shared tied table from quantize/ort_quantize.py.

The parity check runs the exported model in onnxruntime on held-out text and records the largest
logit difference, top-1 agreement and KL against the PyTorch input model, and how many greedy
tokens match over N decode steps: metrics a recipe can gate on.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from pydantic import Field, model_validator

from slimlm import arch
from slimlm.edge import EdgeModel
from slimlm.errors import RecipeError, SourceError, StageFailed, UnsupportedModelError
from slimlm.evaluate.agreement import teacher_agreement
from slimlm.progress import status
from slimlm.quantize.client_layout import prepare_for_clients
from slimlm.quantize.clients import check_clients, describe_verdict
from slimlm.quantize.gptq import gptq
from slimlm.quantize.onnx_export import copy_side_files, export_onnx
from slimlm.quantize.ort_quantize import matches, quantize_weights
from slimlm.quantize.smooth import smooth
from slimlm.sources.models import load_model, load_tokenizer
from slimlm.stage import HF, ONNX, StageConfig, StageContext, StageResult, Strict


class ParityOptions(Strict):
    data: str = "eval"
    max_tokens: int = Field(1024, ge=16)
    seq_len: int = Field(128, ge=8)
    greedy_steps: int = Field(16, ge=1)


class CalibrationOptions(Strict):
    data: str = "calibration"
    samples: int = Field(8, ge=1, description="calibration blocks of seq_len tokens")
    seq_len: int = Field(256, ge=8)


class SmoothOptions(CalibrationOptions):
    alpha: float = Field(0.75, ge=0, le=1, description="how much of the activation range moves into the weights")


class GPTQOptions(CalibrationOptions):
    samples: int = Field(32, ge=1, description="calibration blocks of seq_len tokens")
    damp: float = Field(0.01, gt=0, description="added to the Hessian's diagonal, as a fraction of its mean")


class ExportConfig(StageConfig):
    kind: Literal["export"]
    format: Literal["onnx", "onnx-genai"] = "onnx"  # onnx-genai: onnxruntime-genai's fused graph (faster on CPUs)
    quantize: Literal["none", "int8", "int4"] = "int8"
    block_size: int = Field(32, ge=16, description="quantization block size along the input dimension (a power of two)")
    quantize_embeddings: bool = (
        True  # the embedding table is a fifth of a small model; quantizing it meets the size targets
    )
    embedding_bits: Literal[4, 8] | None = Field(
        None,
        description="bits of the quantized embedding table. Default: a table tied to the output head reads the "
        "head's quantized weights (its bits, no bytes of its own); an untied one is stored at 4 bits",
    )
    keep_8bit: list[str] = Field(
        [],
        description="Linear layers an int4 export keeps at 8 bits: last name parts (lm_head, down_proj) or "
        "globs of whole names (model.layers.0.*)",
    )
    smooth: SmoothOptions | None = None  # SmoothQuant scale migration before quantizing (quantize/smooth.py)
    gptq: GPTQOptions | None = None  # GPTQ instead of round-to-nearest for the layers at `quantize` bits (gptq.py)
    parity: ParityOptions | None = ParityOptions()
    clients: bool = Field(
        True,
        description="also run the export in the clients installed here (transformers.js, Optimum, "
        "onnxruntime-genai; see quantize/clients.py) and record whether they decode the same tokens",
    )

    consumes = frozenset({HF})
    produces = ONNX
    metrics = frozenset({"max_logit_diff", "top1_agreement", "kl", "greedy_agreement"})

    def data_references(self) -> dict[str, str]:
        refs = {"parity.data": self.parity.data} if self.parity else {}
        refs |= {"smooth.data": self.smooth.data} if self.smooth else {}
        return refs | ({"gptq.data": self.gptq.data} if self.gptq else {})

    @model_validator(mode="after")
    def _options_need_onnx_quantization(self) -> ExportConfig:
        if self.keep_8bit and self.quantize != "int4":
            raise ValueError("keep_8bit applies to quantize: int4 only")
        for option in ("smooth", "gptq"):
            if getattr(self, option) and self.quantize == "none":
                raise ValueError(f"{option} applies to quantize: int8 or int4 only")
        return self


def refuse_quantized_input(config: ExportConfig, input_dir: Path) -> None:
    cfg = json.loads((input_dir / "config.json").read_text())
    if "quantization_config" in cfg:
        method = cfg["quantization_config"].get("quant_method", "?")
        raise SourceError(
            f"stage '{config.name}': the input model is {method}-quantized; export from the full-precision "
            "stage instead (put the export stage before any bitsandbytes stage)"
        )


def run(config: ExportConfig, context: StageContext) -> StageResult:
    if config.block_size & (config.block_size - 1):
        raise RecipeError(f"stage '{config.name}', field 'block_size': {config.block_size} is not a power of two")
    refuse_quantized_input(config, context.input_dir)
    model = load_model(
        context.input_dir, dtype="float32", device="cpu", trust_remote_code=context.recipe.trust_remote_code
    )
    arch.family_of(model.config)
    if config.format == "onnx-genai":
        check_genai_head_dim(config, arch.head_dim(model.config))
    check_keep_8bit(config, model)
    bits = 8 if config.quantize == "int8" else 4
    source = context.input_dir
    if config.smooth:
        status(f"migrating activation outliers into the weights (SmoothQuant, alpha {config.smooth.alpha})")
        # exact in fp32: parity below still measures the input's function
        smooth(model, _calibration(config.smooth, context, model), config.smooth.alpha)
        if config.format == "onnx-genai":  # the builder reads a checkpoint, so it gets the smoothed one
            source = context.work_dir / "smoothed"
            model.save_pretrained(source)
            copy_side_files(context.input_dir, source)
    codes = None
    if config.gptq:
        status(f"choosing {bits}-bit weights with GPTQ")
        blocks = _calibration(config.gptq, context, model)
        codes = gptq(
            model, blocks, skip=config.keep_8bit, bits=bits, block_size=config.block_size, damp=config.gptq.damp
        )
    out = context.output_dir / "onnx"
    fp32_dir = out if config.quantize == "none" else context.work_dir / "fp32"
    if config.format == "onnx-genai":
        status("building onnxruntime-genai's fused fp32 graph")
        build_genai(source, fp32_dir, context.work_dir, config.name)
    else:
        status("exporting to ONNX with a KV cache (torch.onnx dynamo exporter)")
        export_onnx(model, context.input_dir, fp32_dir)
    if config.quantize != "none":
        status(f"quantizing to {config.quantize} with onnxruntime")
        quantize_weights(
            fp32_dir,
            out,
            bits=bits,
            block_size=config.block_size,
            embeddings=config.quantize_embeddings,
            embedding_bits=config.embedding_bits,
            keep_8bit=config.keep_8bit,
            prequantized=codes,
            # the builder's graph does not record which Linear a MatMul came from: its weight says
            linears=linear_weights(model) if config.format == "onnx-genai" else None,
        )
        shutil.rmtree(fp32_dir, ignore_errors=True)
    shutil.rmtree(context.work_dir / "smoothed", ignore_errors=True)
    prepare_for_clients(out, model.config)
    return StageResult(artifact="onnx", metrics=_parity(config, context, model, out))


def linear_weights(model: torch.nn.Module) -> dict[str, np.ndarray]:
    return {n: m.weight.detach().numpy() for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}


def _calibration(options: CalibrationOptions, context: StageContext, model: torch.nn.Module) -> torch.Tensor:
    return context.data.blocks(
        options.data,
        load_tokenizer(context.input_dir),
        bos_per_window=arch.needs_bos_per_window(model.config),
        seq_len=options.seq_len,
        max_tokens=options.samples * options.seq_len,
    )


def check_keep_8bit(config: ExportConfig, model: torch.nn.Module) -> None:
    """Every keep_8bit pattern must name at least one Linear layer: a typo would silently keep nothing."""
    names = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)]
    for pattern in config.keep_8bit:
        if not any(matches(n, [pattern]) for n in names):
            kinds = sorted({n.rsplit(".", 1)[-1] for n in names})
            raise RecipeError(
                f"stage '{config.name}', field 'keep_8bit': {pattern!r} names no Linear layer of this model; "
                f"its layers are {', '.join(kinds)} (or globs of whole names such as {names[0]})"
            )


def check_genai_head_dim(config: ExportConfig, head_dim: int) -> None:
    if head_dim % 16:
        raise UnsupportedModelError(
            f"stage '{config.name}': onnxruntime-genai's CPU attention needs head_dim divisible "
            f"by 16, and this model's is {head_dim}; use format: onnx instead"
        )


def build_genai(input_dir: Path, out: Path, work_dir: Path, stage: str = "export", precision: str = "fp32") -> None:
    """onnxruntime-genai's model builder at fp32: its graph fuses attention (GroupQueryAttention with rotary),
    the residual adds into the norms, and reads the KV cache in place, which makes decoding fast on CPUs.
    slimlm quantizes its weights as it does the dynamo graph's, so both formats get GPTQ, keep_8bit and
    a shared tied table. Q, K and V stay separate MatMuls so that each can have its own width.
    (`precision: int4` is the builder's own quantization, which benchmarks/export.py compares with.)"""
    import subprocess
    import sys

    cmd = [
        sys.executable,
        "-m",
        "onnxruntime_genai.models.builder",
        "-i",
        str(input_dir),
        "-o",
        str(out),
        "-p",
        precision,
        "-e",
        "cpu",
        "-c",
        str(work_dir / "genai-cache"),
        *(["--extra_options", "fuse_qkv=false"] if precision == "fp32" else []),
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["no output"]
        raise StageFailed(f"stage '{stage}': onnxruntime-genai's builder failed: {tail[0][:300]}")
    copy_side_files(input_dir, out)  # config.json and generation_config.json for slimlm's edge runtime and evaluation


def _parity(config: ExportConfig, context: StageContext, model, out: Path) -> dict:
    if config.parity is None:
        return {}
    tokenizer = load_tokenizer(context.input_dir)
    blocks = context.data.blocks(
        config.parity.data,
        tokenizer,
        bos_per_window=arch.needs_bos_per_window(model.config),
        seq_len=config.parity.seq_len,
        max_tokens=config.parity.max_tokens,
    )
    edge = EdgeModel(out)
    metrics = parity(model, edge, blocks, config.parity.greedy_steps)
    status(
        f"parity: max |logit diff| {metrics['max_logit_diff']:.3g}, top-1 agreement {metrics['top1_agreement']:.4f}, "
        f"KL {metrics['kl']:.3g}, greedy {metrics['greedy_agreement']:.3f}"
    )
    if config.clients:
        status("running the export in its clients (transformers.js, Optimum, onnxruntime-genai)")
        prompt = blocks[0, : min(16, blocks.shape[1])].tolist()
        metrics["clients"] = check_clients(edge, prompt, config.parity.greedy_steps, blocks[0].tolist())
        status("clients: " + "; ".join(f"{c}: {describe_verdict(v)}" for c, v in metrics["clients"].items()))
    return metrics


@torch.inference_mode()
def parity(model, edge, blocks: torch.Tensor, greedy_steps: int) -> dict[str, float]:
    """The export (`edge`, an EdgeModel) against its PyTorch parent `model` on held-out `blocks`."""
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
        "greedy_tokens": {"pytorch": expected, "onnx": produced},
        "onnx_bytes": int(sum(p.stat().st_size for p in edge.path.iterdir() if p.name.startswith("model.onnx"))),
    }
