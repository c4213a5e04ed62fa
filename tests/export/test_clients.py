"""The client-parity matrix: every export runs in the real clients edge users load it in.

transformers.js 4 in Node, Optimum's ORTModelForCausalLM in its own environment and onnxruntime-genai's
runtime each decode 24 greedy tokens and score a held-out block. fp32 exports must give PyTorch's greedy
tokens and slimlm generate's; int8 and int4 exports slimlm generate's tokens, and top-1 agreement with
PyTorch as close as slimlm's own runtime gets. A client that is not installed skips with the reason;
`.ci/clients.sh` installs them and CI runs this module after the fast suite (`pytest -m clients`).
"""

from __future__ import annotations

import json
import shutil
import subprocess

import numpy as np
import onnx
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from slimlm.edge import EdgeModel
from slimlm.export.client_layout import prepare_for_clients
from slimlm.export.clients import CLIENTS, clients_home, known_limitation, run_client, unavailable
from slimlm.export.genai import build_genai
from slimlm.export.graph_quantize import quantize_weights
from slimlm.export.onnx_graph import export_onnx
from slimlm.export.stage import linear_weights
from slimlm.sources.text import python_docs
from tests.conftest import FAMILIES, INSTALLED_CLIENTS, STORIES, build_tiny, needs_shared

pytestmark = pytest.mark.clients
STEPS = 24
# onnxruntime-genai's builder (0.18) stops on a Gemma 3 config written by transformers 5 (KeyError 'rope_type')
# What is exported, per model: its formats and precisions. onnxruntime-genai's builder (0.18) stops on a Gemma 3
# config written by transformers 5 (KeyError 'rope_type'), and its attention needs head_dim % 16 == 0, which
# stories260K (head_dim 8) does not have; so those two are exported with the dynamo graph only.
# "pruned" is a tiny Llama shaped as Minitron width pruning leaves one: head_dim x heads (64) != hidden (48).
BOTH, DYNAMO = ("onnx", "onnx-genai"), ("onnx",)
QUANTIZED = ("fp32", "int8", "int4")
EXPORTS = {
    **{family: (DYNAMO if family == "gemma3_text" else BOTH, ("fp32",)) for family in FAMILIES},
    "llama": (BOTH, QUANTIZED),
    "phi3": (BOTH, QUANTIZED),
    "pruned": (BOTH, ("fp32", "int8")),
    "stories260K": (DYNAMO, QUANTIZED),
}


def _finish(model, out):
    prepare_for_clients(out, model.config)  # as the export stage does after writing any graph
    return out


def _exports(name, source, model, root):
    """The exports EXPORTS lists for `name`: each format at fp32, then quantized from it."""
    made = {}
    formats, precisions = EXPORTS[name]
    for fmt in formats:
        fp32 = root / f"{name}-{fmt}-fp32"
        if fmt == "onnx":
            export_onnx(model, source, fp32)
        else:
            build_genai(source, fp32, root / f"{name}-work")
        made[(name, fmt, "fp32")] = _finish(model, fp32)
        for q in precisions[1:]:
            out = root / f"{name}-{fmt}-{q}"
            linears = linear_weights(model) if fmt == "onnx-genai" else None
            quantize_weights(fp32, out, bits=8 if q == "int8" else 4, block_size=16, linears=linears)
            made[(name, fmt, q)] = _finish(model, out)
    return made


@pytest.fixture(scope="module", autouse=True)
def installed_clients():
    """The clients .ci/clients.sh installed (conftest hides them from the fast suite's export stages)."""
    with pytest.MonkeyPatch.context() as patch:
        if INSTALLED_CLIENTS:
            patch.setenv("SLIMLM_CLIENTS", INSTALLED_CLIENTS)
        else:
            patch.delenv("SLIMLM_CLIENTS")
        yield


