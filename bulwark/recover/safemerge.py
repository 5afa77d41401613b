"""SafeMERGE (Djuhera et al. 2025, "SafeMERGE: Preserving Safety Alignment in Fine-Tuned Large Language
Models via Selective Layer-Wise Model Merging"; reference code aladinD/SafeMERGE), written anew.

Per weight matrix l that fine-tuning changed, with the SafeLoRA subspace (bulwark/recover/subspace.py):
  V_l   = W_aligned,l - W_base,l               the alignment matrix (out x in)
  C_l   = V_l V_l^T / ||V_l||_F                 SafeLoRA's projection operator (out x out)
  dW_l                                          the fine-tuning update: s B A for a LoRA layer (s = alpha / r,
                                                or alpha / sqrt(r) with rsLoRA), W_ft,l - W_aligned,l for full FT
  cos_l = <C_l dW_l, dW_l> / (||C_l dW_l|| ||dW_l||)      flattened matrices; in [0, 1] since C_l is PSD
A layer strays from the safety subspace when cos_l < threshold (default 0.35); it is then merged with its
safe counterpart by a weighted average, weights (w_ft, w_safe) = (0.8, 0.2) by default, w_ft + w_safe = 1:
  W_l = w_ft W_ft,l + w_safe W_safe,l = W_aligned,l + w_ft dW_l       (W_safe,l = W_aligned,l)
A layer with cos_l >= threshold keeps its fine-tuned weight bit for bit. Layers where V_l = 0 (alignment
left them alone, so there is no subspace to stray from) or dW_l = 0 are kept and logged with cos = None.

The safe counterpart. The reference merges the fine-tuned LoRA with a second, safety-tuned LoRA trained on
the same aligned model, per layer, by PEFT's "linear" add_weighted_adapter with weights [0.8, 0.2] for
straying layers and [1, 0] for the others. Bulwark has no safety-tuned adapter; its safe model is the
aligned model A itself, whose update over A is zero, so the weighted average of the two layers is A's layer
plus w_ft of the update. Two further departures, both documented in docs/RECOVER.md:
- PEFT's "linear" combination averages the A and B factors separately (sqrt-weighted), so its merged delta
  carries cross terms B_ft A_safe; here the merge is the weighted average of the weights themselves, which
  is what the paper's equation states.
- The reference sets C = 0 where V = 0, which gives cos = 0 and merges the layer; here it is kept.
Which layers: every LoRA layer of the adapter (as the reference, which takes the adapter's target modules);
for full fine-tuning, the 2-D weights whose module is named in `safemerge.target_modules`.

Inputs and outputs (as safelora): a LoRA adapter trained on top of A gives `model/` = A plus each layer's
kept or down-weighted update, and `adapter/` = the same adapter with B scaled by w_ft in the merged layers
(w_ft s B A keeps the rank); a full fine-tuned folder gives `model/` = B with the merged layers replaced.

Ranks. The costly part is C_l (out x out) and C_l dW_l; the merge itself is elementwise. So the weights to
judge are dealt round-robin over the ranks in name order; each rank reads only its own weights' tensors, one
weight at a time, computes cos on `bulwark.engine.dist.device()`, and the decisions (name, cos, merged?) are
gathered to rank 0, which writes the folder shard by shard (write_model) and does the merge arithmetic as it
streams each tensor past. The merged tensors are not computed on their owner ranks and sent over: rank 0
has to read every tensor to write the folder anyway, and shipping them would move a model's worth of data
through the process group. Doing all merge arithmetic on rank 0 also makes the written model identical bit
for bit at any world size (only the decisions cross ranks). Memory per rank: one weight's V_l, dW_l and C_l
(plus, on rank 0, write_model's one shard); no model is ever whole, so the ZeRO-3 partition of the other
methods is not used, and more ranks cut the wall time of the projections rather than a per-rank peak that
is already one layer.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from bulwark.config import DEFAULT_LORA_TARGETS
from bulwark.errors import BulwarkInputError
from bulwark.recover.base import Inputs, Method, RecoverRun, register
from bulwark.recover.checkpoints import TensorStore, write_model
from bulwark.recover.subspace import ADAPTER_WEIGHTS, lora_pairs, projection_matrix, similarity, write_adapter

if TYPE_CHECKING:  # bulwark.recover.config imports every method module: no runtime import back
    from bulwark.recover.config import RecoverConfig


@dataclass
class SafeMergeConfig:
    threshold: float = 0.35  # merge layers whose cos(C dW, dW) is below this
    weights: list[float] = field(default_factory=lambda: [0.8, 0.2])  # (fine-tuned, safe = aligned) in a merge
    target_modules: list[str] = field(default_factory=lambda: list(DEFAULT_LORA_TARGETS))  # full FT only

    def check(self) -> None:
        if not 0.0 <= self.threshold <= 1.0:  # also false for NaN
            raise BulwarkInputError(f"safemerge.threshold = {self.threshold} must be in [0, 1]")
        w = self.weights
        if len(w) != 2 or not all(0.0 <= x <= 1.0 for x in w) or not math.isclose(sum(w), 1.0, abs_tol=1e-6):
            raise BulwarkInputError(f"safemerge.weights = {w} must be two numbers in [0, 1] summing to 1 "
                                    "(fine-tuned, aligned), e.g. [0.8, 0.2]")
        if not self.target_modules:
            raise BulwarkInputError("safemerge.target_modules is empty: name the modules to judge, e.g. q_proj")


@dataclass
class MergeDecision:
    name: str  # the weight, e.g. model.layers.3.self_attn.q_proj.weight
    cos: float | None  # None when V or dW is zero
    merged: bool
    rank: int  # the rank that computed cos


def alignment_cos(v: torch.Tensor, update: torch.Tensor,
                  factors: tuple[torch.Tensor, torch.Tensor] | None = None) -> float | None:
    """cos(C dW, dW) with C from `v`; None when V or dW is zero. `factors` = (s B, A) of a LoRA layer lets
    C dW be formed as (C s B) A, out x r first instead of a full out x out x in product."""
    if not torch.any(v != 0) or not torch.any(update != 0):
        return None
    c = projection_matrix(v)
    projected = c @ update.float() if factors is None else (c @ factors[0].float()) @ factors[1].float()
    return similarity(projected, update)


def _full_targets(aligned: Path, targets: list[str]) -> list[str]:
    store = TensorStore(aligned, "aligned model")
    names = []
    for name in store.names():
        parts = name.split(".")
        if len(parts) >= 2 and parts[-1] == "weight" and parts[-2] in targets and len(store.shape(name)) == 2:
            names.append(name)
    return sorted(names)


def _adapter_layout(adapter: Path, aligned: Path) -> tuple[dict[str, tuple[str, str]], float]:
    """The adapter's LoRA pairs and scale, checked against A: every tensor is part of a pair (an embedding
    LoRA, DoRA magnitude or saved module would otherwise be dropped silently) and every pair fits A's weight."""
    from safetensors import safe_open

    pairs, scale = lora_pairs(adapter, "safemerge")
    with safe_open(str(adapter / ADAPTER_WEIGHTS), framework="pt") as handle:
        keys = set(handle.keys())
        shapes = {k: list(handle.get_slice(k).get_shape()) for k in keys}
    extra = sorted(keys - {k for pair in pairs.values() for k in pair})
    if extra:
        raise BulwarkInputError(f"{adapter}: tensor '{extra[0]}' is not a lora_A / lora_B weight; safemerge "
                                "handles plain LoRA adapters on linear layers")
    store = TensorStore(aligned, "aligned model")
    for name, (a_key, b_key) in sorted(pairs.items()):
        if name not in store.files:
            raise BulwarkInputError(f"{adapter}: the adapter changes '{name}', which the aligned model {aligned} "
                                    "does not have; give the model the adapter was trained on")
        update_shape = [shapes[b_key][0], shapes[a_key][1]]
        if shapes[b_key][1] != shapes[a_key][0] or update_shape != store.shape(name):
            raise BulwarkInputError(f"{adapter}: LoRA update of '{name}' has shape {update_shape} but the aligned "
                                    f"model's weight {store.shape(name)}; give the model the adapter was trained on")
    return pairs, scale


