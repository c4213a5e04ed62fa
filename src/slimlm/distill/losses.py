"""Distillation losses on logits and hidden states; every loss is zero when student equals teacher.

Logit losses take [tokens, vocab] tensors (already flattened and masked) and return a mean over
tokens. With `top_k`, the teacher keeps only its k most likely tokens (renormalised) and the
student is compared on those, which cuts the memory of cached teacher logits.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def _log_probs(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    logits = logits.float()
    # a division at T = 1 is a pass over [tokens, vocab] for nothing: ~4% of a SmolLM2 step on CPU
    return F.log_softmax(logits / temperature if temperature != 1 else logits, dim=-1)


def forward_kl(student: torch.Tensor, teacher: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """KL(teacher || student): mean-seeking, Minitron's default. Scaled by T^2 as in Hinton et al."""
    t, s = _log_probs(teacher, temperature), _log_probs(student, temperature)
    return (t.exp() * (t - s)).sum(-1).mean() * temperature**2


def reverse_kl(student: torch.Tensor, teacher: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """KL(student || teacher): mode-seeking."""
    t, s = _log_probs(teacher, temperature), _log_probs(student, temperature)
    return (s.exp() * (s - t)).sum(-1).mean() * temperature**2


def generalized_jsd(
    student: torch.Tensor, teacher: torch.Tensor, temperature: float = 1.0, beta: float = 0.5
) -> torch.Tensor:
    """Generalised Jensen-Shannon divergence (Agarwal et al., GKD): beta=0.5 is the symmetric JSD."""
    t, s = _log_probs(teacher, temperature), _log_probs(student, temperature)
    mixture = torch.logsumexp(
        torch.stack([t + torch.log(torch.tensor(beta)), s + torch.log(torch.tensor(1 - beta))]), 0
    )
    kl_t = (t.exp() * (t - mixture)).sum(-1)
    kl_s = (s.exp() * (s - mixture)).sum(-1)
    return (beta * kl_t + (1 - beta) * kl_s).mean() * temperature**2


LOGIT_LOSSES = {"forward_kl": forward_kl, "reverse_kl": reverse_kl, "jsd": generalized_jsd}


def top_k_teacher(student: torch.Tensor, teacher: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Restrict both distributions to the teacher's top-k tokens per position."""
    values, index = teacher.topk(k, dim=-1)
    return student.gather(-1, index), values


def hidden_state_loss(student: torch.Tensor, teacher: torch.Tensor, kind: str) -> torch.Tensor:
    """Cosine or MSE between (projected) student and teacher hidden states: [tokens, hidden]."""
    if kind == "cosine":
        return (1 - F.cosine_similarity(student.float(), teacher.float(), dim=-1)).mean()
    return F.mse_loss(student.float(), teacher.float())


def layer_mapping(student_layers: int, teacher_layers: int) -> list[tuple[int, int]]:
    """Pairs (student layer, teacher layer) spread evenly, last with last, as Minitron maps hidden states."""
    return [(i, round((i + 1) * teacher_layers / student_layers) - 1) for i in range(student_layers)]
