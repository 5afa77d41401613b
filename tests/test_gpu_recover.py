"""bulwark recover on CUDA (restore and SafeLoRA) against the same run on the CPU, on the tiny model.

Skipped without CUDA. Each test keeps to a few short runs (under ~60 s on one H200, mostly process start).
The CPU references run in a child process with CUDA hidden (restore) or with the device helper pointed at
the CPU (SafeLoRA, in process), so both sides run the same code.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

from bulwark.recover.checkpoints import TensorStore
from tests.conftest import REPO, RUN_TIMEOUT_S, check, subprocess_env

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


@pytest.fixture(scope="module")
def models_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A (tiny seed 0) and B = A + noise, saved in fp32 (a bf16 run loads them with dtype=bf16)."""
    from tests.conftest import save_recover_pair

    return save_recover_pair(tmp_path_factory.mktemp("gpu_recover"))


def recover(models_dir: Path, data_dir: Path, out: Path, on_gpu: bool, *extra: str) -> dict:
    """One `bulwark recover` run in a child process; returns its summary."""
    import subprocess

    env = subprocess_env(data_dir)
    if on_gpu:
        env.pop("DS_ACCELERATOR")  # as tests/test_multinode.py: DeepSpeed picks CUDA, the group is NCCL
    else:
        env["CUDA_VISIBLE_DEVICES"] = ""  # the CPU reference: no CUDA device visible at all
    args = [f"aligned={models_dir / 'A'}", f"finetuned={models_dir / 'B'}", f"out_dir={out}",
            "data.harmful_n=7", "data.task_n=4", "data.max_length=48", "task.metric=loss", "task.n=4",
            "restore.micro_batch_size=3", "restore.steps=4", "restore.warmup_steps=2",
            "restore.checkpoint_every=2", "restore.fraction=0.005", *extra]
    proc = subprocess.run([sys.executable, "-m", "cli.main", "recover", *args], env=env, capture_output=True,
                          text=True, timeout=RUN_TIMEOUT_S, cwd=REPO)
    check(proc)
    return json.loads((out / "summary.json").read_text())


def restored_sets(models_dir: Path, out: Path) -> dict[str, set[int]]:
    """{weight: flat indices set to A's value}; asserts every saved element is exactly A's or B's."""
    got, a, b = TensorStore(out / "model", "out"), TensorStore(models_dir / "A", "A"), TensorStore(models_dir / "B", "B")
    sets = {}
    for name in got.names():
        w, wa, wb = got.get(name).flatten(), a.get(name).flatten(), b.get(name).flatten()
        assert torch.all((w == wa) | (w == wb)), name
        sets[name] = set(torch.nonzero((w != wb) & (w == wa)).flatten().tolist())
    return sets


def jaccard(x: dict[str, set[int]], y: dict[str, set[int]]) -> float:
    pairs = {(n, i) for n, s in x.items() for i in s}, {(n, i) for n, s in y.items() for i in s}
    union = pairs[0] | pairs[1]
    return len(pairs[0] & pairs[1]) / len(union) if union else 1.0


def test_restore_fp32_gpu_equals_cpu(models_dir: Path, data_dir: Path, tmp_path: Path) -> None:
    """fp32: the plain model on the GPU and the ZeRO-3 partitioned one (NCCL, world size 1, every collective
    really run) restore exactly the elements the CPU run restores, and write bit-identical models.

    Tolerance: none on the selection (the same element set); task scores within 1e-5 relative (cuBLAS and
    the CPU's BLAS sum in different orders; TF32 stays off, PyTorch's default for fp32 matmuls)."""
    cpu = recover(models_dir, data_dir, tmp_path / "cpu", False)
    plain = recover(models_dir, data_dir, tmp_path / "gpu", True)
    zero3 = recover(models_dir, data_dir, tmp_path / "gpu_zero3", True, "launch.zero3=true",
                    "launch.ds_config=zero3")
    assert not cpu["zero3"] and not plain["zero3"] and zero3["zero3"]
    reference = restored_sets(models_dir, tmp_path / "cpu")
    assert sum(len(s) for s in reference.values()) == cpu["changed_elements"] > 0
    for name, summary in (("gpu", plain), ("gpu_zero3", zero3)):
        assert summary["kept_step"] == cpu["kept_step"] and summary["changed_elements"] == cpu["changed_elements"]
        assert summary["task_score_B"] == pytest.approx(cpu["task_score_B"], rel=1e-5)
        assert restored_sets(models_dir, tmp_path / name) == reference, name


def test_restore_bf16_gpu_close_to_cpu(models_dir: Path, data_dir: Path, tmp_path: Path) -> None:
    """bf16 under ZeRO-3 on the GPU against bf16 on the CPU.

    Tolerance: bf16 kernels differ between cuBLAS and the CPU (accumulation order and rounding), so
    gradients differ within bf16 rounding and near-ties at the k-th score may swap: the same number of
    elements is restored, at least 90% of them the same (Jaccard over (weight, index) pairs), every saved
    element is exactly A's or B's value, and B's task score agrees to 2% (bf16 logits)."""
    cpu = recover(models_dir, data_dir, tmp_path / "cpu", False, "dtype=bf16")
    gpu = recover(models_dir, data_dir, tmp_path / "gpu", True, "dtype=bf16", "launch.zero3=true")
    assert gpu["zero3"]
    assert gpu["changed_elements"] == cpu["changed_elements"] > 0
    assert gpu["task_score_B"] == pytest.approx(cpu["task_score_B"], rel=2e-2)
    overlap = jaccard(restored_sets(models_dir, tmp_path / "cpu"), restored_sets(models_dir, tmp_path / "gpu"))
    print(f"bf16 restore: CPU/GPU Jaccard overlap {overlap:.4f}")
    assert overlap >= 0.9


