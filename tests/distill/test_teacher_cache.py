"""The on-disk store of the teacher's top-k logits: what is stored comes back, after a reopen too; nothing half-stored."""

from __future__ import annotations

import torch

from slimlm.distill.teacher_cache import TeacherTopK


def test_stored_rows_come_back_and_survive_a_reopen(tmp_path):
    cache = TeacherTopK(tmp_path, blocks=5, seq_len=3, k=2)
    values, index = torch.randn(2 * 3, 2), torch.randint(0, 100, (2 * 3, 2))
    rows = torch.tensor([4, 1])
    assert cache.lookup(rows) is None  # nothing stored yet
    cache.store(rows, values, index)
    again = TeacherTopK(tmp_path, blocks=5, seq_len=3, k=2)  # as a resumed run opens it
    got_values, got_index = again.lookup(rows)
    assert torch.equal(got_values, values) and torch.equal(got_index, index)
    assert again.lookup(torch.tensor([1, 2])) is None  # one row of the batch was never stored
    assert torch.equal(again.lookup(torch.tensor([1]))[0], values[3:])


def test_a_store_of_another_shape_starts_again(tmp_path):
    TeacherTopK(tmp_path, blocks=5, seq_len=3, k=2).store(torch.tensor([0]), torch.zeros(3, 2), torch.zeros(3, 2))
    assert TeacherTopK(tmp_path, blocks=6, seq_len=3, k=2).lookup(torch.tensor([0])) is None
