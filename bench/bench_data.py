"""Data loading throughput (img/s) of the loaders over prepared 256² JPEG shards.

CPU: the torch loader (DataLoader + PIL/libjpeg-turbo) against DALI on the CPU, both with 2
workers (target: DALI >= 1.5x). GPU: DALI ``mixed`` decoding (nvJPEG / the hardware decoder) at
256², batch 256 (target: >= 8,000 img/s, i.e. never the training bottleneck), beside the torch
loader with one worker per CPU core. Start-up (worker processes, first decode) is excluded:
each round pulls the next batches from an already running loader, and a batch counts as
delivered once its tensors are ready (synchronised on GPU).

The shards hold synthetic shape images with per-pixel noise (JPEG q95 4:4:4, ~70 KB at 256²:
harder to decode than typical ImageNet crops) and random moments; building them takes seconds.
"""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch
from _common import ON_GPU

from reglue.data.dali import DALILoader, dali_available
from reglue.data.loader import TorchLoader
from reglue.data.prepare import PrepareOptions, ShardWriter, finalize, jpeg_roundtrip
from reglue.data.sampler import GlobalBatchOrder
from reglue.data.shards import open_data_dir
from reglue.data.synthetic import SyntheticShapes

IMAGE_SIZE = 256
NUM_IMAGES = 1024 if ON_GPU else 256
SHARD_SIZE = 128
BATCH = 256 if ON_GPU else 32
STEPS_PER_ROUND = 4
ROUNDS = 5
CPU_WORKERS = 2
GPU_WORKERS = min(16, os.cpu_count() or 1)


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    root = tmp_path_factory.mktemp("bench-shards")
    options = PrepareOptions(image_size=IMAGE_SIZE, vae="random-moments", shard_size=SHARD_SIZE)
    images = SyntheticShapes(size=NUM_IMAGES, num_classes=8, image_size=IMAGE_SIZE, seed=0)
    g = torch.Generator().manual_seed(0)
    num_shards = NUM_IMAGES // SHARD_SIZE
    for k in range(num_shards):
        writer = ShardWriter(root, f"{k:05d}", IMAGE_SIZE // 8)
        for i in range(k * SHARD_SIZE, (k + 1) * SHARD_SIZE):
            image, label = images[i]
            data, _ = jpeg_roundtrip(image.permute(1, 2, 0).numpy())
            writer.add(data, label, f"synthetic/{i}", torch.randn(8, IMAGE_SIZE // 8, IMAGE_SIZE // 8, generator=g))
        writer.close({"shard": k, "num_sources": SHARD_SIZE, "first_source": None, "skipped": []})
    finalize(root, num_shards, {str(c): c for c in range(8)}, options)
    return open_data_dir(root)


def _loader(provider: str, dataset, steps: int):
    order = GlobalBatchOrder(len(dataset), BATCH, seed=0)
    if provider == "torch":
        return TorchLoader(dataset, order, 0, 1, 0, steps, num_workers=GPU_WORKERS if ON_GPU else CPU_WORKERS)
    if not dali_available():
        pytest.skip("nvidia.dali is not installed (pip install 'reglue[dali]')")
    if provider == "dali-mixed":
        if not ON_GPU:
            pytest.skip("DALI mixed (GPU) decoding needs a CUDA device")
        return DALILoader(dataset, order, 0, 1, 0, steps, device=torch.device("cuda"), num_workers=GPU_WORKERS)
    return DALILoader(dataset, order, 0, 1, 0, steps, device=torch.device("cpu"), num_workers=CPU_WORKERS)


@pytest.mark.parametrize("provider", ["torch", "dali-cpu", "dali-mixed"])
def test_loader_throughput(benchmark, shards, provider):
    steps = STEPS_PER_ROUND * (ROUNDS + 3)
    batches = iter(_loader(provider, shards, steps))
    for _ in range(STEPS_PER_ROUND):  # start-up: workers, pipeline build, first decodes
        next(batches)

    def pull():
        for _ in range(STEPS_PER_ROUND):
            batch = next(batches)
            assert batch["image"].shape == (BATCH, 3, IMAGE_SIZE, IMAGE_SIZE)
        if ON_GPU:
            torch.cuda.synchronize()

    benchmark.group = f"data {IMAGE_SIZE}px batch {BATCH}"
    benchmark.pedantic(pull, rounds=ROUNDS, warmup_rounds=1, iterations=1)
    if hasattr(batches, "close"):  # DALI: stop the pipeline and its worker processes now
        batches.close()
    median_s = benchmark.stats.stats.median
    jpeg_kb = float(np.mean([len(shards.encoded(i)) for i in range(0, len(shards), 7)])) / 1024
    benchmark.extra_info.update(
        device=torch.cuda.get_device_name() if ON_GPU else "cpu",
        provider=provider,
        img_per_s=STEPS_PER_ROUND * BATCH / median_s,
        workers=GPU_WORKERS if ON_GPU else CPU_WORKERS,
        cpu_cores=os.cpu_count(),
        image_size=IMAGE_SIZE,
        batch=BATCH,
        mean_jpeg_kb=jpeg_kb,
        timer="pytest-benchmark median over rounds of already running loader",
    )