@pytest.fixture(scope="module")
def matrix(installed_clients, tiny_models, tokenizer_dir, tmp_path_factory):
    """{(model, format, precision): {"dir", "prompt", "score", "torch_greedy", "torch_top1", "edge_greedy",
    "edge_top1", client: result}}, every client run once over all exports."""
    root = tmp_path_factory.mktemp("clients")
    sources = {**tiny_models, "pruned": build_tiny("llama", tokenizer_dir, root / "pruned", hidden_size=48)}
    if STORIES.exists():
        sources["stories260K"] = STORIES
    exports, models = {}, {}
    for name, source in sources.items():
        model = models[name] = AutoModelForCausalLM.from_pretrained(source).eval()
        exports |= _exports(name, source, model, root)
    text = python_docs()[7]
    cells = {}
    for key, path in exports.items():
        model, tokenizer = models[key[0]], AutoTokenizer.from_pretrained(path)
        ids = tokenizer(text)["input_ids"][:64]
        prompt = ids[:8]
        with torch.no_grad():
            torch_greedy = model.generate(
                torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                max_new_tokens=STEPS, do_sample=False,
            )[0, len(prompt):].tolist()  # fmt: skip
            torch_top1 = model(torch.tensor([ids])).logits[0].argmax(-1).tolist()
        edge = EdgeModel(path)
        cells[key] = {
            "dir": str(path),
            "prompt": prompt,
            "score": ids,
            "torch_greedy": torch_greedy,
            "torch_top1": torch_top1,
            "edge_greedy": list(edge.generate_ids(prompt, STEPS)),
            "edge_top1": np.argmax(edge.logits(np.array([ids]))[0], -1).tolist(),
        }
    for client in CLIENTS:
        keys = [k for k in cells if not unavailable(client, cells[k]["dir"])]
        if unavailable(client) or not keys:
            continue
        jobs = [
            {"dir": cells[k]["dir"], "prompt_ids": cells[k]["prompt"], "steps": STEPS, "score_ids": cells[k]["score"]}
            for k in keys
        ]
        for key, result in zip(keys, run_client(client, jobs), strict=True):
            cells[key][client] = result
    return cells


def _cases(precisions):
    return [
        pytest.param(name, fmt, p, client, id=f"{name}-{fmt}-{p}-{client}", marks=needs_shared(STORIES) if name == "stories260K" else ())
        for name, (formats, exported) in EXPORTS.items()
        for fmt in formats
        for p in exported if p in precisions
        for client in CLIENTS
    ]  # fmt: skip


def _cell(matrix, name, fmt, precision, client):
    cell = matrix[(name, fmt, precision)]
    reason = unavailable(client, cell["dir"])
    if reason:
        pytest.skip(f"{client} is not checked here: {reason}")
    result = cell[client]
    limitation = known_limitation(client, cell["dir"])
    if limitation:  # shown by the client, not assumed: it must really fail
        assert "error" in result, f"{client} now takes this export; drop the limitation: {limitation}"
        pytest.xfail(f"{client} cannot take this export: {limitation}")
    assert "error" not in result, result["error"]
    return cell, result


@pytest.mark.parametrize(("name", "fmt", "precision", "client"), _cases(["fp32"]))
def test_an_fp32_export_decodes_pytorchs_greedy_tokens_in_the_client(matrix, name, fmt, precision, client):
    cell, result = _cell(matrix, name, fmt, precision, client)
    assert result["greedy"] == cell["edge_greedy"] == cell["torch_greedy"]
    agreement = np.mean(np.array(result["top1"]) == np.array(cell["torch_top1"]))
    assert agreement >= 0.98, agreement  # fp32 graphs differ from PyTorch only in summation order


@pytest.mark.parametrize(("name", "fmt", "precision", "client"), _cases(["int8", "int4"]))
def test_a_quantized_export_decodes_slimlms_tokens_in_the_client(matrix, name, fmt, precision, client):
    cell, result = _cell(matrix, name, fmt, precision, client)
    assert result["greedy"] == cell["edge_greedy"]
    theirs = np.mean(np.array(result["top1"]) == np.array(cell["torch_top1"]))
    ours = np.mean(np.array(cell["edge_top1"]) == np.array(cell["torch_top1"]))
    assert abs(theirs - ours) <= 1 / len(cell["score"]), (theirs, ours)  # the same graph in the same onnxruntime


