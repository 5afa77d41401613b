"""Run under torchrun: Lisa on a tiny Llama under ZeRO-3 (or argv[7], e.g. zero2) with SGD, checking
every rank's shard update.

Writes one JSON per rank: per step the state, the max error of w' = w - lr (g + rho (w - anchor)) on
this rank's shard, stream positions, anchor sizes, and the live loss on a fixed batch after export.
"""

import json
import sys
from pathlib import Path
from typing import Any

import torch

from bulwark.config import TrainConfig
from bulwark.data import DistributedStream
from bulwark.defenses.lisa import Lisa, LisaConfig
from bulwark.engine import Engine, exit_after_success
from bulwark.losses import model_loss
from bulwark.models import load_model, load_tokenizer
from bulwark.recipes.step import StepObserver, train_step


def features(n: int, seed: int, vocab: int) -> list[dict]:
    g = torch.Generator().manual_seed(seed)
    rows = []
    for _ in range(n):
        ids = torch.randint(3, vocab, (12,), generator=g).tolist()
        rows.append({"input_ids": ids, "labels": [-100] * 6 + ids[6:]})
    return rows


class ProximalStep(StepObserver):
    """After the optimizer stepped (before Lisa's after_step): the largest distance of a shard from
    w - lr * (g + rho * (w - anchor)), with w and g as the step's pre-hook saw them."""

    def __init__(self, engine: Any, seen: dict, anchors: list, lr: float, rho: float) -> None:
        self.engine, self.seen, self.anchors, self.lr, self.rho, self.err = engine, seen, anchors, lr, rho, 0.0

    def before_after_step(self) -> None:
        for i, shard in enumerate(self.engine.local_shards()):
            w, g = self.seen[i]
            expected = w - self.lr * (g + self.rho * (w - self.anchors[i]))
            self.err = max(self.err, (shard.detach() - expected).abs().max().item())


def main() -> None:
    model_dir, out, grad_accum, align_steps, finetune_steps, steps = sys.argv[1:7]
    ds_config = sys.argv[7] if len(sys.argv) > 7 else "zero3"
    grad_accum, steps = int(grad_accum), int(steps)
    lr, rho = 0.5, 0.5
    train = TrainConfig(steps=steps, micro_batch_size=2, grad_accum=grad_accum, lr=lr, optimizer="sgd",
                        max_grad_norm=0.0)
    engine = Engine(lambda: load_model(model_dir, "fp32"), train, ds_config, "fp32", steps)
    lisa = Lisa(LisaConfig(align_steps=int(align_steps), finetune_steps=int(finetune_steps), rho=rho,
                           proximal_warmup=0.0), steps)
    lisa.attach(engine)
    seen: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
    engine.add_pre_step_hook(lambda shards: seen.update({i: (s.detach().clone(), s.grad.clone()) for i, s in shards}))
    engine.add_pre_step_hook(lisa.before_step)
    tok = load_tokenizer(model_dir)
    vocab = engine.module.config.vocab_size
    streams = {
        "main": DistributedStream(features(40, 1, vocab), 2, engine.rank, engine.world_size, 7, tok.pad_token_id),
        "align": DistributedStream(features(40, 2, vocab), 2, engine.rank, engine.world_size, 8, tok.pad_token_id),
    }
    log = []
    for step in range(steps):
        anchors = [a.clone() for a in lisa.anchors]
        state = lisa.state
        check = ProximalStep(engine, seen, anchors, lr, rho)
        train_step(engine, lisa, streams, step, grad_accum, check)
        err = check.err
        log.append({"step": step + 1, "state": state, "max_err": err,
                    "streams": {k: s.state_dict() for k, s in streams.items()}})
    total = sum(engine.full_numel(p) for _, p in engine.trainable_parameters())
    fixed = engine.to_device(streams["main"].next_batch())
    with torch.no_grad():
        live = model_loss(engine.module, fixed).item()
    export_dir = Path(out).parent / "export"
    engine.export(export_dir, tok)
    result = {
        "rank": engine.rank, "world_size": engine.world_size, "log": log,
        "anchor_numel": sum(a.numel() for a in lisa.anchors), "trainable_numel": total,
        "anchor_bytes": sum(a.numel() * a.element_size() for a in lisa.anchors),
        "live_loss": live, "fixed_batch": {k: v.tolist() for k, v in fixed.items()},
    }
    Path(f"{out}.rank{engine.rank}.json").write_text(json.dumps(result))


if __name__ == "__main__":
    main()
    exit_after_success()
