"""`kind: export` — ONNX with a KV cache (fp32, int8 or int4), checked against the PyTorch model it came from.

Two graphs, one quantization: `format: onnx` is the torch dynamo exporter's graph in Optimum's layout
(onnx_graph.py); `format: onnx-genai` is onnxruntime-genai's builder's fused graph (genai.py, faster to
decode on CPUs). Both get SmoothQuant, GPTQ, keep_8bit and the shared tied table from graph_quantize.py;
parity.py measures the result against this stage's input.
"""

from __future__ import annotations

import shutil

import numpy as np
import torch

from slimlm import arch
from slimlm.export import gguf_stage
from slimlm.export.checks import check_keep_8bit, refuse_quantized_input
from slimlm.export.client_layout import prepare_for_clients
from slimlm.export.config import ExportConfig
from slimlm.export.genai import build_genai, check_genai_head_dim
from slimlm.export.graph_quantize import quantize_weights
from slimlm.export.onnx_graph import copy_side_files, export_onnx
from slimlm.export.parity import measure_parity
from slimlm.progress import status
from slimlm.quantize.config import CalibrationOptions
from slimlm.quantize.gptq import gptq
from slimlm.quantize.smooth import smooth
from slimlm.sources.models import load_model, load_tokenizer
from slimlm.stage import StageContext, StageResult, field_error


def run(config: ExportConfig, context: StageContext) -> StageResult:
    if config.format == "gguf":
        return gguf_stage.run(config, context)
    if config.block_size & (config.block_size - 1):
        raise field_error(config, "block_size", f"{config.block_size} is not a power of two")
    refuse_quantized_input(config, context.input_dir)
    model = load_model(context.input_dir, dtype="float32", device="cpu", trust_remote_code=context.trust_remote_code)
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
    return StageResult(artifact="onnx", metrics=measure_parity(config, context, model, out))


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
