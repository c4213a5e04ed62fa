"""Teacher accuracies recorded by slimlm vs a direct `lm_eval.simple_evaluate` call on the same model and tasks.

slimlm side: `slimlm run recipes/smollm2-local-benchmarks.yaml` (teacher evaluation only), read from the
teacher's manifest. Direct side: the model loaded with plain transformers, `HFLM(pretrained=model)`, and the
task YAMLs shipped in ../shared/data/lmeval/tasks (their {DATA_DIR} filled in). The two must agree exactly.

    .venv/bin/python benchmarks/lm_eval_match.py [--limit 200]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from common import RESULTS, ROOT, SHARED, write_results

RECIPE = ROOT / "recipes" / "smollm2-local-benchmarks.yaml"
TASKS = {
    "piqa_local": "piqa_local.yaml",
    "hellaswag_local": "hellaswag_local.yaml",
    "arc_easy_local": "arc_easy_local.yaml",
}


def through_slimlm(limit: int, run_dir: Path) -> tuple[dict, Path]:
    cmd = [str(ROOT / ".venv" / "bin" / "slimlm"), "run", str(RECIPE), "--run-dir", str(run_dir)]
    subprocess.run([*cmd, "--set", f"evaluation.lm_eval.limit={limit}"], check=True, cwd=ROOT)
    teacher = json.loads((run_dir / "00-teacher" / "manifest.json").read_text())
    return teacher["metrics"]["tasks"], Path(teacher["artifact_path"])


def direct(model_dir: Path, limit: int, batch_size: int) -> dict:
    os.environ["HF_DATASETS_OFFLINE"] = os.environ["HF_HUB_OFFLINE"] = "1"
    import lm_eval
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype="float32").eval()
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    with tempfile.TemporaryDirectory() as tasks_dir:
        for file in TASKS.values():
            text = (SHARED / "data" / "lmeval" / "tasks" / file).read_text()
            (Path(tasks_dir) / file).write_text(text.replace("{DATA_DIR}", str(SHARED / "data" / "lmeval")))
        out = lm_eval.simple_evaluate(
            model=HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size),
            tasks=list(TASKS),
            limit=limit,
            task_manager=TaskManager(include_path=tasks_dir, include_defaults=False),
        )
    return {
        task: {k.split(",")[0]: v for k, v in r.items() if k in ("acc,none", "acc_norm,none")}
        for task, r in out["results"].items()
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--limit", type=int, default=200)
    args = parser.parse_args()
    run_dir = RESULTS / "runs" / f"lm-eval-match-{args.limit}"
    ours, model_dir = through_slimlm(args.limit, run_dir)
    theirs = direct(model_dir, args.limit, batch_size=8)
    rows, exact = [], True
    print(f"\nSmolLM2-135M, first {args.limit} examples per task\n")
    print(f"{'task':18} {'metric':9} {'slimlm':>8} {'lm_eval':>8}  same")
    for task in TASKS:
        for metric in ("acc", "acc_norm"):
            a, b = ours[task][metric], theirs[task][metric]
            exact &= a == b
            rows.append({"task": task, "metric": metric, "slimlm": a, "lm_eval": b, "same": a == b})
            print(f"{task:18} {metric:9} {a:8.4f} {b:8.4f}  {'yes' if a == b else 'NO'}")
    write_results(RESULTS / "lm_eval_match.json", {"limit": args.limit, "exact": exact, "rows": rows})
    sys.exit(0 if exact else 1)


if __name__ == "__main__":
    main()
