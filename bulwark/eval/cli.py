"""Typer commands of the eval package: `bulwark eval`, `bulwark judge train`, `bulwark scan`.

`register(app)` adds them to the main app. torch / transformers are imported inside the commands, so
`bulwark --help` stays fast. Bad input prints one line "error: ..." and exits with code 2.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import typer

from bulwark.errors import BulwarkInputError


def _fail(message: str) -> None:
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(2)


def eval_command(
    model: str = typer.Argument(..., help="model folder (config.json), adapter folder (adapter_config.json), "
                                          "or an eval YAML (model: ..., out_dir: ..., any option below)"),
    out_dir: str = typer.Option(None, "--out-dir", "-o", help="where rows and summary go [default: MODEL/eval]"),
    prompt_set: str = typer.Option(None, help="harmful_eval_prompts | beavertails_evaluation | harmbench | advbench | a .jsonl"),
    n_prompts: int = typer.Option(None, help="first N harmful prompts [default: 1000]"),
    judge: str = typer.Option(None, help="refusal | keyword | moderation | hf:<path> [default: refusal]"),
    refusal_judge: str = typer.Option(None, help="judge for over-refusal [default: the judge if refusal-style, else keyword]"),
    task: str = typer.Option(None, help="fine-tune accuracy task: sst2 | agnews | gsm8k | alpaca_eval"),
    n_task: int = typer.Option(None, help="first N task test rows [default: 1000]"),
    n_benign: int = typer.Option(None, help="benign AlpacaEval prompts for over-refusal [default: 100]"),
    template: str = typer.Option(None, help="chat | alpaca [default: chat]"),
    max_new_tokens: int = typer.Option(None, help="[default: 128]"),
    batch_size: int = typer.Option(None, help="prompts per generate() call [default: 32]"),
    dtype: str = typer.Option(None, help="auto (bf16 on GPU, fp32 on CPU) | fp32 | bf16 [default: auto]"),
    partition: str = typer.Option(None, help="none (a model replica per rank) | zero3 [default: none]"),
    zero3: bool = typer.Option(False, "--zero3", help="partition the model over the ranks with ZeRO-3 "
                                                      "(for a model that does not fit one GPU; = --partition zero3)"),
    data_dir: str = typer.Option(None, help="data folder [default: $BULWARK_DATA_DIR]"),
    fa_judge: str = typer.Option(None, help="hf:<path> causal LM judging AlpacaEval win rate"),
    meta: list[str] = typer.Option(None, help="KEY=VALUE for the summary key: stage, defense, p, n, seed (repeatable)"),
    nproc: int = typer.Option(None, help="ranks to generate with (spawns torchrun when > 1) [default: 1]"),
    log_to: str = typer.Option(None, "--log-to", help="also log the summary to: tensorboard,wandb "
                                                       "[default: the log.to of the run that made the model]"),
) -> None:
    """Harmful score (HS, HS+), over-refusal and fine-tune accuracy of one model."""
    from bulwark.eval.device import check_partition, resolve_dtype
    from bulwark.eval.run import parse_meta, run_eval
    from bulwark.recipes.eval import read_eval_yaml

    try:
        if zero3 and partition not in (None, "zero3"):
            raise BulwarkInputError(f"--zero3 and --partition {partition} contradict each other; give one")
        given = {"out_dir": out_dir, "prompt_set": prompt_set, "n_prompts": n_prompts, "judge": judge,
                 "refusal_judge": refusal_judge, "task": task, "n_task": n_task, "n_benign": n_benign,
                 "template": template, "max_new_tokens": max_new_tokens, "batch_size": batch_size,
                 "dtype": dtype, "partition": "zero3" if zero3 else partition,
                 "data_dir": data_dir, "fa_judge": fa_judge, "nproc": nproc, "log_to": log_to}
        options: dict[str, Any] = {}
        if model.endswith((".yaml", ".yml")):
            options = read_eval_yaml(Path(model))
            if "model" not in options:
                raise BulwarkInputError(f"{model}: needs a 'model:' key (the model or adapter folder)")
            model = str(options.pop("model"))
        options.update({k: v for k, v in given.items() if v is not None})
        options["meta"] = {**(options.get("meta") or {}), **parse_meta(meta or [])}
        options.setdefault("out_dir", str(Path(model) / "eval"))
        world = int(options.pop("nproc", 1) or 1)
        resolve_dtype(options.get("dtype"))  # bad values fail here, before any process starts
        partitioned = check_partition(options.get("partition")) == "zero3"
        # Ranks come from the one launcher (bulwark/launch.py); ZeRO-3 runs in torchrun ranks even at world
        # size 1, so DeepSpeed and its process group stay out of this process.
        if world > 1 or partitioned:
            from bulwark.launch import start
            from bulwark.recipes.eval import as_overrides

            raise typer.Exit(start("eval", as_overrides(model, options, world), world))
        summary = run_eval(model, **options)
    except BulwarkInputError as exc:
        _fail(str(exc))
    if summary is not None:
        typer.echo(json.dumps({k: v for k, v in summary.items() if k != "meta"}, indent=2))


def judge_train_command(
    kind: str = typer.Argument("refusal", help="refusal | moderation | all"),
    data_dir: str = typer.Option(None, help="data folder [default: $BULWARK_DATA_DIR]"),
    out_dir: str = typer.Option(None, help="judges folder [default: <cache>/judges]"),
    seed: int = typer.Option(0, help="seed for the data sample and the head"),
) -> None:
    """Train the learned judge(s) on the real data; prints held-out accuracy, precision, recall, F1."""
    from bulwark.data.readers import resolve_data_dir
    from bulwark.eval.judge_train import KINDS, train_judge

    try:
        kinds = list(KINDS) if kind == "all" else [kind]
        if kind != "all" and kind not in KINDS:
            raise BulwarkInputError(f"unknown judge kind '{kind}'; choose one of: {', '.join(KINDS)}, all")
        folder = resolve_data_dir(data_dir)
        if folder is None:
            raise BulwarkInputError("no data folder: set BULWARK_DATA_DIR or pass --data-dir (the folder of JSONL files)")
        for k in kinds:
            train_judge(k, folder, out_dir, seed=seed, log=typer.echo)
    except BulwarkInputError as exc:
        _fail(str(exc))


def scan_command(
    data: str = typer.Argument(..., help="the uploaded fine-tuning file (.jsonl / .json)"),
    judge: str = typer.Option("moderation", help="moderation | hf:<path>"),
    fmt: str = typer.Option(None, "--format", help="qa | alpaca | sst2 | agnews | gsm8k [default: guessed]"),
    out: str = typer.Option(None, "--out", help="write a filtered JSONL copy without the flagged rows"),
    data_dir: str = typer.Option(None, help="data folder (to train the judge on first use)"),
    as_json: bool = typer.Option(False, "--json", help="print the full report as JSON"),
) -> None:
    """Screen an upload: flagged fraction, flagged line numbers, optional filtered copy."""
    from bulwark.eval.scan import scan_file

    try:
        report = scan_file(data, judge=judge, out_filtered=Path(out) if out else None, fmt=fmt, data_dir=data_dir,
                           log=lambda m: typer.echo(m, err=as_json))
    except BulwarkInputError as exc:
        _fail(str(exc))
    if as_json:
        typer.echo(json.dumps(report, indent=2))


def register(app: typer.Typer) -> None:
    """Add `eval`, `judge train` and `scan` to the bulwark app."""
    app.command("eval")(eval_command)
    judge_app = typer.Typer(help="Learned judges: train them on the real data.", no_args_is_help=True)
    judge_app.command("train")(judge_train_command)
    app.add_typer(judge_app, name="judge")
    app.command("scan")(scan_command)
