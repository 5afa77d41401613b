"""The bench pipeline on the tiny model: every stage through the launcher, results files, resume."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest

from bulwark.bench import load_bench_config, run_bench
from bulwark.errors import BulwarkInputError


def tiny_bench(out: Path, model: Path, data_dir: Path) -> list[str]:
    return [
        f"out_dir={out}", f"model={model}", f"data_dir={data_dir}", "eval_base=false", "ps=0.25",
        "finetune_defenses=sft,lisa", "align.train.steps=1", "align.data.align_n=8", "align.data.max_length=32",
        "align.train.micro_batch_size=2", "finetune.train.steps=2", "finetune.data.n=8", "finetune.data.align_n=8",
        "finetune.data.max_length=32", "finetune.train.micro_batch_size=2", "defense_overrides.lisa.align_steps=1",
        "defense_overrides.lisa.finetune_steps=1", "eval.judge=keyword", "eval.n_prompts=3", "eval.n_benign=2",
        "eval.n_task=3", "eval.max_new_tokens=4", "eval.batch_size=4",
    ]


def test_bench_runs_and_resumes_without_redoing_cells(tmp_path: Path, tiny_model_dir: Path, data_dir: Path) -> None:
    out = tmp_path / "bench"
    cfg = load_bench_config(None, tiny_bench(out, tiny_model_dir, data_dir))
    rows = run_bench(cfg, log=lambda m: None)
    assert [r["model"] for r in rows] == ["sft->sft@p=0.25", "sft->lisa@p=0.25"]
    for row in rows:
        assert 0 <= row["HS"] <= 100 and row["FA"] is not None and row["step_s"] > 0
    with (out / "results.csv").open() as handle:
        assert len(list(csv.DictReader(handle))) == 2
    assert (out / "results.md").is_file() and (out / "hs_vs_fa.png").stat().st_size > 0
    stamps = {p: p.stat().st_mtime_ns for p in out.rglob("DONE")} | {p: p.stat().st_mtime_ns
                                                                   for p in out.rglob("summary.json")}
    assert len(stamps) == 3 + 2  # align + 2 finetunes, 2 evals

    messages: list[str] = []
    again = run_bench(cfg, log=messages.append)
    assert sum("skipped" in m for m in messages) == 3
    assert again == rows
    assert all(p.stat().st_mtime_ns == t for p, t in stamps.items())


def test_bench_recover_cells_run_once(tmp_path: Path, tiny_model_dir: Path, data_dir: Path) -> None:
    out = tmp_path / "bench"
    overrides = [o for o in tiny_bench(out, tiny_model_dir, data_dir) if not o.startswith("finetune_defenses=")]
    overrides += [
        "finetune_defenses=sft", "recover=true", "recover_overrides.restore.steps=2",
        "recover_overrides.restore.warmup_steps=1", "recover_overrides.restore.checkpoint_every=1",
        "recover_overrides.restore.fraction=0.01", "recover_overrides.task.metric=loss",
        "recover_overrides.task.n=3", "recover_overrides.data.harmful_n=4", "recover_overrides.data.task_n=4",
        "recover_overrides.data.max_length=32",
    ]
    cfg = load_bench_config(None, overrides)
    rows = run_bench(cfg, log=lambda m: None)
    assert [r["model"] for r in rows] == ["sft->sft@p=0.25", "sft->sft@p=0.25+recover"]
    recovered = rows[1]
    assert recovered["stage"] == "recover" and 0 <= recovered["HS"] <= 100
    rec_dir = out / "rec_sft_sft_p0.25"
    assert (rec_dir / "DONE").is_file() and (rec_dir / "model" / "config.json").is_file()
    summary = (rec_dir / "summary.json").read_text()
    assert str(out / "align_sft" / "model") in (rec_dir / "config.yaml").read_text() and summary
    stamp = (rec_dir / "DONE").stat().st_mtime_ns

    messages: list[str] = []
    assert run_bench(cfg, log=messages.append) == rows
    assert any(m.startswith("recover ") and "skipped" in m for m in messages)
    assert (rec_dir / "DONE").stat().st_mtime_ns == stamp


def test_bench_config_errors() -> None:
    with pytest.raises(BulwarkInputError, match="unknown finetune defense 'lisaa'"):
        load_bench_config(None, ["finetune_defenses=sft,lisaa"])
    with pytest.raises(BulwarkInputError, match="outside"):
        load_bench_config(None, ["ps=1.5"])
    with pytest.raises(BulwarkInputError, match="did you mean 'ps'"):
        load_bench_config(None, ["p=0.1"])
