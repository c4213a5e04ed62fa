"""Parameter counts and on-disk size of a model artifact."""

from __future__ import annotations

from pathlib import Path

from slimlm.artifacts import dir_size


def parameter_counts(model) -> dict[str, int]:
    """Parameters (a tied LM head counted once), and those outside the embeddings and LM head."""
    total = sum(p.numel() for p in model.parameters())  # parameters() yields shared tensors once
    embedding = {}
    for module in (model.get_input_embeddings(), model.get_output_embeddings()):
        if module is not None:
            embedding[id(module.weight)] = module.weight.numel()
    return {"params": total, "nonembedding_params": total - sum(embedding.values())}


def size_on_disk(path: Path) -> int:
    return dir_size(path)
