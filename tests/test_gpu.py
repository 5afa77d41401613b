"""Every stage with every registered defense, end to end through the recipe body, with export + reload.

The CPU test runs the whole matrix in fp32 under 1-rank ZeRO-3 (~20 s). The GPU tests (`pytest -m gpu`,
skipped without CUDA; `scripts/gpu_check.sh` runs them) run it in bf16 on one GPU under ZeRO-3 and
ZeRO-3 with CPU offload. At one GPU the process group is NCCL with world size 1, and the engine's
collective helpers still run their collectives there (bulwark/engine/dist.py), so a CPU tensor that
reaches a collective fails these tests as it would at 2+ GPUs.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

from bulwark.defenses import REGISTRY
from tests.conftest import REPO, SCENARIOS, check, run_cmd

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


def run_matrix(model_dir: Path, out: Path, data_dir: Path, dtype: str, ds_config: str,
               names: str = "", gpu: bool = False) -> list[dict]:
    cmd = [sys.executable, str(SCENARIOS / "stage_matrix.py"), str(model_dir), str(out), dtype, ds_config, "2", names]
    if gpu:
        proc = gpu_run(cmd, data_dir)
    else:
        proc = run_cmd(cmd, data_dir, timeout=600)
    check(proc)
    return json.loads((out / "matrix.json").read_text())


def gpu_run(cmd: list[str], data_dir: Path):
    import subprocess

    from tests.conftest import subprocess_env

    env = {k: v for k, v in subprocess_env(data_dir).items() if k != "DS_ACCELERATOR"}
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600, cwd=REPO)


def expected_runs(names: list[str]) -> set[tuple[str, str]]:
    return {(stage, name) for name in names for stage in REGISTRY[name].stages}


def test_every_defense_every_stage_zero3_cpu(tmp_path: Path, tiny_model_dir: Path, data_dir: Path) -> None:
    rows = run_matrix(tiny_model_dir, tmp_path, data_dir, "fp32", "zero3")
    assert {(r["stage"], r["defense"]) for r in rows} == expected_runs(sorted(REGISTRY))
    assert all(not r["error"] and r["loss"] > 0 for r in rows), rows


@pytest.mark.gpu
@needs_cuda
def test_gpu_every_defense_every_stage_bf16_zero3(tmp_path: Path, tiny_model_dir: Path, data_dir: Path) -> None:
    rows = run_matrix(tiny_model_dir, tmp_path, data_dir, "bf16", "zero3", gpu=True)
    assert {(r["stage"], r["defense"]) for r in rows} == expected_runs(sorted(REGISTRY))
    assert all(not r["error"] for r in rows), rows


@pytest.mark.gpu
@needs_cuda
def test_gpu_zero3_offload_bf16(tmp_path: Path, tiny_model_dir: Path, data_dir: Path) -> None:
    """Parameters and optimizer states on the host (ds_configs/zero3_offload.json), torch's AdamW stepping
    there; Lisa's proximal hook then edits host-side fp32 shards."""
    names = ["sft", "lisa", "mix"]
    rows = run_matrix(tiny_model_dir, tmp_path, data_dir, "bf16", "zero3_offload", ",".join(names), gpu=True)
    assert {(r["stage"], r["defense"]) for r in rows} == expected_runs(names)
    assert all(not r["error"] for r in rows), rows
