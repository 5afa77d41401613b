"""`bulwark plan` and `bulwark slurm`: plain Typer command functions; ``register(app)`` mounts them."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from bulwark.cluster.checks import check_ds_batch_sizes
from bulwark.cluster.plan import GIB, MemoryPlan, plan_memory, resolve_model_config
from bulwark.cluster.runconfig import (
    RunSettings,
    load_ds_config,
    load_run_config,
    run_settings,
    zero_settings,
)
from bulwark.cluster.slurm import render_sbatch, submit
from bulwark.errors import BulwarkInputError

DEFAULT_GPUS_PER_NODE = 8


@contextlib.contextmanager
def _input_errors() -> Iterator[None]:
    """Bad input: one line on stderr, exit code 2."""
    try:
        yield
    except BulwarkInputError as e:
        Console(stderr=True).print(f"error: {e}", markup=False, highlight=False, soft_wrap=True)
        raise typer.Exit(2) from None


def _world(settings: RunSettings, nodes: int | None, gpus_per_node: int | None) -> tuple[int, int]:
    n = nodes if nodes is not None else (settings.nnodes or 1)
    g = gpus_per_node if gpus_per_node is not None else (settings.nproc or DEFAULT_GPUS_PER_NODE)
    if n < 1 or g < 1:
        raise BulwarkInputError(f"nodes and gpus per node must be >= 1 (got nodes={n}, gpus_per_node={g})")
    return n, g


def plan_run(config: Path, *, nodes: int | None = None, gpus_per_node: int | None = None,
             gpu_mem_gib: float = 80.0, cpu_mem_gib: float | None = None,
             ) -> tuple[MemoryPlan, RunSettings, int, int]:
    """Memory plan of a run config file; nodes / GPUs default to launch.nnodes / launch.nproc.

    Also checks the ds_config's explicit batch sizes against the run config. Returns the plan, the
    settings read, and the nodes and GPUs per node used.
    """
    settings = run_settings(load_run_config(config))
    n, g = _world(settings, nodes, gpus_per_node)
    ds = load_ds_config(settings.ds_config, config.parent)
    check_ds_batch_sizes(ds, settings.micro_batch_size, settings.grad_accum, n * g)
    stage, off_opt, off_param = zero_settings(ds)
    plan = plan_memory(
        resolve_model_config(settings.model_name), nodes=n, gpus_per_node=g, zero_stage=stage,
        offload_optimizer=off_opt, offload_param=off_param, dtype=settings.dtype, lora=settings.lora,
        defense=settings.defense, micro_batch_size=settings.micro_batch_size, seq_len=settings.max_length,
        gpu_mem_gib=gpu_mem_gib, gradient_checkpointing=settings.gradient_checkpointing, cpu_mem_gib=cpu_mem_gib,
    )
    return plan, settings, n, g


def _gib(n: int) -> str:
    return f"{n / GIB:.2f}"


def plan(
    config: Annotated[Path, typer.Argument(help="Run config YAML.")],
    nodes: Annotated[int | None, typer.Option(help="Nodes (default: launch.nnodes, else 1).")] = None,
    gpus_per_node: Annotated[int | None, typer.Option(help="GPUs per node (default: launch.nproc, else 8).")] = None,
    gpu_mem_gib: Annotated[float, typer.Option(help="Memory of one GPU in GiB.")] = 80.0,
    cpu_mem_gib: Annotated[float | None, typer.Option(help="Host memory per node in GiB, to check offload "
                                                          "(default: not checked).")] = None,
) -> None:
    """Memory per GPU for a run config, from the model's config alone; exit code 2 if it does not fit."""
    with _input_errors():
        p, s, n, g = plan_run(config, nodes=nodes, gpus_per_node=gpus_per_node, gpu_mem_gib=gpu_mem_gib,
                              cpu_mem_gib=cpu_mem_gib)
    console = Console()
    stage, off_opt, off_param = zero_settings(load_ds_config(s.ds_config, config.parent))
    offload = ", ".join(k for k, on in (("optimizer", off_opt), ("parameters", off_param)) if on) or "none"
    lora = f"LoRA r={s.lora.get('r', 8)}" if s.lora else "full fine-tuning"
    console.print(
        f"[bold]{s.model_name}[/]: {p.total_params / 1e9:.3f}B parameters, {p.trainable_params / 1e9:.3f}B trainable "
        f"({lora}); {n} node(s) x {g} GPU(s) = {p.world_size} rank(s); ZeRO-{stage}, offload {offload}; "
        f"{s.dtype}; defense {s.defense}; micro batch {s.micro_batch_size} x {s.max_length} tokens"
    )
    table = Table(title="memory per GPU")
    table.add_column("component")
    table.add_column("GiB", justify="right")
    for label, nbytes in p.rows():
        table.add_row(label, _gib(nbytes))
    table.add_row("[bold]total[/]", f"[bold]{_gib(p.total_bytes)}[/]")
    table.add_row("GPU memory", f"{gpu_mem_gib:.2f}")
    console.print(table)
    for note in p.notes:
        console.print(f"note: {note}", highlight=False)
    if p.fits:
        console.print(f"[green]fits[/]: {p.total_gib:.1f} GiB of {gpu_mem_gib:g} GiB per GPU "
                      f"({(p.gpu_mem_bytes - p.total_bytes) / GIB:.1f} GiB free)")
        return
    console.print("what would change it:")
    for line in p.advice:
        console.print(f"  - {line}", highlight=False)
    if p.over_bytes:
        why = (f"{p.total_gib:.1f} GiB per GPU needed, {gpu_mem_gib:g} GiB available "
               f"(over by {p.over_bytes / GIB:.1f} GiB)")
    else:
        why = (f"{p.cpu_bytes_per_node / GIB:.0f} GiB of host memory per node needed for offload, "
               f"{cpu_mem_gib:g} GiB available (over by {p.cpu_over_bytes / GIB:.0f} GiB)")
    Console(stderr=True).print(f"error: {config} does not fit: {why}", markup=False, highlight=False,
                               soft_wrap=True)
    raise typer.Exit(2)


