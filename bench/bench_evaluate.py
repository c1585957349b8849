"""``reglue evaluate`` speed: Inception feature extraction (img/s) and the whole evaluation of N
samples against a reference batch (features of samples and reference images, streamed
statistics, FID, sFID, IS, precision/recall).

GPU: 256² images, batch 200 (the ``reglue evaluate`` default), fp32 with TF32 off as evaluated;
the whole evaluation of 50,000 samples against 10,000 reference images (target: <= 60 s on one
H100). The .npz files are written first (random images, 9.8 + 2 GB) and are likely in the page
cache when read, so the time excludes a cold disk. CPU: a handful of 64² images, to prove the
benchmark runs; the timings are not performance. Random Inception weights either way (no
downloads on the benchmark machine): the arithmetic is the same as with the real weights.
"""

from __future__ import annotations

import time

import numpy as np
import pytest
import torch
from _common import ON_GPU

from reglue.evaluation.evaluate import DEFAULT_METRICS, Evaluator
from reglue.evaluation.inception import build_inception
from reglue.evaluation.metrics import GaussianStats
from reglue.evaluation.reference import NpzImages, NpzWriter, load_reference

DEVICE = torch.device("cuda" if ON_GPU else "cpu")
IMAGE_SIZE = 256 if ON_GPU else 64
BATCH = 200 if ON_GPU else 2
NUM_SAMPLES = 50_000 if ON_GPU else 5
NUM_REFERENCE = 10_000 if ON_GPU else 4
IS_SPLIT = 5000 if ON_GPU else 5
TARGET_S = 60.0


def _device_name() -> str:
    return torch.cuda.get_device_name() if ON_GPU else "cpu"


def _sync() -> None:
    if ON_GPU:
        torch.cuda.synchronize()


@pytest.fixture(scope="module")
def inception():
    return build_inception("random", DEVICE)


def test_inception_features(benchmark, inception):
    images = torch.randint(0, 256, (BATCH, IMAGE_SIZE, IMAGE_SIZE, 3), dtype=torch.uint8, device=DEVICE)
    inception(images)  # cuDNN algorithm choice, allocator warm-up

    def extract():
        inception(images)
        _sync()

    benchmark.group = f"evaluate inception {IMAGE_SIZE}px batch {BATCH}"
    benchmark.pedantic(extract, rounds=10 if ON_GPU else 2, warmup_rounds=1)
    median_s = benchmark.stats.stats.median
    benchmark.extra_info.update(device=_device_name(), provider="torch-fidelity fp32", img_per_s=BATCH / median_s,
                                batch=BATCH, image_size=IMAGE_SIZE, timer="pytest-benchmark median, synchronised")


def _write_batch(path, count: int, seed: int, stats: bool) -> None:
    """An ADM-format .npz of random images (and, for a reference, random PSD statistics)."""
    rng = np.random.default_rng(seed)
    chunk = 1000
    with NpzWriter(path) as writer:
        with writer.streamed("arr_0", (count, IMAGE_SIZE, IMAGE_SIZE, 3), np.uint8) as write:
            for start in range(0, count, chunk):
                write(rng.integers(0, 256, (min(chunk, count - start), IMAGE_SIZE, IMAGE_SIZE, 3), dtype=np.uint8))
        if stats:
            for suffix, dim in (("", 2048), ("_s", 2023)):
                gaussian = GaussianStats.of(torch.from_numpy(rng.random((dim + 100, dim))))
                writer.add(f"mu{suffix}", gaussian.mu.numpy())
                writer.add(f"sigma{suffix}", gaussian.sigma.numpy())


@pytest.fixture(scope="module")
def batches(tmp_path_factory):
    root = tmp_path_factory.mktemp("bench-evaluate")
    _write_batch(root / "ref.npz", NUM_REFERENCE, 0, stats=True)
    _write_batch(root / "samples.npz", NUM_SAMPLES, 1, stats=False)
    return root / "ref.npz", root / "samples.npz"


def test_evaluate_whole(benchmark, inception, batches):
    ref_path, samples_path = batches
    phases = {}

    def evaluate():
        start = time.perf_counter()
        evaluator = Evaluator(load_reference(ref_path), DEFAULT_METRICS, inception=inception, batch_size=BATCH,
                              is_split_size=IS_SPLIT)
        samples = evaluator.features_of(NpzImages(samples_path))
        _sync()
        phases["sample_features_s"] = time.perf_counter() - start
        evaluator.reference_features()
        _sync()
        phases["reference_features_s"] = time.perf_counter() - start - phases["sample_features_s"]
        scores = evaluator.score(samples)
        _sync()
        phases["total_s"] = time.perf_counter() - start
        phases["metrics_s"] = phases["total_s"] - phases["sample_features_s"] - phases["reference_features_s"]
        assert set(scores) == {"fid", "sfid", "inception_score", "precision", "recall"}

    benchmark.group = f"evaluate {NUM_SAMPLES} samples vs {NUM_REFERENCE} reference images {IMAGE_SIZE}px"
    benchmark.pedantic(evaluate, rounds=1, warmup_rounds=0)
    benchmark.extra_info.update(
        device=_device_name(), provider="reglue evaluate", img_per_s=(NUM_SAMPLES + NUM_REFERENCE) / phases["total_s"],
        samples=NUM_SAMPLES, reference_images=NUM_REFERENCE, target_s=TARGET_S if ON_GPU else None,
        target_met=phases["total_s"] <= TARGET_S if ON_GPU else None, **phases,
        timer="one round, wall clock: features (samples, reference) + statistics + FID, sFID, IS, precision/recall",
    )
