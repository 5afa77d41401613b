"""How often a finished 2-rank gloo run aborts at interpreter exit, with and without `exit_after_success`.

    python bench/teardown_abort.py [--runs 20]

Each run is a torchrun of two ranks that keep a process group of their own (as DeepSpeed does),
all-gather 20 times, and end. `finalize` lets Python finalize the interpreter as usual; `exit` ends
with `bulwark.engine.dist.exit_after_success`. A run counts as aborted when its exit code is not 0
and a rank printed "terminate called without an active exception". Prints one row per mode.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path

RANK_SCRIPT = """
import sys, torch, torch.distributed as dist
dist.init_process_group("gloo")
held = dist.new_group([0, 1])
for _ in range(20):
    part = torch.randn(1000)
    whole = torch.empty(2000)
    dist.all_gather_into_tensor(whole, part, group=held, async_op=True).wait()
if sys.argv[1] == "exit":
    from bulwark.engine.dist import exit_after_success
    exit_after_success()
"""


def run_once(script: Path, mode: str) -> tuple[int, bool]:
    from bulwark.engine.dist import free_port

    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
           "--master_port", str(free_port()), str(script), mode]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    return proc.returncode, "terminate called without an active exception" in proc.stderr


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=20)
    parser.add_argument("--modes", default="finalize,exit")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        script = Path(tmp) / "rank.py"
        script.write_text(RANK_SCRIPT)
        print("| exit | runs | aborted | other failures | s/run |")
        print("|---|---|---|---|---|")
        for mode in args.modes.split(","):
            aborted = other = 0
            started = time.perf_counter()
            for _ in range(args.runs):
                code, abort = run_once(script, mode)
                aborted += int(code != 0 and abort)
                other += int(code != 0 and not abort)
            per_run = (time.perf_counter() - started) / args.runs
            print(f"| {mode} | {args.runs} | {aborted} | {other} | {per_run:.1f} |", flush=True)


if __name__ == "__main__":
    main()
