"""The few run-config keys the cluster tools read, from a plain dict.

The run config is parsed by bulwark.config (typed, unknown keys are errors); :func:`run_settings`
picks what the memory plan and the SLURM renderer need. Keys read:

====================================  ==========================================  ===================
key                                   used for                                    default if absent
====================================  ==========================================  ===================
model.name                            model size (see plan.resolve_model_config)  embedded
model.dtype                           fp32 | bf16 byte counts                     fp32
model.lora.enabled / r /              trainable parameter count                   LoRA off
  target_modules
train.micro_batch_size                activations; ds_config batch check          1
train.grad_accum                      ds_config batch check                       1
data.max_length                       activations (sequence length)               256
train.gradient_checkpointing          activations                                 false
defense.name                          defense buffers                             sft
launch.nnodes / launch.nproc          default nodes / GPUs per node               1 / 1
launch.ds_config                      ZeRO stage, offload, batch sizes            zero3
====================================  ==========================================  ===================
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bulwark.cluster.checks import read_ds_config
from bulwark.config import Config, load_config
from bulwark.errors import BulwarkInputError

REPO_ROOT = Path(__file__).resolve().parents[2]
DEFAULT_DS_CONFIG = "ds_configs/zero3.json"


@dataclass(frozen=True)
class RunSettings:
    """What the memory plan and the SLURM renderer need from a run config."""

    model_name: str
    dtype: str
    lora: dict[str, Any] | None
    defense: str
    micro_batch_size: int
    grad_accum: int
    max_length: int
    gradient_checkpointing: bool
    nnodes: int | None
    nproc: int | None
    ds_config: str
    steps: int = 0
    checkpoint_every: int = 0
    keep_checkpoints: int = 2


def load_run_config(path: Path, overrides: list[str] | None = None) -> Config:
    """The typed run config (same parser and unknown-key errors as the training commands)."""
    return load_config(path, overrides or [], "")


def run_settings(cfg: Config) -> RunSettings:
    """Pick the keys in this module's table out of a typed run config."""
    lora = cfg.model.lora
    return RunSettings(
        model_name=cfg.model.name,
        dtype=cfg.model.dtype,
        lora={"enabled": True, "r": lora.r, "target_modules": list(lora.target_modules)} if lora.enabled else None,
        defense=str(cfg.defense.get("name", "sft")),
        micro_batch_size=cfg.train.micro_batch_size,
        grad_accum=cfg.train.grad_accum,
        max_length=cfg.data.max_length,
        gradient_checkpointing=cfg.train.gradient_checkpointing,
        nnodes=cfg.launch.nnodes,
        nproc=cfg.launch.nproc,
        ds_config=cfg.launch.ds_config if cfg.launch.ds_config.endswith(".json") else
        f"ds_configs/{cfg.launch.ds_config}.json",
        steps=cfg.train.steps,
        checkpoint_every=cfg.train.checkpoint_every,
        keep_checkpoints=cfg.train.keep_checkpoints,
    )


def resolve_path(ref: str, config_dir: Path | None = None) -> Path:
    """A path from a run config: absolute, else relative to the cwd, the config's folder, the repo."""
    p = Path(ref).expanduser()
    if p.is_absolute():
        return p
    for base in (Path.cwd(), config_dir, REPO_ROOT):
        if base is not None and (base / p).exists():
            return base / p
    return p


def load_ds_config(ref: str, config_dir: Path | None = None) -> dict[str, Any]:
    """The DeepSpeed JSON named by ``launch.ds_config`` (the engine's reader, bulwark/cluster/checks.py)."""
    return read_ds_config(ref, config_dir)


def zero_settings(ds_config: dict[str, Any]) -> tuple[int, bool, bool]:
    """(ZeRO stage, optimizer offloaded, parameters offloaded) of a DeepSpeed config."""
    zero = ds_config.get("zero_optimization") or {}
    stage = zero.get("stage", 0)
    if not isinstance(stage, int):
        raise BulwarkInputError(f"zero_optimization.stage: must be an integer, got {stage!r}")

    def offloaded(key: str) -> bool:
        section = zero.get(key) or {}
        return isinstance(section, dict) and section.get("device", "none") in ("cpu", "nvme")

    return stage, offloaded("offload_optimizer"), offloaded("offload_param")
