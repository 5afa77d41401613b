"""Booster: attenuating harmful perturbation at the alignment stage (Huang et al., 2024).

"Booster: Tackling Harmful Fine-tuning for Large Language Models via Attenuating Harmful
Perturbation", ICLR 2025. Alignment minimises the refusal loss f plus a regulariser that makes one
normalised step of harmful fine-tuning (on a harmful QA loss h) reduce h as little as possible:

    min_w  f(w) + λ [ h(w) - h(w - α ∇h(w) / ||∇h(w)||) ]

and, as in the reference code (git-disl/Booster), the perturbation is treated as a constant, so the
update gradient is

    g = ∇f(w) + λ ( ∇h(w) - ∇h(w') ),      w' = w - α ∇h(w) / (||∇h(w)|| + 1e-7)

with ||.|| the L2 norm over all trainable weights. Defaults are the reference's: λ = 5, α = 0.1
(script/alignment/smooth_align.sh). With LoRA only the adapter weights are perturbed and trained;
the paper's single LoRA (fine-tuning keeps training this same adapter) is `bulwark finetune
model.lora.mode=single`, which must be asked for: Bulwark's default is `double` (merge, then a fresh adapter).

Granularity (differs from the reference only with gradient accumulation): h, ∇h and ∇h(w') are
taken over the optimizer step's whole harmful batch, all micro-batches and all ranks (DeepSpeed
averages), so accumulating 2 micro-batches gives the update of one doubled micro-batch. The
reference does this per micro-batch and with its grad_accum = 1 the two coincide.

Passes per optimizer step with G micro-batches: G harmful forward/backward passes at w, G at w',
then the G refusal passes the loop runs anyway, so 3x the forward/backward work of SFT.

ZeRO-3 design (why not `torch.autograd.grad` through `engine.module`): autograd.grad w.r.t.
ZeRO-3 parameters does run, but hands every rank the full, unreduced gradient of every weight at
once, which is the whole model on each rank. Instead the harmful passes are ordinary DeepSpeed
forward/backward passes (`Engine.forward_loss` + `Engine.isolated_backward`): DeepSpeed's own
reduce-scatter puts this rank's shard of the rank-averaged gradient into its flat gradient
partition, the engine copies that shard out and puts the partition back as it was. So each rank
holds, besides ZeRO-3's usual state, shard-sized buffers during the harmful phase: at the peak (the
backward at w') six fp32 ones (∇h, its micro-batch mean, the perturbation, w + perturbation, the
saved gradient partition, the running ∇h(w') sum when grad_accum > 1) and the saved 16-bit weight
partitions (`Booster.memory`, which `bulwark plan` reads), and the communication of two extra
backward passes. The weight perturbation edits the local model-dtype
partitions every forward all-gathers from (`Engine.perturbed_weights`), with ||∇h||² summed
locally and all-reduced; afterwards the saved partitions are copied back, bit for bit.
λ (∇h - ∇h(w')) is added to this rank's gradient partition (`Engine.accumulate_local_grads`) and
the loop's refusal pass then adds ∇f on top.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from bulwark.defenses.base import Defense, MemoryCost, Stream, TrainingView, register
from bulwark.defenses.perturbation import Batch, BlockHooks, adversarial_offsets, check_layers, find_blocks
from bulwark.errors import BulwarkInputError


@dataclass
class BoosterConfig:
    lamb: float = 5.0  # λ: weight of the harmful-perturbation attenuation term (reference --lamb)
    alpha: float = 0.1  # α: step size of the simulated harmful step (reference --alpha)
    eps: float = 1e-7  # added to ||∇h|| as in the reference


def harmful_perturbation(grads: list[torch.Tensor], engine: TrainingView, alpha: float,
                         eps: float) -> tuple[list[torch.Tensor], float]:
    """-α g / (||g|| + eps) for this rank's shards of g, with ||g|| over all ranks; returns (deltas, ||g||)."""
    squares = torch.zeros(1, dtype=torch.float64, device=grads[0].device)
    for g in grads:
        squares += g.double().pow(2).sum()
    norm = float(engine.all_reduce_sum(squares).sqrt().item())
    scale = -alpha / (norm + eps)
    return [g * scale for g in grads], norm


