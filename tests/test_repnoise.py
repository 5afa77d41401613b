"""RepNoise: the engine's steps against a plain single-process PyTorch computation of the reference loss.

    L = CE(harmless) + β (1/L) Σ_l MMD(mlp_l(harmful), N(0, I)) - α log(H / (L + 1) + 1)
    H = CE(f(harmful)) + Σ_i CE(lm_head(norm(h_i)))

The plain version below is written independently of bulwark.defenses.repnoise: separate unpadded
forwards of the two batches (the defense stacks them into one), MLP outputs by hooks on the explicit
module paths, the MMD with the reference's broadcast (n, n, d) distances. The loss is per rank and
per micro-batch and the update is SGD on the mean of those losses (what DeepSpeed averages).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from bulwark.data.collate import stack_batches
from bulwark.defenses import build_defense
from bulwark.defenses.repnoise import RepNoise, RepNoiseConfig, gaussian_mmd
from bulwark.errors import BulwarkInputError
from bulwark.models import load_model
from tests.conftest import SCENARIOS, check, plain_model, torchrun

LR = 0.5  # the scenario's SGD learning rate
BIG = {"beta": 1.0, "alpha": 1.0, "seed": 3}  # β large enough that the MMD term moves weights past 1e-5
Batch = dict[str, torch.Tensor]


# ---- the plain computation -------------------------------------------------------------------------


def plain_mmd(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    total = torch.cat([x, y])
    n = total.size(0)
    d2 = ((total.unsqueeze(0) - total.unsqueeze(1)) ** 2).sum(2)
    base = d2.detach().sum() / (n * n - n) / 4.0
    k = sum(torch.exp(-d2 / (base * 2.0**i)) for i in range(5))
    b = x.size(0)
    return torch.mean(k[:b, :b] + k[b:, b:] - k[:b, b:] - k[b:, :b])


def ce(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits[:, :-1].reshape(-1, logits.size(-1)), labels[:, 1:].reshape(-1), ignore_index=-100)


def reference_ce(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """The reference's masked CE on answer-token masks: the logits of a position whose next token is
    scored but which is not an answer token itself (the one predicting the first answer token) are
    zeroed, so that token's loss is the constant log V. Bulwark does not do this (docs/DEFENSES.md)."""
    zero = (labels[:, 1:] != -100) & (labels[:, :-1] == -100)
    return ce(logits.masked_fill(F.pad(zero, (0, 1)).unsqueeze(-1), 0.0), labels)


def trim(batch: Batch) -> Batch:
    keep = int(batch["attention_mask"].sum(1).max())
    return {k: v[:, :keep] for k, v in batch.items()}


def plain_loss(model: torch.nn.Module, harmless: Batch, harmful: Batch, cfg: RepNoiseConfig,
               gen: torch.Generator, ce: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] = ce) -> torch.Tensor:
    llama = model.get_base_model() if hasattr(model, "get_base_model") else model
    padded_len = max(harmless["input_ids"].size(1), harmful["input_ids"].size(1))
    harmless, harmful = trim(harmless), trim(harmful)
    acts: list[torch.Tensor] = []
    hooks = [layer.mlp.register_forward_hook(lambda m, a, o: acts.append(o)) for layer in llama.model.layers]
    out = model(input_ids=harmful["input_ids"], attention_mask=harmful["attention_mask"], output_hidden_states=True)
    for h in hooks:
        h.remove()
    mask = (harmful["labels"] != -100).float().unsqueeze(-1)
    rows, length = harmful["input_ids"].shape
    mmd = 0.0
    for a in acts:
        noise = torch.randn(rows, padded_len, a.size(-1), generator=gen)[:, :length]
        mmd = mmd + plain_mmd((a * mask).reshape(rows, -1), (noise * mask).reshape(rows, -1))
    mmd = mmd / len(acts)
    lens = ce(out.logits, harmful["labels"])
    if cfg.logit_lens:
        for h in out.hidden_states:
            lens = lens + ce(llama.lm_head(llama.model.norm(h)), harmful["labels"])
        lens = lens / len(out.hidden_states)
    good = model(input_ids=harmless["input_ids"], attention_mask=harmless["attention_mask"]).logits
    return ce(good, harmless["labels"]) + cfg.beta * mmd - cfg.alpha * torch.log(lens + 1)




