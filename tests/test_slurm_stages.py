"""Every stage's rendered sbatch script, executed under a fake SLURM on this CPU at 2 ranks, judged by the
stage's outputs; a job killed twice and requeued ends with the weights of an uninterrupted run; a stage
started inside an allocation's shell (SLURM_PROCID set, no torchrun) still starts its launch.nproc ranks.

The fake SLURM: `scontrol show hostnames` answers 127.0.0.1, `srun` drops its options and runs the rest,
`torchrun` and `bulwark` run this interpreter's modules. Everything else is the real script: the
rendezvous, the requeue trap, --resume-if-present, the stage's rank entry.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import torch
import yaml

from bulwark.engine.dist import free_port
from tests.conftest import REPO, RUN_TIMEOUT_S, bulwark_cli, check, subprocess_env
from tests.test_engine_zero3 import load_exported

FAKE_BIN = {
    "scontrol": """\
        #!/bin/bash
        echo "scontrol $*" >> "$FAKE_LOG"
        if [ "$1" = show ] && [ "$2" = hostnames ]; then echo 127.0.0.1; fi
        """,
    "srun": """\
        #!/bin/bash
        echo "srun $*" >> "$FAKE_LOG"
        while [ $# -gt 0 ] && [[ "$1" == --* ]]; do shift; done
        exec "$@"
        """,
    "torchrun": f"""\
        #!/bin/bash
        exec {sys.executable} -m torch.distributed.run "$@"
        """,
    "bulwark": f"""\
        #!/bin/bash
        exec {sys.executable} -m cli.main "$@"
        """,
}


def fake_slurm_env(tmp_path: Path, data_dir: Path, restart: int = 0) -> dict[str, str]:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    for name, body in FAKE_BIN.items():
        (bin_dir / name).write_text(textwrap.dedent(body))
        (bin_dir / name).chmod(0o755)
    env = subprocess_env(data_dir)
    env.pop("LOCAL_RANK", None)
    return {**env, "PATH": f"{bin_dir}:{env['PATH']}", "FAKE_LOG": str(tmp_path / "calls.log"),
            "SLURM_JOB_ID": "77", "SLURM_JOB_NODELIST": "node-a", "SLURM_NNODES": "1", "SLURM_PROCID": "0",
            "SLURM_SUBMIT_DIR": str(REPO), "SLURM_RESTART_COUNT": str(restart), "MASTER_PORT": str(free_port()),
            "PYTHONPATH": str(REPO)}


def render(tmp_path: Path, config: Path, stage: str, overrides: list[str], name: str) -> Path:
    script = tmp_path / f"{name}.sbatch"
    check(bulwark_cli(["slurm", str(config), *overrides, "--stage", stage, "--out", str(script),
                       "--gpus-per-node", "2", "--time", "10:00"]))
    return script


def run_job(script: Path, env: dict[str, str], timeout: int = RUN_TIMEOUT_S) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(script)], env=env, capture_output=True, text=True, timeout=timeout, cwd=REPO)


def write_yaml(path: Path, values: dict) -> Path:
    path.write_text(yaml.safe_dump(values))
    return path


def train_config(tmp_path: Path, model: Path, out: Path, **train: int) -> Path:
    return write_yaml(tmp_path / f"{out.name}.yaml", {
        "out_dir": str(out), "model": {"name": str(model)}, "launch": {"nproc": 2},
        "data": {"n": 16, "p": 0.25, "max_length": 32, "align_n": 16, "template": "alpaca"},
        "train": {"steps": 2, "micro_batch_size": 2, "lr": 1e-3, **train},
    })


def test_every_stage_runs_from_its_sbatch_script(tmp_path: Path, tiny_model_dir: Path, data_dir: Path) -> None:
    env = fake_slurm_env(tmp_path, data_dir)
    runs = tmp_path / "runs"

    align = train_config(tmp_path, tiny_model_dir, runs / "align")
    check(run_job(render(tmp_path, align, "align", [], "align"), env))
    assert (runs / "align" / "DONE").is_file() and (runs / "align" / "model" / "config.json").is_file()

    finetune = train_config(tmp_path, runs / "align" / "model", runs / "lisa")
    check(run_job(render(tmp_path, finetune, "finetune", ["defense.name=lisa"], "finetune"), env))
    assert json.loads((runs / "lisa" / "train_summary.json").read_text())["world_size"] == 2

    recover = write_yaml(tmp_path / "recover.yaml", {
        "aligned": str(runs / "align" / "model"), "finetuned": str(runs / "lisa" / "model"),
        "out_dir": str(runs / "recover"), "launch": {"nproc": 2},
        "data": {"harmful_n": 7, "task_n": 4, "max_length": 48}, "task": {"metric": "loss", "n": 4},
        "restore": {"micro_batch_size": 3, "steps": 2, "warmup_steps": 1, "checkpoint_every": 1, "fraction": 0.005},
    })
    check(run_job(render(tmp_path, recover, "recover", [], "recover"), env))
    assert json.loads((runs / "recover" / "summary.json").read_text())["world_size"] == 2

    evaluation = write_yaml(tmp_path / "eval.yaml", {
        "model": str(runs / "recover" / "model"), "out_dir": str(runs / "eval"), "nproc": 2, "judge": "keyword",
        "n_prompts": 4, "n_benign": 2, "max_new_tokens": 4, "template": "alpaca",
    })
    check(run_job(render(tmp_path, evaluation, "eval", [], "eval"), env))
    harmful = [json.loads(r) for r in (runs / "eval" / "harmful.jsonl").read_text().splitlines()]
    assert len(harmful) == 4 and (runs / "eval" / "summary.json").is_file()

    bench = write_yaml(tmp_path / "bench.yaml", {"out_dir": str(runs / "bench"), "model": str(tiny_model_dir),
                                                 "data_dir": str(data_dir), "eval_base": False})
    cell = ["ps=0.25", "finetune_defenses=sft", "align.train.steps=1", "align.data.align_n=8",
            "align.data.max_length=32", "align.train.micro_batch_size=2", "align.launch.nproc=2",
            "finetune.train.steps=1", "finetune.data.n=8", "finetune.data.max_length=32",
            "finetune.train.micro_batch_size=2", "finetune.launch.nproc=2", "eval.judge=keyword",
            "eval.n_prompts=2", "eval.n_benign=2", "eval.task=null", "eval.max_new_tokens=4", "eval.template=alpaca"]
    script = render(tmp_path, bench, "bench", cell, "bench")
    assert "#SBATCH --nodes=1" in script.read_text()
    check(run_job(script, env, timeout=2 * RUN_TIMEOUT_S))
    assert (runs / "bench" / "results.csv").is_file()
    assert json.loads((runs / "bench" / "align_sft" / "train_summary.json").read_text())["world_size"] == 2


def kill_when(proc: subprocess.Popen, ready: callable, timeout: float = RUN_TIMEOUT_S) -> None:
    """SIGKILL the job's whole process group (batch script, srun, torchrun, ranks) once `ready()`."""
    deadline = time.monotonic() + timeout
    while not ready():
        assert proc.poll() is None, "the job ended before it could be killed"
        assert time.monotonic() < deadline, "timed out waiting to kill the job"
        time.sleep(0.02)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=60)


