"""Train-step throughput (img/s per GPU) and MFU: the defaults (``model.kernels`` and
``parallel.compile`` auto: on CUDA the self-checked fused kernels and regional compile) against the
published recipe's execution (``--reference``) in the same run, and what each part of the defaults
buys (GPU only: no compile, eager kernels, selective activation checkpointing).

On GPU: SiT-B/2 and SiT-XL/2 REGLUE at real shapes and the published per-GPU batch (256 over 8
GPUs = 32; XL/2 also at 64), random-initialised DINOv2-B and compressor, precomputed VAE moments,
as in real training. On CPU: the tiny preset (the defaults resolve to eager there), only to prove
the benchmark runs. Each benchmark stores img/s, TFLOP/s and MFU (FLOPs counted from the model +
frozen encoders), the fused ops, compile and the compiled-graph count in ``extra_info``;
``bench/summarize.py`` checks the targets (XL/2: >= 50% MFU, >= 3.5x the reference).
"""

from __future__ import annotations

import gc

import pytest
import torch
from _common import ON_GPU

from reglue.config import apply_overrides
from reglue.presets import get_preset
from reglue.runtime import DistInfo
from reglue.train.metrics import device_peak_flops
from reglue.train.parallelize import execution_metrics
from reglue.train.trainer import Trainer

VARIANTS = {"defaults": {}, "reference": {"parallel.reference": "true"}}
if ON_GPU:
    VARIANTS.update({
        "no-compile": {"parallel.compile": "false"},
        "eager-kernels": {"model.kernels": "eager"},
        "ac-selective": {"parallel.activation_checkpointing": "selective"},
    })

# (preset, per-device batch)
CASES = [("reglue-sit-b-2", 32), ("reglue-sit-xl-2", 32), ("reglue-sit-xl-2", 64)] if ON_GPU else [("tiny", 32)]
STEPS = 10 if ON_GPU else 3


def _config(tmp_path, preset: str, batch: int, variant: dict):
    overrides = {
        "train.out_dir": str(tmp_path), "train.name": "bench", "train.global_batch_size": str(batch),
        "train.resume": "none", "train.tensorboard": "false", "data.synthetic_size": str(max(batch, 256)),
        **variant,
    }
    if preset != "tiny":  # real shapes, random weights: no downloads on the benchmark machine
        overrides.update({"encoders.dinov2_weights": "none", "encoders.vae": "tiny-random"})
    return apply_overrides(get_preset(preset), overrides)


def _batch(config, batch: int, device):
    size, latent = config.data.image_size, config.data.latent_size
    return {
        "image": torch.randint(0, 256, (batch, 3, size, size), dtype=torch.uint8, device=device),
        "label": torch.randint(0, config.model.num_classes, (batch,), device=device),
        "moments": torch.cat([torch.randn(batch, 4, latent, latent), torch.rand(batch, 4, latent, latent) * 0.1], 1).to(device),
    }


@pytest.mark.parametrize("preset,batch", CASES, ids=[f"{p}-b{b}" for p, b in CASES])
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_train_step(benchmark, tmp_path, preset, batch, variant):
    device = torch.device("cuda" if ON_GPU else "cpu")
    config = _config(tmp_path, preset, batch, VARIANTS[variant])
    torch._dynamo.reset()  # each variant compiles its own graphs, never against another's recompile limit,
    torch._dynamo.utils.counters.clear()  # and counts only its own
    trainer = Trainer(config, DistInfo(device=device))
    data = _batch(config, batch, device)
    _, latent_eps = trainer._step_randomness(0)
    flops_per_image = trainer._count_flops(data, latent_eps)
    for step in range(3):  # compile, allocator warm-up
        trainer.train_step(step, data)
    sync = torch.cuda.synchronize if ON_GPU else (lambda: None)
    counter = iter(range(3, 10**9))

    def step():
        trainer.train_step(next(counter), data)
        sync()

    benchmark.group = f"train-step {preset} b{batch}"
    benchmark.pedantic(step, rounds=STEPS, warmup_rounds=1)
    seconds = benchmark.stats.stats.median
    img_s = batch / seconds
    peak = device_peak_flops(device)
    benchmark.extra_info.update(
        device=torch.cuda.get_device_name() if ON_GPU else "cpu", variant=variant, preset=preset, batch=batch,
        img_per_s=img_s, flops_per_image=flops_per_image, tflops=flops_per_image * img_s / 1e12,
        mfu=flops_per_image * img_s / peak if peak else None,
        peak_mem_gib=torch.cuda.max_memory_allocated() / 2**30 if ON_GPU else None,
        activation_checkpointing=config.parallel.activation_checkpointing, **execution_metrics(config, device),
    )
    trainer = None  # free the model before the next variant (the closure above holds the name, not the object)
    gc.collect()
    if ON_GPU:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
