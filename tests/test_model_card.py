"""Model cards: every model folder a stage writes carries a README.md in the hub's convention, parsed back here."""

from __future__ import annotations

import json

from huggingface_hub import ModelCard

from slimlm.recipe import load_recipe
from slimlm.runner import run_recipe
from tests.test_runner import RECIPE


def test_every_stage_folder_has_a_card_with_lineage_metrics_and_gates_and_resume_still_skips(tmp_path, tiny_llama):
    recipe_file = tmp_path / "tiny.yaml"
    recipe_file.write_text(RECIPE.format(model=tiny_llama))
    run_recipe(load_recipe(recipe_file), tmp_path / "run")
    prune = ModelCard.load(tmp_path / "run" / "01-prune" / "model" / "README.md")
    half = ModelCard.load(tmp_path / "run" / "02-half" / "model" / "README.md")
    assert prune.data.library_name == "transformers" and prune.data.pipeline_tag == "text-generation"
    assert prune.data.tags == ["slimlm", "pruned"] and half.data.tags == ["slimlm", "pruned", "bfloat16"]
    assert prune.data.base_model is None  # a local teacher has no hub id to name; the body names it
    assert f"from `{tiny_llama}`" in half.text
    assert "1. `prune` (prune): " in half.text and "1. `half` (cast): " in half.text and "dtype=bfloat16" in half.text
    manifest = json.loads((tmp_path / "run" / "01-prune" / "manifest.json").read_text())
    teacher = json.loads((tmp_path / "run" / "00-teacher" / "manifest.json").read_text())
    row = f"| perplexity | {manifest['metrics']['perplexity']:.4g} | {teacher['metrics']['perplexity']:.4g} |"
    assert row in prune.text
    assert "| params <= 1e+06 | " in prune.text and "| pass |" in prune.text
    assert 'AutoModelForCausalLM.from_pretrained("' in prune.text

    # the card is part of the stage folder but not of its digest: a rerun skips, and rewrites it with new verdicts
    state = run_recipe(load_recipe(recipe_file, ["stages.prune.gates.1.max=2000000"]), tmp_path / "run")
    assert state["stages"] == {"teacher": "skipped", "prune": "skipped", "half": "skipped"}
    assert "| params <= 2e+06 | " in (tmp_path / "run" / "01-prune" / "model" / "README.md").read_text()


def test_a_hub_teacher_card_gives_base_model_and_license(tmp_path):
    """base_model is the teacher's hub id; the license is carried from the teacher's own card or GGUF metadata."""
    from slimlm.sources.models import source_facts

    teacher = tmp_path / "teacher"
    teacher.mkdir()
    (teacher / "README.md").write_text("---\nlicense: apache-2.0\n---\n# a model\n")
    assert source_facts("org/model", teacher) == {"base_model": "org/model", "license": "apache-2.0"}
    assert source_facts(str(teacher), teacher) == {"license": "apache-2.0"}
    (teacher / "README.md").write_text("---\n: [\n---\n")  # a card that does not parse says nothing
    assert source_facts(str(teacher), teacher) == {}
