"""bench/gpu_figures.py and scripts/gpu_check.sh stay runnable where no GPU is: the figure cases run on
tiny shapes on the CPU (--smoke) through the same code paths, and the check script refuses clearly."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import REPO, check, run_cmd


def test_figure_cases_run_on_tiny_shapes(tmp_path: Path) -> None:
    cases = "bulwark:sft,deepspeed,torch,bulwark:lisa"
    check(run_cmd([sys.executable, str(REPO / "bench" / "gpu_figures.py"), "--smoke", "--cases", cases,
                   "--out", str(tmp_path), "--profile", "bulwark:sft"], timeout=400))
    figures = json.loads((tmp_path / "figures.json").read_text())
    rows = figures["cases"]
    assert list(rows) == cases.split(",")
    for case, row in rows.items():
        assert row["step_s"] > 0 and row["tokens_per_s"] == pytest.approx(2 * 32 / row["step_s"]), case
        assert row["plan"]["total_gib"] > 0, case
    assert rows["bulwark:lisa"]["defense"] == "lisa" and rows["bulwark:lisa"]["defense_state_bytes"] > 0
    assert figures["summary"]["bulwark_vs_deepspeed"] > 0 and figures["summary"]["ratio_lisa"] > 0
    assert "bulwark_sft" in (tmp_path / "profiles.txt").read_text()


@pytest.mark.skipif(shutil.which("nvidia-smi") is not None, reason="a GPU machine: the script would run for real")
def test_gpu_check_refuses_without_a_gpu(tmp_path: Path) -> None:
    proc = subprocess.run(["bash", str(REPO / "scripts" / "gpu_check.sh"), str(tmp_path / "out")],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2
    assert (tmp_path / "out" / "gpu_check.log").is_file()
