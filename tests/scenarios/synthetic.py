"""Synthetic token rows shared by the scenario scripts (they run under torchrun, from this folder)."""

from __future__ import annotations

import torch

from bulwark.data import pad_collate


def random_rows(seed: int, count: int, vocab: int, ragged: bool) -> list[dict]:
    """`count` rows of 8-12 random tokens (12 when not ragged), loss on all but the first 5."""
    g = torch.Generator().manual_seed(seed)
    rows = []
    for _ in range(count):
        length = int(torch.randint(8, 13, (1,), generator=g)) if ragged else 12
        ids = torch.randint(3, vocab, (length,), generator=g).tolist()
        rows.append({"input_ids": ids, "labels": [-100] * 5 + ids[5:]})
    return rows


class SyntheticStream:
    """Micro-batch k of a (stream, rank) is always the same rows (a resumed run regenerates them);
    the batches handed out are recorded for the plain-PyTorch reference."""

    def __init__(self, offset: int, rank: int, mbs: int, vocab: int, ragged: bool) -> None:
        self.offset, self.rank, self.mbs, self.vocab, self.ragged = offset, rank, mbs, vocab, ragged
        self.calls = 0
        self.handed: list[dict] = []

    def next_batch(self) -> dict[str, torch.Tensor]:
        seed = self.offset + 1000 * self.calls + self.rank
        self.calls += 1
        batch = pad_collate(random_rows(seed, self.mbs, self.vocab, self.ragged), 0)
        self.handed.append({k: v.tolist() for k, v in batch.items()})
        return batch

    def state_dict(self) -> dict:
        return {"calls": self.calls}

    def load_state_dict(self, state: dict) -> None:
        self.calls = state["calls"]
