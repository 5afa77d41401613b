"""The DeepSpeed internals the engine reads, checked once at start against the installed DeepSpeed.

The engine reads DeepSpeed internals that no release promises to keep (flat shard buffers, the ZeRO-3
parameter coordinator's private settings, per-parameter ds_* fields). A DeepSpeed that renamed one would
fail mid-run with an AttributeError, or worse, silently: `offload_optimizer` and
`zero_hpz_partition_size` are read with a getattr default, so a renamed flag would skip a refusal.
`check_deepspeed_internals` looks for all of them once, right after deepspeed.initialize.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from bulwark.errors import BulwarkInputError

# Keep in step with the deepspeed line of pyproject.toml.
DS_TESTED_RANGE = ">=0.19.8,<0.20"
DS_TESTED_VERSION = "0.19.8"

# Every non-public DeepSpeed attribute Bulwark reads (this module, engine.partitioned, and the ds_* fields of
# parameters that models.py, recover and two defenses read too), by the object read from and the ZeRO
# stages it is read at. `backup_optimizer` is absent on purpose: DeepSpeed only creates it under
# partial optimizer offload with DeepSpeedCPUAdam, which Bulwark never builds, and it is read with a
# default. The offload flags exist (False) whether or not offload is configured.
DS_INTERNALS: dict[str, tuple[tuple[int, ...], tuple[str, ...]]] = {
    # the DeepSpeedEngine
    "engine": ((1, 2, 3), ("optimizer", "module", "device")),
    "engine@zero3": ((3,), ("_zero3_consolidated_16bit_state_dict",)),
    # engine.optimizer: DeepSpeedZeroOptimizer (ZeRO-1/2) or DeepSpeedZeroOptimizer_Stage3
    "optimizer": ((1, 2, 3), ("optimizer", "overflow")),
    "optimizer@zero12": ((1, 2), (
        "single_partition_of_fp32_groups", "bit16_groups", "bit16_groups_flat", "real_dp_process_group",
    )),
    "optimizer@zero3": ((3,), (
        "fp32_partitioned_groups_flat", "fp16_partitioned_groups_flat", "fp16_groups", "grad_partitions_flat_buffer",
        "persistent_parameters", "micro_step_id", "_epilogue_ran_this_backward", "parameter_offload",
        "offload_optimizer", "offload_param", "zero_hpz_partition_size",
    )),
    # engine.optimizer.parameter_offload: DeepSpeedZeRoOffload, whose settings `_coordinator_like` copies
    "parameter_offload": ((3,), (
        "param_coordinator", "_prefetch_bucket_sz", "_max_reuse_distance_in_numel",
        "_max_available_parameters_in_numel", "_DeepSpeedZeRoOffload__allgather_stream",
        "_DeepSpeedZeRoOffload__inflight_param_registry", "timers", "zero_quantized_weights",
        "zero_quantized_nontrainable_weights", "fast_sharding_for_leaf_module",
    )),
    # a parameter partitioned by zero.Init / ZeRO-3, and its local slice (param.ds_tensor)
    "param": ((3,), ("ds_id", "ds_tensor", "ds_numel", "ds_status", "ds_process_group", "partition", "all_gather")),
    "param.ds_tensor": ((3,), ("ds_numel",)),
}
# "module:name" that the engine imports lazily, at the point of use
DS_IMPORTS = (
    "deepspeed.runtime.zero.partition_parameters:ZeroParamStatus",
    "deepspeed.runtime.zero.partitioned_param_coordinator:PartitionedParameterCoordinator",
    "deepspeed:zero",
)


def check_deepspeed_internals(ds_engine: Any, zero_stage: int) -> None:
    """Raise BulwarkInputError (one line, naming the DeepSpeed version) when an internal the engine reads
    at `zero_stage` is missing from `ds_engine` (what deepspeed.initialize returned) or its parts."""
    import importlib

    missing: list[str] = []
    for target in DS_IMPORTS:
        module_name, name = target.split(":")
        try:
            found = hasattr(importlib.import_module(module_name), name)
        except ImportError:
            found = False
        if not found:
            missing.append(f"{module_name}.{name}")
    if missing:
        _raise_moved(missing)  # the objects below cannot be reached without them

    optimizer = getattr(ds_engine, "optimizer", None)
    objects: dict[str, Any] = {"engine": ds_engine, "optimizer": optimizer}
    if zero_stage == 3:
        objects["parameter_offload"] = getattr(optimizer, "parameter_offload", None)
        module = getattr(ds_engine, "module", None)
        param = next(iter(module.parameters()), None) if isinstance(module, torch.nn.Module) else None
        objects["param"] = param
        objects["param.ds_tensor"] = getattr(param, "ds_tensor", None)
    for key, (stages, names) in DS_INTERNALS.items():
        obj = objects.get(key.split("@")[0])
        # a None owner is already reported through the attribute that leads to it
        if zero_stage in stages and obj is not None:
            missing += [f"{type(obj).__name__}.{name}" for name in names if not hasattr(obj, name)]

    if zero_stage == 3:
        from deepspeed.runtime.zero.partition_parameters import ZeroParamStatus
        from deepspeed.runtime.zero.partitioned_param_coordinator import PartitionedParameterCoordinator

        if not hasattr(ZeroParamStatus, "AVAILABLE"):
            missing.append("ZeroParamStatus.AVAILABLE")
        missing += _missing_kwargs(PartitionedParameterCoordinator, COORDINATOR_KWARGS)
    backward = getattr(ds_engine, "backward", None)
    if backward is not None:
        missing += _missing_kwargs(backward, ("scale_wrt_gas",))  # isolated_backward passes it
    if missing:
        _raise_moved(missing)


def check_partitioned_param(param: torch.nn.Parameter) -> None:
    """`check_deepspeed_internals` for one zero.Init parameter (engine.partitioned builds no engine)."""
    missing = [f"{type(param).__name__}.{n}" for n in DS_INTERNALS["param"][1] if not hasattr(param, n)]
    local = getattr(param, "ds_tensor", None)
    if local is not None:
        missing += [f"ds_tensor.{n}" for n in DS_INTERNALS["param.ds_tensor"][1] if not hasattr(local, n)]
    if missing:
        _raise_moved(missing)


def _missing_kwargs(fn: Callable[..., Any], names: tuple[str, ...]) -> list[str]:
    import inspect

    params = inspect.signature(fn).parameters
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        return []
    label = getattr(fn, "__qualname__", getattr(fn, "__name__", "callable"))
    return [f"{label}({name}=)" for name in names if name not in params]


def _raise_moved(missing: list[str]) -> None:
    import deepspeed

    version = getattr(deepspeed, "__version__", "(unknown version)")
    raise BulwarkInputError(
        f"DeepSpeed {version} moved {', '.join(missing)} (Bulwark is tested with deepspeed "
        f"{DS_TESTED_RANGE}): install deepspeed=={DS_TESTED_VERSION}"
    )


# The keyword arguments `_coordinator_like` passes to PartitionedParameterCoordinator (checked at start).
COORDINATOR_KWARGS = (
    "prefetch_bucket_sz", "max_reuse_distance_in_numel", "max_available_parameters_in_numel",
    "allgather_stream", "inflight_param_registry", "prefetch_nvme", "timers", "zero_quantized_weights",
    "zero_quantized_nontrainable_weights", "fast_sharding_for_leaf_module", "log_trace_cache_warnings",
)
