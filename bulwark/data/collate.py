"""Pad a list of tokenized features into one batch."""

from __future__ import annotations

import torch

from bulwark.data.templates import IGNORE_INDEX


def pad_collate(features: list[dict], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad input_ids with pad_id and labels with IGNORE_INDEX; attention_mask is 1 on real tokens."""
    if not features:
        raise ValueError("pad_collate got no features")
    longest = max(len(f["input_ids"]) for f in features)
    input_ids = torch.full((len(features), longest), pad_id, dtype=torch.long)
    labels = torch.full((len(features), longest), IGNORE_INDEX, dtype=torch.long)
    attention_mask = torch.zeros((len(features), longest), dtype=torch.long)
    for i, f in enumerate(features):
        n = len(f["input_ids"])
        if len(f["labels"]) != n:
            raise ValueError(f"feature {i}: {n} input_ids but {len(f['labels'])} labels")
        input_ids[i, :n] = torch.as_tensor(f["input_ids"], dtype=torch.long)
        labels[i, :n] = torch.as_tensor(f["labels"], dtype=torch.long)
        attention_mask[i, :n] = 1
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


def stack_batches(first: dict[str, torch.Tensor], second: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rows of `first` then `second`, right-padded to one length (pad id 0, attention 0, labels -100):
    two streams' micro-batches as ONE forward, the shape that is correct under ZeRO-3 (docs/DESIGN.md)."""
    length = max(first["input_ids"].size(1), second["input_ids"].size(1))
    fill = {"input_ids": 0, "attention_mask": 0, "labels": IGNORE_INDEX}
    out = {}
    for key, value in fill.items():
        parts = [b[key] for b in (first, second)]
        parts = [torch.nn.functional.pad(p, (0, length - p.size(1)), value=value) for p in parts]
        out[key] = torch.cat(parts)
    return out
