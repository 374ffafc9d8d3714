"""Deterministic data order: which examples each process uses in each micro-batch of each step.

Every process computes the same permutation per epoch from ``(seed, epoch)`` alone, so the order needs no
state beyond the position ``(epoch, batch_index)``, which is what a checkpoint stores. A global batch of
``micro_batch_size × grad_accum × world_size`` examples is cut into ``grad_accum × world_size``
consecutive slices; micro-batch ``a`` of rank ``r`` is slice ``a × world_size + r``. The union over ranks
and micro-batches is the global batch whatever the split, so a run on 2 processes with batch 2 and one on
1 process with batch 4 see the same examples in each step. An incomplete last global batch of an epoch is
dropped, as a DistributedSampler with ``drop_last`` does.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class BatchPlan:
    num_examples: int
    micro_batch_size: int
    grad_accum: int = 1
    world_size: int = 1
    rank: int = 0
    seed: int = 0
    shuffle: bool = True

    def __post_init__(self) -> None:
        if self.steps_per_epoch == 0:
            raise ValueError(
                f"{self.num_examples} training examples cannot fill one global batch of "
                f"{self.global_batch_size} "
                f"(batch_size {self.micro_batch_size} × grad_accum {self.grad_accum} × {self.world_size} "
                "processes); lower batch_size or grad_accum, or add data"
            )

    @property
    def global_batch_size(self) -> int:
        return self.micro_batch_size * self.grad_accum * self.world_size

    @property
    def steps_per_epoch(self) -> int:
        return self.num_examples // self.global_batch_size

    def epoch_order(self, epoch: int) -> torch.Tensor:
        """The example indices of ``epoch`` in the order they are used: (num_examples,) int64."""
        if not self.shuffle:
            return torch.arange(self.num_examples)
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        return torch.randperm(self.num_examples, generator=generator)

    def micro_batches(self, epoch: int, batch_index: int) -> list[list[int]]:
        """This rank's ``grad_accum`` micro-batches (lists of example indices) of step ``batch_index``."""
        if not 0 <= batch_index < self.steps_per_epoch:
            raise IndexError(f"batch_index {batch_index} outside [0, {self.steps_per_epoch})")
        order = self.epoch_order(epoch)
        start = batch_index * self.global_batch_size
        size = self.micro_batch_size
        batches = []
        for accum in range(self.grad_accum):
            offset = start + (accum * self.world_size + self.rank) * size
            batches.append(order[offset : offset + size].tolist())
        return batches


def shard_indices(num_examples: int, world_size: int, rank: int) -> list[int]:
    """Evaluation shard of ``rank``: every ``world_size``-th example, no padding, no repeats."""
    return list(range(rank, num_examples, world_size))
