"""The only package that imports DeepSpeed (see DESIGN.md: OpenRLHF-style single owner)."""

from bulwark.engine import partitioned  # noqa: F401  (ZeRO-3 without a training engine: bulwark recover)
from bulwark.engine.core import Engine, gather_for_edit, peak_memory_bytes, read_ds_config
from bulwark.engine.dist import (
    all_gather_cat,
    all_gather_objects,
    all_reduce_sum,
    barrier,
    broadcast_object,
    collective_device,
    exit_after_success,
    init_distributed,
    reduce_sum_to,
    under_launcher,
)
from bulwark.engine.ds_config import fill_ds_config
from bulwark.engine.progress import RunLogger
from bulwark.engine.snapshot import merge_lora_state_dict

__all__ = [
    "Engine",
    "RunLogger",
    "all_gather_cat",
    "all_gather_objects",
    "all_reduce_sum",
    "barrier",
    "broadcast_object",
    "collective_device",
    "reduce_sum_to",
    "exit_after_success",
    "fill_ds_config",
    "gather_for_edit",
    "init_distributed",
    "merge_lora_state_dict",
    "peak_memory_bytes",
    "read_ds_config",
    "under_launcher",
]
