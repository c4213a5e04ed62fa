"""Where int8/int4 top-1 agreement is lost: embedding precision, MatMulNBits accuracy level, SmoothQuant and
which layers stay at 8 bits in an int4 export, on one model.

Exports the model once to fp32 ONNX (and once per SmoothQuant alpha), quantizes it several ways with
onnxruntime or GPTQ, and reports top-1 agreement and KL with the PyTorch model on held-out python-docs
text (4,096 tokens), size, and decode tokens/s
(`EdgeModel`, batch 1, median of 3, all variants interleaved in one run).

    .venv/bin/python benchmarks/quantize_variants.py [--model runs/quickstart/02-distill/model]
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time
from pathlib import Path

from common import RESULTS, write_results
from transformers import AutoModelForCausalLM, AutoTokenizer

from slimlm.edge import EdgeModel
from slimlm.export.graph_quantize import quantize_weights
from slimlm.export.onnx_graph import export_onnx
from slimlm.export.parity import parity
from slimlm.quantize.gptq import gptq
from slimlm.quantize.smooth import smooth
from slimlm.sources.specs import DataSpec
from slimlm.sources.text import DataStore

VARIANTS = {
    "int8, 4-bit embeddings, accuracy 4": dict(bits=8, embedding_bits=4),
    "int8, fp32 embeddings, accuracy 4": dict(bits=8, embeddings=False),
    "int8, 8-bit embeddings read from the tied head": dict(bits=8),
    "int8, SmoothQuant 0.75, 4-bit embeddings": dict(bits=8, embedding_bits=4, smooth=0.75),
    "int8, SmoothQuant 0.75, tied 8-bit embeddings": dict(bits=8, smooth=0.75),
    "int8, SmoothQuant 0.75, tied 8-bit embeddings, blocks of 16 (the quickstart's int8)": dict(
        bits=8, block_size=16, smooth=0.75
    ),
    "int8, 4-bit embeddings, accuracy 1 (fp32 compute)": dict(bits=8, embedding_bits=4, accuracy_level=1),
    "int8, fp32 embeddings, accuracy 1 (fp32 compute)": dict(bits=8, embeddings=False, accuracy_level=1),
    "int4, 4-bit embeddings, accuracy 4": dict(bits=4),
    "int4, fp32 embeddings, accuracy 1 (fp32 compute)": dict(bits=4, embeddings=False, accuracy_level=1),
    "int4, 8-bit lm_head (and tied embeddings)": dict(bits=4, keep_8bit=["lm_head"]),
    "int4, SmoothQuant 0.75, 8-bit lm_head": dict(bits=4, keep_8bit=["lm_head"], smooth=0.75),
    "int4, 8-bit lm_head and down_proj": dict(bits=4, keep_8bit=["lm_head", "down_proj"]),
    "int4, 8-bit lm_head, v_proj and down_proj (as llama.cpp's Q4_K_M)": dict(
        bits=4, keep_8bit=["lm_head", "v_proj", "down_proj"]
    ),
    "int4, SmoothQuant 0.75, 8-bit lm_head, v_proj, o_proj and down_proj": dict(
        bits=4, keep_8bit=["lm_head", "v_proj", "o_proj", "down_proj"], smooth=0.75
    ),
    "int4, GPTQ, 8-bit lm_head, v_proj, o_proj and down_proj": dict(
        bits=4, keep_8bit=["lm_head", "v_proj", "o_proj", "down_proj"], gptq=True
    ),
    "int4, GPTQ + SmoothQuant 0.75, 8-bit lm_head, k/v/o_proj and down_proj": dict(
        bits=4, keep_8bit=["lm_head", "k_proj", "v_proj", "o_proj", "down_proj"], gptq=True, smooth=0.75
    ),
    "int4, GPTQ, 8-bit lm_head, k/v/o_proj and down_proj (the quickstart's int4)": dict(
        bits=4, keep_8bit=["lm_head", "k_proj", "v_proj", "o_proj", "down_proj"], gptq=True
    ),
}
GPTQ_SAMPLES = 32  # calibration blocks of 256 tokens, as the quickstart's gptq: {samples: 32}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, default=Path("runs/quickstart/02-distill/model"))
    parser.add_argument("--new-tokens", type=int, default=48)
    parser.add_argument("--eval-tokens", type=int, default=4096, help="held-out tokens for agreement and KL")
    args = parser.parse_args()
    model = AutoModelForCausalLM.from_pretrained(args.model).eval()
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    data = DataStore({"eval": DataSpec(source="builtin:python-docs", split="test", seq_len=256)})
    blocks = data.blocks("eval", tokenizer, bos_per_window=False, max_tokens=args.eval_tokens)
    work = RESULTS / "quantize-variants"
    export_onnx(model, args.model, work / "fp32")
    dirs = {"fp32 ONNX": work / "fp32"}
    calibration = DataStore({"c": DataSpec(source="builtin:python-docs", split="train", seq_len=256)})
    calibration = calibration.blocks("c", tokenizer, bos_per_window=False, max_tokens=GPTQ_SAMPLES * 256)
    models = {None: model}  # by SmoothQuant alpha: smoothed weights need their own export (same fp32 function)
    for i, (name, options) in enumerate(VARIANTS.items()):
        options = dict(options)
        alpha, use_gptq = options.pop("smooth", None), options.pop("gptq", False)
        source = work / "fp32" if alpha is None else work / f"fp32-smooth-{alpha}"
        if alpha not in models:
            models[alpha] = copy.deepcopy(model)
            smooth(models[alpha], calibration[:8], alpha)
            export_onnx(models[alpha], args.model, source)
        if use_gptq:
            keep = options.get("keep_8bit", [])
            options["prequantized"] = gptq(models[alpha], calibration, skip=keep, bits=options["bits"])
        quantize_weights(source, work / f"v{i}", **options)
        dirs[name] = work / f"v{i}"
    edges = {name: EdgeModel(d) for name, d in dirs.items()}
    prompt = edges["fp32 ONNX"].tokenizer.encode("def fibonacci(n):\n    ").ids
    speeds: dict[str, list[float]] = {name: [] for name in dirs}
    for _ in range(3):
        for name, edge in edges.items():
            t0 = time.perf_counter()
            produced = len(list(edge.generate_ids(prompt, args.new_tokens)))
            speeds[name].append(produced / (time.perf_counter() - t0))
    rows = []
    print("\n| variant | top-1 agreement | KL | ONNX MB | decode tok/s |\n|---|---|---|---|---|")
    for name, edge in edges.items():
        m = parity(model, edge, blocks, 8)
        row = {"variant": name, "top1": m["top1_agreement"], "kl": m["kl"], "bytes": m["onnx_bytes"]}
        row["tokens_per_second"] = statistics.median(speeds[name])
        rows.append(row)
        print(
            f"| {name} | {row['top1']:.4f} | {row['kl']:.4f} | {row['bytes'] / 1e6:.0f} | {row['tokens_per_second']:.1f} |"
        )
    write_results(RESULTS / "quantize_variants.json", {"model": str(args.model), "rows": rows})


if __name__ == "__main__":
    main()
