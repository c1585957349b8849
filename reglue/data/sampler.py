"""Resumable, rank-sharded batch order.

Each step consumes one global batch; epoch ``e`` visits a permutation seeded by (seed, e) and
drops the incomplete tail, so every rank runs the same number of steps and the position is just
the step counter: resuming at step s (at any world size) continues with the same samples.
"""

from __future__ import annotations

from typing import List

import torch


class GlobalBatchOrder:
    """Which dataset indices form global batch ``step``, and which slice a rank takes."""

    def __init__(self, num_samples: int, global_batch_size: int, seed: int = 0, shuffle: bool = True):
        if global_batch_size > num_samples:
            raise ValueError(f"global batch size {global_batch_size} exceeds the dataset size {num_samples}")
        self.num_samples = num_samples
        self.global_batch_size = global_batch_size
        self.seed = seed
        self.shuffle = shuffle
        self.steps_per_epoch = num_samples // global_batch_size
        self._cache = (None, None)

    def _permutation(self, epoch: int) -> torch.Tensor:
        if self._cache[0] != epoch:
            if self.shuffle:
                g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
                perm = torch.randperm(self.num_samples, generator=g)
            else:
                perm = torch.arange(self.num_samples)
            self._cache = (epoch, perm)
        return self._cache[1]

    def epoch_of(self, step: int) -> int:
        return step // self.steps_per_epoch

    def global_batch(self, step: int) -> List[int]:
        epoch, within = divmod(step, self.steps_per_epoch)
        start = within * self.global_batch_size
        return self._permutation(epoch)[start : start + self.global_batch_size].tolist()

    def rank_batch(self, step: int, rank: int, world_size: int) -> List[int]:
        """This rank's contiguous share of global batch ``step``."""
        if self.global_batch_size % world_size:
            raise ValueError(f"global batch size {self.global_batch_size} is not divisible by world size {world_size}")
        per_rank = self.global_batch_size // world_size
        return self.global_batch(step)[rank * per_rank : (rank + 1) * per_rank]
