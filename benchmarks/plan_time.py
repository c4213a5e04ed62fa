"""Wall time of `slimlm plan RECIPE` in a fresh process, optionally against another source tree, in interleaved rounds.

    python benchmarks/plan_time.py                                   # this checkout
    python benchmarks/plan_time.py --before /path/to/old/checkout/src  # and an older tree, round by round

Prints a table of medians and writes JSON (benchmarks/results/plan_time.json by default). The target (#18): a plan
of the quickstart validates without importing torch and takes under 1.5 s on the 2-core development machine.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def once(src: Path | None, recipe: str) -> float:
    env = {**os.environ, **({"PYTHONPATH": str(src)} if src else {})}
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "slimlm", "plan", recipe], cwd=ROOT, env=env, capture_output=True)
    seconds = time.perf_counter() - t0
    if proc.returncode != 0:
        raise SystemExit(f"slimlm plan failed ({src or 'this checkout'}): {proc.stderr.decode()[-500:]}")
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--recipe", default="recipes/quickstart.yaml")
    parser.add_argument("--before", type=Path, help="the src/ folder of another checkout to time in the same rounds")
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "plan_time.json")
    args = parser.parse_args()
    trees = {"this checkout": ROOT / "src"} | ({"before": args.before.resolve()} if args.before else {})
    times: dict[str, list[float]] = {name: [] for name in trees}
    once(trees["this checkout"], args.recipe)  # warm the file cache once
    for _ in range(args.rounds):
        for name, src in trees.items():
            times[name].append(once(src, args.recipe))
    rows = {
        name: {"median_s": statistics.median(t), "min_s": min(t), "max_s": max(t), "runs": t}
        for name, t in times.items()
    }
    print(f"slimlm plan {args.recipe}: {args.rounds} interleaved rounds")
    print(f"{'tree':<16}{'median s':>10}{'min s':>8}{'max s':>8}")
    for name, row in rows.items():
        print(f"{name:<16}{row['median_s']:>10.2f}{row['min_s']:>8.2f}{row['max_s']:>8.2f}")
    if args.before:
        ratio = rows["before"]["median_s"] / rows["this checkout"]["median_s"]
        print(f"before / this checkout: {ratio:.1f}x")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"recipe": args.recipe, "rounds": args.rounds, "trees": rows}, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
