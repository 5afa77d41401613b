"""Where eval models run and in which dtype: one rule for the generating model and the `hf:` judges.

`auto` is bf16 on a GPU (half the memory of fp32, and the dtype the models were trained in) and fp32
on the CPU (bf16 matmuls on a CPU are slow on most cores and round greedy decoding differently from
the fp32 runs every CPU figure in docs/ was measured with). No DeepSpeed import here.
"""

from __future__ import annotations

import os

import torch

from bulwark.errors import BulwarkInputError

EVAL_DTYPES = ("auto", "fp32", "bf16")
PARTITIONS = ("none", "zero3")


def resolve_dtype(dtype: str | None) -> str:
    """"auto" (or None) -> "bf16" with CUDA, else "fp32"; "fp32" / "bf16" as given; else a one-line error."""
    value = "auto" if dtype is None else str(dtype).strip().lower()
    if value not in EVAL_DTYPES:
        raise BulwarkInputError(f"eval dtype (--dtype / dtype:) {dtype!r}: choose one of {', '.join(EVAL_DTYPES)}")
    if value == "auto":
        return "bf16" if torch.cuda.is_available() else "fp32"
    return value


def check_partition(partition: str | None) -> str:
    """"none" (or None) / "zero3"; else a one-line error naming the key."""
    value = "none" if partition is None else str(partition).strip().lower()
    if value not in PARTITIONS:
        raise BulwarkInputError(
            f"eval partition (--partition / partition:) {partition!r}: choose one of {', '.join(PARTITIONS)}"
        )
    return value


def torch_dtype(dtype: str) -> torch.dtype:
    """torch dtype of a resolved eval dtype."""
    return torch.bfloat16 if resolve_dtype(dtype) == "bf16" else torch.float32


def local_device() -> torch.device:
    """This rank's device: cuda:LOCAL_RANK when CUDA is available, else the CPU."""
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return torch.device("cpu")
