"""A real `slimlm run` killed with SIGKILL mid-distillation resumes from its last checkpoint on the next run."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file

from slimlm.recipe import load_recipe
from slimlm.runner import run_recipe

RECIPE = """\
name: crash
model: {model}
device: cpu
data:
  train: {{source: "builtin:python-docs", split: train, seq_len: 32, samples: 16}}
stages:
  - {{name: prune, kind: prune, target: {{ffn: 64, layers: 3}}, calibration: train}}
  - {{name: distill, kind: distill, data: train, method: full, steps: 60, batch_size: 2, lr: 0.001,
     checkpoint_every: 5}}
"""


def distill_checkpoints(run_dir):
    """The distill stage's finished checkpoints, read while another process may be creating and removing stage folders."""
    try:
        return list(run_dir.glob(".work/*-distill-*/step-*/progress.json"))
    except FileNotFoundError:  # a folder glob listed was renamed or removed before glob looked inside it
        return []


def test_sigkill_mid_distillation_loses_at_most_one_checkpoint_interval(tiny_llama, tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text(RECIPE.format(model=tiny_llama))
    run_recipe(load_recipe(path), tmp_path / "straight")

    killed = tmp_path / "killed"
    command = [sys.executable, "-m", "slimlm", "run", str(path), "--run-dir", str(killed)]
    proc = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    # Kill as soon as a checkpoint exists (and so well before the 60 steps end), wherever the process is.
    while time.time() < deadline and proc.poll() is None and not distill_checkpoints(killed):
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert distill_checkpoints(killed), "no checkpoint was written before the kill"
    assert not (killed / "02-distill").exists()  # the killed stage does not look finished
    assert (killed / ".lock").exists()  # left behind by the dead process...

    rerun = subprocess.run(command, capture_output=True, text=True)  # ...and cleared as stale
    assert rerun.returncode == 0, rerun.stderr
    state = json.loads((killed / "run.json").read_text())
    assert state["stages"] == {"teacher": "skipped", "prune": "skipped", "distill": "done"}
    resumed = json.loads((killed / "02-distill" / "manifest.json").read_text())["metrics"]["resumed_from_step"]
    assert resumed >= 5 and resumed % 5 == 0
    a = load_file(tmp_path / "straight" / "02-distill" / "model" / "model.safetensors")
    b = load_file(killed / "02-distill" / "model" / "model.safetensors")
    for key in a:
        torch.testing.assert_close(a[key], b[key], atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize(("sig", "code"), [(signal.SIGTERM, 143), (signal.SIGINT, 130)], ids=["SIGTERM", "SIGINT"])
def test_a_signal_mid_distillation_is_recorded_and_the_same_command_resumes(sig, code, tiny_llama, tmp_path):
    """What `docker stop`, Kubernetes and batch schedulers send (SIGTERM), and Ctrl-C (SIGINT)."""
    path = tmp_path / "r.yaml"
    path.write_text(RECIPE.format(model=tiny_llama))
    run_dir = tmp_path / "run"
    command = [sys.executable, "-m", "slimlm", "run", str(path), "--run-dir", str(run_dir)]
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None and not distill_checkpoints(run_dir):
        time.sleep(0.01)
    proc.send_signal(sig)
    output, _ = proc.communicate(timeout=120)
    assert proc.returncode == code, output
    assert "Traceback" not in output, output
    assert f"interrupted ({sig.name})" in output
    assert distill_checkpoints(run_dir), "the checkpoints were not kept"
    assert not (run_dir / ".lock").exists()  # released, not left for the next run to clear
    state = json.loads((run_dir / "run.json").read_text())
    assert state["status"] == "interrupted" and state["error"] == f"interrupted by {sig.name}"
    status = subprocess.run([sys.executable, "-m", "slimlm", "status", str(run_dir)], capture_output=True, text=True)
    assert status.returncode == 0 and "interrupted" in status.stdout, status.stdout + status.stderr

    rerun = subprocess.run(command, capture_output=True, text=True)
    assert rerun.returncode == 0, rerun.stdout + rerun.stderr
    resumed = json.loads((run_dir / "02-distill" / "manifest.json").read_text())["metrics"]["resumed_from_step"]
    assert resumed >= 5 and resumed % 5 == 0
