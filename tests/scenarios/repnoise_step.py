"""Run under torchrun: RepNoise on a tiny Llama with SGD; writes what the test needs to redo it in plain PyTorch.

argv: model_dir out ds_config lora grad_accum micro_batch steps ragged config_json [resume_at]

Every rank writes `out.rank{r}.json` (its refusal and harmful micro-batches per step, metrics, step
times); rank 0 also writes `out.before.pt` / `out.after.pt` (full weights before and after). With
resume_at > 0 a second engine loads the checkpoint written after step resume_at, runs the remaining
steps, and the JSON records whether its noise generator and weights equal the first engine's.
"""

import json
import sys
import time
from pathlib import Path

import torch
from synthetic import SyntheticStream

from bulwark.config import LoraConfig, TrainConfig
from bulwark.defenses.repnoise import RepNoise, RepNoiseConfig
from bulwark.engine import Engine, exit_after_success
from bulwark.models import apply_lora, load_model
from bulwark.recipes.step import train_step


def build(model_dir: str, lora: bool):
    def make() -> torch.nn.Module:
        model = load_model(model_dir, "fp32")
        return apply_lora(model, LoraConfig(enabled=True)) if lora else model

    return make


def new_engine(model_dir: str, ds_config: str, lora: bool, train: TrainConfig, config: dict):
    engine = Engine(build(model_dir, lora), train, ds_config, "fp32", train.steps)
    defense = RepNoise(RepNoiseConfig(**config), train.steps)
    defense.attach(engine)
    engine.add_pre_step_hook(defense.before_step)
    return engine, defense


def run_steps(engine: Engine, defense: RepNoise, streams: dict, steps: range, grad_accum: int,
              log: list | None = None) -> list[float]:
    times = []
    for step in steps:
        t0 = time.perf_counter()
        n_main, n_harm = len(streams["main"].handed), len(streams["harmful"].handed)
        train_step(engine, defense, streams, step, grad_accum)  # the loop's own step body
        times.append(time.perf_counter() - t0)
        if log is not None:
            log.append({"step": step + 1, "main": streams["main"].handed[n_main:],
                        "harmful": streams["harmful"].handed[n_harm:], "metrics": defense.metrics()})
    return times


def make_streams(engine: Engine, mbs: int, ragged: bool) -> dict:
    vocab = engine.module.config.vocab_size
    return {"main": SyntheticStream(0, engine.rank, mbs, vocab, ragged),
            "harmful": SyntheticStream(500_000, engine.rank, mbs, vocab, ragged)}


def main() -> None:
    model_dir, out, ds_config, lora, grad_accum, mbs, steps, ragged, config = sys.argv[1:10]
    resume_at = int(sys.argv[10]) if len(sys.argv) > 10 else 0
    lora, ragged = lora == "1", ragged == "1"
    grad_accum, mbs, steps, config = int(grad_accum), int(mbs), int(steps), json.loads(config)
    train = TrainConfig(steps=steps, micro_batch_size=mbs, grad_accum=grad_accum, lr=0.5, optimizer="sgd",
                        max_grad_norm=0.0)
    engine, defense = new_engine(model_dir, ds_config, lora, train, config)
    state = engine.full_state_dict()
    if engine.rank == 0:
        torch.save(state, f"{out}.before.pt")
    streams = make_streams(engine, mbs, ragged)
    log: list = []
    ckpt = Path(out).parent / "ckpt"
    if resume_at:
        run_steps(engine, defense, streams, range(resume_at), grad_accum, log)
        engine.save_checkpoint(ckpt, resume_at, {"streams": {k: s.state_dict() for k, s in streams.items()}},
                               {"defense": defense.state_dict()})
        run_steps(engine, defense, streams, range(resume_at, steps), grad_accum, log)
    else:
        run_steps(engine, defense, streams, range(steps), grad_accum, log)
    state = engine.full_state_dict()
    if engine.rank == 0:
        torch.save(state, f"{out}.after.pt")
    result = {"rank": engine.rank, "log": log}
    if resume_at:
        engine2, defense2 = new_engine(model_dir, ds_config, lora, train, config)
        client, per_rank = engine2.load_checkpoint(ckpt)
        defense2.load_state_dict(per_rank["defense"])
        streams2 = make_streams(engine2, mbs, ragged)
        for name, s in client["streams"].items():
            streams2[name].load_state_dict(s)
        run_steps(engine2, defense2, streams2, range(resume_at, steps), grad_accum)
        result["resumed_generator_equal"] = torch.equal(defense.generator.get_state(), defense2.generator.get_state())
        resumed = engine2.full_state_dict()
        if engine.rank == 0:
            result["resumed_weights_equal"] = all(torch.equal(state[k], resumed[k]) for k in state)
    Path(f"{out}.rank{engine.rank}.json").write_text(json.dumps(result))


if __name__ == "__main__":
    main()
    exit_after_success()
