"""onnxruntime-genai's model builder, run as a subprocess: its fused fp32 graph, which slimlm then quantizes."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from slimlm.errors import StageFailed, UnsupportedModelError, last_line
from slimlm.export.onnx_graph import copy_side_files


def check_genai_head_dim(config, head_dim: int) -> None:
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
        raise StageFailed(f"stage '{stage}': onnxruntime-genai's builder failed: {last_line(proc)}")
    copy_side_files(input_dir, out)  # config.json and generation_config.json for slimlm's edge runtime and evaluation
