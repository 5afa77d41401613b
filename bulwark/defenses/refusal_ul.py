"""Refusal unlikelihood: alignment SFT that also makes refusing a benign request unlikely.

SFT on harmful prompts answered with refusals teaches the refusal's opening ("I cannot provide ...")
as a prior over all prompts: measured here on SmolLM2-135M, 40 steps of it took the harmful score from
78% to 7% but refused 70% of benign AlpacaEval requests (keyword judge), and mixing benign
instructions with helpful answers into the SFT data barely moved that (docs/BENCHMARKS.md). The
benign rows only raise their own answers; nothing says "not a refusal here". This defense adds that
term, the token-level unlikelihood loss of Welleck et al. (2020, "Neural text generation with
unlikelihood training") applied to the opening of a refusal placed after a benign prompt:

    L(w) = E_(x,y)~D_align [ -(1/|y|) Σ_t log p_w(y_t | x, y_<t) ]
         + λ · E_(b,r)~D_neg [ -(1/k) Σ_{t<k} log(1 - p_w(r_t | b, r_<t)) ]

D_align is the alignment set (harmful prompts with refusals, benign prompts with answers); D_neg pairs
each benign prompt b of it with the response r of a randomly drawn refusal row, of which only the
first k = `opening_tokens` tokens count. Both sides of the refusal decision now get a gradient: up
after harmful prompts (the SFT term), down after benign ones (the unlikelihood term). 1 - p is
computed as -expm1(log p) and clamped at `min_complement`, so a refusal already near certain gives a
large but finite gradient.

One pass: the alignment micro-batch and the negative micro-batch are stacked (right-padded) into ONE
forward through the engine and split afterwards (the multi-pass rule of docs/DESIGN.md). Each rank's
loss is over its own micro-batches and DeepSpeed averages the gradients, as for plain SFT.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from bulwark.data.collate import stack_batches
from bulwark.defenses.base import Defense, MemoryCost, Stream, TrainingView, register
from bulwark.errors import BulwarkInputError
from bulwark.losses import IGNORE_INDEX, causal_lm_loss

Batch = dict[str, torch.Tensor]
NEGATIVES = "benign_refusals"


@dataclass
class RefusalULConfig:
    ul_weight: float = 1.0  # λ: weight of the unlikelihood term
    opening_tokens: int = 4  # k: how many of the refusal's first answer tokens are made unlikely
    min_complement: float = 1e-4  # floor of 1 - p inside the log


def opening_mask(labels: torch.Tensor, k: int) -> torch.Tensor:
    """True on the first k answer tokens (labels != IGNORE_INDEX) of each row."""
    answer = labels != IGNORE_INDEX
    return answer & (answer.long().cumsum(dim=1) <= k)


def unlikelihood(logits: torch.Tensor, labels: torch.Tensor, k: int, min_complement: float) -> torch.Tensor:
    """Mean over the first k answer tokens of every row of -log(1 - p(token)) (causal shift)."""
    logits, labels = logits[:, :-1].float(), labels[:, 1:]
    mask = opening_mask(labels, k)
    if not mask.any():
        raise BulwarkInputError("refusal_ul: a negative micro-batch has no answer tokens (raise data.max_length)")
    log_p = torch.log_softmax(logits, dim=-1).gather(-1, labels.clamp_min(0).unsqueeze(-1)).squeeze(-1)
    complement = (-torch.expm1(log_p)).clamp_min(min_complement)
    return -(torch.log(complement) * mask).sum() / mask.sum()


@register
class RefusalUL(Defense):
    name = "refusal_ul"
    stages = ("align",)
    Config = RefusalULConfig
    side_streams = (NEGATIVES,)
    summary = "alignment SFT + λ·unlikelihood of a refusal's first k tokens after benign prompts"
    # loss(): stack_batches(alignment, negatives) is ONE forward of 2b rows, logits included
    memory = MemoryCost(activation_factor=2, what="alignment + negative rows in one forward (2x rows)")

    def __init__(self, config: RefusalULConfig, total_steps: int) -> None:
        super().__init__(config, total_steps)
        if config.ul_weight < 0:
            raise BulwarkInputError(f"defense.ul_weight must be >= 0 (got {config.ul_weight})")
        if config.opening_tokens < 1:
            raise BulwarkInputError(f"defense.opening_tokens must be >= 1 (got {config.opening_tokens})")
        if not 0.0 < config.min_complement < 1.0:
            raise BulwarkInputError(f"defense.min_complement must be in (0, 1) (got {config.min_complement})")
        self._negatives: Batch | None = None
        self._last: dict[str, float] = {}

    def next_batch(self, streams: dict[str, Stream], step: int) -> Batch:
        self._negatives = streams[NEGATIVES].next_batch()
        return streams["main"].next_batch()

    def loss(self, engine: TrainingView, batch: Batch) -> torch.Tensor:
        if self._negatives is None:
            raise RuntimeError("refusal_ul: loss() without a negative batch from next_batch()")
        negatives = {k: v.to(batch["input_ids"].device) for k, v in self._negatives.items()}
        self._negatives = None
        rows = batch["input_ids"].size(0)
        stacked = stack_batches(batch, negatives)
        logits = engine.forward_logits(stacked)
        sft = causal_lm_loss(logits[:rows], stacked["labels"][:rows])
        cfg = self.config
        ul = unlikelihood(logits[rows:], stacked["labels"][rows:], cfg.opening_tokens, cfg.min_complement)
        self._last = {"refusal_ul_sft": float(sft.detach()), "refusal_ul_ul": float(ul.detach())}
        return sft + cfg.ul_weight * ul

    def metrics(self) -> dict[str, Any]:
        return dict(self._last)  # this rank's last micro-batch
