"""The one launcher: every stage starts here, from the CLI, from `bulwark bench`, and in SLURM jobs.

    launch(stage, config, overrides, ...)   check everything that needs no rank, then start the ranks
    start(stage, argv, nproc)               run the stage's rank entry: in this process when it already
                                            is a rank, else under torchrun with `nproc` ranks

A stage is a recipe module under `bulwark/recipes/` (STAGES) with two functions:

    prepare(config, overrides, *, resume, overwrite, resume_if_present, stop_after) -> (nproc, argv)
        every check that needs no rank (bad input costs one line and exit code 2 here, before N ranks
        print N tracebacks), and the argv its rank entry takes;
    main(argv)
        the rank entry, `python -m bulwark.recipes.<stage> argv` under torchrun or srun.

"Already a rank" means torchrun's variables (LOCAL_RANK and WORLD_SIZE) are set, or BULWARK_RANK=1, which
a script that starts ranks some other way sets. Never SLURM_PROCID alone: inside `salloc` or `srun --pty`
every shell has it, and a stage started there must still start its `launch.nproc` ranks. A rank entry
ends its process (`exit_after_success`), so nothing that must go on afterwards (bench, the demo) may call
one in its own process: they call `launch`, which spawns.
"""

from __future__ import annotations

import importlib
import os
import signal
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

from bulwark.errors import BulwarkInputError

STAGES: dict[str, str] = {
    "align": "bulwark.recipes.align",
    "finetune": "bulwark.recipes.finetune",
    "recover": "bulwark.recipes.recover",
    "eval": "bulwark.recipes.eval",
}
RANK_MARKER = "BULWARK_RANK"

# glibc hands every freed block over 128 KiB back to the kernel, so each ZeRO-3 gather of a layer
# page-faults fresh zeroed memory again (a third of a CPU step's time went to the kernel). Keeping
# freed memory in the heap measured 8.1 -> 6.6 s a step on SmolLM2 (1 rank, 4 x 128 tokens).
# 32 MiB is glibc's ceiling for the mmap threshold, so blocks above it (ZeRO-1/2 flattens all gradients
# into one new 540 MB buffer every step) were still mmapped and page-faulted afresh; MALLOC_MMAP_MAX_=0
# serves them from the heap too (glibc still mmaps when the heap cannot grow): ZeRO-2, 1 rank, 4 x 128
# tokens, 4.5-4.6 -> 3.6 s a step and half the kernel time, for ~0.5 GiB more resident memory.
CPU_MALLOC_ENV = {
    "MALLOC_MMAP_THRESHOLD_": str(32 * 2**20),
    "MALLOC_TRIM_THRESHOLD_": str(4 * 2**30),
    "MALLOC_TOP_PAD_": str(2**30),
    "MALLOC_MMAP_MAX_": "0",
}

# libgomp (torch's OpenMP on Linux) spins 300,000 rounds before a waiting thread sleeps. When another job
# shares the cores, those spins take the cores the other's threads need: two SmolLM2 training jobs on 2 cores
# ran about 21 s a step each against 2.6-3.1 alone, two evals 231-350 s each against 50-54. With 1,000 rounds:
# 5.2-5.8 s and 93-98 s, near no spin at all (OMP_WAIT_POLICY=passive), and nothing lost alone, where passive
# costs an eval 15-25% (bench/omp_wait_policy.py, docs/BENCHMARKS.md "OpenMP spin").
CPU_SPIN_ROUNDS = "1000"
OPENMP_WAIT_VARIABLES = ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")


def recipe(stage: str) -> Any:
    if stage not in STAGES:
        raise BulwarkInputError(f"unknown stage '{stage}' (one of {', '.join(STAGES)})")
    return importlib.import_module(STAGES[stage])


def is_rank_process(env: dict[str, str] | None = None) -> bool:
    env = os.environ if env is None else env
    return ("LOCAL_RANK" in env and "WORLD_SIZE" in env) or env.get(RANK_MARKER) == "1"


def launch(
    stage: str,
    config: str | None,
    overrides: list[str],
    resume: bool = False,
    overwrite: bool = False,
    stop_after: int = 0,
    resume_if_present: bool = False,
) -> int:
    """Returns the exit code: 0 done, 2 bad input, other = a rank failed."""
    nproc, argv = recipe(stage).prepare(config, list(overrides), resume=resume, overwrite=overwrite,
                                        resume_if_present=resume_if_present, stop_after=stop_after)
    port = next((int(o.split("=", 1)[1]) for o in overrides if o.startswith("launch.master_port=")), 0)
    return start(stage, argv, nproc, port)


def start(stage: str, argv: list[str], nproc: int, master_port: int = 0) -> int:
    """Run `stage`'s rank entry with `argv`: here when this process is a rank, else under torchrun."""
    module = recipe(stage)
    resolved = argv[0] if argv and Path(argv[0]).name.startswith(RESOLVED_PREFIX) else None
    try:
        if is_rank_process():
            module.main(argv)
            return 0
        return _spawn(argv, nproc, master_port, STAGES[stage])
    finally:
        if resolved is not None:
            Path(resolved).unlink(missing_ok=True)


