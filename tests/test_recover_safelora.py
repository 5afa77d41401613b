"""bulwark recover, method=safelora: the projection math, and LoRA / full fine-tuning end to end."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from bulwark.recipes.recover import check_inputs, run
from bulwark.recover.checkpoints import TensorStore
from bulwark.recover.config import load_recover_config
from bulwark.recover.safelora import decide, run_safelora
from bulwark.recover.subspace import projection_matrix

TARGETS = ["q_proj", "v_proj", "down_proj"]


def direct(v: np.ndarray, dw: np.ndarray) -> tuple[np.ndarray, float]:
    """The paper's formulas, spelled out in float64: C = sum_j v_j v_j^T / ||V||_F, dW' = C dW, cos."""
    c = sum(np.outer(v[:, j], v[:, j]) for j in range(v.shape[1])) / np.sqrt((v**2).sum())
    projected = c @ dw
    cos = float((projected * dw).sum() / (np.linalg.norm(projected) * np.linalg.norm(dw)))
    return projected, cos


def test_projection_math_matches_a_direct_computation() -> None:
    gen = torch.Generator().manual_seed(0)
    v, dw = torch.randn(6, 5, generator=gen), torch.randn(6, 5, generator=gen)
    expected, cos = direct(v.double().numpy(), dw.double().numpy())
    c = projection_matrix(v)
    assert np.allclose(c.double().numpy(), (v.double() @ v.double().T / v.double().norm()).numpy(), atol=1e-5)
    used, got_cos, projected = decide(v, dw, threshold=cos + 0.01)
    assert projected and abs(got_cos - cos) < 1e-5
    assert np.allclose(used.double().numpy(), expected, rtol=1e-4, atol=1e-5)
    used, got_cos, projected = decide(v, dw, threshold=cos - 0.01)  # similar enough: kept as is
    assert not projected and torch.equal(used, dw)
    used, got_cos, projected = decide(torch.zeros(6, 5), dw, threshold=1.0)  # alignment left it alone
    assert got_cos is None and not projected and torch.equal(used, dw)


@pytest.fixture(scope="module")
def three_models(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """base (tiny seed 0), aligned = base + noise, a LoRA adapter on aligned, full fine-tune = aligned + noise."""
    from tests.conftest import save_subspace_models

    return save_subspace_models(tmp_path_factory.mktemp("safelora"), TARGETS)


def lora_updates(root: Path) -> dict[str, tuple[torch.Tensor, torch.Tensor, float]]:
    from safetensors.torch import load_file

    tensors = load_file(str(root / "adapter" / "adapter_model.safetensors"))
    out = {}
    for key, a in tensors.items():
        if ".lora_A." in key:
            name = key.split(".lora_A.")[0].removeprefix("base_model.model.") + ".weight"
            out[name] = (a, tensors[key.replace(".lora_A.", ".lora_B.")], 8 / 4)
    return out


def test_lora_end_to_end(three_models: Path, tmp_path: Path) -> None:
    base, aligned = TensorStore(three_models / "base", "b"), TensorStore(three_models / "aligned", "a")
    updates = lora_updates(three_models)
    cosines = {}
    for name, (a, b, scale) in updates.items():
        v = (aligned.get(name) - base.get(name)).double().numpy()
        cosines[name] = direct(v, (scale * (b @ a)).double().numpy())[1]
    threshold = float(np.median(list(cosines.values())))  # about half the layers get projected
    cfg = load_recover_config(None, [
        "method=safelora", f"base={three_models / 'base'}", f"aligned={three_models / 'aligned'}",
        f"finetuned={three_models / 'adapter'}", f"out_dir={tmp_path / 'out'}", f"safelora.threshold={threshold}"])
    summary = run(cfg, check_inputs(cfg), overwrite=False)
    assert summary["input"] == "lora" and summary["layers"] == len(updates)
    assert 0 < summary["projected"] < len(updates)
    repaired = TensorStore(tmp_path / "out" / "model", "out")
    new_adapter = lora_updates(tmp_path / "out")
    for name, (a, b, scale) in updates.items():
        v = (aligned.get(name) - base.get(name)).double().numpy()
        update = (scale * (b @ a)).double().numpy()
        projected, cos = direct(v, update)
        use = projected if cos < threshold else update
        expected = aligned.get(name).double().numpy() + use
        assert np.allclose(repaired.get(name).double().numpy(), expected, atol=1e-5), name
        new_b = new_adapter[name][1].double().numpy()
        expected_b = (projection_matrix(aligned.get(name) - base.get(name)).double() @ b.double()).numpy() \
            if cos < threshold else b.double().numpy()
        assert np.allclose(new_b, expected_b, atol=1e-5), name
    for name in repaired.names():
        if name not in updates:
            assert torch.equal(repaired.get(name), aligned.get(name)), name
    rows = [json.loads(line) for line in (tmp_path / "out" / "log.jsonl").read_text().splitlines()]
    assert sum(r["projected"] for r in rows) == summary["projected"]


def test_full_finetune_end_to_end(three_models: Path, tmp_path: Path) -> None:
    from bulwark.recover.safelora import SafeLoraConfig

    base, aligned = TensorStore(three_models / "base", "b"), TensorStore(three_models / "aligned", "a")
    finetuned = TensorStore(three_models / "full", "f")
    targets = SafeLoraConfig().target_modules
    cosines = [direct((aligned.get(n) - base.get(n)).double().numpy(),
                      (finetuned.get(n) - aligned.get(n)).double().numpy())[1]
               for n in aligned.names() if n.split(".")[-2] in targets]
    threshold = float(np.median(cosines))
    decisions = run_safelora(three_models / "base", three_models / "aligned", three_models / "full",
                             tmp_path, threshold=threshold, targets=targets)
    repaired = TensorStore(tmp_path / "model", "out")
    decided = {d.name: d for d in decisions}
    assert len(decided) == 2 * 7  # 2 layers x 7 linear weights
    for name in repaired.names():
        if name not in decided or not decided[name].projected:
            assert torch.equal(repaired.get(name), finetuned.get(name)), name
            continue
        v = (aligned.get(name) - base.get(name)).double().numpy()
        projected, cos = direct(v, (finetuned.get(name) - aligned.get(name)).double().numpy())
        assert cos < threshold and abs(cos - decided[name].cos) < 1e-5
        assert np.allclose(repaired.get(name).double().numpy(), aligned.get(name).double().numpy() + projected,
                           atol=1e-5), name
    assert 0 < sum(d.projected for d in decisions) < len(decisions)