def check(cfg: RecoverConfig, inputs: Inputs) -> None:
    """Before any rank starts: the adapter fits A, or a full model holds weights to judge."""
    from bulwark.models import is_adapter_dir

    if is_adapter_dir(inputs.finetuned):
        _adapter_layout(inputs.finetuned, inputs.aligned)
        return
    targets = cfg.settings["safemerge"].target_modules
    if not _full_targets(inputs.aligned, targets):
        raise BulwarkInputError(f"safemerge: no 2-D weight of a module named like {targets} in {inputs.aligned}; "
                                "set safemerge.target_modules")


# ---- the ranks' share: cos per weight ----------------------------------------------------------------------


def _my_decisions(run: RecoverRun, names: list[str], threshold: float, lora: tuple[dict, float] | None
                  ) -> list[MergeDecision]:
    """cos for the weights this rank owns (round-robin in name order), one weight in memory at a time."""
    from bulwark.engine.dist import device

    dev = device()
    assert run.inputs.base is not None
    base, aligned = TensorStore(run.inputs.base, "base model"), TensorStore(run.inputs.aligned, "aligned model")
    finetuned = None if lora is not None else TensorStore(run.inputs.finetuned, "fine-tuned model")
    adapter = None
    if lora is not None:
        from safetensors import safe_open

        adapter = safe_open(str(run.inputs.finetuned / ADAPTER_WEIGHTS), framework="pt")
    out = []
    for name in names[run.rank::run.world]:
        w_aligned = aligned.get(name).to(dev).float()
        v = w_aligned - base.get(name).to(dev).float()
        if lora is not None:
            (a_key, b_key), scale = lora[0][name], lora[1]
            lora_a, lora_b = adapter.get_tensor(a_key).to(dev).float(), adapter.get_tensor(b_key).to(dev).float()
            cos = alignment_cos(v, scale * (lora_b @ lora_a), (scale * lora_b, lora_a))
        else:
            cos = alignment_cos(v, finetuned.get(name).to(dev).float() - w_aligned)
        out.append(MergeDecision(name, cos, cos is not None and cos < threshold, run.rank))
    return out