def _spawn(argv: list[str], nproc: int, master_port: int, entry: str) -> int:
    from bulwark.engine.dist import free_port

    cmd = [
        sys.executable, "-m", "bulwark.launch",  # torchrun, minus its own traceback (quiet_torchrun)
        "--nproc_per_node", str(nproc), "--master_addr", "127.0.0.1", "--master_port", str(master_port or free_port()),
        "-m", entry, *argv,
    ]
    import tempfile

    from bulwark.errors import ERROR_FILE_ENV

    fd, error_file = tempfile.mkstemp(prefix="bulwark-error-")
    os.close(fd)
    child = subprocess.Popen(cmd, env={**rank_env(dict(os.environ), nproc), ERROR_FILE_ENV: error_file})
    # SIGTERM (kill, scancel, a supervisor) reaches this process only: without passing it on, the ranks would
    # run on, orphaned, and a restarted command would find their run half-written under its feet
    forwarding = threading.current_thread() is threading.main_thread()  # only there can a handler be set
    previous = _forward_sigterm(child) if forwarding else None
    try:
        while True:
            try:
                code = child.wait()
                break
            except KeyboardInterrupt:  # Ctrl-C reached the ranks too: let them say where to resume, then leave
                continue
        first = next((line for line in open(error_file).read().splitlines() if line.strip()), "")
        if code and first:
            print(first, file=sys.stderr, flush=True)
        return code
    finally:
        os.unlink(error_file)
        if forwarding:  # a handler set outside Python reads as None: the default is what it did
            signal.signal(signal.SIGTERM, signal.SIG_DFL if previous is None else previous)


def _forward_sigterm(child: subprocess.Popen) -> Any:
    """Pass SIGTERM on to `child` (torchrun, which stops its ranks; they say where to resume) and keep
    waiting for it; returns the handler it replaced."""
    def forward(signum: int, frame: Any) -> None:
        child.send_signal(signum)

    return signal.signal(signal.SIGTERM, forward)


def quiet_torchrun(argv: list[str]) -> int:
    """torchrun with `argv`, returning the first failed rank's exit code instead of raising: the ranks
    already printed their one-line error, torchrun's 40-line ChildFailedError report would bury it."""
    import logging

    # torchrun's elastic loggers take their level from LOGLEVEL when first made, below: errors only
    os.environ.setdefault("LOGLEVEL", "ERROR")
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import main as torchrun_main

    logging.getLogger("torch.distributed.elastic").setLevel(logging.CRITICAL)
    try:
        torchrun_main(argv)
    except ChildFailedError as exc:
        codes = [f.exitcode for f in exc.failures.values()]
        return next((c for c in codes if c > 0), 128 + abs(min(codes, default=1)))
    except (KeyboardInterrupt, SignalException):  # the ranks got the signal too and said where to resume
        return 130
    return 0


def rank_env(env: dict[str, str], nproc: int) -> dict[str, str]:
    """The environment torchrun's ranks get: on a GPU machine as it is (minus DS_ACCELERATOR=cpu), on a
    CPU machine with the thread and malloc settings below."""
    import torch

    if torch.cuda.is_available():
        env.pop("DS_ACCELERATOR", None)
        return env
    env.setdefault("DS_ACCELERATOR", "cpu")
    return with_cpu_rank_env(env, nproc)


def with_cpu_rank_env(env: dict[str, str], nproc: int) -> dict[str, str]:
    """`env` plus what CPU ranks under torchrun need, where the user has not set it: the cores shared
    among the ranks (torchrun pins every rank to one thread), freed memory kept in the heap, and a short
    OpenMP spin. A user's OMP_WAIT_POLICY alone keeps the spin unset: libgomp lets GOMP_SPINCOUNT override it."""
    cpu = {"OMP_NUM_THREADS": str(max(1, (os.cpu_count() or 1) // nproc)), **CPU_MALLOC_ENV}
    return {**cpu, **with_short_openmp_spin(env)}


def with_short_openmp_spin(env: dict[str, str]) -> dict[str, str]:
    """`env` with GOMP_SPINCOUNT=CPU_SPIN_ROUNDS unless the user chose a wait: a user's OMP_WAIT_POLICY
    alone keeps it unset, because libgomp lets GOMP_SPINCOUNT override OMP_WAIT_POLICY."""
    if any(name in env for name in OPENMP_WAIT_VARIABLES):
        return dict(env)
    return {**env, "GOMP_SPINCOUNT": CPU_SPIN_ROUNDS}


def spin_briefly_in_this_process() -> None:
    """The short OpenMP spin for work the `bulwark` process does itself (an eval at one rank, the bench's evals,
    judge training), on a machine without a GPU. libgomp reads its variables once, when torch loads it, so
    this runs before anything imports torch. A GPU machine keeps its environment, as its ranks do."""
    if gpu_device_present():
        return
    os.environ.update(with_short_openmp_spin(dict(os.environ)))


def gpu_device_present() -> bool:
    """An NVIDIA or AMD GPU's device file, checked without importing torch."""
    return any(Path(device).exists() for device in ("/dev/nvidiactl", "/dev/kfd"))


RESOLVED_PREFIX = "bulwark-resolved-"


def stage_argv(config: str | None, overrides: list[str], *, resume: bool = False, overwrite: bool = False,
               resume_if_present: bool = False, stop_after: int = 0, resolved: str | None = None) -> list[str]:
    """The argv every config-driven rank entry takes: [CONFIG] key=value ... [flags].

    With `resolved` (the config as the parent resolved it, YAML text with every default filled in) the
    ranks get that file instead of the user's file and overrides: nothing is parsed twice, and what the ranks
    run is exactly what the parent checked. The file lives in the temp folder; `start` removes it."""
    if resolved is not None:
        import tempfile

        fd, path = tempfile.mkstemp(prefix=RESOLVED_PREFIX, suffix=".yaml")
        with os.fdopen(fd, "w") as handle:
            handle.write(resolved)
        config, overrides = path, []
    argv = ([config] if config else []) + list(overrides)
    argv += ["--resume"] if resume else []
    argv += ["--overwrite"] if overwrite else []
    argv += ["--resume-if-present"] if resume_if_present else []
    argv += ["--stop-after", str(stop_after)] if stop_after else []
    return argv


if __name__ == "__main__":
    sys.exit(quiet_torchrun(sys.argv[1:]))
