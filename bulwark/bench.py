"""`bulwark bench`: the pipeline matrix, align -> finetune -> (recover) -> eval, resumable.

Cells are (alignment defense) x (fine-tuning defense) x (harmful ratio p). Every stage runs through
`bulwark.launch` exactly as the CLI would (never a recipe's insides) and writes its own run folder
under `out_dir`; a stage whose folder is finished (DONE, or summary.json for eval) is skipped, so a
killed bench picks up where it stopped. Results: `results.csv`, `results.md`, `hs_vs_fa.png`,
`loss_curves.png`.

`bulwark demo` is this bench with the embedded model and the demo matrix (align with SFT, attack
with SFT and with Lisa at p = 0.1), printing HS, HS+, over-refusal and SST-2 accuracy for the base,
aligned and attacked models.
"""

from __future__ import annotations

import csv
import json
import math
import re
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from bulwark.config import build_dataclass, check_numbers, deep_merge, parse_overrides, read_yaml
from bulwark.errors import BulwarkInputError
from bulwark.eval.generate import GENERATE_BATCH_SIZE


@dataclass
class EvalSettings:
    prompt_set: str = "harmful_eval_prompts"
    n_prompts: int = 100
    n_benign: int = 30
    task: str | None = "sst2"
    n_task: int = 100
    judge: str = "refusal"
    max_new_tokens: int = 64
    batch_size: int = GENERATE_BATCH_SIZE
    template: str = "chat"


@dataclass
class BenchConfig:
    out_dir: str = "runs/bench"
    model: str = "embedded"
    align_defenses: list[str] = field(default_factory=lambda: ["sft"])
    finetune_defenses: list[str] = field(default_factory=lambda: ["sft", "lisa"])
    ps: list[float] = field(default_factory=lambda: [0.1])
    eval_base: bool = True  # also evaluate the base model and each aligned model
    recover: bool = False  # also run `bulwark recover` (aligned -> each fine-tuned model) and evaluate it
    # the recover methods that run when recover is on (`method=`; `bulwark defenses` lists them), each on
    # the fine-tuned models of `recover_after` (empty: every fine-tuned model)
    recover_methods: list[str] = field(default_factory=lambda: ["restore"])
    recover_after: list[str] = field(default_factory=list)  # e.g. [sft]: repair only the undefended attack
    # the attacker's learning rate: one fine-tune per lr (empty: the finetune section's train.lr)
    lrs: list[float] = field(default_factory=list)
    # the defense table (bulwark/table.py): attack name -> its fine-tuning overrides; the first is the papers'.
    # Non-empty: every align defense attacked with SFT, every finetune defense defending, every recover method
    # on the SFT attack, under each attack; an attack counts when it keeps FA >= fa_floor x the undefended FA
    attacks: dict[str, Any] = field(default_factory=dict)
    fa_floor: float = 0.8
    # key=value overrides for every run of a stage (e.g. {"train.steps": 40}), and per defense
    align: dict[str, Any] = field(default_factory=dict)
    finetune: dict[str, Any] = field(default_factory=dict)
    defense_overrides: dict[str, Any] = field(default_factory=dict)  # {"lisa": {"align_steps": 3}}
    # overrides of a defense's own runs beyond its defense.* keys, e.g. {"booster": {"launch": {"ds_config":
    # "zero3"}}}: Booster's harmful-gradient passes need ZeRO-3 (at one rank it partitions nothing)
    run_overrides: dict[str, Any] = field(default_factory=dict)
    recover_overrides: dict[str, Any] = field(default_factory=dict)  # {"restore": {"steps": 10}}
    eval: EvalSettings = field(default_factory=EvalSettings)
    data_dir: str | None = None


