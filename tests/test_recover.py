"""bulwark recover, method=restore: selection vs plain PyTorch, exact restores, rollback, 2 ranks, bad input."""

from __future__ import annotations

import json
import math
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from bulwark.errors import BulwarkInputError
from bulwark.models import load_model, save_tiny_llama
from bulwark.recover.checkpoints import TensorStore, check_compatible
from bulwark.recover.config import load_recover_config
from bulwark.recover.hidden import make_batches
from bulwark.recover.restore import RestoreConfig, Restorer, chosen_weights
from tests.conftest import bulwark_cli, check, save_adapter_on, save_recover_pair, torchrun

# ---- fixtures: A (tiny seed 0), B = A + noise, and models that do not fit A -------------------------------


@pytest.fixture(scope="module")
def models_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = save_recover_pair(tmp_path_factory.mktemp("recover"))
    save_tiny_llama(root / "wide", seed=0, hidden_size=48)  # another architecture (config differs)
    save_tiny_llama(root / "mlp48", seed=0, intermediate=48)  # same config keys checked, other shapes
    return root


def prompts() -> list[list[int]]:
    """Seven token-id prompts of different lengths (three micro-batches of 3, 3, 1 at size 3)."""
    gen = torch.Generator().manual_seed(7)
    return [torch.randint(3, 250, (5 + 2 * i,), generator=gen).tolist() for i in range(7)]


def restore_cfg(**kw: object) -> RestoreConfig:
    values = {"fraction": 0.005, "steps": 4, "warmup_steps": 2, "checkpoint_every": 2, "micro_batch_size": 3}
    return RestoreConfig(**{**values, **kw})


def make_restorer(models_dir: Path, cfg: RestoreConfig, log: list | None = None) -> Restorer:
    model = load_model(str(models_dir / "B")).eval()
    return Restorer(model, TensorStore(models_dir / "A", "A"), TensorStore(models_dir / "B", "B"), cfg,
                    log.append if log is not None else None)


def direction_of(models_dir: Path, which: str, cfg: RestoreConfig) -> torch.Tensor:
    """Plain PyTorch: mean last-token hidden state after layer L (hidden_states[L]) over the prompts."""
    model = load_model(str(models_dir / which)).eval()
    layer, _, _ = chosen_weights(model, cfg)
    batch = make_batches(prompts(), 2, 100)[0]
    with torch.no_grad():
        out = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, output_hidden_states=True)
    return out.hidden_states[layer][torch.arange(len(batch.last)), batch.last].double().mean(dim=0)


def state_of(restorer: Restorer) -> dict[str, torch.Tensor]:
    return {name: p.detach().clone() for name, p in restorer.params.items()}


def assert_a_or_b(models_dir: Path, params: dict[str, torch.Tensor], restored: dict[str, torch.Tensor]) -> None:
    """Restored elements hold A's values exactly, every other element B's."""
    a, b = TensorStore(models_dir / "A", "A"), TensorStore(models_dir / "B", "B")
    for name, value in params.items():
        mask = torch.zeros(value.numel(), dtype=torch.bool)
        mask[restored.get(name, torch.empty(0, dtype=torch.long))] = True
        expected = torch.where(mask, a.get(name).flatten(), b.get(name).flatten())
        assert torch.equal(value.flatten(), expected), name


# ---- the restore step --------------------------------------------------------------------------------------


