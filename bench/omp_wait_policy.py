"""Time of CPU training and eval jobs alone and beside a second one, per OpenMP wait setting.

    python bench/omp_wait_policy.py --workload train --jobs 1,2 \
        --settings launcher,GOMP_SPINCOUNT=300000,OMP_WAIT_POLICY=passive,GOMP_SPINCOUNT=10000
    python bench/omp_wait_policy.py --workload eval --jobs 1,2 --settings launcher,GOMP_SPINCOUNT=300000

A "train" job is what `bulwark align` runs at one rank on a CPU machine: a torchrun rank with the
launcher's environment (bulwark.launch.with_cpu_rank_env: every core to the one rank, the malloc settings),
training SFT on the embedded SmolLM2 through the real engine on synthetic batches (bench/step_time.py);
its figure is its median step. An "eval" job is `bulwark eval` of the embedded SmolLM2 (48 harmful,
16 benign, 64 SST-2 prompts, greedy generation); its figure is its wall time. With `--jobs 2` two jobs
start together and share the cores, as a table run does beside a test suite.

A setting is "launcher" (the environment minus any OpenMP wait variable, so the launcher's own choice,
bulwark.launch.CPU_SPIN_ROUNDS, applies) or one VAR=VALUE every job gets, which the launcher leaves alone.
GOMP_SPINCOUNT=300000 is libgomp's default when neither variable is set. Settings run one after another.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bulwark.engine.dist import free_port
from bulwark.launch import OPENMP_WAIT_VARIABLES, with_cpu_rank_env

STEP_TIME = str(Path(__file__).with_name("step_time.py"))
WAIT_VARIABLES = (*OPENMP_WAIT_VARIABLES, "KMP_BLOCKTIME")  # and Intel OpenMP's, should a job load it


def job_env(setting: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in WAIT_VARIABLES}
    if setting != "launcher":
        name, _, value = setting.partition("=")
        if name not in WAIT_VARIABLES or not value:
            raise SystemExit(f"setting '{setting}': give 'launcher' or one of {', '.join(WAIT_VARIABLES)}=VALUE")
        env[name] = value
    return env


def train_command(args: argparse.Namespace, out: Path) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "1", "--master_port", str(free_port()),
            STEP_TIME, "--model", "embedded", "--defenses", "sft", "--ds-config", "zero2", "--mbs", str(args.mbs),
            "--seq", str(args.seq), "--steps", str(args.steps), "--rounds", "1", "--out", str(out)]


def eval_command(model_dir: str, out: Path) -> list[str]:
    return [sys.executable, "-m", "cli.main", "eval", model_dir, "-o", str(out), "--n-prompts", "48", "--n-benign", "16",
            "--task", "sst2", "--n-task", "64"]


def run_jobs(args: argparse.Namespace, setting: str, jobs: int, tmp: Path) -> list[float]:
    """Start `jobs` jobs at once under `setting`; each one's figure (s/step, or s for an eval)."""
    outs = [tmp / f"{args.workload}-{setting}-{jobs}-{i}" for i in range(jobs)]
    if args.workload == "train":
        env = with_cpu_rank_env(job_env(setting), nproc=1)
        commands = [train_command(args, out.with_suffix(".json")) for out in outs]
    else:  # bulwark eval gives its own ranks with_cpu_rank_env
        from bulwark import models

        env = job_env(setting)
        commands = [eval_command(str(models.embedded_model_dir()), out) for out in outs]
    started = time.perf_counter()
    children = [subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL) for cmd in commands]
    walls: dict[int, float] = {}
    while len(walls) < len(children):  # each job's own end, not the order they are waited on
        for i, child in enumerate(children):
            if i not in walls and child.poll() is not None:
                walls[i] = time.perf_counter() - started
        time.sleep(0.2)
    if any(child.returncode for child in children):
        raise SystemExit(f"a job failed at {setting}, {jobs} jobs: {' '.join(commands[0])}")
    if args.workload == "eval":
        return [walls[i] for i in range(jobs)]
    return [json.loads(out.with_suffix(".json").read_text())["rows"][0]["step_s"] for out in outs]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--workload", choices=("train", "eval"), default="train")
    parser.add_argument("--settings", default="launcher,GOMP_SPINCOUNT=300000")
    parser.add_argument("--jobs", default="1,2", help="how many jobs share the cores, one count after another")
    parser.add_argument("--mbs", type=int, default=4)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--steps", type=int, default=4, help="timed steps per train job (one untimed warm-up before)")
    args = parser.parse_args()

    unit = "s/step (median of its steps)" if args.workload == "train" else "wall s"
    print(f"{args.workload} on the embedded SmolLM2, {os.cpu_count()} cores, one rank per job with every core"
          + (f", zero2, micro batch {args.mbs} x {args.seq} tokens" if args.workload == "train" else ""))
    print(f"| setting | jobs at once | {unit}, per job | mean |")
    print("|---|---|---|---|")
    with tempfile.TemporaryDirectory() as tmp:
        for jobs in (int(j) for j in args.jobs.split(",")):
            for setting in args.settings.split(","):
                figures = run_jobs(args, setting, jobs, Path(tmp))
                print(f"| {setting} | {jobs} | {', '.join(f'{f:.2f}' for f in figures)} | "
                      f"{statistics.mean(figures):.2f} |", flush=True)


if __name__ == "__main__":
    main()
