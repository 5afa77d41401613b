"""Start a stage: validate in this process, then run in process (under torchrun/srun) or spawn torchrun.

Validation happens before any rank starts so that bad input costs one clear line and exit code 2,
with nothing written to the output folder, instead of N ranks printing N tracebacks.
"""

from __future__ import annotations

import importlib
import os
import subprocess
import sys

from bulwark.errors import BulwarkInputError

STAGES = ("align", "finetune")

# glibc hands every freed block over 128 KiB back to the kernel, so each ZeRO-3 gather of a layer
# page-faults fresh zeroed memory again (a third of a CPU step's time went to the kernel). Keeping
# freed memory in the heap measured 8.1 -> 6.6 s a step on SmolLM2 (1 rank, 4 x 128 tokens).
# 32 MiB is glibc's ceiling for the mmap threshold, so blocks above it (ZeRO-1/2 flattens all gradients
# into one new 540 MB buffer every step) were still mmapped and page-faulted afresh; MALLOC_MMAP_MAX_=0
# serves them from the heap too (glibc still mmaps when the heap cannot grow): ZeRO-2, 1 rank, 4 x 128
# tokens, 4.5-4.6 -> 3.6 s a step and half the kernel time, for ~0.5 GiB more resident memory.
CPU_MALLOC_ENV = {
    "MALLOC_MMAP_THRESHOLD_": str(32 * 2**20),
    "MALLOC_TRIM_THRESHOLD_": str(4 * 2**30),
    "MALLOC_TOP_PAD_": str(2**30),
    "MALLOC_MMAP_MAX_": "0",
}


def validate(stage: str, config: str | None, overrides: list[str], resume: bool, overwrite: bool) -> int:
    """Everything that can be checked without starting DeepSpeed; returns launch.nproc."""
    from pathlib import Path

    from bulwark import models
    from bulwark.config import load_config
    from bulwark.defenses import build_defense
    from bulwark.engine import fill_ds_config, read_ds_config
    from bulwark.recipes.loop import check_run_dir

    cfg = load_config(config, overrides, stage)
    defense = build_defense(cfg.defense, stage, cfg.train.steps)
    check_run_dir(Path(cfg.out_dir), resume, overwrite)
    fill_ds_config(read_ds_config(cfg.launch.ds_config), cfg.train, cfg.model.dtype, cfg.launch.nproc)
    models.resolve_model_path(models.base_of(cfg.model.name))  # converts the embedded model once, here
    recipe = importlib.import_module(f"bulwark.recipes.{stage}")
    recipe.build_plan(cfg, defense)  # reads and checks every data file the ranks will read
    return cfg.launch.nproc


def recipe_argv(
    config: str | None, overrides: list[str], resume: bool, overwrite: bool, stop_after: int
) -> list[str]:
    argv = ([config] if config else []) + list(overrides)
    if resume:
        argv.append("--resume")
    if overwrite:
        argv.append("--overwrite")
    if stop_after:
        argv += ["--stop-after", str(stop_after)]
    return argv


def launch(
    stage: str,
    config: str | None,
    overrides: list[str],
    resume: bool = False,
    overwrite: bool = False,
    stop_after: int = 0,
) -> int:
    """Returns the exit code: 0 done, 2 bad input, other = a rank failed."""
    if stage not in STAGES:
        raise BulwarkInputError(f"unknown stage '{stage}' (one of {', '.join(STAGES)})")
    nproc = validate(stage, config, overrides, resume, overwrite)
    argv = recipe_argv(config, overrides, resume, overwrite, stop_after)
    if "LOCAL_RANK" in os.environ or "SLURM_PROCID" in os.environ:
        importlib.import_module(f"bulwark.recipes.{stage}").main(argv)
        return 0
    from bulwark.engine.dist import free_port

    cfg_port = next((o.split("=", 1)[1] for o in overrides if o.startswith("launch.master_port=")), "0")
    port = int(cfg_port) or free_port()
    cmd = [
        sys.executable, "-m", "torch.distributed.run",
        "--nproc_per_node", str(nproc), "--master_addr", "127.0.0.1", "--master_port", str(port),
        "-m", f"bulwark.recipes.{stage}", *argv,
    ]
    env = {**os.environ, "DS_ACCELERATOR": os.environ.get("DS_ACCELERATOR", "cpu")}
    import torch

    if torch.cuda.is_available():
        env.pop("DS_ACCELERATOR")
    else:
        env = with_cpu_rank_env(env, nproc)
    return subprocess.call(cmd, env=env)


def with_cpu_rank_env(env: dict[str, str], nproc: int) -> dict[str, str]:
    """`env` plus what CPU ranks under torchrun need, where the user has not set it: the cores shared
    among the ranks (torchrun pins every rank to one thread) and freed memory kept in the heap."""
    cpu = {"OMP_NUM_THREADS": str(max(1, (os.cpu_count() or 1) // nproc)), **CPU_MALLOC_ENV}
    return {**cpu, **env}
