"""Vaccine: perturbation-aware safety alignment (Huang et al., 2024), and its random-noise ablation.

"Vaccine: Perturbation-aware Alignment for Large Language Models against Harmful Fine-tuning Attack",
NeurIPS 2024 (git-disl/Vaccine). Harmful fine-tuning later drifts the aligned model's hidden
embeddings; Vaccine aligns under the worst bounded drift. With h_l the output of block l (the
attention block of decoder layer l; `layers=decoder`: the whole decoder layer) and f the alignment
(refusal) loss, each micro-batch takes one ascent step on the drift e, then steps the weights:

    pass 1:  g_l = ∂f/∂h_l  at e = 0,        e_l = ρ g_l / (||g|| + 1e-7),   ||g||² = Σ_l ||g_l||²
    pass 2:  ∇_w f(w; h_l ← h_l + e_l for every l)          (the only gradient the optimizer steps)

i.e. min_w max_{||e|| ≤ ρ} f(w; h + e) with the inner max linearised. ||g|| is ONE L2 norm over all
perturbed blocks, tokens and rows. Defaults are the reference's: ρ = 2 (its README's intensity),
attention blocks, the 1e-7 in the denominator. `vaccine-random` (the paper's ablation) skips pass 1
and adds e_l ~ N(0, ρ I) instead: the reference draws variance ρ, i.e. standard deviation √ρ.

Data parallel: every rank computes g on its own micro-batch and the squared norms are all-reduced, so
all ranks divide by the norm over the global micro-batch. The engine steps L = (1/W) Σ_r f_r, whose
gradient w.r.t. rank r's h is g_r / W; the 1/W cancels in the normalisation, so the update is the
single-process computation on the concatenated batch with loss (1/W) Σ_r f_r, which is the
concatenated batch's own loss when all micro-batches hold the same number of labelled tokens. (The
reference runs on one GPU, where "the batch" is all there is.)

Gradient accumulation: each micro-batch is normalised on its own (the reference has no accumulation;
a norm over the whole accumulation window would need every micro-batch's pass 1 before the first
pass 2). So accumulating k micro-batches of b rows is NOT the update of one micro-batch of k·b rows;
data parallelism over k ranks is. `vaccine-random` draws its noise row by row, so for it the two ARE
equal (same rows, same padded length).

How it runs here: bulwark/defenses/perturbation.py (block hooks, out of place; pass 1 by autograd.grad
w.r.t. zero probes, so no weight gradient is computed, where the reference runs a full backward with
module backward hooks and throws the weight gradients away). The perturbations stay set until the next
micro-batch's loss (or after_step).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch

from bulwark.defenses.base import Defense, MemoryCost, TrainingView, register
from bulwark.defenses.perturbation import (
    Batch,
    BlockHooks,
    adversarial_offsets,
    check_layers,
    find_blocks,
    gaussian_offsets,
)
from bulwark.errors import BulwarkInputError


@dataclass
class VaccineConfig:
    rho: float = 2.0  # radius of the hidden-state perturbation (reference README: intensity 2)
    layers: str = "attention"  # attention: each decoder layer's attention output; decoder: the layer output
    # ZeRO-3: pass 1 keeps its own parameter-prefetch trace (faster; may hold up to one prefetch
    # bucket more gathered: docs/DEFENSES.md); false shares the stepping pass's trace
    own_trace: bool = True


@dataclass
class RandomVaccineConfig:
    rho: float = 2.0  # variance of the Gaussian noise added to every h_l (std = sqrt(rho)), as the reference
    layers: str = "attention"
    seed: int = 0  # noise generator seed; rank r draws from its own stream


@register
class Vaccine(Defense):
    name = "vaccine"
    stages = ("align",)
    Config = VaccineConfig
    summary = "align under the worst hidden-state drift: perturb each attention output by rho*grad/||grad||"
    # adversarial_offsets: e_l cast to g.dtype (the activations') for every block, kept through pass 2;
    # pass 1's zero probes z_l are the same size and are freed before pass 2 starts
    memory = MemoryCost(layer_outputs=1, what="one perturbation per layer output (activation dtype)")

    def __init__(self, config: VaccineConfig, total_steps: int) -> None:
        super().__init__(config, total_steps)
        if not config.rho >= 0:
            raise BulwarkInputError("defense.rho must be >= 0")
        check_layers(config.layers)
        self.hooks: BlockHooks | None = None
        self._grad_norm = 0.0

    def attach(self, engine: TrainingView) -> None:
        self.hooks = BlockHooks(find_blocks(engine.module, self.config.layers))

    def loss(self, engine: TrainingView, batch: Batch) -> torch.Tensor:
        self.hooks.offsets = {}  # the previous micro-batch's, kept through its backward
        indices = list(range(len(self.hooks)))
        self.hooks.offsets, self._grad_norm = adversarial_offsets(
            engine, self.hooks, batch, self.config.rho, indices, self.config.own_trace
        )
        return engine.forward_loss(batch)

    def after_step(self, engine: TrainingView, step: int) -> None:
        self.hooks.offsets = {}

    def metrics(self) -> dict[str, Any]:
        return {"vaccine_grad_norm": self._grad_norm}  # global ||g|| of the last micro-batch


@register
class RandomVaccine(Defense):
    name = "vaccine-random"
    stages = ("align",)
    Config = RandomVaccineConfig
    summary = "Vaccine's ablation: Gaussian noise (variance rho) on each attention output, one pass"
    # gaussian_offsets: torch.randn draws stay fp32 (`.to(target)` only moves them), one per block
    memory = MemoryCost(layer_outputs_fp32=1, what="one fp32 noise tensor per layer output")

    def __init__(self, config: RandomVaccineConfig, total_steps: int) -> None:
        super().__init__(config, total_steps)
        if not config.rho >= 0:
            raise BulwarkInputError("defense.rho must be >= 0")
        check_layers(config.layers)
        self.hooks: BlockHooks | None = None
        self.generator = torch.Generator()
        self._hidden = 0

    def attach(self, engine: TrainingView) -> None:
        self.hooks = BlockHooks(find_blocks(engine.module, self.config.layers))
        self._hidden = int(engine.module.config.hidden_size)
        # drawn where the activations live (a CPU stream would dominate a GPU step for big models);
        # its state goes into the per-rank checkpoint, so a resumed run draws the same noise
        device = next(engine.module.parameters()).device
        self.generator = torch.Generator(device=device)
        self.generator.manual_seed(self.config.seed * 1_000_003 + engine.rank)

    def loss(self, engine: TrainingView, batch: Batch) -> torch.Tensor:
        self.hooks.offsets = {}
        if self.config.rho > 0:
            std = math.sqrt(self.config.rho)
            self.hooks.offsets = gaussian_offsets(batch, self._hidden, len(self.hooks), std, self.generator)
        return engine.forward_loss(batch)

    def after_step(self, engine: TrainingView, step: int) -> None:
        self.hooks.offsets = {}

    def state_dict(self) -> dict[str, Any]:
        return {"generator": self.generator.get_state()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.generator.set_state(state["generator"])
