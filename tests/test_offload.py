"""ZeRO-3 with optimizer and parameter offload (ds_configs/zero3_offload.json) at 2 ranks on CPU (gloo).

On this CPU "offload" moves nothing physically, but DeepSpeed still takes its offload code paths (host
fp32 partitions with their own gradient copies, torch's optimizer stepping them, offloaded parameter
partitions), which are what a GPU cluster runs; the GPU correctness check covers the device side.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

from tests.conftest import REPO, bulwark_cli, check, run_cmd
from tests.test_engine_zero3 import load_exported, tiny_overrides

LISA = ["defense.name=lisa", "defense.align_steps=1", "defense.finetune_steps=2"]


def _losses(run: Path) -> list[float]:
    return [json.loads(x)["loss"] for x in (run / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("defense", ["sft", "lisa"])
def test_offload_two_ranks_follows_plain_zero3(
    tmp_path: Path, tiny_model_dir: Path, data_dir: Path, defense: str
) -> None:
    """Same losses and weights as plain ZeRO-3 (fp32): offload changes where the optimizer steps, not what.

    Lisa is also stopped after its first checkpoint and resumed, as a preempted 70B job would be.
    """
    extra = LISA if defense == "lisa" else ["defense.name=sft"]

    def overrides(name: str, ds_config: str) -> list[str]:
        values = {"train.steps": 4, "train.checkpoint_every": 2, "launch.ds_config": ds_config}
        return tiny_overrides(tiny_model_dir, tmp_path / name, **values) + extra

    plain, offload = overrides("plain", "zero3"), overrides("offload", "zero3_offload")
    check(bulwark_cli(["finetune", *plain], data_dir))
    if defense == "lisa":
        check(bulwark_cli(["finetune", *offload, "--stop-after", "2"], data_dir))
        check(bulwark_cli(["finetune", *offload, "--resume"], data_dir))
    else:
        check(bulwark_cli(["finetune", *offload], data_dir))

    a, b = _losses(tmp_path / "plain"), _losses(tmp_path / "offload")
    assert len(a) == len(b) == 4
    # measured: equal to the last bit; 1e-5 leaves room for a different reduction order
    assert max(abs(x - y) for x, y in zip(a, b, strict=True)) < 1e-5, (a, b)
    if defense == "lisa":
        states = [json.loads(x)["lisa_state"] for x in (tmp_path / "offload" / "metrics.jsonl").read_text().splitlines()]
        assert states == ["align", "finetune", "finetune", "align"]
    # both ranks wrote their shard of the offloaded optimizer: it really ran at 2 ranks
    last = tmp_path / "offload" / "checkpoints" / "step_000004"
    assert sorted(p.name for p in last.glob("bulwark_rank*.pt")) == ["bulwark_rank0.pt", "bulwark_rank1.pt"]
    assert len(list(last.glob("*optim_states.pt"))) == 2
    wa, wb = load_exported(tmp_path / "plain" / "model"), load_exported(tmp_path / "offload" / "model")
    base = load_exported(tiny_model_dir)
    for name in wa:
        torch.testing.assert_close(wb[name], wa[name], atol=1e-5, rtol=0, msg=name)  # measured: 1.2e-8
    assert any(not torch.equal(wa[n], base[n]) for n in wa), "nothing trained: the comparison would be vacuous"


def test_70b_preset_starts_on_the_tiny_model(tmp_path: Path, tiny_model_dir: Path, data_dir: Path) -> None:
    """The 70B preset's own settings (offload config, bf16, Lisa, checkpointing) at 2 ranks, model swapped."""
    preset = REPO / "configs" / "presets" / "llama2-70b-lisa.yaml"
    assert "zero3_offload" in preset.read_text()
    out = tmp_path / "p70"
    args = [f"model.name={tiny_model_dir}", f"out_dir={out}", "launch.nnodes=1", "launch.nproc=2",
            "train.steps=2", "train.checkpoint_every=2", "data.n=16", "data.p=0.25", "data.max_length=48",
            "data.align_n=16", "data.template=alpaca"]
    check(bulwark_cli(["finetune", str(preset), *args], data_dir))
    losses = _losses(out)
    assert len(losses) == 2 and all(x == x and x > 0 for x in losses)  # finite, not NaN
    assert (out / "checkpoints" / "latest").read_text() == "step_000002"
    assert (out / "model").is_dir()


# A bare process (one rank): which optimizer runs under offload and where its state lives.
_INSPECT = """
import json, sys, torch
from bulwark.config import TrainConfig
from bulwark.engine.core import Engine
from bulwark.models import load_model

model_dir = sys.argv[1]
train = TrainConfig(steps=2, micro_batch_size=1, grad_accum=1, lr=1e-3)
engine = Engine(lambda: load_model(model_dir, "fp32"), train, "zero3_offload", "fp32", 2)
zero = engine.ds.optimizer
inner = zero.optimizer
batch = {"input_ids": torch.tensor([[5, 9, 30, 41, 7, 2]]), "attention_mask": torch.ones(1, 6, dtype=torch.long)}
batch["labels"] = batch["input_ids"].clone()
before = [s.detach().clone() for s in engine.local_shards()]
for _ in range(2):
    loss = engine.forward_loss(batch)
    engine.backward(loss)
    engine.step()
moved = any(not torch.equal(a, s) for a, s in zip(before, engine.local_shards()))
print("RESULT " + json.dumps({
    "offload_optimizer": bool(zero.offload_optimizer), "offload_param": bool(zero.offload_param),
    "optimizer": type(inner).__module__ + "." + type(inner).__name__,
    "fused": bool(inner.defaults.get("fused")),
    "shard_devices": sorted({str(s.device) for s in engine.local_shards()}),
    "state_devices": sorted({str(v.device) for st in inner.state.values() for v in st.values() if torch.is_tensor(v) and v.dim()}),
    "moved": moved,
}))
"""


def test_offload_steps_with_torch_fused_adamw_on_host(tiny_model_dir: Path) -> None:
    proc = check(run_cmd([sys.executable, "-c", _INSPECT, str(tiny_model_dir)], timeout=180))
    line = next(x for x in proc.stdout.splitlines() if x.startswith("RESULT "))
    out = json.loads(line.removeprefix("RESULT "))
    assert out["offload_optimizer"] and out["offload_param"], out
    # torch's AdamW (fused), not DeepSpeedCPUAdam, which would compile C++ on first use
    assert out["optimizer"] == "torch.optim.adamw.AdamW" and out["fused"], out
    assert out["shard_devices"] == ["cpu"] and out["state_devices"] == ["cpu"], out
    assert out["moved"], "two steps changed no fp32 master weight"
