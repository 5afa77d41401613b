"""Multi-node correctness on one machine, and the GPU path (skipped without CUDA)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from bulwark.engine.dist import free_port
from tests.conftest import RUN_TIMEOUT_S, bulwark_cli, check, subprocess_env
from tests.test_engine_zero3 import load_exported, tiny_overrides

LISA = ["defense.name=lisa", "defense.align_steps=1", "defense.finetune_steps=1", "defense.proximal_warmup=0",
        "train.steps=3"]


def test_two_nodes_of_one_process_equal_one_node_of_two(tmp_path: Path, tiny_model_dir: Path, data_dir: Path) -> None:
    """`torchrun --nnodes 2` (c10d rendezvous on localhost), as srun starts it on a cluster."""
    one_node = tiny_overrides(tiny_model_dir, tmp_path / "one_node") + LISA
    check(bulwark_cli(["finetune", *one_node], data_dir))

    two_nodes = tiny_overrides(tiny_model_dir, tmp_path / "two_nodes") + LISA
    endpoint = f"127.0.0.1:{free_port()}"
    nodes = [
        subprocess.Popen(
            [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc_per_node", "1",
             "--node_rank", str(rank), "--rdzv_backend", "c10d", "--rdzv_endpoint", endpoint, "--rdzv_id", "bulwark-test",
             "-m", "bulwark.recipes.finetune", *two_nodes],
            env=subprocess_env(data_dir), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        )
        for rank in range(2)
    ]
    try:
        outputs = [node.communicate(timeout=RUN_TIMEOUT_S)[0] for node in nodes]
    finally:
        for node in nodes:
            node.kill()
    assert all(node.returncode == 0 for node in nodes), "\n".join(o[-3000:] for o in outputs)

    a, b = load_exported(tmp_path / "one_node" / "model"), load_exported(tmp_path / "two_nodes" / "model")
    for name in a:
        torch.testing.assert_close(a[name], b[name], atol=1e-6, rtol=0, msg=name)
    assert (tmp_path / "two_nodes" / "metrics.jsonl").read_text().count("\n") == 3


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_gpu_bf16_nccl_lisa_step(tmp_path: Path, tiny_model_dir: Path, data_dir: Path) -> None:
    """bf16 + nccl on however many GPUs are visible: the run trains and exports a loadable model."""
    gpus = torch.cuda.device_count()
    overrides = tiny_overrides(tiny_model_dir, tmp_path / "gpu", **{"launch.nproc": gpus, "model.dtype": "bf16"})
    proc = subprocess.run([sys.executable, "-m", "cli.main", "finetune", *overrides, *LISA],
                          env={k: v for k, v in subprocess_env(data_dir).items() if k != "DS_ACCELERATOR"},
                          capture_output=True, text=True, timeout=RUN_TIMEOUT_S)
    check(proc)
    exported = load_exported(tmp_path / "gpu" / "model")
    assert all(torch.isfinite(v).all() for v in exported.values())
