"""SMART: the engine's steps against a plain single-process PyTorch computation of the paper's equation.

    loss = CE(f(x)) + λ_s SymKL(f(x), f(x + δ)) + μ SymKL(f(x), f(x; θ_ema)),  θ_ema ← β θ_ema + (1 - β) θ

The plain version below is written independently of bulwark.defenses.smart: separate clean and
perturbed forwards through `inputs_embeds` (the defense stacks them into one batch and perturbs
through a hook), a full EMA model copy (the defense keeps a flat shard per rank), KL via F.kl_div.
Hyper-parameters are enlarged so that every term moves the weights far more than the tolerance.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from bulwark.data.collate import pad_collate
from bulwark.defenses import build_defense
from bulwark.defenses.smart import (
    ASCENT_DIVERGENCES,
    NORMALIZATIONS,
    Smart,
    SmartConfig,
    project_step,
    sym_kl,
)
from bulwark.errors import BulwarkInputError
from bulwark.losses import causal_lm_loss
from bulwark.models import load_model
from tests.conftest import SCENARIOS, check, plain_model, torchrun

BIG = {"noise_std": 0.01, "step_size": 0.01, "epsilon": 0.005, "beta": 0.5, "lambda_s": 5.0, "mu": 5.0, "seed": 3}
Batch = dict[str, torch.Tensor]


# ---- the plain computation -------------------------------------------------------------------------


def plain_sym_kl(p_logits: torch.Tensor, q_logits: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    log_p, log_q = F.log_softmax(p_logits, -1), F.log_softmax(q_logits, -1)
    kl_pq = F.kl_div(log_q, log_p, log_target=True, reduction="none").sum(-1)  # KL(p || q)
    kl_qp = F.kl_div(log_p, log_q, log_target=True, reduction="none").sum(-1)
    m = mask.float()
    return ((kl_pq + kl_qp) * m).sum() / m.sum()


def plain_kl(p_logits: torch.Tensor, q_logits: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Masked token mean of KL(p || q)."""
    kl = F.kl_div(F.log_softmax(q_logits, -1), F.log_softmax(p_logits, -1), log_target=True, reduction="none").sum(-1)
    m = mask.float()
    return (kl * m).sum() / m.sum()


def plain_ascent_objective(clean: torch.Tensor, adv: torch.Tensor, mask: torch.Tensor, divergence: str) -> torch.Tensor:
    if divergence == "forward":  # the clean prediction as the target distribution (mt-dnn's KlCriterion)
        return plain_kl(clean, adv, mask)
    if divergence == "reverse":  # mt-dnn's stable_kl(adv, clean), without its log-odds clamp and factor 2
        return plain_kl(adv, clean, mask)
    return plain_sym_kl(clean, adv, mask)


def plain_delta(model: torch.nn.Module, batch: Batch, cfg: SmartConfig, gen: torch.Generator,
                clean: torch.Tensor) -> torch.Tensor:
    """δ after cfg.ascent_steps projected ascent steps, each ∞-norm per token or over the row's whole
    (tokens, hidden) block, for the ball (paper) or unit (mt-dnn) projection."""
    ids, mask = batch["input_ids"], batch["attention_mask"]
    embed = model.get_input_embeddings()
    keep = mask.unsqueeze(-1).float()
    noise = torch.stack([torch.randn(ids.size(1), embed.embedding_dim, generator=gen) for _ in range(ids.size(0))])
    delta = noise * cfg.noise_std * keep
    clean_embeds = embed(ids).detach()

    def inf_norm(x: torch.Tensor) -> torch.Tensor:
        if cfg.normalize == "example":
            return x.abs().flatten(1).max(dim=1).values.view(-1, 1, 1)
        return x.abs().max(dim=-1, keepdim=True).values

    for _ in range(cfg.ascent_steps):
        delta = delta.detach().requires_grad_(True)
        adv = model(inputs_embeds=clean_embeds + delta, attention_mask=mask).logits
        (grad,) = torch.autograd.grad(plain_ascent_objective(clean.detach(), adv, mask, cfg.ascent_divergence), delta)
        if cfg.projection == "unit":
            moved = delta.detach() + cfg.step_size * grad
            delta = moved / (inf_norm(moved) + cfg.epsilon) * keep
        else:
            top = inf_norm(grad)
            step = torch.where(top > 0, grad / top, torch.zeros_like(grad))
            delta = torch.clamp(delta.detach() + cfg.step_size * step, -cfg.epsilon, cfg.epsilon) * keep
    return delta.detach()


