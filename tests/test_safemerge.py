"""bulwark recover, method=safemerge: the criterion and merge against plain PyTorch, LoRA and full fine-tuning,
1 rank against 2 (torchrun), the CLI end to end, and bad input."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from bulwark.recipes.recover import check_inputs, run
from bulwark.recover.checkpoints import TensorStore
from bulwark.recover.config import load_recover_config
from bulwark.recover.safemerge import SafeMergeConfig, alignment_cos
from tests.conftest import bulwark_cli, check, cli_in_process, torchrun

TARGETS = ["q_proj", "v_proj", "down_proj"]
UNALIGNED = "model.layers.1.self_attn.v_proj.weight"  # alignment leaves it alone: V = 0, never merged
W_FT = 0.7  # a non-default weight, so the test sees the config reach the merge


# ---- plain PyTorch, from the equations ------------------------------------------------------------------------


def plain_cos(v: torch.Tensor, dw: torch.Tensor) -> float | None:
    """cos(C dW, dW), C = V V^T / ||V||_F, in float64."""
    v, dw = v.double(), dw.double()
    if not v.any() or not dw.any():
        return None
    projected = (v @ v.T / torch.sqrt((v**2).sum())) @ dw
    return float((projected * dw).sum() / (projected.norm() * dw.norm()))


def lora_updates(adapter: Path) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """{weight name: (lora_A, lora_B)} of a saved adapter."""
    from safetensors.torch import load_file

    tensors = load_file(str(adapter / "adapter_model.safetensors"))
    return {key.split(".lora_A.")[0].removeprefix("base_model.model.") + ".weight":
            (a, tensors[key.replace(".lora_A.", ".lora_B.")]) for key, a in tensors.items() if ".lora_A." in key}


def plain_cosines(root: Path, kind: str) -> dict[str, float | None]:
    base, aligned = TensorStore(root / "base", "b"), TensorStore(root / "aligned", "a")
    if kind == "lora":
        scale = 8 / 4
        return {n: plain_cos(aligned.get(n) - base.get(n), scale * (b.double() @ a.double()))
                for n, (a, b) in lora_updates(root / "adapter").items()}
    full = TensorStore(root / "full", "f")
    return {n: plain_cos(aligned.get(n) - base.get(n), full.get(n).double() - aligned.get(n).double())
            for n in aligned.names() if n.endswith(".weight") and n.split(".")[-2] in SafeMergeConfig().target_modules}


def threshold_between(cosines: dict[str, float | None]) -> float:
    """A threshold midway between two neighbouring cosines near the median: about half the layers merge, and
    no cosine sits near it, so float32 rounding cannot flip a decision."""
    values = sorted(c for c in cosines.values() if c is not None)
    k = len(values) // 2
    assert values[k] - values[k - 1] > 1e-4, values
    return (values[k - 1] + values[k]) / 2


# ---- fixtures ---------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """base (tiny seed 0); aligned = base + noise (one weight left as base's); a LoRA adapter on aligned; a full
    fine-tune = aligned + noise; `mlp48`: the same config keys with other MLP shapes, and an adapter for it."""
    import peft

    from bulwark.models import save_tiny_llama, tiny_llama
    from tests.conftest import save_subspace_models

    root = save_subspace_models(tmp_path_factory.mktemp("safemerge"), TARGETS, unaligned=UNALIGNED)
    save_tiny_llama(root / "mlp48", seed=0, intermediate=48)
    other, _ = tiny_llama(seed=0, intermediate=48)
    peft.get_peft_model(other, peft.LoraConfig(r=4, lora_alpha=8, target_modules=["down_proj"])).save_pretrained(
        root / "adapter_mlp48")
    return root


def stage_args(root: Path, kind: str, out: Path, threshold: float) -> list[str]:
    return ["method=safemerge", f"base={root / 'base'}", f"aligned={root / 'aligned'}",
            f"finetuned={root / ('adapter' if kind == 'lora' else 'full')}", f"out_dir={out}",
            f"safemerge.threshold={threshold}", f"safemerge.weights=[{W_FT},{1 - W_FT}]"]


@pytest.fixture(scope="module")
def one_rank(models: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[Path, float, dict]]:
    """Each input kind run in this process, 1 rank, one thread (as a torchrun rank): {kind: (out, threshold,
    summary)}."""
    results = {}
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for kind in ("lora", "full"):
            threshold = threshold_between(plain_cosines(models, kind))
            out = tmp_path_factory.mktemp(f"one_{kind}")
            cfg = load_recover_config(None, stage_args(models, kind, out, threshold))
            results[kind] = (out, threshold, run(cfg, check_inputs(cfg), overwrite=True))
    finally:
        torch.set_num_threads(threads)
    return results


# ---- the math --------------------------------------------------------------------------------------------------


def test_alignment_cos_matches_the_equation() -> None:
    gen = torch.Generator().manual_seed(0)
    v, b, a = torch.randn(6, 5, generator=gen), torch.randn(6, 2, generator=gen), torch.randn(2, 5, generator=gen)
    dw = 2.0 * b @ a
    expected = plain_cos(v, dw)
    assert abs(alignment_cos(v, dw) - expected) < 1e-5
    assert abs(alignment_cos(v, dw, (2.0 * b, a)) - expected) < 1e-5  # the LoRA route, (C s B) A
    assert alignment_cos(torch.zeros(6, 5), dw) is None and alignment_cos(v, torch.zeros(6, 5)) is None
    assert 0.0 <= alignment_cos(v, torch.randn(6, 5, generator=gen)) <= 1.0  # C is PSD


# ---- (a) one rank against plain PyTorch ----------------------------------------------------------------------


def test_lora_matches_plain_pytorch(models: Path, one_rank: dict) -> None:
    out, threshold, summary = one_rank["lora"]
    aligned = TensorStore(models / "aligned", "a")
    updates = lora_updates(models / "adapter")
    cosines = plain_cosines(models, "lora")
    merged = {n for n, c in cosines.items() if c is not None and c < threshold}
    assert summary["input"] == "lora" and summary["layers"] == len(updates) == 3 * 2
    assert summary["merged"] == len(merged) and 0 < len(merged) < len(updates)
    assert sorted(merged) == summary["merged_layers"] and cosines[UNALIGNED] is None and UNALIGNED not in merged
    repaired, new_adapter = TensorStore(out / "model", "out"), lora_updates(out / "adapter")
    for name, (a, b) in updates.items():
        update = 2.0 * (b.double() @ a.double())
        factor = W_FT if name in merged else 1.0
        expected = aligned.get(name).double() + factor * update  # W_aligned + w_ft dW, or + dW
        assert torch.allclose(repaired.get(name).double(), expected, atol=1e-6), name
        new_a, new_b = new_adapter[name]
        assert torch.equal(new_a, a), name
        if name in merged:
            assert torch.allclose(new_b.double(), W_FT * b.double(), atol=1e-7), name
        else:  # inside the subspace: the adapter untouched bit for bit
            assert torch.equal(new_b, b), name
    for name in repaired.names():
        if name not in updates:
            assert torch.equal(repaired.get(name), aligned.get(name)), name
    rows = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert {r["name"] for r in rows if r["merged"]} == merged
    for r in rows:
        assert (r["cos"] is None) == (cosines[r["name"]] is None)
        if r["cos"] is not None:
            assert abs(r["cos"] - cosines[r["name"]]) < 1e-5, r


def test_full_finetune_matches_plain_pytorch(models: Path, one_rank: dict) -> None:
    out, threshold, summary = one_rank["full"]
    aligned, full = TensorStore(models / "aligned", "a"), TensorStore(models / "full", "f")
    cosines = plain_cosines(models, "full")
    merged = {n for n, c in cosines.items() if c is not None and c < threshold}
    assert summary["input"] == "full" and summary["layers"] == len(cosines) == 2 * 7
    assert summary["merged"] == len(merged) and 0 < len(merged) < len(cosines) and UNALIGNED not in merged
    repaired = TensorStore(out / "model", "out")
    for name in repaired.names():
        if name in merged:
            w_a = aligned.get(name).double()
            expected = W_FT * full.get(name).double() + (1 - W_FT) * w_a  # the weighted average of the two layers
            assert torch.allclose(repaired.get(name).double(), expected, atol=1e-6), name
        else:  # inside the subspace, V = 0, or not a target: the fine-tuned weight bit for bit
            assert torch.equal(repaired.get(name), full.get(name)), name
    assert not (out / "adapter").exists() and (out / "DONE").is_file()


# ---- (b) two ranks -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["lora", "full"])
def test_two_ranks_write_the_same_model(models: Path, one_rank: dict, kind: str, tmp_path: Path) -> None:
    one_out, threshold, one_summary = one_rank[kind]
    check(torchrun(["-m", "bulwark.recipes.recover", *stage_args(models, kind, tmp_path / "two", threshold)], 2))
    two_summary = json.loads((tmp_path / "two" / "summary.json").read_text())
    assert two_summary["world_size"] == 2 and one_summary["world_size"] == 1
    assert two_summary["merged_layers"] == one_summary["merged_layers"]
    one, two = TensorStore(one_out / "model", "one"), TensorStore(tmp_path / "two" / "model", "two")
    assert set(one.names()) == set(two.names())
    for name in one.names():  # bit for bit: only the decisions cross ranks
        assert torch.equal(one.get(name), two.get(name)), name
    if kind == "lora":
        one_adapter, two_adapter = lora_updates(one_out / "adapter"), lora_updates(tmp_path / "two" / "adapter")
        assert one_adapter.keys() == two_adapter.keys()
        for name, pair in one_adapter.items():
            assert all(torch.equal(x, y) for x, y in zip(pair, two_adapter[name], strict=True)), name
    rows = [json.loads(line) for line in (tmp_path / "two" / "log.jsonl").read_text().splitlines()]
    assert {r["rank"] for r in rows} == {0, 1}  # both ranks judged a share of the weights


# ---- (c) the CLI ---------------------------------------------------------------------------------------------


def test_cli_end_to_end_loads_with_transformers(models: Path, one_rank: dict, tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM

    threshold = one_rank["lora"][1]
    check(bulwark_cli(["recover", *stage_args(models, "lora", tmp_path / "out", threshold)]))
    out = tmp_path / "out"
    summary = json.loads((out / "summary.json").read_text())
    assert summary["method"] == "safemerge" and summary["merged_layers"] == one_rank["lora"][2]["merged_layers"]
    model = AutoModelForCausalLM.from_pretrained(out / "model").eval()
    reference = TensorStore(one_rank["lora"][0] / "model", "one")
    state = model.state_dict()
    for name in reference.names():
        assert torch.allclose(state[name], reference.get(name), atol=1e-6), name
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([[5, 6, 7, 8]])).logits
    assert torch.isfinite(logits).all()
    assert (out / "DONE").is_file() and (out / "adapter" / "adapter_config.json").is_file()


# ---- (d) bad input ------------------------------------------------------------------------------------------


def test_bad_input_is_one_line_exit_2_nothing_written(models: Path, tmp_path: Path) -> None:
    nowhere = tmp_path / "no_such_model"
    good = {"base": models / "base", "aligned": models / "aligned", "finetuned": models / "full"}
    cases = [
        ({"aligned": nowhere}, [], "aligned"),
        ({"base": nowhere}, [], "base"),
        ({"finetuned": nowhere}, [], "finetuned"),
        ({"finetuned": models / "mlp48"}, [], "has shape"),  # full fine-tune of another shape
        ({"base": models / "mlp48"}, [], "has shape"),
        ({"finetuned": models / "adapter_mlp48"}, [], "LoRA update of"),
        ({}, ["safemerge.threshold=1.5"], "safemerge.threshold = 1.5 must be in [0, 1]"),
        ({}, ["safemerge.weights=[0.9,0.2]"], "safemerge.weights"),
        ({}, ["safemerge.target_modules=[no_such_proj]"], "safemerge.target_modules"),
    ]
    out = tmp_path / "out"
    for change, extra, message in cases:
        paths = {**good, **change}
        args = ["method=safemerge", *(f"{k}={v}" for k, v in paths.items()), f"out_dir={out}", *extra]
        proc = cli_in_process(["recover", *args])
        assert proc.returncode == 2, (change, extra, proc.stderr[-2000:])
        lines = [line for line in proc.stderr.splitlines() if line.strip() and "[WARNING]" not in line]
        assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], (message, proc.stderr)
        assert not out.exists(), (change, extra)


def test_missing_base_key_and_config_ranges() -> None:
    from bulwark.errors import BulwarkInputError

    with pytest.raises(BulwarkInputError, match="base: safemerge needs"):
        load_recover_config(None, ["method=safemerge", "aligned=x", "finetuned=y"])
    for bad in ("safemerge.threshold=-0.1", "safemerge.weights=[1.2,-0.2]", "safemerge.weights=[0.5]", "safemerge.weights=[.nan,1]", "safemerge.target_modules=[]"):
        with pytest.raises(BulwarkInputError, match=bad.split("=")[0]):
            load_recover_config(None, ["method=safemerge", "aligned=x", "finetuned=y", "base=z", bad])


def test_adapter_with_more_than_lora_pairs_is_refused(models: Path, tmp_path: Path) -> None:
    """An embedding LoRA (or DoRA magnitudes, saved modules) would be dropped silently from model/: refused."""
    import peft

    from bulwark.errors import BulwarkInputError
    from bulwark.models import load_model

    model = load_model(str(models / "aligned"))
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj"], modules_to_save=["lm_head"])
    peft.get_peft_model(model, config).save_pretrained(tmp_path / "adapter")
    cfg = load_recover_config(None, ["method=safemerge", f"base={models / 'base'}", f"aligned={models / 'aligned'}",
                                     f"finetuned={tmp_path / 'adapter'}", f"out_dir={tmp_path / 'out'}"])
    with pytest.raises(BulwarkInputError, match="is not a lora_A / lora_B weight"):
        check_inputs(cfg)
    assert not (tmp_path / "out").exists()
