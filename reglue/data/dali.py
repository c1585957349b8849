"""DALI loader: the same batches as the torch loader, decoded by DALI (nvJPEG on the GPU).

Order: a DALI ``external_source`` in per-sample mode asks for sample ``idx_in_batch`` of
iteration ``iteration``; :class:`StepSource` answers with the encoded bytes, label and moments of
``order.rank_batch(start_step + iteration, rank, world_size)[idx_in_batch]``. So the reader is
sharded by global rank, shuffled by (seed, epoch), drops the incomplete tail (every rank runs the
same number of steps), and its position is the step counter: a resumed run builds the loader at
its checkpoint step and continues with exactly the samples an uninterrupted run would have seen.
This replaces DALI's own reader checkpointing, which would tie the position to one world size.

Decoding: ``fn.decoders.image`` with ``device="mixed"`` on a GPU (the hardware JPEG decoder where
present, CUDA otherwise; images come out on the training GPU) or ``device="cpu"`` with
``device_id=None`` on a CPU-only machine (libjpeg-turbo). Prepared shards are baseline 4:4:4 JPEG;
the published layout's PNGs are decoded on the CPU by DALI in either mode.

Workers: ``num_workers`` DALI CPU threads; with ``num_workers > 0`` the source also runs in as
many Python worker processes (parallel external source, started with ``spawn`` so it is safe
after CUDA initialisation), otherwise in the main thread (reading memory-mapped shards is cheap).
"""

from __future__ import annotations

import logging
from typing import Dict, Iterator, List, Optional

import numpy as np
import torch

from reglue.data.sampler import GlobalBatchOrder
from reglue.runtime import per_rank_batch

log = logging.getLogger("reglue.data")


def dali_available() -> bool:
    """Whether ``nvidia.dali`` imports here."""
    try:
        import nvidia.dali  # noqa: F401
        import nvidia.dali.plugin.pytorch  # noqa: F401
    except Exception:  # noqa: BLE001 - a broken install (missing CUDA libraries) counts as absent
        return False
    return True


class StepSource:
    """Per-sample DALI source: SampleInfo -> (encoded image uint8 (bytes,), label int64 (), [moments
    float32 (8, h, w)]) for position ``idx_in_batch`` of this rank's share of step
    ``start_step + iteration``. Stateless apart from a cache of the current step's indices, so
    it runs in any number of worker processes; raises StopIteration at ``end_step``."""

    def __init__(self, dataset, order: GlobalBatchOrder, rank: int, world_size: int, start_step: int, end_step: int):
        self.dataset = dataset
        self.order = order
        self.rank, self.world_size = rank, world_size
        self.start_step, self.end_step = start_step, end_step
        self.with_moments = bool(dataset.has_moments)
        self._cached = (None, None)

    def indices(self, step: int) -> List[int]:
        if self._cached[0] != step:
            self._cached = (step, self.order.rank_batch(step, self.rank, self.world_size))
        return self._cached[1]

    def __call__(self, info):
        step = self.start_step + info.iteration
        if step >= self.end_step:
            raise StopIteration
        index = self.indices(step)[info.idx_in_batch]
        out = (np.asarray(self.dataset.encoded(index)), np.array(self.dataset.label(index), dtype=np.int64))
        if self.with_moments:
            out += (np.asarray(self.dataset.moments(index), dtype=np.float32),)
        return out


def _build_pipeline(source: StepSource, batch_size: int, image_size: int, device_id: Optional[int], num_threads: int,
                    py_workers: int, prefetch: int, seed: int):
    from nvidia.dali import fn, pipeline_def, types

    gpu = device_id is not None
    num_outputs = 3 if source.with_moments else 2

    @pipeline_def(batch_size=batch_size, num_threads=num_threads, device_id=device_id, seed=seed,
                  prefetch_queue_depth=prefetch, py_num_workers=max(1, py_workers), py_start_method="spawn")
    def pipeline():
        outputs = fn.external_source(
            source=source, num_outputs=num_outputs, batch=False, parallel=py_workers > 0,
            dtype=[types.UINT8, types.INT64, types.FLOAT][:num_outputs], ndim=[1, 0, 3][:num_outputs],
        )
        images = fn.decoders.image(outputs[0], device="mixed" if gpu else "cpu", output_type=types.RGB,
                                   preallocate_width_hint=image_size, preallocate_height_hint=image_size)
        results = [fn.transpose(images, perm=[2, 0, 1]), outputs[1]]
        if source.with_moments:
            results.append(outputs[2].gpu() if gpu else outputs[2])
        return tuple(results)

    return pipeline()


class DALILoader:
    """This rank's batches for steps [start_step, end_step) through a DALI pipeline: dicts with
    ``image`` uint8 (B, 3, H, W) and ``moments`` float32 (B, 8, h, w) on ``device`` and ``label``
    int64 (B,) on the CPU. Each ``iter()`` builds a fresh pipeline over the whole step range."""

    def __init__(self, dataset, order: GlobalBatchOrder, rank: int, world_size: int, start_step: int, end_step: int,
                 device: Optional[torch.device] = None, num_workers: int = 2, prefetch: int = 2):
        if not hasattr(dataset, "encoded"):
            raise ValueError("the DALI loader reads encoded images: it needs a prepared dataset or the published layout "
                             "(data.path), not the synthetic demo set; use data.backend=torch")
        self.dataset, self.order = dataset, order
        self.rank, self.world_size = rank, world_size
        self.start_step, self.end_step = start_step, max(start_step, end_step)
        self.batch_size = per_rank_batch(order.global_batch_size, world_size)
        device = torch.device(device) if device is not None else torch.device("cpu")
        if device.type == "cuda":
            self.device_id = device.index if device.index is not None else torch.cuda.current_device()
        elif device.type == "cpu":
            self.device_id = None
        else:
            raise ValueError(f"the DALI loader runs on a CUDA device or the CPU, not {device}")
        self.num_workers, self.prefetch = num_workers, prefetch

    def __len__(self) -> int:
        return self.end_step - self.start_step

    def __iter__(self) -> Iterator[Dict[str, torch.Tensor]]:
        if len(self) == 0:
            return
        from nvidia.dali.plugin.pytorch import DALIGenericIterator

        source = StepSource(self.dataset, self.order, self.rank, self.world_size, self.start_step, self.end_step)
        pipe = _build_pipeline(source, self.batch_size, self.dataset.image_size, self.device_id,
                               num_threads=max(1, self.num_workers), py_workers=self.num_workers,
                               prefetch=self.prefetch, seed=self.order.seed)
        names = ["image", "label", "moments"][: 3 if source.with_moments else 2]
        batches = DALIGenericIterator([pipe], names, auto_reset=False)
        try:
            for produced, out in enumerate(batches):
                batch = out[0]
                if produced >= len(self):
                    break
                yield {name: batch[name] for name in names}
        finally:
            del batches, pipe