def load_bench_config(path: str | Path | None, overrides: list[str]) -> BenchConfig:
    values = read_yaml(path) if path else {}
    values = deep_merge(values, parse_overrides(overrides))
    cfg = build_dataclass(BenchConfig, values, "")
    check_numbers({k: v for k, v in asdict(cfg).items() if k not in ("ps", "lrs")})
    if any(not math.isfinite(p) for p in cfg.ps):
        raise BulwarkInputError(f"bench: ps holds {cfg.ps}: every p must be a finite number in [0, 1]")
    if not cfg.align_defenses or not cfg.finetune_defenses or not cfg.ps:
        raise BulwarkInputError("bench: align_defenses, finetune_defenses and ps must each name at least one")
    for p in cfg.ps:
        if not 0 <= p <= 1:
            raise BulwarkInputError(f"bench: ps holds {p}, outside [0, 1]")
    for lr in cfg.lrs:
        if not (math.isfinite(lr) and lr > 0):
            raise BulwarkInputError(f"bench: lrs holds {lr}: every attacker lr must be a finite number > 0")
    if not 0 < cfg.fa_floor <= 1:
        raise BulwarkInputError(f"bench: fa_floor = {cfg.fa_floor} must be in (0, 1]")
    for name, settings in cfg.attacks.items():
        if not isinstance(settings, dict) or not re.fullmatch(r"[A-Za-z0-9_.+-]+", str(name)):
            raise BulwarkInputError(f"bench: attacks.{name}: give each attack a plain name and a mapping of "
                                    "fine-tuning overrides (e.g. lr5x: {train: {lr: 1.0e-4}})")
        from bulwark.config import load_config

        try:  # every key and type of the attack, now, not hours into the table
            load_config(None, [*_flatten("", cfg.finetune), *_flatten("", settings)], "finetune")
        except BulwarkInputError as exc:
            raise BulwarkInputError(f"bench: attacks.{name}: {exc}") from None
    if cfg.recover:
        from bulwark.recover.base import get

        if not cfg.recover_methods:
            raise BulwarkInputError("bench: recover=true needs at least one name in recover_methods")
        for method in cfg.recover_methods:
            try:
                get(method)
            except BulwarkInputError as exc:
                raise BulwarkInputError(f"bench: recover_methods: {exc}") from None
    from bulwark.defenses import REGISTRY

    for stage, names in (("align", cfg.align_defenses), ("finetune", cfg.finetune_defenses)):
        for name in names:
            if name not in REGISTRY:
                raise BulwarkInputError(f"bench: unknown {stage} defense '{name}' (see `bulwark defenses`)")
            if stage not in REGISTRY[name].stages:
                raise BulwarkInputError(f"bench: defense '{name}' does not run at stage {stage}")
    return cfg


def _flatten(prefix: str, values: dict[str, Any]) -> list[str]:
    out = []
    for key, value in values.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out += _flatten(name + ".", value)
        elif isinstance(value, list):
            out.append(f"{name}={','.join(str(v) for v in value)}")
        else:
            out.append(f"{name}={value}")
    return out


@dataclass
class Cell:
    """One row of the results: a model that gets evaluated, and how it was made."""

    label: str
    model_dir: Path
    stage: str
    align_defense: str | None = None
    finetune_defense: str | None = None
    p: float | None = None
    run_dir: Path | None = None


