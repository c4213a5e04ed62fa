"""GGUF export: every family's file read back, its tokenizer metadata, the recipe checks and the stage's errors.

These run without llama.cpp: transformers reads each written GGUF back (dequantizing it). The same files in
llama.cpp itself are tests/export/test_gguf_llama_cpp.py (`pytest -m llama`, with the [llama] extra).
"""

from __future__ import annotations

import json

import gguf
import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM

from slimlm.errors import RecipeError
from slimlm.export.gguf_file import tensor_types, write_gguf
from slimlm.export.gguf_runtime import TransformersGGUF
from slimlm.export.onnx_graph import copy_side_files
from slimlm.recipe import load_recipe
from slimlm.runner import run_recipe
from tests.conftest import FAMILIES, STORIES, assert_one_clear_error, build_tiny, needs_shared
from tests.export.test_export import RECIPE as ONNX_RECIPE


def export_gguf(model_dir, out, quantize="f32", teacher_dir=None, **options):
    """model_dir written as out/model.gguf beside its config and tokenizer; returns (out, facts)."""
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    out.mkdir(parents=True, exist_ok=True)
    facts = write_gguf(
        model,
        model_dir,
        teacher_dir or model_dir,
        out / "model.gguf",
        quantize,
        keep_8bit=options.get("keep_8bit", []),
        quantize_embeddings=options.get("quantize_embeddings", True),
        work_dir=out.parent,
        name="tiny",
    )
    copy_side_files(model_dir, out)
    return out, facts


def pytorch_logits(model_dir, ids):
    with torch.inference_mode():
        return AutoModelForCausalLM.from_pretrained(model_dir).eval()(torch.as_tensor(ids)).logits.numpy()


PROMPT = np.random.default_rng(0).integers(3, 512, (2, 48))


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_an_f32_gguf_of_every_family_reads_back_as_the_model_it_came_from(family, tiny_models, tmp_path):
    out, facts = export_gguf(tiny_models[family], tmp_path / "gguf")
    readback = TransformersGGUF(out).logits(PROMPT)
    np.testing.assert_allclose(readback, pytorch_logits(tiny_models[family], PROMPT), atol=1e-4)
    assert set(facts["gguf_types"]) == {"f32"} and facts["tokenizer"]["pre"] == "gpt-2"


def test_a_pruned_shape_with_its_own_head_dim_round_trips(tokenizer_dir, tmp_path):
    """head_dim 32 with 4 heads on a hidden width of 64: no published checkpoint has this shape."""
    model_dir = build_tiny("llama", tokenizer_dir, tmp_path / "pruned", head_dim=32)
    out, _ = export_gguf(model_dir, tmp_path / "gguf")
    fields = gguf.GGUFReader(out / "model.gguf").fields
    assert (
        fields["llama.attention.key_length"].contents() == 32 and fields["llama.rope.dimension_count"].contents() == 32
    )
    np.testing.assert_allclose(TransformersGGUF(out).logits(PROMPT), pytorch_logits(model_dir, PROMPT), atol=1e-4)


@pytest.mark.parametrize("quantize,min_top1", [("bf16", 0.97), ("q8_0", 0.9), ("q4_1", 0.45), ("q4_0", 0.45)])
def test_quantized_types_keep_the_head_at_8_bits_and_track_the_model(quantize, min_top1, tiny_models, tmp_path):
    """A random tiny model's logits are nearly flat, so agreement here is a floor; trained models are in the
    llama.cpp tests."""
    out, facts = export_gguf(tiny_models["llama"], tmp_path / "gguf", quantize)
    top1 = TransformersGGUF(out).logits(PROMPT).argmax(-1) == pytorch_logits(tiny_models["llama"], PROMPT).argmax(-1)
    assert top1.mean() >= min_top1
    types = {t.name: t.tensor_type.name.lower() for t in gguf.GGUFReader(out / "model.gguf").tensors}
    assert types["blk.0.attn_norm.weight"] == "f32"
    assert types["token_embd.weight"] == ("q8_0" if quantize.startswith("q4") else quantize)  # the tied head
    assert types["blk.0.ffn_down.weight"] == quantize
    assert facts["gguf_types"] == tensor_types(out / "model.gguf")