def test_selection_equals_plain_pytorch(models_dir: Path) -> None:
    cfg = restore_cfg()
    d_harm = direction_of(models_dir, "A", cfg)
    restorer = make_restorer(models_dir, cfg)
    batches = make_batches(prompts(), 2, cfg.micro_batch_size)
    _, picked, counts = restorer.restore_step(batches, d_harm)

    # the same step in plain PyTorch: one batch, autograd through the whole model
    model = load_model(str(models_dir / "B")).eval()
    layer, _, chosen = chosen_weights(model, cfg)
    whole = make_batches(prompts(), 2, 100)[0]
    out = model(input_ids=whole.input_ids, attention_mask=whole.attention_mask, output_hidden_states=True)
    mean = out.hidden_states[layer][torch.arange(len(whole.last)), whole.last].mean(dim=0)
    (-torch.nn.functional.cosine_similarity(mean, d_harm.float(), dim=0)).backward()
    a, b = TensorStore(models_dir / "A", "A"), TensorStore(models_dir / "B", "B")
    scores = []
    for _, name, param in chosen:
        grad = param.grad.flatten()
        assert torch.allclose(restorer.owned[name].grad.float(), grad, rtol=1e-4, atol=1e-7), name
        agree = torch.sign(b.get(name).flatten() - a.get(name).flatten()) == torch.sign(grad)
        scores.append(torch.where(agree, grad.abs(), torch.full_like(grad, -1.0)))
    flat = torch.cat(scores)
    k = math.ceil(cfg.fraction * flat.numel())
    expected = set(torch.topk(flat, k).indices.tolist())
    offsets, got, start = {}, set(), 0
    for _, name, param in chosen:
        offsets[name] = start
        start += param.numel()
    for name, idx in picked.items():
        got |= {offsets[name] + int(i) for i in idx}
    assert len(got) == k == sum(counts.values())
    threshold = torch.topk(flat, k).values[-1]
    # only elements within float noise of the k-th value may differ between the two computations
    for i in got ^ expected:
        assert abs(float(flat[i]) - float(threshold)) <= 1e-4 * float(threshold)
    assert len(got ^ expected) <= 2
    assert_a_or_b(models_dir, state_of(restorer), picked)


def test_gradients_accumulate_and_restored_stay_out(models_dir: Path) -> None:
    cfg = restore_cfg()
    restorer = make_restorer(models_dir, cfg)
    batches = make_batches(prompts(), 2, cfg.micro_batch_size)
    d_harm = direction_of(models_dir, "A", cfg)
    _, first, _ = restorer.restore_step(batches, d_harm)
    sum_before = {n: o.grad.clone() for n, o in restorer.owned.items()}
    _, fresh = restorer.gradient(batches, d_harm)  # the gradient at W after step 1 (changes no state)
    _, second, _ = restorer.restore_step(batches, d_harm)
    for name, own in restorer.owned.items():  # the summed gradient = step 1's + step 2's
        assert torch.allclose(own.grad, sum_before[name] + fresh[name], rtol=1e-6, atol=1e-12)
        overlap = set(first.get(name, torch.empty(0)).tolist()) & set(second.get(name, torch.empty(0)).tolist())
        assert not overlap, f"{name}: an element restored twice"
    both = {n: torch.cat([first.get(n, torch.empty(0, dtype=torch.long)), second.get(n, torch.empty(0, dtype=torch.long))])
            for n in restorer.names}
    assert_a_or_b(models_dir, state_of(restorer), both)