# ---- SafeLoRA ------------------------------------------------------------------------------------------------


TARGETS = ["q_proj", "v_proj"]


def three_models(root: Path, dtype: torch.dtype) -> Path:
    """base, aligned = base + noise, a LoRA adapter on aligned, full fine-tune = aligned + noise; in `dtype`."""
    from tests.conftest import save_subspace_models

    save_subspace_models(root, TARGETS, dtype)
    return root


def safelora_on(device: str, root: Path, finetuned: str, out: Path, threshold: float,
                monkeypatch: pytest.MonkeyPatch) -> dict:
    """{layer: (cos, projected)} of one SafeLoRA run with its matrix products on `device`."""
    import bulwark.engine.dist as dist
    from bulwark.recover.safelora import run_safelora

    with monkeypatch.context() as patch:
        patch.setattr(dist, "device", lambda: torch.device(device))
        decisions = run_safelora(root / "base", root / "aligned", root / finetuned, out, threshold, TARGETS)
    return {d.name: (d.cos, d.projected) for d in decisions}


def midway_threshold(cosines: list[float]) -> float:
    """A threshold between the two middle cosines, so about half the layers project and no cosine sits at it."""
    ordered = sorted(cosines)
    low, high = ordered[len(ordered) // 2 - 1], ordered[len(ordered) // 2]
    assert high - low > 1e-3, "the middle cosines are too close to split the layers robustly"
    return (low + high) / 2


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("finetuned", ["adapter", "full"])
def test_safelora_gpu_equals_cpu(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, dtype: torch.dtype,
                                 finetuned: str) -> None:
    """SafeLoRA's products on the GPU against the CPU, models stored in fp32 or bf16 (the math is fp32).

    Tolerance: the same layers projected; cos within 1e-5; written weights (and the projected adapter's
    lora_B) within 1e-5 relative in fp32, and within one bf16 rounding step (2^-7 relative) in bf16, where
    fp32 results that differ in the last bits can round to neighbouring bf16 values."""
    root = three_models(tmp_path / "models", dtype)
    probe = safelora_on("cpu", root, finetuned, tmp_path / "probe", -2.0, monkeypatch)  # cos >= -1: none projected
    threshold = midway_threshold([c for c, _ in probe.values() if c is not None])
    cpu = safelora_on("cpu", root, finetuned, tmp_path / "cpu", threshold, monkeypatch)
    gpu = safelora_on("cuda", root, finetuned, tmp_path / "gpu", threshold, monkeypatch)
    assert cpu.keys() == gpu.keys() and 0 < sum(p for _, p in cpu.values()) < len(cpu)
    for name, (cos, projected) in cpu.items():
        assert gpu[name][1] == projected, name
        assert gpu[name][0] == pytest.approx(cos, abs=1e-5), name
    rtol = 1e-5 if dtype == torch.float32 else 2.0**-7
    outputs = [("model", "model.safetensors")] + ([("adapter", "adapter_model.safetensors")]
                                                  if finetuned == "adapter" else [])
    from safetensors.torch import load_file

    for folder, file in outputs:
        want, got = load_file(str(tmp_path / "cpu" / folder / file)), load_file(str(tmp_path / "gpu" / folder / file))
        assert want.keys() == got.keys()
        for key, value in want.items():
            assert got[key].dtype == value.dtype, key
            assert torch.allclose(got[key].float(), value.float(), rtol=rtol, atol=1e-6), key


def test_antidote_gpu_matches_cpu(models_dir: Path, data_dir: Path, tmp_path: Path) -> None:
    """Antidote's calibration forward runs on the GPU: the pruned elements match the CPU run's (the activation
    norms may round differently, so elements at a row's cut may swap; the count per weight may not)."""
    extra = ("method=antidote", "antidote.calibration_n=8", "antidote.micro_batch_size=4")
    gpu = recover(models_dir, data_dir, tmp_path / "gpu", True, *extra)
    cpu = recover(models_dir, data_dir, tmp_path / "cpu", False, *extra)
    b = TensorStore(models_dir / "B", "B")

    def pruned(out: Path) -> dict[str, set[int]]:
        got = TensorStore(out / "model", "out")
        return {n: set(torch.nonzero((got.get(n).flatten() == 0) & (b.get(n).flatten() != 0)).flatten().tolist())
                for n in got.names()}

    on_gpu, on_cpu = pruned(tmp_path / "gpu"), pruned(tmp_path / "cpu")
    assert {n: len(s) for n, s in on_gpu.items()} == {n: len(s) for n, s in on_cpu.items()}
    assert sum(len(s) for s in on_gpu.values()) > 0
    assert jaccard(on_gpu, on_cpu) >= 0.99
    assert gpu["method"] == cpu["method"] == "antidote"