def plain_repnoise(model_dir: Path, lora: bool, before: dict, ranks: list[dict], cfg: RepNoiseConfig) -> dict:
    model = plain_model(model_dir, lora, before)
    params = [p for p in model.parameters() if p.requires_grad]
    gens = [torch.Generator().manual_seed(cfg.seed * 1_000_003 + r) for r in range(len(ranks))]
    for step in range(len(ranks[0]["log"])):
        for r, result in enumerate(ranks):
            row = result["log"][step]
            micro = list(zip(row["main"], row["harmful"], strict=True))
            for good, bad in micro:
                good = {k: torch.tensor(v) for k, v in good.items()}
                bad = {k: torch.tensor(v) for k, v in bad.items()}
                (plain_loss(model, good, bad, cfg, gens[r]) / (len(ranks) * len(micro))).backward()
        with torch.no_grad():
            for p in params:
                p -= LR * p.grad
                p.grad = None
    return {k: v.detach() for k, v in model.state_dict().items()}


# ---- running the engine ----------------------------------------------------------------------------


def run_scenario(tmp: Path, model_dir: Path, nproc: int, lora: bool, grad_accum: int, steps: int,
                 config: dict, resume_at: int = 0) -> tuple[list[dict], dict, dict]:
    out = tmp / "repnoise"
    args = [str(model_dir), str(out), "zero3", str(int(lora)), str(grad_accum), "2", str(steps), "1",
            json.dumps(config), *([str(resume_at)] if resume_at else [])]
    check(torchrun([str(SCENARIOS / "repnoise_step.py"), *args], nproc=nproc))
    ranks = [json.loads(Path(f"{out}.rank{r}.json").read_text()) for r in range(nproc)]
    return ranks, torch.load(f"{out}.before.pt"), torch.load(f"{out}.after.pt")


def assert_matches(after: dict, expected: dict, before: dict, others: list[dict]) -> None:
    for name, value in expected.items():
        torch.testing.assert_close(after[name], value, atol=1e-5, rtol=0, msg=name)
    moved = max((expected[k] - before[k]).abs().max().item() for k in expected)
    assert moved > 1e-3, "the steps changed no weight: the comparison would be vacuous"
    for other in others:  # each term changes the result well beyond the tolerance
        gap = max((expected[k] - other[k]).abs().max().item() for k in expected)
        assert gap > 1e-4, gap


@pytest.mark.parametrize(("nproc", "lora"), [(2, False), (2, True)], ids=["2rank-zero3-full", "2rank-zero3-lora"])
def test_steps_equal_plain_pytorch(tmp_path: Path, tiny_model_dir: Path, nproc: int, lora: bool) -> None:
    ranks, before, after = run_scenario(tmp_path, tiny_model_dir, nproc, lora, 1, 2, BIG)
    cfg = RepNoiseConfig(**BIG)
    expected = plain_repnoise(tiny_model_dir, lora, before, ranks, cfg)
    others = [plain_repnoise(tiny_model_dir, lora, before, ranks, RepNoiseConfig(**{**BIG, off: 0.0}))
              for off in ("beta", "alpha")]
    assert_matches(after, expected, before, others)
    assert ranks[0]["log"][0]["metrics"]["repnoise_mmd"] > 0


def test_grad_accumulation_equals_ranks_and_plain_mean(tmp_path: Path, tiny_model_dir: Path) -> None:
    """Accumulating 2 micro-batches = the mean of their per-micro-batch losses (= 2 ranks x 1 micro-batch);
    not one doubled micro-batch: MMD and log are not linear in the batch (see the module docstring)."""
    ranks, before, after = run_scenario(tmp_path, tiny_model_dir, 1, False, 2, 2, BIG)
    assert [len(row["harmful"]) for row in ranks[0]["log"]] == [2, 2]
    expected = plain_repnoise(tiny_model_dir, False, before, ranks, RepNoiseConfig(**BIG))
    assert_matches(after, expected, before, [])


