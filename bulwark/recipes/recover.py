"""`bulwark recover`: repair a fine-tuned model B toward its aligned model A (the math: bulwark/recover/).

    bulwark recover [CONFIG] [key=value ...] [--overwrite]          starts launch.nproc ranks (bulwark/launch.py)
    torchrun --nproc_per_node N -m bulwark.recipes.recover [CONFIG] [key=value ...] [--resume-if-present]

`method=` names a registered method (bulwark/recover/base.py; `bulwark defenses` lists them at stage recover):
restore (default, bulwark/recover/restore.py), safelora (bulwark/recover/safelora.py), ... This file owns
what every method shares: the checks before any rank, the ranks, the run folder, log.jsonl, summary.json, DONE.

Everything that can be checked without loading a model (config, model folders, A/B compatibility, data
files, prompts) is checked before any rank starts (`prepare`): bad input costs one `error:` line and exit
code 2. Recover keeps no checkpoints: --resume-if-present (SLURM jobs) starts an unfinished attempt of the
same config over and leaves a finished one alone (bulwark/recipes/loop.py: start_mode).

The run folder (out_dir):
  config.yaml     the resolved config
  model/          the repaired model, an HF folder (written to model.tmp, then renamed)
  adapter/        a method that edits a LoRA input as an adapter (safelora): the edited adapter
  log.jsonl       the method's rows (restore: per step and per checkpoint; safelora: per layer)
  summary.json    the outcome and wall time
  DONE            written last, as the other stages do (bench skips finished runs by it)
"""

from __future__ import annotations

import atexit
import json
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Any

import torch

from bulwark.errors import BulwarkInputError
from bulwark.recipes.loop import RUN_MARKER, parse_args, start_mode
from bulwark.recover.base import Inputs, RecoverRun, get
from bulwark.recover.config import (
    RecoverConfig,
    load_recover_config,
    recover_config_text,
    write_recover_config,
)

# ---- checks before any rank starts ---------------------------------------------------------------------


def _model_folder(name: str, key: str) -> Path:
    from bulwark import models

    if name == "tiny":
        raise BulwarkInputError(f"{key}: 'tiny' is built in memory; save it first (models.save_tiny_llama)")
    try:
        return Path(models.resolve_model_path(name))
    except BulwarkInputError as exc:
        raise BulwarkInputError(f"{key}: {exc}") from None


def check_inputs(cfg: RecoverConfig) -> Inputs:
    """Resolve and check every input (the models, their compatibility, the data files; the run folder is
    `start_mode`'s); raises BulwarkInputError with one clear line."""
    from bulwark import models
    from bulwark.data.readers import resolve_data_dir
    from bulwark.recover.checkpoints import check_compatible

    method = get(cfg.method)
    aligned = _model_folder(cfg.aligned, "aligned")
    finetuned_base = None
    base = _model_folder(cfg.base, "base") if cfg.base and method.needs_base else None
    if models.is_adapter_dir(cfg.finetuned):
        finetuned = Path(cfg.finetuned).expanduser()
        if not method.reads_adapter:  # merged onto its base first (RecoverRun.finetuned_folder)
            finetuned_base = _model_folder(models.base_of(cfg.finetuned), f"finetuned (the base of {finetuned})")
    else:
        finetuned = _model_folder(cfg.finetuned, "finetuned")
    if finetuned_base is not None or not models.is_adapter_dir(finetuned):
        check_compatible(aligned, finetuned_base or finetuned)
    if base is not None:
        check_compatible(base, aligned, ("base", "aligned"), f"{cfg.method} needs A aligned from the base")
    inputs = Inputs(aligned, finetuned, finetuned_base, base, resolve_data_dir(cfg.data.dir))
    if method.check is not None:
        method.check(cfg, inputs)
    return inputs


# ---- the launcher's checks ------------------------------------------------------------------------------


def prepare(config: str | None, overrides: list[str], *, resume: bool = False, overwrite: bool = False,
            resume_if_present: bool = False, stop_after: int = 0) -> tuple[int, list[str]]:
    """Check every input before any rank starts (bulwark/launch.py); returns (ranks, rank argv)."""
    from bulwark.launch import stage_argv

    if resume or stop_after:
        raise BulwarkInputError("recover keeps no checkpoints: --resume / --stop-after do not apply "
                                "(--resume-if-present starts an unfinished attempt over)")
    cfg = load_recover_config(config, overrides)
    start_mode(Path(cfg.out_dir), recover_config_text(cfg), False, overwrite, resume_if_present)
    check_inputs(cfg)
    nproc = 1 if get(cfg.method).one_process else cfg.launch.nproc
    return nproc, stage_argv(config, overrides, overwrite=overwrite, resume_if_present=resume_if_present,
                             resolved=recover_config_text(cfg))


