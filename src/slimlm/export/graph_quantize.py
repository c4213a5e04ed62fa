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

A table tied to the output head (SmolLM2, Qwen, Gemma) is not stored twice: the lookup gathers rows
of the head's quantized blocks. On the quickstart's student that takes an int8 export from 0.37x to
0.29x of the fp32 size, and gives an int4 export with an 8-bit head an 8-bit table for free.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

from slimlm.export.onnx_graph import ONNX_FILE, copy_side_files
from slimlm.quantize.layers import matches


def quantize_weights(
    src: Path,
    dst: Path,
    *,
    bits: int,
    block_size: int = 32,
    embeddings: bool = True,
    embedding_bits: int | None = None,
    accuracy_level: int = 4,
    keep_8bit: Sequence[str] = (),
    prequantized: Mapping[str, tuple] | None = None,
    linears: Mapping[str, np.ndarray] | None = None,
    merge: bool = True,
) -> Path:
    """Quantize every constant-weight MatMul to `bits`, those of the Linear layers `keep_8bit` names to 8;
    with `embeddings`, the embedding table to `embedding_bits` (it is a fifth of a small model).

    A table tied to the output head is not stored twice: at the head's width (the default for a tied
    model) the embedding gathers rows of the head's quantized weight. Otherwise the default is 4 bits.
    `prequantized` maps Linear names to `bits`-wide codes and scales chosen elsewhere (GPTQ), written as they are.
    `linears` (Linear name -> weight [out, in]) names the layers of a graph without the dynamo exporter's
    scopes, such as onnxruntime-genai's builder writes; `keep_8bit` and `prequantized` need those names.
    With `merge`, layers that read the same input at the same bit width run as one kernel (`_fuse_siblings`).
    """
    import onnx

    model = onnx.load(str(src / ONNX_FILE))
    _fold_transposed_tables(model)
    matmuls = _linear_matmuls(model, linears)
    layers = {node: name for node, (name, _) in matmuls.items()}
    tied = _tied_embedding(model, layers, block_size)
    head_bits = 8 if bits == 8 or matches("lm_head", keep_8bit) else bits
    if embedding_bits is None:
        embedding_bits = head_bits if tied else 4
    if prequantized:
        _write_codes(model, matmuls, prequantized, bits, accuracy_level)
    if keep_8bit:
        chosen = {node for node, name in layers.items() if matches(name, keep_8bit)}
        model = _nbits(model, ("MatMul",), 8, block_size, accuracy_level, exclude=set(layers) - chosen)
    model = _nbits(model, ("MatMul",), bits, block_size, accuracy_level)
    if embeddings and tied and embedding_bits == head_bits:
        _share_head_weights(model, *tied)
    elif embeddings and embedding_bits == 8:
        model = _embeddings_8bit(model, block_size)
    elif embeddings:
        model = _nbits(model, ("Gather",), 4, block_size, accuracy_level)
    if merge:
        _fuse_siblings(model)
    dst.mkdir(parents=True, exist_ok=True)
    for stale in (dst / ONNX_FILE, dst / (ONNX_FILE + ".data")):
        stale.unlink(missing_ok=True)  # onnx.save_model appends to an existing external-data file
    onnx.save_model(model, str(dst / ONNX_FILE), save_as_external_data=True, location=ONNX_FILE + ".data")
    copy_side_files(src, dst)
    return dst / ONNX_FILE


def linear_layers(model, linears: Mapping[str, np.ndarray] | None = None) -> dict[str, str]:
    """MatMul node name -> the Linear module it came from (`model.layers.0.mlp.down_proj`, `lm_head`)."""
    return {node: name for node, (name, _) in _linear_matmuls(model, linears).items()}


