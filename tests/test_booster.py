"""Booster: the engine's steps against a plain single-process PyTorch computation of the paper's update.

    g = ∇f(w) + λ (∇h(w) - ∇h(w')),   w' = w - α ∇h(w) / (||∇h(w)|| + 1e-7),   w <- w - lr g

The plain version below is written independently of bulwark.defenses.booster: one model, .grad
fields, perturbation by in-place edits of the parameters and a full state-dict copy to undo it.
Over a step, ∇h is the mean over ranks and micro-batches of the per-micro-batch loss gradients.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from bulwark.defenses import build_defense
from bulwark.defenses.booster import Booster, BoosterConfig, BoosterVaccine, BoosterVaccineConfig
from bulwark.errors import BulwarkInputError
from bulwark.losses import model_loss
from tests.conftest import SCENARIOS, check, plain_model, torchrun

LR = 0.5  # the scenario's SGD learning rate
BIG = {"lamb": 5.0, "alpha": 0.5}  # a larger α than the default so that the λ term moves weights well past 1e-5
Batch = dict[str, torch.Tensor]


# ---- the plain computation -------------------------------------------------------------------------




def mean_grad(params: list[torch.nn.Parameter], losses: list) -> list[torch.Tensor]:
    """Gradient of the mean of the given loss thunks (each recomputed at the current weights)."""
    for p in params:
        p.grad = None
    for make in losses:
        (make() / len(losses)).backward()
    return [p.grad.detach().clone() for p in params]


def vaccine_grad(model: torch.nn.Module, params: list[torch.nn.Parameter], rank_batches: list[Batch],
                 rho: float) -> list[torch.Tensor]:
    """Mean over ranks of ∇_w f_r(w; h + e_r), e_r = ρ g_r / (sqrt(Σ_r ||g_r||²) + 1e-7), g_r = ∂f_r/∂h
    at the attention outputs h (one micro-batch per rank)."""
    llama = model.get_base_model() if hasattr(model, "get_base_model") else model
    attn = [layer.self_attn for layer in llama.model.layers]
    add: dict[int, torch.Tensor] = {}

    def hook_for(i: int):
        def hook(module, args, output):
            return (output[0] + add[i], *output[1:]) if i in add else None
        return hook

    handles = [a.register_forward_hook(hook_for(i)) for i, a in enumerate(attn)]
    captured: list[list[torch.Tensor]] = []
    for batch in rank_batches:  # pass 1 on every rank: ∂f_r/∂h_l through zero probes
        rows, tokens = batch["input_ids"].shape
        probes = {i: torch.zeros(rows, tokens, llama.config.hidden_size, requires_grad=True) for i in range(len(attn))}
        add.update(probes)
        captured.append(list(torch.autograd.grad(model_loss(model, batch), list(probes.values()))))
        add.clear()
    norm = torch.sqrt(sum((g ** 2).sum() for grads in captured for g in grads))
    for p in params:
        p.grad = None
    for batch, grads in zip(rank_batches, captured, strict=True):
        add.update({i: rho * g / (norm + 1e-7) for i, g in enumerate(grads)})
        (model_loss(model, batch) / len(rank_batches)).backward()
        add.clear()
    for h in handles:
        h.remove()
    return [p.grad.detach().clone() for p in params]


def plain_booster(model_dir: Path, lora: bool, before: dict, ranks: list[dict], cfg: BoosterConfig,
                  doubled: bool = False) -> dict[str, torch.Tensor]:
    model = plain_model(model_dir, lora, before)
    params = [p for p in model.parameters() if p.requires_grad]

    def batches(step: int, key: str) -> list[Batch]:
        out = []
        for result in ranks:
            micro = [{k: torch.tensor(v) for k, v in b.items()} for b in result["log"][step][key]]
            if doubled:
                micro = [{k: torch.cat([b[k] for b in micro]) for k in micro[0]}]
            out += micro
        return out

    for step in range(len(ranks[0]["log"])):
        harmful = [lambda b=b: model_loss(model, b) for b in batches(step, "harmful")]
        g_h = mean_grad(params, harmful)
        norm = torch.sqrt(sum((g ** 2).sum() for g in g_h))
        saved = {k: v.clone() for k, v in model.state_dict().items()}
        with torch.no_grad():
            for p, g in zip(params, g_h, strict=True):
                p -= cfg.alpha * g / (norm + cfg.eps)
        g_p = mean_grad(params, harmful)
        model.load_state_dict(saved)
        if isinstance(cfg, BoosterVaccineConfig):
            g_f = vaccine_grad(model, params, batches(step, "main"), cfg.rho)
        else:
            g_f = mean_grad(params, [lambda b=b: model_loss(model, b) for b in batches(step, "main")])
        with torch.no_grad():
            for p, f, h, hp in zip(params, g_f, g_h, g_p, strict=True):
                p -= LR * (f + cfg.lamb * (h - hp))
    return {k: v.detach() for k, v in model.state_dict().items()}


# ---- running the engine ----------------------------------------------------------------------------


def run_scenario(tmp: Path, model_dir: Path, nproc: int, ds: str, lora: bool, grad_accum: int, mbs: int,
                 steps: int, ragged: bool, config: dict) -> tuple[list[dict], dict, dict]:
    out = tmp / "booster"
    args = [str(model_dir), str(out), ds, str(int(lora)), str(grad_accum), str(mbs), str(steps),
            str(int(ragged)), json.dumps(config)]
    check(torchrun([str(SCENARIOS / "booster_step.py"), *args], nproc=nproc))
    ranks = [json.loads(Path(f"{out}.rank{r}.json").read_text()) for r in range(nproc)]
    return ranks, torch.load(f"{out}.before.pt"), torch.load(f"{out}.after.pt")


def assert_matches(after: dict, expected: dict, before: dict, other: dict | None = None) -> None:
    for name, value in expected.items():
        torch.testing.assert_close(after[name], value, atol=1e-5, rtol=0, msg=name)
    moved = max((expected[k] - before[k]).abs().max().item() for k in expected)
    assert moved > 1e-3, "the steps changed no weight: the comparison would be vacuous"
    if other is not None:  # the term switched off in `other` changes the result well beyond the tolerance
        gap = max((expected[k] - other[k]).abs().max().item() for k in expected)
        assert gap > 1e-4, gap


def persistent_ds_config(tmp: Path) -> Path:
    """ZeRO-3 with a persistence threshold that keeps the tiny model's small parameters gathered."""
    from bulwark.engine.core import read_ds_config

    raw = read_ds_config("zero3")
    raw["zero_optimization"]["stage3_param_persistence_threshold"] = 1000
    path = tmp / "zero3_persistent.json"
    path.write_text(json.dumps(raw))
    return path


