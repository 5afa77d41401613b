"""Config resolution, and every bad input of the foundation issue: one clear line, exit 2, no output."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from bulwark.config import load_config, parse_overrides
from bulwark.errors import BulwarkInputError
from cli.main import app


def test_yaml_then_overrides(tmp_path: Path) -> None:
    path = tmp_path / "run.yaml"
    path.write_text("train:\n  lr: 0.001\n  steps: 5\ndefense:\n  name: lisa\n  rho: 2\n")
    cfg = load_config(path, ["train.steps=7", "model.lora.enabled=true", "model.lora.target_modules=q_proj,v_proj"],
                      "finetune")
    assert cfg.train.lr == 0.001 and cfg.train.steps == 7
    assert cfg.model.lora.enabled is True and cfg.model.lora.target_modules == ["q_proj", "v_proj"]
    # resolved at load: the file's value, every other Lisa parameter at its default
    assert cfg.defense == {"name": "lisa", "align_steps": 100, "finetune_steps": 900, "rho": 2.0, "proximal_warmup": 0.1}
    assert load_config(None, [], "align").train.lr == 5e-5  # stage default


@pytest.mark.parametrize(
    ("override", "needle"),
    [
        ("train.lrr=1", "did you mean 'lr'"),
        ("trian.lr=1", "did you mean 'train'"),
        ("train.steps=abc", "train.steps: expected an integer"),
        ("data.p=1.5", "data.p = 1.5 must be in [0, 1]"),
        ("train.steps", "is not key=value"),
    ],
)
def test_config_errors_name_the_key(override: str, needle: str) -> None:
    with pytest.raises(BulwarkInputError, match=None) as info:
        load_config(None, [override], "finetune")
    assert needle in str(info.value)


def test_parse_overrides_nested() -> None:
    assert parse_overrides(["a.b.c=1", "a.d=x"]) == {"a": {"b": {"c": 1}, "d": "x"}}


def _write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


@pytest.fixture()
def bad_files(tmp_path: Path) -> dict[str, Path]:
    good = "".join(json.dumps({"sentence": f"row {i}", "label": i % 2}) + "\n" for i in range(20))
    return {
        "malformed": _write(tmp_path / "sst2_bad.jsonl", good + '{"sentence": "x", "label": \n'),
        "missing": _write(tmp_path / "sst2_missing.jsonl", good + json.dumps({"text": "x", "label": 1}) + "\n"),
        "empty": _write(tmp_path / "sst2_empty.jsonl", ""),
        "ds": _write(tmp_path / "ds.json", '{"zero_optimization": {"stage": 3},\n  "bf16": }'),
        "small": _write(tmp_path / "sst2_small.jsonl", good),
    }


CASES = [
    ("malformed", lambda f: [f"data.user={f['malformed']}"], "sst2_bad.jsonl:21"),
    ("missing", lambda f: [f"data.user={f['missing']}"], "sst2_missing.jsonl:21"),
    ("empty", lambda f: [f"data.user={f['empty']}"], "no rows"),
    ("p", lambda f: ["data.p=1.5"], "data.p = 1.5"),
    ("n", lambda f: [f"data.user={f['small']}", "data.n=500", "data.p=0"], "500"),
    ("defense", lambda f: ["defense.name=lisaa"], "did you mean 'lisa'"),
    ("model", lambda f: ["model.name=/nonexistent/model"], "/nonexistent/model"),
    ("ds_config", lambda f: [f"launch.ds_config={f['ds']}"], "ds.json:2"),
    ("defense_key", lambda f: ["defense.name=lisa", "defense.rhoo=1"], "did you mean 'rho'"),
]


@pytest.mark.parametrize(("case", "make", "needle"), CASES, ids=[c[0] for c in CASES])
def test_bad_input_one_line_exit_2_nothing_written(
    case: str, make, needle: str, bad_files: dict[str, Path], tmp_path: Path, tiny_model_dir: Path, data_dir: Path
) -> None:
    out = tmp_path / "out"
    args = ["finetune", f"out_dir={out}", f"model.name={tiny_model_dir}", f"data.dir={data_dir}", "data.n=10",
            *make(bad_files)]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 2, result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), result.output
    assert needle in lines[0], lines[0]
    assert not out.exists()


def test_existing_run_folder_needs_overwrite(tmp_path: Path, tiny_model_dir: Path, data_dir: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (out / "precious.txt").write_text("keep")
    result = CliRunner().invoke(app, ["finetune", f"out_dir={out}", f"model.name={tiny_model_dir}",
                                      f"data.dir={data_dir}", "data.n=10"])
    # not a folder Bulwark made: no flag replaces it (tests/test_hostile.py: not even --overwrite)
    assert result.exit_code == 2 and "did not write" in result.output
    assert (out / "precious.txt").read_text() == "keep"
    (out / ".bulwark-run").write_text("")  # a run folder of Bulwark's: --overwrite is the way
    result = CliRunner().invoke(app, ["finetune", f"out_dir={out}", f"model.name={tiny_model_dir}",
                                      f"data.dir={data_dir}", "data.n=10"])
    assert result.exit_code == 2 and "--overwrite" in result.output
    result = CliRunner().invoke(app, ["finetune", f"out_dir={out}", f"model.name={tiny_model_dir}", "--resume"])
    assert result.exit_code == 2 and "no finished checkpoint" in result.output
