"""What every benchmark script shares: where results go, and writing them."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"
RESULTS = ROOT / "benchmarks" / "results"


def teacher_correction(**options) -> dict:
    """The recipe stage that fine-tunes the teacher (CE, all weights) on the train split before it is pruned and
    becomes the teacher of the stages after it (Minitron's teacher correction); `options` are distill settings."""
    return {
        "name": "correct",
        "kind": "distill",
        "data": "train",
        "method": "full",
        "loss": {"logits": "none", "ce_weight": 1.0},
        "checkpoint_every": 0,
        "becomes_teacher": True,
        **options,
    }


def write_results(out: Path, payload: dict) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(payload, indent=2))
    print(f"\nwrote {out}")


def peak_rss_of_prune_stage(model_dir: Path, seq_len: int, samples: int, target: dict, **options) -> float:
    """Peak RSS (bytes) of a fresh process that runs the prune stage alone (importance, search, pruning, saving).

    `options` are more prune-stage settings (e.g. offload="disk"); `target={}` stops after loading the
    calibration data, which measures the floor (interpreter, libraries, tokenizer, data) without a model.
    """
    stage = dict(name="prune", kind="prune", target=target or {"params": 1.0}, **options)
    code = f"""
import json, pathlib, tempfile
from slimlm.compress.stage import run
from slimlm.recipe import Recipe
from slimlm.sources.models import load_tokenizer
from slimlm.sources.text import DataStore
from slimlm.stage import StageContext
recipe = Recipe.model_validate(dict(name="b", model="{model_dir}", data=dict(calibration=dict(
    source="builtin:python-docs", split="train", seq_len={seq_len}, samples={samples})), stages=[json.loads('{json.dumps(stage)}')]))
out = pathlib.Path(tempfile.mkdtemp())
data = DataStore(dict(recipe.data))
ctx = StageContext(recipe=recipe, input_dir=pathlib.Path("{model_dir}"), teacher_dir=pathlib.Path("{model_dir}"),
                   output_dir=out, work_dir=out, data=data, device="cpu", seed=0)
if {bool(target)}:
    run(recipe.stages[0], ctx)
else:
    data.blocks("calibration", load_tokenizer(ctx.input_dir), bos_per_window=False)
# VmHWM, not ru_maxrss: Linux carries ru_maxrss over from the forking parent across exec.
print(next(int(l.split()[1]) * 1024 for l in open("/proc/self/status") if l.startswith("VmHWM")))
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    if out.returncode:
        raise RuntimeError(out.stderr[-2000:])
    return float(out.stdout.strip().splitlines()[-1])
