"""Typed run configuration: a YAML file plus `key=value` overrides, resolved into dataclasses.

Every stage (align, finetune, recover) reads the same `Config`; each section is a dataclass with
defaults, so a YAML file only names what it changes. An unknown key anywhere is an error that names
the key and the closest valid one: a typo must never silently train with a default.

The `defense` section is open-ended at this level (its keys depend on `defense.name`); it is
checked against the chosen defense's own config dataclass by `bulwark.defenses.resolve`.
"""

from __future__ import annotations

import dataclasses
import difflib
import os
import sys
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from bulwark.errors import BulwarkInputError

DEFAULT_LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


@dataclass
class LoraConfig:
    enabled: bool = False
    r: int = 8
    alpha: int = 16
    dropout: float = 0.0
    target_modules: list[str] = field(default_factory=lambda: list(DEFAULT_LORA_TARGETS))
    # "double": merge the alignment adapter into the base, train a new one (Lisa/Vaccine papers);
    # "single": keep training the alignment adapter (Booster's default).
    mode: str = "double"


@dataclass
class ModelConfig:
    # "embedded" (SmolLM2-135M-Instruct from its PyPI wheel), "tiny" (random Llama for tests),
    # an HF folder (an exported stage), a .gguf file, or a hub id (needs the hub).
    name: str = "embedded"
    dtype: str = "fp32"  # fp32 | bf16
    lora: LoraConfig = field(default_factory=LoraConfig)
    seed: int = 0  # only for "tiny"


@dataclass
class DataConfig:
    dir: str | None = None  # data folder; else $BULWARK_DATA_DIR
    template: str = "chat"  # chat (the model's own template) | alpaca (the papers' template)
    max_length: int = 256
    # the user's fine-tuning upload: n rows, a fraction p of them harmful
    user: str = "sst2_train"
    user_format: str | None = None  # guessed from the file name when empty
    n: int = 1000
    p: float = 0.1
    harmful: str = "beavertails_harmful"
    # alignment rows: the align stage's main stream, and Lisa's side stream at fine-tuning
    align: str = "beavertails_refusals"
    align_n: int = 1000
    align_refusals_only: bool = True  # keep only alignment answers that really refuse
    # benign instruction rows mixed into the alignment rows: refusals alone teach the model to refuse
    # benign prompts too (measured on SmolLM2: 80% of AlpacaEval prompts refused); 0 = refusals only
    align_benign: str = "alpaca"
    align_benign_n: int = 0
    seed: int = 42


@dataclass
class TrainConfig:
    steps: int = 100  # optimizer steps, not micro-batches
    micro_batch_size: int = 4
    grad_accum: int = 1
    lr: float = 2e-5
    optimizer: str = "adamw"  # adamw | sgd
    weight_decay: float = 0.0
    lr_schedule: str = "constant"  # constant | cosine
    warmup_steps: int = 0
    max_grad_norm: float = 1.0  # 0 turns clipping off
    seed: int = 42
    checkpoint_every: int = 0  # optimizer steps between checkpoints; 0 = only the last step
    keep_checkpoints: int = 2
    log_every: int = 1
    gradient_checkpointing: bool = False  # recompute activations in backward: less memory, ~1.3x time


@dataclass
class LaunchConfig:
    nproc: int = 1  # processes per node when bulwark spawns torchrun itself
    nnodes: int = 1  # nodes (SLURM templates and `bulwark plan`; torchrun gets it from srun there)
    ds_config: str = "zero3"  # a name in ds_configs/ or a path to a DeepSpeed JSON
    master_port: int = 0  # 0 = pick a free port


@dataclass
class LogConfig:
    # where metrics and eval summaries go: jsonl (metrics.jsonl, always on), tensorboard, wandb (bulwark/loggers.py)
    to: list[str] = field(default_factory=lambda: ["jsonl"])


@dataclass
class Config:
    out_dir: str = "runs/run"
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    launch: LaunchConfig = field(default_factory=LaunchConfig)
    log: LogConfig = field(default_factory=LogConfig)
    defense: dict[str, Any] = field(default_factory=lambda: {"name": "sft"})
    # the stage that wrote this config (align | finetune); set by the recipe, not the user
    stage: str = ""


# Stage defaults that differ from the dataclass defaults (measured on the embedded model: see DESIGN).
STAGE_DEFAULTS: dict[str, dict[str, Any]] = {
    "align": {"train": {"lr": 5e-5}, "out_dir": "runs/align"},
    "finetune": {"train": {"lr": 2e-5}, "out_dir": "runs/finetune"},
}


def _closest(key: str, valid: list[str]) -> str:
    if not valid:
        return "; this section takes no keys"
    match = difflib.get_close_matches(key, valid, n=1, cutoff=0.5)
    return f"; did you mean '{match[0]}'?" if match else f"; valid keys: {', '.join(sorted(valid))}"


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", str(tp))


