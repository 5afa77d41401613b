"""Mix: the data-mixing baseline, alignment (refusal) rows mixed into the user's fine-tuning data.

The simplest defense against harmful fine-tuning: keep training on alignment data while fine-tuning,
in a fixed share r = `align_ratio` of the updates. The objective is plain SFT on the mixture

    min_w  (1 - r) E_(x,y)~D_user [-log p_w(y | x)] + r E_(x,y)~D_align [-log p_w(y | x)]

Here each optimizer step takes all its micro-batches (every rank, every accumulation micro-batch)
from one stream, and step s (0-based) is an alignment step iff floor((s + 1) r) > floor(s r): the
alignment steps are spread evenly (r = 0.1: steps 9, 19, 29, ...; r = 0.25: 3, 7, 11, ...) and after
n steps exactly floor(n r) of them were alignment steps, for any r (not only 1/k). The schedule
is a function of the step number alone, so a resumed run makes the same choices without saved state,
and all ranks agree without communication. r is read as the decimal it is written as (0.1 = 1/10
exactly), so no rounding moves an alignment step.

Why whole steps rather than rows inside each micro-batch: with micro-batches of a few rows, r · rows
rounds to zero; a step-level choice keeps the share exact, keeps gradient accumulation equal to a
larger batch, and reuses the loop's distributed streams unchanged. In expectation over the data order
this is the same mixture as shuffling alignment rows into the upload; the user stream is not skipped
(it resumes where it stopped), so a run of n steps sees n - floor(n r) user micro-batches.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from fractions import Fraction
from typing import Any

import torch

from bulwark.defenses.base import Defense, MemoryCost, Stream, register
from bulwark.errors import BulwarkInputError

ALIGN, MAIN = "align", "main"


@dataclass
class MixConfig:
    align_ratio: float = 0.1  # share r of optimizer steps trained on the alignment (refusal) stream


def align_steps_before(step: int, ratio: Fraction) -> int:
    """How many of the steps 0 .. step-1 are alignment steps: floor(step * r)."""
    return math.floor(step * ratio)


def is_align_step(step: int, ratio: Fraction) -> bool:
    return align_steps_before(step + 1, ratio) > align_steps_before(step, ratio)


@register
class Mix(Defense):
    name = "mix"
    stages = ("finetune",)
    Config = MixConfig
    side_streams = ("align",)
    summary = "data mixing: a share align_ratio of the optimizer steps train on alignment (refusal) rows"
    # next_batch only picks the stream; the loss is the base class's single forward, no buffers
    memory = MemoryCost(what="alignment rows mixed into the data: nothing extra")

    def __init__(self, config: MixConfig, total_steps: int) -> None:
        super().__init__(config, total_steps)
        if not 0.0 <= config.align_ratio <= 1.0:
            raise BulwarkInputError(f"defense.align_ratio must be in [0, 1] (got {config.align_ratio})")
        # the decimal as written: Fraction(0.1) would be 3602879701896397/36028797018963968
        self.ratio = Fraction(str(config.align_ratio))
        self.stream = MAIN
        self.steps_done = 0

    def next_batch(self, streams: dict[str, Stream], step: int) -> dict[str, torch.Tensor]:
        self.stream = ALIGN if is_align_step(step, self.ratio) else MAIN
        return streams[self.stream].next_batch()

    def after_step(self, engine: Any, step: int) -> None:
        self.steps_done = step

    def metrics(self) -> dict[str, Any]:
        done = max(1, self.steps_done)
        return {"mix_stream": self.stream, "mix_align_share": align_steps_before(done, self.ratio) / done}
