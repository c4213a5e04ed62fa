"""The bad-input matrix: mistakes a user could plausibly make, each ending in one clear message and a documented exit code.

Exit codes (README): 2 bad input, 3 gate failed, 4 a stage failed while running. No case may end in a traceback,
and every file present before a case is still there, unchanged, after it. Hostile recipes are in
test_hostile_input.py, damaged run directories and exports in test_damaged_files.py.
"""

from __future__ import annotations

import errno
import json
import shutil
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from slimlm.cli import app
from tests.conftest import assert_one_clear_error

BASE = {
    "name": "bad",
    "model": "MODEL",
    "device": "cpu",
    "data": {
        "calibration": {"source": "builtin:python-docs", "split": "train", "seq_len": 32, "samples": 2},
        "eval": {"source": "builtin:python-docs", "split": "test", "seq_len": 32},
    },
    "evaluation": {"perplexity": {"data": "eval", "max_tokens": 64}},
    "stages": [{"name": "prune", "kind": "prune", "target": {"ffn": 64}}],
}


def _gpt2(tmp: Path) -> Path:
    from transformers import GPT2Config, GPT2LMHeadModel

    GPT2LMHeadModel(GPT2Config(n_embd=32, n_layer=1, n_head=2, vocab_size=512)).save_pretrained(tmp / "gpt2")
    return tmp / "gpt2"


def _copy(model: Path, tmp: Path, edit) -> Path:
    out = tmp / "edited-model"
    shutil.copytree(model, out)
    edit(out)
    return out


def _truncate(d: Path) -> None:
    weights = d / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:500])


def _pickle_only(d: Path) -> None:
    (d / "model.safetensors").rename(d / "pytorch_model.bin")


def _remote_code(d: Path) -> None:
    cfg = json.loads((d / "config.json").read_text())
    cfg.update(model_type="custom_lm", auto_map={"AutoConfig": "configuration_custom.CustomConfig"})
    (d / "config.json").write_text(json.dumps(cfg))


