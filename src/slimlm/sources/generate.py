"""Teacher-generated text (`source: generate`): sample documents from the teacher, cached in the run directory."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from slimlm.artifacts import atomic_write, config_digest, dir_digest
from slimlm.errors import SourceError
from slimlm.progress import status, track

if TYPE_CHECKING:
    from slimlm.sources.specs import GenerateSpec


def generated_documents(
    spec: GenerateSpec, teacher_dir: Path | None, prompts: list[str] | None, cache_dir: Path | None
) -> list[str]:
    """Sample until `spec.tokens` new tokens exist; prompts are the openings of `prompts` documents, or BOS alone."""
    if teacher_dir is None:
        raise SourceError("`source: generate` needs the teacher model, which this context does not have")
    key = config_digest({"spec": spec.model_dump(mode="json"), "teacher": dir_digest(teacher_dir), "prompts": prompts})
    cache = Path(cache_dir) / f"generated-{key[:16]}.jsonl" if cache_dir else None
    if cache is not None and cache.is_file():
        return [json.loads(line)["text"] for line in cache.read_text().splitlines() if line.strip()]

    from slimlm.sources.models import load_model, load_tokenizer

    model = load_model(teacher_dir, device="cuda" if torch.cuda.is_available() else "cpu")
    tokenizer = load_tokenizer(teacher_dir)
    start = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
    prompt_ids = [tokenizer(p, add_special_tokens=False)["input_ids"][: spec.prompt_tokens] for p in prompts or []]
    prompt_ids = [p for p in prompt_ids if p] or [[start]]
    torch.manual_seed(0)  # the same settings sample the same text
    docs, produced, i = [], 0, 0
    rounds = -(-spec.tokens // (spec.batch_size * spec.max_new_tokens))
    status(f"generating about {spec.tokens:,} tokens of text with the teacher (cached for later runs)")
    for _ in track(range(rounds * 4), "teacher generation"):  # a bound: early EOS can need extra rounds
        if produced >= spec.tokens:
            break
        batch = [prompt_ids[(i + j) % len(prompt_ids)] for j in range(spec.batch_size)]
        i += spec.batch_size
        width = max(len(p) for p in batch)
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        ids = torch.tensor([[pad] * (width - len(p)) + p for p in batch])  # left padding for decoder-only generation
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in batch])
        with torch.inference_mode():
            out = model.generate(
                ids.to(model.device),
                attention_mask=mask.to(model.device),
                do_sample=True,
                temperature=spec.temperature,
                top_p=spec.top_p,
                max_new_tokens=spec.max_new_tokens,
                pad_token_id=pad,
            )
        for row, prompt in zip(out[:, width:].tolist(), batch, strict=True):
            new = [t for t in row if t != pad]
            produced += len(new)
            docs.append(tokenizer.decode(prompt + new, skip_special_tokens=True))
    if cache is not None:
        with atomic_write(cache) as tmp:
            tmp.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    return docs
