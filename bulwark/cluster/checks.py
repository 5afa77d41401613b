"""Consistency checks between a DeepSpeed config and a run config (no DeepSpeed import)."""

from __future__ import annotations

from typing import Any

from bulwark.errors import BulwarkInputError


def check_ds_batch_sizes(ds_config: dict[str, Any], micro_batch_size: int, grad_accum: int, world_size: int) -> None:
    """Raise one clear line when an explicit (non-"auto") batch size contradicts the run config.

    DeepSpeed requires ``train_batch_size == train_micro_batch_size_per_gpu *
    gradient_accumulation_steps * world_size``; Bulwark fills "auto" values from ``train.micro_batch_size``
    and ``train.grad_accum``, so any explicit value must already agree with them.
    """
    expected = {
        "train_micro_batch_size_per_gpu": (micro_batch_size, "train.micro_batch_size"),
        "gradient_accumulation_steps": (grad_accum, "train.grad_accum"),
        "train_batch_size": (
            micro_batch_size * grad_accum * world_size,
            f"train.micro_batch_size x train.grad_accum x world size = "
            f"{micro_batch_size} x {grad_accum} x {world_size}",
        ),
    }
    for key, (want, source) in expected.items():
        value = ds_config.get(key, "auto")
        if value == "auto" or value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, int):
            raise BulwarkInputError(f"ds_config {key}: must be an integer or \"auto\", got {value!r}")
        if value != want:
            raise BulwarkInputError(
                f"ds_config {key}={value} contradicts the run config ({source} = {want}); "
                f"set it to \"auto\" or {want}"
            )
