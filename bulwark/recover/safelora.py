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

import json
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from bulwark.config import DEFAULT_LORA_TARGETS
from bulwark.errors import BulwarkInputError
from bulwark.recover.base import Method, RecoverRun, register
from bulwark.recover.checkpoints import TensorStore, write_model

ADAPTER_WEIGHTS = "adapter_model.safetensors"


@dataclass
class SafeLoraConfig:
    threshold: float = 0.35  # project layers whose cos(C dW, dW) is below this
    target_modules: list[str] = field(default_factory=lambda: list(DEFAULT_LORA_TARGETS))  # full FT only

    def check(self) -> None:
        if not 0.0 <= self.threshold <= 1.0:
            raise BulwarkInputError(f"safelora.threshold = {self.threshold} must be in [0, 1]")



def projection_matrix(v: torch.Tensor) -> torch.Tensor:
    """C = V V^T / ||V||_F for an alignment matrix V (out x in)."""
    v = v.float()
    return (v @ v.T) / torch.linalg.matrix_norm(v, ord="fro")


def similarity(projected: torch.Tensor, update: torch.Tensor) -> float:
    """Cosine similarity of two matrices, flattened."""
    return float(torch.nn.functional.cosine_similarity(projected.flatten().float(), update.flatten().float(), dim=0))


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


def _lora_pairs(adapter: Path) -> tuple[dict[str, tuple[str, str]], float]:
    """({weight name: (lora_A key, lora_B key)}, scale) of a PEFT adapter folder."""
    config = json.loads((adapter / "adapter_config.json").read_text())
    if config.get("peft_type", "LORA") != "LORA":
        raise BulwarkInputError(f"{adapter}: a {config.get('peft_type')} adapter; safelora handles LoRA adapters")
    if config.get("rank_pattern") or config.get("alpha_pattern"):
        raise BulwarkInputError(f"{adapter}: per-layer rank_pattern / alpha_pattern are not supported by safelora")
    r, alpha = int(config["r"]), float(config["lora_alpha"])
    scale = alpha / (r**0.5) if config.get("use_rslora") else alpha / r
    from safetensors import safe_open

    if not (adapter / ADAPTER_WEIGHTS).is_file():
        raise BulwarkInputError(f"{adapter}: no {ADAPTER_WEIGHTS}")
    with safe_open(str(adapter / ADAPTER_WEIGHTS), framework="pt") as handle:
        keys = list(handle.keys())
    pairs: dict[str, tuple[str, str]] = {}
    for key in keys:
        if ".lora_A." not in key:
            continue
        module = key.split(".lora_A.")[0]
        b_key = key.replace(".lora_A.", ".lora_B.")
        name = module.removeprefix("base_model.model.") + ".weight"
        if b_key in keys:
            pairs[name] = (key, b_key)
    if not pairs:
        raise BulwarkInputError(f"{adapter}: holds no lora_A / lora_B pairs")
    return pairs, scale


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

        pairs, scale = _lora_pairs(finetuned)
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
        _write_adapter(finetuned, out_dir / "adapter", tensors)
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


def _write_adapter(source: Path, target: Path, tensors: dict[str, torch.Tensor]) -> None:
    from safetensors.torch import save_file

    tmp = target.with_name(target.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(source, tmp)
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp / ADAPTER_WEIGHTS), metadata={"format": "pt"})
    if target.exists():
        shutil.rmtree(target)
    tmp.rename(target)


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