def _linear_matmuls(model, linears: Mapping[str, np.ndarray] | None) -> dict[str, tuple[str, slice | None]]:
    """MatMul node name -> (Linear name, the rows of its weight the node holds, None for all of them).

    The dynamo exporter records each node's module scopes, innermost last: the op itself (`linear_3`),
    then its module. The outermost module is our export wrapper's `model.` attribute, which is not part
    of the Hugging Face name. Other graphs (onnxruntime-genai's builder) name nodes their own way; with
    `linears`, a MatMul is the Linear whose weight its constant holds, transposed, bit for bit, or a run
    of that weight's rows (the builder splits phi3's fused qkv_proj and gate_up_proj).
    """
    if linears is None:
        out = {}
        for node in model.graph.node:
            scopes = _scopes(node)
            if node.op_type == "MatMul" and len(scopes) > 1 and scopes[-1].startswith("linear"):
                out[node.name] = (scopes[-2].removeprefix("model."), None)
        return out
    import hashlib

    from onnx import numpy_helper

    def digest(a: np.ndarray) -> str:
        return hashlib.sha1(np.ascontiguousarray(a, np.float32).tobytes() + str(a.shape).encode()).hexdigest()

    constants = {t.name: t for t in model.graph.initializer}
    weights = {
        node.name: numpy_helper.to_array(constants[node.input[1]])
        for node in model.graph.node
        if node.op_type == "MatMul" and node.input[1] in constants and len(constants[node.input[1]].dims) == 2
    }
    whole = {digest(np.asarray(w).T): name for name, w in linears.items()}
    digests = {node: digest(b) for node, b in weights.items()}
    out = {node: (whole[d], None) for node, d in digests.items() if d in whole}
    # The rest may hold runs of rows of the Linears not yet found: index those by row, then check the whole run.
    split = {n: np.asarray(w) for n, w in linears.items() if n not in {name for name, _ in out.values()}}
    first_rows = {digest(w[r]): (name, r) for name, w in split.items() for r in range(w.shape[0])}
    for node in weights.keys() - out.keys():
        b = weights[node]
        name, start = first_rows.get(digest(b[:, 0]), (None, 0))
        if name is not None and np.array_equal(split[name][start : start + b.shape[1]], b.T):
            out[node] = (name, slice(start, start + b.shape[1]))
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
    from onnx import numpy_helper

    graph = model.graph
    tables = {t.name: t for t in graph.initializer}
    for node in _embedding_gathers(model):
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
        _gather_quantized(model, node, [name + "_Q8", node.input[1], name + "_scales"], bits=8, block_size=block_size)
    return model