def test_keep_8bit_names_layers_of_a_4_bit_gguf(tiny_models, tmp_path):
    out, _ = export_gguf(tiny_models["llama"], tmp_path / "gguf", "q4_1", keep_8bit=["down_proj", "model.layers.0.*"])
    types = {t.name: t.tensor_type.name.lower() for t in gguf.GGUFReader(out / "model.gguf").tensors}
    assert types["blk.1.ffn_down.weight"] == types["blk.0.attn_q.weight"] == "q8_0"
    assert types["blk.1.attn_q.weight"] == types["blk.1.ffn_up.weight"] == "q4_1"


def test_rows_that_are_not_whole_blocks_are_written_f16_and_said(tokenizer_dir, tmp_path):
    model_dir = build_tiny("llama", tokenizer_dir, tmp_path / "odd", intermediate_size=120)
    out, facts = export_gguf(model_dir, tmp_path / "gguf", "q8_0")
    assert facts["fallbacks"] == [f"blk.{i}.ffn_down.weight (120 wide) as f16" for i in range(4)]
    assert TransformersGGUF(out).logits(PROMPT).shape == (2, 48, 512)


# ---------------------------------------------------------------- the tokenizer


@needs_shared(STORIES)
def test_a_sentencepiece_tokenizer_is_written_as_llamas_vocabulary(tmp_path):
    out, facts = export_gguf(STORIES, tmp_path / "gguf", "f32")
    fields = gguf.GGUFReader(out / "model.gguf").fields
    assert fields["tokenizer.ggml.model"].contents() == "llama" and "pre" not in facts["tokenizer"]
    assert (
        len(fields["tokenizer.ggml.scores"].contents()) == 512 and fields["tokenizer.ggml.bos_token_id"].contents() == 1
    )


def test_a_teacher_read_from_a_gguf_hands_its_tokenizer_metadata_through_unchanged(tiny_models, tmp_path, monkeypatch):
    """GGUF teacher -> slimlm's converted HF copy -> GGUF export: every tokenizer.* field as it was."""
    from slimlm.sources.models import convert_gguf

    monkeypatch.setenv("SLIMLM_CACHE", str(tmp_path / "cache"))
    first, _ = export_gguf(tiny_models["llama"], tmp_path / "first")
    teacher = convert_gguf(first / "model.gguf", status=lambda _: None)
    second, facts = export_gguf(teacher, tmp_path / "second", teacher_dir=teacher)
    assert facts["tokenizer"]["origin"] == "the teacher's GGUF"

    def tokenizer_fields(path):
        return {k: f.contents() for k, f in gguf.GGUFReader(path).fields.items() if k.startswith("tokenizer.")}

    assert tokenizer_fields(second / "model.gguf") == tokenizer_fields(first / "model.gguf")


def test_an_unrecognised_pre_tokenizer_is_named_default_and_said(tokenizer_dir, tmp_path):
    from transformers import AutoTokenizer

    from slimlm.export.gguf_vocab import pre_tokenizer_name

    spec = json.loads((tokenizer_dir / "tokenizer.json").read_text())
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    assert pre_tokenizer_name(tokenizer, spec) == ("gpt-2", True)
    spec["pre_tokenizer"] = {"type": "Whitespace"}
    assert pre_tokenizer_name(tokenizer, spec) == ("default", False)


# ---------------------------------------------------------------- the recipe and the stage

RECIPE = ONNX_RECIPE.split("stages:\n")[0] + "stages:\n{stages}\n"  # the ONNX tests' header, other stages
EXPORT = """\
  - name: gguf
    kind: export
    format: gguf
    {options}
    parity: {{data: eval, max_tokens: 128, seq_len: 32, greedy_steps: 8}}
    gates:
      - {{metric: top1_agreement, min: 0.5}}
      - {{metric: perplexity, max_ratio: 1.5, relative_to: teacher}}
"""


def write_recipe(tmp_path, model, stages=None, options=""):
    path = tmp_path / "r.yaml"
    path.write_text(RECIPE.format(model=model, stages=stages or EXPORT.format(options=options)))
    return path


def test_the_export_stage_writes_a_gated_gguf_that_evaluation_scores(tiny_llama, tmp_path):
    run_recipe(load_recipe(write_recipe(tmp_path, tiny_llama)), tmp_path / "run")
    manifest = json.loads((tmp_path / "run" / "01-gguf" / "manifest.json").read_text())
    m = manifest["metrics"]
    assert manifest["artifact_format"] == "gguf" and manifest["status"] == "done" and "params" not in m
    assert m["gguf_types"] == {"f32": 9, "q8_0": 29} and m["runtime"].startswith(("llama.cpp", "transformers"))
    assert m["top1_agreement"] >= 0.5 and m["perplexity"] > 1 and m["greedy_agreement"] > 0
    folder = tmp_path / "run" / "01-gguf" / "gguf"
    assert {"model.gguf", "config.json", "tokenizer.json"} <= {p.name for p in folder.iterdir()}
    card = (folder / "README.md").read_text()
    assert "library_name: gguf" in card and "- q8_0" in card and "model.gguf" in card


