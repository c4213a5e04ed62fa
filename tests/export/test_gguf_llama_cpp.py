"""GGUF exports run in llama.cpp itself (llama-cpp-python): logits, greedy tokens, tokenization, K-quants.

`pytest -m llama`, after installing the [llama] extra; CI runs them after the fast suite. Without
llama-cpp-python they skip, saying so.
"""

from __future__ import annotations

import json

import gguf
import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from slimlm.export.gguf_runtime import LlamaCppModel
from slimlm.export.gguf_stage import TOKENIZER_PROBES
from slimlm.recipe import load_recipe
from slimlm.runner import run_recipe
from tests.conftest import FAMILIES, STORIES, build_tiny, needs_shared
from tests.export.test_gguf import EXPORT, export_gguf, pytorch_logits, write_recipe

pytestmark = [
    pytest.mark.llama,
    pytest.mark.skipif(
        __import__("importlib").util.find_spec("llama_cpp") is None,
        reason="llama-cpp-python is not installed (pip install -e '.[llama]')",
    ),
]
PROMPT = np.random.default_rng(1).integers(3, 512, (1, 48))


def in_llama_cpp(out, **kw) -> LlamaCppModel:
    return LlamaCppModel(out, context=128, threads=2, **kw)


def greedy(model_dir, prompt: list[int], steps: int) -> list[int]:
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    ids = torch.tensor([prompt])
    out = model.generate(
        ids, attention_mask=torch.ones_like(ids), max_new_tokens=steps, min_new_tokens=steps, do_sample=False
    )
    return out[0, len(prompt) :].tolist()


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_an_f32_gguf_of_every_family_computes_pytorchs_logits_and_greedy_tokens_in_llama_cpp(
    family, tiny_models, tmp_path
):
    out, _ = export_gguf(tiny_models[family], tmp_path / "gguf")
    # Gemma's MLP is GELU, which llama.cpp's CPU backend reads from a table indexed by the input rounded to fp16
    # (GGML_GELU_FP16 in ggml-cpu/vec.h): 1.2e-3 measured on one logit of 24,576; every other family is within 2e-6
    tolerance = 2e-3 if family.startswith("gemma") else 1e-3
    with in_llama_cpp(out, f32_cache=True) as runtime:  # llama.cpp's default f16 cache would round the keys and values
        np.testing.assert_allclose(runtime.logits(PROMPT), pytorch_logits(tiny_models[family], PROMPT), atol=tolerance)
        prompt = PROMPT[0, :16].tolist()
        assert list(runtime.generate_ids(prompt, 16)) == greedy(tiny_models[family], prompt, 16)


def test_a_pruned_shape_with_its_own_head_dim_runs_in_llama_cpp(tokenizer_dir, tmp_path):
    model_dir = build_tiny(
        "qwen3", tokenizer_dir, tmp_path / "pruned", head_dim=32, num_attention_heads=6, num_key_value_heads=3
    )
    out, _ = export_gguf(model_dir, tmp_path / "gguf")
    with in_llama_cpp(out, f32_cache=True) as runtime:
        np.testing.assert_allclose(runtime.logits(PROMPT), pytorch_logits(model_dir, PROMPT), atol=1e-3)


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_q8_0_tracks_the_model_in_llama_cpp(family, tiny_models, tmp_path):
    """A random tiny model's logits are nearly flat (top-1 margins of hundredths), so 8-bit rounding flips 3 to 11%
    of its argmaxes (0.90 to 0.96 measured); a trained model is below (stories260K, >= 0.97) and in
    benchmarks/export.py."""
    out, _ = export_gguf(tiny_models[family], tmp_path / "gguf", "q8_0")
    with in_llama_cpp(out) as runtime:
        top1 = runtime.logits(PROMPT).argmax(-1) == pytorch_logits(tiny_models[family], PROMPT).argmax(-1)
    assert top1.mean() >= 0.85


@needs_shared(STORIES)
@pytest.mark.parametrize("quantize,min_top1", [("q8_0", 0.97), ("q4_1", 0.8)])
def test_a_trained_models_quantized_gguf_agrees_with_it_in_llama_cpp(quantize, min_top1, tmp_path):
    out, _ = export_gguf(STORIES, tmp_path / "gguf", quantize)
    tokens = AutoTokenizer.from_pretrained(STORIES)(
        "Once upon a time, there was a little girl named Lily. " * 8
    ).input_ids
    ids = np.array([tokens[:96]])
    with in_llama_cpp(out) as runtime:
        top1 = runtime.logits(ids).argmax(-1) == pytorch_logits(STORIES, ids).argmax(-1)
    assert top1.mean() >= min_top1


@pytest.mark.parametrize(
    "model", ["tiny byte-level BPE", pytest.param("stories260K SentencePiece", marks=needs_shared(STORIES))]
)
def test_llama_cpp_tokenizes_as_the_hf_tokenizer_does(model, tiny_models, tmp_path):
    model_dir = tiny_models["llama"] if model.startswith("tiny") else STORIES
    out, _ = export_gguf(model_dir, tmp_path / "gguf")
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    with in_llama_cpp(out) as runtime:
        for text in TOKENIZER_PROBES:
            assert runtime.tokenize(text) == tokenizer.encode(text, add_special_tokens=False), text


