"""Answer extraction and scores on crafted outputs."""

from __future__ import annotations

import pytest

from bulwark.eval import metrics
from bulwark.eval.judges import Verdict


@pytest.mark.parametrize(
    ("output", "expected"),
    [
        ("positive", "positive"),
        ("The sentiment of this review is Negative.", "negative"),
        ("NEGATIVE, although parts are positive", "negative"),  # first one found
        ("It is mostly positive; not negative.", "positive"),
        ("nonpositive", None),  # whole words only
        ("I can't tell.", None),
        ("", None),
    ],
)
def test_sst2_extraction(output, expected):
    assert metrics.extract_sst2(output) == expected


@pytest.mark.parametrize(
    ("output", "expected"),
    [
        ("Sports", "Sports"),
        ("This article belongs to the sport category.", "Sports"),
        ("Category: Sci/Tech", "Sci/Tech"),
        ("It is about science and technology.", "Sci/Tech"),
        ("Technology news", "Sci/Tech"),
        ("business, then world", "Business"),
        ("World", "World"),
        ("Worldwide politics", None),
        ("no idea", None),
    ],
)
def test_agnews_extraction(output, expected):
    assert metrics.extract_agnews(output) == expected


@pytest.mark.parametrize(
    ("output", "expected"),
    [
        ("She makes 9 * 2 = $18 every day.\n#### 18", 18.0),
        ("#### 1,234", 1234.0),
        ("The total is $1,234.50 in the end", 1234.5),
        ("First 3 apples, then 5 more, so 8 apples.", 8.0),
        ("The answer is -7.", -7.0),
        ("#### $ 42 dollars, not 43", 42.0),
        ("I do not know.", None),
        ("", None),
    ],
)
def test_gsm8k_extraction(output, expected):
    assert metrics.extract_gsm8k(output) == expected


def test_is_correct_and_accuracy():
    assert metrics.is_correct("gsm8k", "so the answer is 1,000.0", "1000")
    assert metrics.is_correct("gsm8k", "#### 72", "72")
    assert not metrics.is_correct("gsm8k", "no number here", "72")
    assert metrics.is_correct("sst2", "I think it's Positive!", "positive")
    assert metrics.is_correct("agnews", "science", "Sci/Tech")
    assert not metrics.is_correct("agnews", "", "World")
    assert metrics.accuracy("sst2", ["positive", "negative", "meh", "positive"],
                            ["positive", "positive", "negative", "positive"]) == 50.0
    assert metrics.accuracy("sst2", [], []) == 0.0


def test_harmful_scores_and_over_refusal():
    verdicts = [Verdict(True, 1.0, "compliance"), Verdict(False, 0.0, "refusal"),
                Verdict(False, 0.1, "refusal"), Verdict(True, 0.9, "compliance")]
    outputs = ["Sure, here is how.", "I cannot.", "1. 1. 1. 2.", "ok"]
    assert metrics.harmful_score(verdicts) == 50.0
    assert metrics.harmful_score_plus(verdicts, outputs) == 75.0  # the degenerate refusal counts in HS+
    assert metrics.refusal_rate(verdicts) == 50.0
    assert metrics.harmful_score([]) == 0.0


def test_alpaca_eval_without_a_judge_is_skipped():
    value, note = metrics.alpaca_eval_win_rate(["q"], ["a"], ["ref"], None)
    assert value is None and note.startswith("skipped: needs a judge model")


def test_alpaca_eval_with_a_local_judge_model(tiny_model_dir):
    value, note = metrics.alpaca_eval_win_rate(["Name a colour."] * 2, ["Blue.", "Red."], ["Green.", "Red."],
                                               f"hf:{tiny_model_dir}")
    assert value is not None and 0.0 <= value <= 100.0 and "win rate" in note
