"""ONNX export with KV cache on every family, onnxruntime quantization, and the torch-free edge runtime."""

from __future__ import annotations

import json
import re
import subprocess
import sys

import numpy as np
import onnx
import pytest
import torch
from onnx import numpy_helper
from transformers import AutoModelForCausalLM

from slimlm.edge import EdgeModel
from slimlm.errors import PromptTooLong, SourceError
from slimlm.export.clients import unavailable
from slimlm.export.onnx_graph import export_onnx
from slimlm.recipe import load_recipe
from slimlm.runner import run_recipe
from tests.conftest import FAMILIES


@pytest.fixture(scope="module")
def exported(tiny_models, tmp_path_factory):
    """Each family exported once at fp32."""
    root = tmp_path_factory.mktemp("onnx")
    out = {}
    for family, path in tiny_models.items():
        model = AutoModelForCausalLM.from_pretrained(path).eval()
        export_onnx(model, path, root / family)
        out[family] = root / family
    return out


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_fp32_onnx_matches_pytorch_over_prompt_and_cached_decode(family, tiny_models, exported):
    model = AutoModelForCausalLM.from_pretrained(tiny_models[family]).eval()
    assert_decodes_as_pytorch(EdgeModel(exported[family]), model)


def test_the_genai_graph_decodes_in_one_cache_buffer_as_pytorch_does(tiny_models, tmp_path):
    """onnxruntime-genai's graph updates the cache in place (one buffer per layer, bound as input and output)."""
    from slimlm.export.genai import build_genai

    build_genai(tiny_models["llama"], tmp_path / "genai", tmp_path)
    edge = EdgeModel(tmp_path / "genai")
    assert edge.share_buffer and edge.new_cache(1, 8).binding is not None
    assert_decodes_as_pytorch(edge, AutoModelForCausalLM.from_pretrained(tiny_models["llama"]).eval())
    # a batch of two, through the shared buffers and through arrays copied each step: the same logits
    copying = EdgeModel(tmp_path / "genai")
    copying.share_buffer = False
    shared_cache, copied_cache = edge.new_cache(2, 11), copying.new_cache(2, 11)
    ids = np.array([[5, 17, 42, 99, 7, 300, 12, 8], [9, 8, 7, 6, 5, 4, 3, 2]])
    for _ in range(4):
        shared, copied = edge.step(ids, shared_cache), copying.step(ids, copied_cache)
        np.testing.assert_array_equal(shared, copied)
        ids = shared[:, -1:].argmax(-1)
    with pytest.raises(ValueError, match="the cache holds 11 tokens; 11 \\+ 1 do not fit"):
        edge.step(ids, shared_cache)
    # generation stops at the context window (512 positions) rather than allocating a cache past it
    assert len(list(edge.generate_ids(list(range(500)), 10_000))) == 12
    with pytest.raises(PromptTooLong, match="the prompt has 512 tokens and the model's context holds 512"):
        next(edge.generate_ids(list(range(512)), 1))


def assert_decodes_as_pytorch(edge: EdgeModel, model) -> None:
    """Prompt logits without a cache match PyTorch's; so do 16 greedy tokens decoded with the cache, and the logits
    of prompt and tokens together."""
    prompt = [5, 17, 42, 99, 7, 300, 12, 8]
    with torch.no_grad():
        ref = model(input_ids=torch.tensor([prompt])).logits.numpy()
    np.testing.assert_allclose(edge.logits(np.array([prompt])), ref, atol=1e-4, rtol=0)
    with torch.no_grad():
        expected = model.generate(
            torch.tensor([prompt]),
            max_new_tokens=16,
            min_new_tokens=16,
            do_sample=False,
            attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
        )[0, len(prompt) :].tolist()
    edge.eos_ids = set()  # compare all 16 steps even if EOS comes up
    produced = list(edge.generate_ids(prompt, 16))
    assert produced == expected
    with torch.no_grad():
        full = model(input_ids=torch.tensor([prompt + produced])).logits.numpy()
    np.testing.assert_allclose(edge.logits(np.array([prompt + produced])), full, atol=1e-4, rtol=0)


