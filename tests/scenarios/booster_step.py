"""Run under torchrun: Booster on a tiny Llama with SGD; writes what the test needs to redo it in plain PyTorch.

argv: model_dir out ds_config lora grad_accum micro_batch steps ragged config_json
(config_json may name the defense: {"name": "booster+vaccine", ...}; default booster)

Every rank writes `out.rank{r}.json`: per step the refusal and harmful micro-batches it used, the
defense's metrics, whether the weights the forward reads (local partitions, fp32 master shard and
any persistent full parameters) were bit for bit the same after the harmful phase as before it, and
how far the perturbation moved them inside the phase; rank 0 also writes `out.before.pt` /
`out.after.pt` (full weights before and after the run).
"""

import json
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import torch
from synthetic import SyntheticStream

from bulwark.config import LoraConfig, TrainConfig
from bulwark.defenses import REGISTRY
from bulwark.engine import Engine, exit_after_success
from bulwark.models import apply_lora, load_model
from bulwark.recipes.step import StepObserver, train_step


def snapshot(engine: Engine) -> list[torch.Tensor]:
    """Everything a forward can read of the trainable weights on this rank, plus the fp32 master."""
    zero = engine.ds.optimizer
    tensors = [f.detach().clone() for f in zero.fp16_partitioned_groups_flat]
    tensors += [s.detach().clone() for s in engine.local_shards()]
    tensors += [p.data.detach().clone() for p in zero.persistent_parameters]
    return tensors


class RestoredAcrossLoss(StepObserver):
    """Whether every micro-batch's loss (the harmful phase included) left the weights bit for bit as it found them."""

    def __init__(self, engine: Engine) -> None:
        self.engine, self.restored, self.before = engine, True, []

    def before_loss(self, batch: dict[str, torch.Tensor]) -> None:
        self.before = snapshot(self.engine)

    def after_loss(self, batch: dict[str, torch.Tensor], loss: torch.Tensor) -> None:
        self.restored &= all(torch.equal(a, b) for a, b in zip(self.before, snapshot(self.engine), strict=True))


def main() -> None:
    model_dir, out, ds_config, lora, grad_accum, mbs, steps, ragged, config = sys.argv[1:10]
    lora, ragged = lora == "1", ragged == "1"
    grad_accum, mbs, steps, config = int(grad_accum), int(mbs), int(steps), json.loads(config)
    train = TrainConfig(steps=steps, micro_batch_size=mbs, grad_accum=grad_accum, lr=0.5, optimizer="sgd",
                        max_grad_norm=0.0)

    def build() -> torch.nn.Module:
        model = load_model(model_dir, "fp32")
        return apply_lora(model, LoraConfig(enabled=True)) if lora else model

    engine = Engine(build, train, ds_config, "fp32", steps)
    cls = REGISTRY[config.pop("name", "booster")]
    booster = cls(cls.Config(**config), steps)
    booster.attach(engine)
    engine.add_pre_step_hook(booster.before_step)
    state = engine.full_state_dict()
    if engine.rank == 0:
        torch.save(state, f"{out}.before.pt")

    moved: list[float] = []
    plain_perturbed = engine.perturbed_weights

    @contextmanager
    def watched(deltas: list[torch.Tensor]):
        before = snapshot(engine)
        with plain_perturbed(deltas):
            inside = snapshot(engine)
            moved.append(max(float((a - b).abs().max()) if a.numel() else 0.0 for a, b in zip(inside, before, strict=True)))
            yield

    engine.perturbed_weights = watched  # type: ignore[method-assign]
    vocab = engine.module.config.vocab_size
    streams = {"main": SyntheticStream(0, engine.rank, mbs, vocab, ragged),
               "harmful": SyntheticStream(500_000, engine.rank, mbs, vocab, ragged)}
    log, times = [], []
    for step in range(steps):
        t0 = time.perf_counter()
        n_main, n_harm = len(streams["main"].handed), len(streams["harmful"].handed)
        watch = RestoredAcrossLoss(engine)
        train_step(engine, booster, streams, step, grad_accum, watch)
        restored = watch.restored
        times.append(time.perf_counter() - t0)
        log.append({"step": step + 1, "main": streams["main"].handed[n_main:],
                    "harmful": streams["harmful"].handed[n_harm:], "restored": restored,
                    "metrics": booster.metrics()})
    state = engine.full_state_dict()
    if engine.rank == 0:
        torch.save(state, f"{out}.after.pt")
    result = {"rank": engine.rank, "log": log, "moved": moved, "step_s": times,
              "persistent": len(engine.ds.optimizer.persistent_parameters)}
    Path(f"{out}.rank{engine.rank}.json").write_text(json.dumps(result))


if __name__ == "__main__":
    main()
    exit_after_success()
