"""ZeRO-3 partitioned models without a training engine (for `bulwark recover`, which never takes a step).

A model loaded by `load_partitioned` holds on each rank only its slice of every parameter
(`deepspeed.zero.Init` through transformers' `HfDeepSpeedConfig`); nothing installs forward hooks, so the
caller decides what is whole and when:

- `gathered(params)` (from engine.core): the listed parameters whole inside the block, read-only (no
  write-back broadcast);
- `gathered_per_module(model)`: a plain `model(...)` / `model.generate(...)` call gathers one decoder layer
  (or one other parameter-holding module) at a time, as a ZeRO-3 engine's forward does;
- `set_elements(param, index, values)`: write elements of a weight into this rank's slice, no collective;
- `full_numel(param)`: the element count of the whole weight.

Every gather is a collective: all ranks must gather the same parameters in the same order (the same
number of forward passes on every rank). For plain (unpartitioned) parameters all of these are plain
PyTorch, so the same caller code runs in one process without DeepSpeed.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any

import torch

from bulwark.config import TrainConfig
from bulwark.engine.compat import check_partitioned_param
from bulwark.engine.core import gathered, is_partitioned, read_ds_config
from bulwark.engine.dist import init_distributed
from bulwark.engine.ds_config import fill_ds_config
from bulwark.errors import BulwarkInputError

_BATCH_KEYS = ("train_micro_batch_size_per_gpu", "gradient_accumulation_steps", "train_batch_size")


def zero3_config(ds_config: str, dtype: str, world_size: int) -> dict[str, Any]:
    """The DeepSpeed config for partitioning only: a stage-3 JSON from ds_configs/ (or a path), "auto" filled."""
    raw = read_ds_config(ds_config)
    if raw["zero_optimization"].get("stage") != 3:
        raise BulwarkInputError(
            f"launch.ds_config '{ds_config}': recover partitions weights with ZeRO-3; give a stage-3 config "
            "(e.g. zero3)"
        )
    # no optimizer step is ever taken: batch sizes do not matter, so a config written for training fits
    raw = {key: value for key, value in raw.items() if key not in _BATCH_KEYS}
    return fill_ds_config(raw, TrainConfig(micro_batch_size=1, grad_accum=1), dtype, world_size)


def load_partitioned(model_dir: str | Path, dtype: str, ds_config: str = "zero3") -> torch.nn.Module:
    """A causal LM from an HF folder, loaded under zero.Init: each rank builds and keeps only its slices.

    The `HfDeepSpeedConfig` stays attached to the model (transformers checks it, e.g. `generate` then keeps
    the ranks in step with `synced_gpus` when one finishes early).
    """
    from transformers.integrations import HfDeepSpeedConfig

    from bulwark.models import load_model

    _, world, _ = init_distributed()
    holder = HfDeepSpeedConfig(zero3_config(ds_config, dtype, world))
    model = load_model(str(model_dir), dtype)
    first = next(model.parameters(), None)
    if first is not None:
        # zero.Init partitions every parameter alike (at any world size): one stands for all, so a
        # DeepSpeed that renamed ds_tensor/ds_numel fails here, not in the middle of a recovery
        check_partitioned_param(first)
    model._bulwark_hf_ds_config = holder  # keeps transformers' weak reference alive with the model
    return model


def slice_device(param: torch.nn.Parameter) -> torch.device:
    """Where a parameter's values live: a ZeRO-3 parameter's own slice (its `data` is an empty placeholder
    outside a gather), else the parameter's device."""
    return param.ds_tensor.device if is_partitioned(param) else param.device


def full_numel(param: torch.nn.Parameter) -> int:
    return int(param.ds_numel) if is_partitioned(param) else param.numel()


def set_elements(param: torch.nn.Parameter, index: torch.Tensor, values: torch.Tensor) -> None:
    """param.flatten()[index] = values, for the whole weight; every rank calls it with the same edits.

    A partitioned weight is edited in place in this rank's slice (ZeRO-3 keeps rank r's slice of the
    flattened weight at [r * slice size, (r + 1) * slice size)); no gather, no collective.
    """
    with torch.no_grad():
        if not is_partitioned(param):
            param.data.view(-1)[index.to(param.device)] = values.to(param.device, param.dtype)
            return
        local = param.ds_tensor
        size = int(local.ds_numel)
        start = size * torch.distributed.get_rank(group=param.ds_process_group)
        mine = (index >= start) & (index < start + size)
        local.view(-1)[(index[mine] - start).to(local.device)] = values[mine].to(local.device, local.dtype)


def _gather_units(model: torch.nn.Module, layers: torch.nn.ModuleList) -> list[torch.nn.Module]:
    """Decoder layers, plus every other module that holds parameters itself (embeddings, final norm, head)."""
    inside = {id(m) for layer in layers for m in layer.modules()}
    units: list[torch.nn.Module] = list(layers)
    for module in model.modules():
        if id(module) not in inside and any(True for _ in module.parameters(recurse=False)):
            units.append(module)
    return units


@contextmanager
def gathered_per_module(model: torch.nn.Module, layers: torch.nn.ModuleList) -> Iterator[None]:
    """Inside the block, each forward of a unit (`layers[i]`, or a module outside them that holds
    parameters) gathers that unit's parameters for its call only; a no-op for a plain model."""
    if not any(is_partitioned(p) for p in model.parameters()):
        yield
        return
    open_gathers: dict[int, ExitStack] = {}

    def before(module: torch.nn.Module, args: Any) -> None:
        stack = ExitStack()
        stack.enter_context(gathered(list(module.parameters())))
        open_gathers[id(module)] = stack

    def after(module: torch.nn.Module, args: Any, output: Any) -> None:
        open_gathers.pop(id(module)).close()

    handles = []
    for unit in _gather_units(model, layers):
        handles.append(unit.register_forward_pre_hook(before))
        handles.append(unit.register_forward_hook(after, always_call=True))
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()
        for stack in open_gathers.values():
            stack.close()
