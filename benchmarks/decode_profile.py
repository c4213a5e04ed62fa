"""Where an exported model's decode time goes, against what this machine's memory can deliver.

    python benchmarks/decode_profile.py EXPORT_DIR [EXPORT_DIR ...] [--steps 64]

Decoding at batch 1 reads every weight once per token, so a memory-bound decoder runs at
(read bandwidth) / (weight bytes) tokens/s. This prints, for each export: its decode time per
token in slimlm's edge runtime (the cache at 64 to 128 tokens), the weight bytes it reads per
second at that speed, that as a share of the read bandwidth measured here (a 2-thread PyTorch
matrix-vector product over 256 MB, the access pattern of decoding), and the share of kernel time
per operator type from onnxruntime's profiler (which adds a few microseconds to every node, so
small operators look larger than they are).
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch
from common import ROOT, write_results

from slimlm.edge import EdgeModel


def read_bandwidth(megabytes: int = 256, repeats: int = 9) -> float:
    """Bytes/s that a matrix-vector product streams from memory (fp32, all torch threads)."""
    matrix = torch.ones(megabytes * 2**20 // 4 // 1024, 1024)
    vector = torch.ones(1024)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        matrix @ vector
        times.append(time.perf_counter() - t0)
    return matrix.numel() * 4 / statistics.median(times)


def decode_seconds(edge: EdgeModel, steps: int) -> float:
    """Median seconds per decode step after a 64-token prompt."""
    rng = np.random.default_rng(0)
    cache = edge.new_cache(1, 64 + steps + 1)
    logits = edge.step(rng.integers(0, edge.vocab_size, (1, 64)), cache)
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        logits = edge.step(logits[:, -1:].argmax(-1), cache)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def operator_shares(path: Path, steps: int) -> dict[str, float]:
    """Share of kernel time per operator type over `steps` decode steps, from onnxruntime's profiler."""
    with tempfile.TemporaryDirectory() as tmp:
        options = ort.SessionOptions()
        options.enable_profiling = True
        options.profile_file_prefix = str(Path(tmp) / "profile")
        edge = EdgeModel(path, options=options)
        decode_seconds(edge, steps)
        events = json.loads(Path(edge.session.end_profiling()).read_text())
    totals: dict[str, float] = {}
    for e in events:
        if e.get("cat") == "Node" and e["name"].endswith("_kernel_time"):
            totals[e["args"]["op_name"]] = totals.get(e["args"]["op_name"], 0.0) + e["dur"]
    everything = sum(totals.values())
    return {op: t / everything for op, t in sorted(totals.items(), key=lambda kv: -kv[1])}


def weight_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.iterdir() if p.name.startswith("model.onnx"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("exports", nargs="+", type=Path)
    parser.add_argument("--steps", type=int, default=64)
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "decode_profile.json")
    args = parser.parse_args()
    bandwidth = read_bandwidth()
    print(f"read bandwidth (matrix-vector, {torch.get_num_threads()} threads): {bandwidth / 1e9:.1f} GB/s\n")
    print("| export | weights MB | ms/token | tokens/s | weights read GB/s | share of bandwidth | top operators |")
    print("|---|---|---|---|---|---|---|")
    rows = []
    for path in args.exports:
        seconds = decode_seconds(EdgeModel(path), args.steps)
        size = weight_bytes(path)
        shares = operator_shares(path, args.steps)
        rows.append(
            {
                "export": str(path),
                "weight_bytes": size,
                "seconds_per_token": seconds,
                "weights_read_per_second": size / seconds,
                "share_of_bandwidth": size / seconds / bandwidth,
                "operator_shares": shares,
            }
        )
        top = ", ".join(f"{op} {share:.0%}" for op, share in list(shares.items())[:3])
        print(
            f"| {path} | {size / 1e6:.1f} | {seconds * 1e3:.2f} | {1 / seconds:.1f} | {size / seconds / 1e9:.1f} | "
            f"{size / seconds / bandwidth:.0%} | {top} |"
        )
    write_results(args.out, {"read_bandwidth": bandwidth, "threads": torch.get_num_threads(), "rows": rows})


if __name__ == "__main__":
    main()
