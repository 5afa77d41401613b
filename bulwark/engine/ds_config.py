"""DeepSpeed's config, filled from the run config ("auto" values, batch sizes) and checked.

The launcher's prepare step (recipes/loop.py) fills it before any rank starts, so a bad value is one line
there; each rank fills it again for the training Engine (core.py) or the engine-free ZeRO-3 models of
`bulwark recover` (partitioned.py).
"""

from __future__ import annotations

import json
from typing import Any

import torch

from bulwark.cluster.checks import check_ds_batch_sizes
from bulwark.config import TrainConfig
from bulwark.errors import BulwarkInputError


def fill_ds_config(raw: dict[str, Any], train: TrainConfig, dtype: str, world_size: int) -> dict[str, Any]:
    """Replace "auto" values from the run config; explicit values that contradict it are errors."""
    cfg = json.loads(json.dumps(raw))
    check_ds_batch_sizes(cfg, train.micro_batch_size, train.grad_accum, world_size)
    cfg["train_micro_batch_size_per_gpu"] = train.micro_batch_size
    cfg["gradient_accumulation_steps"] = train.grad_accum
    cfg["train_batch_size"] = train.micro_batch_size * train.grad_accum * world_size
    if cfg.get("gradient_clipping", "auto") == "auto":
        cfg["gradient_clipping"] = train.max_grad_norm
    bf16 = cfg.setdefault("bf16", {})
    if bf16.get("enabled", "auto") == "auto":
        bf16["enabled"] = dtype == "bf16"
    if cfg.get("fp16", {}).get("enabled") is True:
        raise BulwarkInputError("ds_config: fp16 is not supported; use model.dtype=bf16 or fp32")
    zero = cfg.setdefault("zero_optimization", {})
    on_cpu = not torch.cuda.is_available()
    auto_values = {
        "reduce_bucket_size": 5e7,
        "allgather_bucket_size": 5e7,
        "stage3_prefetch_bucket_size": 5e7,
        # 0 on CPU so that even tiny test models are really partitioned; DeepSpeed's default on GPU.
        "stage3_param_persistence_threshold": 0 if on_cpu else 1e5,
    }
    for key, value in auto_values.items():
        if zero.get(key) == "auto":
            zero[key] = value
    # torch AdamW / SGD: compiles nothing (DeepSpeed's fused and CPU Adam build C++ on first use).
    cfg["zero_allow_untested_optimizer"] = True
    _check_zero_section(zero)
    if zero.get("offload_optimizer", {}).get("device", "none") != "none":
        # DeepSpeed 0.19 refuses a client torch optimizer under optimizer offload unless told that it
        # steps on the host itself (torch's fused AdamW does; DeepSpeedCPUAdam would compile C++ first)
        cfg.setdefault("zero_force_ds_cpu_optimizer", False)
    cfg.setdefault("steps_per_print", 1_000_000)
    return cfg


def _check_zero_section(zero: dict[str, Any]) -> None:
    """DeepSpeed's own model of zero_optimization, before any rank starts: a value it would refuse inside
    every rank (a string where it wants a number, an unknown offload device) is one line here."""
    from pydantic import ValidationError

    try:
        from deepspeed.runtime.zero.config import DeepSpeedZeroConfig
    except ImportError:  # DeepSpeed not installed here (the plan and slurm commands): the ranks check it
        return
    try:
        DeepSpeedZeroConfig(**zero)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(part) for part in first.get("loc", ()))
        raise BulwarkInputError(f"ds_config zero_optimization.{where}: {first.get('msg', 'invalid value')} "
                                f"(got {first.get('input')!r})") from None