@pytest.mark.parametrize(
    ("nproc", "lora", "persistent"),
    [(2, False, False), (2, True, False), (2, False, True)],
    ids=["2rank-zero3-full", "2rank-zero3-lora", "2rank-zero3-full-persistent-params"],
)
def test_steps_equal_plain_pytorch(tmp_path: Path, tiny_model_dir: Path, nproc: int, lora: bool,
                                   persistent: bool) -> None:
    ds = str(persistent_ds_config(tmp_path)) if persistent else "zero3"
    ranks, before, after = run_scenario(tmp_path, tiny_model_dir, nproc, ds, lora, 1, 2, 2, True, BIG)
    cfg = BoosterConfig(**BIG)
    expected = plain_booster(tiny_model_dir, lora, before, ranks, cfg)
    without = plain_booster(tiny_model_dir, lora, before, ranks, BoosterConfig(**{**BIG, "lamb": 0.0}))
    assert_matches(after, expected, before, without)
    for r in ranks:
        assert all(row["restored"] for row in r["log"]), "weights not restored bit for bit after the harmful phase"
        assert len(r["moved"]) == 2 and min(r["moved"]) > 1e-3, r["moved"]  # the perturbation was really applied
        metrics = r["log"][0]["metrics"]
        assert metrics["booster_h_perturbed"] < metrics["booster_h"]  # a descent step on h lowers h
        assert (r["persistent"] > 0) == persistent


def test_grad_accumulation_equals_doubled_micro_batch(tmp_path: Path, tiny_model_dir: Path) -> None:
    ranks, before, after = run_scenario(tmp_path, tiny_model_dir, 2, "zero3", False, 2, 2, 2, False, BIG)
    expected = plain_booster(tiny_model_dir, False, before, ranks, BoosterConfig(**BIG), doubled=True)
    assert_matches(after, expected, before)
    assert all(row["restored"] for r in ranks for row in r["log"])
    assert [len(row["harmful"]) for row in ranks[0]["log"]] == [2, 2]  # one harmful batch per micro-batch


def test_single_process_zero3(tmp_path: Path, tiny_model_dir: Path) -> None:
    ranks, before, after = run_scenario(tmp_path, tiny_model_dir, 1, "zero3", True, 1, 2, 1, True, BIG)
    assert_matches(after, plain_booster(tiny_model_dir, True, before, ranks, BoosterConfig(**BIG)), before)


def test_booster_with_vaccine_alignment_pass_equals_plain(tmp_path: Path, tiny_model_dir: Path) -> None:
    """booster+vaccine: Booster's harmful phase, then Vaccine's two-pass refusal loss (one micro-batch per rank)."""
    config = {**BIG, "rho": 2.0}
    ranks, before, after = run_scenario(tmp_path, tiny_model_dir, 2, "zero3", False, 1, 2, 2, True,
                                        {"name": "booster+vaccine", **config})
    expected = plain_booster(tiny_model_dir, False, before, ranks, BoosterVaccineConfig(**config))
    no_vaccine = plain_booster(tiny_model_dir, False, before, ranks, BoosterVaccineConfig(**{**config, "rho": 0.0}))
    assert_matches(after, expected, before, no_vaccine)
    assert all(row["restored"] for r in ranks for row in r["log"])
    assert ranks[0]["log"][0]["metrics"]["vaccine_grad_norm"] > 0


# ---- in process: the registry ----------------------------------------------------------------------


def test_registered_for_align_with_reference_defaults() -> None:
    booster = build_defense({"name": "booster"}, "align", 10)
    assert isinstance(booster, Booster)
    assert booster.config == BoosterConfig(lamb=5.0, alpha=0.1, eps=1e-7)
    assert Booster.side_streams == ("harmful",)
    with pytest.raises(BulwarkInputError, match="align"):
        build_defense({"name": "booster"}, "finetune", 10)
    with pytest.raises(BulwarkInputError, match="lamb"):
        build_defense({"name": "booster", "lamb": -1}, "align", 10)
    composed = build_defense({"name": "booster+vaccine"}, "align", 10)
    assert isinstance(composed, BoosterVaccine) and composed.side_streams == ("harmful",)
    assert composed.config == BoosterVaccineConfig(lamb=5.0, alpha=0.1, eps=1e-7, rho=5.0, layers="attention")
