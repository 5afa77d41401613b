"""The training loop every stage runs, and the run-folder rules around it.

A stage recipe (align.py, finetune.py) decides which rows form which stream; this file owns the
rest, top to bottom: prepare (in the launcher's process) -> run folder -> engine -> streams -> resume
-> loop -> export.

Starting over a run folder (`start_mode`): a fresh start needs an empty folder (or --overwrite);
--resume needs a finished checkpoint; --resume-if-present, what SLURM jobs pass on every start, resumes
from the last checkpoint when there is one, starts over a folder that holds only an unfinished attempt
of this very config (a job preempted before its first checkpoint), does nothing for a finished run of
this config (a requeue after the end), and refuses a folder that holds another run.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import sys
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from bulwark.config import Config, load_config, to_dict, write_config
from bulwark.data import DistributedStream, Example, tokenize_example
from bulwark.defenses import Defense, build_defense
from bulwark.errors import BulwarkInputError
from bulwark.recipes.step import train_step

RUN_MARKER = ".bulwark-run"  # written first into every run folder Bulwark makes; --overwrite removes only those
FAILED = "FAILED"  # a run that stopped on an error: its one-line reason, then the traceback
LOCK_SUFFIX = ".lock"  # beside the run folder: {"pid", "host"}, its mtime refreshed every step
LOCK_STALE_S = 600  # a lock of another host untouched this long belongs to a dead run (requeued jobs move nodes)
EXIT_INPUT, EXIT_DIVERGED, EXIT_INTERRUPTED = 2, 3, 130


class Diverged(Exception):
    """The loss or gradient norm became non-finite: the run stops, keeps its last good checkpoint, exports nothing."""


@dataclass
class StagePlan:
    """What a stage recipe hands to the loop: the rows of every stream and files for the run folder."""

    streams: dict[str, list[Example]]
    writers: dict[str, Callable[[Path], None]] = field(default_factory=dict)  # run-folder file -> writer


def parse_args(argv: list[str] | None, stage: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog=f"python -m bulwark.recipes.{stage}")
    parser.add_argument("config", nargs="?", default=None)
    parser.add_argument("overrides", nargs="*")
    parser.add_argument("--resume", action="store_true")
    parser.add_argument("--overwrite", action="store_true")
    parser.add_argument("--resume-if-present", action="store_true",
                        help="resume when a checkpoint exists, else start; what SLURM jobs pass (module doc)")
    parser.add_argument("--stop-after", type=int, default=0, help="stop after this many optimizer steps")
    args = parser.parse_args(argv)
    if args.config is not None and "=" in args.config:  # no YAML file, only overrides
        args.overrides.insert(0, args.config)
        args.config = None
    return args


def check_run_dir(out_dir: Path, resume: bool, overwrite: bool) -> None:
    """An existing run is never overwritten by accident; --resume needs a finished checkpoint; --overwrite
    removes only a folder Bulwark made (it holds RUN_MARKER), never a folder of the user's own files."""
    if resume:
        if not (out_dir / "checkpoints" / "latest").is_file():
            raise BulwarkInputError(f"--resume: {out_dir} has no finished checkpoint (checkpoints/latest)")
        return
    if not out_dir.exists() or not any(out_dir.iterdir()):
        return
    if not (out_dir / RUN_MARKER).is_file():
        raise BulwarkInputError(f"{out_dir} holds files Bulwark did not write (no {RUN_MARKER}); Bulwark only ever "
                                "replaces its own run folders: choose another out_dir or move the files")
    if not overwrite and not failed_before_a_checkpoint(out_dir):
        raise BulwarkInputError(f"{out_dir} already holds a run; pass --overwrite to replace it or --resume")


def failed_before_a_checkpoint(out_dir: Path) -> bool:
    """A run that stopped on an error before its first checkpoint: nothing in it is worth keeping, so a rerun
    replaces it without --overwrite."""
    return (out_dir / FAILED).is_file() and not (out_dir / "checkpoints" / "latest").is_file()


