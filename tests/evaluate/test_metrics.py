"""Perplexity windows, parameter counts and gate verdicts."""

from __future__ import annotations

import math

import pytest
import torch
from transformers import AutoModelForCausalLM

from slimlm.evaluate.catalogue import metric_value
from slimlm.evaluate.gates import check_gate, failure_message
from slimlm.evaluate.perplexity import perplexity, torch_logits
from slimlm.evaluate.size import parameter_counts
from slimlm.stage import Gate


def test_perplexity_matches_transformers_loss(tiny_llama):
    model = AutoModelForCausalLM.from_pretrained(tiny_llama).eval()
    ids = torch.randint(3, 500, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        losses = [model(input_ids=row[None], labels=row[None]).loss.item() for row in ids]
    result = perplexity(torch_logits(model), ids, seq_len=24)
    assert math.isclose(result["perplexity"], math.exp(sum(losses) / 2), rel_tol=1e-5)
    assert result["tokens"] == 46 and "non-overlapping" in result["method"]


def test_sliding_window_with_full_stride_equals_non_overlapping(tiny_llama):
    model = AutoModelForCausalLM.from_pretrained(tiny_llama).eval()
    stream = torch.randint(3, 500, (96,), generator=torch.Generator().manual_seed(1))
    blocks = perplexity(torch_logits(model), stream, seq_len=32)
    sliding = perplexity(torch_logits(model), stream, seq_len=32, stride=32)
    assert math.isclose(blocks["perplexity"], sliding["perplexity"], rel_tol=1e-6)
    overlapping = perplexity(torch_logits(model), stream, seq_len=32, stride=16)
    assert overlapping["tokens"] == 95 and "stride 16" in overlapping["method"]  # every token but the first, once


def test_parameter_counts_count_tied_weights_once(tiny_models):
    tied = AutoModelForCausalLM.from_pretrained(tiny_models["llama"])
    untied = AutoModelForCausalLM.from_pretrained(tiny_models["mistral"])
    t, u = parameter_counts(tied), parameter_counts(untied)
    assert t["params"] == sum(p.numel() for p in tied.parameters())
    assert t["params"] - t["nonembedding_params"] == 512 * 64
    assert u["params"] - u["nonembedding_params"] == 2 * 512 * 64


def test_gates_absolute_and_relative():
    teacher, previous, stage = (
        {"perplexity": 10.0},
        {"perplexity": 12.0},
        {"perplexity": 14.0, "agreement": {"top1": 0.9}},
    )
    assert check_gate(Gate(metric="perplexity", max_ratio=1.5, relative_to="teacher"), stage, teacher, previous).passed
    verdict = check_gate(Gate(metric="perplexity", max_ratio=1.1, relative_to="previous"), stage, teacher, previous)
    assert not verdict.passed and verdict.reference == 12.0 and verdict.bounds == ["<= 13.2"]
    assert check_gate(Gate(metric="agreement.top1", min=0.85), stage, teacher, previous).passed
    assert not check_gate(Gate(metric="agreement.top1", min=0.95), stage, teacher, previous).passed
    recovery = Gate(metric="accuracy", min_ratio=0.95, relative_to="teacher")
    assert check_gate(recovery, {"accuracy": 0.96}, {"accuracy": 1.0}, {}).passed
    assert not check_gate(recovery, {"accuracy": 0.94}, {"accuracy": 1.0}, {}).passed
    assert not check_gate(recovery, {}, {"accuracy": 1.0}, {}).passed  # not measured never passes
    assert metric_value({"a": {"b": 2}}, "a.b") == 2.0 and metric_value({"a": 1}, "a.b") is None


def test_above_chance_recovery_gates_pass_and_fail_on_the_threshold():
    gate = Gate(metric="tasks.piqa.acc", min_ratio=0.9, relative_to="teacher", above_chance=True)
    teacher = {"tasks": {"piqa": {"acc": 0.70, "chance": 0.5}}}
    # bound: 0.5 + 0.9 x (0.70 - 0.5) = 0.68; a plain 0.9 x teacher ratio would have asked only 0.63
    passing = check_gate(gate, {"tasks": {"piqa": {"acc": 0.69, "chance": 0.5}}}, teacher, {})
    assert passing.passed and passing.recovery == pytest.approx(0.95) and passing.bounds == [">= 0.68"]
    failing = check_gate(gate, {"tasks": {"piqa": {"acc": 0.65, "chance": 0.5}}}, teacher, {})
    assert not failing.passed and failing.recovery == pytest.approx(0.75)
    assert "above-chance recovery 0.750" in failure_message("distill", failing)
    no_chance = check_gate(gate, {"tasks": {"piqa": {"acc": 0.9}}}, teacher, {})
    assert not no_chance.passed and "no chance level" in failure_message("distill", no_chance)
    with pytest.raises(ValueError, match="above_chance bounds a recovery ratio"):
        Gate(metric="tasks.piqa.acc", min=0.5, above_chance=True)