def _gathered(run: RecoverRun, names: list[str], threshold: float, lora: tuple[dict, float] | None
              ) -> list[MergeDecision]:
    from bulwark.engine.dist import all_gather_objects

    parts = all_gather_objects(_my_decisions(run, names, threshold, lora))
    by_name = {d.name: d for part in parts for d in part}
    return [by_name[n] for n in names]


# ---- rank 0: the merged folder -------------------------------------------------------------------------------


def _write_lora(run: RecoverRun, pairs: dict[str, tuple[str, str]], scale: float, w_ft: float,
                merged: set[str]) -> None:
    from safetensors.torch import load_file

    tensors = load_file(str(run.inputs.finetuned / ADAPTER_WEIGHTS))  # an adapter: small

    def with_update(name: str, weight: torch.Tensor) -> torch.Tensor:  # weight: A's
        if name not in pairs:
            return weight
        a_key, b_key = pairs[name]
        update = scale * (tensors[b_key].float() @ tensors[a_key].float())
        factor = w_ft if name in merged else 1.0
        return (weight.float() + factor * update).to(weight.dtype)

    write_model(run.inputs.aligned, run.out / "model", with_update)
    for name in merged:  # w_ft s B A: scale B, the adapter keeps its rank
        b_key = pairs[name][1]
        tensors[b_key] = (w_ft * tensors[b_key].float()).to(tensors[b_key].dtype)
    write_adapter(run.inputs.finetuned, run.out / "adapter", tensors)


def _write_full(run: RecoverRun, w_ft: float, merged: set[str]) -> None:
    aligned = TensorStore(run.inputs.aligned, "aligned model")

    def with_merge(name: str, weight: torch.Tensor) -> torch.Tensor:  # weight: the fine-tuned model's
        if name not in merged:
            return weight
        w_aligned = aligned.get(name).float()
        return (w_aligned + w_ft * (weight.float() - w_aligned)).to(weight.dtype)

    write_model(run.inputs.finetuned, run.out / "model", with_merge)


def run_method(run: RecoverRun) -> dict[str, Any] | None:
    """`bulwark recover method=safemerge`: every rank judges its share of the weights, rank 0 writes."""
    from bulwark.models import is_adapter_dir

    settings = run.settings
    lora = None
    if is_adapter_dir(run.inputs.finetuned):
        lora = _adapter_layout(run.inputs.finetuned, run.inputs.aligned)
        names = sorted(lora[0])
    else:
        names = _full_targets(run.inputs.aligned, settings.target_modules)
    decisions = _gathered(run, names, settings.threshold, lora)
    if run.rank != 0:
        return None
    merged = {d.name for d in decisions if d.merged}
    w_ft = float(settings.weights[0])
    if lora is not None:
        _write_lora(run, lora[0], lora[1], w_ft, merged)
    else:
        _write_full(run, w_ft, merged)
    for d in decisions:
        run.log({"event": "layer", **asdict(d)})
    return {"method": "safemerge", "threshold": settings.threshold, "weights": list(settings.weights),
            "layers": len(decisions), "merged": len(merged), "input": "lora" if lora is not None else "full",
            "merged_layers": sorted(merged)}


register(Method(
    name="safemerge",
    Config=SafeMergeConfig,
    run=run_method,
    summary="merge each fine-tuned layer that strays from the alignment subspace with the aligned one (SafeMERGE)",
    needs_base=True,
    one_process=False,
    reads_adapter=True,
    check=check,
))