def start_mode(out_dir: Path, resolved_config: str, resume: bool, overwrite: bool, resume_if_present: bool) -> str:
    """"fresh", "overwrite", "resume" or "done" for a run of `resolved_config` (its config.yaml text) in
    `out_dir`; bad combinations are BulwarkInputErrors. Reads the folder only: every rank decides alike."""
    check_lock(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise BulwarkInputError(f"out_dir {out_dir} is a file, not a folder: choose another out_dir")
    if not resume_if_present:
        check_run_dir(out_dir, resume, overwrite)
        if resume:
            check_resume_settings(out_dir, resolved_config)
            return "resume"
        return "overwrite" if out_dir.exists() and any(out_dir.iterdir()) else "fresh"
    if resume or overwrite:
        raise BulwarkInputError("--resume-if-present decides itself: drop --resume / --overwrite")
    if not out_dir.exists() or not any(out_dir.iterdir()):
        return "fresh"
    saved = out_dir / "config.yaml"
    if not (out_dir / RUN_MARKER).is_file() or not saved.is_file() or saved.read_text() != resolved_config:
        raise BulwarkInputError(f"--resume-if-present: {out_dir} holds another run (its config.yaml differs); "
                                "give another out_dir or remove it")
    if (out_dir / "DONE").is_file():
        return "done"
    return "resume" if (out_dir / "checkpoints" / "latest").is_file() else "overwrite"


# What --resume may change: how long to train and how often to save. Everything else (the data, the model,
# the defense, lr, batch shape) would silently make the resumed run another experiment.
RESUMABLE_CHANGES = ("train.steps", "train.checkpoint_every", "train.keep_checkpoints", "train.log_every",
                     "launch.master_port", "log.to")  # where numbers are reported never changes the run


def check_resume_settings(out_dir: Path, resolved_config: str) -> None:
    import yaml

    saved_path = out_dir / "config.yaml"
    if not saved_path.is_file():
        raise BulwarkInputError(f"--resume: {saved_path} is missing; the run folder is not one Bulwark finished setting up")
    saved, new = _flat(yaml.safe_load(saved_path.read_text()) or {}), _flat(yaml.safe_load(resolved_config) or {})
    changed = sorted(k for k in saved.keys() | new.keys() if saved.get(k) != new.get(k) and k not in RESUMABLE_CHANGES)
    if changed:
        shown = ", ".join(f"{k} ({saved.get(k)!r} -> {new.get(k)!r})" for k in changed[:4])
        raise BulwarkInputError(f"--resume with changed settings: {shown}{' ...' if len(changed) > 4 else ''}; "
                                f"only {', '.join(RESUMABLE_CHANGES)} may change (start a new run for the rest)")


def _flat(values: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in values.items():
        if isinstance(value, dict) and value:
            flat.update(_flat(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def lock_path(out_dir: Path) -> Path:
    return out_dir.with_name(out_dir.name + LOCK_SUFFIX)


def check_lock(out_dir: Path) -> None:
    """Refuse a run folder another live run is writing; a dead holder's lock is taken over."""
    holder = _live_holder(lock_path(out_dir))
    if holder:
        raise BulwarkInputError(f"{out_dir} is being written by another run ({holder}); wait for it to end or stop it")


def _live_holder(path: Path) -> str:
    import socket

    try:
        info = json.loads(path.read_text())
        age = time.time() - path.stat().st_mtime
    except (OSError, ValueError):
        return ""
    pid, host = int(info.get("pid", 0)), str(info.get("host", ""))
    if pid == os.getpid():
        return ""
    if host != socket.gethostname():
        return "" if age > LOCK_STALE_S else f"pid {pid} on {host}"
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return ""
    except PermissionError:
        pass
    return f"pid {pid}"


def take_lock(out_dir: Path) -> bool:
    """Rank 0: hold the run folder's lock (O_EXCL; a dead holder's lock is replaced). False when a live run
    holds it (the caller makes every rank refuse alike)."""
    import socket

    path = lock_path(out_dir)
    path.parent.mkdir(parents=True, exist_ok=True)
    for _ in range(2):
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            if _live_holder(path):
                return False
            path.unlink(missing_ok=True)
            continue
        with os.fdopen(fd, "w") as f:
            json.dump({"pid": os.getpid(), "host": socket.gethostname()}, f)
        return True
    return False


def release_lock(out_dir: Path) -> None:
    path = lock_path(out_dir)
    try:
        if json.loads(path.read_text()).get("pid") == os.getpid():
            path.unlink()
    except (OSError, ValueError):
        pass


def mark_failed(out_dir: Path, line: str, details: str = "") -> None:
    """FAILED holds the one-line reason (and the traceback), so that the folder is never taken for a
    finished or resumable run and a rerun may replace it. Any rank may write it; the first one's stays."""
    if not (out_dir / RUN_MARKER).is_file():
        return
    try:
        fd = os.open(out_dir / FAILED, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    except FileExistsError:
        return
    with os.fdopen(fd, "w") as f:
        f.write(line + "\n" + details)


def config_text(cfg: Config) -> str:
    """The resolved config as `config.yaml` holds it."""
    import yaml

    from bulwark.config import to_dict

    return yaml.safe_dump(to_dict(cfg), sort_keys=False)


def prepare_stage(stage: str, build_plan: Any, config: str | None, overrides: list[str], *, resume: bool = False,
                  overwrite: bool = False, resume_if_present: bool = False, stop_after: int = 0,
                  ) -> tuple[int, list[str]]:
    """Everything a training stage can check without starting DeepSpeed (the launcher's `prepare`):
    config, defense, run folder, DeepSpeed config, model path, every data file. Returns
    (launch.nproc, the rank entry's argv)."""
    from bulwark import models
    from bulwark.engine import fill_ds_config, read_ds_config
    from bulwark.launch import stage_argv

    cfg = load_config(config, overrides, stage)
    defense = build_defense(cfg.defense, stage, cfg.train.steps)
    start_mode(Path(cfg.out_dir), config_text(cfg), resume, overwrite, resume_if_present)
    fill_ds_config(read_ds_config(cfg.launch.ds_config), cfg.train, cfg.model.dtype, cfg.launch.nproc)
    model_path = models.resolve_model_path(models.base_of(cfg.model.name))  # converts the embedded model once
    if model_path != "tiny" and Path(model_path).is_dir():
        models.check_weight_files(model_path)
    defense.check_inputs(model_path)  # a second model the defense reads (AsFT's base) fits this one
    build_plan(cfg, defense)  # reads and checks every data file the ranks will read
    argv = stage_argv(config, overrides, resume=resume, overwrite=overwrite, resume_if_present=resume_if_present,
                      stop_after=stop_after, resolved=config_text(cfg))
    return cfg.launch.nproc, argv


def tokenize_streams(plan: StagePlan, tokenizer: Any, cfg: Config) -> dict[str, list[dict]]:
    return {
        name: [tokenize_example(ex, tokenizer, cfg.data.template, cfg.data.max_length) for ex in rows]
        for name, rows in plan.streams.items()
    }


def run_stage(stage: str, argv: list[str] | None, build_plan: Any) -> None:
    """Entry point of `python -m bulwark.recipes.<stage>` in every rank (under torchrun or srun).

    Whatever stops a rank ends in one line on stderr and an exit code, never a traceback on the terminal:
    2 for input a rank rejected before training began (a value DeepSpeed refuses, weights that do not
    load, an unreadable upload; the traceback goes to the run folder's FAILED file), 3 for a diverged
    run, 130 for Ctrl-C / SIGTERM (with where to resume from), 1 for a failure during training. A run
    folder that failed before its first checkpoint is marked FAILED and a rerun replaces it.
    """
    import signal
    import traceback

    args = parse_args(argv, stage)
    # DeepSpeed calls torch collectives that torch has renamed; the warning repeats every step
    warnings.filterwarnings("ignore", category=FutureWarning, module="torch.distributed")
    signal.signal(signal.SIGTERM, _interrupt)  # torchrun and SLURM stop ranks with SIGTERM
    run: dict[str, Any] = {"out_dir": None, "training": False, "step": 0}
    rank0 = os.environ.get("RANK", "0") == "0"
    try:
        train(stage, args, build_plan, run)
    except BulwarkInputError as exc:
        _leave(run, f"error: {exc}", EXIT_INPUT, rank0)
    except Diverged as exc:
        _leave(run, f"error: {exc}", EXIT_DIVERGED, rank0)
    except KeyboardInterrupt:
        _leave(run, _interrupted_line(run), EXIT_INTERRUPTED, rank0, mark=False)
    except Exception as exc:  # noqa: BLE001  (every failure becomes one line; the traceback goes to FAILED)
        # the first lines carry the what and the where (pydantic: model, field, reason); the rest goes to FAILED
        first = "; ".join(line.strip() for line in str(exc).strip().splitlines()[:3])[:400]
        where = f" (traceback: {Path(run['out_dir']) / FAILED})" if run["out_dir"] else ""
        code, phase = (1, "training") if run["training"] else (EXIT_INPUT, "before training; input rejected")
        # before training every rank fails alike: rank 0 speaks; during training the failing rank does
        _leave(run, f"error: {type(exc).__name__}: {first} ({phase}){where}", code, rank0 or run["training"],
               details=traceback.format_exc())
    if rank0 and run["out_dir"] is not None:
        release_lock(Path(run["out_dir"]))
    from bulwark.engine import exit_after_success

    exit_after_success()


def _interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt


def _interrupted_line(run: dict[str, Any]) -> str:
    if run["out_dir"] is None:
        return "interrupted before the run started; nothing was written"
    latest = Path(run["out_dir"]) / "checkpoints" / "latest"
    if latest.is_file():
        return (f"interrupted at step {run['step']}; last checkpoint {latest.parent / latest.read_text().strip()}: "
                "rerun the same command with --resume to continue from it")
    return f"interrupted at step {run['step']} before the first checkpoint: rerun with --overwrite to start over"


def _leave(run: dict[str, Any], line: str, code: int, speak: bool, details: str = "", mark: bool = True) -> None:
    """Print `line` (from one rank), mark the run folder, free its lock, and end the process at once: a
    finalizing interpreter could wait forever on a collective that the other ranks never join."""
    from bulwark.errors import report

    out_dir = Path(run["out_dir"]) if run["out_dir"] else None
    if out_dir is not None:
        if mark or not (out_dir / "checkpoints" / "latest").is_file():
            mark_failed(out_dir, line, details)
        if os.environ.get("RANK", "0") == "0":
            release_lock(out_dir)
    report(line, speak)
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            pass
    os._exit(code)


def train(stage: str, args: argparse.Namespace, build_plan: Any, run: dict[str, Any] | None = None) -> None:
    """One stage in this rank. `run` (from run_stage) is filled as the run goes: its folder, whether
    training began, the step, so that a failure can say where it stopped."""
    run = {} if run is None else run
    from bulwark import models
    from bulwark.engine import (
        Engine,
        RunLogger,
        barrier,
        fill_ds_config,
        gather_for_edit,
        init_distributed,
        peak_memory_bytes,
        read_ds_config,
    )

    cfg = load_config(args.config, args.overrides, stage)
    out_dir = Path(cfg.out_dir)
    defense = build_defense(cfg.defense, stage, cfg.train.steps)
    mode = start_mode(out_dir, config_text(cfg), args.resume, args.overwrite, args.resume_if_present)
    run["out_dir"] = str(out_dir)
    if mode == "done":
        print(f"{out_dir}: this run finished already (DONE); nothing to do", file=sys.stderr)
        return
    resuming = mode == "resume"
    tokenizer = models.load_tokenizer(models.base_of(cfg.model.name))
    plan = build_plan(cfg, defense)
    missing = [s for s in ("main", *defense.side_streams) if s not in plan.streams]
    if missing:
        raise BulwarkInputError(f"stage {stage} builds no '{missing[0]}' stream for defense {cfg.defense['name']}")
    features = tokenize_streams(plan, tokenizer, cfg)

    rank, world_size, _ = init_distributed()
    fill_ds_config(read_ds_config(cfg.launch.ds_config), cfg.train, cfg.model.dtype, world_size)
    from bulwark.engine import broadcast_object

    if not broadcast_object(take_lock(out_dir) if rank == 0 else None, 0):  # a second run started meanwhile
        run["out_dir"] = None  # not ours: leave it alone
        raise BulwarkInputError(f"{out_dir} is being written by another run; wait for it to end or stop it")
    if rank == 0 and resuming:
        write_config(cfg, out_dir / "config.yaml")  # what the run now trains to (train.steps may have grown)
    if rank == 0 and not resuming:
        if mode == "overwrite":
            shutil.rmtree(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / RUN_MARKER).write_text(f"a Bulwark {stage} run folder: --overwrite may replace it\n")
        write_config(cfg, out_dir / "config.yaml")
        for name, write in plan.writers.items():
            write(out_dir / name)
    barrier()

    def build_model() -> torch.nn.Module:
        model = models.build_trainable(cfg.model, gather=gather_for_edit)
        if cfg.train.gradient_checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        return model

    engine = Engine(
        build_model,
        cfg.train,
        cfg.launch.ds_config,
        cfg.model.dtype,
        cfg.train.steps,
    )
    streams = {
        name: DistributedStream(
            rows, cfg.train.micro_batch_size, rank, world_size, cfg.data.seed + i, tokenizer.pad_token_id, name
        )
        for i, (name, rows) in enumerate(features.items())
    }
    defense.attach(engine)
    engine.add_pre_step_hook(defense.before_step)

    ckpt_root = out_dir / "checkpoints"
    start = 0
    if resuming:
        client, per_rank = engine.load_checkpoint(ckpt_root)
        start = int(client["step"])
        for name, state in client["streams"].items():
            streams[name].load_state_dict(state)
        defense.load_state_dict(per_rank["defense"])

    logger = RunLogger(out_dir / "metrics.jsonl", rank, cfg.train.steps, start, title=f"{stage}:{defense.name}",
                       log_to=cfg.log.to, config=to_dict(cfg))
    stop_at = min(cfg.train.steps, args.stop_after) if args.stop_after else cfg.train.steps
    run["training"], run["step"] = True, start
    for step in range(start, stop_at):
        t0 = time.perf_counter()
        loss_sum = train_step(engine, defense, streams, step, cfg.train.grad_accum)
        loss_mean = engine.all_reduce_sum(loss_sum).item() / (cfg.train.grad_accum * world_size)
        # both are the same on every rank (the loss is all-reduced, the overflow flag DeepSpeed's global
        # check), so all ranks stop alike, before this step is checkpointed
        what = f"the loss is {loss_mean}" if not math.isfinite(loss_mean) else (
            "the gradients are not finite (DeepSpeed skipped the step)" if engine.gradients_overflowed() else "")
        if what:
            latest = ckpt_root / "latest"
            kept = f"last good checkpoint {ckpt_root / latest.read_text().strip()}" if latest.is_file() else "no checkpoint"
            raise Diverged(f"step {step + 1}: {what}: the run diverged ({kept}; nothing exported); "
                           "lower train.lr or check the data")
        run["step"] = step + 1
        if rank == 0:
            os.utime(lock_path(out_dir))  # the lock's heartbeat: a requeue on another node sees this run alive
        logger.log(
            step + 1,
            {"loss": loss_mean, "lr": engine.lr(), "step_s": time.perf_counter() - t0, **defense.metrics()},
        )
        every = cfg.train.checkpoint_every
        if every and ((step + 1) % every == 0 or step + 1 == stop_at):
            save(engine, ckpt_root, step + 1, streams, defense)
    logger.close(peak_memory_bytes(), world_size)

    if stop_at == cfg.train.steps:
        engine.export(out_dir, tokenizer)
        if rank == 0:
            point_adapter_at_its_base(cfg, out_dir)
            (out_dir / "DONE").write_text(json.dumps({"steps": cfg.train.steps, "stage": stage}))
    barrier()


def save(engine: Any, root: Path, step: int, streams: dict[str, DistributedStream], defense: Defense) -> None:
    client = {"streams": {name: s.state_dict() for name, s in streams.items()}}
    engine.save_checkpoint(root, step, client, {"defense": defense.state_dict()})


def point_adapter_at_its_base(cfg: Config, out_dir: Path) -> None:
    """Double LoRA trains on top of the merged aligned model, so its adapter's base is that model
    (the aligned run's `model/` folder), not the original base that PEFT recorded."""
    from bulwark.models import is_adapter_dir

    lora = cfg.model.lora
    if not (lora.enabled and lora.mode == "double" and is_adapter_dir(cfg.model.name)):
        return
    merged_base = Path(cfg.model.name).expanduser().resolve().parent / "model"
    adapter_config = out_dir / "adapter" / "adapter_config.json"
    content = json.loads(adapter_config.read_text())
    content["base_model_name_or_path"] = str(merged_base) if (merged_base / "config.json").is_file() else ""
    tmp = adapter_config.with_suffix(".tmp")
    tmp.write_text(json.dumps(content, indent=2))
    tmp.replace(adapter_config)
