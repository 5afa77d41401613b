"""SafeLoRA-style projection (Hsu et al. 2024, "Safe LoRA: the Silver Lining of Reducing Safety Risks
when Fine-tuning Large Language Models"), written anew.

For each weight matrix that fine-tuning changed:
  V  = W_aligned - W_base                 the alignment matrix of that layer (out x in)
  C  = V V^T / ||V||_F                    the paper's projection operator (out x out)
  dW                                      the fine-tuning update: scale * B A for a LoRA layer,
                                          W_finetuned - W_aligned for full fine-tuning
  dW' = C dW                              the update projected onto the alignment subspace
  cos = <dW', dW> / (||dW'|| ||dW||)      flattened matrices
The layer gets dW' instead of dW when cos < threshold (default 0.35): the update has drifted far from
the alignment subspace. Layers where V is zero (alignment left them alone) are kept as they are.

Note C is the paper's operator as written, V V^T divided by ||V||_F (not ||V||_F^2): it is not an
orthogonal projector, so dW' is rescaled as well as turned; the similarity test is scale-free.

Inputs: the unaligned base, the aligned model, and the fine-tuned model: a LoRA adapter folder (trained on
top of the aligned model: bulwark's "double" LoRA) or a full model folder. Outputs: the repaired model as
an HF folder (LoRA: the aligned model plus every layer's kept or projected update, and the projected
adapter beside it; full: the fine-tuned model with the projected layers set to W_aligned + C dW).
Cheap (one matrix product per layer), so it runs in one process.

Device: the matrix products run on `bulwark.engine.dist.device()` (this process's GPU when there is one,
else the CPU): each layer's tensors are read from safetensors on the CPU, moved there, and the result comes
back to the CPU only to be written. The helpers below (`projection_matrix`, `similarity`, `decide`) work on
whatever device their inputs are on.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from bulwark.config import DEFAULT_LORA_TARGETS
from bulwark.errors import BulwarkInputError
from bulwark.recover.base import Method, RecoverRun, register
from bulwark.recover.checkpoints import TensorStore, write_model
from bulwark.recover.subspace import ADAPTER_WEIGHTS, lora_pairs, projection_matrix, similarity, write_adapter


@dataclass
class SafeLoraConfig:
    threshold: float = 0.35  # project layers whose cos(C dW, dW) is below this
    target_modules: list[str] = field(default_factory=lambda: list(DEFAULT_LORA_TARGETS))  # full FT only

    def check(self) -> None:
        if not 0.0 <= self.threshold <= 1.0:
            raise BulwarkInputError(f"safelora.threshold = {self.threshold} must be in [0, 1]")



@dataclass
class LayerDecision:
    name: str  # the weight, e.g. model.layers.3.self_attn.q_proj.weight
    cos: float | None  # None when the alignment matrix is zero
    projected: bool


def decide(v: torch.Tensor, update: torch.Tensor, threshold: float) -> tuple[torch.Tensor, float | None, bool]:
    """(the update to use, cos(C dW, dW), projected?) for one layer."""
    if not torch.any(v != 0) or not torch.any(update != 0):
        return update, None, False
    c = projection_matrix(v)
    projected = c @ update.float()
    cos = similarity(projected, update)
    if cos < threshold:
        return projected, cos, True
    return update, cos, False


# ---- LoRA adapters and the stage -----------------------------------------------------------------------------------------


def run_safelora(base: Path, aligned: Path, finetuned: Path, out_dir: Path, threshold: float,
                 targets: list[str]) -> list[LayerDecision]:
    """Write out_dir/model (and out_dir/adapter for a LoRA input); return the per-layer decisions.

    Streams tensor by tensor: no model is ever whole in memory, only one shard of the one being written.
    """
    from bulwark.engine.dist import device
    from bulwark.models import is_adapter_dir

    dev = device()
    store_base = TensorStore(base, "base model")
    decisions: list[LayerDecision] = []
    if is_adapter_dir(finetuned):
        from safetensors.torch import load_file

        pairs, scale = lora_pairs(finetuned, "safelora")
        tensors = load_file(str(finetuned / ADAPTER_WEIGHTS))

        def with_lora(name: str, weight: torch.Tensor) -> torch.Tensor:  # weight: the aligned model's
            if name not in pairs:
                return weight
            a_key, b_key = pairs[name]
            lora_a, lora_b = tensors[a_key].to(dev).float(), tensors[b_key].to(dev).float()
            w_aligned = weight.to(dev).float()
            v = w_aligned - store_base.get(name).to(dev).float()
            update = scale * (lora_b @ lora_a)
            if v.shape != update.shape:
                raise BulwarkInputError(f"{name}: LoRA update {list(update.shape)} vs weight {list(v.shape)}")
            used, cos, projected = decide(v, update, threshold)
            if projected:  # C (s B A) = s (C B) A: the adapter keeps its rank
                tensors[b_key] = (projection_matrix(v) @ lora_b).to("cpu", tensors[b_key].dtype)
            decisions.append(LayerDecision(name, cos, projected))
            return (w_aligned + used).to("cpu", weight.dtype)  # to the shard being written

        write_model(aligned, out_dir / "model", with_lora)
        missing = sorted(set(pairs) - {d.name for d in decisions})
        if missing:
            raise BulwarkInputError(f"{finetuned}: the adapter changes '{missing[0]}', which the aligned model "
                                    f"{aligned} does not have; give the model the adapter was trained on")
        write_adapter(finetuned, out_dir / "adapter", tensors)
        return decisions

    store_aligned = TensorStore(aligned, "aligned model")

    def projected_full(name: str, weight: torch.Tensor) -> torch.Tensor:  # weight: the fine-tuned model's
        parts = name.split(".")
        if weight.dim() != 2 or len(parts) < 2 or parts[-1] != "weight" or parts[-2] not in targets:
            return weight
        w_aligned = store_aligned.get(name).to(dev).float()
        v = w_aligned - store_base.get(name).to(dev).float()
        used, cos, projected = decide(v, weight.to(dev).float() - w_aligned, threshold)
        decisions.append(LayerDecision(name, cos, projected))
        return (w_aligned + used).to("cpu", weight.dtype) if projected else weight  # to the shard being written

    write_model(finetuned, out_dir / "model", projected_full)
    if not decisions:
        raise BulwarkInputError(f"safelora: no 2-D weight named like {targets} in {finetuned}; "
                                "set safelora.target_modules")
    return decisions


def run_method(run: RecoverRun) -> dict[str, Any]:
    """`bulwark recover method=safelora`: one process (a matrix product per layer)."""
    assert run.inputs.base is not None
    settings = run.settings
    decisions = run_safelora(run.inputs.base, run.inputs.aligned, run.inputs.finetuned, run.out,
                             settings.threshold, settings.target_modules)
    for d in decisions:
        run.log({"event": "layer", **asdict(d)})
    return {"method": "safelora", "threshold": settings.threshold, "layers": len(decisions),
            "projected": sum(d.projected for d in decisions),
            "input": "lora" if (run.inputs.finetuned / "adapter_config.json").is_file() else "full"}


register(Method(
    name="safelora",
    Config=SafeLoraConfig,
    run=run_method,
    summary="project each fine-tuning update that strays from the alignment subspace back onto it (Safe LoRA)",
    needs_base=True,
    one_process=True,
    reads_adapter=True,
))
