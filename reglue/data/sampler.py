"""Resumable, rank-sharded batch order.

Each step consumes one global batch; epoch ``e`` visits a permutation seeded by (seed, e) and
drops the incomplete tail, so every rank runs the same number of steps and the position is just
the step counter: resuming at step s (at any world size) continues with the same samples.
"""

from __future__ import annotations

from typing import List, Optional

import torch

from reglue.runtime import per_rank_batch, seeded_generator


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
                g = seeded_generator(self.seed, epoch)
                perm = torch.randperm(self.num_samples, generator=g)
            else:
                perm = torch.arange(self.num_samples)
            self._cache = (epoch, perm)
        return self._cache[1]

    def global_batch(self, step: int) -> List[int]:
        epoch, within = divmod(step, self.steps_per_epoch)
        start = within * self.global_batch_size
        return self._permutation(epoch)[start : start + self.global_batch_size].tolist()

    def rank_batch(self, step: int, rank: int, world_size: int) -> List[int]:
        """This rank's contiguous share of global batch ``step``."""
        per_rank = per_rank_batch(self.global_batch_size, world_size)
        return self.global_batch(step)[rank * per_rank : (rank + 1) * per_rank]


def sample_indices(num_samples: int, max_images: Optional[int], seed: int) -> List[int]:
    """All indices, or a seeded random subset of ``max_images`` (sorted): a sorted ImageFolder's
    first N images would cover only the first classes."""
    if max_images is None or max_images >= num_samples:
        return list(range(num_samples))
    return sorted(torch.randperm(num_samples, generator=seeded_generator(seed))[:max_images].tolist())
