"""Hostile input: each case is something a user of a fine-tuning service could hand Bulwark (an upload, a
config, a model folder, a run folder, a signal). Every one must end in exit code 2 (3 for a diverged run)
with a short error and no traceback, and nothing the user had may be lost or changed.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import REPO, RUN_TIMEOUT_S, bulwark_cli, subprocess_env


def tiny(model: Path, out: Path, *extra: str) -> list[str]:
    return [f"model.name={model}", f"out_dir={out}", "data.n=16", "data.max_length=32", "data.align_n=16",
            "data.template=alpaca", "train.micro_batch_size=2", "train.steps=2", "launch.nproc=2", *extra]


def snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def assert_clean_failure(proc: subprocess.CompletedProcess, code: int, says: str) -> None:
    err = proc.stderr.strip()
    lines = [line for line in err.splitlines() if not line.startswith(("Writing model", "note:")) and line.strip()]
    assert proc.returncode == code, (proc.returncode, err[-3000:])
    assert "Traceback" not in err, err[-3000:]
    assert len(lines) == 1 and lines[0].startswith(("error:", "interrupted")), lines
    assert says in lines[0], lines[0]


@pytest.fixture()
def user_files(tmp_path: Path) -> Path:
    """A folder of the user's own, which no run may touch."""
    folder = tmp_path / "mine"
    folder.mkdir()
    (folder / "notes.txt").write_text("my notes\n")
    (folder / "sub").mkdir()
    (folder / "sub" / "data.jsonl").write_text('{"x": 1}\n')
    return folder


# ---- caught before any rank starts ---------------------------------------------------------------------

def _write(tmp_path: Path, name: str, content: bytes | str) -> Path:
    path = tmp_path / name
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    return path


BAD_JSONL = '{"sentence": "a", "label": 1}\n{oops\n'
PARENT_CASES = {
    # id: (extra overrides, builder of files -> extra overrides, expected words)
    "binary_upload": lambda t: ([f"data.user={_write(t, 'up.jsonl', bytes(range(256)) * 64)}"], "up.jsonl"),
    "upload_bad_json_line": lambda t: ([f"data.user={_write(t, 'up2.jsonl', BAD_JSONL)}"], "up2.jsonl"),
    "upload_missing": lambda t: ([f"data.user={t / 'nope.jsonl'}"], "nope.jsonl"),
    "empty_upload": lambda t: ([f"data.user={_write(t, 'empty.jsonl', '')}"], "empty.jsonl"),
    "nan_lr": lambda t: (["train.lr=.nan"], "train.lr"),
    "inf_lr": lambda t: (["train.lr=.inf"], "train.lr"),
    "negative_lr": lambda t: (["train.lr=-1e-5"], "train.lr"),
    "negative_defense_rho": lambda t: (["defense.name=lisa", "defense.rho=-1"], "defense.rho"),
    "nan_defense_rho": lambda t: (["defense.name=lisa", "defense.rho=.nan"], "defense.rho"),
    "p_above_one": lambda t: (["data.p=1.5"], "data.p"),
    "zero_steps": lambda t: (["train.steps=0"], "train.steps"),
    "unknown_key": lambda t: (["train.lrr=1"], "train.lrr"),
    "unknown_defense": lambda t: (["defense.name=vacine"], "vaccine"),
    "defense_at_wrong_stage": lambda t: (["defense.name=booster"], "booster"),
    "no_equals": lambda t: (["train.steps"], "key=value"),
    "ds_config_missing": lambda t: (["launch.ds_config=nonexistent"], "nonexistent"),
    "ds_config_not_json": lambda t: ([f"launch.ds_config={_write(t, 'ds.json', '{not json')}"], "ds.json"),
    "ds_config_with_optimizer": lambda t: (
        [f"launch.ds_config={_write(t, 'ds2.json', json.dumps({'zero_optimization': {'stage': 3}, 'optimizer': {}}))}"],
        "optimizer"),
    "ds_config_fp16": lambda t: (
        [f"launch.ds_config={_write(t, 'ds3.json', json.dumps({'zero_optimization': {'stage': 3}, 'fp16': {'enabled': True}}))}"],
        "fp16"),
    "model_folder_missing": lambda t: ([f"model.name={t / 'no_model'}"], "no_model"),
}


@pytest.mark.parametrize("case", sorted(PARENT_CASES))
def test_rejected_before_any_rank(case: str, tmp_path: Path, tiny_model_dir: Path, data_dir: Path,
                                  user_files: Path) -> None:
    before = snapshot(user_files)
    extra, says = PARENT_CASES[case](tmp_path)
    out = tmp_path / "run"
    proc = bulwark_cli(["finetune", *tiny(tiny_model_dir, out), *extra], data_dir)
    assert_clean_failure(proc, 2, says)
    assert not out.exists(), "a run folder was made for a rejected run"
    assert snapshot(user_files) == before