def _init_ranks(cfg: RecoverConfig) -> tuple[int, int]:
    from bulwark.recover.config import use_zero3

    world = int(os.environ.get("WORLD_SIZE", "1"))
    if not get(cfg.method).one_process and use_zero3(cfg, world):
        from bulwark.engine import init_distributed

        rank, world, _ = init_distributed()  # through DeepSpeed: zero.Init reads its process group
        return rank, world
    if world > 1 and not torch.distributed.is_initialized():
        if torch.cuda.is_available():  # NCCL stages collectives on the current device: this rank's GPU
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        torch.distributed.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
        from bulwark.engine.dist import shutdown

        atexit.register(shutdown)
    if torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


# ---- the run --------------------------------------------------------------------------------------------


class JsonlLog:
    """Rank 0 appends rows to log.jsonl and prints a short line per row; other ranks stay silent."""

    def __init__(self, path: Path, rank: int) -> None:
        self.file = path.open("a") if rank == 0 else None

    def __call__(self, row: dict[str, Any]) -> None:
        if self.file is None:
            return
        self.file.write(json.dumps(row) + "\n")
        self.file.flush()
        brief = {k: v for k, v in row.items() if not isinstance(v, dict)}
        print(f"[recover] {json.dumps(brief)}", file=sys.stderr, flush=True)

    def close(self) -> None:
        if self.file is not None:
            self.file.close()


def run(cfg: RecoverConfig, inputs: Inputs, overwrite: bool, metric: Any = None) -> dict[str, Any] | None:
    """Run the stage in every rank; rank 0 returns the summary, other ranks None.

    `metric` replaces the config's task metric (a callable model -> score, higher is better).
    """
    from bulwark.engine import barrier

    started = time.perf_counter()
    rank, world = _init_ranks(cfg)
    out = Path(cfg.out_dir)
    if rank == 0:
        if out.exists() and overwrite:
            shutil.rmtree(out)
        out.mkdir(parents=True, exist_ok=True)
        (out / RUN_MARKER).write_text("a Bulwark recover run folder: --overwrite may replace it\n")
        write_recover_config(cfg, out / "config.yaml")
    barrier()
    log = JsonlLog(out / "log.jsonl", rank)
    method = get(cfg.method)
    from bulwark.recover.config import use_zero3

    context = RecoverRun(cfg, inputs, out, log, rank, world, metric,
                         zero3=not method.one_process and use_zero3(cfg, world))
    try:
        summary = method.run(context) if rank == 0 or not method.one_process else None
    finally:
        log.close()
    if rank == 0 and summary is not None:
        summary["seconds"] = round(time.perf_counter() - started, 1)
        summary["world_size"] = world
        tmp = out / "summary.json.tmp"
        tmp.write_text(json.dumps(summary, indent=2) + "\n")
        tmp.replace(out / "summary.json")
        (out / "DONE").write_text(json.dumps({"stage": "recover", "method": cfg.method}))  # as align/finetune
        print(f"[recover] done in {summary['seconds']} s -> {out / 'model'}", file=sys.stderr, flush=True)
    barrier()
    return summary


# ---- entry point ----------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> None:
    """The rank entry (`python -m bulwark.recipes.recover` under torchrun, or `bulwark.launch.start`)."""
    from bulwark.engine.dist import exit_after_success

    args = parse_args(argv, "recover")
    try:
        if args.resume or args.stop_after:
            raise BulwarkInputError("recover keeps no checkpoints: --resume / --stop-after do not apply")
        cfg = load_recover_config(args.config, args.overrides)
        mode = start_mode(Path(cfg.out_dir), recover_config_text(cfg), False, args.overwrite, args.resume_if_present)
        if mode == "done":
            print(f"{cfg.out_dir}: this recover run finished already (DONE); nothing to do", file=sys.stderr)
            return
        inputs = check_inputs(cfg)
        run(cfg, inputs, overwrite=mode == "overwrite")
    except BulwarkInputError as exc:
        from bulwark.errors import report

        report(f"error: {exc}", os.environ.get("RANK", "0") == "0")
        raise SystemExit(2) from None
    exit_after_success()


if __name__ == "__main__":
    main()
