"""Width and depth pruning on every supported family: reload with plain transformers, exact sizes, identity."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from slimlm.compress.importance import collect_importance, layer_removal_loss
from slimlm.compress.select import choose_layers, magnitude_scores, random_scores, select_plan
from slimlm.compress.surgery import Shape, predict_parameters, prune_model
from slimlm.evaluate.size import parameter_counts
from tests.conftest import FAMILIES, STORIES, needs_shared

FAMILY_NAMES = sorted(FAMILIES)


def _blocks(tokenizer, n=4, seq_len=32):
    from slimlm.sources.text import pack_tokens, python_docs, token_stream

    return pack_tokens(token_stream(python_docs()[:40], tokenizer, n * seq_len), seq_len)


def _load(path):
    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval(), AutoTokenizer.from_pretrained(path)


def _prune(model, blocks, shape):
    imp = collect_importance(model, blocks, batch_size=2)
    layers = choose_layers(model.config.num_hidden_layers, shape.layers, "block_importance", block=imp.block)
    plan = select_plan(model.config, shape, layers, imp.heads, imp.mlp, imp.hidden)
    return prune_model(model, plan, shape)


@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_pruned_model_reloads_with_predicted_size_and_generates(family, tiny_models, tmp_path):
    model, tokenizer = _load(tiny_models[family])
    blocks = _blocks(tokenizer)
    shape = Shape(hidden=48, ffn=64, heads=2, kv_heads=1, layers=3)
    pruned = _prune(model, blocks, shape)
    pruned.save_pretrained(tmp_path)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()  # plain transformers, no slimlm code
    assert parameter_counts(reloaded) == predict_parameters(model, shape)
    assert reloaded.config.head_dim == 16 and reloaded.config.num_hidden_layers == 3
    assert reloaded.config.hidden_size == 48 and reloaded.config.intermediate_size == 64
    with torch.no_grad():
        assert torch.allclose(reloaded(blocks[:1]).logits, pruned(blocks[:1]).logits, atol=1e-5)
    out = reloaded.generate(blocks[:1, :8], max_new_tokens=5, do_sample=False)
    assert out.shape == (1, 13)
    if model.config.tie_word_embeddings:
        assert reloaded.lm_head.weight.data_ptr() == reloaded.model.embed_tokens.weight.data_ptr()


@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_pruning_to_full_size_is_the_identity(family, tiny_models):
    model, tokenizer = _load(tiny_models[family])
    blocks = _blocks(tokenizer, n=2)
    pruned = _prune(model, blocks, Shape.of(model.config))
    with torch.no_grad():
        torch.testing.assert_close(pruned(blocks).logits, model(blocks).logits, atol=1e-5, rtol=0)


def test_importance_ranks_heads_within_their_kv_group(tiny_llama):
    model, tokenizer = _load(tiny_llama)
    imp = collect_importance(model, _blocks(tokenizer), batch_size=2)
    heads = imp.heads.clone()
    heads[0] = torch.tensor([1.0, 2.0, 30.0, 40.0])  # both best heads sit in KV group 1
    plan = select_plan(model.config, Shape(64, 128, 2, 2, 4), list(range(4)), heads, imp.mlp, imp.hidden)
    # Per-group selection keeps one head from each group rather than the two globally best.
    assert plan.heads[0].tolist() == [1, 3] and plan.kv_heads[0].tolist() == [0, 1]
    plan = select_plan(model.config, Shape(64, 128, 2, 1, 4), list(range(4)), heads, imp.mlp, imp.hidden)
    assert plan.heads[0].tolist() == [2, 3] and plan.kv_heads[0].tolist() == [1]


def test_importance_scores_have_one_value_per_layer_and_channel(tiny_llama):
    model, tokenizer = _load(tiny_llama)
    few = collect_importance(model, _blocks(tokenizer, n=2), batch_size=2)
    many = collect_importance(model, _blocks(tokenizer, n=8), batch_size=2)
    assert few.mlp.shape == many.mlp.shape == (4, 128)
    assert few.angular.shape == (4, 5) and float(few.block.min()) >= 0


def test_depth_methods_pick_the_expected_layers():
    block = torch.tensor([0.5, 0.1, 0.2, 0.9])
    assert choose_layers(4, 2, "block_importance", block=block) == [0, 3]
    assert choose_layers(4, 3, "perplexity", removal_loss=torch.tensor([9.0, 3.0, 2.0, 8.0])) == [0, 1, 3]
    angular = torch.zeros(4, 5)
    angular[:, 2] = torch.tensor([0.9, 0.1, 0.3, 0.0])  # start 3 (distance 0) would run past the last layer
    assert choose_layers(4, 2, "contiguous", angular=angular) == [0, 3]


def test_baseline_scores_have_the_activation_shapes(tiny_models):
    model, _ = _load(tiny_models["phi3"])
    mag, rnd = magnitude_scores(model), random_scores(model.config, seed=0)
    for scores in (mag, rnd):
        assert scores["heads"].shape == (4, 4) and scores["mlp"].shape == (4, 128) and scores["hidden"].shape == (64,)
    assert float(mag["mlp"].min()) > 0


def test_layer_removal_loss_is_per_layer(tiny_llama):
    model, tokenizer = _load(tiny_llama)
    losses = layer_removal_loss(model, _blocks(tokenizer, n=2), batch_size=2)
    assert losses.shape == (4,) and torch.isfinite(losses).all() and losses.std() > 0


@needs_shared(STORIES)
def test_stories260k_saved_logits_equal_in_memory(tmp_path):
    model, tokenizer = _load(STORIES)
    text = STORIES.parent.parent / "data" / "tinystories" / "tinystories_val.txt"
    ids = tokenizer(text.read_text()[:4000] if text.exists() else "Once upon a time", return_tensors="pt").input_ids
    blocks = ids[:, : (ids.shape[1] // 64) * 64].view(-1, 64)[:4]
    base = Shape.of(model.config)
    shape = Shape(
        hidden=base.hidden // 2,
        ffn=base.ffn // 2,
        heads=base.heads // 2 or 1,
        kv_heads=min(base.kv_heads, base.heads // 2 or 1),
        layers=base.layers - 1,
    )
    pruned = _prune(model, blocks, shape)
    pruned.save_pretrained(tmp_path)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    with torch.no_grad():
        torch.testing.assert_close(reloaded(blocks).logits, pruned(blocks).logits, atol=1e-5, rtol=0)
