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
import shutil
import sys
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from bulwark.config import Config, load_config, write_config
from bulwark.data import DistributedStream, Example, tokenize_example
from bulwark.defenses import Defense, build_defense
from bulwark.errors import BulwarkInputError


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
    """An existing run is never overwritten by accident; --resume needs a finished checkpoint."""
    if resume:
        if not (out_dir / "checkpoints" / "latest").is_file():
            raise BulwarkInputError(f"--resume: {out_dir} has no finished checkpoint (checkpoints/latest)")
        return
    if out_dir.exists() and any(out_dir.iterdir()) and not overwrite:
        raise BulwarkInputError(f"{out_dir} already holds a run; pass --overwrite to replace it or --resume")


def start_mode(out_dir: Path, resolved_config: str, resume: bool, overwrite: bool, resume_if_present: bool) -> str:
    """"fresh", "overwrite", "resume" or "done" for a run of `resolved_config` (its config.yaml text) in
    `out_dir`; bad combinations are BulwarkInputErrors. Reads the folder only: every rank decides alike."""
    if not resume_if_present:
        check_run_dir(out_dir, resume, overwrite)
        return "resume" if resume else ("overwrite" if out_dir.exists() and overwrite else "fresh")
    if resume or overwrite:
        raise BulwarkInputError("--resume-if-present decides itself: drop --resume / --overwrite")
    if not out_dir.exists() or not any(out_dir.iterdir()):
        return "fresh"
    saved = out_dir / "config.yaml"
    if not saved.is_file() or saved.read_text() != resolved_config:
        raise BulwarkInputError(f"--resume-if-present: {out_dir} holds another run (its config.yaml differs); "
                                "give another out_dir or remove it")
    if (out_dir / "DONE").is_file():
        return "done"
    return "resume" if (out_dir / "checkpoints" / "latest").is_file() else "overwrite"


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
    models.resolve_model_path(models.base_of(cfg.model.name))  # converts the embedded model once, here
    build_plan(cfg, defense)  # reads and checks every data file the ranks will read
    argv = stage_argv(config, overrides, resume=resume, overwrite=overwrite, resume_if_present=resume_if_present,
                      stop_after=stop_after)
    return cfg.launch.nproc, argv


def tokenize_streams(plan: StagePlan, tokenizer: Any, cfg: Config) -> dict[str, list[dict]]:
    return {
        name: [tokenize_example(ex, tokenizer, cfg.data.template, cfg.data.max_length) for ex in rows]
        for name, rows in plan.streams.items()
    }


def run_stage(stage: str, argv: list[str] | None, build_plan: Any) -> None:
    """Entry point of `python -m bulwark.recipes.<stage>` in every rank (under torchrun or srun)."""
    args = parse_args(argv, stage)
    # DeepSpeed calls torch collectives that torch has renamed; the warning repeats every step
    warnings.filterwarnings("ignore", category=FutureWarning, module="torch.distributed")
    try:
        train(stage, args, build_plan)
    except BulwarkInputError as exc:
        print(f"error: {exc}", file=sys.stderr)
        raise SystemExit(2) from None
    from bulwark.engine import exit_after_success

    exit_after_success()


def train(stage: str, args: argparse.Namespace, build_plan: Any) -> None:
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
    if rank == 0 and not resuming:
        if mode == "overwrite":
            shutil.rmtree(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
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

    logger = RunLogger(out_dir / "metrics.jsonl", rank, cfg.train.steps, start, title=f"{stage}:{defense.name}")
    stop_at = min(cfg.train.steps, args.stop_after) if args.stop_after else cfg.train.steps
    for step in range(start, stop_at):
        t0 = time.perf_counter()
        loss_sum = torch.zeros(1, device=engine.device)  # summed on the device: one sync a step, not one a micro-batch
        for _ in range(cfg.train.grad_accum):
            batch = engine.to_device(defense.next_batch(streams, step))
            loss = defense.loss(engine, batch)
            engine.backward(loss)
            engine.step()
            loss_sum += loss.detach().float()
        defense.after_step(engine, step + 1)
        loss_mean = engine.all_reduce_sum(loss_sum).item() / (cfg.train.grad_accum * world_size)
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
