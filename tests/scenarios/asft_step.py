"""Run under torchrun: AsFT steps with SGD (exact), one engine per case, optionally resumed mid-run.

argv: out_dir aligned_dir base_dir ds_config steps lam case... where case is mode:grad_accum[:resume_at]
and mode is "full" (full fine-tuning), "lora" (a fresh adapter: B = 0) or "single" (an adapter that
starts non-zero, as model.lora.mode=single keeps training the alignment adapter).

Per case every rank writes `out_dir/<mode>.rank{r}.pt`: per step the micro-batches it trained on and the
defense's `asft_reg`; rank 0 also writes `<mode>.states.pt`, the full weights before the first step and
after each step. With resume_at > 0 a second engine and defense (attached before the checkpoint is
loaded, as the recipe does) continue from the checkpoint written after step resume_at, and rank 0 adds
`resumed` (its final weights) and `resumed_regs` to the states file.
"""

import sys
from pathlib import Path

import torch
from synthetic import SyntheticStream

from bulwark.config import LoraConfig, TrainConfig
from bulwark.defenses import build_defense
from bulwark.engine import Engine, exit_after_success
from bulwark.models import apply_lora, load_model
from bulwark.recipes.step import train_step

LR, MBS = 0.05, 2


def build(aligned_dir: str, mode: str):
    def make() -> torch.nn.Module:
        model = load_model(aligned_dir, "fp32")
        if mode == "full":
            return model
        model = apply_lora(model, LoraConfig(enabled=True, r=4, alpha=8))
        if mode == "single":  # a non-zero adapter at the start: ΔW is measured from it
            gen = torch.Generator().manual_seed(5)
            with torch.no_grad():
                for name, p in model.named_parameters():
                    if "lora_B" in name:
                        p.copy_(0.1 * torch.randn(p.shape, generator=gen))
        return model

    return make


def start(aligned_dir: str, base_dir: str, ds_config: str, mode: str, steps: int, grad_accum: int,
          lam: float) -> tuple[Engine, object, dict]:
    train = TrainConfig(steps=steps, micro_batch_size=MBS, grad_accum=grad_accum, lr=LR, optimizer="sgd",
                        weight_decay=0.0, max_grad_norm=0.0, checkpoint_every=0)
    engine = Engine(build(aligned_dir, mode), train, ds_config, "fp32", steps)
    defense = build_defense({"name": "asft", "base": base_dir, "lambda_reg": lam}, "finetune", steps)
    defense.attach(engine)
    engine.add_pre_step_hook(defense.before_step)
    vocab = engine.module.config.vocab_size
    streams = {"main": SyntheticStream(1, engine.rank, MBS, vocab, True)}
    return engine, defense, streams


def run_steps(engine: Engine, defense: object, streams: dict, steps: range, grad_accum: int,
              log: list, states: list | None) -> None:
    for step in steps:
        first = len(streams["main"].handed)
        train_step(engine, defense, streams, step, grad_accum)
        log.append({"batches": streams["main"].handed[first:], "reg": defense.metrics()["asft_reg"]})
        full = engine.full_state_dict()
        if states is not None and engine.rank == 0:
            states.append(full)


def run_case(out_dir: Path, aligned_dir: str, base_dir: str, ds_config: str, steps: int, lam: float,
             case: str) -> None:
    mode, grad_accum, *rest = case.split(":")
    grad_accum, resume_at = int(grad_accum), int(rest[0]) if rest else 0
    engine, defense, streams = start(aligned_dir, base_dir, ds_config, mode, steps, grad_accum, lam)
    states = [engine.full_state_dict()]
    log: list = []
    ckpt = out_dir / f"{mode}.ckpt"
    if resume_at:
        run_steps(engine, defense, streams, range(resume_at), grad_accum, log, states)
        engine.save_checkpoint(ckpt, resume_at, {"calls": streams["main"].calls},
                               {"defense": defense.state_dict()})
        run_steps(engine, defense, streams, range(resume_at, steps), grad_accum, log, states)
    else:
        run_steps(engine, defense, streams, range(steps), grad_accum, log, states)
    torch.save({"log": log, "world_size": engine.world_size, "grad_accum": grad_accum},
               out_dir / f"{mode}.rank{engine.rank}.pt")
    result = {"states": states}
    if resume_at:
        engine2, defense2, streams2 = start(aligned_dir, base_dir, ds_config, mode, steps, grad_accum, lam)
        client, per_rank = engine2.load_checkpoint(ckpt)
        defense2.load_state_dict(per_rank["defense"])
        streams2["main"].calls = client["calls"]
        log2: list = []
        run_steps(engine2, defense2, streams2, range(resume_at, steps), grad_accum, log2, None)
        result["resumed"] = engine2.full_state_dict()
        result["resumed_regs"] = [entry["reg"] for entry in log2]
    if engine.rank == 0:
        torch.save(result, out_dir / f"{mode}.states.pt")


def main() -> None:
    torch.set_num_threads(1)  # tiny tensors on a shared 2-core machine
    out_dir, aligned_dir, base_dir, ds_config = Path(sys.argv[1]), sys.argv[2], sys.argv[3], sys.argv[4]
    steps, lam = int(sys.argv[5]), float(sys.argv[6])
    for case in sys.argv[7:]:
        run_case(out_dir, aligned_dir, base_dir, ds_config, steps, lam, case)


if __name__ == "__main__":
    main()
    exit_after_success()