def test_collectives_at_world_size_1_change_nothing(models_dir: Path) -> None:
    """The device-correct path: with a process group of one rank, every reduce, gather and count goes
    through bulwark.engine's collective helpers (which run the collective at world size 1 too); the
    selection, summed gradients and written weights are exactly those of a run without a group. The state
    lives on the weights' device (the CPU here; tests/test_gpu_recover.py covers CUDA)."""
    from bulwark.engine.dist import free_port
    from bulwark.recover.hidden import weights_device

    cfg = restore_cfg(rollback_fraction=0.5)
    batches = make_batches(prompts(), 2, cfg.micro_batch_size)
    d_harm = direction_of(models_dir, "A", cfg)

    def two_steps() -> tuple[Restorer, list[dict[str, torch.Tensor]], dict[str, torch.Tensor]]:
        restorer = make_restorer(models_dir, cfg)
        d_benign = restorer.direction(batches[::-1])
        picks = [restorer.restore_step(batches, d_harm)[1] for _ in range(2)]
        restorer.rollback_step(batches[::-1], d_benign, picks[-1])
        return restorer, picks, restorer.gather_masks(restorer.snapshot())

    plain, plain_picks, plain_masks = two_steps()
    assert not torch.distributed.is_initialized()
    torch.distributed.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1)
    try:
        grouped, grouped_picks, grouped_masks = two_steps()
    finally:
        torch.distributed.destroy_process_group()
    assert grouped.device == weights_device(grouped.model) == torch.device("cpu")
    for own in grouped.owned.values():
        assert {own.a.device, own.grad.device, own.restored.device} == {grouped.device}
    for mine, theirs in zip(plain_picks, grouped_picks, strict=True):
        assert mine.keys() == theirs.keys() and all(torch.equal(mine[n], theirs[n]) for n in mine)
    assert plain_masks.keys() == grouped_masks.keys()
    assert all(torch.equal(plain_masks[n], grouped_masks[n]) and plain_masks[n].device.type == "cpu"
               for n in plain_masks)
    for name, own in plain.owned.items():
        assert torch.equal(own.grad, grouped.owned[name].grad), name
    state, grouped_state = state_of(plain), state_of(grouped)
    assert all(torch.equal(state[n], grouped_state[n]) for n in state)


# ---- rollback and checkpoints -------------------------------------------------------------------------------


def scripted(scores: list[float]) -> Iterator[float]:
    """A crafted task metric: the given scores in call order (B's first), then the last one forever."""
    yield from scores
    while True:
        yield scores[-1]


def run_with(models_dir: Path, scores: list[float], **cfg: object) -> tuple[Restorer, object, list[dict]]:
    config = restore_cfg(**cfg)
    log: list[dict] = []
    restorer = make_restorer(models_dir, config, log)
    batches = make_batches(prompts(), 2, config.micro_batch_size)
    d_harm = direction_of(models_dir, "A", config)
    d_benign = restorer.direction(batches[::-1])
    it = scripted(scores)
    result = restorer.run(batches, batches[::-1], d_harm, d_benign, lambda model: next(it))
    return restorer, result, log


def test_no_rollback_when_the_task_holds(models_dir: Path) -> None:
    restorer, result, log = run_with(models_dir, [80.0, 79.0])  # 79 >= 0.95 * 80 = 76
    assert not result.rolled_back and result.kept_step == 4
    steps = [r for r in log if r["event"] == "step"]
    assert [r["phase"] for r in steps] == ["restore"] * 4
    assert all(r["restored_total"] == restorer.k for r in steps)
    assert all("rolled_back" not in r for r in steps)
    assert [c["step"] for c in result.checkpoints] == [2, 4]
    assert sum(int(i.numel()) for i in result.restored.values()) == 4 * restorer.k
    assert_a_or_b(models_dir, state_of(restorer), result.restored)


def test_rollback_triggers_below_the_floor(models_dir: Path) -> None:
    restorer, result, log = run_with(models_dir, [80.0, 70.0, 80.0])  # warm-up check: 70 < 76
    assert result.rolled_back
    restart = [r for r in log if r.get("action")]
    assert len(restart) == 1 and restart[0]["step"] == 2
    steps = [r for r in log if r["event"] == "step"]
    assert [r["phase"] for r in steps] == ["restore"] * 2 + ["rollback"] * 4  # restarted from B: 4 more steps
    assert steps[2]["changed"] == steps[2]["restored_total"] - steps[2]["rolled_back_total"]  # B + one step
    for row in steps[2:]:
        assert 0 < row["rolled_back_total"] <= math.ceil(0.2 * row["restored_total"])
        for name, n in row["rolled_back"].items():
            assert n <= row["restored"][name]
    assert result.kept_step == 4
    assert sum(int(i.numel()) for i in result.restored.values()) == steps[-1]["changed"]
    assert_a_or_b(models_dir, state_of(restorer), result.restored)


