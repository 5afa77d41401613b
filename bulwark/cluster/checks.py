"""The one reader of DeepSpeed JSON configs, and their consistency checks against a run config (no
DeepSpeed or torch import: `bulwark plan` and `bulwark slurm` use it on a login node, the engine at start)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from bulwark.errors import BulwarkInputError

REPO_ROOT = Path(__file__).resolve().parents[2]
DS_CONFIG_DIR = REPO_ROOT / "ds_configs"


def resolve_ds_config(name: str, config_dir: Path | None = None) -> Path:
    """A name in ds_configs/ ("zero3"), or a path: absolute, else relative to the cwd, the run config's
    folder, or the repository."""
    ref = Path(name).expanduser()
    candidates = [ref] if ref.is_absolute() else [
        base / ref for base in (Path.cwd(), config_dir, REPO_ROOT) if base is not None
    ]
    candidates += [DS_CONFIG_DIR / name, DS_CONFIG_DIR / f"{name}.json"]
    for path in candidates:
        if path.is_file():
            return path
    known = sorted(p.stem for p in DS_CONFIG_DIR.glob("*.json"))
    raise BulwarkInputError(f"launch.ds_config '{name}' not found (names: {', '.join(known)}, or a JSON path)")


def read_ds_config(name: str, config_dir: Path | None = None) -> dict[str, Any]:
    """The DeepSpeed JSON `launch.ds_config` names, checked: an object, ZeRO stage 1-3, no optimizer or
    scheduler section (Bulwark builds those from train.*)."""
    path = resolve_ds_config(name, config_dir)
    try:
        raw = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise BulwarkInputError(f"{path}:{exc.lineno}: DeepSpeed config is not valid JSON ({exc.msg})") from None
    if not isinstance(raw, dict):
        raise BulwarkInputError(f"{path}: DeepSpeed config must be a JSON object")
    for section in ("optimizer", "scheduler"):
        if section in raw:
            raise BulwarkInputError(
                f"{path}: remove the '{section}' section; bulwark builds it from train.* in the run config"
            )
    stage = raw.get("zero_optimization", {}).get("stage", 0) if isinstance(raw.get("zero_optimization"), dict) else 0
    if stage not in (1, 2, 3):
        raise BulwarkInputError(f"{path}: zero_optimization.stage must be 1, 2 or 3 (got {stage})")
    return raw


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
