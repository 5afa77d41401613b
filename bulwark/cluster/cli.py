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
from bulwark.cluster.eval_plan import EVAL_BATCH_SIZE, EVAL_PROMPT_TOKENS, EvalMemoryPlan, plan_eval_memory
from bulwark.cluster.plan import GIB, MemoryPlan, checkpoint_bytes, plan_memory, resolve_model_config
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
             gpu_mem_gib: float = 80.0, cpu_mem_gib: float | None = None, overrides: list[str] | None = None,
             ) -> tuple[MemoryPlan, RunSettings, int, int]:
    """Memory plan of a run config file with its ``key=value`` overrides applied (as the training
    commands apply them); nodes / GPUs default to launch.nnodes / launch.nproc.

    Also checks the ds_config's explicit batch sizes against the run config. Returns the plan, the
    settings read, and the nodes and GPUs per node used.
    """
    settings = run_settings(load_run_config(config, overrides))
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


def _eval_yaml(config: Path) -> dict | None:
    """The options of an eval YAML (`model:` names a folder), or None for a run config (`model:` a section)."""
    import yaml

    try:
        data = yaml.safe_load(config.read_text()) or {}
    except (OSError, yaml.YAMLError) as exc:
        raise BulwarkInputError(f"{config}: cannot read it as YAML ({exc})") from None
    if isinstance(data, dict) and isinstance(data.get("model"), str):
        return {str(k).replace("-", "_"): v for k, v in data.items()}
    return None


def _eval_model_config(model: str) -> dict:
    import json

    folder = Path(model).expanduser()
    adapter = folder / "adapter_config.json"
    if not (folder / "config.json").is_file() and adapter.is_file():  # LoRA: plan the base model
        model = str(json.loads(adapter.read_text()).get("base_model_name_or_path") or model)
    return resolve_model_config(model)


def plan_eval_run(config: Path, *, nodes: int | None = None, gpus_per_node: int | None = None,
                  dtype: str | None = None, zero3: bool | None = None, batch_size: int | None = None,
                  prompt_tokens: int | None = None, new_tokens: int | None = None, gpu_mem_gib: float = 80.0,
                  overrides: list[str] | None = None) -> tuple[EvalMemoryPlan, str]:
    """Eval memory plan of an eval YAML (model:, dtype:, partition:, batch_size:, max_new_tokens:, nproc:)
    or of a run config (model.name; launch.nnodes x launch.nproc ranks; ``key=value`` overrides apply to
    it). Options given here win; dtype auto plans bf16 (the GPU's auto). Returns the plan and the model's name."""
    options = _eval_yaml(config)
    if options is not None and overrides:
        # an eval YAML is not a run config: `bulwark eval` takes options, not key=value
        raise BulwarkInputError(f"{overrides[0]}: key=value overrides apply to a run config; for an eval YAML "
                                "use the --dtype/--zero3/--batch-size/... options")
    if options is None:
        settings = run_settings(load_run_config(config, overrides))
        model, nn, ng, yaml_opts = settings.model_name, settings.nnodes, settings.nproc, {}
    else:
        model, nn, ng, yaml_opts = str(options["model"]), 1, options.get("nproc"), options
    n = nodes if nodes is not None else (nn or 1)
    g = gpus_per_node if gpus_per_node is not None else (ng or 1)
    if n < 1 or g < 1:
        raise BulwarkInputError(f"nodes and gpus per node must be >= 1 (got nodes={n}, gpus_per_node={g})")
    chosen = str(dtype or yaml_opts.get("dtype") or "auto").lower()
    if chosen not in ("auto", "fp32", "bf16"):
        raise BulwarkInputError(f"eval dtype (--dtype / dtype:) {chosen!r}: choose one of auto, fp32, bf16")
    partition = str(yaml_opts.get("partition") or "none").lower()
    if partition not in ("none", "zero3"):
        raise BulwarkInputError(f"eval partition (partition:) {partition!r}: choose one of none, zero3")
    plan = plan_eval_memory(
        _eval_model_config(model), world_size=n * g, dtype="bf16" if chosen == "auto" else chosen,
        zero3=zero3 if zero3 is not None else partition == "zero3",
        batch_size=batch_size or int(yaml_opts.get("batch_size") or EVAL_BATCH_SIZE),
        prompt_tokens=prompt_tokens or EVAL_PROMPT_TOKENS,
        new_tokens=new_tokens or int(yaml_opts.get("max_new_tokens") or 128), gpu_mem_gib=gpu_mem_gib,
    )
    return plan, model