def plain_loss(model: torch.nn.Module, ema_model: torch.nn.Module, batch: Batch, cfg: SmartConfig,
               gen: torch.Generator) -> torch.Tensor:
    ids, mask = batch["input_ids"], batch["attention_mask"]
    clean_embeds = model.get_input_embeddings()(ids)
    clean = model(inputs_embeds=clean_embeds, attention_mask=mask).logits
    delta = plain_delta(model, batch, cfg, gen, clean)
    adv = model(inputs_embeds=clean_embeds + delta, attention_mask=mask).logits
    with torch.no_grad():
        ema_logits = ema_model(input_ids=ids, attention_mask=mask).logits
    return (causal_lm_loss(clean, batch["labels"]) + cfg.lambda_s * plain_sym_kl(clean, adv, mask)
            + cfg.mu * plain_sym_kl(clean, ema_logits, mask))




def plain_smart(model_dir: Path, lora: bool, before: dict, ranks: list[dict], cfg: SmartConfig, lr: float,
                doubled: bool = False) -> dict[str, torch.Tensor]:
    """SGD on the mean over ranks and micro-batches of the SMART loss; `doubled`: one micro-batch per
    rank made of all its accumulated ones (the grad-accumulation check)."""
    model = plain_model(model_dir, lora, before)
    ema_model = copy.deepcopy(model)
    trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    ema = {n: p.detach().clone() for n, p in trainable}
    gens = [torch.Generator().manual_seed(cfg.seed * 1_000_003 + r) for r in range(len(ranks))]
    for step in range(len(ranks[0]["log"])):
        for r, result in enumerate(ranks):
            micro = [{k: torch.tensor(v) for k, v in b.items()} for b in result["log"][step]["batches"]]
            if doubled:
                micro = [{k: torch.cat([b[k] for b in micro]) for k in micro[0]}]
            for batch in micro:
                (plain_loss(model, ema_model, batch, cfg, gens[r]) / (len(ranks) * len(micro))).backward()
        with torch.no_grad():
            for name, p in trainable:
                p -= lr * p.grad
                p.grad = None
                ema[name].mul_(cfg.beta).add_(p, alpha=1 - cfg.beta)
            ema_params = dict(ema_model.named_parameters())
            for name, value in ema.items():
                ema_params[name].copy_(value)
    return {k: v.detach() for k, v in model.state_dict().items()}


# ---- running the engine ----------------------------------------------------------------------------


def run_scenario(tmp: Path, model_dir: Path, nproc: int, ds: str, lora: bool, grad_accum: int, mbs: int,
                 steps: int, ragged: bool, lr: float, config: dict, resume_at: int = 0) -> tuple[list[dict], dict, dict]:
    out = tmp / "smart"
    args = [str(model_dir), str(out), ds, str(int(lora)), str(grad_accum), str(mbs), str(steps),
            str(int(ragged)), str(lr), json.dumps(config)]
    check(torchrun([str(SCENARIOS / "smart_step.py"), *args, *([str(resume_at)] if resume_at else [])], nproc=nproc))
    ranks = [json.loads(Path(f"{out}.rank{r}.json").read_text()) for r in range(nproc)]
    return ranks, torch.load(f"{out}.before.pt"), torch.load(f"{out}.after.pt")


def assert_matches(after: dict, expected: dict, before: dict, others: list[dict]) -> None:
    for name, value in expected.items():
        torch.testing.assert_close(after[name], value, atol=1e-5, rtol=0, msg=name)
    moved = max((expected[k] - before[k]).abs().max().item() for k in expected)
    assert moved > 1e-3, "the steps changed no weight: the comparison would be vacuous"
    for other in others:  # each regulariser changes the result well beyond the tolerance
        gap = max((expected[k] - other[k]).abs().max().item() for k in expected)
        assert gap > 1e-4, gap


MT_DNN_ASCENT = {"ascent_divergence": "reverse", "normalize": "token", "projection": "unit"}
PAPER_ASCENT = {"ascent_divergence": "symmetric", "normalize": "example"}


