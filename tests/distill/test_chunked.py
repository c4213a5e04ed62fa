"""The chunked logit loss: the same values and gradients as the loss on the whole batch's logits."""

from __future__ import annotations

import pytest
import torch
import transformers

from slimlm.distill.config import LossOptions
from slimlm.distill.losses import LOGIT_LOSSES, top_k_teacher
from slimlm.distill.objective import Student, TeacherStates

SHAPE = dict(
    vocab_size=1000, hidden_size=32, intermediate_size=64, num_attention_heads=4, num_key_value_heads=2, head_dim=8
)


def tiny(family: str, layers: int, seed: int):
    torch.manual_seed(seed)
    extra = {"query_pre_attn_scalar": 8, "final_logit_softcapping": 5.0} if family == "Gemma2Config" else {}
    config = getattr(transformers, family)(num_hidden_layers=layers, **SHAPE, **extra)
    return transformers.AutoModelForCausalLM.from_config(config).float()


def whole_batch_loss(student, teacher, ids, loss: LossOptions) -> torch.Tensor:
    """The loss as the distill stage computed it before chunking: from the models' full logits."""
    s, t = student(input_ids=ids).logits, teacher(input_ids=ids).logits.detach()
    vocab = s.shape[-1]
    s_flat, t_flat = s.reshape(-1, vocab), t.reshape(-1, vocab)
    if loss.top_k:
        s_flat, t_flat = top_k_teacher(s_flat, t_flat, loss.top_k)
    kwargs = {"beta": loss.jsd_beta} if loss.logits == "jsd" else {}
    total = LOGIT_LOSSES[loss.logits](s_flat, t_flat, loss.temperature, **kwargs)
    ce = torch.nn.functional.cross_entropy(s[:, :-1].reshape(-1, vocab), ids[:, 1:].reshape(-1))
    return total + loss.ce_weight * ce


@pytest.mark.parametrize(
    "family, options",
    [
        ("LlamaConfig", dict(logits="forward_kl", ce_weight=0.5)),
        ("LlamaConfig", dict(logits="reverse_kl", temperature=2.0, top_k=16)),
        ("LlamaConfig", dict(logits="jsd", jsd_beta=0.3)),
        ("Gemma2Config", dict(logits="forward_kl", ce_weight=1.0)),  # the head's soft-capping applies per chunk
    ],
)
def test_chunked_loss_matches_the_whole_batch_loss_in_value_and_gradient(family, options):
    teacher, student = tiny(family, 3, seed=0), tiny(family, 2, seed=1)
    teacher.requires_grad_(False)
    ids = torch.randint(0, 1000, (3, 21))
    reference = whole_batch_loss(student, teacher, ids, LossOptions(**options))
    expected = torch.autograd.grad(reference, list(student.parameters()))
    # 63 positions in chunks of 10: the last chunk is short, and the chunks split rows of the batch
    chunked = Student(student, LossOptions(**options, chunk=10), vocab=1000)
    value = chunked(ids, TeacherStates.of(teacher, ids, []))
    grads = torch.autograd.grad(value, list(student.parameters()))
    assert value.item() == pytest.approx(reference.item(), abs=1e-5)
    for (name, _), got, want in zip(student.named_parameters(), grads, expected, strict=True):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-4, msg=name)


def test_chunked_loss_trains_only_what_requires_grad():
    teacher, student = tiny("LlamaConfig", 2, seed=0), tiny("LlamaConfig", 2, seed=1)
    teacher.requires_grad_(False)
    student.get_output_embeddings().requires_grad_(False)  # a frozen head (LoRA leaves it alone)
    ids = torch.randint(0, 1000, (2, 8))
    Student(student, LossOptions(chunk=5), vocab=1000)(ids, TeacherStates.of(teacher, ids, [])).backward()
    assert student.get_output_embeddings().weight.grad is None
    assert student.model.layers[0].mlp.down_proj.weight.grad.abs().sum() > 0