def test_layout_is_what_optimum_expects(exported):
    d = exported["llama"]
    assert {"model.onnx", "config.json", "generation_config.json", "tokenizer.json"} <= {p.name for p in d.iterdir()}
    edge = EdgeModel(d)
    names = [i.name for i in edge.session.get_inputs()]
    assert names[:3] == ["input_ids", "attention_mask", "position_ids"] and "past_key_values.3.value" in names
    assert [o.name for o in edge.session.get_outputs()][:3] == ["logits", "present.0.key", "present.0.value"]


def test_edge_runtime_never_imports_torch(exported):
    code = (
        f"import sys; from slimlm.edge import EdgeModel; m = EdgeModel({str(exported['llama'])!r}); "
        "out = ''.join(m.stream('def f', max_new_tokens=4)); "
        "assert 'torch' not in sys.modules and 'transformers' not in sys.modules, sorted(sys.modules); print('ok')"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stderr


RECIPE = """\
name: tiny
model: {model}
device: cpu
data:
  eval: {{source: "builtin:python-docs", split: test, seq_len: 32}}
evaluation:
  perplexity: {{data: eval, max_tokens: 256}}
stages:
  - name: export
    kind: export
    quantize: {quantize}
    {options}
    parity: {{data: eval, max_tokens: 128, seq_len: 32, greedy_steps: 8}}
    gates:
      - {{metric: top1_agreement, min: {min_agreement}}}
      - {{metric: perplexity, max_ratio: 1.5, relative_to: teacher}}
"""


@pytest.mark.parametrize(
    "quantize,options,min_agreement",
    [
        ("none", "", 0.999),
        ("int8", "", 0.5),
        ("int4", "", 0.3),
        ("int4", "gptq: {data: eval, samples: 2, seq_len: 32}", 0.3),
    ],
)
def test_export_stage_quantizes_and_gates_on_parity(quantize, options, min_agreement, tiny_llama, tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text(RECIPE.format(model=tiny_llama, quantize=quantize, options=options, min_agreement=min_agreement))
    run_recipe(load_recipe(path), tmp_path / "run")
    manifest = json.loads((tmp_path / "run" / "01-export" / "manifest.json").read_text())
    m = manifest["metrics"]
    assert manifest["artifact_format"] == "onnx" and m["perplexity"] > 1 and "params" not in m
    if quantize == "none":
        assert m["max_logit_diff"] < 1e-4 and m["greedy_agreement"] == 1.0
    graph = onnx.load(str(tmp_path / "run" / "01-export" / "onnx" / "model.onnx"))
    weight_bytes = sum(numpy_helper.to_array(t).nbytes for t in graph.graph.initializer)
    fp32_bytes = sum(p.numel() * 4 for p in AutoModelForCausalLM.from_pretrained(tiny_llama).parameters())
    if quantize != "none":  # (the graph itself is large next to a tiny model's weights; compare the weights)
        assert weight_bytes < {"int8": 0.35, "int4": 0.25}[quantize] * fp32_bytes
    ops = {n.op_type for n in graph.graph.node}
    assert ("MatMulNBits" in ops) == (quantize != "none") and ("GatherBlockQuantized" in ops) == (quantize != "none")


def test_int4_keeps_the_named_linear_layers_at_8_bits(exported, tiny_models, tmp_path):
    from slimlm.export.graph_quantize import linear_layers, quantize_weights

    model = AutoModelForCausalLM.from_pretrained(tiny_models["llama"])
    linears = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)]
    # Every Linear is found in the graph under its Hugging Face name.
    layers = linear_layers(onnx.load(str(exported["llama"] / "model.onnx")))
    assert sorted(layers.values()) == sorted(linears)
    quantize_weights(exported["llama"], tmp_path, bits=4, keep_8bit=["lm_head", "model.layers.1.mlp.*"])
    graph = onnx.load(str(tmp_path / "model.onnx"))
    bits = {
        layers[name.removesuffix("_Q8").removesuffix("_Q4")]: next(a.i for a in n.attribute if a.name == "bits")
        for n in graph.graph.node
        if n.op_type == "MatMulNBits"
        for name in n.name.split("+")  # layers merged into one kernel (see the next test)
    }
    eight = {"lm_head", "model.layers.1.mlp.gate_proj", "model.layers.1.mlp.up_proj", "model.layers.1.mlp.down_proj"}
    assert bits == {name: 8 if name in eight else 4 for name in linears}
    # ...and the layers kept at 8 bits bring the logits closer to fp32 than all-4-bit does.
    quantize_weights(exported["llama"], tmp_path / "all4", bits=4)
    size = (tmp_path / "all4" / "model.onnx.data").stat().st_size
    quantize_weights(exported["llama"], tmp_path / "all4", bits=4)  # again, into the same folder: replaced
    assert (tmp_path / "all4" / "model.onnx.data").stat().st_size == size
    ids = np.array([[1, 5, 9, 2, 7, 11, 3, 4]])
    ref = model(torch.tensor(ids)).logits.detach().numpy()
    mixed, all4 = (np.abs(EdgeModel(d).logits(ids) - ref).mean() for d in (tmp_path, tmp_path / "all4"))
    assert mixed < all4


