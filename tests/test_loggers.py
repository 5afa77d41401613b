"""`log.to`: metrics and eval summaries go to metrics.jsonl and, when named, TensorBoard and wandb (offline)."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import numpy as np
import pytest

from bulwark.config import load_config
from bulwark.errors import BulwarkInputError
from tests.conftest import bulwark_cli, check, run_cmd


def tiny_run(model: Path, out: Path, *extra: str) -> list[str]:
    return [f"model.name={model}", f"out_dir={out}", "data.n=8", "data.max_length=32", "data.template=alpaca",
            "train.micro_batch_size=2", "train.steps=3", "train.lr=1e-3", "launch.nproc=1", *extra]


def tensorboard_scalars(folder: Path) -> dict[str, list[tuple[int, float]]]:
    """Every scalar TensorBoard itself reads from the event files under `folder`."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(folder), size_guidance={"scalars": 0})
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def as_float32(value: float) -> float:
    return float(np.float32(value))  # TensorBoard keeps a scalar as a 32-bit float


@pytest.mark.skipif(importlib.util.find_spec("tensorboard") is None, reason="tensorboard not installed")
def test_training_run_logs_to_tensorboard(tmp_path: Path, tiny_model_dir: Path, data_dir: Path) -> None:
    out = tmp_path / "run"
    check(bulwark_cli(["finetune", *tiny_run(tiny_model_dir, out, "log.to=[jsonl,tensorboard]")], data_dir))
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3]
    events = list((out / "tensorboard").glob("events.out.tfevents.*"))
    assert events, "no TensorBoard event file in the run folder"
    scalars = tensorboard_scalars(out / "tensorboard")
    assert scalars["train/loss"] == [(r["step"], as_float32(r["loss"])) for r in rows]
    assert scalars["train/lr"] == [(r["step"], as_float32(r["lr"])) for r in rows]
    assert "train/time" not in scalars  # wall time is the event's own, not a plotted series
    # the resolved config records the loggers, and a run without log.to keeps today's default
    assert "tensorboard" in (out / "config.yaml").read_text()


def test_log_to_default_and_override() -> None:
    assert load_config(None, [], "finetune").log.to == ["jsonl"]
    if importlib.util.find_spec("tensorboard") is not None:
        # jsonl stays on even when not named, and comes first once
        assert load_config(None, ["log.to=tensorboard"], "finetune").log.to == ["jsonl", "tensorboard"]
        assert load_config(None, ["log.to=[tensorboard,jsonl]"], "finetune").log.to == ["jsonl", "tensorboard"]


def test_unknown_sink_is_one_line() -> None:
    with pytest.raises(BulwarkInputError, match=r"log\.to: unknown logger 'tensorbord'; did you mean 'tensorboard'"):
        load_config(None, ["log.to=[jsonl,tensorbord]"], "finetune")


def test_missing_package_names_key_and_pip(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "wandb", None)  # find_spec answers None: as if not installed
    with pytest.raises(BulwarkInputError, match=r"log\.to: 'wandb' needs the wandb package.*pip install wandb"):
        load_config(None, ["log.to=[jsonl,wandb]"], "finetune")


def _one_error_line(proc: object) -> str:
    lines = [line for line in proc.stderr.strip().splitlines() if line.strip() and not line.startswith("note:")]
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert len(lines) == 1 and lines[0].startswith("error:"), lines
    return lines[0]


def test_cli_unknown_sink_exit_2_nothing_written(tmp_path: Path, tiny_model_dir: Path, data_dir: Path) -> None:
    out = tmp_path / "run"
    proc = bulwark_cli(["finetune", *tiny_run(tiny_model_dir, out, "log.to=[jsonl,mlflow]")], data_dir)
    assert "log.to: unknown logger 'mlflow'" in _one_error_line(proc)
    assert not out.exists()


def test_cli_missing_package_exit_2_before_any_rank(tmp_path: Path, tiny_model_dir: Path, data_dir: Path) -> None:
    out = tmp_path / "run"
    hide = ("import sys; sys.modules['tensorboard'] = None; "
            "from cli.main import main; sys.argv[0] = 'bulwark'; main()")
    proc = run_cmd([sys.executable, "-c", hide, "finetune", *tiny_run(tiny_model_dir, out, "log.to=tensorboard")],
                   data_dir)
    line = _one_error_line(proc)
    assert "log.to" in line and "pip install tensorboard" in line, line
    assert not out.exists()


@pytest.mark.skipif(importlib.util.find_spec("tensorboard") is None, reason="tensorboard not installed")
def test_eval_summary_goes_to_tensorboard(tmp_path: Path) -> None:
    from bulwark.loggers import log_eval_summary

    summary = {"model": "m", "HS": 12.5, "HS_plus": 13.0, "over_refusal": None, "FA": 91.25, "n": 100,
               "meta": {"p": 0.1}, "refused": True}
    log_eval_summary(["jsonl", "tensorboard"], tmp_path, summary, step=7)
    scalars = tensorboard_scalars(tmp_path / "tensorboard")
    assert scalars == {"eval/HS": [(7, 12.5)], "eval/HS_plus": [(7, 13.0)], "eval/FA": [(7, 91.25)],
                       "eval/n": [(7, 100.0)]}


def test_eval_inherits_the_runs_loggers(tmp_path: Path) -> None:
    from bulwark.loggers import run_log_settings

    (tmp_path / "config.yaml").write_text("train:\n  steps: 40\nlog:\n  to: [jsonl, tensorboard]\n")
    (tmp_path / "model").mkdir()
    assert run_log_settings(tmp_path / "model") == (["jsonl"], 0)  # not a Bulwark run folder
    (tmp_path / ".bulwark-run").write_text("")
    assert run_log_settings(tmp_path / "model") == (["jsonl", "tensorboard"], 40)
    assert run_log_settings(tmp_path / "elsewhere" / "model") == (["jsonl"], 0)


@pytest.mark.skipif(importlib.util.find_spec("wandb") is None, reason="wandb not installed")
def test_wandb_offline_without_a_key(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from bulwark.loggers import close_sinks, open_sinks, wandb_mode

    for var in ("WANDB_MODE", "WANDB_API_KEY"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("NETRC", str(tmp_path / "no-netrc"))
    monkeypatch.setenv("HOME", str(tmp_path))  # no ~/.netrc, no ~/.config/wandb: nothing reaches the network
    assert wandb_mode() == "offline"
    monkeypatch.setenv("WANDB_MODE", "disabled")
    assert wandb_mode() == "disabled"
    monkeypatch.delenv("WANDB_MODE")

    run_dir = tmp_path / "run"
    run_dir.mkdir()
    sinks = open_sinks(["wandb"], run_dir, {"train": {"lr": 1e-3}}, metrics_path=run_dir / "metrics.jsonl")
    for step, loss in ((1, 2.5), (2, 2.25)):
        for sink in sinks:
            sink.log_metrics(step, {"loss": loss, "lr": 1e-3, "lisa_state": "align"})
    close_sinks(sinks)
    offline = list((run_dir / "wandb").glob("offline-run-*"))
    assert len(offline) == 1, list((run_dir / "wandb").iterdir())
    (record,) = offline[0].glob("*.wandb")  # what `wandb sync` uploads later
    content = record.read_bytes()
    # no public reader for the record file: its history rows hold the keys and values as JSON text
    assert b"train/loss" in content and b"2.25" in content and b"train/lr" in content
    assert b"train/lisa_state" not in content  # text is not a plotted series
    assert (run_dir / "wandb" / "run_id").read_text().strip() in offline[0].name
    assert [json.loads(line)["step"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()] == [1, 2]
