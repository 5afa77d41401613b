"""Rank-0 progress bar (loss, lr, s/step, ETA) and metrics.jsonl; other ranks stay silent."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Any


class RunLogger:
    def __init__(self, path: Path, rank: int, total: int, start: int = 0, title: str = "train") -> None:
        self.rank, self.total, self.path = rank, total, path
        self.started = time.perf_counter()
        self.step_times: list[float] = []
        self.progress = None
        self.file = None
        if rank != 0:
            return
        if start > 0 and path.exists():
            # a resumed run: drop rows the interrupted run logged after its last checkpoint
            kept = [line for line in path.read_text().splitlines() if line and json.loads(line)["step"] <= start]
            path.write_text("".join(line + "\n" for line in kept))
        elif path.exists():
            path.unlink()
        self.file = path.open("a")
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
        row = {"step": step, **row, "time": time.time()}
        self.file.write(json.dumps(row) + "\n")
        self.file.flush()
        info = f"loss {row['loss']:.4f}  lr {row['lr']:.2e}  {row.get('step_s', 0):.2f} s/step"
        self.progress.update(self.task, completed=step, info=info)
        if self.progress.disable:
            print(f"step {step}/{self.total}  {info}", flush=True)

    def close(self, peak_bytes: int, world_size: int = 1) -> None:
        if self.rank != 0:
            return
        self.progress.stop()
        times = self.step_times[1:] or self.step_times  # the first step pays one-time warm-up
        summary = {
            "steps_run": len(self.step_times),
            "mean_step_s": sum(times) / max(1, len(times)),
            "wall_s": time.perf_counter() - self.started,
            "peak_mem_bytes_rank0": peak_bytes,
            "world_size": world_size,
        }
        self.file.close()
        (self.path.parent / "train_summary.json").write_text(json.dumps(summary, indent=1))
