"""Hidden states at a decoder layer and their gradients, computed one decoder layer at a time.

Recover needs two things from a model: the mean last-token hidden state after decoder layer L over a set
of prompts, and the gradient of a function of that mean with respect to the weights of layers below L.
Both are computed here layer by layer:

- forward: the model runs up to its first decoder layer (a pre-hook captures that layer's inputs and
  stops the pass), then each layer i < L runs on its own; the input of every layer is kept (detached).
- backward: from layer L-1 down to the lowest layer whose weights are wanted, each layer is run again
  from its kept input and backpropagated on its own (layer-level activation checkpointing).

Each layer runs inside `bulwark.engine.partitioned.gathered(layer params)`: a no-op for plain parameters
and a whole-layer, read-only gather for ZeRO-3 partitioned ones, so no step ever needs more than one layer
whole (the embeddings and the other weights outside the decoder layers are gathered together, once per
forward). Forward and backward loop over layers outside and batches inside: one gather per layer and step,
and every rank gathers the same layers in the same order whatever its number of batches.

Device: every tensor made here (batches moved for a forward, hidden-state sums, per-layer gradient sums)
lives on the device the model's weights live on (`weights_device`): this rank's GPU for a ZeRO-3 model under
NCCL or a plain model moved there, else the CPU. Batches are built on the CPU once and moved per forward.

Prompts are right-padded (a causal model's real tokens never see the padding after them, and positions
stay those of the unpadded prompt); the last real token of each row is read at `Batch.last`.
Micro-batches have a fixed composition, independent of the number of ranks: a rank takes batches
r, r + world, ... and per-batch results are summed in float64, so sums do not depend on the world size.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch

from bulwark.engine import all_reduce_sum
from bulwark.engine.partitioned import gathered, slice_device


@dataclass
class Batch:
    input_ids: torch.Tensor  # [rows, width], right-padded
    attention_mask: torch.Tensor  # [rows, width], 1 on real tokens
    last: torch.Tensor  # [rows], index of each row's last real token

    def to(self, device: torch.device) -> Batch:
        """This batch on `device` (itself when it is already there)."""
        if self.input_ids.device == device:
            return self
        return Batch(self.input_ids.to(device), self.attention_mask.to(device), self.last.to(device))


def weights_device(model: torch.nn.Module) -> torch.device:
    """Where the model's weights live: a ZeRO-3 parameter's own slice (its `data` is an empty placeholder
    outside a gather), else the first parameter's device."""
    for param in model.parameters():
        return slice_device(param)
    return torch.device("cpu")


def prompt_ids(tokenizer: Any, text: str, max_length: int) -> list[int]:
    """Token ids of a rendered prompt (same BOS rule as training and generation), its last max_length kept."""
    ids = list(tokenizer(text, add_special_tokens=False)["input_ids"])
    bos = getattr(tokenizer, "bos_token_id", None)
    if getattr(tokenizer, "add_bos_token", False) and bos is not None and ids[:1] != [bos]:
        ids = [bos] + ids
    return ids[-max_length:]


def make_batches(prompts: list[list[int]], pad_id: int, micro_batch_size: int) -> list[Batch]:
    """Consecutive micro-batches of `micro_batch_size` prompts (token ids), right-padded."""
    batches = []
    for start in range(0, len(prompts), micro_batch_size):
        rows = prompts[start : start + micro_batch_size]
        width = max(len(r) for r in rows)
        input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for i, ids in enumerate(rows):
            input_ids[i, : len(ids)] = torch.tensor(ids, dtype=torch.long)
            mask[i, : len(ids)] = 1
        batches.append(Batch(input_ids, mask, mask.sum(dim=1) - 1))
    return batches


def local_batches(batches: list[Batch], rank: int, world: int) -> list[Batch]:
    return batches[rank::world]


def count_rows(batches: list[Batch]) -> int:
    return sum(int(b.input_ids.shape[0]) for b in batches)


def decoder_layers(model: torch.nn.Module) -> tuple[str, torch.nn.ModuleList]:
    """(qualified name, module list) of the model's decoder layers: the ModuleList with one entry per layer."""
    depth = getattr(model.config, "num_hidden_layers", None)
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.ModuleList) and len(module) == depth:
            return name, module
    raise ValueError(f"{type(model).__name__}: found no list of {depth} decoder layers")


class _StopForward(Exception):
    """Raised by the pre-hook on the first decoder layer once its inputs are captured."""


@dataclass
class _Pass:
    """One micro-batch's forward: the input of every layer from `lowest` to L-1, and the layer arguments."""

    batch: Batch
    inputs: dict[int, torch.Tensor]
    args: tuple
    kwargs: dict[str, Any]