def test_keeps_the_last_checkpoint_above_the_floor(models_dir: Path) -> None:
    restorer, result, log = run_with(models_dir, [80.0, 78.0, 60.0], steps=6)  # steps 2 ok, 4 and 6 below
    assert not result.rolled_back and result.kept_step == 2
    assert [c["kept"] for c in result.checkpoints] == [True, False, False]
    kept_changed = [r for r in log if r["event"] == "step"][1]["changed"]
    assert sum(int(i.numel()) for i in result.restored.values()) == kept_changed == 2 * restorer.k


def test_rollback_off_keeps_going(models_dir: Path) -> None:
    _, result, _ = run_with(models_dir, [80.0, 70.0], rollback=False)
    assert not result.rolled_back and result.kept_step == 0  # nothing above the floor: B unchanged
    assert sum(int(i.numel()) for i in result.restored.values()) == 0


# ---- the stage: 2 ranks == 1 process, files written --------------------------------------------------------


def stage_args(models_dir: Path, out: Path) -> list[str]:
    return [f"aligned={models_dir / 'A'}", f"finetuned={models_dir / 'B'}", f"out_dir={out}",
            "data.harmful_n=7", "data.task_n=4", "data.max_length=48", "task.metric=loss", "task.n=4",
            "restore.micro_batch_size=3", "restore.steps=4", "restore.warmup_steps=2",
            "restore.checkpoint_every=2", "restore.fraction=0.005"]


