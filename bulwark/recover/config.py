"""The recover stage's typed config: a YAML file plus `key=value` overrides, unknown keys are errors.

Kept apart from `bulwark.config.Config` (whose sections describe a training run) and built with the same
`build_dataclass`, so a typo fails the same way everywhere. Example (configs/recover.yaml):

    out_dir: runs/recover
    method: restore              # a registered method: restore | safelora | antidote | safemerge (bulwark defenses)
    aligned: runs/align/model    # A: the aligned model
    finetuned: runs/finetune/model   # B: the fine-tuned model (full folder, or a LoRA adapter folder)
    restore: {fraction: 0.002, steps: 20}
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import yaml

from bulwark.config import build_dataclass, deep_merge, parse_overrides, read_yaml
from bulwark.errors import BulwarkInputError

TASK_METRICS = ("auto", "accuracy", "loss")


@dataclass
class RecoverData:
    dir: str | None = None  # data folder; else $BULWARK_DATA_DIR
    template: str = "chat"  # chat | alpaca: how prompts are rendered (use the one the model was trained with)
    max_length: int = 256  # prompt tokens kept (the last ones: they hold the template's answer marker)
    harmful: str = "beavertails_refusals"  # recovery prompts: only their prompt text is used
    harmful_n: int = 64
    harmful_format: str | None = None  # a bulwark.data format (qa, prompt_only, ...); None = guessed from the name
    task: str = "sst2_train"  # task prompts for the benign direction and the rollback loss
    task_n: int = 64
    task_format: str | None = None


@dataclass
class TaskConfig:
    metric: str = "auto"  # accuracy (generate + bulwark.eval.metrics) | loss (exp(-token loss)) | auto
    eval_set: str = "sst2_dev"  # rows scored by the metric (sst2 / agnews / gsm8k formats for accuracy)
    n: int = 100
    max_new_tokens: int = 16
    batch_size: int = 16


@dataclass
class HarmEvalConfig:
    n: int = 0  # harmful prompts generated at each checkpoint for an HS figure; 0 = off
    prompts: str = "harmful_eval_prompts"
    judge: str = "keyword"  # any name bulwark.eval.judges.get_judge knows
    max_new_tokens: int = 32


@dataclass
class RecoverLaunch:
    nproc: int = 1  # ranks when bulwark starts torchrun itself
    master_port: int = 0  # 0 = pick a free port
    zero3: str = "auto"  # auto: partition the model with ZeRO-3 when there are several ranks | true | false
    ds_config: str = "zero3"  # the ZeRO-3 settings (a name in ds_configs/ or a JSON path); only its
    #                           zero_optimization and bf16 sections matter: recover takes no optimizer step


@dataclass
class RecoverConfig:
    out_dir: str = "runs/recover"
    method: str = "restore"  # a registered method (bulwark/recover/base.py); its settings: the section of that name
    aligned: str = ""  # A: HF folder, .gguf, "embedded"
    finetuned: str = ""  # B: HF folder, or a LoRA adapter folder (merged onto its base first)
    base: str = ""  # methods that read it (safelora, ...): the unaligned model A was aligned from
    dtype: str = "fp32"
    seed: int = 42
    data: RecoverData = field(default_factory=RecoverData)
    task: TaskConfig = field(default_factory=TaskConfig)
    eval: HarmEvalConfig = field(default_factory=HarmEvalConfig)
    launch: RecoverLaunch = field(default_factory=RecoverLaunch)
    # every registered method's section by name ("restore": RestoreConfig, ...), typed at load; a YAML file
    # writes each as a top-level section (`restore: {fraction: 0.002}`), as config.yaml records it
    settings: dict[str, Any] = field(default_factory=dict)

    @property
    def method_settings(self) -> Any:
        return self.settings[self.method]


def load_recover_config(path: str | Path | None, overrides: list[str] | None = None) -> RecoverConfig:
    """Defaults < YAML file < key=value overrides; then value checks that need no files."""
    values: dict[str, Any] = read_yaml(path) if path is not None else {}
    values = deep_merge(values, parse_overrides(overrides or []))
    values.pop("stage", None)  # a resolved config written by a run carries it
    from bulwark.recover.base import methods

    known = methods()
    sections = {name: values.pop(name, None) or {} for name in known}
    if "settings" in values:
        raise BulwarkInputError("unknown config key 'settings': write a method's settings as its own section "
                                f"({', '.join(sorted(known))})")
    cfg = build_dataclass(RecoverConfig, values, "")
    cfg.settings = {name: build_dataclass(m.Config, sections[name], name) for name, m in sorted(known.items())}
    validate(cfg)
    from bulwark.config import check_numbers

    check_numbers(asdict(cfg))
    return cfg


def validate(cfg: RecoverConfig) -> None:
    from bulwark.recover.base import get

    method = get(cfg.method)
    t = cfg.task
    checks = [
        (bool(cfg.aligned), "aligned: give the aligned model A (an HF folder, e.g. runs/align/model)"),
        (bool(cfg.finetuned), "finetuned: give the fine-tuned model B (an HF folder or a LoRA adapter folder)"),
        (not method.needs_base or bool(cfg.base), f"base: {cfg.method} needs the unaligned base model A came from"),
        (cfg.dtype in ("fp32", "bf16"), "dtype must be fp32 or bf16"),
        (cfg.data.template in ("chat", "alpaca"), "data.template must be chat or alpaca"),
        (cfg.data.max_length >= 8, f"data.max_length = {cfg.data.max_length} is too small (>= 8)"),
        (cfg.data.harmful_n >= 1, f"data.harmful_n = {cfg.data.harmful_n} must be at least 1"),
        (cfg.data.task_n >= 1, f"data.task_n = {cfg.data.task_n} must be at least 1"),
        (t.metric in TASK_METRICS, f"task.metric = {t.metric!r}: choose one of {', '.join(TASK_METRICS)}"),
        (t.n >= 1 and t.max_new_tokens >= 1 and t.batch_size >= 1, "task.n, max_new_tokens, batch_size must be >= 1"),
        (cfg.eval.n >= 0, f"eval.n = {cfg.eval.n} must be >= 0 (0 = no HS figures)"),
        (cfg.eval.max_new_tokens >= 1, "eval.max_new_tokens must be at least 1"),
        (cfg.launch.nproc >= 1, f"launch.nproc = {cfg.launch.nproc} must be at least 1"),
        (str(cfg.launch.zero3).lower() in ("auto", "true", "false"),
         f"launch.zero3 = {cfg.launch.zero3!r}: choose auto, true or false"),
    ]
    for ok, message in checks:
        if not ok:
            raise BulwarkInputError(message)
    for section in cfg.settings.values():
        if hasattr(section, "check"):
            section.check()


def use_zero3(cfg: RecoverConfig, world_size: int) -> bool:
    """Partition the repaired model with ZeRO-3? auto: yes when there are several ranks."""
    choice = str(cfg.launch.zero3).lower()
    return world_size > 1 if choice == "auto" else choice == "true"


def recover_config_text(cfg: RecoverConfig) -> str:
    """The resolved config as the run folder's config.yaml holds it."""
    values = asdict(cfg)
    sections = values.pop("settings")
    return yaml.safe_dump({**values, **sections, "stage": "recover"}, sort_keys=False)


def write_recover_config(cfg: RecoverConfig, path: Path) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(recover_config_text(cfg))
    tmp.replace(path)