def _write_codes(
    model, matmuls: Mapping[str, tuple[str, slice | None]], codes: Mapping[str, tuple], bits: int, accuracy_level: int
) -> None:
    """Replace the MatMuls of the Linear layers in `codes` by MatMulNBits over the given codes and scales.

    Codes are unsigned (offset by 2^(bits-1), MatMulNBits' implicit zero point), [out, in]; scales [out, blocks].
    """
    from onnx import helper, numpy_helper

    graph = model.graph
    missing = set(codes) - {name for name, _ in matmuls.values()}
    if missing:  # quantizing the rest would silently drop what GPTQ chose for these
        raise ValueError(f"no MatMul in the graph holds the weight of {', '.join(sorted(missing))}")
    for node in list(graph.node):
        name, rows = matmuls.get(node.name, (None, None))
        if name not in codes:
            continue
        q, scales = (np.asarray(t)[rows or slice(None)] for t in codes[name])
        n, k = q.shape
        block_size = k // scales.shape[1]
        blocks = q.reshape(n, k // block_size, block_size).astype(np.uint8)
        if bits == 4:  # two codes a byte, the first in the low nibble
            blocks = blocks[..., 0::2] | (blocks[..., 1::2] << 4)
        weight = node.input[1]
        graph.initializer.extend(
            [
                numpy_helper.from_array(blocks, f"{weight}_Q{bits}"),
                numpy_helper.from_array(scales.astype(np.float32), f"{weight}_scales"),
            ]
        )
        node.CopyFrom(
            helper.make_node(
                "MatMulNBits",
                [node.input[0], f"{weight}_Q{bits}", f"{weight}_scales"],
                list(node.output),
                name=f"{node.name}_Q{bits}",
                domain="com.microsoft",
                K=k,
                N=n,
                bits=bits,
                block_size=block_size,
                accuracy_level=accuracy_level,
            )
        )
        if not any(weight in other.input for other in graph.node):
            graph.initializer.remove(next(t for t in graph.initializer if t.name == weight))
    _use_contrib_ops(model)


def _embedding_gathers(model) -> list:
    """The Gather nodes that look up a constant embedding table (module `...embed_tokens`)."""
    constants = {t.name for t in model.graph.initializer}
    out = []
    for node in model.graph.node:
        scopes = _scopes(node)
        module = scopes[-2] if len(scopes) > 1 else node.name  # model.model.embed_tokens; genai: /model/embed_tokens/
        if node.op_type == "Gather" and node.input[0] in constants and "embed_tokens" in module:
            out.append(node)
    return out


def _fold_transposed_tables(model) -> None:
    """Make a lookup of a transposed constant (onnxruntime-genai's tied table: Transpose of the head's
    weight) a lookup of a constant, so the table is recognised, compared and quantized as any other."""
    from onnx import helper, numpy_helper

    graph = model.graph
    constants = {t.name: t for t in graph.initializer}
    producers = {out: node for node in graph.node for out in node.output}
    for gather in [n for n in graph.node if n.op_type == "Gather"]:
        transpose = producers.get(gather.input[0])
        if transpose is None or transpose.op_type != "Transpose" or transpose.input[0] not in constants:
            continue
        perm = next((helper.get_attribute_value(a) for a in transpose.attribute if a.name == "perm"), None)
        table = np.transpose(numpy_helper.to_array(constants[transpose.input[0]]), perm)
        name = gather.name.strip("/").replace("/", ".") + ".table"
        graph.initializer.append(numpy_helper.from_array(np.ascontiguousarray(table), name))
        gather.input[0] = name
        if not any(transpose.output[0] in n.input for n in graph.node):
            graph.node.remove(transpose)


def _tied_embedding(model, layers: dict[str, str], block_size: int) -> tuple[str, str] | None:
    """(embedding Gather node, lm_head MatMul output) when the table equals the head's weight, transposed,
    and its rows are whole blocks (MatMulNBits pads the last block, which a lookup would return).

    The exporter writes a tied weight twice, as the table and as the head's transposed constant.
    """
    from onnx import numpy_helper

    gathers = _embedding_gathers(model)
    heads = [n for n in model.graph.node if layers.get(n.name) == "lm_head"]
    if len(gathers) != 1 or len(heads) != 1:
        return None
    tables = {t.name: t for t in model.graph.initializer}
    (gather,), (head,) = gathers, heads
    if head.input[1] not in tables:
        return None
    table, weight = (numpy_helper.to_array(tables[n]) for n in (gather.input[0], head.input[1]))
    if table.shape[1] % block_size or table.shape != weight.T.shape or not np.array_equal(table, weight.T):
        return None
    return gather.name, head.output[0]


def _share_head_weights(model, gather_name: str, logits: str) -> None:
    """Point the embedding lookup at the quantized head's blocks, as onnxruntime-genai's shared_embeddings does.

    MatMulNBits keeps B as [N, blocks, bytes per block] with a scale per block; viewed as [N, K * bits / 8]
    those are the rows GatherBlockQuantized gathers, with the same implicit zero point (8 or 128).
    """
    from onnx import helper, numpy_helper

    graph = model.graph
    head = next(n for n in graph.node if n.op_type == "MatMulNBits" and logits in n.output)
    attrs = {a.name: helper.get_attribute_value(a) for a in head.attribute}
    gather = next(n for n in graph.node if n.name == gather_name)
    table = next(t for t in graph.initializer if t.name == gather.input[0])
    graph.initializer.remove(table)
    rows = head.input[1] + "_rows"
    shape = numpy_helper.from_array(np.array([attrs["N"], attrs["K"] * attrs["bits"] // 8], np.int64), rows + "_shape")
    graph.initializer.append(shape)
    graph.node.insert(0, helper.make_node("Reshape", [head.input[1], shape.name], [rows], name=rows))
    inputs = [rows, gather.input[1], *head.input[2:]]  # scales, and zero points if the head has them
    _gather_quantized(model, gather, inputs, bits=attrs["bits"], block_size=attrs["block_size"])


def _fuse_siblings(model) -> None:
    """Merge MatMulNBits nodes that read the same input with the same settings (gate and up; k and v; q, k and v
    when they share a bit width) into one, whose output a Split divides again.

    The same arithmetic, row for row, in fewer and larger kernel calls. At batch 1 each call has a fixed cost:
    with identical logits, SmolLM2's int4 export decodes 1.12x as fast, the quickstart's student 1.04-1.05x.
    """
    from onnx import helper, numpy_helper

    graph = model.graph
    if next(o.version for o in model.opset_import if o.domain in ("", "ai.onnx")) < 13:
        return  # Split takes its sizes as an input from opset 13 on
    initializers = {t.name: t for t in graph.initializer}
    uses = Counter(name for node in graph.node for name in node.input)
    groups: dict[tuple, list] = {}  # (input, input count, settings but N) -> [(node, its attributes)]
    for node in graph.node:
        # weights used elsewhere (a tied head's, which the embedding lookup reads) stay where they are
        if node.op_type == "MatMulNBits" and all(uses[i] == 1 and i in initializers for i in node.input[1:]):
            attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
            settings = tuple(sorted((k, v) for k, v in attrs.items() if k != "N"))
            groups.setdefault((node.input[0], len(node.input), settings), []).append((node, attrs))
    for group in (g for g in groups.values() if len(g) > 1):
        siblings = [node for node, _ in group]
        first, name = siblings[0], "+".join(n.name for n in siblings)
        widths = [attrs["N"] for _, attrs in group]
        inputs = [first.input[0]]
        for i in range(1, len(first.input)):  # B [N, blocks, bytes], scales and zero points: all N-major
            merged = np.concatenate([numpy_helper.to_array(initializers[n.input[i]]) for n in siblings])
            for n in siblings:
                graph.initializer.remove(initializers[n.input[i]])
            inputs.append(f"{name}_{i}")
            graph.initializer.append(numpy_helper.from_array(merged, inputs[-1]))
        sizes = numpy_helper.from_array(np.array(widths, np.int64), f"{name}_sizes")
        graph.initializer.append(sizes)
        attrs = group[0][1] | {"N": sum(widths)}
        merged_out = f"{name}_out"
        at = list(graph.node).index(first)
        for n in siblings:
            graph.node.remove(n)
        graph.node.insert(
            at,
            helper.make_node(
                "Split", [merged_out, sizes.name], [n.output[0] for n in siblings], name=f"{name}_split", axis=-1
            ),
        )
        graph.node.insert(
            at,
            helper.make_node("MatMulNBits", inputs, [merged_out], name=name, domain="com.microsoft", **attrs),
        )


def _gather_quantized(model, gather, inputs: list[str], *, bits: int, block_size: int) -> None:
    """Replace a Gather of a table by GatherBlockQuantized over row blocks of the quantized table."""
    from onnx import helper

    _use_contrib_ops(model)
    gather.CopyFrom(
        helper.make_node(
            "GatherBlockQuantized",
            inputs,
            list(gather.output),
            name=f"{gather.name}_Q{bits}",
            domain="com.microsoft",
            bits=bits,
            block_size=block_size,
            gather_axis=0,
            quantize_axis=1,
        )
    )


def _use_contrib_ops(model) -> None:
    """Declare onnxruntime's contrib-op domain (MatMulNBits, GatherBlockQuantized) if the model lacks it."""
    from onnx import helper

    if not any(o.domain == "com.microsoft" for o in model.opset_import):
        model.opset_import.append(helper.make_opsetid("com.microsoft", 1))


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