def test_two_ranks_restore_the_same_elements_as_one_process(models_dir: Path, data_dir: Path, tmp_path: Path,
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    from bulwark.recipes.recover import check_inputs, run

    monkeypatch.setenv("BULWARK_DATA_DIR", str(data_dir))
    proc = torchrun(["-m", "bulwark.recipes.recover", *stage_args(models_dir, tmp_path / "two")], 2, data_dir)
    check(proc)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as each torchrun rank: same kernels, same rounding
    try:
        cfg = load_recover_config(None, stage_args(models_dir, tmp_path / "one"))
        summary = run(cfg, check_inputs(cfg), overwrite=False)
    finally:
        torch.set_num_threads(threads)
    two = json.loads((tmp_path / "two" / "summary.json").read_text())
    assert two["world_size"] == 2 and summary["world_size"] == 1
    assert two["zero3"] and not summary["zero3"]  # 2 ranks: W partitioned (launch.zero3=auto); 1: plain
    assert two["changed_elements"] == summary["changed_elements"] == 4 * summary["k_per_step"]
    one_model = TensorStore(tmp_path / "one" / "model", "one")
    two_model = TensorStore(tmp_path / "two" / "model", "two")
    assert set(one_model.names()) == set(two_model.names())
    for name in one_model.names():
        assert torch.equal(one_model.get(name), two_model.get(name)), name
    # the saved model: restored elements are A's values, everything else B's
    a, b = TensorStore(models_dir / "A", "A"), TensorStore(models_dir / "B", "B")
    changed = 0
    for name in one_model.names():
        got, va, vb = one_model.get(name), a.get(name), b.get(name)
        assert torch.all((got == va) | (got == vb)), name
        changed += int(((got != vb) & (got == va)).sum())
    assert changed == summary["changed_elements"]
    rows = [json.loads(line) for line in (tmp_path / "two" / "log.jsonl").read_text().splitlines()]
    steps = [r for r in rows if r["event"] == "step"]
    assert len(steps) == 4 and all(sum(r["restored"].values()) == r["restored_total"] for r in steps)
    assert (tmp_path / "one" / "model" / "config.json").is_file() and (tmp_path / "one" / "config.yaml").is_file()
    assert not (tmp_path / "one" / "model.tmp").exists()


def test_two_ranks_zero3_generation_metrics_finish(models_dir: Path, data_dir: Path, tmp_path: Path) -> None:
    """The accuracy metric (5 rows) and HS (3 prompts) split unevenly over 2 partitioned ranks: every
    generation is a run of collectives, so an uneven share would hang (the torchrun timeout fails it)."""
    args = [f"aligned={models_dir / 'A'}", f"finetuned={models_dir / 'B'}", f"out_dir={tmp_path / 'out'}",
            "data.template=alpaca", "data.harmful_n=5", "data.task_n=3", "data.max_length=48", "task.metric=accuracy",
            "task.n=5", "task.max_new_tokens=3", "task.batch_size=2", "eval.n=3", "eval.max_new_tokens=4",
            "restore.steps=2", "restore.warmup_steps=1", "restore.checkpoint_every=1", "restore.micro_batch_size=2"]
    check(torchrun(["-m", "bulwark.recipes.recover", *args], 2, data_dir))
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert summary["zero3"] and summary["world_size"] == 2 and "accuracy" in summary["task_metric"]
    assert [c["step"] for c in summary["checkpoints"]] == [1, 2]
    assert all(0.0 <= c["harmful_score"] <= 100.0 for c in summary["checkpoints"])
    assert (tmp_path / "out" / "model" / "config.json").is_file()


def test_zero3_partitioned_model_matches_plain(models_dir: Path, tmp_path: Path) -> None:
    """What recover does with a partitioned W (2 gloo ranks, stage3_param_persistence_threshold 0) equals
    plain PyTorch: every weight really split, a forward gathering one module at a time, an in-slice edit,
    uneven generation shares, and the layer-by-layer hidden state with a rank that has no batch."""
    from bulwark.eval.generate import generate
    from bulwark.models import load_tokenizer

    scenario = Path(__file__).parent / "scenarios" / "recover_zero3.py"
    check(torchrun([str(scenario), str(models_dir / "B"), str(tmp_path)], 2))
    plain = load_model(str(models_dir / "B")).eval()
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    for name, p in plain.named_parameters():
        for r in ranks:
            whole, local, numel = r["held"][name]
            assert whole == 0 and local == math.ceil(p.numel() / 2) and numel == p.numel(), (name, r["held"][name])

    ids = torch.arange(3, 3 + 2 * 9).view(2, 9) % 200
    with torch.no_grad():
        expected = plain(input_ids=ids).logits
        hidden = plain(input_ids=torch.tensor([[5, 6, 7, 8], [9, 10, 11, 0]]), attention_mask=torch.tensor(
            [[1, 1, 1, 1], [1, 1, 1, 0]]), output_hidden_states=True).hidden_states[1]
    assert torch.allclose(torch.load(tmp_path / "logits.pt"), expected, rtol=1e-5, atol=1e-5)
    mean = (hidden[0, 3].double() + hidden[1, 2].double()) / 2
    assert torch.allclose(torch.load(tmp_path / "hidden.pt"), mean, rtol=1e-5, atol=1e-6)

    edited = torch.load(tmp_path / "edited.pt")
    want = plain.get_parameter(edited["name"]).detach().clone().flatten()
    want[edited["index"]] = torch.tensor([1.5, -2.5, 3.5, -4.5])
    assert torch.equal(edited["value"].flatten(), want)

    tokenizer = load_tokenizer(str(models_dir / "B"))
    tokenizer.padding_side = "left"
    got = {**ranks[0]["outputs"], **ranks[1]["outputs"]}
    prompts, budgets = ["hello there", "a b c d e f g", "one two"], {0: 3, 2: 6, 1: 3}
    for i, prompt in enumerate(prompts):
        assert got[str(i)] == generate(plain, tokenizer, [prompt], budgets[i], batch_size=1)[0], i


# ---- bad input ------------------------------------------------------------------------------------------------


def test_incompatible_models_are_one_clear_error(models_dir: Path, tmp_path: Path) -> None:
    with pytest.raises(BulwarkInputError, match="differ in hidden_size"):
        check_compatible(models_dir / "A", models_dir / "wide")
    with pytest.raises(BulwarkInputError, match="has shape .* in the aligned model but"):
        check_compatible(models_dir / "A", models_dir / "mlp48")
    other = tmp_path / "other_type"
    shutil.copytree(models_dir / "B", other)
    config = json.loads((other / "config.json").read_text())
    (other / "config.json").write_text(json.dumps({**config, "model_type": "mistral"}))
    with pytest.raises(BulwarkInputError, match="differ in model_type"):
        check_compatible(models_dir / "A", other)


def test_config_errors_name_the_key() -> None:
    with pytest.raises(BulwarkInputError, match="did you mean 'fraction'"):
        load_recover_config(None, ["aligned=x", "finetuned=y", "restore.fractoin=0.1"])
    with pytest.raises(BulwarkInputError, match="restore.fraction"):
        load_recover_config(None, ["aligned=x", "finetuned=y", "restore.fraction=2"])
    with pytest.raises(BulwarkInputError, match="finetuned"):
        load_recover_config(None, ["aligned=x"])
    with pytest.raises(BulwarkInputError, match="base"):
        load_recover_config(None, ["aligned=x", "finetuned=y", "method=safelora"])


def test_layer_range_checked(models_dir: Path) -> None:
    model = load_model(str(models_dir / "B"))
    with pytest.raises(BulwarkInputError, match="restore.layer = 3"):
        chosen_weights(model, RestoreConfig(layer=3))
    with pytest.raises(BulwarkInputError, match="end at or below"):
        chosen_weights(model, RestoreConfig(layer=1, layers_to=2))


def test_cli_bad_input_exits_2_with_one_line(models_dir: Path, data_dir: Path, tmp_path: Path) -> None:
    base = [f"aligned={models_dir / 'A'}", f"out_dir={tmp_path / 'out'}"]
    for extra, message in (
        ([f"finetuned={models_dir / 'wide'}"], "differ in hidden_size"),
        ([f"finetuned={models_dir / 'B'}", "data.harmful=no_such_prompts"], "data.harmful: data file 'no_such_prompts' not found"),
        ([f"finetuned={models_dir / 'B'}", "launch.nproc=2", "launch.ds_config=zero2"], "give a stage-3 config"),
    ):
        proc = bulwark_cli(["recover", *base, *extra], data_dir, timeout=120)
        assert proc.returncode == 2, proc.stderr[-2000:]
        lines = [line for line in proc.stderr.splitlines() if line.strip() and "[WARNING]" not in line]
        assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], proc.stderr[-2000:]
    assert not (tmp_path / "out").exists()


