"""Mix (data-mixing baseline): the step schedule, resume, and real 2-rank ZeRO-3 runs against plain PyTorch.

The update of a mix step is plain SFT on the chosen stream's micro-batches, so the plain computation
rebuilds the loop's two distributed streams (user rows and alignment rows, seeded as the loop seeds
them), follows the schedule floor((s + 1) r) > floor(s r), and takes one SGD step on the mean of the
per-rank, per-micro-batch losses (what DeepSpeed averages).
"""

from __future__ import annotations

import json
import math
from fractions import Fraction
from pathlib import Path

import pytest
import torch

from bulwark.config import load_config
from bulwark.data import DistributedStream
from bulwark.defenses import build_defense
from bulwark.defenses.mix import Mix, MixConfig
from bulwark.errors import BulwarkInputError
from bulwark.losses import model_loss
from bulwark.recipes import finetune
from bulwark.recipes.loop import tokenize_streams
from tests.conftest import bulwark_cli, check

# ---- the schedule, in process ----------------------------------------------------------------------


class CountingStream:
    def __init__(self, name: str) -> None:
        self.name, self.calls = name, 0

    def next_batch(self) -> dict[str, torch.Tensor]:
        self.calls += 1
        return {"from": torch.tensor([0 if self.name == "main" else 1])}


def choices(defense: Mix, steps: range, grad_accum: int = 1) -> list[str]:
    streams = {"main": CountingStream("main"), "align": CountingStream("align")}
    out = []
    for step in steps:
        picked = {int(defense.next_batch(streams, step)["from"]) for _ in range(grad_accum)}
        assert len(picked) == 1, "the micro-batches of one optimizer step came from different streams"
        out.append("main" if picked == {0} else "align")
        defense.after_step(None, step + 1)
    return out


@pytest.mark.parametrize("ratio", [0.0, 0.05, 0.1, 0.25, 0.3, 0.5, 0.7, 1.0])
def test_align_share_is_exact_after_every_step(ratio: float) -> None:
    picked = choices(Mix(MixConfig(align_ratio=ratio), 200), range(200))
    exact = Fraction(str(ratio))
    for n in range(1, 201):
        assert picked[:n].count("align") == math.floor(n * exact), (ratio, n)


def test_default_ratio_spreads_alignment_steps_evenly() -> None:
    picked = choices(build_defense({"name": "mix"}, "finetune", 50), range(50), grad_accum=2)
    assert [i for i, s in enumerate(picked) if s == "align"] == [9, 19, 29, 39, 49]


def test_resume_reproduces_the_choices() -> None:
    straight = Mix(MixConfig(align_ratio=0.3), 20)
    first = choices(straight, range(20))
    resumed = Mix(MixConfig(align_ratio=0.3), 20)  # a new process: state from the checkpoint, then step 7 on
    resumed.load_state_dict(straight.state_dict())
    assert choices(resumed, range(7, 20)) == first[7:]
    assert resumed.metrics()["mix_align_share"] == pytest.approx(first.count("align") / 20)


def test_registered_for_finetune_with_ratio_checked() -> None:
    mix = build_defense({"name": "mix"}, "finetune", 10)
    assert isinstance(mix, Mix) and mix.config == MixConfig(align_ratio=0.1)
    assert Mix.side_streams == ("align",)
    with pytest.raises(BulwarkInputError, match="finetune"):
        build_defense({"name": "mix"}, "align", 10)
    with pytest.raises(BulwarkInputError, match="align_ratio"):
        build_defense({"name": "mix", "align_ratio": 1.5}, "finetune", 10)


# ---- real runs: 2-rank ZeRO-3 through the CLI --------------------------------------------------------


def overrides(model_dir: Path, out: Path, **extra: object) -> list[str]:
    values = {
        "out_dir": out, "model.name": model_dir, "data.n": 16, "data.p": 0.25, "data.max_length": 48,
        "data.align_n": 16, "data.template": "alpaca", "train.steps": 3, "train.micro_batch_size": 2,
        "train.optimizer": "sgd", "train.lr": 0.5, "train.max_grad_norm": 0.0, "launch.nproc": 2,
        "defense.name": "mix", "defense.align_ratio": 0.5,
    }
    values.update(extra)
    return [f"{k}={v}" for k, v in values.items()]


def plain_mix(args: list[str], data_dir: Path, lora: bool) -> tuple[dict[str, torch.Tensor], list[float]]:
    """SGD on the loop's own batches in one process; returns the weights (full FT) and per-step losses."""
    from bulwark.models import load_model, load_tokenizer

    cfg = load_config(None, args, "finetune")
    cfg.data.dir = str(data_dir)
    defense = build_defense(cfg.defense, "finetune", cfg.train.steps)
    tokenizer = load_tokenizer(cfg.model.name)
    features = tokenize_streams(finetune.build_plan(cfg, defense), tokenizer, cfg)
    assert list(features) == ["main", "align"]  # the loop seeds stream i with data.seed + i
    streams = {
        name: [DistributedStream(rows, cfg.train.micro_batch_size, r, 2, cfg.data.seed + i, tokenizer.pad_token_id)
               for r in range(2)]
        for i, (name, rows) in enumerate(features.items())
    }
    model = load_model(cfg.model.name, "fp32")  # with LoRA only the first step's loss is compared (B = 0)
    losses = []
    ratio = Fraction(str(cfg.defense["align_ratio"]))
    for step in range(cfg.train.steps):
        name = "align" if math.floor((step + 1) * ratio) > math.floor(step * ratio) else "main"
        micro = [s.next_batch() for _ in range(cfg.train.grad_accum) for s in streams[name]]
        loss = sum(model_loss(model, b) for b in micro) / len(micro)
        losses.append(loss.item())
        if not lora:
            loss.backward()
            with torch.no_grad():
                for p in model.parameters():
                    p -= cfg.train.lr * p.grad
                    p.grad = None
    return {k: v.detach() for k, v in model.state_dict().items()}, losses


@pytest.mark.parametrize(("lora", "grad_accum"), [(False, 2), (True, 1)], ids=["full-accum2", "lora"])
def test_two_ranks_equal_plain_pytorch(tmp_path: Path, tiny_model_dir: Path, data_dir: Path, lora: bool,
                                       grad_accum: int) -> None:
    extra = {"train.grad_accum": grad_accum}
    if lora:
        extra.update({"model.lora.enabled": "true", "model.lora.r": 4})
    args = overrides(tiny_model_dir, tmp_path / "run", **extra)
    check(bulwark_cli(["finetune", *args], data_dir))
    rows = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["mix_stream"] for r in rows] == ["main", "align", "main"]
    expected, losses = plain_mix(args, data_dir, lora)
    if lora:  # the adapter starts as the identity (B = 0): step 1's loss is the base model's on its rows
        assert abs(rows[0]["loss"] - losses[0]) < 1e-5
        return
    assert max(abs(r["loss"] - x) for r, x in zip(rows, losses, strict=True)) < 1e-5
    from transformers import AutoModelForCausalLM

    exported = AutoModelForCausalLM.from_pretrained(tmp_path / "run" / "model", dtype=torch.float32).state_dict()
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).state_dict()
    for name, value in expected.items():
        torch.testing.assert_close(exported[name], value, atol=1e-5, rtol=0, msg=name)
    assert max((expected[k] - base[k]).abs().max().item() for k in expected) > 1e-3
