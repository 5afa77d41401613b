"""Process-group start-up: the only place that decides backend and rank for a training process."""

from __future__ import annotations

import atexit
import logging
import os
import socket
import sys

import torch


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def under_launcher() -> bool:
    """True inside torchrun (or srun exporting the torch variables) rather than a bare python."""
    return "LOCAL_RANK" in os.environ and "WORLD_SIZE" in os.environ


def _fill_single_process_env() -> None:
    # A bare `python` process: DeepSpeed otherwise goes looking for mpi4py to discover its rank.
    os.environ.setdefault("RANK", "0")
    os.environ.setdefault("LOCAL_RANK", "0")
    os.environ.setdefault("WORLD_SIZE", "1")
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", str(free_port()))


def init_distributed() -> tuple[int, int, int]:
    """Start the process group once; returns (rank, world_size, local_rank)."""
    import deepspeed

    if not under_launcher():
        _fill_single_process_env()
    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    if not torch.cuda.is_available():
        # DeepSpeed's CPU shared-memory all-reduce serves only inference_all_reduce, never training;
        # skipping it saves a one-time C++ build and shared-memory segments named after MASTER_PORT.
        deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if torch.cuda.is_available():
        # before the group exists: NCCL binds its communicator (and barrier()) to the current device
        torch.cuda.set_device(local_rank)
    if not torch.distributed.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        deepspeed.init_distributed(dist_backend=backend, auto_mpi_discovery=False)
        atexit.register(shutdown)
    return torch.distributed.get_rank(), torch.distributed.get_world_size(), local_rank


def shutdown() -> None:
    """Tear the process groups down before the interpreter does (registered at exit). It frees only the
    groups nobody else holds; a finished run also needs `exit_after_success` for the ones DeepSpeed keeps."""
    if torch.distributed.is_initialized():
        try:
            torch.distributed.destroy_process_group()
        except Exception:  # noqa: BLE001  (at exit there is nobody left to report to)
            pass


def exit_after_success() -> None:
    """End a rank process whose work is done and written: tear the process groups down, flush, and
    leave with exit code 0 at once (os._exit), skipping the interpreter's finalization.

    Why: destroy_process_group frees only the groups nobody else holds; DeepSpeed keeps its own, and
    their gloo worker threads live on. A worker that drops the last reference to a collective's
    tensor once finalization has begun must take the GIL; CPython ends such a thread with
    pthread_exit, whose unwinding through a noexcept destructor aborts the whole process
    ("terminate called without an active exception", exit -6) after a run that finished. It failed one
    of three CI runs and two local runs of the suite (~60 multi-rank runs each); the core's backtrace reads
    ~AsyncAllgatherWork -> decref_pyobject -> take_gil -> PyThread_exit_thread -> std::terminate.
    `bench/teardown_abort.py` measures it. A process that never started a process group returns.
    A failing run leaves the normal way, so its exit code and traceback are kept."""
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return
    shutdown()
    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):  # a closed or broken pipe: nothing left to save
            pass
    os._exit(0)


def barrier() -> None:
    if torch.distributed.is_initialized():
        torch.distributed.barrier()


# ---- collectives ------------------------------------------------------------------------------------
#
# The rule: every tensor that enters a collective lives on `collective_device()` (NCCL has no CPU
# backend, so a CPU tensor in a collective fails at 2+ GPUs with "no backend for device type cpu").
# These helpers take a tensor on any device, stage it on the collective device when it lives
# elsewhere, and hand the result back on the caller's device, so callers may keep small counters on
# the CPU. Nothing outside this file calls torch.distributed's tensor collectives. The helpers run
# the collective at world size 1 too (a no-op in cost), so a one-GPU NCCL run exercises the same path
# a 512-GPU one does and a CPU tensor that slipped past a helper fails there, not on the cluster.


def collective_device() -> torch.device:
    """Where the process group's tensors must live: this rank's GPU under NCCL, else the CPU."""
    if torch.distributed.is_initialized() and torch.distributed.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _staged(tensor: torch.Tensor) -> torch.Tensor:
    target = collective_device()
    return tensor if tensor.device == target else tensor.to(target)


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """Sum `tensor` over all ranks, in place; returns it (on its own device)."""
    if not torch.distributed.is_initialized():
        return tensor
    staged = _staged(tensor)
    torch.distributed.all_reduce(staged, op=torch.distributed.ReduceOp.SUM)
    if staged is not tensor:
        tensor.copy_(staged)
    return tensor


def reduce_sum_to(tensor: torch.Tensor, dst: int) -> torch.Tensor:
    """Sum `tensor` over all ranks into rank `dst`'s copy (in place); other ranks' copies are undefined."""
    if not torch.distributed.is_initialized():
        return tensor
    staged = _staged(tensor)
    torch.distributed.reduce(staged, dst=dst, op=torch.distributed.ReduceOp.SUM)
    if staged is not tensor:
        tensor.copy_(staged)
    return tensor


def all_gather_cat(tensor: torch.Tensor) -> torch.Tensor:
    """Every rank's `tensor` (same shape on each rank) concatenated along dim 0, rank order, on the
    caller's device."""
    if not torch.distributed.is_initialized():
        return tensor
    staged = _staged(tensor.contiguous())
    parts = [torch.empty_like(staged) for _ in range(torch.distributed.get_world_size())]
    torch.distributed.all_gather(parts, staged)
    return torch.cat(parts).to(tensor.device)


def all_gather_objects(obj: object) -> list[object]:
    """Every rank's picklable `obj`, in rank order (torch pickles through `collective_device()` itself)."""
    if not torch.distributed.is_initialized() or torch.distributed.get_world_size() == 1:
        return [obj]
    parts: list[object] = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(parts, obj)
    return parts


def broadcast_object(obj: object, src: int = 0) -> object:
    if not torch.distributed.is_initialized() or torch.distributed.get_world_size() == 1:
        return obj
    box = [obj]
    torch.distributed.broadcast_object_list(box, src=src)
    return box[0]


def device() -> torch.device:
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return torch.device("cpu")
