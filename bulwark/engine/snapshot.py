"""What a run writes beside DeepSpeed's checkpoint: RNG state for an exact resume, folders swapped in whole,
and the Hugging Face export (LoRA merged into the base weights)."""

from __future__ import annotations

import random
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch


def merge_lora_state_dict(state: dict[str, torch.Tensor], scaling: float) -> dict[str, torch.Tensor]:
    """PEFT state dict -> plain model state dict with W <- W + scaling * B @ A."""
    prefix = "base_model.model."
    merged: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        if ".lora_" in key:
            continue
        name = key[len(prefix):] if key.startswith(prefix) else key
        if ".base_layer." in name:
            module_key = key[: key.index(".base_layer.")]
            a = state.get(f"{module_key}.lora_A.default.weight")
            b = state.get(f"{module_key}.lora_B.default.weight")
            name = name.replace(".base_layer.", ".")
            if a is not None and b is not None and name.endswith("weight"):
                value = (value.float() + scaling * (b.float() @ a.float())).to(value.dtype)
        merged[name] = value
    return merged


def save_hf(module: torch.nn.Module, state: dict[str, torch.Tensor], tokenizer: Any, folder: Path) -> None:
    module.save_pretrained(folder, state_dict=state)
    if tokenizer is not None:
        tokenizer.save_pretrained(folder)


def atomic_dir(target: Path, write: Callable[[Path], None]) -> None:
    """Write into target.tmp, then swap it in: a crash never leaves a half-written `target`."""
    tmp = target.with_name(target.name + ".tmp")
    old = target.with_name(target.name + ".old")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    write(tmp)
    if target.exists():
        shutil.rmtree(old, ignore_errors=True)
        target.rename(old)
    tmp.rename(target)
    shutil.rmtree(old, ignore_errors=True)


def saved_world_size(tag_dir: Path) -> int:
    return len(list(tag_dir.glob("bulwark_rank*.pt")))


def rng_state() -> dict[str, Any]:
    import numpy as np

    # numpy's state tuple holds an ndarray, which weights_only=True refuses: kept as plain values
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state = {
        "torch": torch.get_rng_state(),
        "python": random.getstate(),
        "numpy": {"kind": str(kind), "keys": [int(k) for k in keys], "pos": int(pos),
                  "has_gauss": int(has_gauss), "cached_gaussian": float(cached)},
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    import numpy as np

    torch.set_rng_state(state["torch"])
    version, internal, gauss = state["python"]
    # weights_only hands tuples back as they were stored, but lists are accepted too
    random.setstate((version, tuple(internal), gauss))
    saved = state["numpy"]
    np.random.set_state((saved["kind"], np.asarray(saved["keys"], dtype=np.uint32), saved["pos"],
                         saved["has_gauss"], saved["cached_gaussian"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])