class LayerwiseModel:
    """Forward to the output of decoder layer L and backward to the weights of layers [lowest, L)."""

    def __init__(self, model: torch.nn.Module, layer: int, lowest: int = 0) -> None:
        self.model = model
        self.prefix, self.layers = decoder_layers(model)
        if not 1 <= layer <= len(self.layers):
            raise ValueError(f"layer {layer} outside 1..{len(self.layers)}")
        self.layer, self.lowest = layer, lowest
        self.device = weights_device(model)
        inside = {id(p) for p in self.layers.parameters()}
        self.outer_params = [p for p in model.parameters() if id(p) not in inside]

    # ---- forward ---------------------------------------------------------------------------------

    def _layer_inputs(self, batch: Batch) -> tuple[torch.Tensor, tuple, dict[str, Any]]:
        """Run the model up to its first decoder layer: (hidden states, other args, kwargs) of that call.

        The caller gathers the parameters outside the decoder layers (embeddings) around it."""
        captured: dict[str, Any] = {}

        def hook(module: torch.nn.Module, args: tuple, kwargs: dict[str, Any]) -> None:
            captured["args"], captured["kwargs"] = args, dict(kwargs)
            raise _StopForward

        handle = self.layers[0].register_forward_pre_hook(hook, with_kwargs=True)
        try:
            self.model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, use_cache=False)
        except _StopForward:
            pass
        finally:
            handle.remove()
        args, kwargs = captured["args"], captured["kwargs"]
        if args:
            return args[0], tuple(args[1:]), kwargs
        return kwargs.pop("hidden_states"), (), kwargs

    def _run_layer(self, index: int, hidden: torch.Tensor, p: _Pass) -> torch.Tensor:
        out = self.layers[index](hidden, *p.args, **p.kwargs)
        return out[0] if isinstance(out, tuple) else out

    @torch.no_grad()
    def forward(self, batches: list[Batch]) -> tuple[list[_Pass], list[torch.Tensor]]:
        """(one pass per batch, kept for a backward; each batch's last-token hidden states after layer L).

        Layer by layer over all batches: each layer is gathered once, and a rank with fewer (or no)
        batches gathers exactly what the others do (gathers are collectives under ZeRO-3).
        """
        batches = [batch.to(self.device) for batch in batches]
        with gathered(self.outer_params):
            starts = [self._layer_inputs(batch) for batch in batches]
        passes = [_Pass(batch, {}, args, kwargs) for batch, (_, args, kwargs) in zip(batches, starts, strict=True)]
        hiddens = [hidden for hidden, _, _ in starts]
        for i in range(self.layer):
            with gathered(list(self.layers[i].parameters())):
                for j, p in enumerate(passes):
                    if i >= self.lowest:
                        p.inputs[i] = hiddens[j]
                    hiddens[j] = self._run_layer(i, hiddens[j], p)
        lasts = [h[torch.arange(h.shape[0], device=h.device), p.batch.last] for h, p in zip(hiddens, passes, strict=True)]
        return passes, lasts

    def mean_last_hidden(self, batches: list[Batch], total_rows: int) -> tuple[list[_Pass], torch.Tensor]:
        """This rank's passes and the mean last-token hidden state over every rank's batches (float64)."""
        passes, lasts = self.forward(batches)
        total = torch.zeros(self._hidden_size(), dtype=torch.float64, device=self.device)
        for last in lasts:  # batch by batch, in batch order
            total += last.double().sum(dim=0)
        return passes, all_reduce_sum(total) / total_rows

    def _hidden_size(self) -> int:
        return int(self.model.config.hidden_size)

    # ---- backward --------------------------------------------------------------------------------

    def weight_grads(
        self, passes: list[_Pass], seed: torch.Tensor, wanted: dict[int, list[tuple[str, torch.nn.Parameter]]]
    ) -> Iterator[tuple[int, dict[str, torch.Tensor]]]:
        """Backpropagate `seed` (d loss / d last-token hidden state of every row) from layer L down.

        Yields (layer index, {weight name: this rank's gradient summed over its rows, float64}) for every
        layer in [lowest, L), top layer first; `wanted[i]` names the weights of layer i to report.
        """
        grads_out = [None] * len(passes)  # d loss / d output of the current layer, per pass
        for i in reversed(range(self.lowest, self.layer)):
            params = list(self.layers[i].parameters())
            names = wanted.get(i, [])
            with gathered(params), torch.enable_grad():
                # whole shapes here (gathered); on the weights' device, as the grads they sum
                sums = {name: torch.zeros(p.shape, dtype=torch.float64, device=self.device) for name, p in names}
                for j, p in enumerate(passes):
                    hidden_in = p.inputs[i].detach().requires_grad_(True)
                    out = self._run_layer(i, hidden_in, p)
                    if grads_out[j] is None:  # the top layer: the seed at each row's last token
                        grad = torch.zeros_like(out)
                        grad[torch.arange(out.shape[0], device=out.device), p.batch.last] = seed.to(out.device, out.dtype)
                    else:
                        grad = grads_out[j]
                    out.backward(grad)
                    grads_out[j] = hidden_in.grad
                    for name, param in names:  # per pass into float64: sums do not depend on rank order
                        if param.grad is not None:
                            sums[name] += param.grad.double()
                            param.grad = None
            yield i, sums
