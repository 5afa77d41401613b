"""Recover methods, registered by name, and the run context each one gets.

A method is one module in bulwark/recover/ that calls `register(Method(...))`: its name (`method=` in the
config), its config dataclass (the config section of the same name, typed and range-checked at load by the
dataclass's own `check()`), what inputs it needs, and `run(RecoverRun) -> summary`. The recipe
(bulwark/recipes/recover.py) owns everything around it: the run folder, ranks, log.jsonl, summary.json,
DONE. The package imports every module in it, so a new method is one new file (its test, its config
section and its docs beside it) and nothing else.

`RecoverRun` is composition, not a base class: the loaders a method may use (a model replica or its ZeRO-3
partition, the fine-tuned model as a full folder, prompt batches) are its methods.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from bulwark.errors import BulwarkInputError

if TYPE_CHECKING:
    from bulwark.recover.config import RecoverConfig

LogFn = Callable[[dict[str, Any]], None]
TaskMetric = Callable[[torch.nn.Module], float]  # higher is better; called on every rank, same answer on all


@dataclass
class Inputs:
    """Every input resolved and checked before a rank starts."""

    aligned: Path  # A, an HF folder
    finetuned: Path  # B: an HF folder, or a LoRA adapter folder
    finetuned_base: Path | None  # the adapter's base when B is an adapter that the method wants merged
    base: Path | None  # the unaligned model A was aligned from (methods with needs_base)
    data_dir: Path | None


@dataclass
class RecoverRun:
    """What a method's `run` gets, on every rank it runs on."""

    cfg: RecoverConfig
    inputs: Inputs
    out: Path  # the run folder; the repaired model goes to out / "model"
    log: LogFn  # one row of log.jsonl (rank 0 writes it; a no-op elsewhere)
    rank: int
    world: int
    metric: TaskMetric | None = None  # a caller-given task metric (tests); else the config's
    zero3: bool = False  # the model is partitioned with ZeRO-3 across the ranks

    @property
    def settings(self) -> Any:
        """This method's typed config section."""
        return self.cfg.settings[self.cfg.method]

    def load(self, folder: Path) -> torch.nn.Module:
        """A model in eval mode: under ZeRO-3 this rank's slice of every weight (zero.Init places it on the
        accelerator), else a whole replica on this rank's device."""
        from bulwark.engine.dist import device
        from bulwark.engine.partitioned import load_partitioned
        from bulwark.models import load_model

        if self.zero3:
            return load_partitioned(folder, self.cfg.dtype, self.cfg.launch.ds_config).eval()
        return load_model(str(folder), self.cfg.dtype).to(device()).eval()

    def per_module(self, score: TaskMetric | None) -> TaskMetric | None:
        """`score` made safe for a partitioned model: a whole-model forward or generate gathers one decoder
        layer at a time."""
        if score is None or not self.zero3:
            return score
        from bulwark.engine.partitioned import gathered_per_module
        from bulwark.recover.hidden import decoder_layers

        def gathered_score(model: torch.nn.Module) -> float:
            with gathered_per_module(model, decoder_layers(model)[1]):
                return score(model)

        return gathered_score

    def finetuned_folder(self) -> Path:
        """B as a full HF folder: a LoRA adapter is merged onto its base once, by rank 0."""
        import shutil

        from bulwark.engine import barrier

        if self.inputs.finetuned_base is None:
            return self.inputs.finetuned
        target = self.out / "finetuned_merged"
        if self.rank == 0:
            from peft import PeftModel

            from bulwark.models import load_model, load_tokenizer

            adapter, base = self.inputs.finetuned, self.inputs.finetuned_base
            merged = PeftModel.from_pretrained(load_model(str(base), self.cfg.dtype), str(adapter)).merge_and_unload()
            tokenizer = load_tokenizer(str(adapter if (adapter / "tokenizer_config.json").is_file() else base))
            tmp = self.out / "finetuned_merged.tmp"
            shutil.rmtree(tmp, ignore_errors=True)
            merged.save_pretrained(tmp)
            tokenizer.save_pretrained(tmp)
            tmp.rename(target)
        barrier()
        return target


@dataclass(frozen=True)
class Method:
    name: str
    Config: type  # the config section `<name>:`; an optional `check()` on it range-checks at load
    run: Callable[[RecoverRun], dict[str, Any] | None]  # every rank calls it; rank 0 returns the summary
    summary: str
    needs_base: bool = False  # reads the unaligned base model (config key `base`)
    one_process: bool = False  # cheap one-shot edit: always one process, whatever launch.nproc says
    reads_adapter: bool = False  # takes a LoRA fine-tuned model as the adapter itself (else merged first)
    # pre-rank checks of what the method reads (data files, ZeRO-3 JSON...): raise BulwarkInputError
    check: Callable[[RecoverConfig, Inputs], None] | None = None


REGISTRY: dict[str, Method] = {}


def register(method: Method) -> Method:
    if not method.name or method.name in REGISTRY:
        raise ValueError(f"recover method name {method.name!r} empty or registered twice")
    REGISTRY[method.name] = method
    return method


def methods() -> dict[str, Method]:
    """Every registered method (importing each module of bulwark/recover/ once registers them)."""
    import importlib
    import pkgutil

    import bulwark.recover as package

    for module in sorted(m.name for m in pkgutil.iter_modules(package.__path__)):
        if not module.startswith("_"):
            importlib.import_module(f"bulwark.recover.{module}")
    return REGISTRY


def get(name: str) -> Method:
    known = methods()
    if name not in known:
        import difflib

        close = difflib.get_close_matches(name, list(known), n=1)
        hint = f"; did you mean '{close[0]}'?" if close else ""
        raise BulwarkInputError(f"method = {name!r}{hint}: choose one of {', '.join(sorted(known))}")
    return known[name]


def describe_methods() -> list[dict[str, Any]]:
    """Name, stage, summary and parameters with defaults of every recover method (as `describe()` of defenses)."""
    import dataclasses

    return [{"name": name, "stages": ["recover"], "summary": m.summary,
             "params": dataclasses.asdict(m.Config())} for name, m in sorted(methods().items())]


def world() -> tuple[int, int]:
    """(rank, world size) of the process group, (0, 1) without one."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1
