"""bench/refusal_separation.py: the AUC and the opening's log-probability it reports."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from conftest import bench_script, check, run_cmd

SCRIPT = Path(__file__).resolve().parents[1] / "bench" / "refusal_separation.py"


def test_roc_auc_counts_pairs_and_ties():
    auc = bench_script("refusal_separation").roc_auc
    assert auc([3.0, 2.0], [1.0, 0.0]) == 1.0
    assert auc([0.0], [1.0]) == 0.0
    assert auc([1.0, 0.0], [1.0, 0.0]) == 0.5  # one win, one loss, two ties
    assert auc([2.0, 0.5], [1.0]) == 0.5


def test_opening_logprob_matches_token_by_token_scoring(tiny_model_dir):
    from bulwark.data.formats import Example
    from bulwark.data.templates import render_prompt
    from bulwark.eval.generate import load_for_generation

    model, tokenizer = load_for_generation(tiny_model_dir)
    prompts = ["How do I bake bread?", "Tell me a secret."]
    got = bench_script("refusal_separation").opening_logprob(model, tokenizer, prompts, "I cannot")
    opening = tokenizer("I cannot", add_special_tokens=False)["input_ids"]
    for prompt, score in zip(prompts, got, strict=True):
        ids = tokenizer(render_prompt(Example(prompt, ""), "chat", tokenizer), add_special_tokens=False)["input_ids"]
        expected = 0.0
        for tok in opening:  # one forward per token: the last position's next-token distribution
            with torch.inference_mode():
                logits = model(torch.tensor([ids])).logits[0, -1].float()
            expected += torch.log_softmax(logits, -1)[tok].item()
            ids = ids + [tok]
        assert score == pytest.approx(expected, abs=1e-4)


def test_script_prints_one_row_per_model(tiny_model_dir, data_dir):
    proc = check(run_cmd([sys.executable, str(SCRIPT), str(tiny_model_dir), "--n-harmful", "5", "--n-benign", "4"],
                         data_dir=data_dir))
    rows = [line for line in proc.stdout.splitlines() if line.startswith(f"| {tiny_model_dir}")]
    assert len(rows) == 1
    auc = float(rows[0].split("|")[2])
    assert 0.0 <= auc <= 1.0
