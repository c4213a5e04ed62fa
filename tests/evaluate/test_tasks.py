"""lm-eval tasks (local, built from data), the ONNX evaluation path, teacher agreement and speed."""

from __future__ import annotations

import json
import random

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from slimlm.errors import StageFailed
from slimlm.evaluate.agreement import teacher_agreement
from slimlm.evaluate.exported_model import ExportedCausalLM
from slimlm.evaluate.perplexity import torch_logits
from slimlm.evaluate.spec import LmEvalSpec, SpeedEval, TaskSpec
from slimlm.evaluate.speed import measure_speed
from slimlm.evaluate.tasks import continuation_examples, run_tasks, write_local_tasks
from slimlm.export.onnx_graph import export_onnx
from slimlm.sources.specs import DataSpec
from slimlm.sources.text import DataStore

MC_TEMPLATES = {"text": "{{question}}", "choices": "{{options}}", "target": "{{answer}}"}


def single_token_words(tokenizer, context: str) -> list[tuple[str, int]]:
    """Words that lm-eval will score as exactly one token after `context` (with its space delimiter)."""
    base = tokenizer.encode(context, add_special_tokens=False)
    words = []
    for token_id in range(len(tokenizer)):
        word = tokenizer.decode([token_id])
        if not word.startswith(" ") or not word[1:].isalpha():
            continue
        if tokenizer.encode(context + word, add_special_tokens=False) == base + [token_id]:
            words.append((word[1:], token_id))
    return words


@pytest.fixture(scope="module")
def certain_task(tiny_models, tmp_path_factory):
    """Questions whose gold answer is, by construction, the choice the tiny model itself scores highest."""
    path = tiny_models["llama"]
    model = AutoModelForCausalLM.from_pretrained(path).eval()
    tokenizer = AutoTokenizer.from_pretrained(path)
    rng = random.Random(0)
    rows = []
    for context in ["The function returns", "A module is", "Each object has", "The loop will", "When the file"]:
        candidates = rng.sample(single_token_words(tokenizer, context), 4)
        ids = torch.tensor([tokenizer.encode(context, add_special_tokens=False)])
        with torch.no_grad():
            logprobs = torch.log_softmax(model(ids).logits[0, -1], -1)
        best = max(range(4), key=lambda i: logprobs[candidates[i][1]].item())
        rows.append({"question": context, "options": [w for w, _ in candidates], "answer": best})
    assert len({r["answer"] for r in rows}) > 1, "gold answers should not all sit at one index"
    file = tmp_path_factory.mktemp("task") / "certain.jsonl"
    file.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return file


def lm_eval_spec(file, **extra) -> LmEvalSpec:
    return LmEvalSpec(tasks=[TaskSpec(name="certain", file=str(file), **MC_TEMPLATES, **extra)], batch_size=4)


def test_a_task_made_certain_for_the_model_scores_one_and_its_inverse_zero(certain_task, tiny_llama, tmp_path):
    model = AutoModelForCausalLM.from_pretrained(tiny_llama).eval()
    tokenizer = AutoTokenizer.from_pretrained(tiny_llama)
    spec = lm_eval_spec(certain_task)
    write_local_tasks(spec, None, tmp_path / "tasks")
    metrics = run_tasks(model, tokenizer, spec, tmp_path / "tasks")["certain"]
    assert metrics["acc"] == 1.0
    assert metrics["samples"] == 5 and metrics["chance"] == pytest.approx(0.25)
    # The same questions with the gold index moved off the model's favourite: accuracy 0, so the score is not a constant.
    rows = [json.loads(line) for line in certain_task.read_text().splitlines()]
    wrong = tmp_path / "wrong.jsonl"
    wrong.write_text("".join(json.dumps({**r, "answer": (r["answer"] + 1) % 4}) + "\n" for r in rows))
    spec = LmEvalSpec(tasks=[TaskSpec(name="wrong", file=str(wrong), **MC_TEMPLATES)], batch_size=4)
    write_local_tasks(spec, None, tmp_path / "tasks")
    assert run_tasks(model, tokenizer, spec, tmp_path / "tasks")["wrong"]["acc"] == 0.0


