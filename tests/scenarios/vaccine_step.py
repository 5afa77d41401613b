"""Run under torchrun: Vaccine / vaccine-random / T-Vaccine on a tiny Llama with SGD, several cases in turn.

argv: out_dir cases_json. Each case (a JSON object) names: name, model_dir, defense, config, lora,
grad_accum, mbs, steps, ragged, snapshots. One process start serves all cases (each builds its own
engine), which keeps the multi-process tests fast.

Every rank writes `out_dir/<name>.rank{r}.json`: per step its micro-batches, the harmful batch a probe
used, the squared norm of its own perturbation per micro-batch, the defense's metrics and state.
Rank 0 writes `out_dir/<name>.states.pt`: the full weights before the first step and after each step
(after the last one only, unless `snapshots`).
"""

import json
import sys
from pathlib import Path
from typing import Any

import torch
from synthetic import random_rows

from bulwark.config import LoraConfig, TrainConfig
from bulwark.data.collate import pad_collate
from bulwark.defenses import build_defense
from bulwark.engine import Engine, exit_after_success
from bulwark.models import apply_lora, load_model
from bulwark.recipes.step import StepObserver, train_step

LR = 0.5


def rows_for(seed: int, index: int, rank: int, count: int, vocab: int, ragged: bool) -> list[dict]:
    return random_rows(seed * 1_000_003 + 1000 * index + rank, count, vocab, ragged)


class RowStream:
    """Micro-batch k is part `k % grad_accum` of the rows of step `k // grad_accum`: a case with
    grad_accum 1 and a doubled micro-batch sees exactly the rows of a grad_accum 2 case."""

    def __init__(self, seed: int, rank: int, mbs: int, grad_accum: int, vocab: int, ragged: bool) -> None:
        self.seed, self.rank, self.mbs, self.grad_accum = seed, rank, mbs, grad_accum
        self.vocab, self.ragged, self.count = vocab, ragged, 0
        self.served: list[dict] = []

    def next_batch(self) -> dict[str, torch.Tensor]:
        step, part = divmod(self.count, self.grad_accum)
        rows = rows_for(self.seed, step, self.rank, self.mbs * self.grad_accum, self.vocab, self.ragged)
        batch = pad_collate(rows[part * self.mbs:(part + 1) * self.mbs], 0)
        self.count += 1
        self.served.append({k: v.tolist() for k, v in batch.items()})
        return batch

    def state_dict(self) -> dict:
        return {"count": self.count}

    def load_state_dict(self, state: dict) -> None:
        self.count = state["count"]


def count_trace_invalidations() -> dict[str, int]:
    """Count ZeRO-3 prefetch-trace invalidations (each one means on-demand, per-module fetching)."""
    from deepspeed.runtime.zero.partitioned_param_coordinator import (
        PartitionedParameterCoordinator as Coordinator,
    )

    counter = {"n": 0}
    original = Coordinator._invalidate_trace

    def counting(self: Coordinator) -> None:
        counter["n"] += 1
        original(self)

    Coordinator._invalidate_trace = counting
    return counter


TRACE = count_trace_invalidations()


def run_case(case: dict, out_dir: Path) -> None:
    lora = bool(case["lora"])

    def build() -> torch.nn.Module:
        model = load_model(case["model_dir"], "fp32")
        return apply_lora(model, LoraConfig(enabled=True)) if lora else model

    train = TrainConfig(steps=case["steps"], micro_batch_size=case["mbs"], grad_accum=case["grad_accum"], lr=LR,
                        optimizer="sgd", max_grad_norm=0.0)
    engine = Engine(build, train, "zero3", "fp32", train.steps)
    defense = build_defense({"name": case["defense"], **case["config"]}, "align", train.steps)
    defense.attach(engine)
    engine.add_pre_step_hook(defense.before_step)
    vocab = engine.module.config.vocab_size
    streams = {
        "main": RowStream(1, engine.rank, case["mbs"], case["grad_accum"], vocab, case["ragged"]),
        "harmful": RowStream(2, engine.rank, case["mbs"], 1, vocab, case["ragged"]),
    }
    states = [engine.full_state_dict()]
    TRACE["n"] = 0
    log = []
    for step in range(train.steps):
        probes_before = len(streams["harmful"].served)
        seen = Perturbations(defense)
        train_step(engine, defense, streams, step, train.grad_accum, seen)
        micro, e_sq = seen.micro, seen.e_sq
        state = defense.state_dict()
        log.append({
            "step": step + 1, "batches": micro, "e_sq": e_sq, "metrics": defense.metrics(),
            "harmful": streams["harmful"].served[probes_before:],
            "norms": state["norms"].tolist() if state.get("norms") is not None else None,
        })
        if case["snapshots"] or step + 1 == train.steps:
            states.append(engine.full_state_dict())
    result = {"rank": engine.rank, "world_size": engine.world_size, "log": log, "trace_invalidations": TRACE["n"]}
    if hasattr(defense, "frozen_numel"):
        result["frozen_numel"] = defense.frozen_numel
    (out_dir / f"{case['name']}.rank{engine.rank}.json").write_text(json.dumps(result))
    if engine.rank == 0:
        torch.save(states, out_dir / f"{case['name']}.states.pt")


class Perturbations(StepObserver):
    """Each micro-batch as the loss saw it, and ||e||² of the perturbations its loss applied."""

    def __init__(self, defense: Any) -> None:
        self.defense, self.micro, self.e_sq = defense, [], []

    def before_loss(self, batch: dict[str, torch.Tensor]) -> None:
        self.micro.append({k: v.tolist() for k, v in batch.items()})

    def after_loss(self, batch: dict[str, torch.Tensor], loss: torch.Tensor) -> None:
        self.e_sq.append(sum(float(e.double().pow(2).sum()) for e in self.defense.hooks.offsets.values()))


def main() -> None:
    # torchrun sets OMP_NUM_THREADS=1 only for nproc > 1; a single process spinning 2 OpenMP threads on a
    # shared 2-core machine runs these tiny steps 10-50x slower
    torch.set_num_threads(1)
    out_dir = Path(sys.argv[1])
    for case in json.loads(Path(sys.argv[2]).read_text()):
        run_case(case, out_dir)


if __name__ == "__main__":
    main()
    exit_after_success()