def _memory_table(title: str, rows: list[tuple[str, int]], total_bytes: int, gpu_mem_gib: float) -> Table:
    table = Table(title=title)
    table.add_column("component")
    table.add_column("GiB", justify="right")
    for label, nbytes in rows:
        table.add_row(label, _gib(nbytes))
    table.add_row("[bold]total[/]", f"[bold]{_gib(total_bytes)}[/]")
    table.add_row("GPU memory", f"{gpu_mem_gib:.2f}")
    return table


def _print_eval_plan(config: Path, p: EvalMemoryPlan, model: str, gpu_mem_gib: float) -> None:
    console = Console()
    console.print(f"[bold]{model}[/]: {p.total_params / 1e9:.3f}B parameters; eval on {p.world_size} rank(s), "
                  f"{p.dtype}, {'ZeRO-3 partitioned' if p.zero3 else 'a replica per rank'}")
    console.print(_memory_table("eval memory per GPU", p.rows(), p.total_bytes, gpu_mem_gib))
    if p.fits:
        console.print(f"[green]fits[/]: {p.total_gib:.1f} GiB of {gpu_mem_gib:g} GiB per GPU")
        return
    console.print("what would change it:")
    for line in p.advice:
        console.print(f"  - {line}", highlight=False)
    Console(stderr=True).print(f"error: eval of {config} does not fit: {p.total_gib:.1f} GiB per GPU needed, "
                               f"{gpu_mem_gib:g} GiB available", markup=False, highlight=False, soft_wrap=True)
    raise typer.Exit(2)


def _gib(n: int) -> str:
    return f"{n / GIB:.2f}"


def plan(
    config: Annotated[Path, typer.Argument(help="Run config YAML.")],
    overrides: Annotated[list[str] | None, typer.Argument(help="key=value run-config overrides, e.g. "
                                                               "defense.name=booster train.micro_batch_size=1.")] = None,
    nodes: Annotated[int | None, typer.Option(help="Nodes (default: launch.nnodes, else 1).")] = None,
    gpus_per_node: Annotated[int | None, typer.Option(help="GPUs per node (default: launch.nproc, else 8).")] = None,
    gpu_mem_gib: Annotated[float, typer.Option(help="Memory of one GPU in GiB.")] = 80.0,
    cpu_mem_gib: Annotated[float | None, typer.Option(help="Host memory per node in GiB, to check offload "
                                                          "(default: not checked).")] = None,
    stage: Annotated[str, typer.Option(help="train (an align / finetune run config) or eval; eval also reads an "
                                            "eval YAML (model: FOLDER, dtype:, partition:, ...).")] = "train",
    dtype: Annotated[str | None, typer.Option(help="eval: auto (= bf16 on GPU) | bf16 | fp32.")] = None,
    zero3: Annotated[bool | None, typer.Option("--zero3/--no-zero3", help="eval: weights partitioned "
                                                                          "over the ranks.")] = None,
    batch_size: Annotated[int | None, typer.Option(help=f"eval: prompts per generate() call "
                                                        f"(default {EVAL_BATCH_SIZE}).")] = None,
    prompt_tokens: Annotated[int | None, typer.Option(help=f"eval: prompt length bound "
                                                           f"(default {EVAL_PROMPT_TOKENS}).")] = None,
    max_new_tokens: Annotated[int | None, typer.Option(help="eval: new tokens (default 128).")] = None,
) -> None:
    """Memory per GPU for a run config (or, with --stage eval, for `bulwark eval`), from the model's config
    alone; exit code 2 if it does not fit."""
    if stage not in ("train", "eval"):
        with _input_errors():
            raise BulwarkInputError(f"--stage {stage!r}: choose train or eval")
    if stage == "eval":
        with _input_errors():
            ep, model = plan_eval_run(config, nodes=nodes, gpus_per_node=gpus_per_node, dtype=dtype, zero3=zero3,
                                      batch_size=batch_size, prompt_tokens=prompt_tokens,
                                      new_tokens=max_new_tokens, gpu_mem_gib=gpu_mem_gib, overrides=overrides)
        _print_eval_plan(config, ep, model, gpu_mem_gib)
        return
    with _input_errors():
        p, s, n, g = plan_run(config, nodes=nodes, gpus_per_node=gpus_per_node, gpu_mem_gib=gpu_mem_gib,
                              cpu_mem_gib=cpu_mem_gib, overrides=overrides)
    console = Console()
    stage, off_opt, off_param = zero_settings(load_ds_config(s.ds_config, config.parent))
    offload = ", ".join(k for k, on in (("optimizer", off_opt), ("parameters", off_param)) if on) or "none"
    lora = f"LoRA r={s.lora.get('r', 8)}" if s.lora else "full fine-tuning"
    console.print(
        f"[bold]{s.model_name}[/]: {p.total_params / 1e9:.3f}B parameters, {p.trainable_params / 1e9:.3f}B trainable "
        f"({lora}); {n} node(s) x {g} GPU(s) = {p.world_size} rank(s); ZeRO-{stage}, offload {offload}; "
        f"{s.dtype}; defense {s.defense}; micro batch {s.micro_batch_size} x {s.max_length} tokens"
    )
    console.print(_memory_table("memory per GPU", p.rows(), p.total_bytes, gpu_mem_gib))
    for note in p.notes:
        console.print(f"note: {note}", highlight=False)
    console.print(checkpoint_line(s), highlight=False)
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


