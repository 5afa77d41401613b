"""What defenses compose: hidden-state perturbation (block hooks, adversarial and Gaussian offsets) and the
side batch stacked under the main one.

Vaccine perturbs the output h_l of each block with e_l = ρ g_l / (||g|| + 1e-7), g_l = ∂f/∂h_l (pass 1,
`adversarial_offsets`), then steps the weights with h_l ← h_l + e_l (pass 2). T-Vaccine perturbs only the
layers it draws, booster+vaccine perturbs Booster's alignment pass, vaccine-random adds Gaussian noise.
Each of them holds a `BlockHooks` and arms its offsets before the stepping pass; none imports another
defense.

- The offsets go in through forward hooks, out of place (h + e is a new tensor; no `.data` write), with the
  same gradient as the reference's in-place edit: ∂(h + e)/∂h = I.
- Pass 1 runs through `engine.module` and differentiates w.r.t. a zero probe z_l added to h_l
  (∂f/∂z_l = ∂f/∂h_l) with `torch.autograd.grad`: no weight gradient is computed or accumulated, and the
  backward stops at the lowest perturbed block.
- ||g|| is one L2 norm over every perturbed block, token and row, and over all ranks (all-reduced).
- The offsets stay set until the owner clears them: a backward that recomputes activations (gradient
  checkpointing) must add them again.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext
from typing import Any

import torch

from bulwark.defenses.base import TrainingView
from bulwark.errors import BulwarkInputError
from bulwark.losses import model_loss

Batch = dict[str, torch.Tensor]
BLOCK_KINDS = ("attention", "decoder")
NORM_EPS = 1e-7  # the reference's guard in rho / (||g|| + eps)


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


class StackedSideBatch:
    """A side stream's micro-batch drawn beside the main one and stacked under it into ONE forward
    (refusal_ul's negatives, RepNoise's harmful rows): `draw` in next_batch, `stack` in loss.

    Drawn in next_batch, not in loss, so the streams advance in the loop's order and a resumed run draws the
    same rows; stacked rows are right-padded to one length (bulwark.data.collate.stack_batches)."""

    def __init__(self, stream: str, owner: str) -> None:
        self.stream, self.owner = stream, owner
        self._pending: Batch | None = None

    def draw(self, streams: dict[str, Any]) -> None:
        self._pending = streams[self.stream].next_batch()

    def stack(self, batch: Batch) -> tuple[Batch, int]:
        """(main rows then side rows, on the main batch's device; the number of main rows)."""
        from bulwark.data.collate import stack_batches

        if self._pending is None:
            raise RuntimeError(f"{self.owner}: loss() without a {self.stream} batch from next_batch()")
        side = {k: v.to(batch["input_ids"].device) for k, v in self._pending.items()}
        self._pending = None
        return stack_batches(batch, side), batch["input_ids"].size(0)