def slurm(
    config: Annotated[Path, typer.Argument(help="Run config YAML.")],
    overrides: Annotated[list[str] | None, typer.Argument(help="key=value run-config overrides.")] = None,
    nodes: Annotated[int | None, typer.Option(help="Nodes (default: launch.nnodes, else 1).")] = None,
    gpus_per_node: Annotated[int | None, typer.Option(help="GPUs per node (default: launch.nproc, else 8).")] = None,
    stage: Annotated[str, typer.Option(help="align, finetune, recover or eval.")] = "finetune",
    submit_job: Annotated[bool, typer.Option("--submit", help="Submit with sbatch after rendering.")] = False,
    out: Annotated[Path | None, typer.Option(help="Write the script here (default: stdout; "
                                                  "logs/<job>.sbatch with --submit).")] = None,
    job_name: Annotated[str | None, typer.Option(help="SLURM job name.")] = None,
    time: Annotated[str, typer.Option(help="SLURM time limit.")] = "24:00:00",
    partition: Annotated[str | None, typer.Option(help="SLURM partition.")] = None,
    account: Annotated[str | None, typer.Option(help="SLURM account.")] = None,
    resume: Annotated[bool, typer.Option(help="Pass --resume on the first start too.")] = False,
) -> None:
    """Render an sbatch script (srun + torchrun) for a run config, and submit it with --submit."""
    with _input_errors():
        settings = run_settings(load_run_config(config))
        n, g = _world(settings, nodes, gpus_per_node)
        ds = load_ds_config(settings.ds_config, config.parent)
        check_ds_batch_sizes(ds, settings.micro_batch_size, settings.grad_accum, n * g)
        script = render_sbatch(
            config, stage=stage, nodes=n, gpus_per_node=g, job_name=job_name, time=time,  # type: ignore[arg-type]
            partition=partition, account=account, extra_overrides=overrides or [], resume=resume,
        )
        if out is None and not submit_job:
            typer.echo(script, nl=False)
            return
        path = out if out is not None else Path("logs") / f"{job_name or f'bulwark-{stage}-{config.stem}'}.sbatch"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(script)
        path.chmod(0o755)
        typer.echo(f"wrote {path}")
        if submit_job:
            typer.echo(f"submitted job {submit(path)}")


def register(app: typer.Typer) -> None:
    """Add the `plan` and `slurm` commands to the main Bulwark app."""
    app.command("plan")(plan)
    app.command("slurm")(slurm)
