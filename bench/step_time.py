"""Step time of each defense relative to SFT, plus per-rank defense state and peak memory per defense.

    # all defenses round-robin in ONE process per rank (best for ratios on a noisy machine; no memory per defense)
    torchrun --nproc_per_node 2 bench/step_time.py --model tiny --defenses sft,lisa
    # one torchrun per defense (memory per defense): run with python, it spawns the torchruns
    python bench/step_time.py --isolate --nproc 2 --model tiny --defenses sft,vaccine,smart

Every defense trains the same model from the same weights on the same synthetic token batches
(micro batch x seq tokens, all labelled), through the real engine and hook loop. Timing: the first
step of each round warms caches up and is not timed; the figure is the median over all timed steps.
In one process, defenses run round-robin `--rounds` times so that machine noise hits all of them
alike. A defense label may carry config overrides: `vaccine[own_trace=false]`.

Columns: "pass floor" is the defense's forward/backward work relative to SFT's, counted in passes
(each defense's docstring and docs/DEFENSES.md derive it); "target" is issue 3's. "state bytes" is
what the defense keeps per rank between steps (Lisa's anchors, SMART's EMA, ...): trainable bytes /
world size is the target. "peak memory per rank" (with --isolate only; rank 0's process):
- GPU: torch.cuda.max_memory_allocated over the timed steps (reset before them).
- CPU: the highest resident set size (/proc/self/statm) seen by a thread sampling it every 2 ms during
  the timed steps: weights, optimizer state, defense state, activations and allocator slack (freed
  memory the allocator keeps is counted; a transient shorter than the sampling period can be missed).
  "load peak" is ru_maxrss before the first step (model loading and engine set-up).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import torch

# forward/backward work relative to SFT (docs/DEFENSES.md): "a-b" = a counted in passes over the model
# (what a fetch- or communication-bound run pays), b in row-work with a backward = 2 forwards and an
# input-only backward (Vaccine's pass 1, SMART's ascent) = 1 forward (what a compute-bound run pays)
PASS_FLOOR = {
    "sft": "1", "mix": "1", "lisa": "1", "vaccine-random": "1",
    "vaccine": "2-1.7", "t-vaccine": "<=2-1.7", "repnoise": "1-2", "booster": "3", "booster+vaccine": "4-3.7",
    "smart": "2.5-3.7",
}
TARGET = {"lisa": 1.05, "vaccine": 2.1, "t-vaccine": 2.1, "booster": 3.1, "repnoise": 2.3, "smart": 2.2}


def tensor_bytes(obj: Any) -> int:
    if isinstance(obj, torch.Tensor):
        return obj.numel() * obj.element_size()
    if isinstance(obj, dict):
        return sum(tensor_bytes(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(tensor_bytes(v) for v in obj)
    return 0


def parse_label(label: str) -> tuple[str, dict[str, Any]]:
    """"vaccine[own_trace=false,rho=3]" -> ("vaccine", {"own_trace": False, "rho": 3})."""
    if "[" not in label:
        return label, {}
    name, _, rest = label.partition("[")
    options = {}
    for item in rest.rstrip("]").split(","):
        key, _, value = item.partition("=")
        options[key.strip()] = json.loads(value.strip())
    return name, options


class SyntheticStream:
    def __init__(self, vocab: int, mbs: int, seq: int, seed: int) -> None:
        self.generator = torch.Generator().manual_seed(seed)
        self.vocab, self.mbs, self.seq = vocab, mbs, seq

    def next_batch(self) -> dict[str, torch.Tensor]:
        ids = torch.randint(3, self.vocab, (self.mbs, self.seq), generator=self.generator)
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass


class PeakMemory:
    """Peak memory of this process while running: see the module docstring."""

    def __init__(self, period_s: float = 0.002) -> None:
        self.period_s, self.peak, self._stop = period_s, 0, threading.Event()
        self._thread: threading.Thread | None = None
        self._page = os.sysconf("SC_PAGE_SIZE")

    def _rss(self) -> int:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * self._page

    def _sample(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self._rss())
            time.sleep(self.period_s)

    def __enter__(self) -> PeakMemory:
        if torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()
        else:
            self.peak = self._rss()
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        if torch.cuda.is_available():
            self.peak = int(torch.cuda.max_memory_allocated())
        else:
            self._stop.set()
            self._thread.join()
            self.peak = max(self.peak, self._rss())


def run_in_process(args: argparse.Namespace) -> dict[str, Any]:
    from bulwark import models
    from bulwark.config import LoraConfig, TrainConfig
    from bulwark.defenses import build_defense
    from bulwark.engine import Engine, peak_memory_bytes
    from bulwark.recipes.step import train_step

    labels = [n for n in args.defenses.split(",") if n]
    total_steps = args.rounds * (args.steps + 1)
    train = TrainConfig(steps=total_steps, micro_batch_size=args.mbs, lr=1e-5)
    lora = LoraConfig(enabled=args.lora)

    def build() -> torch.nn.Module:
        model = models.load_model(args.model, "fp32")
        return models.apply_lora(model, lora) if args.lora else model

    runs = {}
    for label in labels:
        name, options = parse_label(label)
        engine = Engine(build, train, args.ds_config, "fp32", total_steps)
        defense = build_defense({"name": name, **options}, "", total_steps)
        defense.attach(engine)
        engine.add_pre_step_hook(defense.before_step)
        vocab = engine.module.config.vocab_size
        streams = {s: SyntheticStream(vocab, args.mbs, args.seq, seed=i + 100 * engine.rank)
                   for i, s in enumerate(("main", "align", "harmful", "benign_refusals"))}
        runs[label] = {"engine": engine, "defense": defense, "streams": streams, "times": [], "step": 0}
    load_peak = peak_memory_bytes()

    with PeakMemory() as memory:
        for _ in range(args.rounds):
            for label in labels:
                run = runs[label]
                engine, defense = run["engine"], run["defense"]
                for i in range(args.steps + 1):
                    t0 = time.perf_counter()
                    train_step(engine, defense, run["streams"], run["step"], 1)
                    run["step"] += 1
                    if i:
                        run["times"].append(time.perf_counter() - t0)

    first = runs[labels[0]]["engine"]
    trainable_bytes = sum(getattr(p, "ds_numel", p.numel()) * 4 for _, p in first.trainable_parameters())
    rows = [{
        "defense": label, "step_s": statistics.median(runs[label]["times"]), "times": runs[label]["times"],
        "state_bytes_per_rank": tensor_bytes(runs[label]["defense"].state_dict()),
        # only meaningful when this process ran this defense alone (--isolate)
        "peak_mem_bytes": memory.peak if len(labels) == 1 else None,
        "load_peak_bytes": load_peak if len(labels) == 1 else None,
    } for label in labels]
    return {
        "rank": first.rank, "model": args.model, "world_size": first.world_size, "micro_batch": args.mbs,
        "seq": args.seq, "lora": args.lora, "ds_config": args.ds_config, "trainable_bytes": trainable_bytes,
        "threads": torch.get_num_threads(), "rows": rows,
    }


def run_isolated(args: argparse.Namespace) -> dict[str, Any]:
    """One torchrun per defense; each child writes its rank-0 result as JSON."""
    labels = [n for n in args.defenses.split(",") if n]
    from bulwark.launch import with_cpu_rank_env

    env = dict(os.environ)
    if not torch.cuda.is_available():  # what the launcher gives CPU ranks, so that benchmarks match runs
        env = with_cpu_rank_env(env, args.nproc)
    rows, result = [], {}
    with tempfile.TemporaryDirectory() as tmp:
        for i, label in enumerate(labels):
            out = Path(tmp) / f"{i}.json"
            cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(args.nproc),
                   "--master_port", str(29500 + os.getpid() % 1000 + i), __file__,
                   "--model", args.model, "--defenses", label, "--mbs", str(args.mbs), "--seq", str(args.seq),
                   "--steps", str(args.steps), "--rounds", str(args.rounds), "--ds-config", args.ds_config,
                   "--out", str(out)] + (["--lora"] if args.lora else [])
            print(f"[{label}] {' '.join(cmd[3:])}", flush=True)
            subprocess.run(cmd, env=env, check=True, stdout=subprocess.DEVNULL)
            child = json.loads(out.read_text())
            rows.extend(child["rows"])
            result = child
    result["rows"] = rows
    result["isolated"] = True
    return result


def print_table(result: dict[str, Any]) -> None:
    rows = result["rows"]
    world, trainable = result["world_size"], result["trainable_bytes"]
    base = next((r["step_s"] for r in rows if r["defense"] == "sft"), rows[0]["step_s"])
    base_name = "sft" if any(r["defense"] == "sft" for r in rows) else rows[0]["defense"]
    mode = "one process per defense" if result.get("isolated") else "round-robin in one process"
    print(f"\nmodel {result['model']}, world size {world}, micro batch {result['micro_batch']} x {result['seq']} "
          f"tokens, {result['ds_config']}, {result['threads']} threads per rank, {mode}, trainable "
          f"{trainable / 2**20:.1f} MiB ({trainable / world / 2**20:.1f} MiB per rank)")
    print(f"| defense | s/step (median) | ratio vs {base_name} | pass floor | target | state bytes per rank "
          "| peak memory per rank (MiB) | load peak (MiB) |")
    print("|---|---|---|---|---|---|---|---|")
    for row in rows:
        name = parse_label(row["defense"])[0]
        target = TARGET.get(name)
        ratio = row["step_s"] / base
        judged = target is not None and base_name == "sft"  # targets are ratios to SFT
        verdict = "" if not judged else (" (met)" if ratio <= target else " (not met)")
        peak = "-" if row.get("peak_mem_bytes") is None else f"{row['peak_mem_bytes'] / 2**20:,.0f}"
        load = "-" if row.get("load_peak_bytes") is None else f"{row['load_peak_bytes'] / 2**20:,.0f}"
        print(f"| {row['defense']} | {row['step_s']:.3f} | {ratio:.2f}{verdict} | {PASS_FLOOR.get(name, '?')} | "
              f"{'-' if target is None else f'<= {target}'} | {row['state_bytes_per_rank']:,} | {peak} | {load} |")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="tiny")
    parser.add_argument("--defenses", default="sft,lisa")
    parser.add_argument("--mbs", type=int, default=4)
    parser.add_argument("--seq", type=int, default=64)
    parser.add_argument("--steps", type=int, default=4, help="timed steps per defense per round")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--ds-config", default="zero3")
    parser.add_argument("--lora", action="store_true")
    parser.add_argument("--isolate", action="store_true", help="one torchrun per defense: peak memory per defense")
    parser.add_argument("--nproc", type=int, default=1, help="ranks per torchrun with --isolate")
    parser.add_argument("--out", default="")
    args = parser.parse_args()

    if args.isolate:
        result = run_isolated(args)
    else:
        result = run_in_process(args)
        if result["rank"] != 0:
            return
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=1))
    print_table(result)


if __name__ == "__main__":
    from bulwark.engine.dist import exit_after_success

    main()
    exit_after_success()