def test_the_type_decides_what_a_format_takes():
    from pydantic import ValidationError

    from slimlm.export.config import ExportConfig

    assert ExportConfig(name="e", kind="export", format="gguf").quantize == "q8_0"
    assert ExportConfig(name="e", kind="export").quantize == "int8"
    for bad, message in [
        ({"format": "gguf", "quantize": "int4"}, "is an ONNX type"),
        ({"quantize": "q4_1"}, "is a GGUF type"),
        ({"format": "gguf", "block_size": 64}, "block_size apply to ONNX exports"),
        ({"format": "gguf", "quantize": "q8_0", "keep_8bit": ["lm_head"]}, "4-bit GGUF types"),
    ]:
        with pytest.raises(ValidationError, match=message):
            ExportConfig(name="e", kind="export", **bad)


def test_a_k_quant_without_llama_cpp_fails_at_plan_time_naming_the_extra(tiny_llama, tmp_path, monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "llama_cpp" else real(name, *a))
    path = write_recipe(tmp_path, tiny_llama, options="quantize: q4_k_m")
    assert_one_clear_error(["plan", path], tmp_path, "pip install 'slimlm[llama]'")


def test_a_k_quant_after_a_prune_that_rounds_to_32_is_refused_at_plan_time(tiny_llama, tmp_path):
    pytest.importorskip("llama_cpp", reason="a K-quant needs llama-cpp-python (the [llama] extra) to plan")
    prune = "  - {name: prune, kind: prune, calibration: eval, target: {params: 0.8}}\n"
    path = write_recipe(tmp_path, tiny_llama, stages=prune + EXPORT.format(options="quantize: q4_k_m"))
    with pytest.raises(RecipeError, match="rounds widths to 32; set round_to: 256 there"):
        load_recipe(path)


@pytest.mark.parametrize(
    "family,overrides,message",
    [
        ("phi3", {"head_dim": 32}, "llama.cpp's phi3 needs heads x head_dim = hidden_size"),
        ("gemma2", {"query_pre_attn_scalar": 64}, "llama.cpp scales it by 16 (head_dim)"),
    ],
)
def test_a_model_llama_cpp_would_compute_differently_is_refused(family, overrides, message, tokenizer_dir, tmp_path):
    model = build_tiny(family, tokenizer_dir, tmp_path / family, **overrides)
    assert_one_clear_error(["run", write_recipe(tmp_path, model), "--run-dir", tmp_path / "run"], tmp_path, message)
    assert not (tmp_path / "run" / "01-gguf" / "gguf").exists()


def test_a_bitsandbytes_input_is_refused_at_plan_time(tiny_llama, tmp_path):
    bnb = "  - {name: nf4, kind: bitsandbytes, bits: 4}\n"
    path = write_recipe(tmp_path, tiny_llama, stages=bnb + EXPORT.format(options=""))
    assert_one_clear_error(["plan", path], tmp_path, "kind export needs a hf artifact, but it follows stage 'nf4'")


def test_slimlm_generate_on_a_gguf_folder_says_where_it_runs(tiny_models, tmp_path):
    out, _ = export_gguf(tiny_models["llama"], tmp_path / "gguf", "q8_0")
    assert_one_clear_error(["generate", out, "def f"], tmp_path, "is a GGUF export, which runs in llama.cpp")


def test_a_full_disk_while_writing_the_gguf_is_one_message_and_keeps_what_was_made(tiny_llama, tmp_path, monkeypatch):
    import errno

    def full_disk(*_):
        raise OSError(errno.ENOSPC, "No space left on device", "model.gguf")

    path = write_recipe(tmp_path, tiny_llama)
    run = tmp_path / "run"
    monkeypatch.setattr(gguf.GGUFWriter, "write_tensors_to_file", full_disk)
    assert_one_clear_error(
        ["run", path, "--run-dir", run], tmp_path, "No space left on device while writing model.gguf", 4
    )
    assert (run / "00-teacher" / "manifest.json").is_file() and not (run / "01-gguf").exists()
