"""What SafeLoRA and SafeMERGE share: the alignment subspace of a weight and the LoRA adapter files.

V = W_aligned - W_base is a layer's alignment matrix (out x in) and C = V V^T / ||V||_F the SafeLoRA
operator (as the paper writes it: not an orthogonal projector, so C dW is rescaled as well as turned; the
cosine test is scale-free). A fine-tuning update dW is judged by cos(C dW, dW) over the flattened matrices.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch

from bulwark.errors import BulwarkInputError

ADAPTER_WEIGHTS = "adapter_model.safetensors"


def projection_matrix(v: torch.Tensor) -> torch.Tensor:
    """C = V V^T / ||V||_F for an alignment matrix V (out x in)."""
    v = v.float()
    return (v @ v.T) / torch.linalg.matrix_norm(v, ord="fro")


def similarity(projected: torch.Tensor, update: torch.Tensor) -> float:
    """Cosine similarity of two matrices, flattened."""
    return float(torch.nn.functional.cosine_similarity(projected.flatten().float(), update.flatten().float(), dim=0))


def lora_pairs(adapter: Path, method: str) -> tuple[dict[str, tuple[str, str]], float]:
    """({weight name: (lora_A key, lora_B key)}, scale) of a PEFT adapter folder."""
    config = json.loads((adapter / "adapter_config.json").read_text())
    if config.get("peft_type", "LORA") != "LORA":
        raise BulwarkInputError(f"{adapter}: a {config.get('peft_type')} adapter; {method} handles LoRA adapters")
    if config.get("rank_pattern") or config.get("alpha_pattern"):
        raise BulwarkInputError(f"{adapter}: per-layer rank_pattern / alpha_pattern are not supported by {method}")
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


def write_adapter(source: Path, target: Path, tensors: dict[str, torch.Tensor]) -> None:
    from safetensors.torch import save_file

    tmp = target.with_name(target.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(source, tmp)
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp / ADAPTER_WEIGHTS), metadata={"format": "pt"})
    if target.exists():
        shutil.rmtree(target)
    tmp.rename(target)