def test_yaml_section_given_as_a_scalar(tmp_path: Path, tiny_model_dir: Path, data_dir: Path) -> None:
    config = _write(tmp_path, "run.yaml", "train: 5\n")
    proc = bulwark_cli(["finetune", str(config), *tiny(tiny_model_dir, tmp_path / "run")], data_dir)
    assert_clean_failure(proc, 2, "'train' is 5")


def test_overwrite_never_deletes_the_users_folder(tmp_path: Path, tiny_model_dir: Path, data_dir: Path,
                                                  user_files: Path) -> None:
    before = snapshot(user_files)
    proc = bulwark_cli(["finetune", *tiny(tiny_model_dir, user_files), "--overwrite"], data_dir)
    assert_clean_failure(proc, 2, "did not write")
    assert snapshot(user_files) == before


def test_out_dir_that_is_a_file(tmp_path: Path, tiny_model_dir: Path, data_dir: Path) -> None:
    out = _write(tmp_path, "run", "not a folder")
    proc = bulwark_cli(["finetune", *tiny(tiny_model_dir, out)], data_dir)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert out.read_text() == "not a folder"


def test_a_live_lock_refuses_a_second_run_and_a_dead_one_is_taken_over(tmp_path: Path, tiny_model_dir: Path,
                                                                       data_dir: Path) -> None:
    import socket

    out = tmp_path / "run"
    lock = tmp_path / "run.lock"
    lock.write_text(json.dumps({"pid": os.getpid(), "host": socket.gethostname()}))  # this test: alive
    assert_clean_failure(bulwark_cli(["finetune", *tiny(tiny_model_dir, out)], data_dir), 2, "another run")
    assert not out.exists()
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    lock.write_text(json.dumps({"pid": dead.pid, "host": socket.gethostname()}))
    proc = bulwark_cli(["finetune", *tiny(tiny_model_dir, out)], data_dir)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (out / "DONE").is_file() and not lock.exists()


# ---- found inside the ranks ----------------------------------------------------------------------------

def test_a_ds_config_value_deepspeed_refuses_is_caught_before_the_ranks(tmp_path: Path, tiny_model_dir: Path,
                                                                        data_dir: Path) -> None:
    ds = _write(tmp_path, "ds.json", json.dumps({"zero_optimization": {"stage": 3, "stage3_max_live_parameters": "lots"}}))
    out = tmp_path / "run"
    proc = bulwark_cli(["finetune", *tiny(tiny_model_dir, out), f"launch.ds_config={ds}"], data_dir)
    assert_clean_failure(proc, 2, "zero_optimization.stage3_max_live_parameters")
    assert not out.exists()


def test_a_model_that_fails_to_load_in_the_ranks_is_one_line_and_does_not_block_the_rerun(
        tmp_path: Path, tiny_model_dir: Path, data_dir: Path) -> None:
    """config.json and weights that disagree (readable headers, wrong shapes) only fail inside the ranks."""
    model = tmp_path / "model"
    shutil.copytree(tiny_model_dir, model)
    config = json.loads((model / "config.json").read_text())
    (model / "config.json").write_text(json.dumps({**config, "intermediate_size": config["intermediate_size"] * 2}))
    out = tmp_path / "run"
    proc = bulwark_cli(["finetune", *tiny(model, out)], data_dir)
    assert_clean_failure(proc, 2, "input rejected")
    assert (out / "FAILED").is_file() and "Traceback" in (out / "FAILED").read_text()
    proc = bulwark_cli(["finetune", *tiny(tiny_model_dir, out)], data_dir)  # fixed: no --overwrite needed
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (out / "DONE").is_file() and not (out / "FAILED").exists()


def test_weights_that_do_not_load(tmp_path: Path, tiny_model_dir: Path, data_dir: Path) -> None:
    model = tmp_path / "model"
    shutil.copytree(tiny_model_dir, model)
    weights = next(model.glob("*.safetensors"))
    weights.write_bytes(b"\x00" * 64)
    out = tmp_path / "run"
    assert_clean_failure(bulwark_cli(["finetune", *tiny(model, out)], data_dir), 2, "not a readable safetensors")
    assert weights.read_bytes() == b"\x00" * 64 and not out.exists()


