"""Tamper evidence of checkpoints (a sha256 manifest checked before anything is unpickled, Bulwark's rank
state loaded with weights_only=True) and a resume after a torn metrics.jsonl line."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from bulwark.engine.manifest import MANIFEST, _check_plain, load_rank_state, verify_manifest, write_manifest
from bulwark.engine.progress import RunLogger, read_metrics
from bulwark.engine.snapshot import rng_state, set_rng_state
from bulwark.errors import BulwarkInputError
from tests.conftest import bulwark_cli, check
from tests.test_engine_zero3 import tiny_overrides


class _Payload:
    """Unpickling this creates `path`: what a crafted checkpoint file would do with a shell command."""

    def __init__(self, path: Path) -> None:
        self.path = str(path)

    def __reduce__(self) -> tuple:
        return (open, (self.path, "w"))


def _checkpoint(tmp_path: Path) -> Path:
    tag = tmp_path / "checkpoints" / "step_000001"
    (tag / "sub").mkdir(parents=True)
    torch.save({"w": torch.arange(8.0)}, tag / "mp_rank_00_model_states.pt")
    (tag / "sub" / "optim.bin").write_bytes(b"\x01" * 100)
    torch.save({"rng": rng_state(), "defense": {}}, tag / "bulwark_rank0.pt")
    write_manifest(tag)
    return tag


def test_manifest_lists_every_file_and_an_untouched_checkpoint_passes(tmp_path: Path) -> None:
    tag = _checkpoint(tmp_path)
    files = json.loads((tag / MANIFEST).read_text())["files"]
    assert [f["path"] for f in files] == ["bulwark_rank0.pt", "mp_rank_00_model_states.pt", "sub/optim.bin"]
    assert all(len(f["sha256"]) == 64 and f["bytes"] > 0 for f in files)
    assert not list(tag.glob("*.tmp"))
    verify_manifest(tag)


@pytest.mark.parametrize("change, named", [
    ("byte", "sub/optim.bin differs from its sha256"),
    ("truncate", "sub/optim.bin has 99 bytes"),
    ("extra", "extra.pt is not listed"),
    ("missing", "sub/optim.bin is listed in MANIFEST.json but missing"),
    ("no_manifest", "MANIFEST.json is missing"),
    ("bad_manifest", "MANIFEST.json is not a Bulwark manifest"),
    ("symlink", "link.pt is not a regular file"),
])
def test_every_change_after_the_save_is_refused_naming_the_file(tmp_path: Path, change: str, named: str) -> None:
    tag = _checkpoint(tmp_path)
    optim = tag / "sub" / "optim.bin"
    if change == "byte":
        optim.write_bytes(b"\x01" * 99 + b"\x02")
    elif change == "truncate":
        optim.write_bytes(b"\x01" * 99)
    elif change == "extra":
        (tag / "extra.pt").write_bytes(b"x")
    elif change == "missing":
        optim.unlink()
    elif change == "no_manifest":
        (tag / MANIFEST).unlink()
    elif change == "bad_manifest":
        (tag / MANIFEST).write_text('{"files": [{"path": 1}]')
    elif change == "symlink":
        (tag / "link.pt").symlink_to(optim)
    with pytest.raises(BulwarkInputError) as info:
        verify_manifest(tag)
    message = str(info.value)
    assert named in message and "\n" not in message
    assert "changed after it was written" in message and "--overwrite" in message and "latest" in message


def test_a_crafted_rank_state_runs_no_code_even_under_a_rewritten_manifest(tmp_path: Path) -> None:
    tag = _checkpoint(tmp_path)
    marker = tmp_path / "pwned"
    torch.save({"rng": _Payload(marker)}, tag / "bulwark_rank0.pt")
    write_manifest(tag)  # someone who can write the folder can rewrite the digest too
    verify_manifest(tag)
    with pytest.raises(BulwarkInputError, match="bulwark_rank0.pt: not a Bulwark rank state"):
        load_rank_state(tag / "bulwark_rank0.pt")
    assert not marker.exists()
    # the payload is live: the old weights_only=False load would have run it
    torch.load(tag / "bulwark_rank0.pt", weights_only=False)
    assert marker.exists()


def test_rank_state_round_trips_through_weights_only(tmp_path: Path) -> None:
    import random

    import numpy as np

    random.seed(1)
    np.random.seed(2)
    np.random.standard_normal()  # numpy keeps half a Gaussian pair in its state
    torch.manual_seed(3)
    state = {"rng": rng_state(), "defense": {"generator": torch.Generator().manual_seed(4).get_state(),
                                              "anchors": [torch.ones(3)], "state": "align", "norms": None}}
    torch.save(state, tmp_path / "r.pt")
    ahead = (random.random(), float(np.random.standard_normal()), torch.rand(1).item())
    random.seed(0)
    np.random.seed(0)
    torch.manual_seed(0)
    loaded = load_rank_state(tmp_path / "r.pt")
    set_rng_state(loaded["rng"])
    assert (random.random(), float(np.random.standard_normal()), torch.rand(1).item()) == ahead
    assert loaded["defense"]["state"] == "align" and torch.equal(loaded["defense"]["anchors"][0], torch.ones(3))


def test_a_value_weights_only_would_refuse_is_refused_at_save() -> None:
    import numpy as np

    with pytest.raises(TypeError, match=r"\['defense'\]\['scale'\] is a float64"):
        _check_plain({"defense": {"scale": np.float64(1.0)}}, "bulwark_rank0.pt")


def _rows(*steps: int) -> str:
    return "".join(json.dumps({"step": s, "loss": 1.0, "step_s": float(s)}) + "\n" for s in steps)


def test_metrics_torn_last_line_is_dropped_with_one_warning(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    metrics = tmp_path / "metrics.jsonl"
    metrics.write_text(_rows(1, 2, 3) + '{"step": 4, "lo')
    logger = RunLogger(metrics, 0, 5, start=2)
    warned = [line for line in capsys.readouterr().err.splitlines() if "torn last line" in line]
    assert len(warned) == 1 and "metrics.jsonl:4" in warned[0]
    assert [r["step"] for r in read_metrics(metrics)] == [1, 2]
    for step in (3, 4, 5):
        logger.log(step, {"loss": 1.0, "lr": 0.1, "step_s": 10.0})
    logger.close(0)
    assert [r["step"] for r in read_metrics(metrics)] == [1, 2, 3, 4, 5]
    summary = json.loads((tmp_path / "train_summary.json").read_text())
    assert summary["steps_run"] == 5 and summary["resumed_at_step"] == 2
    assert summary["mean_step_s"] == pytest.approx((2.0 + 30.0) / 4)  # step 1 (warm-up) left out
    assert summary["median_step_s"] == 10.0  # steps 2-5: 2, 10, 10, 10


def test_metrics_bad_line_before_the_last_is_an_error(tmp_path: Path) -> None:
    metrics = tmp_path / "metrics.jsonl"
    metrics.write_text(_rows(1) + "garbage\n" + _rows(2))
    with pytest.raises(BulwarkInputError, match=r"metrics.jsonl:2: not a metrics row"):
        RunLogger(metrics, 0, 5, start=2)


def _one_error_line(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.strip() and "[WARNING]" not in line]


def test_resume_refuses_a_tampered_checkpoint_and_takes_an_untouched_one(
    tmp_path: Path, tiny_model_dir: Path, data_dir: Path
) -> None:
    run = tmp_path / "run"
    args = ["finetune", *tiny_overrides(tiny_model_dir, run, **{"train.steps": 3, "train.checkpoint_every": 1})]
    check(bulwark_cli([*args, "--stop-after", "2"], data_dir))
    tag = run / "checkpoints" / "step_000002"
    assert (run / "checkpoints" / "latest").read_text() == tag.name and (tag / MANIFEST).is_file()
    assert (run / "checkpoints" / "step_000001" / MANIFEST).is_file()
    optim = sorted(tag.glob("*optim_states.pt"))[0]
    rank0 = tag / "bulwark_rank0.pt"
    marker = tmp_path / "pwned"
    pristine = {p: p.read_bytes() for p in (optim, rank0, tag / MANIFEST)}

    def flip_byte() -> None:
        data = bytearray(pristine[optim])
        data[len(data) // 2] ^= 0xFF
        optim.write_bytes(bytes(data))

    tampers = [
        (flip_byte, optim.name),
        (lambda: torch.save({"rng": _Payload(marker)}, rank0), rank0.name),
        (lambda: (tag / "extra.pt").write_bytes(b"x"), "extra.pt"),
        (lambda: (tag / MANIFEST).unlink(), MANIFEST),
    ]
    for tamper, named in tampers:
        tamper()
        proc = bulwark_cli([*args, "--resume"], data_dir)
        lines = _one_error_line(proc.stderr)
        assert proc.returncode == 2, proc.stderr[-3000:]
        assert "Traceback" not in proc.stderr and len(lines) == 1, proc.stderr[-3000:]
        assert lines[0].startswith("error: ") and named in lines[0] and "changed after it was written" in lines[0]
        assert not marker.exists()
        for path, data in pristine.items():
            path.write_bytes(data)
        (tag / "extra.pt").unlink(missing_ok=True)
        (run / "FAILED").unlink(missing_ok=True)

    # an untouched checkpoint resumes, past a metrics line torn by the crash
    metrics = run / "metrics.jsonl"
    before = read_metrics(metrics)
    with metrics.open("a") as f:
        f.write('{"step": 3, "loss": 0.5')
    proc = check(bulwark_cli([*args, "--resume"], data_dir))
    assert sum("torn last line" in line for line in proc.stderr.splitlines()) == 1, proc.stderr[-3000:]
    after = read_metrics(metrics)
    assert [r["step"] for r in after] == [1, 2, 3] and after[:2] == before
    assert len(metrics.read_text().splitlines()) == 3
    assert json.loads((run / "train_summary.json").read_text())["steps_run"] == 3
    assert (run / "DONE").is_file() and (run / "model").is_dir()