@pytest.mark.parametrize(
    ("nproc", "ds", "lora", "steps", "lr", "ascent"),
    [(1, "zero3", False, 2, 0.5, {}), (2, "zero3", False, 4, 0.1, {}), (2, "zero3", True, 2, 0.5, {}),
     (2, "zero2", True, 2, 0.5, {}), (2, "zero3", False, 2, 0.5, PAPER_ASCENT),
     (2, "zero3", False, 2, 0.1, MT_DNN_ASCENT)],
    ids=["1proc-zero3-full", "2rank-zero3-full", "2rank-zero3-lora", "2rank-zero2-lora-fallback",
         "2rank-zero3-paper-ascent", "2rank-zero3-mtdnn-ascent"],
)
def test_steps_equal_plain_pytorch(tmp_path: Path, tiny_model_dir: Path, nproc: int, ds: str, lora: bool,
                                   steps: int, lr: float, ascent: dict) -> None:
    # The first step has θ_ema = θ (Bregman term zero), later ones a real EMA. Four steps reach ZeRO-3's
    # steady state, where its prefetcher replays a recorded trace of the passes (a smaller lr there
    # keeps four SGD steps from amplifying float rounding beyond the tolerance; also for mt-dnn's
    # "unit" projection, whose |δ| ~ 1 makes R_s large).
    config = {**BIG, **ascent}
    ranks, before, after = run_scenario(tmp_path, tiny_model_dir, nproc, ds, lora, 1, 2, steps, True, lr, config)
    cfg = SmartConfig(**config)
    expected = plain_smart(tiny_model_dir, lora, before, ranks, cfg, lr)
    others = [plain_smart(tiny_model_dir, lora, before, ranks, SmartConfig(**{**config, off: 0.0}), lr)
              for off in ("lambda_s", "mu")]
    assert_matches(after, expected, before, others)
    assert ranks[0]["log"][1]["metrics"]["smart_breg"] > 0
    if ds == "zero3":  # the EMA is this rank's shard only
        for r in ranks:
            share = -(-r["trainable_numel"] // nproc)
            assert share <= r["ema_numel"] <= share + 64 * len(before)


def test_grad_accumulation_equals_doubled_micro_batch(tmp_path: Path, tiny_model_dir: Path) -> None:
    ranks, before, after = run_scenario(tmp_path, tiny_model_dir, 2, "zero3", False, 2, 2, 2, False, 0.5, BIG)
    expected = plain_smart(tiny_model_dir, False, before, ranks, SmartConfig(**BIG), 0.5, doubled=True)
    assert_matches(after, expected, before, [])


def test_ema_checkpoint_resume_is_exact(tmp_path: Path, tiny_model_dir: Path) -> None:
    ranks, _, _ = run_scenario(tmp_path, tiny_model_dir, 2, "zero3", True, 1, 2, 3, True, 0.5, BIG, resume_at=2)
    for r in ranks:
        assert r["loaded_steps_done"] == 2
        assert r["resumed_ema_equal"] and r["resumed_generator_equal"]
    assert ranks[0]["resumed_weights_equal"]


# ---- in process: the ascent options, the pieces and the registry -------------------------------------

# |δ| comparable to the tiny model's embeddings (std 0.02) and η < ε, two steps: the ascent leaves the
# quadratic regime, where all three divergences share one Hessian (the Fisher) and give the same δ
ASCENT = {"noise_std": 0.02, "step_size": 0.03, "epsilon": 0.05, "ascent_steps": 2, "mu": 0.0, "seed": 3,
          "own_trace": False}
OPTIONS = [(d, n) for d in ASCENT_DIVERGENCES for n in NORMALIZATIONS]


class StandIn:
    """The engine surface SMART's ascent reads, for one process without DeepSpeed."""

    rank, world_size = 0, 1
    partitioned = False

    def __init__(self, model: torch.nn.Module) -> None:
        self.module = model

    def trainable_parameters(self) -> list[tuple[str, torch.nn.Parameter]]:
        return [(n, p) for n, p in self.module.named_parameters() if p.requires_grad]

    def local_shards(self) -> list[torch.Tensor]:
        return [torch.cat([p.detach().flatten() for _, p in self.trainable_parameters()])]


@pytest.mark.parametrize("projection", ["ball", "unit"])
def test_ascent_options_equal_plain_pytorch(tiny_model_dir: Path, projection: str) -> None:
    """Each (ascent_divergence, normalize) gives the δ of the plain computation, and each differs from
    the others by far more than the tolerance (so the comparison tells them apart)."""
    from tests.scenarios.synthetic import random_rows

    model = load_model(str(tiny_model_dir), "fp32")
    batch = pad_collate(random_rows(7, 3, model.config.vocab_size, ragged=True), 0)
    ids, mask = batch["input_ids"], batch["attention_mask"]
    stacked = {"input_ids": torch.cat([ids, ids]), "attention_mask": torch.cat([mask, mask])}
    with torch.no_grad():
        clean = model(input_ids=ids, attention_mask=mask).logits
    deltas = {}
    for divergence, normalize in OPTIONS:
        # "unit" rescales δ + η g to ∞-norm 1: a larger η keeps g (not the initial noise) in charge of δ
        cfg = SmartConfig(**{**ASCENT, "step_size": 3.0 if projection == "unit" else ASCENT["step_size"]},
                          projection=projection, ascent_divergence=divergence, normalize=normalize)
        smart = Smart(cfg, 1)
        view = StandIn(model)
        smart.attach(view)
        got = smart._adversarial_delta(view, stacked, ids.size(0))
        want = plain_delta(model, batch, cfg, torch.Generator().manual_seed(cfg.seed * 1_000_003), clean)
        torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-4, msg=f"{divergence}/{normalize}")
        assert (got[mask == 0] == 0).all()
        deltas[divergence, normalize] = want
    for i, a in enumerate(OPTIONS):
        for b in OPTIONS[i + 1:]:
            assert (deltas[a] - deltas[b]).abs().max().item() > 1e-4, (a, b)