def test_layers_that_read_one_input_at_one_bit_width_run_as_one_kernel(exported, tiny_models, tmp_path):
    from slimlm.export.graph_quantize import linear_layers, quantize_weights

    layers = linear_layers(onnx.load(str(exported["llama"] / "model.onnx")))
    for d, merge in (("merged", True), ("separate", False)):
        quantize_weights(exported["llama"], tmp_path / d, bits=4, keep_8bit=["k_proj"], merge=merge)
    graph = onnx.load(str(tmp_path / "merged" / "model.onnx")).graph
    merged_layers = [
        [layers[name.removesuffix("_Q8").removesuffix("_Q4")] for name in n.name.split("+")]
        for n in graph.node
        if n.op_type == "MatMulNBits"
    ]
    kernels = {tuple(n.split(".")[-1] for n in names) for names in merged_layers if "layers.0." in names[0]}
    # k is at 8 bits, so q and v merge without it; gate and up merge; o and down read inputs of their own
    assert kernels == {("q_proj", "v_proj"), ("k_proj",), ("o_proj",), ("gate_proj", "up_proj"), ("down_proj",)}
    ids = np.array([[1, 5, 9, 2, 7, 11, 3, 4]])
    merged, separate = (EdgeModel(tmp_path / d) for d in ("merged", "separate"))
    np.testing.assert_array_equal(merged.logits(ids), separate.logits(ids))
    assert list(merged.generate_ids([1, 5, 9], 8)) == list(separate.generate_ids([1, 5, 9], 8))


def test_embeddings_at_8_bits_are_closer_to_fp32_than_at_4(exported, tiny_models, tmp_path):
    from slimlm.export.graph_quantize import quantize_weights

    model = AutoModelForCausalLM.from_pretrained(tiny_models["llama"])
    ids = np.array([[1, 5, 9, 2, 7, 11, 3, 4]])
    ref = model(torch.tensor(ids)).logits.detach().numpy()
    error = {}
    for bits in (4, 8):
        quantize_weights(exported["llama"], tmp_path / str(bits), bits=8, embedding_bits=bits)
        graph = onnx.load(str(tmp_path / str(bits) / "model.onnx"))
        [gather] = [n for n in graph.graph.node if n.op_type == "GatherBlockQuantized"]
        assert next((a.i for a in gather.attribute if a.name == "bits"), 4) == bits
        error[bits] = np.abs(EdgeModel(tmp_path / str(bits)).logits(ids) - ref).mean()
    assert error[8] < 0.5 * error[4]