def test_killed_twice_and_requeued_equals_an_uninterrupted_run(tmp_path: Path, tiny_model_dir: Path,
                                                                data_dir: Path) -> None:
    steps = ["train.steps=10", "train.checkpoint_every=2", "defense.name=lisa", "defense.align_steps=2",
             "defense.finetune_steps=2", "defense.proximal_warmup=0"]
    plain = train_config(tmp_path, tiny_model_dir, tmp_path / "plain")
    check(bulwark_cli(["finetune", str(plain), *steps]))

    out = tmp_path / "job"
    script = render(tmp_path, train_config(tmp_path, tiny_model_dir, out), "finetune", steps, "job")
    latest = out / "checkpoints" / "latest"

    def start(restart: int) -> subprocess.Popen:
        return subprocess.Popen(["bash", str(script)], env=fake_slurm_env(tmp_path, data_dir, restart), cwd=REPO,
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)

    # killed before its first checkpoint: the run folder exists, no checkpoint yet
    kill_when(start(0), lambda: (out / "config.yaml").is_file() and not latest.exists())
    assert not latest.exists()
    # requeued: starts over from step 0; killed again after its second checkpoint
    kill_when(start(1), lambda: latest.is_file() and latest.read_text().strip() >= "step_000004")
    assert not (out / "DONE").exists(), "the second attempt finished before it could be killed"
    resumed_from = int(latest.read_text().strip().split("_")[1])
    # requeued again: resumes from that checkpoint and finishes
    job = start(2)
    assert job.wait(timeout=RUN_TIMEOUT_S) == 0
    assert (out / "DONE").is_file() and resumed_from >= 4
    losses = [json.loads(line)["loss"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    want = [json.loads(line)["loss"] for line in (tmp_path / "plain" / "metrics.jsonl").read_text().splitlines()]
    assert losses == want
    a, b = load_exported(tmp_path / "plain" / "model"), load_exported(out / "model")
    for name in a:
        torch.testing.assert_close(a[name], b[name], atol=0, rtol=0, msg=name)
    # a fourth start of the finished job does nothing
    assert start(3).wait(timeout=RUN_TIMEOUT_S) == 0


def test_a_stage_in_an_allocation_shell_starts_its_ranks(tmp_path: Path, tiny_model_dir: Path, data_dir: Path) -> None:
    """`salloc` / `srun --pty` shells carry SLURM_PROCID; bulwark finetune there must still start
    launch.nproc ranks and return to the shell with the run done."""
    config = train_config(tmp_path, tiny_model_dir, tmp_path / "alloc")
    env = {**subprocess_env(data_dir), "SLURM_PROCID": "0", "SLURM_JOB_ID": "5", "SLURM_NTASKS": "1"}
    proc = subprocess.run([sys.executable, "-m", "cli.main", "finetune", str(config)], env=env, cwd=REPO,
                          capture_output=True, text=True, timeout=RUN_TIMEOUT_S)
    check(proc)
    assert json.loads((tmp_path / "alloc" / "train_summary.json").read_text())["world_size"] == 2
