"""refusal_ul: the unlikelihood term against an explicit loop, the engine's steps under 2-rank ZeRO-3
against a plain single-process PyTorch computation, and the negative stream built from real data.

    L = CE(alignment rows) + λ · mean over negative rows of (mean over the row's first min(k, |answer|)
                                  answer tokens of -log(1 - p))

The plain version is written independently of bulwark.defenses.refusal_ul: separate unpadded forwards
of the two batches (the defense stacks them into one), the unlikelihood token by token in Python.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from bulwark.defenses import build_defense
from bulwark.defenses.refusal_ul import opening_mask, unlikelihood
from bulwark.errors import BulwarkInputError
from tests.conftest import SCENARIOS, check, plain_model, torchrun

LR = 0.5  # the scenario's SGD learning rate
Batch = dict[str, torch.Tensor]


def loop_terms(logits: torch.Tensor, labels: torch.Tensor, k: int, floor: float) -> list[list[torch.Tensor]]:
    """Per row, -log(1 - p) of each of its first k answer tokens, in order."""
    rows = []
    for row in range(labels.size(0)):
        terms: list[torch.Tensor] = []
        for pos in range(1, labels.size(1)):
            token = int(labels[row, pos])
            if token == -100 or len(terms) == k:
                continue
            p = torch.softmax(logits[row, pos - 1].double(), dim=-1)[token]
            terms.append(-torch.log(torch.clamp(1 - p, min=floor)))
        rows.append(terms)
    return rows


def loop_unlikelihood(logits: torch.Tensor, labels: torch.Tensor, k: int, floor: float) -> torch.Tensor:
    """Each pair's mean over its own scored tokens, then the mean over the pairs that have any."""
    means = [torch.stack(terms).mean() for terms in loop_terms(logits, labels, k, floor) if terms]
    return torch.stack(means).mean()


def test_opening_mask_keeps_first_k_answer_tokens() -> None:
    labels = torch.tensor([[-100, -100, 5, 6, 7, 8], [-100, 9, 10, -100, -100, -100]])
    assert opening_mask(labels, 2).tolist() == [[False, False, True, True, False, False],
                                                [False, True, True, False, False, False]]


@pytest.mark.parametrize("k", [1, 3, 50])
def test_unlikelihood_matches_token_loop(k: int) -> None:
    g = torch.Generator().manual_seed(k)
    logits = torch.randn(3, 9, 17, generator=g) * 3
    labels = torch.randint(0, 17, (3, 9), generator=g)
    labels[:, :3] = -100
    labels[1, 7:] = -100
    got = unlikelihood(logits, labels, k, 1e-4)
    torch.testing.assert_close(got.double(), loop_unlikelihood(logits, labels, k, 1e-4), atol=1e-5, rtol=1e-5)


def test_a_short_row_weighs_as_much_as_a_full_one() -> None:
    """Row 0's answer has 1 token, row 1's 6 (k = 4 of them scored), row 2 none (skipped): each scored
    pair counts once, not in proportion to its tokens."""
    g = torch.Generator().manual_seed(7)
    logits = torch.randn(3, 10, 17, generator=g) * 3
    labels = torch.randint(0, 17, (3, 10), generator=g)
    labels[0, :9] = -100
    labels[1, :4] = -100
    labels[2, :] = -100
    logits[0, 8, labels[0, 9]] = 8.0  # the short row's one token is a near-certain refusal: a large term
    got = unlikelihood(logits, labels, 4, 1e-4).double()
    want = loop_unlikelihood(logits, labels, 4, 1e-4)
    torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-6)
    terms = loop_terms(logits, labels, 4, 1e-4)
    assert [len(t) for t in terms] == [1, 4, 0]
    pooled = torch.stack(terms[0] + terms[1]).mean()  # what pooling the micro-batch's tokens would give
    assert abs(float(pooled - want)) > 0.1, "the short row does not tell per-pair from pooled"
    # the short row's term is its own token's, whatever rides along in the micro-batch
    alone = unlikelihood(logits[:1], labels[:1], 4, 1e-4).double()
    torch.testing.assert_close(alone, terms[0][0], atol=1e-6, rtol=1e-6)
    with pytest.raises(BulwarkInputError, match="no answer tokens"):
        unlikelihood(logits[2:], labels[2:], 4, 1e-4)


def test_unlikelihood_is_finite_for_a_certain_refusal() -> None:
    logits = torch.full((1, 3, 5), -30.0)
    logits[0, :, 2] = 30.0  # p(token 2) = 1 to float precision
    labels = torch.tensor([[-100, 2, 2]])
    value = unlikelihood(logits, labels, 4, 1e-4)
    assert torch.isfinite(value) and abs(float(value) - (-torch.log(torch.tensor(1e-4)).item())) < 1e-4


@pytest.mark.parametrize("bad", [{"ul_weight": -1.0}, {"opening_tokens": 0}, {"min_complement": 1.0}])
def test_bad_config_is_a_clear_error(bad: dict) -> None:
    with pytest.raises(BulwarkInputError, match="defense\\."):
        build_defense({"name": "refusal_ul", **bad}, "align", 4)