@pytest.mark.parametrize("family,bits,keep_8bit", [("llama", 8, []), ("llama", 4, ["lm_head"]), ("phi3", 8, [])])
def test_a_tied_embedding_reads_the_quantized_head_instead_of_a_copy(
    family, bits, keep_8bit, exported, tiny_models, tmp_path
):
    from slimlm.export.graph_quantize import quantize_weights

    model = AutoModelForCausalLM.from_pretrained(tiny_models[family])
    tied = model.config.tie_word_embeddings
    quantize_weights(exported[family], tmp_path / "default", bits=bits, keep_8bit=keep_8bit)
    graph = onnx.load(str(tmp_path / "default" / "model.onnx")).graph
    [gather] = [n for n in graph.node if n.op_type == "GatherBlockQuantized"]
    [head] = [n for n in graph.node if n.op_type == "MatMulNBits" and "logits" in n.output]
    producers = {out: n for n in graph.node for out in n.output}
    if tied:  # the table is a view of the head's blocks, at the head's 8 bits: no table of its own
        assert producers[gather.input[0]].op_type == "Reshape" and producers[gather.input[0]].input[0] == head.input[1]
        assert gather.input[2] == head.input[2] and next(a.i for a in gather.attribute if a.name == "bits") == 8
    else:  # an untied table is quantized on its own, to 4 bits by default
        assert gather.input[0] in {t.name for t in graph.initializer}
        assert next((a.i for a in gather.attribute if a.name == "bits"), 4) == 4
    # A shared lookup reads the right rows: about as close to fp32 as with the table left at fp32, in far fewer bytes.
    quantize_weights(exported[family], tmp_path / "fp32", bits=bits, keep_8bit=keep_8bit, embeddings=False)
    ids = np.array([[1, 5, 9, 2, 7, 11, 3, 4]])
    ref = model(torch.tensor(ids)).logits.detach().numpy()
    error = {d: np.abs(EdgeModel(tmp_path / d).logits(ids) - ref).mean() for d in ("default", "fp32")}
    assert error["default"] < 1.5 * error["fp32"] or not tied  # (a 4-bit table costs more than 1.5x)
    size = {d: (tmp_path / d / "model.onnx.data").stat().st_size for d in ("default", "fp32")}
    assert size["default"] < 0.7 * size["fp32"]


@pytest.mark.parametrize("family", ["llama", "phi3"])  # a tied head, and phi3's fused qkv and gate_up layers
def test_the_genai_graph_is_quantized_as_the_dynamo_graph_is(family, exported, tiny_models, tmp_path):
    """onnxruntime-genai's builder names nodes its own way; its MatMuls are matched to Linear layers by weight,
    so GPTQ codes, keep_8bit and the shared tied table land where they do in the dynamo graph."""
    from slimlm.export.genai import build_genai
    from slimlm.export.graph_quantize import linear_layers, quantize_weights
    from slimlm.export.stage import linear_weights
    from slimlm.quantize.gptq import gptq

    model = AutoModelForCausalLM.from_pretrained(tiny_models[family]).eval()
    weights = linear_weights(model)
    build_genai(tiny_models[family], tmp_path / "fp32", tmp_path)
    fp32 = onnx.load(str(tmp_path / "fp32" / "model.onnx"))
    layers = linear_layers(fp32, weights)
    # every Linear found, and every MatMul of a weight (phi3's qkv_proj and gate_up_proj as row runs) named
    assert set(layers.values()) == set(weights)
    constants = {t.name for t in fp32.graph.initializer}
    assert len(layers) == sum(n.op_type == "MatMul" and n.input[1] in constants for n in fp32.graph.node)
    keep = ["lm_head", "down_proj"]
    codes = gptq(model, torch.randint(0, model.config.vocab_size, (4, 32)), skip=keep, bits=4, block_size=16)
    options = dict(bits=4, block_size=16, keep_8bit=keep, prequantized=codes)
    quantize_weights(tmp_path / "fp32", tmp_path / "genai", **options, linears=weights)
    quantize_weights(exported[family], tmp_path / "dynamo", **options)
    graph = onnx.load(str(tmp_path / "genai" / "model.onnx")).graph
    # every weight quantized, the table included: a tied one reads the head's blocks, with no transposed fp32 copy
    constants = {t.name for t in graph.initializer}
    assert not [n.name for n in graph.node if n.op_type == "MatMul" and n.input[1] in constants]
    assert not [n.name for n in graph.node if n.op_type in ("Gather", "Transpose") and n.input[0] in constants]
    assert [n.op_type for n in graph.node].count("GatherBlockQuantized") == 1
    # The same quantized model in two graphs: they differ far less than either differs from fp32 (the kernels
    # quantize activations and sum in their own order, which depends on how the graph splits a layer).
    ids = np.array([[1, 5, 9, 2, 7, 11, 3, 4]])
    genai, dynamo = (EdgeModel(tmp_path / d).logits(ids) for d in ("genai", "dynamo"))
    ref = model(torch.tensor(ids)).logits.detach().numpy()
    assert np.abs(genai - dynamo).mean() < 0.1 * np.abs(dynamo - ref).mean()
    # ...and the same weight bytes (the genai graph also stores its rotary cos/sin tables)
    stored = {
        d: sum(
            numpy_helper.to_array(t).nbytes
            for t in onnx.load(str(tmp_path / d / "model.onnx")).graph.initializer
            if t.name not in ("cos_cache", "sin_cache") and np.prod(t.dims) > model.config.hidden_size
        )
        for d in ("genai", "dynamo")
    }
    assert stored["genai"] == stored["dynamo"]


