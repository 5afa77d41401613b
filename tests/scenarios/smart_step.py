"""Run under torchrun: SMART on a tiny Llama with SGD; writes what the test needs to redo it in plain PyTorch.

argv: model_dir out ds_config lora grad_accum micro_batch steps ragged lr config_json [resume_at]

Every rank writes `out.rank{r}.json` (its micro-batches per step, EMA sizes, step times); rank 0 also
writes `out.before.pt` / `out.after.pt` (full weights before and after). With resume_at > 0 a second
engine loads the checkpoint written after step resume_at, runs the remaining steps, and the JSON
records whether its EMA, noise generator and weights equal the first engine's bit for bit.
"""

import json
import sys
import time
from pathlib import Path

import torch
from synthetic import random_rows

from bulwark.config import LoraConfig, TrainConfig
from bulwark.data.collate import pad_collate
from bulwark.defenses.smart import Smart, SmartConfig
from bulwark.engine import Engine, exit_after_success
from bulwark.models import apply_lora, load_model
from bulwark.recipes.step import train_step


def rows_for(step: int, micro: int, rank: int, count: int, vocab: int, ragged: bool) -> list[dict]:
    """Deterministic rows for (step, micro-batch, rank): a resumed engine regenerates the same ones."""
    return random_rows(1000 * step + 10 * micro + rank, count, vocab, ragged)


def build(model_dir: str, lora: bool):
    def make() -> torch.nn.Module:
        model = load_model(model_dir, "fp32")
        return apply_lora(model, LoraConfig(enabled=True)) if lora else model

    return make


def new_engine(model_dir: str, ds_config: str, lora: bool, train: TrainConfig, config: dict) -> tuple[Engine, Smart]:
    engine = Engine(build(model_dir, lora), train, ds_config, "fp32", train.steps)
    smart = Smart(SmartConfig(**config), train.steps)
    smart.attach(engine)
    engine.add_pre_step_hook(smart.before_step)
    return engine, smart


class StepRows:
    """The main stream: deterministic rows for (step, micro-batch, rank), drawn in step order, so a resumed
    engine that starts at step k draws the same rows as the run it resumes; keeps what it handed out."""

    def __init__(self, rank: int, mbs: int, vocab: int, ragged: bool, grad_accum: int, first_step: int) -> None:
        self.rank, self.mbs, self.vocab, self.ragged, self.grad_accum = rank, mbs, vocab, ragged, grad_accum
        self.drawn = first_step * grad_accum
        self.handed: list[dict] = []

    def next_batch(self) -> dict[str, torch.Tensor]:
        step, micro = divmod(self.drawn, self.grad_accum)
        self.drawn += 1
        batch = pad_collate(rows_for(step, micro, self.rank, self.mbs, self.vocab, self.ragged), 0)
        self.handed.append({k: v.tolist() for k, v in batch.items()})
        return batch


def run_steps(engine: Engine, smart: Smart, steps: range, grad_accum: int, mbs: int, ragged: bool,
              log: list | None = None) -> list[float]:
    """The steps through the loop's own step body (bulwark.recipes.step.train_step)."""
    rows = StepRows(engine.rank, mbs, engine.module.config.vocab_size, ragged, grad_accum, steps.start)
    times = []
    for step in steps:
        t0 = time.perf_counter()
        handed = len(rows.handed)
        train_step(engine, smart, {"main": rows}, step, grad_accum)
        times.append(time.perf_counter() - t0)
        if log is not None:
            log.append({"step": step + 1, "batches": rows.handed[handed:], "metrics": smart.metrics()})
    return times


def save_full(engine: Engine, path: str) -> None:
    state = engine.full_state_dict()
    if engine.rank == 0:
        torch.save(state, path)


def main() -> None:
    model_dir, out, ds_config, lora, grad_accum, mbs, steps, ragged, lr, config = sys.argv[1:11]
    resume_at = int(sys.argv[11]) if len(sys.argv) > 11 else 0
    lora, ragged = lora == "1", ragged == "1"
    grad_accum, mbs, steps, config = int(grad_accum), int(mbs), int(steps), json.loads(config)
    train = TrainConfig(steps=steps, micro_batch_size=mbs, grad_accum=grad_accum, lr=float(lr), optimizer="sgd",
                        max_grad_norm=0.0)
    engine, smart = new_engine(model_dir, ds_config, lora, train, config)
    save_full(engine, f"{out}.before.pt")
    log: list = []
    ckpt = Path(out).parent / "ckpt"
    if resume_at:
        run_steps(engine, smart, range(resume_at), grad_accum, mbs, ragged, log)
        engine.save_checkpoint(ckpt, resume_at, {}, {"defense": smart.state_dict()})
        run_steps(engine, smart, range(resume_at, steps), grad_accum, mbs, ragged, log)
    else:
        run_steps(engine, smart, range(steps), grad_accum, mbs, ragged, log)
    save_full(engine, f"{out}.after.pt")
    result = {
        "rank": engine.rank, "world_size": engine.world_size, "log": log,
        "ema_numel": sum(e.numel() for e in smart.ema),
        "trainable_numel": sum(engine.full_numel(p) for _, p in engine.trainable_parameters()),
    }
    if resume_at:
        straight_ema = [e.clone() for e in smart.ema]
        straight_gen = smart.generator.get_state()
        straight_weights = engine.full_state_dict()
        engine2, smart2 = new_engine(model_dir, ds_config, lora, train, config)
        _, per_rank = engine2.load_checkpoint(ckpt)
        smart2.load_state_dict(per_rank["defense"])
        result["loaded_steps_done"] = smart2.steps_done
        run_steps(engine2, smart2, range(resume_at, steps), grad_accum, mbs, ragged)
        result["resumed_ema_equal"] = all(torch.equal(a, b) for a, b in zip(straight_ema, smart2.ema, strict=True))
        result["resumed_generator_equal"] = torch.equal(straight_gen, smart2.generator.get_state())
        resumed_weights = engine2.full_state_dict()
        if engine.rank == 0:
            result["resumed_weights_equal"] = all(
                torch.equal(straight_weights[k], resumed_weights[k]) for k in straight_weights
            )
    Path(f"{out}.rank{engine.rank}.json").write_text(json.dumps(result))


if __name__ == "__main__":
    main()
    exit_after_success()