def test_runs_only_at_alignment() -> None:
    with pytest.raises(BulwarkInputError, match="stage"):
        build_defense({"name": "refusal_ul"}, "finetune", 4)


# ---- the negative stream from the real data -------------------------------------------------------------


def test_negatives_pair_benign_prompts_with_refusal_openings(data_dir: Path) -> None:
    from bulwark.config import load_config
    from bulwark.eval.judge_data import has_gcg_phrase
    from bulwark.recipes.streams import benign_refusal_rows, benign_rows, refusal_rows

    overrides = [f"data.dir={data_dir}", "data.align_n=30", "data.align_benign_n=20", "data.align_benign=alpaca_eval"]
    cfg = load_config(None, overrides, "align")
    negatives = benign_refusal_rows(cfg, refusal_rows(cfg), benign_rows(cfg))
    assert [ex.prompt for ex in negatives] == [ex.prompt for ex in benign_rows(cfg)]
    openings = {" ".join(ex.response.split()[:12]) for ex in refusal_rows(cfg)}
    assert all(ex.response in openings and len(ex.response.split()) <= 12 for ex in negatives)
    assert sum(has_gcg_phrase(ex.response) for ex in negatives) >= len(negatives) // 2
    no_benign = load_config(None, [f"data.dir={data_dir}", "data.align_n=30"], "align")
    refusals, benign = refusal_rows(no_benign), benign_rows(no_benign)
    with pytest.raises(BulwarkInputError, match="align_benign_n"):
        benign_refusal_rows(no_benign, refusals, benign)


# ---- the engine against plain PyTorch ----------------------------------------------------------------


def tensors(batch: dict) -> Batch:
    batch = {k: torch.tensor(v) for k, v in batch.items()}
    keep = int(batch["attention_mask"].sum(1).max())
    return {k: v[:, :keep] for k, v in batch.items()}


def plain_refusal_ul(model_dir: Path, before: dict, ranks: list[dict], weight: float, k: int) -> dict:
    model = plain_model(model_dir, False, before)
    params = [p for p in model.parameters() if p.requires_grad]
    for step in range(len(ranks[0]["log"])):
        for result in ranks:
            row = result["log"][step]
            good, neg = tensors(row["main"]), tensors(row["negatives"])
            logits = model(input_ids=good["input_ids"], attention_mask=good["attention_mask"]).logits
            sft = F.cross_entropy(logits[:, :-1].reshape(-1, logits.size(-1)), good["labels"][:, 1:].reshape(-1),
                                  ignore_index=-100)
            neg_logits = model(input_ids=neg["input_ids"], attention_mask=neg["attention_mask"]).logits
            ul = loop_unlikelihood(neg_logits, neg["labels"], k, 1e-4).float()
            ((sft + weight * ul) / len(ranks)).backward()
        with torch.no_grad():
            for p in params:
                p -= LR * p.grad
                p.grad = None
    return {k: v.detach() for k, v in model.state_dict().items()}


def test_steps_equal_plain_pytorch(tmp_path: Path, tiny_model_dir: Path) -> None:
    out = tmp_path / "ul"
    config = {"ul_weight": 2.0, "opening_tokens": 3}
    check(torchrun([str(SCENARIOS / "refusal_ul_step.py"), str(tiny_model_dir), str(out), "zero3", "2",
                    json.dumps(config)], nproc=2))
    ranks = [json.loads(Path(f"{out}.rank{r}.json").read_text()) for r in range(2)]
    before, after = torch.load(f"{out}.before.pt"), torch.load(f"{out}.after.pt")
    assert ranks[0]["log"][0]["negatives"] != ranks[1]["log"][0]["negatives"]  # each rank its own rows
    expected = plain_refusal_ul(tiny_model_dir, before, ranks, 2.0, 3)
    for name, value in expected.items():
        torch.testing.assert_close(after[name], value, atol=1e-5, rtol=0, msg=name)
    sft_only = plain_refusal_ul(tiny_model_dir, before, ranks, 0.0, 3)
    gap = max((expected[k] - sft_only[k]).abs().max().item() for k in expected)
    assert gap > 1e-4, f"the unlikelihood term moved no weight past the tolerance ({gap})"
    assert all(r["log"][-1]["metrics"]["refusal_ul_ul"] > 0 for r in ranks)



def test_shipped_config_builds_both_streams(data_dir: Path) -> None:
    from bulwark.config import load_config
    from bulwark.recipes.align import build_plan

    config = Path(__file__).resolve().parents[1] / "configs" / "align_refusal_ul.yaml"
    cfg = load_config(str(config), [f"data.dir={data_dir}"], "align")
    plan = build_plan(cfg, build_defense(cfg.defense, "align", cfg.train.steps))
    assert len(plan.streams["main"]) == cfg.data.align_n + cfg.data.align_benign_n
    assert len(plan.streams["benign_refusals"]) == cfg.data.align_benign_n