def run_bench(cfg: BenchConfig, log: Callable[[str], None] = print) -> list[dict[str, Any]]:
    from bulwark import models

    out = Path(cfg.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    base_dir = Path(models.resolve_model_path(cfg.model)) if cfg.model != "tiny" else None
    cells: list[Cell] = []
    if cfg.eval_base and base_dir is not None:
        cells.append(Cell("base", base_dir, "base"))
    plan = [("align", a, None, None, None) for a in cfg.align_defenses]
    plan += [("finetune", a, f, p, lr) for a in cfg.align_defenses for f in cfg.finetune_defenses for p in cfg.ps
             for lr in (cfg.lrs or [None])]
    total = len(plan)
    for i, (stage, align_def, ft_def, p, lr) in enumerate(plan, 1):
        defense = align_def if stage == "align" else ft_def
        lr_tag = "" if lr is None else f"_lr{lr:g}"
        run_dir = out / (f"align_{align_def}" if stage == "align" else f"ft_{align_def}_{ft_def}_p{p}{lr_tag}")
        extra = [] if stage == "align" else [f"data.p={p}"] + ([] if lr is None else [f"train.lr={lr}"])
        base = cfg.model if stage == "align" else str(out / f"align_{align_def}" / "model")
        train_run(cfg, stage, defense, run_dir, base, extra, log,
                  f"[{i}/{total}] {stage} {defense}{'' if p is None else f' p={p}'}")
        cell = Cell(
            f"{stage}:{align_def}" if stage == "align" else f"{align_def}->{ft_def}@p={p}"
            + ("" if lr is None else f",lr={lr:g}"),
            run_dir / "model", stage, align_def, ft_def, p, run_dir,
        )
        if stage == "finetune" or cfg.eval_base:
            cells.append(cell)
        if stage == "finetune" and cfg.recover and (not cfg.recover_after or ft_def in cfg.recover_after):
            cells += [run_recover(cfg, cell, out, log, method) for method in cfg.recover_methods]

    rows = []
    for j, cell in enumerate(cells, 1):
        log(f"[eval {j}/{len(cells)}] {cell.label}")
        rows.append(evaluate_cell(cfg, cell, out))
    write_results(rows, out)
    return rows


def train_run(cfg: BenchConfig, stage: str, defense: str, run_dir: Path, model: str, extra: list[str],
              log: Callable[[str], None], what: str) -> None:
    """One `bulwark align|finetune` run of the bench (the stage's and the defense's overrides, then `extra`),
    through the launcher as the CLI would; skipped when finished, resumed from its last checkpoint."""
    from bulwark.launch import launch

    overrides = [f"out_dir={run_dir}", f"defense.name={defense}", *_data_dir(cfg),
                 *_flatten("", cfg.align if stage == "align" else cfg.finetune),
                 *_flatten("defense.", cfg.defense_overrides.get(defense, {})),
                 *_flatten("", cfg.run_overrides.get(defense, {})), f"model.name={model}", *extra]
    if (run_dir / "DONE").is_file():
        log(f"{what}: done earlier, skipped")
        return
    log(f"{what} -> {run_dir}")
    resume = (run_dir / "checkpoints" / "latest").is_file()
    code = launch(stage, None, overrides, resume=resume, overwrite=not resume and run_dir.exists())
    if code:
        raise RuntimeError(f"bench: {stage} {defense} failed with exit code {code} (see {run_dir})")


def _data_dir(cfg: BenchConfig) -> list[str]:
    """The bench's data folder as a stage override (none: the stage's own default)."""
    return [f"data.dir={cfg.data_dir}"] if cfg.data_dir else []


def run_recover(cfg: BenchConfig, attacked: Cell, out: Path, log: Callable[[str], None],
                method: str = "restore") -> Cell:
    """`bulwark recover method=...` of one fine-tuned model toward its aligned model; skipped when finished.
    Methods that read the unaligned base (safelora, safemerge) get the bench's model."""
    from bulwark.launch import launch
    from bulwark.recover.base import get

    # restore keeps the name earlier benches wrote; other methods carry theirs
    suffix = "" if method == "restore" else f"_{method}"
    run_dir = out / f"rec_{attacked.run_dir.name.removeprefix('ft_')}{suffix}"
    if (run_dir / "DONE").is_file():
        log(f"recover {attacked.label}: done earlier, skipped")
    else:
        log(f"recover {attacked.label} -> {run_dir}")
        overrides = [f"out_dir={run_dir}", f"aligned={out / f'align_{attacked.align_defense}' / 'model'}",
                     f"finetuned={attacked.model_dir}", f"method={method}", *_data_dir(cfg),
                     *_flatten("", cfg.recover_overrides)]
        if get(method).needs_base:
            overrides.append(f"base={cfg.model}")
        # a recover run has no checkpoints to resume from: a killed one starts over
        code = launch("recover", None, overrides, overwrite=run_dir.exists())
        if code:
            raise RuntimeError(f"bench: recover of {attacked.label} failed with exit code {code} (see {run_dir})")
    return Cell(f"{attacked.label}+{'recover' if method == 'restore' else method}", run_dir / "model", "recover",
                attacked.align_defense,
                attacked.finetune_defense, attacked.p, run_dir)


def evaluate_cell(cfg: BenchConfig, cell: Cell, out: Path) -> dict[str, Any]:
    from bulwark.eval.run import run_eval

    eval_dir = out / "eval" / cell.label.replace(":", "_").replace("->", "_to_").replace("@", "_")
    summary_file = eval_dir / "summary.json"
    if summary_file.is_file():
        summary = json.loads(summary_file.read_text())
        from bulwark.eval.judges import JUDGE_RULES_VERSION

        if summary.get("judge_version") != JUDGE_RULES_VERSION:  # judged by older rules: score it again
            from bulwark.eval.run import rejudge

            summary = rejudge(eval_dir, cfg.data_dir)
    else:
        e = cfg.eval
        summary = run_eval(
            cell.model_dir, out_dir=eval_dir, prompt_set=e.prompt_set, n_prompts=e.n_prompts, judge=e.judge,
            task=e.task, n_task=e.n_task, n_benign=e.n_benign, template=e.template,
            max_new_tokens=e.max_new_tokens, batch_size=e.batch_size, data_dir=cfg.data_dir,
            meta={"model": cfg.model, "stage": cell.stage, "defense": cell.finetune_defense or cell.align_defense,
                  "p": cell.p, "n": None, "seed": None},
        )
    train = {}
    if cell.run_dir is not None and (cell.run_dir / "train_summary.json").is_file():
        train = json.loads((cell.run_dir / "train_summary.json").read_text())
    return {
        "model": cell.label, "stage": cell.stage, "align_defense": cell.align_defense or "",
        "finetune_defense": cell.finetune_defense or "", "p": "" if cell.p is None else cell.p,
        "HS": summary.get("HS"), "HS_plus": summary.get("HS_plus"), "over_refusal": summary.get("over_refusal"),
        "FA": summary.get("FA"), "step_s": train.get("mean_step_s"),
        "peak_mem_gib": None if not train else round(train["peak_mem_bytes_rank0"] / 2**30, 2),
        "run_dir": str(cell.run_dir or ""),
    }


COLUMNS = ["model", "HS", "HS_plus", "over_refusal", "FA", "step_s", "peak_mem_gib"]


def results_markdown(rows: list[dict[str, Any]]) -> str:
    def fmt(v: Any) -> str:
        if v is None or v == "":
            return "-"
        return f"{v:.1f}" if isinstance(v, float) else str(v)

    header = "| model | HS % | HS+ % | over-refusal % | FA % | s/step | peak mem GiB |\n|---|---|---|---|---|---|---|\n"
    return header + "".join("| " + " | ".join(fmt(r[c]) for c in COLUMNS) + " |\n" for r in rows)


def write_csv(rows: list[dict[str, Any]], path: Path) -> None:
    """`rows` as CSV (the first row's keys are the columns), written whole or not at all."""
    tmp = path.with_name(path.name + ".tmp")
    with tmp.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    tmp.replace(path)


def write_text(text: str, path: Path) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    tmp.replace(path)


def write_results(rows: list[dict[str, Any]], out: Path) -> None:
    write_csv(rows, out / "results.csv")
    write_text(results_markdown(rows), out / "results.md")
    plot_results(rows, out)


def plot_results(rows: list[dict[str, Any]], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for row in rows:
        if row["HS"] is None or row["FA"] is None:
            continue
        ax.scatter(row["FA"], row["HS"])
        ax.annotate(row["model"], (row["FA"], row["HS"]), fontsize=7)
    ax.set_xlabel("fine-tune accuracy %")
    ax.set_ylabel("harmful score %")
    ax.set_title("harmful score vs fine-tune accuracy")
    fig.tight_layout()
    fig.savefig(out / "hs_vs_fa.png", dpi=120)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(6, 4))
    for row in rows:
        metrics = Path(row["run_dir"]) / "metrics.jsonl" if row["run_dir"] else None
        if metrics is None or not metrics.is_file():
            continue
        points = [json.loads(line) for line in metrics.read_text().splitlines() if line]
        ax.plot([p["step"] for p in points], [p["loss"] for p in points], label=row["model"])
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("training loss")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "loss_curves.png", dpi=120)
    plt.close(fig)


