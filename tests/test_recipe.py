"""Recipe loading: every shipped recipe validates; every user mistake is one message with file, line, stage, field."""

from __future__ import annotations

from pathlib import Path

import pytest

from slimlm.errors import RecipeError
from slimlm.recipe import Locator, Recipe, check_recipe, load_recipe
from slimlm.stage import ONNX

RECIPES = sorted((Path(__file__).resolve().parents[1] / "recipes").glob("*.yaml"))

GOOD = """\
name: t
model: some/model
data:
  calibration: {source: "builtin:python-docs", split: train}
  eval: {source: "builtin:python-docs", split: test}
evaluation:
  perplexity: {data: eval}
stages:
  - name: prune
    kind: prune
    target: {params: 0.5}
    gates:
      - {metric: perplexity, max_ratio: 2.0, relative_to: teacher}
  - name: half
    kind: cast
    dtype: bfloat16
"""


def write(tmp_path, text: str) -> Path:
    path = tmp_path / "r.yaml"
    path.write_text(text)
    return path


@pytest.mark.parametrize("path", RECIPES, ids=[p.name for p in RECIPES])
def test_every_shipped_recipe_validates(path, monkeypatch):
    root = path.parents[1]
    if "../shared/" in path.read_text() and not (root.parent / "shared").is_dir():
        pytest.skip("this recipe reads ../shared, which is absent")
    monkeypatch.chdir(root)  # recipes name files relative to the project root
    recipe = load_recipe(path)
    assert recipe.name and recipe.model


def test_good_recipe_loads(tmp_path):
    recipe = load_recipe(write(tmp_path, GOOD))
    assert [s.kind for s in recipe.stages] == ["prune", "cast"]
    assert recipe.stage("prune").target.params == 0.5


@pytest.mark.parametrize(
    "old,new,expected",
    [
        (
            "    target: {params: 0.5}",
            "    taget: {params: 0.5}",
            ["r.yaml:11", "stage 'prune' (stages[0])", "field 'taget'", "did you mean 'target'"],
        ),
        ("    dtype: bfloat16", "    dtype: int3", ["r.yaml:16", "stage 'half'", "field 'dtype'", "int3"]),
        ("    dtype: bfloat16\n", "", ["r.yaml:14", "stage 'half'", "field 'dtype'", "missing"]),
        (
            "  perplexity: {data: eval}",
            "  perplexity: {data: eval, max_tokens: lots}",
            ["r.yaml:7", "max_tokens", "integer"],
        ),
        ("    kind: cast", "    kind: distil", ["r.yaml:14", "unknown stage kind 'distil'", "prune"]),
        ("  - name: half", "  - name: prune", ["r.yaml:14", "duplicate stage name 'prune'"]),
        (
            "{metric: perplexity, max_ratio: 2.0, relative_to: teacher}",
            "{metric: accuracy, max: 2.0}",
            ["r.yaml:13", "gates.0.metric", "accuracy", "measured:"],
        ),
        (
            "{metric: perplexity, max_ratio: 2.0, relative_to: teacher}",
            "{metric: perplexity, max_ratio: 2.0}",
            ["r.yaml:13", "relative_to"],
        ),
        (
            "  perplexity: {data: eval}",
            "  perplexity: {data: evaluation}",
            ["r.yaml:7", "no data source named 'evaluation'"],
        ),
        ("    target: {params: 0.5}", "    target: {params: -1}", ["r.yaml:11", "target.params", "greater than 0"]),
        ("    target: {params: 0.5}", "    target: {params: 0.5, hidden: 32}", ["target", "not both"]),
    ],
)
def test_mistakes_name_file_line_stage_and_field(tmp_path, old, new, expected):
    assert old in GOOD
    with pytest.raises(RecipeError) as e:
        load_recipe(write(tmp_path, GOOD.replace(old, new)))
    message = str(e.value)
    for part in expected:
        assert part in message, message
    assert e.value.exit_code == 2


def test_malformed_yaml_names_the_line(tmp_path):
    with pytest.raises(RecipeError, match=r"r.yaml:3: not valid YAML"):
        load_recipe(write(tmp_path, "name: t\nmodel: x\ndata: {a: [1, 2}\n"))


def test_stage_order_that_makes_no_sense(tmp_path):
    recipe = load_recipe(write(tmp_path, GOOD))

    class FakeExport(type(recipe.stages[1])):  # a stage that produces ONNX, ahead of a prune stage
        produces = ONNX

    export = FakeExport.model_construct(name="export", kind="cast", dtype="float32", gates=[])
    bad = Recipe.model_construct(**{**dict(recipe), "stages": [export, recipe.stages[0]]})
    with pytest.raises(
        RecipeError, match="kind prune needs a hf artifact, but it follows stage 'export', which produces onnx"
    ):
        check_recipe(bad, Locator(Path("r.yaml"), {}))


def test_set_overrides_apply_and_validate(tmp_path):
    path = write(tmp_path, GOOD)
    recipe = load_recipe(path, ["stages.prune.target.params=0.25", "model=/tmp/other", "stages.half.dtype=float16"])
    assert recipe.stage("prune").target.params == 0.25 and recipe.model == "/tmp/other"
    assert recipe.stage("half").dtype == "float16"
    with pytest.raises(RecipeError, match=r"--set stages.prune.target.parms.*unknown key 'parms'"):
        load_recipe(path, ["stages.prune.target.parms=0.25"])
    with pytest.raises(RecipeError, match="no stage named 'distill'"):
        load_recipe(path, ["stages.distill.tokens=5000"])
    with pytest.raises(RecipeError, match="expected KEY=VALUE"):
        load_recipe(path, ["stages.prune.target.params"])
    with pytest.raises(RecipeError, match=r"--set stages.half.dtype.*dtype"):
        load_recipe(path, ["stages.half.dtype=int2"])


def test_missing_recipe_file(tmp_path):
    with pytest.raises(RecipeError, match="does not exist"):
        load_recipe(tmp_path / "nope.yaml")


def test_input_names_an_earlier_stage(tmp_path):
    text = GOOD + "  - {name: again, kind: cast, dtype: float16, input: prune}\n"
    recipe = load_recipe(write(tmp_path, text))
    assert recipe.stage("again").input == "prune"
    with pytest.raises(
        RecipeError, match=r"r.yaml:17: stage 'again' \(stages\[2\]\), field 'input': 'later' is not an earlier stage"
    ):
        load_recipe(write(tmp_path, text.replace("input: prune", "input: later")))
    with pytest.raises(RecipeError, match="'teacher' is reserved"):
        load_recipe(write(tmp_path, GOOD.replace("  - name: half", "  - name: teacher")))


def test_plan_shows_what_the_recipe_sets_and_every_setting_off_its_default():
    """The plan reads without the recipe: written settings show even where they equal the default (the quickstart's
    method: lora, quantize: int8), `--set` overrides show, and a list is not swallowed as rich markup."""
    from tests.conftest import run_cli

    quickstart = RECIPES[0].parent / "quickstart.yaml"
    code, out = run_cli("plan", quickstart, "--set", "stages.prune.round_to=64")
    flat = " ".join(out.split())  # the table wraps long cells
    assert code == 0
    for setting in ("method=lora", "quantize=int8", "lora={r: 16, alpha: 32.0}", "round_to=64", "keep_8bit=[lm_head,"):
        assert setting in flat.replace("│", "").replace("  ", " "), setting