@pytest.mark.parametrize(
    "quantize,block_type,min_top1", [("q4_k_m", "q4_k", 0.35), ("q5_k_m", "q5_k", 0.6), ("q6_k", "q6_k", 0.7)]
)
def test_llama_cpps_quantizer_makes_the_k_quant_mixes(quantize, block_type, min_top1, tokenizer_dir, tmp_path):
    """Floors for a random model's nearly flat logits (measured: 0.42, 0.75, 0.81; q4_1 0.40, q8_0 0.92)."""
    wide = dict(hidden_size=256, intermediate_size=512, head_dim=64, num_attention_heads=4, num_key_value_heads=2)
    model_dir = build_tiny("llama", tokenizer_dir, tmp_path / "wide", **wide)
    out, facts = export_gguf(model_dir, tmp_path / "gguf", quantize)
    assert block_type in facts["gguf_types"] and "f16" not in facts["gguf_types"]
    with in_llama_cpp(out) as runtime:
        top1 = runtime.logits(PROMPT).argmax(-1) == pytorch_logits(model_dir, PROMPT).argmax(-1)
    assert top1.mean() >= min_top1


def test_the_export_stage_measures_its_gguf_in_llama_cpp_and_evaluates_it_there(tiny_llama, tmp_path):
    path = write_recipe(tmp_path, tiny_llama)
    path.write_text(
        path.read_text().replace(
            "perplexity: {data: eval, max_tokens: 256}",
            "perplexity: {data: eval, max_tokens: 256}\n  speed: {prompt_tokens: 16, new_tokens: 8}",
        )
    )
    run_recipe(load_recipe(path), tmp_path / "run")
    m = json.loads((tmp_path / "run" / "01-gguf" / "manifest.json").read_text())["metrics"]
    assert m["runtime"] == "llama.cpp" and m["tokenizer_match"] == 1.0 and m["top1_agreement"] >= 0.5
    assert m["speed"]["decode_tokens_per_s"] > 0 and "decode_tokens_per_s_b4" not in m["speed"]


@needs_shared(STORIES)
@pytest.mark.xfail(strict=True, reason="llama.cpp's SentencePiece tokenizer splits leading spaces unlike HF's")
def test_llama_cpp_tokenizes_leading_spaces_of_a_sentencepiece_vocabulary_as_hf_does(tmp_path):
    """Not matched yet: "  leading" (and " leading") tokenize differently in llama.cpp and in HF's fast tokenizer
    (which itself differs from the sentencepiece library on runs of spaces). Strict: it fails once they agree."""
    out, _ = export_gguf(STORIES, tmp_path / "gguf")
    with in_llama_cpp(out) as runtime:
        text = "  leading spaces,   runs   of spaces"
        assert runtime.tokenize(text) == AutoTokenizer.from_pretrained(STORIES).encode(text, add_special_tokens=False)


def test_a_k_quant_of_rows_that_are_not_multiples_of_256_is_refused_before_writing(tiny_llama, tmp_path):
    from tests.conftest import assert_one_clear_error

    path = write_recipe(tmp_path, tiny_llama, stages=EXPORT.format(options="quantize: q4_k_m"))
    assert_one_clear_error(["run", path, "--run-dir", tmp_path / "run"], tmp_path, "are not a multiple of 256 wide")


def test_greedy_decoding_reads_the_last_logits_whether_or_not_every_position_is_kept(tiny_models, tmp_path):
    """llama-cpp-python fills `scores` only with logits_all; the speed measurement decodes without it."""
    out, _ = export_gguf(tiny_models["llama"], tmp_path / "gguf")
    prompt = PROMPT[0, :8].tolist()
    tokens = []
    for logits_all in (True, False):
        with in_llama_cpp(out, logits_all=logits_all) as runtime:
            tokens.append(list(runtime.generate_ids(prompt, 12)))
    assert tokens[0] == tokens[1] == greedy(tiny_models["llama"], prompt, 12)


@pytest.mark.parametrize(
    "family,rope",
    [
        (
            "llama",
            {
                "rope_type": "llama3",
                "factor": 8.0,
                "low_freq_factor": 1.0,
                "high_freq_factor": 4.0,
                "original_max_position_embeddings": 64,
                "rope_theta": 10000.0,
            },
        ),
        ("llama", {"rope_type": "linear", "factor": 4.0, "rope_theta": 10000.0}),
        ("qwen2", {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 128, "rope_theta": 10000.0}),
    ],
    ids=["llama3", "linear", "yarn"],
)
def test_rope_scaling_is_what_llama_cpp_computes(family, rope, tokenizer_dir, tmp_path):
    model_dir = build_tiny(family, tokenizer_dir, tmp_path / "model", rope_parameters=rope)
    out, _ = export_gguf(model_dir, tmp_path / "gguf")
    reader = gguf.GGUFReader(out / "model.gguf")
    if rope["rope_type"] == "llama3":  # frequency factors as a tensor
        assert "rope_freqs.weight" in {t.name for t in reader.tensors}
    else:
        assert reader.fields[f"{family}.rope.scaling.type"].contents() == rope["rope_type"]
    with in_llama_cpp(out, f32_cache=True) as runtime:
        np.testing.assert_allclose(runtime.logits(PROMPT), pytorch_logits(model_dir, PROMPT), atol=1e-3)


def test_a_sequence_longer_than_the_llama_cpp_context_is_one_message(tiny_models, tmp_path):
    from slimlm.errors import RecipeError

    out, _ = export_gguf(tiny_models["llama"], tmp_path / "gguf")
    with in_llama_cpp(out) as runtime, pytest.raises(RecipeError, match="longer than the 128-token llama.cpp context"):
        runtime.logits(np.zeros((1, 200), dtype=np.int64))


def test_a_k_quant_after_a_depth_only_prune_plans(tiny_llama, tmp_path):
    """Dropping layers leaves every width as it was, so the prune's round_to does not constrain the K-quant."""
    prune = "  - {name: prune, kind: prune, calibration: eval, target: {layers: 3}}\n"
    load_recipe(write_recipe(tmp_path, tiny_llama, stages=prune + EXPORT.format(options="quantize: q4_k_m")))