def test_noise_generator_checkpoint_resume_is_exact(tmp_path: Path, tiny_model_dir: Path) -> None:
    ranks, _, _ = run_scenario(tmp_path, tiny_model_dir, 2, True, 1, 3, BIG, resume_at=2)
    assert all(r["resumed_generator_equal"] for r in ranks)
    assert ranks[0]["resumed_weights_equal"]


# ---- in process: the pieces, the default logit lens, the registry -----------------------------------


def test_mmd_matches_the_reference_form() -> None:
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(3, 40, generator=g), torch.randn(3, 40, generator=g) * 2 + 0.5
    torch.testing.assert_close(gaussian_mmd(x, y), plain_mmd(x, y), atol=1e-6, rtol=1e-5)
    assert gaussian_mmd(x, x).abs().item() < 1e-6
    assert gaussian_mmd(x, y).item() > 0.1


def test_stack_batches_pads_to_one_length() -> None:
    a = {"input_ids": torch.ones(2, 3, dtype=torch.long), "attention_mask": torch.ones(2, 3, dtype=torch.long),
         "labels": torch.ones(2, 3, dtype=torch.long)}
    b = {k: torch.full((1, 5), 2, dtype=torch.long) for k in a}
    s = stack_batches(a, b)
    assert s["input_ids"].shape == (3, 5)
    assert s["attention_mask"][:2, 3:].sum() == 0 and (s["labels"][:2, 3:] == -100).all()


def test_one_process_default_config_matches_plain(tiny_model_dir: Path) -> None:
    """The default β, α and logit lens, in process through a stand-in engine (no DeepSpeed)."""
    torch.manual_seed(0)
    model = load_model(str(tiny_model_dir), "fp32")

    class View:
        rank, world_size, module = 0, 1, model

        def forward_outputs(self, batch: Batch, **kwargs: object) -> object:
            return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], **kwargs)

    from bulwark.data.collate import pad_collate

    def rows(seed: int, lengths: list[int]) -> Batch:
        g = torch.Generator().manual_seed(seed)
        feats = []
        for n in lengths:
            ids = torch.randint(3, 200, (n,), generator=g).tolist()
            feats.append({"input_ids": ids, "labels": [-100] * 4 + ids[4:]})
        return pad_collate(feats, 0)

    good, bad = rows(1, [9, 12]), rows(2, [10, 8])
    defense = RepNoise(RepNoiseConfig(), 1)
    defense.attach(View())
    class Once:  # a harmful stream that hands out `bad`
        def next_batch(self) -> dict:
            return bad

    defense.harmful.draw({"harmful": Once()})
    got = defense.loss(View(), good)
    want = plain_loss(model, good, bad, RepNoiseConfig(), torch.Generator().manual_seed(0))
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
    # Bulwark keeps the first answer token in every CE (the reference's CE makes it the constant log V):
    # the loss and its gradient differ from the reference form by far more than the tolerance
    got_grad = torch.autograd.grad(got, model.lm_head.weight)[0]
    first_zeroed = plain_loss(model, good, bad, RepNoiseConfig(), torch.Generator().manual_seed(0), reference_ce)
    assert (got - first_zeroed).abs().item() > 1e-3
    ref_grad = torch.autograd.grad(first_zeroed, model.lm_head.weight)[0]
    assert (got_grad - ref_grad).norm() > 0.05 * got_grad.norm()


def test_registered_for_align_with_reference_defaults() -> None:
    defense = build_defense({"name": "repnoise"}, "align", 10)
    assert isinstance(defense, RepNoise)
    assert defense.config == RepNoiseConfig(beta=0.001, alpha=1.0, kernel_num=5, kernel_mul=2.0, logit_lens=True)
    assert RepNoise.side_streams == ("harmful",)
    with pytest.raises(BulwarkInputError, match="align"):
        build_defense({"name": "repnoise"}, "finetune", 10)
    with pytest.raises(BulwarkInputError, match="beta"):
        build_defense({"name": "repnoise", "beta": -1}, "align", 10)