def test_nan_weights_diverge_with_their_own_exit_code_and_export_nothing(tmp_path: Path, tiny_model_dir: Path,
                                                                        data_dir: Path) -> None:
    import torch
    from safetensors.torch import load_file, save_file

    model = tmp_path / "model"
    shutil.copytree(tiny_model_dir, model)
    weights = next(model.glob("*.safetensors"))
    state = load_file(weights)
    name = next(k for k in state if "layers.0.mlp.down_proj" in k)
    state[name] = torch.full_like(state[name], float("nan"))
    save_file(state, weights, metadata={"format": "pt"})
    out = tmp_path / "run"
    proc = bulwark_cli(["finetune", *tiny(model, out)], data_dir)
    assert_clean_failure(proc, 3, "step 1: the loss is nan")
    assert not (out / "model").exists() and not (out / "DONE").exists()


def test_ctrl_c_says_where_to_resume(tmp_path: Path, tiny_model_dir: Path, data_dir: Path) -> None:
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "cli.main", "finetune",
           *tiny(tiny_model_dir, out, "train.steps=500", "train.checkpoint_every=2")]
    proc = subprocess.Popen(cmd, env=subprocess_env(data_dir), cwd=REPO, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)
    deadline = time.monotonic() + RUN_TIMEOUT_S
    while not (out / "checkpoints" / "latest").is_file():
        assert proc.poll() is None and time.monotonic() < deadline, "no checkpoint appeared"
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGINT)
    _, err = proc.communicate(timeout=RUN_TIMEOUT_S)
    result = subprocess.CompletedProcess(cmd, proc.returncode, "", err)
    assert_clean_failure(result, 130, "--resume")
    assert not (out / "FAILED").exists()  # a checkpoint exists: the run is resumable, not failed


def test_sigterm_to_the_command_stops_its_ranks_too(tmp_path: Path, tiny_model_dir: Path, data_dir: Path) -> None:
    """kill, scancel or a supervisor signal the command, not its ranks: they must not run on, orphaned,
    writing a run folder that a restarted command would then share."""
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "cli.main", "finetune",
           *tiny(tiny_model_dir, out, "train.steps=500", "train.checkpoint_every=2")]
    proc = subprocess.Popen(cmd, env=subprocess_env(data_dir), cwd=REPO, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        deadline = time.monotonic() + RUN_TIMEOUT_S
        while not (out / "checkpoints" / "latest").is_file():
            assert proc.poll() is None and time.monotonic() < deadline, "no checkpoint appeared"
            time.sleep(0.05)
        os.kill(proc.pid, signal.SIGTERM)  # the command alone, as `kill PID` does
        _, err = proc.communicate(timeout=RUN_TIMEOUT_S)
        assert_clean_failure(subprocess.CompletedProcess(cmd, proc.returncode, "", err), 130, "--resume")
        time.sleep(1.0)
        with pytest.raises(ProcessLookupError):  # nothing of the run is left in its process group
            os.killpg(proc.pid, 0)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)


def test_exploding_gradients_stop_the_run_instead_of_skipping_every_step(tmp_path: Path, tiny_model_dir: Path,
                                                                         data_dir: Path) -> None:
    """DeepSpeed skips a step whose gradients are not finite and carries on; a run that did nothing but
    skip would export its start weights as a success."""
    out = tmp_path / "run"
    proc = bulwark_cli(["finetune", *tiny(tiny_model_dir, out, "train.lr=1e6", "train.max_grad_norm=0",
                                          "train.steps=3")], data_dir)
    assert_clean_failure(proc, 3, "the gradients are not finite")
    assert not (out / "model").exists() and (out / "FAILED").is_file()


def test_resume_refuses_changed_settings_but_takes_more_steps(tmp_path: Path, tiny_model_dir: Path,
                                                               data_dir: Path) -> None:
    out = tmp_path / "run"
    first = bulwark_cli(["finetune", *tiny(tiny_model_dir, out, "train.checkpoint_every=1"), "--stop-after", "1"],
                        data_dir)
    assert first.returncode == 0, first.stderr[-3000:]
    before = snapshot(out)
    changed = bulwark_cli(["finetune", *tiny(tiny_model_dir, out, "train.checkpoint_every=1", "train.lr=1e-3"),
                           "--resume"], data_dir)
    assert_clean_failure(changed, 2, "train.lr")
    assert snapshot(out) == before
    more = bulwark_cli(["finetune", *tiny(tiny_model_dir, out, "train.checkpoint_every=1", "train.steps=3"),
                        "--resume"], data_dir)
    assert more.returncode == 0, more.stderr[-3000:]
    assert len((out / "metrics.jsonl").read_text().splitlines()) == 3
