"""Run under torchrun: refusal_ul on a tiny Llama with SGD; writes what the test needs to redo it in plain PyTorch.

argv: model_dir out ds_config steps config_json

Every rank writes `out.rank{r}.json` (its alignment and negative micro-batches per step); rank 0 also
writes `out.before.pt` / `out.after.pt` (full weights before and after).
"""

import json
import sys
from pathlib import Path

import torch
from synthetic import SyntheticStream

from bulwark.config import TrainConfig
from bulwark.defenses.refusal_ul import NEGATIVES, RefusalUL, RefusalULConfig
from bulwark.engine import Engine, exit_after_success
from bulwark.models import load_model
from bulwark.recipes.step import train_step


def main() -> None:
    model_dir, out, ds_config, steps, config = sys.argv[1:6]
    steps, config = int(steps), json.loads(config)
    train = TrainConfig(steps=steps, micro_batch_size=2, grad_accum=1, lr=0.5, optimizer="sgd", max_grad_norm=0.0)
    engine = Engine(lambda: load_model(model_dir, "fp32"), train, ds_config, "fp32", steps)
    defense = RefusalUL(RefusalULConfig(**config), steps)
    defense.attach(engine)
    state = engine.full_state_dict()
    if engine.rank == 0:
        torch.save(state, f"{out}.before.pt")
    vocab = engine.module.config.vocab_size
    streams = {"main": SyntheticStream(0, engine.rank, 2, vocab, True),
               NEGATIVES: SyntheticStream(700_000, engine.rank, 2, vocab, True)}
    log = []
    for step in range(steps):
        train_step(engine, defense, streams, step, 1)
        log.append({"main": streams["main"].handed[-1], "negatives": streams[NEGATIVES].handed[-1],
                    "metrics": defense.metrics()})
    state = engine.full_state_dict()
    if engine.rank == 0:
        torch.save(state, f"{out}.after.pt")
    Path(f"{out}.rank{engine.rank}.json").write_text(json.dumps({"rank": engine.rank, "log": log}))


if __name__ == "__main__":
    main()
    exit_after_success()
