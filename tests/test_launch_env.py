"""The environment the launcher gives CPU ranks: its memory and thread settings fill in what the user
left unset, and a value the user set wins (docs/DESIGN.md, "Heap kept")."""

from __future__ import annotations

import os

from bulwark.launch import CPU_MALLOC_ENV, CPU_SPIN_ROUNDS, with_cpu_rank_env


def test_launcher_settings_fill_in_and_user_settings_win() -> None:
    env = with_cpu_rank_env({"MALLOC_MMAP_MAX_": "65536", "OMP_NUM_THREADS": "3", "PATH": "/bin"}, nproc=2)
    assert env["MALLOC_MMAP_MAX_"] == "65536" and env["OMP_NUM_THREADS"] == "3" and env["PATH"] == "/bin"
    assert {k: env[k] for k in CPU_MALLOC_ENV if k != "MALLOC_MMAP_MAX_"} == {
        "MALLOC_MMAP_THRESHOLD_": str(32 * 2**20), "MALLOC_TRIM_THRESHOLD_": str(4 * 2**30), "MALLOC_TOP_PAD_": str(2**30)}
    assert with_cpu_rank_env({}, nproc=1)["MALLOC_MMAP_MAX_"] == "0"


def test_openmp_spins_briefly_unless_the_user_chose_a_wait() -> None:
    assert with_cpu_rank_env({}, nproc=1)["GOMP_SPINCOUNT"] == CPU_SPIN_ROUNDS
    assert with_cpu_rank_env({"GOMP_SPINCOUNT": "50"}, nproc=1)["GOMP_SPINCOUNT"] == "50"
    # libgomp lets GOMP_SPINCOUNT override OMP_WAIT_POLICY: setting it would undo the user's choice
    chosen = with_cpu_rank_env({"OMP_WAIT_POLICY": "active"}, nproc=1)
    assert chosen["OMP_WAIT_POLICY"] == "active" and "GOMP_SPINCOUNT" not in chosen


def test_the_launcher_gives_cpu_ranks_the_short_spin() -> None:
    """What _spawn hands torchrun on a CPU machine, not only the helper's output."""
    import pytest
    import torch

    from bulwark.launch import rank_env

    if torch.cuda.is_available():
        pytest.skip("on a GPU machine ranks get the environment as it is")
    env = rank_env({"PATH": "/bin"}, nproc=2)
    assert env["GOMP_SPINCOUNT"] == CPU_SPIN_ROUNDS and env["OMP_NUM_THREADS"] == str(max(1, (os.cpu_count() or 1) // 2))


def test_a_rank_is_torchruns_or_bulwarks_never_slurm_procid_alone() -> None:
    from bulwark.launch import is_rank_process

    assert not is_rank_process({"SLURM_PROCID": "0", "SLURM_LOCALID": "0", "SLURM_NTASKS": "1"})
    assert is_rank_process({"LOCAL_RANK": "0", "WORLD_SIZE": "2", "SLURM_PROCID": "0"})
    assert is_rank_process({"BULWARK_RANK": "1"})
    assert not is_rank_process({"LOCAL_RANK": "0"})  # torchrun sets both


def test_unknown_stage_is_one_line() -> None:
    import pytest

    from bulwark.errors import BulwarkInputError
    from bulwark.launch import launch

    with pytest.raises(BulwarkInputError, match="unknown stage 'train'"):
        launch("train", None, [])


def test_ranks_get_the_resolved_config_file_not_strings(tmp_path, tiny_model_dir, data_dir, monkeypatch) -> None:
    """prepare resolves once, in the parent: the rank argv is one YAML file holding every value (defense
    defaults included), no overrides to parse again; loading it gives the same config."""
    from pathlib import Path

    from bulwark import launch
    from bulwark.config import load_config
    from bulwark.recipes.loop import config_text
    from tests.conftest import REPO

    monkeypatch.setenv("BULWARK_DATA_DIR", str(data_dir))
    overrides = [f"model.name={tiny_model_dir}", f"out_dir={tmp_path / 'run'}", "defense.name=sft", "train.steps=2"]
    _, argv = launch.recipe("finetune").prepare(str(REPO / "configs" / "finetune_lisa.yaml"), overrides)
    resolved = Path(argv[0])
    try:
        assert resolved.name.startswith(launch.RESOLVED_PREFIX) and argv[1:] == []
        expected = load_config(str(REPO / "configs" / "finetune_lisa.yaml"), overrides, "finetune")
        assert resolved.read_text() == config_text(expected)
        assert load_config(str(resolved), [], "finetune") == expected
        assert "align_steps" not in resolved.read_text()  # lisa's keys dropped with the name change
    finally:
        resolved.unlink()


def test_eval_and_recover_ranks_get_resolved_files(tmp_path, tiny_model_dir, data_dir, monkeypatch) -> None:
    from pathlib import Path

    from bulwark import launch
    from bulwark.recipes.eval import resolve
    from bulwark.recover.config import load_recover_config, recover_config_text

    monkeypatch.setenv("BULWARK_DATA_DIR", str(data_dir))
    given = [f"model={tiny_model_dir}", "n_prompts=3", "meta.seed=1", f"out_dir={tmp_path / 'eval'}"]
    _, argv = launch.recipe("eval").prepare(None, given)
    try:
        assert argv[1:] == [] and resolve(argv[0], []) == resolve(None, given)
    finally:
        Path(argv[0]).unlink()
    a, b = tmp_path / "A", tmp_path / "B"
    import shutil

    shutil.copytree(tiny_model_dir, a)
    shutil.copytree(tiny_model_dir, b)
    given = [f"aligned={a}", f"finetuned={b}", f"out_dir={tmp_path / 'rec'}", "task.metric=loss"]
    _, argv = launch.recipe("recover").prepare(None, given)
    try:
        assert argv[1:] == [] and Path(argv[0]).read_text() == recover_config_text(load_recover_config(None, given))
    finally:
        Path(argv[0]).unlink()


def test_the_bulwark_process_spins_briefly_before_torch_loads(tmp_path) -> None:
    """An eval at one rank runs in the `bulwark` process itself: the setting must be in its environment
    before torch (and libgomp, which reads it once) is loaded."""
    import subprocess
    import sys
    from pathlib import Path

    import pytest

    from bulwark.launch import OPENMP_WAIT_VARIABLES, gpu_device_present

    if gpu_device_present():
        pytest.skip("a GPU machine keeps its environment")
    probe = "import os, sys, cli.main; print(os.environ.get('GOMP_SPINCOUNT'), 'torch' in sys.modules)"
    root = str(Path(__file__).resolve().parents[1])
    base = {k: v for k, v in os.environ.items() if k not in OPENMP_WAIT_VARIABLES}
    base["PYTHONPATH"] = root
    out = subprocess.run([sys.executable, "-c", probe], env=base, capture_output=True, text=True, check=True, cwd=root)
    assert out.stdout.split() == [CPU_SPIN_ROUNDS, "False"]
    out = subprocess.run([sys.executable, "-c", probe], env={**base, "OMP_WAIT_POLICY": "passive"},
                         capture_output=True, text=True, check=True, cwd=root)
    assert out.stdout.split() == ["None", "False"]
