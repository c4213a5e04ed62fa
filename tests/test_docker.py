"""The image, run as the README's Docker section says: plan, a real recipe with its volumes, `docker stop` and resume.

Needs a Docker engine and the CPU image (`docker/build-offline.sh` builds slimlm:cpu; SLIMLM_IMAGE names
another), and ../shared for stories260K. CI builds the image and runs `pytest -m docker` after the fast suite.
"""

from __future__ import annotations

import json
import os
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest

pytestmark = pytest.mark.docker

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"
IMAGE = os.environ.get("SLIMLM_IMAGE", "slimlm:cpu")
RECIPE = "recipes/stories260k-local.yaml"  # its paths are ../shared/..., which is /shared from the image's /work
SETTINGS = ["--set", "stages.export.quantize=int8", "--set", "stages.distill.checkpoint_every=20"]
USER = "4321:4321"  # not root, and not the host's user: the files it writes must be its own


def docker(*args: str, timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run(["docker", *args], capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module", autouse=True)
def image():
    found = docker("image", "inspect", IMAGE, timeout=60)
    assert found.returncode == 0, f"no image {IMAGE}: build it with docker/build-offline.sh ({found.stderr.strip()})"


def volumes(tmp: Path) -> list[str]:
    for folder in ("runs", "cache"):
        (tmp / folder).mkdir(exist_ok=True)
        os.chown(tmp / folder, 4321, 4321)
    return ["-v", f"{tmp / 'runs'}:/work/runs", "-v", f"{tmp / 'cache'}:/cache", "-v", f"{SHARED}:/shared:ro"]


def test_plan_validates_the_quickstart_in_the_container():
    result = docker("run", "--rm", "--network", "host", IMAGE, "plan", "recipes/quickstart.yaml")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "export-gguf" in result.stdout


def test_a_run_without_a_writable_run_volume_is_refused_in_one_line(tmp_path):
    bare = docker("run", "--rm", "--network", "host", IMAGE, "run", RECIPE)
    assert bare.returncode == 2, bare.stdout + bare.stderr
    assert bare.stderr.strip().count("\n") == 0 and "is not on a volume" in bare.stderr
    read_only = docker("run", "--rm", "--network", "host", "-v", f"{tmp_path}:/work/runs:ro", IMAGE, "run", RECIPE)
    assert read_only.returncode == 2, read_only.stdout + read_only.stderr
    assert "mounted read-only" in read_only.stderr and "Traceback" not in read_only.stderr


@pytest.mark.skipif(not (SHARED / "models" / "stories260K").is_dir(), reason="needs ../shared/models/stories260K")
def test_a_recipe_runs_stops_resumes_and_its_outputs_load_outside(tmp_path):
    mounts = volumes(tmp_path)
    run_dir = tmp_path / "runs" / "stories260k-local"
    command = ["--network", "host", "--user", USER, *mounts, IMAGE, "run", RECIPE, *SETTINGS]
    started = docker("run", "-d", "--name", f"slimlm-test-{os.getpid()}", *command)
    assert started.returncode == 0, started.stderr
    container = started.stdout.strip()
    try:
        deadline = time.monotonic() + 600
        while not list(run_dir.glob(".work/*distill*/step-*/progress.json")):  # a checkpoint of the distill stage
            assert time.monotonic() < deadline, docker("logs", container).stderr[-3000:]
            assert docker("inspect", "-f", "{{.State.Running}}", container).stdout.strip() == "true", docker(
                "logs", container
            ).stderr[-3000:]
            time.sleep(1)
        stop = docker("stop", container)  # SIGTERM, then SIGKILL after 10 s
        assert stop.returncode == 0, stop.stderr
        code = docker("inspect", "-f", "{{.State.ExitCode}}", container).stdout.strip()
        logs = docker("logs", container)
    finally:
        docker("rm", "-f", container)
    assert code == "143", logs.stdout[-2000:] + logs.stderr[-2000:]  # stopped by SIGTERM, not killed
    assert "slimlm container: no CUDA device, CPU with" in logs.stdout
    assert json.loads((run_dir / "run.json").read_text())["status"] == "interrupted"
    assert not (run_dir / "02-distill" / "manifest.json").exists()

    resumed = docker("run", "--rm", *command)
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    distill = json.loads((run_dir / "02-distill" / "manifest.json").read_text())
    assert distill["metrics"]["resumed_from_step"] > 0
    assert json.loads((run_dir / "run.json").read_text())["status"] == "done"
    owners = {p.stat().st_uid for p in run_dir.rglob("*")}
    assert owners == {4321}, owners  # written by --user, not by root

    # outside the container, with plain transformers and onnxruntime: the int8 export predicts what the model does
    import onnxruntime as ort
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model_dir = run_dir / "02-distill" / "model"
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    ids = tokenizer("Once upon a time, there was a little girl who liked to play", return_tensors="np")["input_ids"]
    with torch.no_grad():
        expected = AutoModelForCausalLM.from_pretrained(model_dir)(torch.from_numpy(ids)).logits[0].numpy()
    session = ort.InferenceSession(str(run_dir / "03-export" / "onnx" / "model.onnx"))
    feeds = {}
    for arg in session.get_inputs():
        if arg.name == "input_ids":
            feeds[arg.name] = ids
        elif arg.name == "attention_mask":
            feeds[arg.name] = np.ones_like(ids)
        elif arg.name == "position_ids":
            feeds[arg.name] = np.arange(ids.shape[1])[None]
        else:  # an empty cache: batch 1, no past positions, the graph's own head count and size
            shape = [1 if d == "batch_size" else d if isinstance(d, int) else 0 for d in arg.shape]
            feeds[arg.name] = np.zeros(shape, dtype=np.float32)
    logits = session.run(["logits"], feeds)[0][0]
    assert (logits.argmax(-1) == expected.argmax(-1)).mean() >= 0.8
