"""Lisa: lazy safety alignment by bi-state optimization with a proximal term (Huang et al., 2024).

Fine-tuning alternates between two states. In the alignment state batches come from the alignment
(refusal) set, in the fine-tune state from the user's data. Each state minimises its own loss plus a
proximal term that keeps the weights near where the other state left them:

    alignment state:  min_w  f(w) + rho/2 ||w - w_ft||^2      (w_ft: weights when fine-tuning stopped)
    fine-tune state:  min_w  h(w) + rho/2 ||w - w_al||^2      (w_al: weights when alignment stopped)

so the gradient of every step is g + rho (w - anchor), where `anchor` is snapshotted at each switch.
The run starts in the alignment state for `align_steps` optimizer steps, then `finetune_steps` in
the fine-tune state, and so on. The proximal term is off for the first `proximal_warmup` fraction of
the run, as in the reference code (git-disl/Lisa).

ZeRO-3: the anchor is a copy of this rank's flat fp32 master shard only (trainable bytes / world
size per rank), and the proximal gradient is added to that shard's reduced, clipped gradient inside
the optimizer step; nothing is gathered.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch

from bulwark.defenses.base import Defense, MemoryCost, ShardIter, ShardView, Stream, register

ALIGN, FINETUNE = "align", "finetune"


@dataclass
class LisaConfig:
    align_steps: int = 100
    finetune_steps: int = 900
    rho: float = 1.0
    proximal_warmup: float = 0.1  # fraction of the run's optimizer steps with the proximal term off


@register
class Lisa(Defense):
    name = "lisa"
    stages = ("finetune",)
    Config = LisaConfig
    side_streams = ("align",)
    summary = "bi-state optimization: alternate alignment/user batches with a proximal pull to the other state"
    # attach(): self.anchors = a clone of every local fp32 master shard; the proximal add is in place
    memory = MemoryCost(fp32_copies=1, what="anchor weights (fp32, sharded) for the proximal term")

    def __init__(self, config: LisaConfig, total_steps: int) -> None:
        super().__init__(config, total_steps)
        if config.align_steps < 0 or config.finetune_steps < 1:
            from bulwark.errors import BulwarkInputError

            raise BulwarkInputError("defense.align_steps must be >= 0 and defense.finetune_steps >= 1")
        self.state = ALIGN if config.align_steps > 0 else FINETUNE
        self.clock = 0  # optimizer steps spent in the current state
        self.steps_done = 0
        self.anchors: list[torch.Tensor] = []
        self.stepped_state = self.state
        self.proximal_off_until = math.floor(config.proximal_warmup * total_steps)

    def attach(self, engine: ShardView) -> None:
        self.anchors = [shard.detach().clone() for shard in engine.local_shards()]

    def next_batch(self, streams: dict[str, Stream], step: int) -> dict[str, torch.Tensor]:
        return streams["align" if self.state == ALIGN else "main"].next_batch()

    def before_step(self, shards: ShardIter) -> None:
        if self.config.rho == 0 or self.steps_done < self.proximal_off_until:
            return
        for index, shard in shards:
            # g += rho * w - rho * anchor, in place: no temporary the size of the shard
            shard.grad.add_(shard.detach(), alpha=self.config.rho).sub_(self.anchors[index], alpha=self.config.rho)

    def after_step(self, engine: ShardView, step: int) -> None:
        self.stepped_state = self.state
        self.steps_done = step
        self.clock += 1
        length = self.config.align_steps if self.state == ALIGN else self.config.finetune_steps
        if self.clock >= length:
            self.state = FINETUNE if self.state == ALIGN else ALIGN
            if self.state == ALIGN and self.config.align_steps == 0:
                self.state = FINETUNE
            self.clock = 0
            for anchor, shard in zip(self.anchors, engine.local_shards(), strict=True):
                anchor.copy_(shard.detach())

    def metrics(self) -> dict[str, Any]:
        return {"lisa_state": self.stepped_state}  # the state this step ran in

    def state_dict(self) -> dict[str, Any]:
        return {
            "state": self.state,
            "clock": self.clock,
            "steps_done": self.steps_done,
            "anchors": [a.clone() for a in self.anchors],
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.state, self.clock, self.steps_done = state["state"], state["clock"], state["steps_done"]
        for anchor, saved in zip(self.anchors, state["anchors"], strict=True):
            anchor.copy_(saved)