@register
class Booster(Defense):
    name = "booster"
    stages = ("align",)
    Config = BoosterConfig
    side_streams = ("harmful",)
    summary = "align while attenuating the loss drop of a simulated harmful step: f + λ[h(w) - h(w - α∇h/|∇h|)]"
    # peak = the w' harmful backward: fp32 grads, mean, deltas, w + delta, saved grad partition, perturbed sum
    # (that one only with grad_accum > 1), plus the 16-bit partitions perturbed_weights saves
    memory = MemoryCost(fp32_copies=6, dtype_copies=1,
                        what="harmful-phase gradient, perturbation and saved-partition copies (sharded)")

    def __init__(self, config: BoosterConfig, total_steps: int,
                 alignment_loss: Callable[[TrainingView, Batch], torch.Tensor] | None = None) -> None:
        super().__init__(config, total_steps)
        # f, the stepping pass: the engine's plain forward, or a composing defense's (booster+vaccine)
        self.alignment_loss = alignment_loss or (lambda engine, batch: engine.forward_loss(batch))
        if config.lamb < 0 or config.alpha < 0 or config.eps <= 0:
            raise BulwarkInputError("defense.lamb and defense.alpha must be >= 0 and defense.eps > 0")
        self.grad_accum = 1
        self._step_seen: int | None = None  # optimizer step whose harmful batches are drawn
        self._harmful: list[Batch] = []  # this step's harmful micro-batches, until the harmful phase ran
        self._last: dict[str, float] = {}

    def attach(self, engine: TrainingView) -> None:
        self.grad_accum = engine.grad_accum_steps()

    def next_batch(self, streams: dict[str, Stream], step: int) -> Batch:
        if step != self._step_seen:  # the first micro-batch of an optimizer step
            self._step_seen = step
            self._harmful = [streams["harmful"].next_batch() for _ in range(self.grad_accum)]
        return streams["main"].next_batch()

    def loss(self, engine: TrainingView, batch: Batch) -> torch.Tensor:
        if self._harmful:
            device = batch["input_ids"].device  # the loop moved the main batch; the harmful ones follow it
            self.harmful_phase(engine, [{k: v.to(device) for k, v in b.items()} for b in self._harmful])
            self._harmful = []
        return self.alignment_loss(engine, batch)

    def harmful_phase(self, engine: TrainingView, harmful: list[Batch]) -> None:
        """Add λ (∇h(w) - ∇h(w')) over this step's harmful batches to this rank's gradient shard."""
        cfg = self.config
        grads, h_clean = self._harmful_grads(engine, harmful)
        mean = [g / len(harmful) for g in grads]  # the step's ∇h: DeepSpeed averages micro-batches
        deltas, norm = harmful_perturbation(mean, engine, cfg.alpha, cfg.eps)
        with engine.perturbed_weights(deltas):
            perturbed, h_perturbed = self._harmful_grads(engine, harmful)
        # sums over micro-batches; accumulate_local_grads weighs them 1 / grad_accum like a loss
        engine.accumulate_local_grads([cfg.lamb * (g - p) for g, p in zip(grads, perturbed, strict=True)])
        self._last = {"booster_h": h_clean, "booster_h_perturbed": h_perturbed, "booster_grad_norm": norm}

    def _harmful_grads(self, engine: TrainingView, harmful: list[Batch]) -> tuple[list[torch.Tensor], float]:
        total: list[torch.Tensor] = []
        loss_sum = 0.0
        for batch in harmful:
            loss = engine.forward_loss(batch)
            loss_sum += float(loss.detach())
            grads = engine.isolated_backward(loss)
            total = grads if not total else [t.add_(g) for t, g in zip(total, grads, strict=True)]
        return total, loss_sum / len(harmful)

    def metrics(self) -> dict[str, Any]:
        return dict(self._last)  # this rank's harmful loss before/after the simulated step, and ||∇h||


@dataclass
class BoosterVaccineConfig(BoosterConfig):
    rho: float = 5.0  # Vaccine's perturbation radius on the alignment pass (reference smooth_align_perturb.sh)
    layers: str = "attention"  # the blocks Vaccine perturbs: attention outputs (reference) or decoder layers
    own_trace: bool = True  # ZeRO-3: Vaccine's pass 1 keeps its own prefetch trace (see perturbation.py)


@register
class BoosterVaccine(Defense):
    """Booster with Vaccine's perturbation-aware alignment pass (the reference's --perturb_aware True).

    The harmful phase is Booster's, unperturbed; the refusal loss f is then taken Vaccine's way: pass 1
    finds e_l = ρ ∂f/∂h_l / (||∂f/∂h|| + 1e-7) on the attention outputs (one norm over all ranks),
    pass 2, the stepping pass, adds e_l. The update gradient is ∇_w f(w; h + e) + λ (∇h(w) - ∇h(w')).
    Composed, not inherited: a `Booster` whose alignment pass is this class's perturbed one.
    """

    name = "booster+vaccine"
    stages = ("align",)
    Config = BoosterVaccineConfig
    side_streams = ("harmful",)
    summary = "Booster whose alignment pass is Vaccine's: refusal loss under the worst hidden-state drift (rho)"
    # Booster's harmful-phase copies, then adversarial_offsets' e_l (activation dtype) on every layer
    memory = MemoryCost(fp32_copies=6, dtype_copies=1, layer_outputs=1,
                        what="Booster's copies (sharded) + one perturbation per layer output")

    def __init__(self, config: BoosterVaccineConfig, total_steps: int) -> None:
        super().__init__(config, total_steps)
        if not config.rho >= 0:
            raise BulwarkInputError("defense.rho must be >= 0")
        check_layers(config.layers)
        self.booster = Booster(BoosterConfig(config.lamb, config.alpha, config.eps), total_steps,
                               alignment_loss=self.alignment_loss)
        self.hooks: BlockHooks | None = None
        self._vaccine_norm = 0.0

    def attach(self, engine: TrainingView) -> None:
        self.booster.attach(engine)
        self.hooks = BlockHooks(find_blocks(engine.module, self.config.layers))

    def next_batch(self, streams: dict[str, Stream], step: int) -> Batch:
        return self.booster.next_batch(streams, step)

    def loss(self, engine: TrainingView, batch: Batch) -> torch.Tensor:
        self.hooks.offsets = {}  # the harmful passes run unperturbed, as in the reference
        return self.booster.loss(engine, batch)

    def alignment_loss(self, engine: TrainingView, batch: Batch) -> torch.Tensor:
        indices = list(range(len(self.hooks)))
        self.hooks.offsets, self._vaccine_norm = adversarial_offsets(
            engine, self.hooks, batch, self.config.rho, indices, self.config.own_trace
        )
        return engine.forward_loss(batch)  # kept armed through this micro-batch's backward

    def after_step(self, engine: TrainingView, step: int) -> None:
        self.hooks.offsets = {}

    def metrics(self) -> dict[str, Any]:
        return {**self.booster.metrics(), "vaccine_grad_norm": self._vaccine_norm}
