"""The `bulwark` command. Commands parse, validate and launch; heavy imports happen inside them so
that `bulwark --help` stays fast."""

from __future__ import annotations

import typer

from bulwark.errors import BulwarkInputError
from bulwark.launch import spin_briefly_in_this_process

spin_briefly_in_this_process()  # before any command imports torch

app = typer.Typer(
    help="Bulwark: keep a model safe while strangers fine-tune it (align -> finetune -> recover -> eval).",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)

CONFIG_HELP = "YAML run config (optional); then key=value overrides, e.g. train.steps=10 defense.name=lisa"


def fail(message: str) -> None:
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(2)


def _run_stage(stage: str, config: str | None, overrides: list[str] | None, resume: bool, overwrite: bool,
               stop_after: int) -> None:
    from bulwark.launch import launch

    overrides = list(overrides or [])
    if config is not None and "=" in config:
        overrides.insert(0, config)
        config = None
    try:
        code = launch(stage, config, overrides, resume=resume, overwrite=overwrite, stop_after=stop_after)
    except BulwarkInputError as exc:
        fail(str(exc))
    if code:
        raise typer.Exit(code)


@app.command()
def align(
    config: str = typer.Argument(None, help=CONFIG_HELP),
    overrides: list[str] = typer.Argument(None, help="key=value overrides"),
    resume: bool = typer.Option(False, "--resume", help="continue from the run folder's last checkpoint"),
    overwrite: bool = typer.Option(False, "--overwrite", help="replace an existing run folder"),
    stop_after: int = typer.Option(0, "--stop-after", help="stop after N optimizer steps (a preemption drill)"),
) -> None:
    """Align the base model on refusal data (defense.name=sft|vaccine|booster|repnoise|...)."""
    _run_stage("align", config, overrides, resume, overwrite, stop_after)


@app.command()
def finetune(
    config: str = typer.Argument(None, help=CONFIG_HELP),
    overrides: list[str] = typer.Argument(None, help="key=value overrides"),
    resume: bool = typer.Option(False, "--resume", help="continue from the run folder's last checkpoint"),
    overwrite: bool = typer.Option(False, "--overwrite", help="replace an existing run folder"),
    stop_after: int = typer.Option(0, "--stop-after", help="stop after N optimizer steps (a preemption drill)"),
) -> None:
    """Fine-tune on a user upload with p*n harmful rows (defense.name=sft is the attack; lisa defends)."""
    _run_stage("finetune", config, overrides, resume, overwrite, stop_after)


@app.command()
def recover(
    config: str = typer.Argument(None, help="YAML recover config (see configs/recover.yaml); then key=value overrides"),
    overrides: list[str] = typer.Argument(None, help="key=value overrides, e.g. aligned=runs/align/model"),
    overwrite: bool = typer.Option(False, "--overwrite", help="replace an existing run folder"),
) -> None:
    """Repair a fine-tuned model toward its aligned one (method=restore by default; `bulwark defenses` lists all)."""
    _run_stage("recover", config, overrides, False, overwrite, 0)


@app.command()
def defenses() -> None:
    """List the registered defenses (align / finetune: defense.name=...; recover: method=...) with defaults."""
    from rich.console import Console
    from rich.table import Table

    from bulwark.defenses import describe
    from bulwark.recover.base import describe_methods

    table = Table("name", "stages", "parameters (defaults)", "what it does")
    for row in [*describe(), *describe_methods()]:
        params = ", ".join(f"{k}={v}" for k, v in row["params"].items()) or "-"
        table.add_row(row["name"], "/".join(row["stages"]), params, row["summary"])
    Console().print(table)


@app.command()
def bench(
    config: str = typer.Argument(None, help="YAML bench config (see bulwark/bench.py: BenchConfig)"),
    overrides: list[str] = typer.Argument(None, help="key=value overrides, e.g. ps=0.05,0.1"),
) -> None:
    """The pipeline matrix: align -> finetune -> eval per (defense, p); with `attacks`, the defense table
    (bulwark/table.py: every defense at its stage under each attack, worst case, 95% intervals). Resumable."""
    from bulwark.bench import load_bench_config, results_markdown, run_bench

    overrides = list(overrides or [])
    if config is not None and "=" in config:
        overrides.insert(0, config)
        config = None
    try:
        cfg = load_bench_config(config, overrides)
        if cfg.attacks:
            from pathlib import Path

            from bulwark.table import run_table

            run_table(cfg)
            typer.echo((Path(cfg.out_dir) / "results.md").read_text())
            return
        rows = run_bench(cfg)
    except BulwarkInputError as exc:
        fail(str(exc))
    typer.echo(results_markdown(rows))


@app.command()
def demo(
    out: str = typer.Option("runs/demo", "--out", help="where the demo's runs and results go"),
    overrides: list[str] = typer.Argument(None, help="key=value overrides of the demo matrix"),
) -> None:
    """The offline demo on the embedded SmolLM2: align, attack with SFT and with Lisa at p=0.1, evaluate."""
    import time

    from bulwark.bench import demo_config, results_markdown, run_bench

    started = time.perf_counter()
    try:
        rows = run_bench(demo_config(out, list(overrides or [])))
    except BulwarkInputError as exc:
        fail(str(exc))
    typer.echo("\n" + results_markdown(rows))
    typer.echo(f"demo finished in {(time.perf_counter() - started) / 60:.1f} min; results in {out}/results.md")


data_app = typer.Typer(help="The standard data sets: list the catalogue, fetch them into the data folder.",
                       no_args_is_help=True)
app.add_typer(data_app, name="data")


@data_app.command("list")
def data_list() -> None:
    """The catalogue: each set's file name, Hugging Face source and licence."""
    from rich.console import Console
    from rich.table import Column, Table

    from bulwark.data.catalog import describe

    table = Table(Column("name", no_wrap=True), "source", "licence", "what it is")
    for row in describe():
        table.add_row(row["name"], row["source"], row["licence"], row["what"])
    Console().print(table)


@data_app.command("fetch")
def data_fetch(
    names: list[str] = typer.Argument(None, help="sets to fetch (`bulwark data list`); none = all"),
    dir: str = typer.Option(None, "--dir", help="data folder [default: $BULWARK_DATA_DIR, else ~/.cache/bulwark/data]"),
    from_disk: str = typer.Option(None, "--from-disk", help="read sets saved with datasets' save_to_disk under "
                                                            "DIR/<name> or DIR/<hub id> instead of the hub"),
) -> None:
    """Download sets from the Hugging Face hub as <name>.jsonl (all or nothing) and note their licences in SOURCES.md."""
    from bulwark.data.catalog import disk_loader, fetch, fetch_dir

    try:
        dest = fetch_dir(dir)
        written = fetch(names, dest, disk_loader(from_disk) if from_disk else None,
                        log=typer.echo)
    except BulwarkInputError as exc:
        fail(str(exc))
    typer.echo(f"wrote {len(written)} set(s) into {dest}; licences in {dest / 'SOURCES.md'}")


def _register_optional() -> None:
    """Command groups owned by other packages register themselves here."""
    import importlib

    for module in ("bulwark.cluster.cli", "bulwark.eval.cli"):
        try:
            mod = importlib.import_module(module)
        except ImportError:
            continue
        register = getattr(mod, "register", None)
        if register is not None:
            register(app)


_register_optional()


def main() -> None:
    app()


if __name__ == "__main__":
    main()
