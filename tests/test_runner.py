"""The runner end to end on a tiny model: manifests, skipping, re-running what changed, gates, status."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from slimlm.errors import GateFailed
from slimlm.recipe import load_recipe
from slimlm.runner import run_recipe

RECIPE = """\
name: tiny
model: {model}
device: cpu
data:
  calibration: {{source: "builtin:python-docs", split: train, seq_len: 32, samples: 4}}
  eval: {{source: "builtin:python-docs", split: test, seq_len: 32}}
evaluation:
  perplexity: {{data: eval, max_tokens: 256}}
stages:
  - name: prune
    kind: prune
    target: {{hidden: 48, ffn: 64, layers: 3}}
    gates:
      - {{metric: perplexity, max_ratio: 1000.0, relative_to: teacher}}
      - {{metric: params, max: 1000000}}
  - name: half
    kind: cast
    dtype: bfloat16
"""


@pytest.fixture
def recipe_file(tmp_path, tiny_llama) -> Path:
    path = tmp_path / "tiny.yaml"
    path.write_text(RECIPE.format(model=tiny_llama))
    return path


def manifest(run_dir: Path, folder: str) -> dict:
    return json.loads((run_dir / folder / "manifest.json").read_text())


def test_run_writes_manifests_and_a_rerun_skips_everything(recipe_file, tmp_path):
    run_dir = tmp_path / "run"
    state = run_recipe(load_recipe(recipe_file), run_dir)
    assert state["status"] == "done" and state["stages"] == {"teacher": "done", "prune": "done", "half": "done"}
    prune = manifest(run_dir, "01-prune")
    for key in (
        "config_digest",
        "input_digest",
        "output_digest",
        "metrics",
        "gates",
        "started",
        "finished",
        "versions",
        "seed",
    ):
        assert key in prune
    assert prune["input_digest"] == manifest(run_dir, "00-teacher")["output_digest"]
    assert manifest(run_dir, "02-half")["input_digest"] == prune["output_digest"]
    assert prune["metrics"]["perplexity"] > 1 and all(g["passed"] for g in prune["gates"])
    assert "non-overlapping windows of 32 tokens" in prune["metrics"]["perplexity_detail"]["method"]
    half = AutoModelForCausalLM.from_pretrained(run_dir / "02-half" / "model")
    assert half.dtype == torch.bfloat16 and half.config.hidden_size == 48
    assert not list(run_dir.glob(".partial-*"))

    state = run_recipe(load_recipe(recipe_file), run_dir)
    assert state["stages"] == {"teacher": "skipped", "prune": "skipped", "half": "skipped"}


def test_changing_a_stage_reruns_it_and_what_follows_but_not_what_precedes(recipe_file, tmp_path):
    run_dir = tmp_path / "run"
    run_recipe(load_recipe(recipe_file), run_dir)
    state = run_recipe(load_recipe(recipe_file, ["stages.half.dtype=float16"]), run_dir)
    assert state["stages"] == {"teacher": "skipped", "prune": "skipped", "half": "done"}
    state = run_recipe(load_recipe(recipe_file, ["stages.prune.target.ffn=96"]), run_dir)
    assert state["stages"] == {"teacher": "skipped", "prune": "done", "half": "done"}
    # A gate change needs no recompute.
    state = run_recipe(
        load_recipe(recipe_file, ["stages.prune.target.ffn=96", "stages.prune.gates.1.max=2000000"]), run_dir
    )
    assert state["stages"]["prune"] == "skipped"


def test_a_truncated_artifact_is_detected_and_rebuilt(recipe_file, tmp_path):
    run_dir = tmp_path / "run"
    run_recipe(load_recipe(recipe_file), run_dir)
    weights = run_dir / "01-prune" / "model" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    state = run_recipe(load_recipe(recipe_file), run_dir)
    assert state["stages"]["prune"] == "done"
    AutoModelForCausalLM.from_pretrained(run_dir / "01-prune" / "model")


def test_failed_gate_stops_with_exit_code_3_and_keeps_artifacts(recipe_file, tmp_path):
    run_dir = tmp_path / "run"
    recipe = load_recipe(recipe_file, ["stages.prune.gates.1.max=1000"])
    with pytest.raises(GateFailed) as e:
        run_recipe(recipe, run_dir)
    assert e.value.exit_code == 3
    assert "gate 'params <= 1000' after stage 'prune' failed: measured params = " in str(e.value)
    assert (run_dir / "01-prune" / "model" / "model.safetensors").is_file()  # kept
    assert manifest(run_dir, "01-prune")["status"] == "gate_failed"
    assert not (run_dir / "02-half").exists()
    state = json.loads((run_dir / "run.json").read_text())
    assert state["status"] == "gate_failed" and "params <= 1000" in state["error"]


def test_cli_exit_codes_and_status(recipe_file, tmp_path):
    run_dir = tmp_path / "run"
    cli = [sys.executable, "-m", "slimlm"]
    gate = subprocess.run(
        [*cli, "run", str(recipe_file), "--run-dir", str(run_dir), "--set", "stages.prune.gates.1.max=10"],
        capture_output=True,
        text=True,
    )
    assert gate.returncode == 3, gate.stderr
    assert "error: gate 'params <= 10' after stage 'prune' failed" in gate.stderr
    assert "Traceback" not in gate.stderr
    status = subprocess.run([*cli, "status", str(run_dir)], capture_output=True, text=True)
    assert status.returncode == 0 and "gate failed" in status.stdout and "teacher" in status.stdout
    bad = subprocess.run(
        [*cli, "run", str(recipe_file), "--set", "stages.prune.target.hiden=3"], capture_output=True, text=True
    )
    assert bad.returncode == 2 and "unknown key 'hiden'; did you mean 'hidden'?" in bad.stderr
    missing = subprocess.run(
        [*cli, "run", str(recipe_file), "--run-dir", str(tmp_path / "r2"), "--set", f"model={tmp_path / 'nowhere'}"],
        capture_output=True,
        text=True,
    )
    assert missing.returncode == 2 and "is neither an existing directory nor a hub id" in missing.stderr
    assert "Traceback" not in missing.stderr


def test_a_stage_can_take_an_earlier_stage_as_input(recipe_file, tmp_path):
    run_dir = tmp_path / "run"
    text = recipe_file.read_text() + "  - {name: fp16, kind: cast, dtype: float16, input: prune}\n"
    recipe_file.write_text(text)
    run_recipe(load_recipe(recipe_file), run_dir)
    assert manifest(run_dir, "03-fp16")["input_digest"] == manifest(run_dir, "01-prune")["output_digest"]
    assert AutoModelForCausalLM.from_pretrained(run_dir / "03-fp16" / "model").dtype == torch.float16


def test_a_live_lock_refuses_a_second_run_and_a_stale_one_is_cleared(recipe_file, tmp_path):
    import os
    import socket

    from slimlm.errors import RunDirectoryError

    run_dir = tmp_path / "run"
    run_dir.mkdir()
    host = socket.gethostname()
    (run_dir / ".lock").write_text(json.dumps({"pid": os.getpid(), "host": host}))  # this test process: alive
    with pytest.raises(RunDirectoryError, match=f"is in use by process {os.getpid()}"):
        run_recipe(load_recipe(recipe_file), run_dir)
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    (run_dir / ".lock").write_text(json.dumps({"pid": int(dead.stdout), "host": host}))
    assert run_recipe(load_recipe(recipe_file), run_dir)["status"] == "done"
    assert not (run_dir / ".lock").exists()
