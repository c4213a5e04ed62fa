"""Damaged or foreign files handed to `slimlm status | report | generate`, and run directories that are not slimlm's.

Every case ends in exit 2 with one error line that names the file and what to do, no traceback, and
every file that was there before still there, unchanged.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import yaml

from tests.conftest import assert_one_clear_error, run_cli
from tests.test_bad_input import BASE

RECIPE = {**BASE, "name": "tiny"}
# Every kind of metric a manifest can hold, so that the checks of damaged manifests are tried on real ones.
FULL_EVALUATION = {
    "perplexity": {"data": "eval", "max_tokens": 64},
    "agreement": {"data": "eval", "max_tokens": 64},
    "speed": {"prompt_tokens": 8, "new_tokens": 4, "batch_size": 2, "repeats": 1},
    "lm_eval": {"limit": 8, "tasks": [{"name": "docs_cloze", "data": "eval"}]},
}


@pytest.fixture(scope="session")
def finished_run(tiny_models, tmp_path_factory) -> tuple[Path, Path]:
    """(recipe file, run directory) of a finished prune-only run of the tiny Llama."""
    folder = tmp_path_factory.mktemp("finished")
    recipe = folder / "tiny.yaml"
    recipe.write_text(yaml.safe_dump({**RECIPE, "model": str(tiny_models["llama"]), "evaluation": FULL_EVALUATION}))
    code, output = run_cli("run", recipe, "--run-dir", folder / "run")
    assert code == 0, output
    return recipe, folder / "run"


def test_every_manifest_a_run_writes_reads_back_intact(finished_run, tmp_path):
    """The damage checks refuse nothing slimlm writes: a rerun of a finished run reuses every stage."""
    run = tmp_path / "run"
    shutil.copytree(finished_run[1], run)
    code, output = run_cli("run", finished_run[0], "--run-dir", run)
    assert code == 0, output
    assert json.loads((run / "run.json").read_text())["stages"] == {"teacher": "skipped", "prune": "skipped"}


def _write(name: str, content: bytes | str):
    def damage(run: Path) -> None:
        target = run / name
        if target.is_dir():
            shutil.rmtree(target)
        target.write_bytes(content if isinstance(content, bytes) else content.encode())

    return damage


def test_a_manifest_slimlm_cannot_read_is_said_and_its_stage_runs_again(finished_run, tmp_path):
    """A damaged manifest (or one an older slimlm wrote with other fields) never stops a rerun: it is named, with
    what is wrong with it, and the stage runs again."""
    run = tmp_path / "run"
    shutil.copytree(finished_run[1], run)
    _metric_as_text(run)
    code, output = run_cli("run", finished_run[0], "--run-dir", run)
    assert code == 0, output
    assert (
        "01-prune/manifest.json is not a record this slimlm reads (metric params is 'a lot', not a number)"
        in " ".join(output.split())
    )
    assert json.loads((run / "run.json").read_text())["stages"] == {"teacher": "skipped", "prune": "done"}


def _metric_as_text(run: Path) -> None:
    manifest = json.loads((run / "01-prune" / "manifest.json").read_text())
    manifest["metrics"]["params"] = "a lot"
    (run / "01-prune" / "manifest.json").write_text(json.dumps(manifest))


def _finished_as_a_number(run: Path) -> None:
    manifest = json.loads((run / "01-prune" / "manifest.json").read_text())
    manifest["finished"] = 5  # the report would write it as a time
    (run / "01-prune" / "manifest.json").write_text(json.dumps(manifest))


def _run_json_is_a_folder(run: Path) -> None:
    (run / "run.json").unlink()
    (run / "run.json").mkdir()


# (id, what to do to a copy of a finished run, part of the message)
RUN_CASES = [
    ("missing", lambda run: shutil.rmtree(run), "does not exist"),
    ("a-file", lambda run: shutil.rmtree(run) or run.write_text("x"), "is a file, not a run directory"),
    ("empty", lambda run: shutil.rmtree(run) or run.mkdir(), "is not a slimlm run directory (it has no run.json)"),
    ("run-json-list", _write("run.json", "[]"), "run.json is damaged"),
    ("run-json-empty-object", _write("run.json", "{}"), "run.json is damaged"),
    ("run-json-not-utf8", _write("run.json", b'{"recipe": "caf\xe9"}'), "run.json is damaged"),
    ("run-json-truncated", _write("run.json", '{"recipe": "tiny", "sta'), "run.json is damaged"),
    ("run-json-a-folder", _run_json_is_a_folder, "run.json is damaged"),
    ("metric-as-text", _metric_as_text, "01-prune/manifest.json is damaged (metric params is 'a lot', not a number)"),
    ("manifest-a-list", _write("01-prune/manifest.json", "[1, 2]"), "01-prune/manifest.json is damaged"),
    (
        "field-of-wrong-type",
        _finished_as_a_number,
        "01-prune/manifest.json is damaged (its field finished is 5, not a str)",
    ),
]


@pytest.mark.parametrize("command", ["status", "report"])
@pytest.mark.parametrize("case", RUN_CASES, ids=[c[0] for c in RUN_CASES])
def test_status_and_report_on_a_damaged_run_are_one_clear_error(case, command, finished_run, tmp_path):
    name, damage, message = case
    run = tmp_path / "run"
    shutil.copytree(finished_run[1], run)
    damage(run)
    assert_one_clear_error([command, run], tmp_path, message)  # report must not overwrite the good report


def test_a_damaged_recipe_copy_still_lists_the_stages_that_ran(finished_run, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(finished_run[1], run)
    (run / "recipe.yaml").write_text("stages: [\n")
    code, output = run_cli("status", run)
    assert code == 0, output
    assert "prune" in output and "recipe.yaml is damaged" in output
    params = json.loads((run / "01-prune" / "manifest.json").read_text())["metrics"]["params"]
    assert f"{params:,}" in output  # the prune row still has its metrics
    code, output = run_cli("report", run)
    assert code == 0, output
    assert f"{params:,}" in (run / "report.md").read_text()


def _edit_json(name: str, edit):
    def damage(export: Path) -> None:
        data = json.loads((export / name).read_text())
        edit(data)
        (export / name).write_text(json.dumps(data))

    return damage


def _truncate(name: str, keep: int = 100):
    def damage(export: Path) -> None:
        path = export / name
        path.write_bytes(path.read_bytes()[:keep])

    return damage


def _remove_external_data(export: Path) -> None:
    data = [p for p in export.iterdir() if p.name.startswith("model.onnx") and p.name != "model.onnx"]
    assert data, "the tiny export has no external data file to remove"
    for path in data:
        path.unlink()


# (id, what to do to a copy of a tiny fp32 export, prompt, part of the message)
EXPORT_CASES = [
    ("not-a-folder", lambda e: shutil.rmtree(e) or e.write_text("x"), "hi", "is not a folder"),
    ("a-run-not-an-export", lambda e: [p.unlink() for p in e.glob("*.onnx")], "hi", "it has no model.onnx"),
    ("no-tokenizer", lambda e: (e / "tokenizer.json").unlink(), "hi", "it has no tokenizer.json"),
    ("no-config", lambda e: (e / "config.json").unlink(), "hi", "it has no config.json"),
    ("truncated-graph", _truncate("model.onnx"), "hi", "onnxruntime cannot load"),
    ("missing-external-data", _remove_external_data, "hi", "onnxruntime cannot load"),
    ("config-not-json", lambda e: (e / "config.json").write_text("{not json"), "hi", "config.json cannot be read as JSON"),
    ("config-a-list", lambda e: (e / "config.json").write_text("[]"), "hi", "config.json holds a JSON list"),
    ("generation-config-not-json", lambda e: (e / "generation_config.json").write_bytes(b"\xff\xfe"), "hi", "generation_config.json cannot be read"),
    ("tokenizer-truncated", _truncate("tokenizer.json"), "hi", "tokenizer.json cannot be read"),
    ("config-vocab-edited", _edit_json("config.json", lambda c: c.update(vocab_size=7)), "hi", "config.json does not belong to this graph"),
    ("config-heads-edited", _edit_json("config.json", lambda c: c.update(num_key_value_heads=3)), "hi", "says 3 key/value heads, but the graph's cache has 2"),
    ("empty-prompt", lambda e: None, "", "the prompt is empty"),
]  # fmt: skip


def _on_export(command: str, export: Path, prompt: str) -> list:
    if command == "generate":
        return ["generate", export, prompt, "--max-new-tokens", "2"]
    return ["export-check", export, "--prompt", prompt, "--steps", "2"]


@pytest.mark.parametrize("command", ["generate", "export-check"])
@pytest.mark.parametrize("case", EXPORT_CASES, ids=[c[0] for c in EXPORT_CASES])
def test_a_damaged_export_is_one_clear_error(case, command, tiny_export, tmp_path):
    name, damage, prompt, message = case
    export = tmp_path / "onnx"
    shutil.copytree(tiny_export, export)
    damage(export)
    assert_one_clear_error(_on_export(command, export, prompt), tmp_path, message)


@pytest.mark.parametrize("command", ["generate", "export-check"])
def test_the_intact_copy_works(command, tiny_export, tmp_path):
    """The damaged-export cases fail because of their damage: the same copy, undamaged, runs."""
    export = tmp_path / "onnx"
    shutil.copytree(tiny_export, export)
    code, output = run_cli(*_on_export(command, export, "hi"))
    assert code == 0, output


# ---------------------------------------------------------------- run directories slimlm does not own


def _user_folder(folder: Path, recipe: Path) -> Path:
    """The recipe's own folder, as `--run-dir .` from it would make it, with a user's file in a `01-prune/`."""
    (folder / "01-prune").mkdir()
    (folder / "01-prune" / "notes.txt").write_text("mine")
    shutil.copy(recipe, folder / "recipe.yaml")
    return folder


def _model_subfolder(folder: Path, recipe: Path) -> Path:
    model = Path(yaml.safe_load(recipe.read_text())["model"])
    copy = folder / "model"
    shutil.copytree(model, copy)
    (folder / "r.yaml").write_text(yaml.safe_dump({**RECIPE, "model": str(copy)}))
    return copy / "runs" / "tiny"


def _other_recipes_run(folder: Path, recipe: Path) -> Path:
    return folder  # the finished run is copied here by the test; its recipe is named 'tiny', this one 'other'


RUN_DIR_CASES = [
    ("recipe-folder", _user_folder, "is not a slimlm run directory (it holds files slimlm did not write"),
    ("inside-the-model", _model_subfolder, "is inside the model directory"),
    ("another-recipes-run", _other_recipes_run, "holds a run of recipe 'tiny' (stages 01-prune), not of 'other'"),
    ("damaged-run-json", lambda f, r: (f / "run.json").write_text("[]") and f, "run.json is damaged"),
    ("a-file", lambda f, r: (f / "file").write_text("x") and f / "file", "is a file"),
]


@pytest.mark.parametrize("case", RUN_DIR_CASES, ids=[c[0] for c in RUN_DIR_CASES])
def test_a_run_directory_that_is_not_this_recipes_is_refused(case, finished_run, tmp_path):
    name, make, message = case
    folder = tmp_path / "folder"
    if name == "another-recipes-run":
        shutil.copytree(finished_run[1], folder)
    else:
        folder.mkdir()
    run_dir = make(folder, finished_run[0])
    recipe = tmp_path / "other.yaml"
    model = yaml.safe_load(finished_run[0].read_text())["model"]
    if name == "inside-the-model":
        model = str(folder / "model")
    recipe.write_text(yaml.safe_dump({**RECIPE, "name": "other", "model": model}))
    assert_one_clear_error(["run", recipe, "--run-dir", run_dir], tmp_path, message)


def test_force_replaces_another_recipes_run_and_says_so(finished_run, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(finished_run[1], run)
    recipe = tmp_path / "other.yaml"
    model = yaml.safe_load(finished_run[0].read_text())["model"]
    recipe.write_text(yaml.safe_dump({**RECIPE, "name": "other", "model": model}))
    code, output = run_cli("run", recipe, "--run-dir", run, "--force")
    assert code == 0, output
    assert "replacing the run of recipe 'tiny' (stages 01-prune)" in output.replace("\n", "")
    assert json.loads((run / "run.json").read_text())["recipe"] == "other"


def test_a_stage_folder_holding_a_users_file_is_kept_aside_not_deleted(finished_run, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(finished_run[1], run)
    (run / "01-prune" / "notes.txt").write_text("mine")
    code, output = run_cli("run", finished_run[0], "--run-dir", run, "--set", "stages.prune.target.ffn=32")
    assert code == 0, output
    kept = list((run / ".replaced").glob("01-prune-*/notes.txt"))
    assert [p.read_text() for p in kept] == ["mine"], output
    assert "held files slimlm did not write" in output
