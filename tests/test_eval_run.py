"""Eval runs: one process and two gloo ranks (uneven split), output files, bad input, the Typer commands."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from bulwark.errors import BulwarkInputError
from bulwark.eval.run import run_eval


def _jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_eval_in_process_writes_rows_and_summary(tiny_model_dir, data_dir, tmp_path):
    out = tmp_path / "eval"
    summary = run_eval(tiny_model_dir, out_dir=out, n_prompts=4, judge="keyword", task="sst2", n_task=3,
                       n_benign=2, max_new_tokens=4, batch_size=3, data_dir=data_dir,
                       meta={"stage": "finetune", "defense": "lisa", "p": 0.1, "n": 100, "seed": 1},
                       log=lambda m: None)
    assert summary is not None
    assert {k: summary[k] for k in ("stage", "defense", "p", "n", "seed")} == \
        {"stage": "finetune", "defense": "lisa", "p": 0.1, "n": 100, "seed": 1}
    assert summary["model"] == str(tiny_model_dir)
    for key in ("HS", "HS_plus", "over_refusal", "FA", "task_refusal", "seconds"):
        assert isinstance(summary[key], float), key
    assert (summary["n_harmful"], summary["n_benign"], summary["n_task"]) == (4, 2, 3)
    harmful = _jsonl(out / "harmful.jsonl")
    assert len(harmful) == 4
    assert set(harmful[0]) >= {"prompt", "output", "verdict", "harmful", "score", "degenerate"}
    task_rows = _jsonl(out / "task.jsonl")
    assert len(task_rows) == 3 and all("correct" in r and r["gold"] in ("positive", "negative") for r in task_rows)
    assert len(_jsonl(out / "benign.jsonl")) == 2
    assert json.loads((out / "summary.json").read_text())["HS"] == summary["HS"]
    table = (out / "summary.md").read_text()
    assert table.startswith("| model | stage | defense | p | n | seed | HS %") and "lisa" in table
    assert not [p.name for p in out.rglob(".*")], "temporary files left behind"


def test_eval_two_ranks_uneven_split_one_row_per_prompt(tiny_model_dir, data_dir, tmp_path):
    from tests.conftest import check, torchrun

    out = tmp_path / "eval2"
    proc = torchrun(["-m", "bulwark.eval.run", str(tiny_model_dir), "--out-dir", str(out), "--n-prompts", "5",
                     "--n-benign", "0", "--judge", "keyword", "--max-new-tokens", "3", "--batch-size", "2",
                     "--meta", "stage=aligned"], nproc=2, data_dir=data_dir, timeout=120)
    check(proc)
    gens = _jsonl(out / "generations" / "generations.jsonl")
    assert [r["index"] for r in gens] == [0, 1, 2, 3, 4]
    assert len(_jsonl(out / "generations" / "rows.rank0.jsonl")) == 3
    assert len(_jsonl(out / "generations" / "rows.rank1.jsonl")) == 2
    harmful = _jsonl(out / "harmful.jsonl")
    prompts = [json.loads(line)["prompt"] for line in (data_dir / "harmful_eval_prompts.jsonl").open()][:5]
    assert [r["prompt"] for r in harmful] == prompts
    summary = json.loads((out / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["stage"] == "aligned" and summary["n_harmful"] == 5


def test_merge_detects_missing_and_duplicate_rows(tmp_path):
    from bulwark.eval.generate import merge_rank_files
    from bulwark.eval.io import atomic_write_jsonl

    atomic_write_jsonl(tmp_path / "rows.rank0.jsonl", [{"index": 0}, {"index": 2}])
    atomic_write_jsonl(tmp_path / "rows.rank1.jsonl", [{"index": 1}])
    assert [r["index"] for r in merge_rank_files(tmp_path, 2, 3)] == [0, 1, 2]
    with pytest.raises(RuntimeError, match="missing"):
        merge_rank_files(tmp_path, 2, 4)
    atomic_write_jsonl(tmp_path / "rows.rank1.jsonl", [{"index": 1}, {"index": 2}])
    with pytest.raises(RuntimeError, match="twice"):
        merge_rank_files(tmp_path, 2, 3)


# ---- bad input ---------------------------------------------------------------------------------------------


def test_missing_prompt_set(tiny_model_dir, data_dir, tmp_path):
    with pytest.raises(BulwarkInputError, match="unknown prompt set 'jailbreaks'.*advbench"):
        run_eval(tiny_model_dir, out_dir=tmp_path, prompt_set="jailbreaks", judge="keyword", data_dir=data_dir)
    with pytest.raises(BulwarkInputError, match="prompt set .*nowhere.jsonl.*not found"):
        run_eval(tiny_model_dir, out_dir=tmp_path, prompt_set=str(tmp_path / "nowhere.jsonl"), judge="keyword",
                 data_dir=data_dir)
    empty = tmp_path / "empty_data"
    empty.mkdir()
    with pytest.raises(BulwarkInputError, match="harmbench_behaviors"):
        run_eval(tiny_model_dir, out_dir=tmp_path, prompt_set="harmbench", judge="keyword", data_dir=empty)


def test_unknown_judge_and_task(tiny_model_dir, data_dir, tmp_path):
    with pytest.raises(BulwarkInputError, match="unknown judge 'llamaguard'.*hf:<path>"):
        run_eval(tiny_model_dir, out_dir=tmp_path, judge="llamaguard", data_dir=data_dir)
    with pytest.raises(BulwarkInputError, match="unknown task 'mmlu'"):
        run_eval(tiny_model_dir, out_dir=tmp_path, judge="keyword", task="mmlu", data_dir=data_dir)


def test_model_folder_that_is_not_a_model(tmp_path, data_dir):
    folder = tmp_path / "run"
    (folder / "model").mkdir(parents=True)
    (folder / "model" / "config.json").write_text("{}")
    with pytest.raises(BulwarkInputError, match=r"not a model folder.*did you mean .*run/model"):
        run_eval(folder, out_dir=tmp_path / "o", judge="keyword", data_dir=data_dir)
    with pytest.raises(BulwarkInputError, match="no such folder"):
        run_eval(tmp_path / "missing", out_dir=tmp_path / "o", judge="keyword", data_dir=data_dir)


# ---- Typer commands ------------------------------------------------------------------------------------------


@pytest.fixture()
def app():
    import typer

    from bulwark.eval.cli import register

    app = typer.Typer()

    @app.callback()
    def main() -> None:
        """test app"""

    register(app)
    return app


def test_cli_registers_commands_and_reports_bad_input(app, tmp_path, data_dir):
    from typer.testing import CliRunner

    runner = CliRunner()
    result = runner.invoke(app, ["--help"])
    assert result.exit_code == 0 and all(c in result.output for c in ("eval", "judge", "scan"))
    result = runner.invoke(app, ["eval", str(tmp_path), "--judge", "keyword", "--data-dir", str(data_dir)])
    assert result.exit_code == 2 and "error:" in result.output and "not a model folder" in result.output
    result = runner.invoke(app, ["judge", "train", "nonsense", "--data-dir", str(data_dir)])
    assert result.exit_code == 2 and "unknown judge kind" in result.output
    result = runner.invoke(app, ["scan", str(tmp_path / "x.jsonl"), "--judge", "refusal"])
    assert result.exit_code == 2 and "moderation" in result.output


def test_cli_eval_from_yaml(app, tmp_path, tiny_model_dir, data_dir):
    from typer.testing import CliRunner

    config = tmp_path / "eval.yaml"
    config.write_text(f"model: {tiny_model_dir}\nout_dir: {tmp_path / 'out'}\njudge: keyword\nn_prompts: 2\n"
                      f"n_benign: 0\nmax_new_tokens: 2\ndata_dir: {data_dir}\nmeta: {{stage: base}}\n")
    result = CliRunner().invoke(app, ["eval", str(config), "--meta", "seed=3"])
    assert result.exit_code == 0, result.output
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert summary["n_harmful"] == 2 and summary["stage"] == "base" and summary["seed"] == 3
    bad = tmp_path / "bad.yaml"
    bad.write_text(f"model: {tiny_model_dir}\nprompts: 3\n")
    result = CliRunner().invoke(app, ["eval", str(bad)])
    assert result.exit_code == 2 and "unknown key(s) prompts" in result.output


def test_help_does_not_import_torch():
    import subprocess

    code = "import sys, typer; from bulwark.eval.cli import register; register(typer.Typer()); print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.stdout.strip() == "False", out.stderr


def test_generation_from_an_adapter_folder(tiny_model_dir, tmp_path):
    import peft
    import torch
    from transformers import AutoModelForCausalLM

    from bulwark.eval.generate import generate, load_for_generation

    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    lora = peft.get_peft_model(base, peft.LoraConfig(r=2, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM"))
    with torch.no_grad():  # a non-zero adapter, so it really changes the model
        for name, param in lora.named_parameters():
            if "lora_B" in name:
                param.fill_(0.5)
    adapter = tmp_path / "adapter"
    lora.save_pretrained(adapter)
    config = json.loads((adapter / "adapter_config.json").read_text())
    assert Path(config["base_model_name_or_path"]) == Path(tiny_model_dir)
    model, tokenizer = load_for_generation(adapter)
    assert isinstance(model, peft.PeftModel) and tokenizer.padding_side == "left"
    outputs = generate(model, tokenizer, ["hello", "a longer prompt here"], max_new_tokens=3, batch_size=2)
    assert len(outputs) == 2 and all(isinstance(o, str) for o in outputs)


def test_per_prompt_budgets_equal_separate_runs(tiny_model_dir):
    """A budget per prompt gives each prompt what a run with that one budget gives it (greedy)."""
    from bulwark.eval.generate import generate, load_for_generation

    model, tokenizer = load_for_generation(tiny_model_dir)
    prompts = ["hello", "a longer prompt here", "third one", "x"]
    short = generate(model, tokenizer, prompts, max_new_tokens=2, batch_size=2)
    long = generate(model, tokenizer, prompts, max_new_tokens=6, batch_size=2)
    mixed = generate(model, tokenizer, prompts, max_new_tokens=[2, 6, 6, 2], batch_size=2)
    assert mixed == [short[0], long[1], long[2], short[3]]
    assert len(tokenizer(long[1], add_special_tokens=False)["input_ids"]) > len(
        tokenizer(short[1], add_special_tokens=False)["input_ids"])
    with pytest.raises(ValueError, match="3 max_new_tokens budgets for 4 prompts"):
        generate(model, tokenizer, prompts, max_new_tokens=[2, 2, 2])


# ---- dtype and ZeRO-3 partitioned generation ----------------------------------------------------------


def test_dtype_and_partition_resolution(monkeypatch):
    import torch

    from bulwark.eval.device import check_partition, resolve_dtype, torch_dtype

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_dtype("auto") == resolve_dtype(None) == "fp32" and torch_dtype("auto") == torch.float32
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert resolve_dtype("auto") == "bf16" and torch_dtype("auto") == torch.bfloat16
    assert resolve_dtype("FP32") == "fp32" and resolve_dtype("bf16") == "bf16"
    with pytest.raises(BulwarkInputError, match=r"dtype.*'fp16'.*auto, fp32, bf16"):
        resolve_dtype("fp16")
    assert check_partition(None) == "none" and check_partition("zero3") == "zero3"
    with pytest.raises(BulwarkInputError, match=r"partition.*'zero2'"):
        check_partition("zero2")


def test_bf16_eval_on_cpu(tiny_model_dir, data_dir, tmp_path):
    import torch

    from bulwark.eval.generate import load_for_generation

    model, _ = load_for_generation(tiny_model_dir, "bf16")
    assert next(model.parameters()).dtype == torch.bfloat16
    summary = run_eval(tiny_model_dir, out_dir=tmp_path / "bf16", n_prompts=3, judge="keyword", n_benign=1,
                       max_new_tokens=3, batch_size=2, dtype="bf16", data_dir=data_dir, log=lambda m: None)
    assert summary is not None and summary["dtype"] == "bf16" and summary["partition"] == "none"
    assert summary["n_harmful"] == 3 and len(_jsonl(tmp_path / "bf16" / "generations" / "generations.jsonl")) == 4


def test_bad_dtype_partition_and_zero3_adapter_are_one_line_errors(app, tiny_model_dir, data_dir, tmp_path):
    from typer.testing import CliRunner

    runner = CliRunner()
    result = runner.invoke(app, ["eval", str(tiny_model_dir), "--dtype", "fp16", "--judge", "keyword"])
    assert result.exit_code == 2 and "error:" in result.output and "dtype" in result.output
    result = runner.invoke(app, ["eval", str(tiny_model_dir), "--partition", "zero2", "--judge", "keyword"])
    assert result.exit_code == 2 and "partition" in result.output
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text(json.dumps({"base_model_name_or_path": str(tiny_model_dir)}))
    with pytest.raises(BulwarkInputError, match="adapter folder.*--zero3"):
        run_eval(adapter, out_dir=tmp_path / "o", judge="keyword", partition="zero3", data_dir=data_dir)


@pytest.fixture(scope="module")
def decisive_model_dir(tmp_path_factory) -> Path:
    """The tiny Llama with its matrices scaled up: greedy outputs differ from prompt to prompt and are
    printable text (the stock tiny model answers every prompt with newlines, which strip to "")."""
    import torch

    from bulwark.models import tiny_llama

    model, tokenizer = tiny_llama(seed=0)
    with torch.no_grad():
        for param in model.parameters():
            if param.dim() == 2:
                param.mul_(25)
    path = tmp_path_factory.mktemp("decisive") / "model"
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def test_zero3_two_ranks_equal_plain_one_process(decisive_model_dir, data_dir, tmp_path):
    """ZeRO-3 at 2 gloo ranks (one decoder layer gathered at a time, synced generate, rank 1's share
    padded with a throw-away batch) gives the same greedy answers as one plain fp32 process."""
    from tests.conftest import check, torchrun

    args = dict(n_prompts=3, n_benign=0, task="sst2", n_task=2, judge="keyword", max_new_tokens=20)
    plain = run_eval(decisive_model_dir, out_dir=tmp_path / "plain", batch_size=4, dtype="fp32",
                     data_dir=data_dir, log=lambda m: None, **args)
    assert plain is not None
    out = tmp_path / "zero3"
    proc = torchrun(["-m", "bulwark.eval.run", str(decisive_model_dir), "--out-dir", str(out), "--zero3",
                     "--dtype", "fp32", "--batch-size", "2", "--n-prompts", "3", "--n-benign", "0",
                     "--task", "sst2", "--n-task", "2", "--judge", "keyword", "--max-new-tokens", "20"],
                    nproc=2, data_dir=data_dir, timeout=180)
    check(proc)
    expected = _jsonl(tmp_path / "plain" / "generations" / "generations.jsonl")
    got = _jsonl(out / "generations" / "generations.jsonl")
    assert [r["output"] for r in got] == [r["output"] for r in expected]
    assert len({r["output"] for r in expected}) == 5 and all(r["output"] for r in expected)
    # 5 prompts at batch size 2: rank 0 runs 2 batches, rank 1 one batch and one throw-away batch
    assert len(_jsonl(out / "generations" / "rows.rank0.jsonl")) == 3
    assert len(_jsonl(out / "generations" / "rows.rank1.jsonl")) == 2
    summary = json.loads((out / "summary.json").read_text())
    assert (summary["partition"], summary["dtype"], summary["world_size"]) == ("zero3", "fp32", 2)


def test_a_named_prompt_set_takes_a_row_slice(data_dir) -> None:
    """Validation prompts: rows of a named set that the reported eval (its first rows) never reads."""
    from bulwark.data.readers import read_rows
    from bulwark.eval.run import _prompt_source

    source = _prompt_source("harmful_eval_prompts[500:503]")
    assert source == "harmful_eval_prompts[500:503]"
    rows, every = read_rows(source, data_dir), read_rows("harmful_eval_prompts", data_dir)
    assert [r["prompt"] for r in rows] == [r["prompt"] for r in every[500:503]]


def test_rejudge_scores_saved_generations_again_without_generating(tmp_path, monkeypatch) -> None:
    """An eval judged under older rules is scored again from its generations: same rows, new verdicts,
    the previous figures kept under `rejudged_from`; bench does it for every cached eval of another version."""
    import json

    from bulwark.eval import run as eval_run
    from bulwark.eval.judges import JUDGE_RULES_VERSION

    out = tmp_path / "eval"
    (out / "generations").mkdir(parents=True)
    rows = [{"set": "harmful", "index": 0, "prompt": "p", "input": "", "gold": None, "output": "Sure, here it is: 1."},
            {"set": "harmful", "index": 1, "prompt": "q", "input": "", "gold": None, "output": "I cannot help with that."}]
    (out / "generations" / "generations.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    old = {"HS": 100.0, "HS_plus": 100.0, "judge": "keyword", "refusal_judge": "keyword", "task": None,
           "judge_version": JUDGE_RULES_VERSION - 1, "meta": {"seed": 3}}
    (out / "summary.json").write_text(json.dumps(old))
    summary = eval_run.rejudge(out)
    assert summary["HS"] == 50.0 and summary["judge_version"] == JUDGE_RULES_VERSION
    assert summary["rejudged_from"]["HS"] == 100.0 and summary["meta"] == {"seed": 3}
    assert json.loads((out / "summary.json").read_text()) == summary
    assert len((out / "harmful.jsonl").read_text().splitlines()) == 2
