"""Run under torchrun: bulwark.engine.dist's collective helpers at N ranks; rank 0 writes what it saw."""

import json
import sys

import torch

from bulwark.engine import dist


def main() -> None:
    rank, world, _ = dist.init_distributed()
    counts = torch.tensor([float(rank + 1), 2.0], dtype=torch.float64)
    summed = dist.all_reduce_sum(counts)
    flags = dist.all_reduce_sum(torch.tensor([rank], dtype=torch.long))
    owned = dist.reduce_sum_to(torch.full((3,), float(rank + 1)), dst=world - 1)
    gathered = dist.all_gather_cat(torch.arange(2, dtype=torch.float32) + 10 * rank)
    objects = dist.all_gather_objects({"rank": rank, "names": ["w"] * rank})
    broadcast = dist.broadcast_object(f"from {rank}", src=world - 1)
    seen = {
        "in_place": summed is counts, "summed": counts.tolist(), "dtype": str(counts.dtype),
        "flags": flags.tolist(), "flags_dtype": str(flags.dtype), "gathered": gathered.tolist(),
        "objects": objects, "broadcast": broadcast, "device": str(gathered.device),
        "collective_device": str(dist.collective_device()),
        "owned": owned.tolist() if rank == world - 1 else None,
    }
    parts = dist.all_gather_objects(seen)
    if rank == 0:
        with open(sys.argv[1], "w") as f:
            json.dump(parts, f)
    dist.exit_after_success()


if __name__ == "__main__":
    main()