def test_the_onnx_path_scores_like_pytorch_for_an_fp32_export(certain_task, tiny_llama, tmp_path):
    model = AutoModelForCausalLM.from_pretrained(tiny_llama).eval()
    tokenizer = AutoTokenizer.from_pretrained(tiny_llama)
    export_onnx(model, tiny_llama, tmp_path / "onnx")
    onnx_model = ExportedCausalLM(tmp_path / "onnx")
    docs = DataStore({"docs": DataSpec(source="builtin:python-docs", split="test")})
    spec = LmEvalSpec(
        tasks=[
            TaskSpec(name="certain", file=str(certain_task), **MC_TEMPLATES),
            TaskSpec(name="cloze", data="docs", limit=12),
            TaskSpec(name="docs_ppl", data="docs", type="perplexity", limit=3),
        ],
        batch_size=4,
    )
    write_local_tasks(spec, docs, tmp_path / "tasks")
    torch_scores = run_tasks(model, tokenizer, spec, tmp_path / "tasks")
    onnx_scores = run_tasks(onnx_model, tokenizer, spec, tmp_path / "tasks")
    assert onnx_scores["certain"]["acc"] == 1.0
    assert onnx_scores["cloze"]["acc"] == torch_scores["cloze"]["acc"]
    assert onnx_scores["cloze"]["acc_norm"] == torch_scores["cloze"]["acc_norm"]
    for metric in ("word_perplexity", "bits_per_byte"):
        assert onnx_scores["docs_ppl"][metric] == pytest.approx(torch_scores["docs_ppl"][metric], rel=1e-4)
    # and the perplexity/agreement logits path: an fp32 export agrees with its parent
    blocks = torch.randint(0, len(tokenizer), (2, 24))
    agreement = teacher_agreement(torch_logits(onnx_model), torch_logits(model), blocks)
    assert agreement["top1"] == 1.0 and agreement["kl"] < 1e-6


def test_cloze_questions_from_text_are_deterministic_and_well_formed():
    docs = [" ".join(f"w{d}_{i}" for i in range(130)) for d in range(4)]
    task = TaskSpec(name="cloze", data="docs", context_words=10, continuation_words=3, num_choices=4)
    first, again = continuation_examples(docs, task), continuation_examples(docs, task)
    assert first == again and len(first) == 4 * 10  # 130 words -> 10 passages of 13 per document
    for example in first:
        gold = example["choices"][example["gold"]].split()
        last = example["context"].split()[-1]
        doc, i = last[1:].split("_")
        assert gold[0] == f"w{doc}_{int(i) + 1}"  # the true continuation follows the context
        assert len(set(example["choices"])) == 4
    assert len({e["gold"] for e in first}) > 1


def test_agreement_of_a_model_with_itself_and_with_another(tiny_models):
    a = AutoModelForCausalLM.from_pretrained(tiny_models["llama"]).eval()
    b = AutoModelForCausalLM.from_pretrained(tiny_models["llama"]).eval()
    with torch.no_grad():
        b.model.layers[0].mlp.down_proj.weight.mul_(-3.0)
    blocks = torch.randint(0, a.config.vocab_size, (3, 16))
    same = teacher_agreement(torch_logits(a), torch_logits(a), blocks, batch_size=2)
    assert same == {"top1": 1.0, "kl": pytest.approx(0.0, abs=1e-6), "tokens": 48, "max_logit_diff": 0.0}
    other = teacher_agreement(torch_logits(b), torch_logits(a), blocks, batch_size=2)
    assert other["top1"] < 1.0 and other["kl"] > 1e-4


def test_speed_is_measured_in_a_child_process_for_pytorch_and_onnx(tiny_llama, tmp_path):
    model = AutoModelForCausalLM.from_pretrained(tiny_llama).eval()
    export_onnx(model, tiny_llama, tmp_path / "onnx")
    spec = SpeedEval(prompt_tokens=16, new_tokens=4, batch_size=2, repeats=2)
    for path in (tiny_llama, tmp_path / "onnx"):
        figures = measure_speed(path, spec, dtype="float32", device="cpu", trust_remote_code=False)
        for key in ("prefill_tokens_per_s", "decode_tokens_per_s", "prefill_tokens_per_s_b2", "decode_tokens_per_s_b2"):
            assert figures[key] > 0, (path, key)
        assert figures["peak_memory_bytes"] > 50e6  # a Python process with torch or onnxruntime loaded


def test_an_lm_eval_failure_is_one_message_with_the_fix(tiny_llama, tmp_path, monkeypatch):
    import lm_eval

    def offline(**kwargs):
        raise ConnectionError("Couldn't reach 'allenai/ai2_arc' on the Hub")

    monkeypatch.setattr(lm_eval, "simple_evaluate", offline)
    model = AutoModelForCausalLM.from_pretrained(tiny_llama).eval()
    spec = LmEvalSpec(tasks=[TaskSpec(name="arc_easy")])
    with pytest.raises(StageFailed, match="could not evaluate arc_easy: ConnectionError: .*define the task locally"):
        run_tasks(model, AutoTokenizer.from_pretrained(tiny_llama), spec, tmp_path)
