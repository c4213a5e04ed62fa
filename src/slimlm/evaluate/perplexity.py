"""Perplexity of a causal LM on token blocks or on one token stream with a sliding window."""

from __future__ import annotations

import math

import torch


def torch_logits(model):
    """A logits function for a causal LM (PyTorch or ExportedCausalLM): [batch, seq] ids -> [batch, seq, vocab]."""
    return lambda ids: model(input_ids=ids.to(model.device), use_cache=False).logits


@torch.inference_mode()
def perplexity(
    logits_fn, tokens: torch.Tensor, *, seq_len: int, stride: int | None = None, batch_size: int = 4, progress=None
) -> dict:
    """Mean next-token NLL over a stream of token ids, exponentiated.

    `tokens` is a 1-D stream or a [n, seq_len] block tensor. Without `stride`, the stream is cut
    into non-overlapping windows (every token but each window's first is scored). With `stride`,
    windows of `seq_len` advance by `stride` tokens and only the tokens not scored by an earlier
    window count, so every scored token sees at least seq_len - stride tokens of context.
    """
    if tokens.dim() == 2:
        windows, scored_from = list(tokens), [1] * len(tokens)
        method = f"non-overlapping windows of {tokens.shape[1]} tokens"
    elif stride is None:
        n = tokens.numel() // seq_len
        windows, scored_from = list(tokens[: n * seq_len].view(n, seq_len)), [1] * n
        method = f"non-overlapping windows of {seq_len} tokens"
    else:
        windows, scored_from, end_prev = [], [], 0
        for begin in range(0, max(tokens.numel() - 1, 1), stride):
            end = min(begin + seq_len, tokens.numel())
            windows.append(tokens[begin:end])
            scored_from.append(max(end_prev - begin, 1))
            end_prev = end
            if end == tokens.numel():
                break
        method = f"sliding windows of {seq_len} tokens, stride {stride}"
    nll, count = 0.0, 0
    order = range(0, len(windows), batch_size)
    for i in progress(order, "perplexity") if progress else order:
        group = windows[i : i + batch_size]
        starts = scored_from[i : i + batch_size]
        if len({w.numel() for w in group}) > 1:  # the last sliding window may be shorter: run it alone
            for w, s in zip(group, starts, strict=True):
                a, b = _window_nll(logits_fn, w[None], [s])
                nll, count = nll + a, count + b
            continue
        a, b = _window_nll(logits_fn, torch.stack(group), starts)
        nll, count = nll + a, count + b
    if count == 0:
        raise ValueError("no tokens to score")
    return {"perplexity": math.exp(nll / count), "tokens": count, "method": method}


def _window_nll(logits_fn, ids: torch.Tensor, scored_from: list[int]) -> tuple[float, int]:
    logits = torch.as_tensor(logits_fn(ids)).float().cpu()
    logp = torch.log_softmax(logits[:, :-1], dim=-1)
    target = ids[:, 1:]
    token_nll = -logp.gather(-1, target[..., None]).squeeze(-1)
    total, count = 0.0, 0
    for row, start in enumerate(scored_from):
        part = token_nll[row, start - 1 :]
        total += part.sum().item()
        count += part.numel()
    return total, count
