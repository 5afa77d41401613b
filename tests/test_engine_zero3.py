"""The engine under real 2-rank ZeRO-3 (gloo, CPU) against plain single-process PyTorch."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest
import torch

from bulwark.config import load_config
from bulwark.data import DistributedStream
from bulwark.defenses import build_defense
from bulwark.losses import model_loss
from bulwark.recipes import finetune
from bulwark.recipes.loop import tokenize_streams
from tests.conftest import SCENARIOS, bulwark_cli, check, torchrun


def tiny_overrides(model_dir: Path, out: Path, **extra: object) -> list[str]:
    values = {
        "out_dir": out, "model.name": model_dir, "data.n": 16, "data.p": 0.25, "data.max_length": 48,
        "data.align_n": 16, "data.template": "alpaca", "train.steps": 1, "train.micro_batch_size": 2,
        "train.lr": 1e-3, "train.max_grad_norm": 1.0, "launch.nproc": 2,
    }
    values.update(extra)
    return [f"{k}={v}" for k, v in values.items()]


def plain_sft_step(overrides: list[str], data_dir: Path) -> dict[str, torch.Tensor]:
    """One AdamW step in one process on the global batch both ranks saw, loss averaged per rank."""
    from bulwark.models import load_model, load_tokenizer

    cfg = load_config(None, overrides, "finetune")
    cfg.data.dir = str(data_dir)
    defense = build_defense(cfg.defense, "finetune", cfg.train.steps)
    tokenizer = load_tokenizer(cfg.model.name)
    features = tokenize_streams(finetune.build_plan(cfg, defense), tokenizer, cfg)["main"]
    mbs = cfg.train.micro_batch_size
    stream = DistributedStream(features, mbs * 2, 0, 1, cfg.data.seed, tokenizer.pad_token_id)
    global_batch = stream.next_batch()
    model = load_model(cfg.model.name, "fp32")
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.train.lr, weight_decay=cfg.train.weight_decay)
    halves = [{k: v[i * mbs:(i + 1) * mbs] for k, v in global_batch.items()} for i in range(2)]
    losses = [model_loss(model, _trim(h)) for h in halves]
    (sum(losses) / 2).backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.train.max_grad_norm)
    opt.step()
    return {k: v.detach() for k, v in model.state_dict().items()}


def _trim(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Each rank pads its own micro-batch: drop the columns that are padding in the whole half."""
    keep = int(batch["attention_mask"].sum(1).max())
    return {k: v[:, :keep] for k, v in batch.items()}


def load_exported(folder: Path) -> dict[str, torch.Tensor]:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    return {k: v.detach() for k, v in model.state_dict().items()}


@pytest.mark.parametrize("ds_config", ["zero3", "zero2"])
def test_sft_step_two_ranks_equals_plain_pytorch(
    tmp_path: Path, tiny_model_dir: Path, data_dir: Path, ds_config: str
) -> None:
    overrides = tiny_overrides(tiny_model_dir, tmp_path / "run", **{"launch.ds_config": ds_config})
    check(bulwark_cli(["finetune", *overrides], data_dir))
    exported = load_exported(tmp_path / "run" / "model")
    expected = plain_sft_step(overrides, data_dir)
    base = load_exported(tiny_model_dir)
    moved = 0
    for name, value in expected.items():
        torch.testing.assert_close(exported[name], value, atol=1e-5, rtol=0, msg=name)
        moved += int(not torch.equal(value, base[name]))
    assert moved > 0, "the step changed no weight: the comparison would be vacuous"
    assert (tmp_path / "run" / "attack_mix.json").is_file()
    rows = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1]


@pytest.mark.parametrize(("grad_accum", "ds_config"), [(1, "zero3"), (2, "zero3"), (2, "zero2")])
def test_lisa_shard_update_switches_and_anchor_size(
    tmp_path: Path, tiny_model_dir: Path, grad_accum: int, ds_config: str
) -> None:
    out = tmp_path / "lisa"
    check(torchrun([str(SCENARIOS / "lisa_shards.py"), str(tiny_model_dir), str(out), str(grad_accum), "2", "3", "7",
                    ds_config]))
    ranks = [json.loads(Path(f"{out}.rank{r}.json").read_text()) for r in range(2)]
    for result in ranks:
        states = [row["state"] for row in result["log"]]
        assert states == ["align", "align", "finetune", "finetune", "finetune", "align", "align"]
        for row in result["log"]:
            assert row["max_err"] < 1e-6, row
        # the align stream advanced only in align steps: 4 steps x grad_accum micro-batches
        per_epoch = 40 // 4  # 40 rows, global micro-batch 2 x 2 ranks
        pos = result["log"][-1]["streams"]["align"]
        assert pos["epoch"] * per_epoch + pos["position"] == 4 * grad_accum
        pos = result["log"][-1]["streams"]["main"]
        assert pos["epoch"] * per_epoch + pos["position"] == 3 * grad_accum
        # each rank keeps half of the anchor elements (plus ZeRO's alignment padding)
        half = math.ceil(result["trainable_numel"] / 2)
        assert half <= result["anchor_numel"] <= half + 64
        assert result["anchor_bytes"] == result["anchor_numel"] * 4
    assert sum(r["anchor_numel"] for r in ranks) >= ranks[0]["trainable_numel"]
    # the exported folder gives the live engine's loss in plain transformers
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tmp_path / "export" / "model", dtype=torch.float32)
    for result in ranks:
        batch = {k: torch.tensor(v) for k, v in result["fixed_batch"].items()}
        with torch.no_grad():
            assert abs(model_loss(model, batch).item() - result["live_loss"]) < 1e-5


