"""Run under torchrun: T-Vaccine (LoRA, freeze=lora) with AdamW and weight decay, one engine per ZeRO config.

argv: out_dir model_dir steps ds_config... Every step redraws the layers (resample_every 1), so layers
trained at one step are frozen at a later one while their AdamW moments are non-zero.

Per config, every rank writes `out_dir/<ds_config>.rank{r}.pt`: per step the drawn layers, the lr, and
per local shard its fp32 weights, gradient and optimizer state just before the inner optimizer step,
its weights and state after `engine.step()`, and the (start, length) ranges of the elements that belong
to the LoRA adapters of the layers NOT drawn (found by parameter name and `engine.shard_slice`). Rank 0
also writes `<ds_config>.states.pt`: the full weights before the first step and after each step.
"""

import sys
from pathlib import Path

import torch
from synthetic import SyntheticStream

from bulwark.config import LoraConfig, TrainConfig
from bulwark.defenses import build_defense
from bulwark.engine import Engine, exit_after_success
from bulwark.models import apply_lora, load_model
from bulwark.recipes.step import StepObserver, train_step

LR, WEIGHT_DECAY = 0.01, 0.1
CONFIG = {"n_layers": 2, "resample_every": 1, "probe_every": 2, "seed": 3}


def clone_state(state: dict) -> dict:
    return {k: v.detach().clone() if torch.is_tensor(v) else v for k, v in state.items()}


def frozen_ranges(engine: Engine, selected: list[int], n_layers: int) -> dict[int, list[tuple[int, int]]]:
    ranges: dict[int, list[tuple[int, int]]] = {}
    unselected = [f"layers.{i}." for i in range(n_layers) if i not in selected]
    for name, p in engine.trainable_parameters():
        if "lora_" in name and any(marker in name for marker in unselected):
            where = engine.shard_slice(p)
            if where is not None and where[2] > 0:
                ranges.setdefault(where[0], []).append(where[1:])
    return ranges


class LearningRate(StepObserver):
    """The lr the coming optimizer step uses (the scheduler advances after it)."""

    def __init__(self, engine: Engine) -> None:
        self.engine, self.lr = engine, float("nan")

    def after_loss(self, batch: dict[str, torch.Tensor], loss: torch.Tensor) -> None:
        self.lr = self.engine.lr()


def run(model_dir: str, ds_config: str, steps: int, out_dir: Path) -> None:
    def build() -> torch.nn.Module:
        return apply_lora(load_model(model_dir, "fp32"), LoraConfig(enabled=True))

    train = TrainConfig(steps=steps, micro_batch_size=2, grad_accum=1, lr=LR, optimizer="adamw",
                        weight_decay=WEIGHT_DECAY, max_grad_norm=0.0)
    engine = Engine(build, train, ds_config, "fp32", steps)
    defense = build_defense({"name": "t-vaccine", **CONFIG}, "align", steps)
    defense.attach(engine)
    engine.add_pre_step_hook(defense.before_step)
    before: dict[int, dict] = {}

    def capture(shards: list[tuple[int, torch.Tensor]]) -> None:
        for i, shard in shards:
            before[i] = {"weight": shard.detach().clone(), "grad": shard.grad.detach().clone(),
                         "state": clone_state(engine.optimizer_state(shard))}

    engine.add_pre_step_hook(capture)
    vocab = engine.module.config.vocab_size
    streams = {"main": SyntheticStream(1, engine.rank, 2, vocab, True),
               "harmful": SyntheticStream(2, engine.rank, 2, vocab, True)}
    n_layers = len(defense.frozen_numel)
    states = [engine.full_state_dict()]
    log = []
    for step in range(steps):
        before.clear()
        seen = LearningRate(engine)
        train_step(engine, defense, streams, step, train.grad_accum, seen)
        lr = seen.lr
        selected = list(defense.metrics()["tvaccine_layers"])
        shards = engine.local_shards()
        log.append({
            "selected": selected, "lr": lr, "before": dict(before),
            "after": {i: {"weight": s.detach().clone(), "state": clone_state(engine.optimizer_state(s))}
                      for i, s in enumerate(shards)},
            "frozen": frozen_ranges(engine, selected, n_layers),
        })
        states.append(engine.full_state_dict())
    torch.save({"log": log, "world_size": engine.world_size}, out_dir / f"{ds_config}.rank{engine.rank}.pt")
    if engine.rank == 0:
        torch.save(states, out_dir / f"{ds_config}.states.pt")


def main() -> None:
    torch.set_num_threads(1)  # see vaccine_step.py: one thread is far faster on a shared 2-core machine
    out_dir, model_dir, steps = Path(sys.argv[1]), sys.argv[2], int(sys.argv[3])
    for ds_config in sys.argv[4:]:
        run(model_dir, ds_config, steps, out_dir)


if __name__ == "__main__":
    main()
    exit_after_success()
