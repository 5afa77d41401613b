"""Tests of bulwark.data: readers, formats, templates, attack mix, collate, distributed stream.

Fast and offline: a byte-level tokenizer is built in the test (no downloads). Tests on the real data
files read $BULWARK_DATA_DIR (set to /work/shared/data in CI) and skip when it is not set.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest
import torch

from bulwark.data import (
    AGNEWS_INSTRUCTION,
    ALPACA_NO_INPUT,
    FORMATS,
    IGNORE_INDEX,
    LABEL_WORDS,
    SST2_INSTRUCTION,
    DistributedStream,
    Example,
    build_attack_mix,
    guess_format,
    load_examples,
    pad_collate,
    read_rows,
    render_prompt,
    resolve_data_dir,
    tokenize_example,
    write_mix_manifest,
)
from bulwark.errors import BulwarkInputError

REAL_DIR = os.environ.get("BULWARK_DATA_DIR")
needs_real_data = pytest.mark.skipif(
    not REAL_DIR or not Path(REAL_DIR).is_dir(), reason="BULWARK_DATA_DIR not set to the shared data folder"
)


def byte_tokenizer():
    """A tiny offline tokenizer: one token per byte, plus <pad>, <s>, </s> and a minimal chat template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {ch: i for i, ch in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(["<pad>", "<s>", "</s>"])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>")
    fast.chat_template = (
        "{% for m in messages %}<|{{ m.role }}|>\n{{ m.content }}\n{% endfor %}"
        "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
    )
    return fast


@pytest.fixture(scope="module")
def tokenizer():
    return byte_tokenizer()


def write(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


def features(n: int) -> list[dict]:
    # row i is recognisable by its first token, lengths vary so padding is exercised
    return [{"input_ids": [i] + [7] * (i % 3), "labels": [i] + [7] * (i % 3)} for i in range(n)]


# ---------------------------------------------------------------- readers


def test_resolve_data_dir(tmp_path, monkeypatch):
    monkeypatch.delenv("BULWARK_DATA_DIR", raising=False)
    assert resolve_data_dir(None) is None
    assert resolve_data_dir(str(tmp_path)) == tmp_path
    monkeypatch.setenv("BULWARK_DATA_DIR", str(tmp_path))
    assert resolve_data_dir(None) == tmp_path
    with pytest.raises(BulwarkInputError, match="does not exist"):
        resolve_data_dir(str(tmp_path / "nope"))


def test_read_jsonl_json_and_bare_names(tmp_path):
    write(tmp_path / "a.jsonl", '{"x": 1}\n\n{"x": 2}\n')
    rows = read_rows("a", tmp_path)
    assert rows == [{"x": 1, "__line__": 1}, {"x": 2, "__line__": 3}]  # blank line skipped, numbering kept
    assert read_rows("a.jsonl", tmp_path) == rows
    assert read_rows(str(tmp_path / "a.jsonl"), None) == rows
    write(tmp_path / "b.json", '[{"x": 1}, {"x": 2}]')
    write(tmp_path / "c.json", '{"data": [{"x": 1}, {"x": 2}]}')
    assert [r["x"] for r in read_rows("b", tmp_path)] == [1, 2]
    assert read_rows("c.json", tmp_path) == read_rows("b.json", tmp_path)


def test_malformed_line_names_file_and_line(tmp_path):
    write(tmp_path / "bad.jsonl", '{"x": 1}\n{"x": 2\n')
    with pytest.raises(BulwarkInputError, match=r"bad\.jsonl:2: not valid JSON"):
        read_rows("bad", tmp_path)
    write(tmp_path / "list.jsonl", '{"x": 1}\n[1, 2]\n')
    with pytest.raises(BulwarkInputError, match=r"list\.jsonl:2: expected one JSON object"):
        read_rows("list", tmp_path)


def test_empty_and_missing_file(tmp_path, monkeypatch):
    write(tmp_path / "empty.jsonl", "\n\n")
    with pytest.raises(BulwarkInputError, match=r"empty\.jsonl: no rows"):
        read_rows("empty", tmp_path)
    with pytest.raises(BulwarkInputError, match="BULWARK_DATA_DIR") as e:
        read_rows("nothere", tmp_path)
    assert "nothere" in str(e.value) and str(tmp_path) in str(e.value)
    monkeypatch.delenv("BULWARK_DATA_DIR", raising=False)
    with pytest.raises(BulwarkInputError, match="BULWARK_DATA_DIR"):
        read_rows("nothere", None)


def test_hf_source_fails_fast_offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    start = time.monotonic()
    with pytest.raises(BulwarkInputError, match="JSONL") as e:
        read_rows("hf:stanfordnlp/sst2:train", None)
    assert time.monotonic() - start < 2.0
    assert "BULWARK_DATA_DIR" in str(e.value)
    assert "\n" not in str(e.value)


@needs_real_data
def test_read_real_files():
    rows = read_rows("sst2_dev", None)  # found through $BULWARK_DATA_DIR
    assert len(rows) == 872 and set(rows[0]) == {"sentence", "label", "__line__"}


# ---------------------------------------------------------------- formats


def test_missing_key_names_file_line_and_key(tmp_path):
    write(tmp_path / "s.jsonl", '{"sentence": "good", "label": 1}\n{"text": "bad", "label": 0}\n')
    with pytest.raises(BulwarkInputError, match=r"s\.jsonl:2: missing key 'sentence' for format sst2 \(has: text, label\)"):
        load_examples("s", "sst2", tmp_path)
    write(tmp_path / "l.jsonl", '{"sentence": "good", "label": 5}\n')
    with pytest.raises(BulwarkInputError, match=r"l\.jsonl:1: label 5"):
        load_examples("l", "sst2", tmp_path)
    with pytest.raises(BulwarkInputError, match="unknown data format"):
        load_examples("l", "nope", tmp_path)


def test_guess_format():
    assert guess_format("beavertails_harmful") == "qa"
    assert guess_format("/x/beavertails_refusals.jsonl") == "qa"
    assert guess_format("beavertails_evaluation.jsonl") == "prompt_only"
    assert guess_format("harmful_eval_prompts") == "prompt_only"
    assert guess_format("advbench.jsonl") == "prompt_only"
    assert guess_format("harmbench_behaviors") == "prompt_only"
    assert guess_format("sst2_dev") == "sst2"
    assert guess_format("agnews_test.jsonl") == "agnews"
    assert guess_format("gsm8k_train") == "gsm8k"
    assert guess_format("alpaca_eval") == "alpaca"
    with pytest.raises(BulwarkInputError, match="cannot guess"):
        guess_format("mystery.jsonl")


def test_label_words():
    assert LABEL_WORDS["sst2"] == ["negative", "positive"]
    assert LABEL_WORDS["agnews"] == ["World", "Sports", "Business", "Sci/Tech"]
    assert set(FORMATS) >= {"qa", "sst2", "agnews", "gsm8k", "alpaca", "prompt_only"}


@needs_real_data
def test_each_format_on_a_real_row():
    def first(name: str) -> Example:
        return FORMATS[guess_format(name)](read_rows(name, None)[0], name + ".jsonl")

    e = first("beavertails_harmful")
    assert e.prompt.startswith("How can I steal") and e.response and e.source == "beavertails_harmful"
    e = first("sst2_dev")  # "it 's a charming and often affecting journey .", label 1
    assert (e.prompt, e.response, e.label) == (SST2_INSTRUCTION, "positive", "positive")
    assert e.input.startswith("it 's a charming")
    e = first("agnews_test")  # label 2
    assert (e.prompt, e.response) == (AGNEWS_INSTRUCTION, "Business") and e.input.startswith("Fears for T N")
    e = first("gsm8k_train")
    assert e.prompt.startswith("Natalia") and "#### 72" in e.response and e.label == "72"
    e = first("alpaca")
    assert e.prompt == "Give three tips for staying healthy." and e.input == "" and e.response.startswith("1.")
    e = first("alpaca_eval")  # no "input" key
    assert e.input == "" and e.response
    for name in ("advbench", "harmbench_behaviors", "harmful_eval_prompts", "beavertails_evaluation"):
        e = first(name)
        assert e.prompt and e.response == ""


@needs_real_data
def test_every_shipped_file_loads_with_its_guessed_format():
    for path in sorted(Path(REAL_DIR).glob("*.jsonl")):
        examples = load_examples(path.name)
        assert examples and all(e.prompt for e in examples), path.name
        if guess_format(path.name) == "gsm8k":
            assert all(e.label for e in examples)


@needs_real_data
def test_load_examples_real_harmful():
    rows = load_examples("beavertails_harmful", harmful=True)
    assert len(rows) == 5000 and all(e.harmful for e in rows)


# ---------------------------------------------------------------- templates


def test_alpaca_template_text(tokenizer):
    e = Example(prompt=SST2_INSTRUCTION, input="a fine film", response="positive")
    assert render_prompt(e, "alpaca", tokenizer) == (
        "Below is an instruction that describes a task, paired with an input that provides further context. "
        "Write a response that appropriately completes the request.\n\n"
        "### Instruction:\nAnalyze the sentiment of the input, and respond only positive or negative.\n\n"
        "### Input:\na fine film\n\n### Response:\n"
    )
    plain = Example(prompt="Say hi.", response="hi")
    assert render_prompt(plain, "alpaca") == (
        "Below is an instruction that describes a task. Write a response that appropriately completes the request.\n\n"
        "### Instruction:\nSay hi.\n\n### Response:\n"
    )
    assert render_prompt(plain, "alpaca") == ALPACA_NO_INPUT.format(instruction="Say hi.")
    with pytest.raises(BulwarkInputError, match="unknown prompt template"):
        render_prompt(plain, "vicuna")


def test_chat_template(tokenizer):
    e = Example(prompt="Classify.", input="text", response="x")
    assert render_prompt(e, "chat", tokenizer) == "<|user|>\nClassify.\n\ntext\n<|assistant|>\n"


@pytest.mark.parametrize("template", ["alpaca", "chat"])
def test_loss_mask(tokenizer, template):
    e = Example(prompt="Say hi.", response="hello there")
    f = tokenize_example(e, tokenizer, template, max_length=512)
    prompt_ids = tokenizer(render_prompt(e, template, tokenizer), add_special_tokens=False)["input_ids"]
    response_ids = tokenizer("hello there", add_special_tokens=False)["input_ids"]
    assert f["input_ids"] == prompt_ids + response_ids + [tokenizer.eos_token_id]
    assert f["labels"] == [IGNORE_INDEX] * len(prompt_ids) + response_ids + [tokenizer.eos_token_id]
    assert f["labels"][-1] == tokenizer.eos_token_id


def test_bos_added_only_when_tokenizer_asks(tokenizer):
    e = Example(prompt="Say hi.", response="hi")
    assert tokenize_example(e, tokenizer, "alpaca", 512)["input_ids"][0] != tokenizer.bos_token_id

    class WithBos:  # wraps the tokenizer and flips add_bos_token, leaving the fixture untouched
        add_bos_token = True
        bos_token_id = tokenizer.bos_token_id
        eos_token_id = tokenizer.eos_token_id

        def __call__(self, *a, **k):
            return tokenizer(*a, **k)

    f = tokenize_example(e, WithBos(), "alpaca", 512)
    assert f["input_ids"][0] == tokenizer.bos_token_id and f["labels"][0] == IGNORE_INDEX


def test_truncation(tokenizer):
    e = Example(prompt="Say hi.", response="hello there, friend")
    full = tokenize_example(e, tokenizer, "alpaca", 10_000)
    n_prompt = full["labels"].count(IGNORE_INDEX)
    # the response's end is cut first, the prompt kept whole
    f = tokenize_example(e, tokenizer, "alpaca", n_prompt + 3)
    assert len(f["input_ids"]) == n_prompt + 3
    assert f["input_ids"] == full["input_ids"][: n_prompt + 3]
    assert f["labels"][n_prompt:] == full["input_ids"][n_prompt: n_prompt + 3]
    # a prompt longer than max_length is cut itself so response tokens remain
    f = tokenize_example(e, tokenizer, "alpaca", 40)
    assert len(f["input_ids"]) == 40
    kept = [t for t in f["labels"] if t != IGNORE_INDEX]
    assert kept == full["input_ids"][n_prompt: n_prompt + len(kept)] and len(kept) == 10
    assert f["input_ids"][:15] == full["input_ids"][:15]  # prompt start kept
    assert f["input_ids"][15:30] == full["input_ids"][n_prompt - 15: n_prompt]  # and its end ("### Response:\n")


# ---------------------------------------------------------------- attack mix


def make_examples(n: int, tag: str) -> list[Example]:
    return [Example(prompt=f"{tag} {i}", response="r") for i in range(n)]


def test_attack_mix_counts_and_seeding(tmp_path):
    user, harmful = make_examples(100, "user"), make_examples(30, "bad")
    rows, idx = build_attack_mix(user, harmful, n=50, p=0.1, seed=0)
    assert len(rows) == 50 and len(idx) == round(0.1 * 50) == len({r.prompt for r in rows if r.harmful})
    assert idx == sorted(idx) and all(rows[i].harmful and rows[i].prompt.startswith("bad") for i in idx)
    assert sum(r.harmful for r in rows) == len(idx)
    assert not any(h.harmful for h in harmful)  # inputs are not mutated
    assert len({r.prompt for r in rows}) == 50  # drawn without replacement
    again, idx2 = build_attack_mix(user, harmful, n=50, p=0.1, seed=0)
    assert again == rows and idx2 == idx
    other, _ = build_attack_mix(user, harmful, n=50, p=0.1, seed=1)
    assert other != rows
    assert build_attack_mix(user, harmful, n=20, p=0.0, seed=0)[1] == []
    assert len(build_attack_mix(user, harmful, n=30, p=1.0, seed=0)[1]) == 30

    write_mix_manifest(tmp_path / "run" / "mix.json", rows, idx, p=0.1)
    manifest = json.loads((tmp_path / "run" / "mix.json").read_text())
    assert manifest["n"] == 50 and manifest["p"] == 0.1 and manifest["harmful_indices"] == idx
    assert manifest["harmful_prompts"] == [rows[i].prompt for i in idx]


def test_attack_mix_errors():
    user, harmful = make_examples(10, "user"), make_examples(5, "bad")
    with pytest.raises(BulwarkInputError, match=r"data\.p = 1\.5 must be in \[0, 1\]"):
        build_attack_mix(user, harmful, n=10, p=1.5, seed=0)
    with pytest.raises(BulwarkInputError, match="must be at least 1"):
        build_attack_mix(user, harmful, n=0, p=0.1, seed=0)
    with pytest.raises(BulwarkInputError, match="harmful data has only 5"):
        build_attack_mix(user, harmful, n=10, p=0.6, seed=0)
    with pytest.raises(BulwarkInputError, match="user data has only 10"):
        build_attack_mix(user, harmful, n=20, p=0.1, seed=0)


# ---------------------------------------------------------------- collate and stream


def test_pad_collate():
    b = pad_collate([{"input_ids": [5, 6, 7], "labels": [-100, 6, 7]}, {"input_ids": [8], "labels": [8]}], pad_id=0)
    assert b["input_ids"].tolist() == [[5, 6, 7], [8, 0, 0]]
    assert b["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert b["labels"].tolist() == [[-100, 6, 7], [8, -100, -100]]
    assert all(t.dtype == torch.long for t in b.values())


def test_stream_ranks_concatenate_to_single_rank():
    data = features(23)  # 23 // 4 = 5 steps per epoch, tail of 3 dropped
    single = DistributedStream(data, micro_batch_size=4, rank=0, world_size=1, seed=3, pad_id=0)
    ranks = [DistributedStream(data, micro_batch_size=2, rank=r, world_size=2, seed=3, pad_id=0) for r in (0, 1)]
    for _ in range(12):  # crosses two epoch boundaries
        whole = single.next_batch()["input_ids"]
        parts = [s.next_batch()["input_ids"] for s in ranks]
        width = whole.shape[1]
        parts = [torch.nn.functional.pad(p, (0, width - p.shape[1])) for p in parts]  # pad to same width
        assert torch.equal(torch.cat(parts), whole)


def test_stream_resume_exact():
    data = features(20)
    a = DistributedStream(data, micro_batch_size=3, rank=1, world_size=2, seed=7, pad_id=0)
    for _ in range(4):  # 20 // 6 = 3 steps per epoch: now inside epoch 1
        a.next_batch()
    state = a.state_dict()
    assert state == {"epoch": 1, "position": 1}
    b = DistributedStream(data, micro_batch_size=3, rank=1, world_size=2, seed=7, pad_id=0)
    b.load_state_dict(state)
    for _ in range(7):
        assert torch.equal(a.next_batch()["input_ids"], b.next_batch()["input_ids"])
    with pytest.raises(BulwarkInputError, match="steps per epoch"):
        b.load_state_dict({"epoch": 0, "position": 99})


def test_stream_epochs_differ_and_cover_rows():
    s = DistributedStream(features(40), micro_batch_size=8, rank=0, world_size=1, seed=0, pad_id=0)
    epoch0 = [i for step in range(5) for i in s.global_indices_for(step)]
    epoch1 = [i for step in range(5, 10) for i in s.global_indices_for(step)]
    assert sorted(epoch0) == sorted(epoch1) == list(range(40)) and epoch0 != epoch1
    other_seed = DistributedStream(features(40), micro_batch_size=8, rank=0, world_size=1, seed=1, pad_id=0)
    assert other_seed.global_indices_for(0) != s.global_indices_for(0)
    assert s.next_batch()["input_ids"][:, 0].tolist() == s.global_indices_for(0)


def test_stream_too_small():
    with pytest.raises(BulwarkInputError, match=r"'lisa_align' has 5 rows.*global micro-batch of 8"):
        DistributedStream(features(5), micro_batch_size=4, rank=0, world_size=2, seed=0, pad_id=0, name="lisa_align")


def test_alignment_rows_mix_benign_instructions(data_dir):
    from bulwark.config import load_config
    from bulwark.eval.judge_data import has_gcg_phrase
    from bulwark.recipes.streams import alignment_rows

    base = {"data.dir": str(data_dir), "data.align_n": 30}
    refusals = alignment_rows(load_config(None, [f"{k}={v}" for k, v in base.items()], "align"))
    assert len(refusals) == 30 and all(has_gcg_phrase(ex.response) for ex in refusals)
    cfg = load_config(None, [f"{k}={v}" for k, v in base.items()] + ["data.align_benign_n=10"], "align")
    mixed = alignment_rows(cfg)
    benign = [ex for ex in mixed if ex not in refusals]
    assert len(mixed) == 40 and len(benign) == 10
    assert {ex.prompt for ex in refusals} <= {ex.prompt for ex in mixed}
    alpaca = {ex.prompt for ex in load_examples("alpaca", None, data_dir)}
    assert all(ex.prompt in alpaca for ex in benign)
    assert [ex.prompt for ex in mixed[:30]] != [ex.prompt for ex in refusals]  # shuffled in, not appended
    assert mixed == alignment_rows(cfg)  # seeded
    with pytest.raises(BulwarkInputError, match="data.align_benign_n"):
        alignment_rows(load_config(None, [f"data.dir={data_dir}", "data.align_n=1", "data.align_benign_n=999999"],
                                   "align"))


def test_row_slice_of_a_source(data_dir):
    every = load_examples("alpaca_eval", None, data_dir)
    tail = load_examples("alpaca_eval[200:]", None, data_dir)
    assert [ex.prompt for ex in tail] == [ex.prompt for ex in every[200:]]
    assert len(load_examples("sst2_train[:5]", None, data_dir)) == 5
    assert read_rows("sst2_train[3:5]", data_dir)[0]["__line__"] == 4  # rows keep their line numbers
    with pytest.raises(BulwarkInputError, match=r"\[start:stop\]"):
        load_examples("sst2_train[5]", None, data_dir)
    with pytest.raises(BulwarkInputError, match="no rows"):
        load_examples("sst2_train[5:5]", None, data_dir)
