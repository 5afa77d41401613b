"""`bulwark eval` on CUDA (skipped without it): generation and an `hf:` judge in bf16, plain and ZeRO-3."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.conftest import RUN_TIMEOUT_S, check, subprocess_env

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


def _gpu_env(data_dir: Path) -> dict[str, str]:
    # the suite's subprocess env pins DeepSpeed to the CPU accelerator; a GPU run must let it find CUDA
    return {k: v for k, v in subprocess_env(data_dir).items() if k != "DS_ACCELERATOR"}


def _eval(model: Path, out: Path, data_dir: Path, *extra: str) -> dict:
    args = [sys.executable, "-m", "cli.main", "eval", str(model), "--out-dir", str(out), "--judge", f"hf:{model}",
            "--n-prompts", "6", "--n-benign", "2", "--task", "sst2", "--n-task", "2", "--max-new-tokens", "12",
            "--batch-size", "4", "--data-dir", str(data_dir), *extra]
    check(subprocess.run(args, env=_gpu_env(data_dir), capture_output=True, text=True, timeout=RUN_TIMEOUT_S))
    return json.loads((out / "summary.json").read_text())


def _decisive_model(path: Path) -> Path:
    """The tiny Llama with its matrices scaled up, so that greedy answers are printable and differ from
    prompt to prompt (the stock tiny model answers newlines only, which strip to "")."""
    from bulwark.models import tiny_llama

    model, tokenizer = tiny_llama(seed=0)
    with torch.no_grad():
        for param in model.parameters():
            if param.dim() == 2:
                param.mul_(25)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def _outputs(out: Path) -> list[str]:
    return [json.loads(line)["output"] for line in (out / "generations" / "generations.jsonl").open()]


def test_gpu_eval_bf16_plain_and_zero3_with_hf_judge(tmp_path: Path, data_dir: Path) -> None:
    """auto dtype is bf16 on CUDA; the hf: judge (the tiny causal LM, Llama Guard style) runs on the GPU;
    ZeRO-3 at one rank generates every answer too."""
    model = _decisive_model(tmp_path / "model")
    plain = _eval(model, tmp_path / "plain", data_dir)
    assert (plain["dtype"], plain["partition"], plain["judge"]) == ("bf16", "none", f"hf:{model}")
    assert plain["n_harmful"] == 6 and plain["n_task"] == 2 and plain["over_refusal"] is not None
    harmful = [json.loads(line) for line in (tmp_path / "plain" / "harmful.jsonl").open()]
    assert len(harmful) == 6 and all(r["verdict"] in ("safe", "unsafe") for r in harmful)

    zero3 = _eval(model, tmp_path / "zero3", data_dir, "--zero3")
    assert (zero3["dtype"], zero3["partition"], zero3["world_size"]) == ("bf16", "zero3", 1)
    plain_outputs, zero3_outputs = _outputs(tmp_path / "plain"), _outputs(tmp_path / "zero3")
    assert len(zero3_outputs) == len(plain_outputs) == 10 and len(set(plain_outputs)) > 1
    # Not compared answer by answer: in bf16 on an H200 this deliberately chaotic model (weights x25)
    # gave different greedy answers for 1 of 10 prompts between the plain and the ZeRO-3 run (gathered
    # weights are laid out differently and cuBLAS rounds some bf16 sums differently), once from the
    # 3rd character. Exact equality of the two paths is tested in fp32 on the CPU (tests/test_eval_run.py).


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 GPUs")
def test_gpu_eval_zero3_two_ranks_nccl(tmp_path: Path, tiny_model_dir: Path, data_dir: Path) -> None:
    """Two NCCL ranks under ZeRO-3: every gather and the synced generate() on NCCL."""
    summary = _eval(tiny_model_dir, tmp_path / "z2", data_dir, "--zero3", "--nproc", "2")
    assert summary["world_size"] == 2 and summary["partition"] == "zero3"