def test_resume_continues_exactly(tmp_path: Path, tiny_model_dir: Path, data_dir: Path) -> None:
    lisa = ["defense.name=lisa", "defense.align_steps=1", "defense.finetune_steps=2", "defense.proximal_warmup=0.25"]
    straight = tiny_overrides(tiny_model_dir, tmp_path / "a", **{"train.steps": 4}) + lisa
    check(bulwark_cli(["finetune", *straight], data_dir))
    broken = tiny_overrides(tiny_model_dir, tmp_path / "b", **{"train.steps": 4, "train.checkpoint_every": 2}) + lisa
    check(bulwark_cli(["finetune", *broken, "--stop-after", "2"], data_dir))
    assert not (tmp_path / "b" / "model").exists()
    assert (tmp_path / "b" / "checkpoints" / "latest").read_text() == "step_000002"
    check(bulwark_cli(["finetune", *broken, "--resume"], data_dir))

    def losses(run: Path) -> list[float]:
        return [json.loads(x)["loss"] for x in (run / "metrics.jsonl").read_text().splitlines()]

    a, b = losses(tmp_path / "a"), losses(tmp_path / "b")
    assert len(a) == len(b) == 4
    assert max(abs(x - y) for x, y in zip(a, b, strict=True)) < 1e-6
    states = [json.loads(x)["lisa_state"] for x in (tmp_path / "b" / "metrics.jsonl").read_text().splitlines()]
    assert states == ["align", "finetune", "finetune", "align"]
    wa, wb = load_exported(tmp_path / "a" / "model"), load_exported(tmp_path / "b" / "model")
    for name in wa:
        torch.testing.assert_close(wa[name], wb[name], atol=1e-6, rtol=0)


def test_cli_help_is_fast() -> None:
    import subprocess
    import time

    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "cli.main", "--help"], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0 and "finetune" in proc.stdout
    assert time.perf_counter() - t0 < 10


def test_lora_export_and_double_single_lora_under_zero3(tmp_path: Path, tiny_model_dir: Path, data_dir: Path) -> None:
    """LoRA at align, then both LoRA modes at finetune, all at 2-rank ZeRO-3."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    lora = ["model.lora.enabled=true", "model.lora.r=4", "train.lr=1e-2"]
    aligned = tmp_path / "align"
    check(bulwark_cli(["align", *tiny_overrides(tiny_model_dir, aligned, **{"train.steps": 2}), *lora], data_dir))
    adapter_cfg = json.loads((aligned / "adapter" / "adapter_config.json").read_text())
    assert adapter_cfg["base_model_name_or_path"] == str(tiny_model_dir)
    # the merged export equals base + adapter in plain transformers/peft
    batch = {"input_ids": torch.tensor([[5, 9, 30, 41, 7, 2]]), "attention_mask": torch.ones(1, 6, dtype=torch.long)}
    merged = AutoModelForCausalLM.from_pretrained(aligned / "model", dtype=torch.float32)
    with_adapter = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir), aligned / "adapter")
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    with torch.no_grad():
        want = with_adapter(**batch).logits
        torch.testing.assert_close(merged(**batch).logits, want, atol=1e-5, rtol=0)
        assert not torch.allclose(base(**batch).logits, want, atol=1e-4), "the adapter learned nothing"

    for mode in ("double", "single"):
        out = tmp_path / mode
        overrides = tiny_overrides(aligned / "adapter", out) + lora + [f"model.lora.mode={mode}"]
        check(bulwark_cli(["finetune", *overrides], data_dir))
        tuned_cfg = json.loads((out / "adapter" / "adapter_config.json").read_text())
        # double: the new adapter sits on the merged aligned model; single: on the original base
        base_dir = aligned / "model" if mode == "double" else tiny_model_dir
        assert Path(tuned_cfg["base_model_name_or_path"]).resolve() == base_dir.resolve()
        tuned = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_dir), out / "adapter")
        lora_b = {k: v for k, v in tuned.state_dict().items() if "lora_B" in k}
        if mode == "single":
            # the alignment adapter itself kept training: starts from its values, not from zero
            assert all(v.abs().sum() > 0 for v in lora_b.values())
        with torch.no_grad():
            full = AutoModelForCausalLM.from_pretrained(out / "model", dtype=torch.float32)(**batch).logits
            torch.testing.assert_close(full, tuned(**batch).logits, atol=1e-5, rtol=0)
            assert not torch.allclose(full, want, atol=1e-6), f"{mode}: fine-tuning changed nothing"