def test_sym_kl_and_projection() -> None:
    g = torch.Generator().manual_seed(0)
    p, q = torch.randn(2, 5, 7, generator=g), torch.randn(2, 5, 7, generator=g)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])
    torch.testing.assert_close(sym_kl(p, q, mask), plain_sym_kl(p, q, mask))
    assert sym_kl(p, p, mask).abs().item() < 1e-6
    delta = torch.full((3, 4), 0.5)
    grad = torch.tensor([[1.0, -2.0, 0.5, 0.0], [0.0, 0.0, 0.0, 0.0], [3.0, 3.0, -3.0, 1.0]])
    stepped = project_step(delta * 1e-3, grad, 1e-3, 1e-3)
    assert stepped.abs().max() <= torch.tensor(1e-3)
    torch.testing.assert_close(stepped[1], torch.full((4,), 0.5e-3))  # zero gradient: no step, no NaN
    torch.testing.assert_close(stepped[0], torch.tensor([1e-3, -0.5e-3, 0.75e-3, 0.5e-3]))
    unit = project_step(delta, grad, 0.1, 1e-6, "unit")  # mt-dnn: rescale δ + η g to ∞-norm 1
    torch.testing.assert_close(unit[0], torch.tensor([0.6, 0.3, 0.55, 0.5]) / (0.6 + 1e-6))
    torch.testing.assert_close(unit[1], torch.full((4,), 0.5 / (0.5 + 1e-6)))
    # per example: one ∞-norm over the row's (tokens, hidden) block, the ε clip still per entry
    rows = torch.stack([grad[:2], grad[1:]])  # (2 rows, 2 tokens, 4)
    example = project_step(torch.zeros(2, 2, 4), rows, 1e-3, 1e-3, normalize="example")
    torch.testing.assert_close(example[0, 0], torch.tensor([0.5e-3, -1e-3, 0.25e-3, 0.0]))
    torch.testing.assert_close(example[1, 1], torch.tensor([1e-3, 1e-3, -1e-3, 1e-3 / 3]))
    torch.testing.assert_close(example[1, 0], torch.zeros(4))


def test_registered_for_finetune_only_with_defaults_that_act() -> None:
    smart = build_defense({"name": "smart"}, "finetune", 10)
    assert isinstance(smart, Smart)
    # the reference's λ_s, μ, β, K and projection; σ, η, ε 1e4 x mt-dnn's, where R_s moves the update
    assert smart.config == SmartConfig(lambda_s=1.0, mu=1.0, beta=0.99, noise_std=1e-1, step_size=1e-1,
                                       epsilon=1e-2, ascent_steps=1, projection="ball")
    with pytest.raises(BulwarkInputError, match="finetune"):
        build_defense({"name": "smart"}, "align", 10)
    with pytest.raises(BulwarkInputError, match="epsilon"):
        build_defense({"name": "smart", "epsilon": 0}, "finetune", 10)
    with pytest.raises(BulwarkInputError, match="projection"):
        build_defense({"name": "smart", "projection": "l2"}, "finetune", 10)
    assert (smart.config.ascent_divergence, smart.config.normalize) == ("symmetric", "token")
    with pytest.raises(BulwarkInputError, match="ascent_divergence"):
        build_defense({"name": "smart", "ascent_divergence": "js"}, "finetune", 10)
    with pytest.raises(BulwarkInputError, match="normalize"):
        build_defense({"name": "smart", "normalize": "batch"}, "finetune", 10)