def _coerce(value: Any, tp: Any, where: str) -> Any:
    """Check (and gently coerce) one value against a dataclass field type."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, where)
            except BulwarkInputError as exc:
                errors.append(str(exc))
        raise BulwarkInputError(errors[0] if errors else f"{where}: bad value {value!r}")
    if origin is list:
        (item_tp,) = typing.get_args(tp)
        if isinstance(value, str):
            value = [v.strip() for v in value.split(",") if v.strip()]
        elif isinstance(value, (int, float)):  # `ps=0.1` on the command line: a one-element list
            value = [value]
        if not isinstance(value, list):
            raise BulwarkInputError(f"{where}: expected a list, got {value!r}")
        return [_coerce(v, item_tp, f"{where}[{i}]") for i, v in enumerate(value)]
    if origin is dict or tp is dict:
        if not isinstance(value, dict):
            raise BulwarkInputError(f"{where}: expected a mapping, got {value!r}")
        return dict(value)
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "yes", "no", "1", "0"):
            return value.lower() in ("true", "yes", "1")
        raise BulwarkInputError(f"{where}: expected true/false, got {value!r}")
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, (int, float, str)):
            raise BulwarkInputError(f"{where}: expected an integer, got {value!r}")
        try:
            as_float = float(value)
        except ValueError:
            raise BulwarkInputError(f"{where}: expected an integer, got {value!r}") from None
        if as_float != int(as_float):
            raise BulwarkInputError(f"{where}: expected an integer, got {value!r}")
        return int(as_float)
    if tp is float:
        if isinstance(value, bool):
            raise BulwarkInputError(f"{where}: expected a number, got {value!r}")
        try:
            return float(value)
        except (TypeError, ValueError):
            raise BulwarkInputError(f"{where}: expected a number, got {value!r}") from None
    if tp is str:
        if isinstance(value, (dict, list)):
            raise BulwarkInputError(f"{where}: expected a string, got {value!r}")
        return str(value)
    return value


def build_dataclass(cls: type, values: dict[str, Any], where: str) -> Any:
    """Build dataclass `cls` from a mapping; unknown keys and wrong types are errors naming the key."""
    if not isinstance(values, dict):
        raise BulwarkInputError(f"{where or 'config'}: expected a mapping, got {values!r}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in values.items():
        path = f"{where}.{key}" if where else str(key)
        if key not in fields:
            raise BulwarkInputError(f"unknown config key '{path}'{_closest(str(key), list(fields))}")
        tp = hints[key]
        if dataclasses.is_dataclass(tp):
            kwargs[key] = build_dataclass(tp, value or {}, path)
        else:
            kwargs[key] = _coerce(value, tp, path)
    return cls(**kwargs)


def deep_merge(base: dict, extra: dict) -> dict:
    merged = dict(base)
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = deep_merge(merged[key], value)
        elif isinstance(value, dict) and key in merged and merged[key] is not None:
            # `train: 5` in a file and `train.steps=3` given: one of them is a mistake, never drop the other
            raise BulwarkInputError(f"'{key}' is {merged[key]!r} but keys of it are set too ({', '.join(value)}): "
                                    f"write '{key}' as a section of keys")
        else:
            merged[key] = value
    return merged


def parse_overrides(overrides: list[str]) -> dict[str, Any]:
    """`a.b=1` -> {"a": {"b": 1}}; values parse as YAML scalars (numbers, true/false, lists)."""
    tree: dict[str, Any] = {}
    for item in overrides:
        if "=" not in item:
            raise BulwarkInputError(f"override '{item}' is not key=value (e.g. train.lr=1e-5)")
        key, raw = item.split("=", 1)
        key = key.strip()
        if not key:
            raise BulwarkInputError(f"override '{item}' has an empty key")
        try:
            value = yaml.safe_load(raw) if raw.strip() else ""
        except yaml.YAMLError:
            value = raw
        node = tree
        parts = key.split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise BulwarkInputError(f"override '{item}' conflicts with an earlier one")
        node[parts[-1]] = value
    return tree


def read_yaml(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise BulwarkInputError(f"config file {path} does not exist")
    try:
        loaded = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        line = f":{mark.line + 1}" if mark is not None else ""
        raise BulwarkInputError(f"{path}{line}: not valid YAML ({getattr(exc, 'problem', exc)})") from None
    if loaded is None:
        return {}
    if not isinstance(loaded, dict):
        raise BulwarkInputError(f"{path}: the top level must be a mapping of sections")
    return loaded


def load_config(path: str | Path | None, overrides: list[str] | None = None, stage: str = "") -> Config:
    """Stage defaults < YAML file < key=value overrides.

    The `defense` section comes back resolved: every parameter of the named defense, defaults included
    (so the run's config.yaml records what it ran with). An override that changes `defense.name` drops the
    file's parameters of the other defense, with a one-line note, instead of failing on them.
    """
    values = deep_merge({}, STAGE_DEFAULTS.get(stage, {}))
    from_file = read_yaml(path) if path is not None else {}
    given = parse_overrides(overrides or [])
    _drop_replaced_defense(from_file, given)
    values = deep_merge(deep_merge(values, from_file), given)
    values.pop("stage", None)
    cfg = build_dataclass(Config, values, "")
    cfg.stage = stage
    from bulwark.defenses import (
        resolve_defense_spec,  # defenses import config, not the other way at load time
    )

    cfg.defense = resolve_defense_spec(cfg.defense)
    validate(cfg)
    return cfg


def _drop_replaced_defense(from_file: dict[str, Any], given: dict[str, Any]) -> None:
    file_defense, given_defense = from_file.get("defense"), given.get("defense")
    if not isinstance(file_defense, dict) or not isinstance(given_defense, dict) or "name" not in given_defense:
        return
    old = file_defense.get("name", "sft")
    if old == given_defense["name"]:
        return
    dropped = sorted(k for k in file_defense if k != "name" and k not in given_defense)
    if dropped and os.environ.get("RANK", "0") == "0":
        print(f"note: defense.name={given_defense['name']} replaces the file's {old}: its "
              f"{', '.join('defense.' + k for k in dropped)} dropped", file=sys.stderr)
    from_file["defense"] = {}


def validate(cfg: Config) -> None:
    """Value checks that do not need files: each error names the key."""
    checks = [
        (cfg.model.dtype in ("fp32", "bf16"), "model.dtype must be fp32 or bf16"),
        (cfg.model.lora.mode in ("double", "single"), "model.lora.mode must be double or single"),
        (cfg.data.template in ("chat", "alpaca"), "data.template must be chat or alpaca"),
        (0.0 <= cfg.data.p <= 1.0, f"data.p = {cfg.data.p} must be in [0, 1]"),
        (cfg.data.n >= 1, f"data.n = {cfg.data.n} must be at least 1"),
        (cfg.data.align_n >= 1, f"data.align_n = {cfg.data.align_n} must be at least 1"),
        (cfg.data.align_benign_n >= 0, f"data.align_benign_n = {cfg.data.align_benign_n} must be >= 0"),
        (cfg.data.max_length >= 8, f"data.max_length = {cfg.data.max_length} is too small (>= 8)"),
        (cfg.model.lora.r >= 1, f"model.lora.r = {cfg.model.lora.r} must be at least 1"),
        (cfg.model.lora.alpha > 0, f"model.lora.alpha = {cfg.model.lora.alpha} must be positive"),
        (0 <= cfg.model.lora.dropout < 1, f"model.lora.dropout = {cfg.model.lora.dropout} must be in [0, 1)"),
        (cfg.train.warmup_steps >= 0, f"train.warmup_steps = {cfg.train.warmup_steps} must be >= 0"),
        (cfg.train.steps >= 1, f"train.steps = {cfg.train.steps} must be at least 1"),
        (cfg.train.micro_batch_size >= 1, "train.micro_batch_size must be at least 1"),
        (cfg.train.grad_accum >= 1, "train.grad_accum must be at least 1"),
        (cfg.train.lr > 0, f"train.lr = {cfg.train.lr} must be positive"),
        (cfg.train.optimizer in ("adamw", "sgd"), "train.optimizer must be adamw or sgd"),
        (cfg.train.lr_schedule in ("constant", "cosine"), "train.lr_schedule must be constant or cosine"),
        (cfg.train.max_grad_norm >= 0, "train.max_grad_norm must be >= 0 (0 = no clipping)"),
        (cfg.train.checkpoint_every >= 0, "train.checkpoint_every must be >= 0"),
        (cfg.train.keep_checkpoints >= 1, "train.keep_checkpoints must be at least 1"),
        (cfg.launch.nproc >= 1, f"launch.nproc = {cfg.launch.nproc} must be at least 1"),
        (cfg.launch.nnodes >= 1, f"launch.nnodes = {cfg.launch.nnodes} must be at least 1"),
    ]
    for ok, message in checks:
        if not ok:
            raise BulwarkInputError(message)
    check_numbers(to_dict(cfg))
    # a named logger whose package is missing fails here, before any rank starts
    from bulwark.loggers import check_sinks

    cfg.log.to = check_sinks(cfg.log.to)
    for key, value in cfg.defense.items():
        # every defense parameter is a weight, a radius, a step count or a seed: never negative (each
        # defense checks its tighter ranges itself, e.g. booster's eps > 0)
        if isinstance(value, (int, float)) and not isinstance(value, bool) and value < 0:
            raise BulwarkInputError(f"defense.{key} = {value} must be >= 0")


def check_numbers(values: dict[str, Any], prefix: str = "") -> None:
    """Every number in a (nested) config is finite: an inf or NaN setting fails here, naming its key, instead
    of training to the end on NaN weights."""
    import math

    for key, value in values.items():
        if isinstance(value, dict):
            check_numbers(value, f"{prefix}{key}.")
        elif isinstance(value, float) and not math.isfinite(value):
            raise BulwarkInputError(f"{prefix}{key} = {value} must be a finite number")


def to_dict(cfg: Config) -> dict[str, Any]:
    return dataclasses.asdict(cfg)


def write_config(cfg: Config, path: str | Path) -> None:
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))
    tmp.replace(path)
