"""Every `bulwark` line of README's quick start resolves as written: its config, overrides, defense, data
files and model paths pass the same checks the launcher makes before it starts ranks (`prepare`).

The lines run with the tiny model standing in for the embedded one and every `runs/` path moved under a
temporary folder, where the models the earlier lines would have written are already saved; training
itself is tested elsewhere (tests/test_engine_zero3.py, tests/test_slurm_stages.py, tests/test_bench.py).
"""

from __future__ import annotations

import re
import shlex
import shutil
from pathlib import Path

import pytest

from tests.conftest import REPO


def quick_start_lines() -> list[list[str]]:
    text = (REPO / "README.md").read_text()
    block = text.split("## Quick start", 1)[1].split("```bash", 1)[1].split("```", 1)[0]
    lines = [line.split("#", 1)[0].strip() for line in block.splitlines()]
    return [shlex.split(line) for line in lines if line.startswith("bulwark ")]


def test_every_quick_start_line_resolves(tmp_path: Path, tiny_model_dir: Path, data_dir: Path,
                                         monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture) -> None:
    from bulwark import launch
    from bulwark.bench import load_bench_config
    from bulwark.recipes.eval import resolve

    monkeypatch.setenv("BULWARK_DATA_DIR", str(data_dir))
    monkeypatch.chdir(tmp_path)
    shutil.copytree(REPO / "configs", tmp_path / "configs")
    lines = quick_start_lines()
    assert [line[1] for line in lines] == ["align", "align", "finetune", "finetune", "recover", "eval", "bench"]
    for words in lines:
        verb, args = words[1], words[2:]
        for run in ("align", "attack", "recover"):  # what the earlier lines wrote, once a line reads it
            if any(f"runs/{run}/model" in a for a in args) and not (tmp_path / "runs" / run).exists():
                shutil.copytree(tiny_model_dir, tmp_path / "runs" / run / "model")
        if verb in ("align", "finetune"):
            config, overrides = args[0], args[1:]
            if not any(o.startswith("model.name=") for o in overrides):
                overrides.append(f"model.name={tiny_model_dir}")
            _, argv = launch.recipe(verb).prepare(config, overrides)
            Path(argv[0]).unlink()  # the resolved config the ranks would have read (launch.start removes it)
        elif verb == "recover":
            _, argv = launch.recipe(verb).prepare(args[0], args[1:])
            Path(argv[0]).unlink()
        elif verb == "eval":
            assert resolve(None, [f"model={args[0]}"])[0] == args[0]
        else:
            load_bench_config(None, args)
    # the README's attack line changes defense.name from the file's lisa: a note, not an error
    assert "defense.name=sft replaces the file's lisa" in capsys.readouterr().err


def test_a_resolved_config_records_the_defense_defaults(tmp_path: Path) -> None:
    from bulwark.config import load_config, write_config

    cfg = load_config(REPO / "configs" / "finetune_lisa.yaml", ["defense.rho=0.5"], "finetune")
    write_config(cfg, tmp_path / "config.yaml")
    saved = (tmp_path / "config.yaml").read_text()
    assert re.search(r"proximal_warmup: 0\.1", saved) and "rho: 0.5" in saved
    again = load_config(tmp_path / "config.yaml", [], "finetune")
    assert again.defense == cfg.defense
