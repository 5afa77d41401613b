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

How it runs here:
- Both passes see the perturbation through forward hooks on the blocks, out of place (h + e is a new
  tensor; no `.data` write, unlike the reference, with the same gradient: ∂(h + e)/∂h = I).
- Pass 1 goes through `engine.module` and differentiates w.r.t. a zero tensor z_l added to h_l
  (∂f/∂z_l = ∂f/∂h_l) with `torch.autograd.grad`: no weight gradient is computed or accumulated, and
  the backward stops at the lowest perturbed block. The reference runs a full backward with module
  backward hooks and throws the weight gradients away.
- The perturbations stay set until the next micro-batch's loss (or after_step): a backward that
  recomputes activations (gradient checkpointing) must add them again.
`BlockHooks` and `adversarial_offsets` are also what T-Vaccine and a perturbation-aware Booster
(`booster+vaccine`) use: arm the offsets, then run the stepping pass.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import dataclass
from typing import Any

import torch

from bulwark.defenses.base import Defense, MemoryCost, TrainingView, register
from bulwark.errors import BulwarkInputError
from bulwark.losses import model_loss

Batch = dict[str, torch.Tensor]
BLOCK_KINDS = ("attention", "decoder")
NORM_EPS = 1e-7  # the reference's guard in rho / (||g|| + eps)


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


def find_blocks(module: torch.nn.Module, layers: str) -> list[torch.nn.Module]:
    """The blocks whose outputs are perturbed, in depth order: decoder layers or their attention."""
    decoder = [m for m in module.modules() if type(m).__name__.endswith("DecoderLayer")]
    if not decoder:
        raise BulwarkInputError(
            f"defense.layers: found no '*DecoderLayer' module in {type(module).__name__}; "
            "Vaccine-style defenses need a decoder-only transformer (Llama, Qwen2, Mistral, Gemma, OPT, ...)"
        )
    if layers == "decoder":
        return decoder
    blocks = [getattr(layer, "self_attn", None) for layer in decoder]
    if any(b is None for b in blocks):
        raise BulwarkInputError(
            f"defense.layers=attention: {type(decoder[0]).__name__} has no 'self_attn'; use defense.layers=decoder"
        )
    return blocks


def check_layers(layers: str) -> None:
    if layers not in BLOCK_KINDS:
        raise BulwarkInputError(f"defense.layers must be one of {', '.join(BLOCK_KINDS)} (got '{layers}')")


class BlockHooks:
    """Forward hooks on the output h_l of each block: add a zero probe z_l (pass 1) or an offset e_l.

    Attention blocks return a tuple (h, weights), decoder layers (transformers 5) a tensor; only h is
    replaced, out of place. Blocks with nothing to add pass their output through untouched.
    """

    def __init__(self, blocks: list[torch.nn.Module]) -> None:
        self.blocks = blocks
        self.offsets: dict[int, torch.Tensor] = {}  # e_l by block index, added while set
        self._probes: dict[int, torch.Tensor] | None = None  # z_l while probing
        self._probe_set: set[int] = set()
        self.handles = [block.register_forward_hook(self._hook_for(i)) for i, block in enumerate(blocks)]

    def __len__(self) -> int:
        return len(self.blocks)

    def _hook_for(self, index: int) -> Callable[..., Any]:
        def hook(module: torch.nn.Module, args: Any, output: Any) -> Any:
            h = output[0] if isinstance(output, tuple) else output
            if self._probes is not None and index in self._probe_set:
                # one z per block per pass: a recomputing backward (checkpointing) reuses it
                add = self._probes.get(index)
                if add is None:
                    add = self._probes[index] = torch.zeros_like(h, requires_grad=True)
            elif index in self.offsets:
                add = self.offsets[index]
            else:
                return None
            if add.shape != h.shape:
                raise RuntimeError(f"block {index}: output {tuple(h.shape)} != perturbation {tuple(add.shape)}")
            h = h + add.to(h.dtype)
            return (h, *output[1:]) if isinstance(output, tuple) else h

        return hook

    @contextmanager
    def probing(self, indices: list[int]) -> Iterator[dict[int, torch.Tensor]]:
        """Inside: every forward adds z_l (zeros, requires grad) to the blocks in `indices`."""
        self._probes, self._probe_set = {}, set(indices)
        try:
            yield self._probes
        finally:
            self._probes, self._probe_set = None, set()

    def hidden_grads(self, loss_fn: Callable[[], torch.Tensor], indices: list[int]) -> dict[int, torch.Tensor]:
        """∂loss/∂h_l for l in `indices`, by autograd.grad: no weight gradient is computed."""
        with self.probing(indices) as probes:
            loss = loss_fn()
            missing = [i for i in indices if i not in probes]
            if missing:
                raise RuntimeError(f"blocks {missing} did not run in the forward pass")
            grads = torch.autograd.grad(loss, [probes[i] for i in indices])
        return dict(zip(indices, grads, strict=True))

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()


def extra_pass(engine: TrainingView, kind: str, own_trace: bool) -> AbstractContextManager:
    """`engine.extra_pass(kind)` unless `own_trace` is off (`defense.own_trace=false`).

    Under ZeRO-3 the parameter prefetch replays the module order recorded between two forwards.
    Pass 1 (forward + a backward that stops at the lowest perturbed block) and pass 2 (forward + full
    backward) differ, so with one trace it is invalidated every pass and every parameter is fetched
    on demand, one module at a time (measured, tiny model, 2 ranks: Vaccine 2.1-2.4x SFT with one
    trace; see docs/BENCHMARKS.md for the figure with one trace per kind of pass).
    """
    return engine.extra_pass(kind) if own_trace else nullcontext()


def adversarial_offsets(
    engine: TrainingView, hooks: BlockHooks, batch: Batch, rho: float, indices: list[int], own_trace: bool = True
) -> tuple[dict[int, torch.Tensor], float]:
    """Pass 1: e_l = rho g_l / (||g|| + 1e-7) for l in `indices`, ||g|| all-reduced over ranks.

    Returns the offsets (in the activations' dtype) and ||g||. Runs through `engine.module`, never
    the engine's forward (DESIGN.md: multi-pass), with its own ZeRO-3 prefetch trace unless `own_trace`
    is False.
    """
    if not indices or rho == 0:
        return {}, 0.0
    with extra_pass(engine, "vaccine", own_trace):
        grads = hooks.hidden_grads(lambda: model_loss(engine.module, batch), indices)
    sq = torch.zeros((), dtype=torch.float32, device=batch["input_ids"].device)
    for g in grads.values():
        sq = sq + g.float().pow(2).sum()
    norm = engine.all_reduce_sum(sq.reshape(1)).sqrt()
    scale = rho / (norm + NORM_EPS)
    offsets = {i: (g.float() * scale).to(g.dtype).detach() for i, g in grads.items()}
    return offsets, float(norm.item())


def gaussian_offsets(
    batch: Batch, hidden_size: int, n_blocks: int, std: float, generator: torch.Generator
) -> dict[int, torch.Tensor]:
    """N(0, std²) noise for every block, drawn row by row (all blocks of row 0, then row 1, ...):
    a micro-batch of 2B rows gets the same noise as two micro-batches of B rows in turn."""
    rows, tokens = batch["input_ids"].shape
    device = generator.device
    draws = [[torch.randn(tokens, hidden_size, generator=generator, device=device) for _ in range(n_blocks)]
             for _ in range(rows)]
    target = batch["input_ids"].device
    return {b: torch.stack([draws[r][b] for r in range(rows)]).mul_(std).to(target) for b in range(n_blocks)}


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
