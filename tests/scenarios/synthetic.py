"""Synthetic token rows shared by the scenario scripts (they run under torchrun, from this folder)."""

from __future__ import annotations

import torch


def random_rows(seed: int, count: int, vocab: int, ragged: bool) -> list[dict]:
    """`count` rows of 8-12 random tokens (12 when not ragged), loss on all but the first 5."""
    g = torch.Generator().manual_seed(seed)
    rows = []
    for _ in range(count):
        length = int(torch.randint(8, 13, (1,), generator=g)) if ragged else 12
        ids = torch.randint(3, vocab, (length,), generator=g).tolist()
        rows.append({"input_ids": ids, "labels": [-100] * 5 + ids[5:]})
    return rows
