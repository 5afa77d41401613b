"""Where a run's numbers go: `log.to: [jsonl, tensorboard, wandb]` (the trainers' `report_to`).

jsonl (metrics.jsonl in the run folder) is always on; the others are optional packages, opened on rank 0
only, and work offline: TensorBoard writes event files under `<run folder>/tensorboard/`, wandb runs in
`$WANDB_MODE`, or "offline" when no API key is configured, with its files under `<run folder>/wandb/`.

A sink gets the rows the training loop logs (loss, lr, step time and the defense's own metrics) under
`train/<key>`, and the figures of an eval summary (bulwark eval's summary.json) under `eval/<key>`.

This module imports no optional package at load time: `check_sinks` runs at config load, in the
launcher's process, and must stay cheap.
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any, Protocol

SINKS = ("jsonl", "tensorboard", "wandb")
# sink -> (the module it needs, the pip command that brings it)
_NEEDS = {
    "tensorboard": ("tensorboard", "pip install tensorboard  (or: pip install 'bulwark[log]')"),
    "wandb": ("wandb", "pip install wandb  (or: pip install 'bulwark[log]')"),
}
TENSORBOARD_DIR = "tensorboard"
WANDB_ID_FILE = "wandb/run_id"  # a resumed run keeps logging into the same wandb run


class Sink(Protocol):
    name: str

    def log_metrics(self, step: int, row: Mapping[str, Any]) -> None: ...

    def log_summary(self, summary: Mapping[str, Any], step: int) -> None: ...

    def close(self) -> None: ...


def check_sinks(names: Iterable[str], key: str = "log.to") -> list[str]:
    """The sinks to open, jsonl first and each once; an unknown name or a sink whose package is missing is a
    one-line BulwarkInputError naming `key` (and the pip command)."""
    from bulwark.errors import BulwarkInputError

    wanted = ["jsonl"]
    for name in names:
        name = str(name).strip().lower()
        if name not in SINKS:
            import difflib

            close = difflib.get_close_matches(name, SINKS, n=1, cutoff=0.5)
            hint = f"did you mean '{close[0]}'? " if close else ""
            raise BulwarkInputError(f"{key}: unknown logger '{name}'; {hint}choose from {', '.join(SINKS)}")
        if name in _NEEDS and importlib.util.find_spec(_NEEDS[name][0]) is None:
            raise BulwarkInputError(f"{key}: '{name}' needs the {_NEEDS[name][0]} package, which is not "
                                    f"installed: {_NEEDS[name][1]}")
        if name not in wanted:
            wanted.append(name)
    return wanted


def scalars(row: Mapping[str, Any], prefix: str) -> dict[str, float]:
    """The finite numbers of a row as `prefix/key` (booleans and text are not plotted; "step" is the x axis
    and "time" is the event's own wall time)."""
    out = {}
    for key, value in row.items():
        if key in ("step", "time") or isinstance(value, bool) or not isinstance(value, (int, float)):
            continue
        if math.isfinite(value):
            out[f"{prefix}/{key}"] = float(value)
    return out


class JsonlSink:
    """metrics.jsonl: one JSON row per logged step, flushed at once (a crash loses at most the torn line,
    which `progress.read_metrics` drops). An eval's summary.json is written by the eval itself."""

    name = "jsonl"

    def __init__(self, path: Path | None) -> None:
        self.path = path
        self.file = path.open("a") if path is not None else None

    def log_metrics(self, step: int, row: Mapping[str, Any]) -> None:
        if self.file is not None:
            self.file.write(json.dumps({"step": step, **row}) + "\n")
            self.file.flush()

    def log_summary(self, summary: Mapping[str, Any], step: int) -> None:
        pass

    def close(self) -> None:
        if self.file is not None:
            self.file.close()


class TensorBoardSink:
    name = "tensorboard"

    def __init__(self, run_dir: Path, start_step: int = 0) -> None:
        from torch.utils.tensorboard import SummaryWriter

        # purge_step: a resumed run hides the points the interrupted run logged after its checkpoint,
        # the same rows RunLogger drops from metrics.jsonl
        self.writer = SummaryWriter(log_dir=str(run_dir / TENSORBOARD_DIR),
                                    purge_step=start_step + 1 if start_step > 0 else None)

    def log_metrics(self, step: int, row: Mapping[str, Any]) -> None:
        for tag, value in scalars(row, "train").items():
            self.writer.add_scalar(tag, value, step)
        self.writer.flush()

    def log_summary(self, summary: Mapping[str, Any], step: int) -> None:
        for tag, value in scalars(summary, "eval").items():
            self.writer.add_scalar(tag, value, step)
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


def wandb_mode() -> str:
    """$WANDB_MODE when set; else online only when an API key is configured (env or ~/.netrc), so a machine
    without an account never waits on the network."""
    mode = os.environ.get("WANDB_MODE", "").strip()
    if mode:
        return mode
    if os.environ.get("WANDB_API_KEY"):
        return "online"
    try:
        import netrc

        if netrc.netrc().authenticators("api.wandb.ai"):
            return "online"
    except (OSError, netrc.NetrcParseError):
        pass
    return "offline"


class WandbSink:
    name = "wandb"

    def __init__(self, run_dir: Path, config: Mapping[str, Any] | None = None, start_step: int = 0,
                 job_type: str = "train") -> None:
        import uuid

        import wandb

        id_file = run_dir / WANDB_ID_FILE
        id_file.parent.mkdir(parents=True, exist_ok=True)
        run_id = id_file.read_text().strip() if start_step > 0 and id_file.is_file() else uuid.uuid4().hex[:12]
        self.run = wandb.init(
            project=os.environ.get("WANDB_PROJECT", "bulwark"),
            name=run_dir.name,
            id=run_id,
            resume="allow",
            dir=str(run_dir),  # wandb adds its own wandb/ below it
            mode=wandb_mode(),
            job_type=job_type,
            config=dict(config or {}),
            settings=wandb.Settings(console="off", silent=True),  # Bulwark's own lines stay the only output
        )
        id_file.write_text(run_id + "\n")

    def log_metrics(self, step: int, row: Mapping[str, Any]) -> None:
        self.run.log(scalars(row, "train"), step=step)

    def log_summary(self, summary: Mapping[str, Any], step: int) -> None:
        values = scalars(summary, "eval")
        self.run.log(values, step=step)
        self.run.summary.update(values)

    def close(self) -> None:
        import wandb

        self.run.finish()
        # finish() returns before wandb's service has written the run file (measured: 3 of 4 offline runs
        # held only its header), and a rank ends with os._exit; teardown waits for the service to flush
        wandb.teardown()


def open_sinks(names: Iterable[str], run_dir: str | Path, config: Mapping[str, Any] | None = None, *,
               start_step: int = 0, metrics_path: Path | None = None, job_type: str = "train") -> list[Sink]:
    """Open every sink `names` asks for (jsonl always). Call on rank 0 only. `metrics_path` is the jsonl
    file (None: the jsonl sink writes nothing, e.g. for an eval whose record is summary.json)."""
    run_dir = Path(run_dir)
    sinks: list[Sink] = []
    for name in check_sinks(names):
        if name == "jsonl":
            sinks.append(JsonlSink(metrics_path))
        elif name == "tensorboard":
            sinks.append(TensorBoardSink(run_dir, start_step))
        elif name == "wandb":
            sinks.append(WandbSink(run_dir, config, start_step, job_type))
    return sinks


def close_sinks(sinks: Iterable[Sink]) -> None:
    for sink in sinks:
        sink.close()


def run_log_settings(model_path: str | Path) -> tuple[list[str], int]:
    """(log.to, train.steps) of the Bulwark run that exported `model_path` (`<run>/model` or `<run>/adapter`),
    so that `bulwark eval` of a run's model logs where its training did; (["jsonl"], 0) for any other model."""
    import yaml

    model = Path(model_path).expanduser()
    saved = model.parent / "config.yaml"
    if not model.is_dir() or not (model.parent / ".bulwark-run").is_file():  # loop.RUN_MARKER: a run folder
        return ["jsonl"], 0
    try:
        values = yaml.safe_load(saved.read_text()) or {}
        names = values.get("log", {}).get("to") or ["jsonl"]
        return [str(n) for n in names], int(values.get("train", {}).get("steps", 0))
    except (OSError, ValueError, AttributeError, TypeError, yaml.YAMLError):
        return ["jsonl"], 0


def log_eval_summary(names: Iterable[str], out_dir: str | Path, summary: Mapping[str, Any], step: int = 0,
                     options: Mapping[str, Any] | None = None) -> None:
    """Send an eval summary's figures to every optional sink (summary.json is its jsonl record)."""
    names = [n for n in check_sinks(names, "log_to") if n != "jsonl"]
    if not names:
        return
    sinks = open_sinks(names, out_dir, options, job_type="eval")
    try:
        for sink in sinks:
            sink.log_summary(summary, step)
    finally:
        close_sinks(sinks)