def test_empty_prompt_file_is_one_clear_error(tmp_path: Path) -> None:
    from bulwark.recover.task import load_rows

    empty = tmp_path / "my_prompts.jsonl"
    empty.write_text(json.dumps({"prompt": "   "}) + "\n")
    with pytest.raises(BulwarkInputError, match="data.harmful: .*my_prompts.jsonl has no prompts"):
        load_rows(str(empty), 64, None, "data.harmful", "prompt_only")


def test_lora_adapter_as_b_is_merged_first(models_dir: Path, data_dir: Path, tmp_path: Path,
                                          monkeypatch: pytest.MonkeyPatch) -> None:

    from bulwark.recipes.recover import check_inputs, run

    monkeypatch.setenv("BULWARK_DATA_DIR", str(data_dir))
    save_adapter_on(models_dir / "A", tmp_path / "adapter", ["q_proj"])
    args = [a for a in stage_args(models_dir, tmp_path / "out") if not a.startswith("finetuned=")]
    cfg = load_recover_config(None, [*args, f"finetuned={tmp_path / 'adapter'}", "restore.steps=2"])
    summary = run(cfg, check_inputs(cfg), overwrite=False)
    assert summary["changed_elements"] == 2 * summary["k_per_step"]
    merged = TensorStore(tmp_path / "out" / "finetuned_merged", "merged")
    repaired = TensorStore(tmp_path / "out" / "model", "repaired")
    a = TensorStore(models_dir / "A", "A")
    name = "model.layers.0.self_attn.q_proj.weight"
    assert not torch.equal(merged.get(name), a.get(name))  # the adapter really changed q_proj
    for n in repaired.names():
        got = repaired.get(n)
        assert torch.all((got == a.get(n)) | (got == merged.get(n))), n