# (id, how to change the recipe or its inputs, extra CLI args, exit code, part of the message)
CASES = [
    ("malformed-yaml", {"raw": "name: bad\nstages: [\n"}, [], 2, "not valid YAML"),
    ("unknown-top-key", {"set": ["modle=x"]}, [], 2, "unknown key 'modle'"),
    ("misspelt-stage-key", {"set": ["stages.prune.taget={params: 0.5}"]}, [], 2, "did you mean 'target'"),
    ("wrong-type", {"set": ["seed=abc"]}, [], 2, "field 'seed'"),
    ("missing-field", {"drop": "model"}, [], 2, "field 'model': required field is missing"),
    ("negative-budget", {"set": ["stages.prune.target={params: -0.5}"]}, [], 2, "greater than 0"),
    ("zero-budget", {"set": ["stages.prune.target={params: 0}"]}, [], 2, "greater than 0"),
    ("unknown-kind", {"set": ["stages.prune.kind=shrink"]}, [], 2, "unknown stage kind 'shrink'"),
    (
        "duplicate-names",
        {"stages+": [{"name": "prune", "kind": "cast", "dtype": "float16"}]},
        [],
        2,
        "duplicate stage name",
    ),
    ("unknown-gate-metric", {"set": ["stages.prune.gates=[{metric: bleu, min: 1}]"]}, [], 2, "gate on 'bleu'"),
    (
        "ratio-gate-without-reference",
        {"set": ["stages.prune.gates=[{metric: perplexity, max_ratio: 2}]"]},
        [],
        2,
        "need relative_to",
    ),
    ("unknown-data-reference", {"set": ["stages.prune.calibration=calib"]}, [], 2, "no data source named 'calib'"),
    ("zero-calibration-samples", {"set": ["data.calibration.samples=0"]}, [], 2, "greater than or equal to 1"),
    ("unknown-set-stage", {"set": ["stages.distill.tokens=5"]}, [], 2, "no stage named 'distill'"),
    (
        "stage-after-bnb",
        {"stages+": [{"name": "q", "kind": "bitsandbytes"}, {"name": "e", "kind": "export"}]},
        [],
        2,
        "kind export needs a hf artifact",
    ),
    ("missing-model-path", {"model": "/nonexistent/model"}, [], 2, "neither an existing directory nor a hub id"),
    ("not-a-model-dir", {"model": "EMPTY_DIR"}, [], 2, "has no config.json"),
    ("truncated-safetensors", {"model_edit": _truncate}, [], 2, "cannot load the model"),
    ("pickle-checkpoint", {"model_edit": _pickle_only}, [], 2, "only pickle checkpoints"),
    ("remote-code-without-consent", {"model_edit": _remote_code}, [], 2, "trust_remote_code: true"),
    ("unsupported-architecture", {"model": "GPT2"}, [], 2, "model type 'gpt2' is not supported"),
    ("prune-target-too-large", {"set": ["stages.prune.target={hidden: 4096}"]}, [], 2, "larger than the model's 64"),
    ("heads-not-divisible", {"set": ["stages.prune.target={heads: 3}"]}, [], 2, "do not divide evenly"),
    ("hidden-not-multiple-of-heads", {"set": ["stages.prune.target={hidden: 62}"]}, [], 2, "not a multiple of 4 heads"),
    ("budget-nothing-fits", {"set": ["stages.prune.target={params: 0.01}"]}, [], 2, "no shape with widths"),
    (
        "missing-data-file",
        {"set": ["data.eval.source=/nonexistent.txt", "data.eval.split=all"]},
        [],
        2,
        "does not exist",
    ),
    ("empty-data-file", {"data_file": ""}, [], 2, "holds no text"),
    ("too-short-data", {"data_file": "just a few words"}, [], 2, "fewer than one block"),
    ("jsonl-wrong-field", {"jsonl": {"content": "text here"}}, [], 2, "no field 'text'"),
    (
        "lora-target-missing",
        {
            "stages+": [
                {"name": "d", "kind": "distill", "data": "calibration", "steps": 1, "lora": {"target_modules": ["wq"]}}
            ]
        },
        [],
        2,
        "not found in the model",
    ),
    (
        "budget-below-one-batch",
        {"stages+": [{"name": "d", "kind": "distill", "data": "calibration", "tokens": 3}]},
        [],
        2,
        "less than one optimizer step",
    ),
    (
        "keep-8bit-names-nothing",
        {"stages+": [{"name": "e", "kind": "export", "quantize": "int4", "keep_8bit": ["lm_haed"]}]},
        [],
        2,
        "'lm_haed' names no Linear layer of this model; its layers are down_proj, gate_proj, k_proj, lm_head",
    ),
    (
        "keep-8bit-on-int8",
        {"stages+": [{"name": "e", "kind": "export", "quantize": "int8", "keep_8bit": ["lm_head"]}]},
        [],
        2,
        "keep_8bit applies to quantize: int4 only",
    ),
    (
        "smooth-without-quantization",
        {"stages+": [{"name": "e", "kind": "export", "quantize": "none", "smooth": {"alpha": 0.5}}]},
        [],
        2,
        "smooth applies to quantize: int8 or int4 only",
    ),
    (
        "gptq-without-quantization",
        {"stages+": [{"name": "e", "kind": "export", "quantize": "none", "gptq": {}}]},
        [],
        2,
        "gptq applies to quantize: int8 or int4 only",
    ),
    (
        "unknown-lm-eval-task",
        {"set": ["evaluation.lm_eval={tasks: [hellaswagg]}"]},
        [],
        2,
        "lm-eval has no task named 'hellaswagg'; did you mean hellaswag",
    ),
    (
        "task-file-wrong-fields",
        {"task_file": {"goal": "g", "choices": ["a", "b"], "gold": 0}},
        [],
        2,
        "uses question, but the examples in task.jsonl have the fields choices, goal, gold",
    ),
    (
        "task-file-missing",
        {"set": ["evaluation.lm_eval={tasks: [{name: t, data: nodata}]}"]},
        [],
        2,
        "no data source named 'nodata'",
    ),
    (
        "gate-on-uncomputed-task-metric",
        {
            "set": [
                "evaluation.lm_eval={tasks: [{name: t, data: eval}]}",
                "stages.prune.gates=[{metric: tasks.t.f1, min: 0.5}]",
            ]
        },
        [],
        2,
        "gate on 'tasks.t.f1', which this run does not measure",
    ),
    (
        "above-chance-on-perplexity",
        {
            "set": [
                "stages.prune.gates=[{metric: perplexity, min_ratio: 0.5, relative_to: teacher, above_chance: true}]"
            ]
        },
        [],
        2,
        "above_chance applies to a multiple-choice task's accuracy",
    ),
    (
        "speed-prompt-longer-than-context",
        {"set": ["evaluation.speed={prompt_tokens: 600, new_tokens: 8}"]},
        [],
        2,
        "more than the model's context of 512 tokens",
    ),
    ("gate-fails", {"set": ["stages.prune.gates=[{metric: params, max: 10}]"]}, [], 3, "gate 'params <= 10'"),
    ("unwritable-run-dir", {}, ["--run-dir", "FILE/run"], 2, "cannot create the run directory"),
    ("disk-full", {"disk_full": True}, [], 4, "No space left on device"),
]


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_bad_input_is_one_clear_message(case, tiny_llama, tmp_path, monkeypatch):
    name, change, args, code, message = case
    recipe = json.loads(json.dumps(BASE))
    recipe["model"] = str(tiny_llama)
    if "model" in change:
        recipe["model"] = {"EMPTY_DIR": str(tmp_path), "GPT2": None}.get(change["model"], change["model"])
        if change["model"] == "GPT2":
            recipe["model"] = str(_gpt2(tmp_path))
    if "model_edit" in change:
        recipe["model"] = str(_copy(tiny_llama, tmp_path, change["model_edit"]))
    if "drop" in change:
        del recipe[change["drop"]]
    if "stages+" in change:
        recipe["stages"] += change["stages+"]
    if "data_file" in change:
        (tmp_path / "data.txt").write_text(change["data_file"])
        recipe["data"]["eval"] = {"source": str(tmp_path / "data.txt"), "seq_len": 32}
    if "jsonl" in change:
        (tmp_path / "data.jsonl").write_text(json.dumps(change["jsonl"]) + "\n")
        recipe["data"]["eval"] = {"source": str(tmp_path / "data.jsonl"), "seq_len": 32}
    if "task_file" in change:
        (tmp_path / "task.jsonl").write_text(json.dumps(change["task_file"]) + "\n")
        task = {"name": "t", "file": str(tmp_path / "task.jsonl"), "text": "{{question}}", "choices": "{{choices}}"}
        recipe["evaluation"]["lm_eval"] = {"tasks": [{**task, "target": "{{gold}}"}]}
    if change.get("disk_full"):
        from slimlm.compress import stage as prune_stage

        def full_disk(*a, **k):
            raise OSError(errno.ENOSPC, "No space left on device", "model.safetensors")

        monkeypatch.setattr(prune_stage, "save_model", full_disk)
    path = tmp_path / "recipe.yaml"
    path.write_text(change.get("raw") or yaml.safe_dump(recipe))
    (tmp_path / "FILE").write_text("a file, not a folder")
    args = [a.replace("FILE", str(tmp_path / "FILE")) for a in args] or ["--run-dir", str(tmp_path / "run")]
    sets = [x for s in change.get("set", []) for x in ("--set", s)]
    assert_one_clear_error(["run", path, *args, *sets], tmp_path, message, code)


def test_a_failure_in_a_later_stage_keeps_earlier_artifacts(tiny_llama, tmp_path):
    recipe = json.loads(json.dumps(BASE))
    recipe["model"] = str(tiny_llama)
    recipe["stages"].append({"name": "d", "kind": "distill", "data": "calibration", "tokens": 3})
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    result = CliRunner().invoke(app, ["run", str(path), "--run-dir", str(tmp_path / "run")])
    assert result.exit_code == 2
    assert (tmp_path / "run" / "01-prune" / "model" / "model.safetensors").is_file()
    assert json.loads((tmp_path / "run" / "run.json").read_text())["status"] == "failed"
