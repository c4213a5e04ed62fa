"""onnxruntime weight quantization of an exported model: int8 dynamic (per channel) or int4 MatMulNBits."""

from __future__ import annotations

import shutil
from pathlib import Path

from slimlm.quantize.onnx_export import ONNX_FILE


def quantize_int8(src: Path, dst: Path, *, embeddings: bool = True) -> Path:
    """Dynamic int8: weights quantized per output channel, activations quantized on the fly; optionally the embedding table."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    dst.mkdir(parents=True, exist_ok=True)
    ops = ["MatMul", "Gather"] if embeddings else ["MatMul"]
    quantize_dynamic(src / ONNX_FILE, dst / ONNX_FILE, weight_type=QuantType.QInt8, per_channel=True,
                     op_types_to_quantize=ops, use_external_data_format=True,
                     extra_options={"MatMulConstBOnly": True})
    return dst / ONNX_FILE


def quantize_int4(src: Path, dst: Path, *, block_size: int = 32, embeddings: bool = True,
                  accuracy_level: int = 4) -> Path:
    """Weight-only 4-bit blocks (MatMulNBits); optionally the embedding Gather too (GatherBlockQuantized).

    accuracy_level 4 lets the CPU kernel compute in int8, which is what makes int4 fast on CPUs.
    """
    import onnx
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    dst.mkdir(parents=True, exist_ok=True)
    ops = ("MatMul", "Gather") if embeddings else ("MatMul",)
    quantizer = MatMulNBitsQuantizer(onnx.load(str(src / ONNX_FILE)), bits=4, block_size=block_size, is_symmetric=True,
                                     accuracy_level=accuracy_level, op_types_to_quantize=ops)
    quantizer.process()
    quantizer.model.save_model_to_file(str(dst / ONNX_FILE), use_external_data_format=True)
    return dst / ONNX_FILE


def copy_side_files(src: Path, dst: Path) -> None:
    for path in src.iterdir():
        if path.is_file() and not path.name.startswith("model.onnx"):
            shutil.copy2(path, dst / path.name)
