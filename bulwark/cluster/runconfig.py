"""The few run-config keys the cluster tools read, from a plain dict.

Until the typed config (bulwark/config.py) is used here, the run config YAML is read with pyyaml and
handed to :func:`run_settings` as a dict; switching means building :class:`RunSettings` from the
typed object instead. Keys read (all others are ignored here):

====================================  ==========================================  ===================
key                                   used for                                    default if absent
====================================  ==========================================  ===================
model.name                            model size (see plan.resolve_model_config)  required
model.dtype                           fp32 | bf16 | fp16 byte counts              bf16
model.lora.enabled / r /              trainable parameter count                   LoRA off
  target_modules
train.micro_batch_size                activations; ds_config batch check          1
train.grad_accum                      ds_config batch check                       1
train.max_length                      activations (sequence length)               2048
train.gradient_checkpointing          activations                                 false
defense.name                          defense buffers                             sft
launch.nnodes / launch.nproc          default nodes / GPUs per node               1 / 8
launch.ds_config                      ZeRO stage, offload, batch sizes            ds_configs/zero3.json
====================================  ==========================================  ===================
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

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


def load_run_config(path: Path) -> dict[str, Any]:
    """Read a run config YAML into a dict (one clear error when missing or not a mapping)."""
    if not path.is_file():
        raise BulwarkInputError(f"{path}: run config not found")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise BulwarkInputError(f"{path}: not valid YAML ({str(e).splitlines()[0]})") from e
    if not isinstance(data, dict):
        raise BulwarkInputError(f"{path}: a run config must be a YAML mapping")
    return data


def _section(cfg: dict[str, Any], name: str) -> dict[str, Any]:
    value = cfg.get(name) or {}
    if not isinstance(value, dict):
        raise BulwarkInputError(f"{name}: must be a mapping, got {type(value).__name__}")
    return value


def _int(section: dict[str, Any], key: str, where: str, default: int | None) -> int | None:
    value = section.get(key, default)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise BulwarkInputError(f"{where}.{key}: must be an integer, got {value!r}")
    return value


def run_settings(run_config: dict[str, Any]) -> RunSettings:
    """Pick the keys in this module's table out of a run config dict."""
    model, train = _section(run_config, "model"), _section(run_config, "train")
    defense, launch = _section(run_config, "defense"), _section(run_config, "launch")
    name = model.get("name")
    if not name:
        raise BulwarkInputError("model.name: missing (an HF folder, 'embedded', 'tiny' or a known model id)")
    lora = model.get("lora")
    if lora is not None and not isinstance(lora, dict):
        raise BulwarkInputError("model.lora: must be a mapping")
    return RunSettings(
        model_name=str(name),
        dtype=str(model.get("dtype", "bf16")),
        lora=lora if lora and lora.get("enabled") else None,
        defense=str(defense.get("name", "sft")),
        micro_batch_size=_int(train, "micro_batch_size", "train", 1),  # type: ignore[arg-type]
        grad_accum=_int(train, "grad_accum", "train", 1),  # type: ignore[arg-type]
        max_length=_int(train, "max_length", "train", 2048),  # type: ignore[arg-type]
        gradient_checkpointing=bool(train.get("gradient_checkpointing", False)),
        nnodes=_int(launch, "nnodes", "launch", None),
        nproc=_int(launch, "nproc", "launch", None),
        ds_config=str(launch.get("ds_config") or DEFAULT_DS_CONFIG),
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
    """Read a DeepSpeed JSON config named by ``launch.ds_config``."""
    path = resolve_path(ref, config_dir)
    if not path.is_file():
        raise BulwarkInputError(f"launch.ds_config: {ref} not found")
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise BulwarkInputError(f"{path}: not valid JSON ({e})") from e
    if not isinstance(data, dict):
        raise BulwarkInputError(f"{path}: a DeepSpeed config must be a JSON object")
    return data


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
