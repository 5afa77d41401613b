"""Rank-0 progress bar (loss, lr, s/step, ETA) and metrics.jsonl; other ranks stay silent."""

from __future__ import annotations

import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any


class RunLogger:
    def __init__(self, path: Path, rank: int, total: int, start: int = 0, title: str = "train",
                 log_to: list[str] | None = None, config: dict[str, Any] | None = None) -> None:
        """`log_to` names the sinks beyond metrics.jsonl (bulwark.loggers: tensorboard, wandb); `config` is
        the run's resolved config, which wandb records with the run."""
        self.rank, self.total, self.path = rank, total, path
        self.sinks: list[Any] = []
        self.started = time.perf_counter()
        self.step_times: list[float] = []  # this process's steps
        self.earlier: list[dict[str, Any]] = []  # a resumed run: the rows logged before its checkpoint
        self.progress = None
        if rank != 0:
            return
        if start > 0 and path.exists():
            # a resumed run: drop rows the interrupted run logged after its last checkpoint
            self.earlier = [row for row in read_metrics(path) if row["step"] <= start]
            path.write_text("".join(json.dumps(row) + "\n" for row in self.earlier))
        elif path.exists():
            path.unlink()
        from bulwark.loggers import open_sinks

        self.sinks = open_sinks(log_to or [], path.parent, config, start_step=start, metrics_path=path)
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

        self.progress = Progress(
            TextColumn(f"[bold]{title}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("{task.fields[info]}"),
            TimeRemainingColumn(),
            transient=False,
            disable=not sys.stderr.isatty() and not sys.stdout.isatty(),
        )
        self.task = self.progress.add_task(title, total=total, completed=start, info="")
        self.progress.start()

    def log(self, step: int, row: dict[str, Any]) -> None:
        self.step_times.append(row.get("step_s", 0.0))
        if self.rank != 0:
            return
        row = {**row, "time": time.time()}
        for sink in self.sinks:
            sink.log_metrics(step, row)
        info = f"loss {row['loss']:.4f}  lr {row['lr']:.2e}  {row.get('step_s', 0):.2f} s/step"
        self.progress.update(self.task, completed=step, info=info)
        if self.progress.disable:
            print(f"step {step}/{self.total}  {info}", flush=True)

    def close(self, peak_bytes: int, world_size: int = 1) -> None:
        if self.rank != 0:
            return
        self.progress.stop()
        # the whole run, resumed or not: steps logged before the checkpoint this process resumed from count too
        every = [float(row.get("step_s", 0.0)) for row in self.earlier] + self.step_times
        times = every[1:] or every  # the run's first step pays one-time warm-up
        summary = {
            "steps_run": len(every),
            "mean_step_s": sum(times) / max(1, len(times)),
            # a few steps slowed by another job on the machine move the mean, not the median
            "median_step_s": statistics.median(times) if times else 0.0,
            "wall_s": time.perf_counter() - self.started,  # this process only: a resume's gap is not run time
            "resumed_at_step": self.earlier[-1]["step"] if self.earlier else 0,
            "peak_mem_bytes_rank0": peak_bytes,
            "world_size": world_size,
        }
        from bulwark.loggers import close_sinks

        close_sinks(self.sinks)
        (self.path.parent / "train_summary.json").write_text(json.dumps(summary, indent=1))


def read_metrics(path: Path) -> list[dict[str, Any]]:
    """The rows of a metrics.jsonl. A torn last line (the run was cut off while writing it: power loss,
    a full disk) is dropped with a one-line warning; an unreadable line before it is a BulwarkInputError."""
    from bulwark.errors import BulwarkInputError

    lines = path.read_text(errors="replace").splitlines()
    while lines and not lines[-1].strip():
        lines.pop()
    rows = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            if not isinstance(row, dict) or not isinstance(row.get("step"), int):
                raise ValueError("no integer 'step'")
        except ValueError as exc:
            if number == len(lines):
                print(f"warning: {path}:{number}: dropped a torn last line (the run was cut off while writing it)",
                      file=sys.stderr)
                break
            raise BulwarkInputError(
                f"{path}:{number}: not a metrics row ({exc}); fix or delete that line, then resume again"
            ) from None
        rows.append(row)
    return rows
