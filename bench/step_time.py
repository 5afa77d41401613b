"""Step time of each defense relative to SFT, in the same run, plus per-rank defense state and memory.

    torchrun --nproc_per_node 2 bench/step_time.py --model tiny --defenses sft,lisa
    torchrun --nproc_per_node 1 bench/step_time.py --model embedded --defenses sft,lisa --seq 128 --mbs 4

Every defense trains the same model from the same weights on the same synthetic token batches
(micro batch x seq tokens, all labelled), through the real engine and hook loop. Defenses run
round-robin, `--rounds` times, so that machine noise (other jobs on a shared CPU) hits all of them
alike; the figure is the median step time over all timed steps. "state bytes" is what the defense
keeps per rank between steps (Lisa's anchors, SMART's EMA, ...): the target is trainable bytes /
world size. Prints a markdown table on rank 0 and writes it as JSON with --out.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path
from typing import Any

import torch


def tensor_bytes(obj: Any) -> int:
    if isinstance(obj, torch.Tensor):
        return obj.numel() * obj.element_size()
    if isinstance(obj, dict):
        return sum(tensor_bytes(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(tensor_bytes(v) for v in obj)
    return 0


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
    parser.add_argument("--out", default="")
    args = parser.parse_args()

    from bulwark import models
    from bulwark.config import LoraConfig, TrainConfig
    from bulwark.defenses import build_defense
    from bulwark.engine import Engine, peak_memory_bytes

    names = [n for n in args.defenses.split(",") if n]
    total_steps = args.rounds * (args.steps + 1)
    train = TrainConfig(steps=total_steps, micro_batch_size=args.mbs, lr=1e-5)
    lora = LoraConfig(enabled=args.lora)

    def build() -> torch.nn.Module:
        model = models.load_model(args.model, "fp32")
        return models.apply_lora(model, lora) if args.lora else model

    runs = {}
    for name in names:
        engine = Engine(build, train, args.ds_config, "fp32", total_steps)
        defense = build_defense({"name": name}, "", total_steps)
        defense.attach(engine)
        engine.add_pre_step_hook(defense.before_step)
        vocab = engine.module.config.vocab_size
        streams = {s: SyntheticStream(vocab, args.mbs, args.seq, seed=i + 100 * engine.rank)
                   for i, s in enumerate(("main", "align", "harmful"))}
        runs[name] = {"engine": engine, "defense": defense, "streams": streams, "times": [], "step": 0}

    for _ in range(args.rounds):
        for name in names:
            run = runs[name]
            engine, defense = run["engine"], run["defense"]
            for i in range(args.steps + 1):  # the first step of a round warms caches up
                t0 = time.perf_counter()
                batch = engine.to_device(defense.next_batch(run["streams"], run["step"]))
                loss = defense.loss(engine, batch)
                engine.backward(loss)
                engine.step()
                run["step"] += 1
                defense.after_step(engine, run["step"])
                if i:
                    run["times"].append(time.perf_counter() - t0)

    rank = runs[names[0]]["engine"].rank
    world = runs[names[0]]["engine"].world_size
    base = statistics.median(runs[names[0]]["times"])
    trainable_bytes = sum(
        getattr(p, "ds_numel", p.numel()) * 4 for _, p in runs[names[0]]["engine"].trainable_parameters()
    )
    rows = []
    for name in names:
        median = statistics.median(runs[name]["times"])
        rows.append({
            "defense": name, "step_s": median, "ratio_vs_first": median / base,
            "state_bytes_per_rank": tensor_bytes(runs[name]["defense"].state_dict()),
        })
    result = {
        "model": args.model, "world_size": world, "micro_batch": args.mbs, "seq": args.seq, "lora": args.lora,
        "ds_config": args.ds_config, "trainable_bytes": trainable_bytes,
        "trainable_bytes_per_rank": trainable_bytes / world, "peak_mem_bytes": peak_memory_bytes(),
        "threads": torch.get_num_threads(), "rows": rows,
    }
    if rank == 0:
        print(f"\nmodel {args.model}, world size {world}, micro batch {args.mbs} x {args.seq} tokens, "
              f"{args.ds_config}, trainable {trainable_bytes / 2**20:.1f} MiB "
              f"({trainable_bytes / world / 2**20:.1f} MiB per rank)")
        print("| defense | s/step (median) | ratio vs " + names[0] + " | state bytes per rank |")
        print("|---|---|---|---|")
        for row in rows:
            print(f"| {row['defense']} | {row['step_s']:.3f} | {row['ratio_vs_first']:.2f} | "
                  f"{row['state_bytes_per_rank']:,} |")
        if args.out:
            Path(args.out).write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
