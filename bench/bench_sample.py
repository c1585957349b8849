"""Sampling throughput (img/s) of ``reglue generate``'s sampler against the published
``generate.py`` execution, and model FLOP/s as a share of the measured bf16 matmul ceiling.

On GPU: SiT-XL/2 REGLUE at 256² (random weights, the SD-VAE decoder architecture with random
weights: no downloads), the published evaluation sampler: 250-step Euler-Maruyama SDE, CFG 2.3
on the latents and the [CLS] token inside t in [0, 0.9] (one 2N model call there, N outside).
One round draws one block of samples, decoded to uint8 on the host.

  ours       bf16 autocast, fused Triton kernels, the best attention backend, compiled blocks
  reference  what the published generate.py runs: fp32 weights and activations with TF32
             matmuls, eager PyTorch, plain softmax attention (its --fused-attn defaults to off),
             the same guidance interval logic

On CPU: the tiny preset, 4 steps, only to prove the benchmark runs (seconds; not performance).
``extra_info`` holds img/s, the model FLOPs per image (counted per model call, guided calls
count twice), model TFLOP/s and ``mfu``: that rate over the bf16 matmul ceiling measured in
this session (``bench/_roofline.py``), not a data-sheet peak.
"""

from __future__ import annotations

import gc

import pytest
import torch
from _common import ON_GPU

from reglue.config import SampleConfig
from reglue.evaluation.generate import BlockPlan, ImageSampler
from reglue.models import build_model
from reglue.models.encoders import VAE, build_vae
from reglue.presets import get_preset
from reglue.train.metrics import count_flops

PRESET = "reglue-sit-xl-2" if ON_GPU else "tiny"
STEPS = 250 if ON_GPU else 4
SETTINGS = SampleConfig(sampler="sde", steps=STEPS, cfg_scale=2.3, cls_cfg_scale=2.3, guidance_interval=(0.0, 0.9))
# variant -> (per-device batch, ImageSampler.from_state options)
OURS = dict(kernels="triton", attention=None, compile=True, autocast=True) if ON_GPU else \
    dict(kernels="eager", attention=None, compile=False, autocast=True)
REFERENCE = dict(kernels="eager", attention="math", compile=False, autocast=False)
VARIANTS = {"reference": (64, REFERENCE), "ours": (64, OURS), "ours-b256": (256, OURS)} if ON_GPU else \
    {"reference": (4, REFERENCE), "ours": (4, OURS)}
ROUNDS = 2 if ON_GPU else 3

_ceiling: dict = {}


def bf16_matmul_ceiling() -> float | None:
    """This GPU's bf16 matmul FLOP/s, measured once per session; None on the CPU."""
    if not ON_GPU:
        return None
    if "flops" not in _ceiling:
        from _roofline import measure_ceilings

        _ceiling["flops"] = measure_ceilings()["matmul_bf16_tflops"] * 1e12
    return _ceiling["flops"]


def _config():
    return get_preset(PRESET)


def _vae(config):
    """SD-VAE (stabilityai/sd-vae-ft-*) architecture with random weights on GPU; the tiny one on CPU."""
    if not ON_GPU:
        return build_vae("tiny-random")
    from diffusers import AutoencoderKL

    return VAE(AutoencoderKL(down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                             block_out_channels=(128, 256, 512, 512), layers_per_block=2, latent_channels=4,
                             sample_size=config.data.image_size))


def _forward_flops_per_row(config) -> float:
    """FLOPs of one SiT forward for one sample (counted on a meta-device copy)."""
    with torch.device("meta"):
        model = build_model(config, kernels="eager")
        x = torch.zeros(1, config.in_channels, config.data.latent_size, config.data.latent_size)
        cls = torch.zeros(1, model.cls_token_dim) if model.cls_token_dim else None
        t, y = torch.zeros(1), torch.zeros(1, dtype=torch.long)
    with torch.no_grad():
        return float(count_flops(lambda: model(x, t, y, cls)))


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_sample(benchmark, variant):
    device = torch.device("cuda" if ON_GPU else "cpu")
    batch, options = VARIANTS[variant]
    config = _config()
    if ON_GPU:  # the published generate.py runs fp32 matmuls as TF32 (its --tf32 default)
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    state = build_model(config, kernels="eager").state_dict()
    sampler = ImageSampler.from_state(config, state, _vae(config), device, SETTINGS, **options)
    del state
    plan = BlockPlan(num=batch * (ROUNDS + 2), batch_size=batch, seed=0, num_classes=config.model.num_classes)
    rows_per_call = []
    hook = sampler.model.register_forward_pre_hook(lambda _, args: rows_per_call.append(args[0].shape[0]))
    sampler.sample_block(plan, 0)  # compile (both batch shapes), allocator warm-up, and the call count
    hook.remove()
    blocks = iter(range(1, plan.num_blocks))

    def draw():
        sampler.sample_block(plan, next(blocks))  # ends with the copy to the host: synchronised

    benchmark.group = f"sample {PRESET} sde{STEPS} cfg[0,0.9]"
    benchmark.pedantic(draw, rounds=ROUNDS, warmup_rounds=1 if ON_GPU else 0)
    seconds = benchmark.stats.stats.median
    img_s = batch / seconds
    flops_per_image = _forward_flops_per_row(config) * sum(rows_per_call) / batch
    ceiling = bf16_matmul_ceiling()
    benchmark.extra_info.update(
        device=torch.cuda.get_device_name() if ON_GPU else "cpu", variant=variant, preset=PRESET, batch=batch,
        steps=STEPS, model_calls=len(rows_per_call), img_per_s=img_s, median_ms=seconds * 1e3,
        model_flops_per_image=flops_per_image, tflops=flops_per_image * img_s / 1e12,
        mfu=flops_per_image * img_s / ceiling if ceiling else None, mfu_basis="measured bf16 matmul ceiling",
        peak_mem_gib=torch.cuda.max_memory_allocated() / 2**30 if ON_GPU else None,
    )
    sampler = None  # free the model before the next variant builds its own
    gc.collect()
    if ON_GPU:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
