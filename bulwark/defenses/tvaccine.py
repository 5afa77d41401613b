"""T-Vaccine: targeted, layer-wise Vaccine (Liu et al., 2024).

"Targeted Vaccine: Safety Alignment for Large Language Models against Harmful Fine-Tuning via
Layer-wise Perturbation" (Lslland/T-Vaccine). Vaccine (see vaccine.py) perturbs every layer's hidden
state; T-Vaccine perturbs only safety-critical layers, found by how strongly harmful data pulls on them,
and trains only those layers:

    every K steps (probe):     s_l = ||∂h(w)/∂h_l||   on a batch of the harmful stream, h = its loss
    every J steps (resample):  S = n layers drawn without replacement, one after another, each with
                               probability s_l / Σ_{l' not yet drawn} s_l'
    every micro-batch:         g_l = ∂f/∂h_l (l ∈ S),  e_l = ρ g_l / (||g_S|| + 1e-7),  ||g_S||² = Σ_{l∈S} ||g_l||²
                               step ∇_w f(w; h_l ← h_l + e_l for l ∈ S), with the gradient of the
                               unselected layers' adapters set to zero (LoRA: only S's adapters train)

Defaults are the reference's: K = 200 (probability_steps), J = 20 (lisa_interval_steps), n = 8
(lisa_activated_layers), ρ = 3 (its README's intensity), attention blocks.

Distributed: the probe's squared per-layer norms are all-reduced (s_l is the norm over the global
harmful batch of the gradient of the rank-mean loss). Every rank draws from the same seeded generator
(its state is checkpointed), and rank 0's draw is then all-reduced as a one-hot so every rank uses the
same layers even if float reductions differed in the last bit. The perturbation norm is all-reduced
over ranks as in Vaccine (same data-parallel and grad-accumulation semantics: see vaccine.py).

Freezing (`freeze`): "lora" (default) freezes the LoRA adapters (parameters named lora_*) of the
unselected decoder layers, "all" every trainable parameter in them, "none" nothing. Under full
fine-tuning "lora" therefore freezes nothing: only the perturbation is targeted. Frozen means what the
reference's requires_grad=False means: the step leaves those weights and their optimizer state alone.
Under ZeRO the optimizer steps one flat fp32 partition per group, so requires_grad cannot change per
layer after start; instead
- their gradient is zeroed by a tensor hook (before DeepSpeed reduces or partitions it), so they add
  nothing to the clipping norm, as in the reference;
- `before_step` (inside the optimizer step) copies their elements of this rank's fp32 master shard and
  of every optimizer-state tensor shaped like the shard (AdamW: exp_avg, exp_avg_sq), and a post-step
  hook writes them back before DeepSpeed copies the shard into the 16-bit weights. So neither weight
  decay nor the momentum of earlier selections moves a frozen layer, and its moments are what they
  were when it was last trained (zero if never: torch creates the state at zero). The elements are
  found with the engine's `shard_slice`, once, at attach.
Residual: AdamW keeps ONE step count t per flat partition, which advances every step; requires_grad=False
would keep a count s per parameter, of its own updates only. A layer drawn again after being frozen
therefore gets its bias correction from t: its update is sqrt(1 - b2^t) / (1 - b1^t) over
sqrt(1 - b2^s) / (1 - b1^s) times the reference's (AdamW defaults, a layer trained a quarter of the
steps: 1.86x at t = 400, 1.69x at 1000, 1.25x at 4000, 1.04x at 10000). Memory: the copies are up to 3
fp32 shard-sized buffers during the step.

Differences from the reference and why:
- The probe uses one micro-batch of the harmful stream (the reference: a batch of 1 row).
- Frozen layers: the paper freezes whole unselected layers; the reference only toggles the adapters of
  the attention modules (its layer list), leaving MLP adapters always trainable. Here the unit is the
  decoder layer, as in the paper.
- The reference also activates layer i-1 next to each selected i on models with > 26 layers (a
  memory detail of its patched model code); not done here.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from bulwark.defenses.base import Defense, MemoryCost, ShardIter, Stream, TrainingView, register
from bulwark.defenses.perturbation import (
    BlockHooks,
    adversarial_offsets,
    check_layers,
    extra_pass,
    find_blocks,
)
from bulwark.errors import BulwarkInputError
from bulwark.losses import model_loss

Batch = dict[str, torch.Tensor]
FREEZE_MODES = ("lora", "all", "none")


@dataclass
class TVaccineConfig:
    rho: float = 3.0  # perturbation radius over the selected layers (reference README: intensity 3)
    n_layers: int = 8  # layers perturbed and trained at a time (all of them if the model has fewer)
    resample_every: int = 20  # optimizer steps between layer draws
    probe_every: int = 200  # optimizer steps between harmful-gradient probes
    layers: str = "attention"  # attention | decoder: which output of each decoder layer is perturbed
    freeze: str = "lora"  # lora | all | none: which parameters of unselected layers the step leaves alone
    seed: int = 0  # layer-sampling generator seed, the same on every rank
    own_trace: bool = True  # ZeRO-3: the probe and pass 1 each keep their own prefetch trace (see vaccine.py)


def sample_layers(norms: torch.Tensor, n: int, generator: torch.Generator) -> list[int]:
    """`n` distinct indices drawn one after another, each with probability proportional to `norms`
    among those not drawn yet (numpy's choice(replace=False, p=norms/sum)). Layers with zero norm
    come last, uniformly, when the others are used up."""
    weights = norms.detach().to("cpu", torch.float64).clamp_min(0.0).clone()
    weights[~torch.isfinite(weights)] = 0.0
    left = torch.ones_like(weights, dtype=torch.bool)
    chosen = []
    for _ in range(min(n, weights.numel())):
        w = torch.where(left, weights, torch.zeros_like(weights))
        if w.sum() <= 0:
            w = left.to(torch.float64)
        cumulative = w.cumsum(0)
        u = torch.rand((), generator=generator, dtype=torch.float64) * cumulative[-1]
        index = int(torch.searchsorted(cumulative, u, right=True).clamp_max(weights.numel() - 1))
        while w[index] <= 0:  # u landed exactly on a boundary before a zero-weight entry
            index -= 1
        chosen.append(index)
        left[index] = False
    return sorted(chosen)


@register
class TVaccine(Defense):
    name = "t-vaccine"
    stages = ("align",)
    Config = TVaccineConfig
    side_streams = ("harmful",)
    summary = "Vaccine on n layers sampled by harmful-gradient norm; only their adapters train"
    # _probe: a zero probe z_l (activation dtype) on EVERY block; later e_l on the n selected ones only
    # ... and, during the optimizer step, the frozen elements of the fp32 shard and of AdamW's two moments
    memory = MemoryCost(layer_outputs=1, fp32_copies=3.0,
                        what="one probe / perturbation per layer output (activation dtype); frozen weights and "
                             "moments during the step (fp32)")

    def __init__(self, config: TVaccineConfig, total_steps: int) -> None:
        super().__init__(config, total_steps)
        checks = [
            (config.rho >= 0, "defense.rho must be >= 0"),
            (config.n_layers >= 1, "defense.n_layers must be >= 1"),
            (config.resample_every >= 1 and config.probe_every >= 1,
             "defense.resample_every and defense.probe_every must be >= 1"),
            (config.freeze in FREEZE_MODES, f"defense.freeze must be one of {', '.join(FREEZE_MODES)}"),
        ]
        for ok, message in checks:
            if not ok:
                raise BulwarkInputError(message)
        check_layers(config.layers)
        self.hooks: BlockHooks | None = None
        self.generator = torch.Generator().manual_seed(config.seed)
        self.norms: torch.Tensor | None = None  # s_l from the last probe (float64, CPU)
        self.selected: list[int] = []
        self._selected_set: frozenset[int] = frozenset()
        self.last_probe = -1  # optimizer step of the last probe / draw: once per step, not per micro-batch
        self.last_sample = -1
        self._step = 0
        self._probe_batch: Batch | None = None
        self._grad_norm = 0.0
        self.frozen_numel: list[int] = []  # per decoder layer: elements whose gradient is zeroed when unselected
        self._view: TrainingView | None = None
        # per decoder layer: (shard index, start, length) of its freezable elements in this rank's shards
        self._layer_slices: list[list[tuple[int, int, int]]] = []
        # shard index -> (frozen (start, length) ranges, copies before the step; None: state not created yet)
        self._saved: dict[int, tuple[list[tuple[int, int]], dict[str, torch.Tensor | None]]] = {}

    def attach(self, engine: TrainingView) -> None:
        self.hooks = BlockHooks(find_blocks(engine.module, self.config.layers))
        decoder_layers = find_blocks(engine.module, "decoder")
        self._view = engine
        for index, layer in enumerate(decoder_layers):
            numel, slices = 0, []
            for name, p in layer.named_parameters():
                if p.requires_grad and self._freezes(name):
                    p.register_hook(self._gradient_gate(index))
                    numel += engine.full_numel(p)
                    where = engine.shard_slice(p)
                    if where is not None:
                        slices.append(where)
            self.frozen_numel.append(numel)
            self._layer_slices.append(slices)
        if any(self._layer_slices):
            engine.add_post_step_hook(self._restore_frozen)

    def _freezes(self, name: str) -> bool:
        return self.config.freeze == "all" or (self.config.freeze == "lora" and "lora_" in name)

    def _gradient_gate(self, index: int) -> Callable[[torch.Tensor], torch.Tensor | None]:
        def gate(grad: torch.Tensor) -> torch.Tensor | None:
            return None if index in self._selected_set else torch.zeros_like(grad)

        return gate

    def _frozen_ranges(self, shard_index: int) -> list[tuple[int, int]]:
        """Sorted, merged (start, length) of the unselected layers' freezable elements in one shard."""
        spans = sorted(
            (start, length)
            for layer, slices in enumerate(self._layer_slices) if layer not in self._selected_set
            for index, start, length in slices if index == shard_index and length > 0
        )
        merged: list[tuple[int, int]] = []
        for start, length in spans:
            if merged and merged[-1][0] + merged[-1][1] == start:
                merged[-1] = (merged[-1][0], merged[-1][1] + length)
            else:
                merged.append((start, length))
        return merged

    def _step_tensors(self, shard: torch.Tensor) -> dict[str, torch.Tensor]:
        """The fp32 weights and every optimizer-state tensor laid out like them (not AdamW's scalar step)."""
        state = self._view.optimizer_state(shard)
        moments = {k: v for k, v in state.items() if torch.is_tensor(v) and v.shape == shard.shape}
        return {"weight": shard.detach(), **moments}

    def before_step(self, shards: ShardIter) -> None:
        self._saved = {}
        if not any(self._layer_slices):
            return
        for index, shard in shards:
            ranges = self._frozen_ranges(index)
            if not ranges:
                continue
            with torch.no_grad():
                copies: dict[str, torch.Tensor | None] = {
                    key: torch.cat([t.view(-1).narrow(0, start, length) for start, length in ranges])
                    for key, t in self._step_tensors(shard).items()
                }
            self._saved[index] = (ranges, copies)

    def _restore_frozen(self, shards: list[tuple[int, torch.Tensor]]) -> None:
        for index, shard in shards:
            saved = self._saved.pop(index, None)
            if saved is None:
                continue
            ranges, copies = saved
            with torch.no_grad():
                for key, t in self._step_tensors(shard).items():
                    # absent before: this step created the state, and torch creates it at zero
                    old, flat, at = copies.get(key), t.view(-1), 0
                    for start, length in ranges:
                        target = flat.narrow(0, start, length)
                        if old is None:
                            target.zero_()
                        else:
                            target.copy_(old.narrow(0, at, length))
                        at += length

    # ---- the loop hooks -------------------------------------------------------------------------

    def next_batch(self, streams: dict[str, Stream], step: int) -> Batch:
        self._step = step
        if step % self.config.probe_every == 0 and self.last_probe != step:
            self._probe_batch = streams["harmful"].next_batch()
            self.last_probe = step
        return streams["main"].next_batch()

    def loss(self, engine: TrainingView, batch: Batch) -> torch.Tensor:
        self.hooks.offsets = {}
        if self._probe_batch is not None:
            device = batch["input_ids"].device
            self.norms = self._probe(engine, {k: v.to(device) for k, v in self._probe_batch.items()})
            self._probe_batch = None
        if self._step % self.config.resample_every == 0 and self.last_sample != self._step:
            self._select(self._draw(engine, batch["input_ids"].device))
            self.last_sample = self._step
        self.hooks.offsets, self._grad_norm = adversarial_offsets(
            engine, self.hooks, batch, self.config.rho, self.selected, self.config.own_trace
        )
        return engine.forward_loss(batch)

    def after_step(self, engine: TrainingView, step: int) -> None:
        self.hooks.offsets = {}

    # ---- probe and draw --------------------------------------------------------------------------

    def _probe(self, engine: TrainingView, batch: Batch) -> torch.Tensor:
        """s_l = ||∂h/∂h_l|| over the global harmful batch (h = mean over ranks of their losses)."""
        indices = list(range(len(self.hooks)))
        with extra_pass(engine, "t-vaccine-probe", self.config.own_trace):
            grads = self.hooks.hidden_grads(lambda: model_loss(engine.module, batch), indices)
        sq = torch.stack([grads[i].float().pow(2).sum() for i in indices])
        sq = engine.all_reduce_sum(sq)
        return (sq.sqrt() / engine.world_size).to("cpu", torch.float64)

    def _draw(self, engine: TrainingView, device: torch.device) -> list[int]:
        if self.norms is None:
            raise RuntimeError("t-vaccine: layer draw before any probe (a checkpoint without norms?)")
        drawn = sample_layers(self.norms, self.config.n_layers, self.generator)  # same draw on every rank
        onehot = torch.zeros(len(self.hooks), device=device)
        if engine.rank == 0:
            onehot[drawn] = 1.0
        onehot = engine.all_reduce_sum(onehot)
        return [int(i) for i in torch.nonzero(onehot.cpu() > 0.5).flatten()]

    def _select(self, layers: list[int]) -> None:
        self.selected = sorted(layers)
        self._selected_set = frozenset(self.selected)

    # ---- reporting, state -----------------------------------------------------------------------

    def metrics(self) -> dict[str, Any]:
        return {"tvaccine_layers": list(self.selected), "vaccine_grad_norm": self._grad_norm}

    def state_dict(self) -> dict[str, Any]:
        return {
            "generator": self.generator.get_state(),
            "norms": None if self.norms is None else self.norms.clone(),
            "selected": list(self.selected),
            "last_probe": self.last_probe,
            "last_sample": self.last_sample,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.generator.set_state(state["generator"])
        self.norms = None if state["norms"] is None else state["norms"].clone()
        self.selected = list(state["selected"])
        self._selected_set = frozenset(self.selected)
        self.last_probe, self.last_sample = state["last_probe"], state["last_sample"]