def checkpoint_line(s: RunSettings) -> str:
    """What preemption costs and saves: checkpoint size, how often, and the disk the kept ones take."""
    if not s.checkpoint_every:
        return ("checkpoint: none before the last step (train.checkpoint_every=0): a preempted job starts "
                "again from step 0")
    size = checkpoint_bytes(resolve_model_config(s.model_name), lora=s.lora, defense=s.defense) / GIB
    return (f"checkpoint: every {s.checkpoint_every} of {s.steps} steps, {size:.0f} GiB each, "
            f"{s.keep_checkpoints} kept ({size * s.keep_checkpoints:.0f} GiB of disk)")


def slurm(
    config: Annotated[Path, typer.Argument(help="The stage's config YAML (run config; recover, eval or bench YAML).")],
    overrides: Annotated[list[str] | None, typer.Argument(help="key=value overrides.")] = None,
    nodes: Annotated[int | None, typer.Option(help="Nodes (default: launch.nnodes, else 1).")] = None,
    gpus_per_node: Annotated[int | None, typer.Option(help="GPUs per node (default: launch.nproc, else 8).")] = None,
    stage: Annotated[str, typer.Option(help="align, finetune, recover, eval or bench.")] = "finetune",
    submit_job: Annotated[bool, typer.Option("--submit", help="Submit with sbatch after rendering.")] = False,
    out: Annotated[Path | None, typer.Option(help="Write the script here (default: stdout; "
                                                  "logs/<job>.sbatch with --submit).")] = None,
    job_name: Annotated[str | None, typer.Option(help="SLURM job name.")] = None,
    time: Annotated[str, typer.Option(help="SLURM time limit.")] = "24:00:00",
    partition: Annotated[str | None, typer.Option(help="SLURM partition.")] = None,
    account: Annotated[str | None, typer.Option(help="SLURM account.")] = None,
) -> None:
    """Render an sbatch script (srun + torchrun, requeue on preemption, --resume-if-present on every start)
    for one stage, and submit it with --submit."""
    with _input_errors():
        # the overrides reach the job's argv; read them here too, so that nodes, GPUs and the checks follow
        # what the job will run (and a bad key fails now, not in the queue)
        n, g = _job_world(stage, config, overrides or [], nodes, gpus_per_node)
        script = render_sbatch(
            config, stage=stage, nodes=n, gpus_per_node=g, job_name=job_name, time=time,  # type: ignore[arg-type]
            partition=partition, account=account, extra_overrides=overrides or [],
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


def _job_world(stage: str, config: Path, overrides: list[str], nodes: int | None, gpus: int | None) -> tuple[int, int]:
    """(nodes, GPUs per node) of the job, after reading the stage's config with its overrides: the same
    checks the stage makes on its config (no model or data is read on the login node)."""
    if stage in ("align", "finetune"):
        settings = run_settings(load_run_config(config, overrides))
        n, g = _world(settings, nodes, gpus)
        ds = load_ds_config(settings.ds_config, config.parent)
        check_ds_batch_sizes(ds, settings.micro_batch_size, settings.grad_accum, n * g)
        return n, g
    if stage == "recover":
        from bulwark.recover.config import load_recover_config

        ranks = load_recover_config(config, overrides).launch.nproc
    elif stage == "eval":
        from bulwark.recipes.eval import resolve

        ranks = resolve(str(config), overrides)[2]
    elif stage == "bench":
        from bulwark.bench import _flatten, load_bench_config

        cfg = load_bench_config(config, overrides)
        ranks = max([1] + [int(item.split("=", 1)[1]) for section in (cfg.align, cfg.finetune)
                           for item in _flatten("", section) if item.startswith("launch.nproc=")])
    else:
        raise BulwarkInputError(f"stage {stage!r}: use one of align, finetune, recover, eval, bench")
    n, g = nodes or 1, gpus or ranks
    if n < 1 or g < 1:
        raise BulwarkInputError(f"nodes and gpus per node must be >= 1 (got nodes={n}, gpus_per_node={g})")
    return n, g


def register(app: typer.Typer) -> None:
    """Add the `plan` and `slurm` commands to the main Bulwark app."""
    app.command("plan")(plan)
    app.command("slurm")(slurm)
