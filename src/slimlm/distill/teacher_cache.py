"""The teacher's top-k logits of every training block, kept on disk, so passes after the first run the student only.

The teacher is frozen and the blocks do not change, so its output for a block is the same every time
the block comes round. With `loss: {top_k: K, cache_teacher: true}` the first time a block is seen its
top-k logits and their token ids are written to memory-mapped files in the stage's work folder, and
every later visit reads them instead of running the teacher. A block counts as stored only after its
data is flushed, so a run killed mid-write computes that block again on resume.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import torch
from numpy.lib.format import open_memmap

BYTES_PER_ENTRY = 4 + 4  # a float32 logit and an int32 token id


def cache_bytes(blocks: int, seq_len: int, k: int) -> int:
    return blocks * seq_len * k * BYTES_PER_ENTRY


def free_bytes(folder: Path) -> int:
    """Free space on the disk that holds `folder` (or its nearest existing parent)."""
    while not folder.exists():
        folder = folder.parent
    return shutil.disk_usage(folder).free


class TeacherTopK:
    """The top-k store for `blocks` blocks of `seq_len` tokens, in `folder` (created, or reopened on resume)."""

    def __init__(self, folder: Path, blocks: int, seq_len: int, k: int):
        folder.mkdir(parents=True, exist_ok=True)
        (self.values, kept_values), (self.index, kept_index), (self.stored, _) = (
            self._open(folder / f"top{k}-values.npy", (blocks, seq_len, k), np.float32),
            self._open(folder / f"top{k}-index.npy", (blocks, seq_len, k), np.int32),
            self._open(folder / f"top{k}-stored.npy", (blocks,), np.uint8),
        )
        if not (kept_values and kept_index):  # the flags describe files that were started again
            self.stored[:] = 0
        self.hits = self.misses = 0

    @staticmethod
    def _open(path: Path, shape: tuple[int, ...], dtype) -> tuple[np.memmap, bool]:
        """The array in `path` if it has this shape and type (and whether it was kept), else a new one."""
        if path.is_file():
            try:
                kept = open_memmap(path, mode="r+")
                if kept.shape == shape and kept.dtype == dtype:
                    return kept, True
            except ValueError:  # a file cut short by a crash: start it again
                pass
        return open_memmap(path, mode="w+", dtype=dtype, shape=shape), False  # sparse: unseen blocks take no disk

    def lookup(self, rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
        """The stored (logits, token ids), each [rows x seq_len, k], or None unless every row is stored."""
        r = rows.numpy()
        if not self.stored[r].all():
            self.misses += 1
            return None
        self.hits += 1
        k = self.values.shape[-1]
        values = torch.from_numpy(np.ascontiguousarray(self.values[r])).reshape(-1, k)
        return values, torch.from_numpy(np.ascontiguousarray(self.index[r])).reshape(-1, k).long()

    def store(self, rows: torch.Tensor, values: torch.Tensor, index: torch.Tensor) -> None:
        r, shape = rows.numpy(), (len(rows), *self.values.shape[1:])
        self.values[r] = values.float().reshape(shape).cpu().numpy()
        self.index[r] = index.int().reshape(shape).cpu().numpy()
        self.values.flush()
        self.index.flush()
        self.stored[r] = 1  # only now: a crash before this line leaves the rows unstored
        self.stored.flush()
