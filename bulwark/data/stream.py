"""An endless, deterministic, resumable batch stream for one rank of a data-parallel group.

Each epoch is a fresh permutation of all rows (torch.Generator seeded from (seed, epoch)). The
permutation is cut into GLOBAL micro-batches of micro_batch_size * world_size consecutive indices and
rank r takes slice [r*mbs, (r+1)*mbs) of each. So the ranks of one step together see exactly the
rows a single rank with a world_size-times larger micro-batch would see: the data a step trains on
does not depend on how many GPUs run it.

The incomplete tail of each epoch is dropped, so every rank always gets a full batch and all ranks
make the same number of steps (a rank that ran short would hang the others in the next collective).
"""

from __future__ import annotations

import torch

from bulwark.data.collate import pad_collate
from bulwark.errors import BulwarkInputError


class DistributedStream:
    def __init__(self, features: list[dict], micro_batch_size: int, rank: int, world_size: int, seed: int,
                 pad_id: int, name: str = ""):
        label = f"data stream '{name}'" if name else "data stream"
        if micro_batch_size < 1 or world_size < 1 or not 0 <= rank < world_size:
            raise BulwarkInputError(
                f"{label}: micro_batch_size = {micro_batch_size}, rank = {rank}, world_size = {world_size} "
                "need micro_batch_size >= 1 and 0 <= rank < world_size"
            )
        self.global_batch = micro_batch_size * world_size
        if len(features) < self.global_batch:
            raise BulwarkInputError(
                f"{label} has {len(features)} rows, fewer than one global micro-batch of {self.global_batch} "
                f"(micro_batch_size {micro_batch_size} x world size {world_size}); "
                "give more rows or lower the micro-batch size"
            )
        self.features = features
        self.micro_batch_size = micro_batch_size
        self.rank = rank
        self.world_size = world_size
        self.seed = seed
        self.pad_id = pad_id
        self.name = name
        self.steps_per_epoch = len(features) // self.global_batch
        self.epoch = 0
        self.position = 0  # index of the next global micro-batch within the epoch
        self._perm_epoch: int | None = None
        self._perm: torch.Tensor | None = None

    def _permutation(self, epoch: int) -> torch.Tensor:
        if self._perm_epoch != epoch:
            g = torch.Generator()
            # distinct (seed, epoch) pairs map to distinct seeds for any realistic seed/epoch
            g.manual_seed((self.seed * 1_000_003 + epoch) % (2**63))
            self._perm = torch.randperm(len(self.features), generator=g)
            self._perm_epoch = epoch
        return self._perm

    def global_indices_for(self, step: int) -> list[int]:
        """Row indices of the whole global micro-batch number `step` (counted from the stream's start)."""
        epoch, position = divmod(step, self.steps_per_epoch)
        start = position * self.global_batch
        return self._permutation(epoch)[start:start + self.global_batch].tolist()

    def local_indices_for(self, step: int) -> list[int]:
        """This rank's share of global micro-batch `step`."""
        lo = self.rank * self.micro_batch_size
        return self.global_indices_for(step)[lo:lo + self.micro_batch_size]

    def next_batch(self) -> dict[str, torch.Tensor]:
        """The next collated micro-batch for this rank (input_ids, attention_mask, labels)."""
        step = self.epoch * self.steps_per_epoch + self.position
        batch = pad_collate([self.features[i] for i in self.local_indices_for(step)], self.pad_id)
        self.position += 1
        if self.position == self.steps_per_epoch:
            self.epoch, self.position = self.epoch + 1, 0
        return batch

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "position": self.position}

    def load_state_dict(self, state: dict) -> None:
        try:
            epoch, position = int(state["epoch"]), int(state["position"])
        except (KeyError, TypeError, ValueError):
            raise BulwarkInputError(
                f"stream state {state!r} for '{self.name}' needs integer keys 'epoch' and 'position'; "
                "the checkpoint is damaged or from another version"
            ) from None
        if epoch < 0 or not 0 <= position < self.steps_per_epoch:
            raise BulwarkInputError(
                f"stream state epoch={epoch}, position={position} for '{self.name}' does not fit "
                f"{self.steps_per_epoch} steps per epoch; resume with the same data and batch size"
            )
        self.epoch, self.position = epoch, position
