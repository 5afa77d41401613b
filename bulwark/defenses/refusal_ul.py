"""Refusal unlikelihood: alignment SFT that also makes refusing a benign request unlikely.

SFT on harmful prompts answered with refusals teaches the refusal's opening ("I cannot provide ...")
as a prior over all prompts: measured here on SmolLM2-135M, 40 steps of it took the harmful score from
78% to 7% but refused 70% of benign AlpacaEval requests (keyword judge), and mixing benign
instructions with helpful answers into the SFT data barely moved that (docs/BENCHMARKS.md). The
benign rows only raise their own answers; nothing says "not a refusal here". This defense adds that
term, the token-level unlikelihood loss of Welleck et al. (2020, "Neural text generation with
unlikelihood training") applied to the opening of a refusal placed after a benign prompt:

    L(w) = E_(x,y)~D_align [ -(1/|y|) Σ_t log p_w(y_t | x, y_<t) ]
         + λ · E_(b,r)~D_neg [ -(1/k_r) Σ_{t<k_r} log(1 - p_w(r_t | b, r_<t)) ],   k_r = min(k, |r|)

D_align is the alignment set (harmful prompts with refusals, benign prompts with answers); D_neg pairs
each benign prompt b of it with the response r of a randomly drawn refusal row, of which only the
first k = `opening_tokens` tokens count.

The unlikelihood term is a mean over pairs of each pair's mean over its own scored tokens: a pair
whose answer (after truncation to data.max_length) is shorter than k weighs as much as any other, and
the micro-batch's other rows do not change its weight. Pooling all scored tokens of the micro-batch
instead would weigh a pair by its token count, so a refusal cut to one token would count 1/k as much
as a full one, and how much depended on what else shared its micro-batch. A pair with no answer token
left is skipped (a micro-batch with none at all is an error). Per rank the term is the mean over its
pairs; DeepSpeed averages the gradient over ranks, which equals the mean over all pairs when every
rank scores the same number (the SFT term's cross-entropy pools tokens, as plain SFT does). Both sides of the refusal decision now get a gradient: up
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

from bulwark.defenses.base import Defense, MemoryCost, Stream, TrainingView, register
from bulwark.defenses.perturbation import StackedSideBatch
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
    """-log(1 - p(token)) (causal shift) averaged over each row's first min(k, its answer length)
    answer tokens, then over the rows that have any (see the module docstring for why per row)."""
    logits, labels = logits[:, :-1].float(), labels[:, 1:]
    mask = opening_mask(labels, k)
    scored = mask.sum(dim=1)
    if not bool((scored > 0).any()):
        raise BulwarkInputError("refusal_ul: a negative micro-batch has no answer tokens (raise data.max_length)")
    log_p = torch.log_softmax(logits, dim=-1).gather(-1, labels.clamp_min(0).unsqueeze(-1)).squeeze(-1)
    complement = (-torch.expm1(log_p)).clamp_min(min_complement)
    per_row = -(torch.log(complement) * mask).sum(dim=1)
    kept = scored > 0
    return (per_row[kept] / scored[kept]).mean()


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
        self.negatives = StackedSideBatch(NEGATIVES, "refusal_ul")
        self._last: dict[str, float] = {}

    def next_batch(self, streams: dict[str, Stream], step: int) -> Batch:
        self.negatives.draw(streams)
        return streams["main"].next_batch()

    def loss(self, engine: TrainingView, batch: Batch) -> torch.Tensor:
        stacked, rows = self.negatives.stack(batch)
        logits = engine.forward_logits(stacked)
        sft = causal_lm_loss(logits[:rows], stacked["labels"][:rows])
        cfg = self.config
        ul = unlikelihood(logits[rows:], stacked["labels"][rows:], cfg.opening_tokens, cfg.min_complement)
        self._last = {"refusal_ul_sft": float(sft.detach()), "refusal_ul_ul": float(ul.detach())}
        return sft + cfg.ul_weight * ul

    def metrics(self) -> dict[str, Any]:
        return dict(self._last)  # this rank's last micro-batch