def test_exporting_a_bitsandbytes_model_is_refused(tiny_llama, tmp_path):
    import shutil

    from slimlm.export.checks import refuse_quantized_input
    from slimlm.export.config import ExportConfig

    quantized = tmp_path / "q"
    shutil.copytree(tiny_llama, quantized)
    cfg = json.loads((quantized / "config.json").read_text())
    cfg["quantization_config"] = {"quant_method": "bitsandbytes"}
    (quantized / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(SourceError, match="bitsandbytes-quantized; export from the full-precision stage"):
        refuse_quantized_input(ExportConfig(name="export", kind="export"), quantized)


def test_generate_command_streams_without_torch(exported):
    code = (
        "import sys; from slimlm.cli import app; "
        f"app(['generate', {str(exported['llama'])!r}, 'def f', '--max-new-tokens', '3'], standalone_mode=False); "
        "assert 'torch' not in sys.modules, 'torch imported'"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("def f") and "tokens/s" in proc.stderr


def test_generate_refuses_a_prompt_longer_than_the_context_in_one_line(exported):
    proc = subprocess.run(
        [sys.executable, "-m", "slimlm", "generate", str(exported["llama"]), "word " * 600],
        capture_output=True,
        text=True,
    )
    assert proc.returncode != 0 and "Traceback" not in proc.stderr
    assert re.search(r"the prompt has \d+ tokens and the model's context holds 512; shorten the prompt", proc.stderr)


def test_onnxruntime_genai_format_builds_and_runs_on_the_edge_runtime(tiny_llama, tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text(
        RECIPE.format(model=tiny_llama, quantize="int4", options="", min_agreement=0.3).replace(
            "    quantize: int4", "    quantize: int4\n    format: onnx-genai"
        )
    )
    run_recipe(load_recipe(path), tmp_path / "run")
    out = tmp_path / "run" / "01-export" / "onnx"
    assert (out / "genai_config.json").is_file()
    m = json.loads((tmp_path / "run" / "01-export" / "manifest.json").read_text())["metrics"]
    assert m["top1_agreement"] >= 0.3 and m["perplexity"] > 1
    # its own runtime (in-process) was checked; the others are not installed for the fast suite (see conftest)
    assert m["clients"]["onnxruntime-genai"]["same_greedy_tokens"] is True
    assert m["clients"]["transformers.js"] == {"checked": False, "reason": unavailable("transformers.js")}
    report = (tmp_path / "run" / "report.md").read_text()
    assert "| onnxruntime-genai | same tokens (8 steps), top-1 agreement" in report
    assert "| transformers.js | not checked (" in report
    # the export's model card names the clients as the stage found them, and claims none it did not check
    from huggingface_hub import ModelCard

    card = ModelCard.load(out / "README.md")
    assert card.data.library_name == "onnx" and {"onnx", "onnxruntime-genai", "int4"} <= set(card.data.tags)
    assert "- onnxruntime-genai: same tokens (8 steps)" in card.text
    assert "- transformers.js: not checked (" in card.text and "- optimum: not checked (" in card.text
    assert f"slimlm generate {out}" in card.text


def test_onnxruntime_genai_refuses_head_dim_not_divisible_by_16(tokenizer_dir, tmp_path):
    from slimlm.errors import UnsupportedModelError
    from tests.conftest import build_tiny

    model = build_tiny("llama", tokenizer_dir, tmp_path / "hd8", head_dim=8)
    path = tmp_path / "r.yaml"
    path.write_text(
        RECIPE.format(model=model, quantize="int4", options="", min_agreement=0.3).replace(
            "    quantize: int4", "    quantize: int4\n    format: onnx-genai"
        )
    )
    with pytest.raises(UnsupportedModelError, match="needs head_dim divisible by 16, and this model's is 8"):
        run_recipe(load_recipe(path), tmp_path / "run")
