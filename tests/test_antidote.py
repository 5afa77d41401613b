"""bulwark recover, method=antidote: the pruning against plain PyTorch, 2-rank ZeRO-3, the CLI, bad input."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from bulwark.errors import BulwarkInputError
from bulwark.models import load_model, load_tokenizer, save_tiny_llama
from bulwark.recover.checkpoints import TensorStore
from bulwark.recover.config import load_recover_config
from tests.conftest import bulwark_cli, check, cli_in_process, save_adapter_on, save_recover_pair, torchrun

TARGETS = ["q_proj", "k_proj", "v_proj"]
SPARSITY = 0.25


@pytest.fixture(scope="module")
def models_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = save_recover_pair(tmp_path_factory.mktemp("antidote"))
    save_tiny_llama(root / "mlp48", seed=0, intermediate=48)  # same config keys, other tensor shapes
    return root


def stage_args(models_dir: Path, out: Path, finetuned: Path | None = None, rows: int = 7) -> list[str]:
    return [f"aligned={models_dir / 'A'}", f"finetuned={finetuned or models_dir / 'B'}", f"out_dir={out}",
            "method=antidote", "data.template=alpaca", "data.max_length=48", f"antidote.calibration_n={rows}",
            "antidote.micro_batch_size=3", f"antidote.sparsity={SPARSITY}"]


def run_in_process(args: list[str], one_thread: bool = True) -> dict:
    from bulwark.recipes.recover import check_inputs, run

    threads = torch.get_num_threads()
    if one_thread:
        torch.set_num_threads(1)  # as each torchrun rank: the same kernels, the same rounding
    try:
        cfg = load_recover_config(None, args)
        return run(cfg, check_inputs(cfg), overwrite=False)
    finally:
        torch.set_num_threads(threads)


# ---- the plain single-process reference ----------------------------------------------------------------------


def plain_norms_sq(folder: Path, data_dir: Path, rows: int) -> dict[str, torch.Tensor]:
    """sum over every calibration token of x_j^2 at each target's input: one unpadded forward per row,
    forward pre-hooks on a plain HF model."""
    from bulwark.data import load_examples, tokenize_example

    model = load_model(str(folder)).eval()
    tokenizer = load_tokenizer(str(folder))
    examples = [e for e in load_examples("beavertails_harmful", None, data_dir) if e.prompt.strip()][:rows]
    sums: dict[str, torch.Tensor] = {}
    handles = []
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear) and name.split(".")[-1] in TARGETS:
            def hook(_: torch.nn.Module, args: tuple, key: str = f"{name}.weight") -> None:
                sums[key] = sums.get(key, 0) + args[0].double().pow(2).sum(dim=(0, 1))
            handles.append(module.register_forward_pre_hook(hook))
    with torch.no_grad():
        for e in examples:
            ids = tokenize_example(e, tokenizer, "alpaca", 48)["input_ids"]
            model(input_ids=torch.tensor([ids]))
    for h in handles:
        h.remove()
    return sums


def plain_pruned(weight: torch.Tensor, norm_sq: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """(mask of zeroed elements, scores): per row, the k = in - floor(in * 0.75) largest |W_ij| * ||X_j||,
    ties to the higher column index (numpy lexsort on (score, column))."""
    score = (weight.double().abs() * norm_sq.double().sqrt()[None, :]).numpy()
    out, inp = score.shape
    k = inp - int(inp * (1 - SPARSITY))
    mask = np.zeros(score.shape, dtype=bool)
    for i in range(out):
        order = np.lexsort((np.arange(inp), score[i]))  # ascending by score, then column
        mask[i, order[inp - k:]] = True
    return mask, score


def assert_pruned_like_plain(source: Path, repaired: Path, data_dir: Path, rows: int = 7) -> int:
    """repaired = source with the plain mask zeroed (elements within 1e-6 of a row's cut may differ in
    rank, not in count); every other tensor unchanged. Returns the pruned count."""
    norms = plain_norms_sq(source, data_dir, rows)
    src, out = TensorStore(source, "source"), TensorStore(repaired, "repaired")
    assert len(norms) == 2 * len(TARGETS)  # 2 decoder layers
    pruned = 0
    for name in out.names():
        got, before = out.get(name), src.get(name)
        if name not in norms:
            assert torch.equal(got, before), name
            continue
        mask, score = plain_pruned(before, norms[name])
        zeroed = (got == 0).numpy() & (before != 0).numpy()
        assert torch.equal(got[~torch.from_numpy(zeroed)], before[~torch.from_numpy(zeroed)]), name
        k = mask.sum(axis=1)
        assert (zeroed.sum(axis=1) == k).all(), name
        cut = np.sort(score, axis=1)[:, score.shape[1] - k[0]][:, None]  # the smallest pruned score per row
        clear = np.abs(score - cut) > 1e-6 * np.abs(cut)
        assert (zeroed[clear] == mask[clear]).all(), name
        pruned += int(zeroed.sum())
    return pruned


# ---- (a) against plain PyTorch --------------------------------------------------------------------------------


def test_score_and_selection_helpers() -> None:
    from bulwark.recover.antidote import pruned_per_row, row_mask, scores

    w = torch.tensor([[1.0, -2.0, 3.0, 0.5], [4.0, 4.0, -4.0, 4.0]])
    norm_sq = torch.tensor([4.0, 1.0, 1.0, 16.0])
    s = scores(w, norm_sq)
    assert torch.equal(s, torch.tensor([[2.0, 2.0, 3.0, 2.0], [8.0, 4.0, 4.0, 16.0]], dtype=torch.float64))
    assert pruned_per_row(4, 0.5) == 2 and pruned_per_row(10, 0.3) == 3 and pruned_per_row(4096, 0.1) == 410
    # row 0: 3.0 first, then the ties at 2.0 go highest column first; row 1: 16 then 8
    assert row_mask(s, 0.5).tolist() == [[False, False, True, True], [True, False, False, True]]


def test_pruning_equals_plain_pytorch(models_dir: Path, data_dir: Path, tmp_path: Path,
                                      monkeypatch: pytest.MonkeyPatch) -> None:
    from bulwark.recover.antidote import input_norms_sq, target_linears

    monkeypatch.setenv("BULWARK_DATA_DIR", str(data_dir))
    summary = run_in_process(stage_args(models_dir, tmp_path / "out"))
    pruned = assert_pruned_like_plain(models_dir / "B", tmp_path / "out" / "model", data_dir)
    assert summary["pruned_elements"] == pruned and summary["input"] == "full" and not summary["zero3"]
    # q: 32 x 32, k and v: 16 x 32 in each of 2 layers; 8 of each row's 32 pruned
    assert summary["elements"] == 2 * (32 * 32 + 2 * 16 * 32) and pruned == summary["elements"] // 4
    assert summary["calibration_rows"] == 7
    assert not (tmp_path / "out" / "antidote_masks").exists()
    rows = [json.loads(line) for line in (tmp_path / "out" / "log.jsonl").read_text().splitlines()]
    assert rows[0]["event"] == "calibration" and sum(r["pruned"] for r in rows[1:]) == pruned

    # the norms themselves, padded micro-batches against unpadded rows
    from bulwark.recover.antidote import calibration_batches

    model = load_model(str(models_dir / "B")).eval()
    cfg = load_recover_config(None, stage_args(models_dir, tmp_path / "x"))
    batches = calibration_batches(cfg, load_tokenizer(str(models_dir / "B")), data_dir)
    assert [b.input_ids.shape[0] for b in batches] == [3, 3, 1]
    norms, tokens = input_norms_sq(model, batches, target_linears(model, TARGETS))
    plain = plain_norms_sq(models_dir / "B", data_dir, 7)
    assert tokens == sum(int(b.attention_mask.sum()) for b in batches) == summary["calibration_tokens"]
    for name, value in plain.items():
        assert torch.allclose(norms[name], value, rtol=1e-6), name


def test_lora_input_is_merged_then_pruned(models_dir: Path, data_dir: Path, tmp_path: Path,
                                          monkeypatch: pytest.MonkeyPatch) -> None:

    monkeypatch.setenv("BULWARK_DATA_DIR", str(data_dir))
    save_adapter_on(models_dir / "A", tmp_path / "adapter", ["q_proj", "v_proj"])
    summary = run_in_process(stage_args(models_dir, tmp_path / "out", finetuned=tmp_path / "adapter"))
    merged = tmp_path / "out" / "finetuned_merged"
    name = "model.layers.0.self_attn.q_proj.weight"
    assert not torch.equal(TensorStore(merged, "m").get(name), TensorStore(models_dir / "A", "A").get(name))
    pruned = assert_pruned_like_plain(merged, tmp_path / "out" / "model", data_dir)
    assert summary["input"] == "lora" and summary["pruned_elements"] == pruned > 0


# ---- (b) two ranks, B partitioned by ZeRO-3 ------------------------------------------------------------------------


@pytest.mark.parametrize("rows", [7, 2])  # 3 micro-batches split 2 / 1; one batch: rank 1 runs none
def test_two_ranks_zero3_equal_one_process(models_dir: Path, data_dir: Path, tmp_path: Path, rows: int,
                                           monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("BULWARK_DATA_DIR", str(data_dir))
    check(torchrun(["-m", "bulwark.recipes.recover", *stage_args(models_dir, tmp_path / "two", rows=rows)], 2,
                   data_dir))
    one = run_in_process(stage_args(models_dir, tmp_path / "one", rows=rows))
    two = json.loads((tmp_path / "two" / "summary.json").read_text())
    assert two["world_size"] == 2 and two["zero3"] and not one["zero3"]
    assert two["pruned_elements"] == one["pruned_elements"] and two["calibration_tokens"] == one["calibration_tokens"]
    a, b = TensorStore(tmp_path / "one" / "model", "one"), TensorStore(tmp_path / "two" / "model", "two")
    assert set(a.names()) == set(b.names())
    for name in a.names():
        assert torch.equal(a.get(name), b.get(name)), name
    assert not (tmp_path / "two" / "antidote_masks").exists()


# ---- (c) the CLI end to end ---------------------------------------------------------------------------------------


def test_cli_end_to_end(models_dir: Path, data_dir: Path, tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM

    out = tmp_path / "run"
    check(bulwark_cli(["recover", *stage_args(models_dir, out)], data_dir))
    model = AutoModelForCausalLM.from_pretrained(out / "model")
    q = model.get_parameter("model.layers.1.self_attn.q_proj.weight")
    assert int((q == 0).sum(dim=1).min()) >= 8  # 8 of 32 pruned in every row
    summary = json.loads((out / "summary.json").read_text())
    assert summary["method"] == "antidote" and summary["world_size"] == 1
    assert (out / "DONE").is_file() and (out / "config.yaml").is_file() and not (out / "model.tmp").exists()
    assert "antidote" in (out / "config.yaml").read_text()


# ---- (d) bad input ---------------------------------------------------------------------------------------------


def test_config_ranges_are_one_line() -> None:
    for value in ("0", "1", "1.5", "-0.1"):
        with pytest.raises(BulwarkInputError, match=r"antidote.sparsity = .* must be in \(0, 1\)"):
            load_recover_config(None, ["aligned=x", "finetuned=y", "method=antidote", f"antidote.sparsity={value}"])
    with pytest.raises(BulwarkInputError, match="antidote.calibration_n"):
        load_recover_config(None, ["aligned=x", "finetuned=y", "method=antidote", "antidote.calibration_n=0"])
    with pytest.raises(BulwarkInputError, match="did you mean 'sparsity'"):
        load_recover_config(None, ["aligned=x", "finetuned=y", "method=antidote", "antidote.sparsty=0.1"])


def test_inputs_checked_before_any_rank(models_dir: Path, data_dir: Path, tmp_path: Path) -> None:
    from bulwark.recipes.recover import check_inputs

    base = stage_args(models_dir, tmp_path / "out") + [f"data.dir={data_dir}"]
    answers = tmp_path / "prompts_only.jsonl"
    answers.write_text(json.dumps({"prompt": "how do I do a bad thing?"}) + "\n")
    for extra, message in (
        ([f"antidote.calibration={answers}", "antidote.calibration_format=prompt_only"], "have no answer"),
        (["antidote.target_modules=[nope_proj]"], "no 2-D weight of that name"),
    ):
        with pytest.raises(BulwarkInputError, match=message):
            check_inputs(load_recover_config(None, base + extra))
    assert not (tmp_path / "out").exists()


def test_cli_bad_input_exits_2_with_one_line(models_dir: Path, data_dir: Path, tmp_path: Path) -> None:
    empty = tmp_path / "beavertails_empty.jsonl"
    empty.write_text(json.dumps({"prompt": "  ", "response": "x"}) + "\n")
    args = stage_args(models_dir, tmp_path / "out")
    cases = (
        ([f"aligned={tmp_path / 'no_such_model'}"], "aligned: "),
        ([f"finetuned={tmp_path / 'no_such_model'}"], "finetuned: "),
        ([f"antidote.calibration={empty}"], "antidote.calibration: "),
        (["antidote.sparsity=1.0"], "antidote.sparsity = 1.0 must be in (0, 1)"),
        (["antidote.sparsity=0"], "antidote.sparsity = 0"),
        ([f"finetuned={models_dir / 'mlp48'}"], "has shape"),
    )
    for extra, message in cases:
        proc = cli_in_process(["recover", *args, *extra], data_dir)
        assert proc.returncode == 2, proc.stderr[-2000:]
        lines = [line for line in proc.stderr.splitlines() if line.strip() and "[WARNING]" not in line]
        assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], proc.stderr[-2000:]
    assert not (tmp_path / "out").exists()
