"""Per-step batch iterators. The batch of step s on a rank is fixed by
``GlobalBatchOrder.rank_batch(s, rank, world_size)``, so a loader starting at any step resumes
exactly where an uninterrupted run would be."""

from __future__ import annotations

from typing import Dict, Iterator, List

import torch

from reglue.data.sampler import GlobalBatchOrder


def collate(items: List[tuple]) -> Dict[str, torch.Tensor]:
    """[(image uint8 (3,H,W), label, moments (8,h,w) or absent)] -> batch dict."""
    batch = {
        "image": torch.stack([it[0] for it in items]),
        "label": torch.tensor([int(it[1]) for it in items], dtype=torch.long),
    }
    if len(items[0]) > 2 and items[0][2] is not None:
        batch["moments"] = torch.stack([torch.as_tensor(it[2]) for it in items]).float()
    return batch


class StepBatches:
    """Batch sampler yielding ``order.rank_batch(s, rank, world_size)`` for s in [start, end),
    computed lazily (a 400k-step run must not hold 400k index lists)."""

    def __init__(self, order: GlobalBatchOrder, rank: int, world_size: int, start_step: int, end_step: int):
        self.order, self.rank, self.world_size = order, rank, world_size
        self.start_step, self.end_step = start_step, end_step

    def __len__(self) -> int:
        return max(0, self.end_step - self.start_step)

    def __iter__(self) -> Iterator[List[int]]:
        for step in range(self.start_step, self.end_step):
            yield self.order.rank_batch(step, self.rank, self.world_size)


class _Indexed(torch.utils.data.Dataset):
    """``dataset[i] -> (i, item)``: the loader's batches say which images they hold."""

    def __init__(self, dataset):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int):
        return index, self.dataset[index]


def collate_indexed(items: List[tuple]) -> Dict[str, torch.Tensor]:
    """[(index, item)] -> :func:`collate` of the items plus ``index`` int64 (B,), the dataset
    indices (what ``encoders.precompute_targets`` gathers by)."""
    return {**collate([item for _, item in items]), "index": torch.tensor([i for i, _ in items], dtype=torch.long)}


class TorchLoader:
    """DataLoader over a map-style dataset, batch sampler = the rank's share of each step's global
    batch; each batch also carries its dataset ``index``."""

    def __init__(self, dataset, order: GlobalBatchOrder, rank: int, world_size: int, start_step: int, end_step: int,
                 num_workers: int = 2):
        self.steps = StepBatches(order, rank, world_size, start_step, end_step)
        self.loader = torch.utils.data.DataLoader(
            _Indexed(dataset), batch_sampler=self.steps, num_workers=num_workers, collate_fn=collate_indexed,
            prefetch_factor=4 if num_workers else None, pin_memory=torch.cuda.is_available(),
        )

    def __len__(self) -> int:
        return len(self.steps)

    def __iter__(self) -> Iterator[Dict[str, torch.Tensor]]:
        return iter(self.loader)