def test_without_optimums_axis_names_transformers_js_fails(matrix, tmp_path):
    """The client is what shows compatibility: the dynamo exporter's own batch axis name breaks transformers.js."""
    if unavailable("transformers.js"):
        pytest.skip(unavailable("transformers.js"))
    cell = matrix[("llama", "onnx", "fp32")]
    broken = tmp_path / "broken"
    shutil.copytree(cell["dir"], broken)
    graph = onnx.load(str(broken / "model.onnx"), load_external_data=False)
    for value in [*graph.graph.input, *graph.graph.output]:
        for dim in value.type.tensor_type.shape.dim:
            if dim.dim_param == "batch_size":
                dim.dim_param = "batch"
    onnx.save(graph, str(broken / "model.onnx"))
    job = {"dir": str(broken), "prompt_ids": cell["prompt"], "steps": 4, "score_ids": None}
    assert "Reshape" in run_client("transformers.js", [job])[0].get("error", "")


@pytest.mark.parametrize("name", ["llama", "stories260K"])
def test_the_exported_tokenizer_loads_in_transformers_4_with_the_same_tokens(matrix, name):
    if name == "stories260K" and not STORIES.exists():
        pytest.skip(f"{STORIES} is absent")
    python = clients_home() / "optimum" / "bin" / "python"
    if unavailable("optimum"):
        pytest.skip(unavailable("optimum"))
    texts = ["plain ASCII text.", "accents: café, naïve, Zürich", "emoji: 🤖🚀", "def f(x):\n    return x ** 2\n"]
    export = matrix[(name, "onnx", "fp32")]["dir"]
    code = (
        "import json, sys; from transformers import AutoTokenizer, __version__ as v; "
        "t = AutoTokenizer.from_pretrained(sys.argv[1]); "
        "print(json.dumps([v, type(t).__name__, [t(s)['input_ids'] for s in json.loads(sys.argv[2])]]))"
    )
    proc = subprocess.run([str(python), "-c", code, export, json.dumps(texts)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-2000:]
    version, cls, theirs = json.loads(proc.stdout.strip().splitlines()[-1])
    assert version.startswith("4."), version
    ours = [AutoTokenizer.from_pretrained(export)(s)["input_ids"] for s in texts]
    assert theirs == ours, cls


def test_the_export_stage_records_every_client_in_its_manifest_and_report(tiny_llama, tmp_path):
    from slimlm.recipe import load_recipe
    from slimlm.runner import run_recipe

    missing = [c for c in ("transformers.js", "optimum") if unavailable(c)]
    if missing:
        pytest.skip(f"{', '.join(missing)} not installed: run .ci/clients.sh")
    path = tmp_path / "r.yaml"
    path.write_text(
        f"name: r\nmodel: {tiny_llama}\ndevice: cpu\n"
        "data: {eval: {source: 'builtin:python-docs', split: test, seq_len: 32}}\n"
        "stages:\n  - {name: export, kind: export, format: onnx-genai, quantize: int8,\n"
        "     parity: {data: eval, max_tokens: 64, seq_len: 32, greedy_steps: 8}}\n"
    )
    run_recipe(load_recipe(path), tmp_path / "run")
    clients = json.loads((tmp_path / "run" / "01-export" / "manifest.json").read_text())["metrics"]["clients"]
    assert {c: v["same_greedy_tokens"] for c, v in clients.items()} == dict.fromkeys(CLIENTS, True)
    report = (tmp_path / "run" / "report.md").read_text()
    assert all(f"| {c} | same tokens (8 steps), top-1 agreement" in report for c in CLIENTS)