# The demo: measured on a 2-core CPU (see docs/BENCHMARKS.md for the figures and the wall time).
# One rank, so ZeRO-2: at world size 1 ZeRO-3 partitions nothing and its per-layer gather/release
# costs 1.5x the step (SmolLM2, 4 x 128 tokens: 6.7 s vs 4.4 s); every defense's ZeRO-3 path is
# tested at 2 ranks (tests/), and `launch.ds_config=zero3` gives the same run on ZeRO-3.
# Alignment mixes benign chat answers 1:1 into the refusals (AlpacaEval rows 200+; the over-refusal
# eval reads the first rows), at lr 3e-5: refusals alone at 5e-5 made SmolLM2 refuse 80% of benign
# AlpacaEval prompts, a 1:1 Alpaca mix still 77% (keyword), this mix 70% (docs/BENCHMARKS.md). Lisa's
# alignment stream replays the same mix.
ALIGN_MIX = {"align_benign": "alpaca_eval[200:]", "max_length": 128}
DEMO = {
    "model": "embedded",
    "align_defenses": ["sft"],
    "finetune_defenses": ["sft", "lisa"],
    "ps": [0.1],
    "align": {"data": {"align_n": 200, "align_benign_n": 200, **ALIGN_MIX},
              "train": {"steps": 40, "micro_batch_size": 4, "grad_accum": 2, "lr": 3e-5},
              "launch": {"ds_config": "zero2"}},
    "finetune": {"data": {"n": 240, "align_n": 120, "align_benign_n": 120, **ALIGN_MIX},
                 "train": {"steps": 30, "micro_batch_size": 4, "grad_accum": 2, "lr": 2e-5},
                 "launch": {"ds_config": "zero2"}},
    "defense_overrides": {"lisa": {"align_steps": 3, "finetune_steps": 7, "rho": 1.0}},
    "eval": {"n_prompts": 60, "n_benign": 30, "task": "sst2", "n_task": 100, "max_new_tokens": 48},
}


def demo_config(out_dir: str, overrides: list[str]) -> BenchConfig:
    values = deep_merge(dict(DEMO, out_dir=out_dir), parse_overrides(overrides))
    return build_dataclass(BenchConfig, values, "")
