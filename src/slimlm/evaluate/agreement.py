"""How closely a compressed model follows its teacher: top-1 token agreement and mean KL(teacher || student)."""

from __future__ import annotations

import torch


@torch.inference_mode()
def teacher_agreement(student_logits, teacher_logits, blocks: torch.Tensor, batch_size: int = 4, progress=None) -> dict:
    """Both logits functions map [batch, seq] ids to [batch, seq, vocab]; every position of every block counts."""
    agree, kl, count, max_diff = 0, 0.0, 0, 0.0
    order = range(0, len(blocks), batch_size)
    for i in progress(order, "teacher agreement") if progress else order:
        ids = blocks[i : i + batch_size]
        t_logits = torch.as_tensor(teacher_logits(ids)).float().cpu()
        s_logits = torch.as_tensor(student_logits(ids)).float().cpu()
        max_diff = max(max_diff, (t_logits - s_logits).abs().max().item())
        teacher, student = torch.log_softmax(t_logits, -1), torch.log_softmax(s_logits, -1)
        agree += (teacher.argmax(-1) == student.argmax(-1)).sum().item()
        kl += (teacher.exp() * (teacher - student)).sum().item()
        count += ids.numel()
    if count == 0:
        raise ValueError("no tokens to compare")
    return {"top1": agree / count, "kl": kl / count, "tokens": count, "max_logit_diff": max_diff}
