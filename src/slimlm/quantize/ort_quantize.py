"""onnxruntime weight quantization of an exported model: 8- or 4-bit blocks (MatMulNBits).

Both widths use blockwise weight-only quantization. We measured the alternative for int8,
`quantize_dynamic` (per-channel weights plus per-tensor dynamic activations), on SmolLM2-135M:
top-1 agreement with fp32 was 0.59, against 0.94 for 8-bit MatMulNBits, because per-tensor
activation scales cannot hold the model's outlier channels. accuracy_level 4 lets the CPU
kernel compute in int8 with per-block activation scales, which makes it fast (about 2x fp32 ONNX).

An int4 export can keep chosen Linear layers at 8 bits (`keep_8bit`), as llama.cpp's Q4_K_M keeps
the output head, attn_v and ffn_down at 6 bits: on the quickstart's student, 8-bit lm_head and
down_proj raise int4 top-1 agreement from 0.64 to 0.76 (benchmarks/quantize_variants.py). The
embedding table can be 8-bit too, which onnxruntime runs but its quantizer does not write.
"""

from __future__ import annotations

from collections.abc import Sequence
from fnmatch import fnmatchcase
from pathlib import Path

from slimlm.quantize.onnx_export import ONNX_FILE, copy_side_files


def quantize_weights(
    src: Path,
    dst: Path,
    *,
    bits: int,
    block_size: int = 32,
    embeddings: bool = True,
    embedding_bits: int = 4,
    accuracy_level: int = 4,
    keep_8bit: Sequence[str] = (),
) -> Path:
    """Quantize every constant-weight MatMul to `bits`, those of the Linear layers `keep_8bit` names to 8;
    with `embeddings`, the embedding table to `embedding_bits` (it is a fifth of a small model)."""
    import onnx

    model = onnx.load(str(src / ONNX_FILE))
    if keep_8bit:
        layers = linear_layers(model)
        chosen = {node for node, name in layers.items() if matches(name, keep_8bit)}
        model = _nbits(model, ("MatMul",), 8, block_size, accuracy_level, exclude=set(layers) - chosen)
    model = _nbits(model, ("MatMul",), bits, block_size, accuracy_level)
    if embeddings and embedding_bits == 8:
        model = _embeddings_8bit(model, block_size)
    elif embeddings:
        model = _nbits(model, ("Gather",), 4, block_size, accuracy_level)
    dst.mkdir(parents=True, exist_ok=True)
    for stale in (dst / ONNX_FILE, dst / (ONNX_FILE + ".data")):
        stale.unlink(missing_ok=True)  # onnx.save_model appends to an existing external-data file
    onnx.save_model(model, str(dst / ONNX_FILE), save_as_external_data=True, location=ONNX_FILE + ".data")
    copy_side_files(src, dst)
    return dst / ONNX_FILE


def matches(name: str, patterns: Sequence[str]) -> bool:
    """`down_proj` names every layer's down_proj; `model.layers.0.*` globs whole module names."""
    return any(fnmatchcase(name, p) or fnmatchcase(name.rsplit(".", 1)[-1], p) for p in patterns)


def linear_layers(model) -> dict[str, str]:
    """MatMul node name -> the Linear module it came from (`model.layers.0.mlp.down_proj`, `lm_head`).

    The dynamo exporter records each node's module scopes, innermost last: the op itself (`linear_3`),
    then its module. The outermost module is our export wrapper's `model.` attribute, which is not part
    of the Hugging Face name.
    """
    out = {}
    for node in model.graph.node:
        scopes = _scopes(node)
        if node.op_type == "MatMul" and len(scopes) > 1 and scopes[-1].startswith("linear"):
            out[node.name] = scopes[-2].removeprefix("model.")
    return out


def _scopes(node) -> list[str]:
    """The module scopes the dynamo exporter recorded for a node, outermost first (empty if none)."""
    import ast

    text = next((p.value for p in node.metadata_props if p.key == "pkg.torch.onnx.name_scopes"), None)
    return ast.literal_eval(text) if text else []


def _embeddings_8bit(model, block_size: int):
    """The embedding table as 8-bit GatherBlockQuantized (uint8, zero point 128, a scale per block of a row).

    onnxruntime runs 8-bit GatherBlockQuantized, but its quantizer writes only 4-bit; on the quickstart's
    student the 4-bit table costs about 0.03 top-1 agreement in an int8 export.
    """
    import numpy as np
    from onnx import helper, numpy_helper

    graph = model.graph
    if not any(o.domain == "com.microsoft" for o in model.opset_import):
        model.opset_import.append(helper.make_opsetid("com.microsoft", 1))
    tables = {t.name: t for t in graph.initializer}
    for i, node in enumerate(graph.node):
        scopes = _scopes(node)
        module = scopes[-2] if len(scopes) > 1 else ""  # e.g. model.model.embed_tokens
        if node.op_type != "Gather" or node.input[0] not in tables or not module.endswith("embed_tokens"):
            continue
        table = numpy_helper.to_array(tables[node.input[0]])
        rows, width = table.shape
        if width % block_size:
            continue
        blocks = table.reshape(rows, width // block_size, block_size)
        scales = (np.abs(blocks).max(-1) / 127).astype(np.float32)
        scales[scales == 0] = 1
        quantized = (np.clip(np.round(blocks / scales[..., None]), -127, 127) + 128).astype(np.uint8)
        name = node.input[0]
        graph.initializer.remove(tables[name])
        graph.initializer.extend(
            [
                numpy_helper.from_array(quantized.reshape(rows, width), name + "_Q8"),
                numpy_helper.from_array(scales, name + "_scales"),
            ]
        )
        graph.node[i].CopyFrom(
            helper.make_node(
                "GatherBlockQuantized",
                [name + "_Q8", node.input[1], name + "_scales"],
                list(node.output),
                name=node.name + "_Q8",
                domain="com.microsoft",
                bits=8,
                block_size=block_size,
                gather_axis=0,
                quantize_axis=1,
            )
        )
    return model


def _nbits(
    model, ops: tuple[str, ...], bits: int, block_size: int, accuracy_level: int, exclude: set[str] = frozenset()
):
    import logging

    root = logging.getLogger()
    level, handlers = root.level, list(root.handlers)
    # Importing the quantizer calls logging.basicConfig(level=INFO), which would make every library log each step
    # from then on; it then logs every node. Both are undone here.
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    quantizer = MatMulNBitsQuantizer(
        model,
        bits=bits,
        block_size=block_size,
        is_symmetric=True,
        accuracy_level=accuracy_level,
        op_types_to_quantize=ops,
        nodes_to_exclude=sorted(exclude),
    )
    root.setLevel(logging.WARNING)
    try:
        quantizer.process()
    finally:
        root.setLevel(level)
        for handler in [h for h in root.handlers if h not in handlers]:
            root.removeHandler(handler)
    return quantizer.model.model
