"""Named runs. Each preset is a function returning a full :class:`~reglue.config.Config`.

Method presets exist for SiT-B/2 and SiT-XL/2 (encoder_depth 4 for B, 8 for XL):
``sit-{b,xl}-2``, ``repa-sit-{b,xl}-2``, ``redi-sit-{b,xl}-2``, ``reg-sit-{b,xl}-2``,
``reglue-sit-{b,xl}-2``; and ``tiny`` (REGLUE on a tiny SiT with tiny random encoders, CPU demo).
"""

from __future__ import annotations

from typing import Callable, Dict

from reglue.config import (
    Config,
    DataConfig,
    EncoderConfig,
    MethodConfig,
    ModelConfig,
    ParallelConfig,
    SampleConfig,
    TrainConfig,
)

from reglue.models.encoders import DINOV2_HUB_WEIGHTS


def _activation_checkpointing(size: str) -> str:
    """Activation checkpointing of the paper presets: ``off`` for both sizes, because at the
    published batch (256 over 8 GPUs = 32 per GPU) SiT-XL/2 REGLUE needs about 17 GB of an 80 GB
    device, and recomputing blocks would only cost time (full AC: +1 forward, about +33% FLOPs).

    Estimate per GPU, N = 32 images, T = 257 tokens (256 patches + [CLS]), D = hidden size:

    - Parameters (trainable, from the meta-device model): SiT-XL/2 REGLUE 684.9 M (28 blocks of
      23.9 M: qkv 3D², proj D², MLP 8D², adaLN 6D²; 15.5 M outside the blocks); SiT-B/2 138.9 M.
    - Per parameter, FSDP2-sharded over 8 GPUs: fp32 weight 4 B + fp32 gradient 4 B + AdamW m, v
      8 B + fp32 EMA 4 B = 20 B -> XL 684.9 M x 20 B / 8 = 1.71 GB (B/2: 0.35 GB). In flight: the
      bf16 weights of the current and prefetched block, 2 x 23.9 M x 2 B = 0.1 GB, and one
      block's fp32 gradient before its reduce-scatter, 0.1 GB.
    - Activations kept for backward, per block: about 20 (N, T, D) bf16 tensors (the saved
      tensors of one block counted with ``torch.autograd.graph.saved_tensors_hooks``: 20.05 x NTD
      for the eager block, B/2 and XL/2 alike, 18.04 with the fused kernels): the block input and
      LN-modulated input, q, k, v and the attention output (3 + 1), the attention projection
      input, the gated-residual operands (2), the MLP input, fc1 output and GELU output (1 + 4 + 4),
      the MLP output. XL/2: NTD x 2 B = 32 x 257 x 1152 x 2 B = 18.9 MB, x 20 = 379 MB per block,
      x 28 blocks = 10.6 GB. B/2 (D = 768, 12 blocks): 12.6 MB x 20 x 12 = 3.0 GB.
    - Frozen encoders (replicated, no gradients): DINOv2-B 85.7 M fp32 = 0.34 GB, SD-VAE 83.7 M
      bf16 = 0.17 GB, compressor 0.03 GB; their no-grad forward and the backward's transient
      gradients (the largest, fc1's, 4 NTD = 76 MB) add well under 1 GB.

    XL/2 total ~ 1.7 + 0.2 + 10.6 + 0.6 + 1 = 14 GB, ~17 GB with 20% allocator slack: 63 GB free
    on an 80 GB H100 (B/2 ~ 5 GB). Activations grow by 0.33 GB per image, so ``off`` holds to
    about 128 images per GPU; beyond that (or on fewer GPUs without ``--micro-batch-size``) use
    ``--activation-checkpointing selective`` (keeps matmul and attention outputs, about half the
    activations, recomputes only elementwise ops) before ``full`` (keeps 1 NTD per block).
    """
    return {"B": "off", "XL": "off"}[size]


def _paper(size: str, method: str) -> Config:
    """ImageNet 256² recipe of the published code: batch 256, lr 1e-4, 250-step SDE sampling."""
    xl = size == "XL"
    semantic_channels = {"redi": 8}.get(method, 16)
    milestones = ((250_000, 0.5), (500_000, 0.25)) if (xl and method == "reglue") else ()
    slug = f"{method}-sit-{size.lower()}-2" if method != "sit" else f"sit-{size.lower()}-2"
    return Config(
        model=ModelConfig(arch=f"SiT-{size}/2", encoder_depth=8 if xl else 4),
        method=MethodConfig(name=method, semantic_channels=semantic_channels, semantic_milestones=milestones),
        # ReDi reduces the last block's tokens only; REGLUE compresses blocks 8-11.
        encoders=EncoderConfig(dinov2_weights=DINOV2_HUB_WEIGHTS, feature_layers=(11,) if method == "redi" else (8, 9, 10, 11)),
        data=DataConfig(image_size=256),
        parallel=ParallelConfig(activation_checkpointing=_activation_checkpointing(size)),
        train=TrainConfig(name=slug),
        # REPA's evaluation setting (README): SDE 250 steps, CFG 1.8 on t in [0, 0.7].
        sample=SampleConfig(sampler="sde", steps=250, cfg_scale=1.8, guidance_interval=(0.0, 0.7)),
    )


def tiny() -> Config:
    """REGLUE on a 4-block, 64-wide SiT with tiny random DINOv2/VAE and the synthetic dataset (CPU, minutes)."""
    return Config(
        model=ModelConfig(
            arch="custom", depth=4, hidden_size=64, num_heads=4, patch_size=2,
            num_classes=8, encoder_depth=2, projector_dim=128,
        ),
        method=MethodConfig(name="reglue", semantic_channels=8),
        encoders=EncoderConfig(
            dinov2_weights=None,
            dinov2_overrides={"embed_dim": 32, "depth": 4, "num_heads": 2},
            feature_layers=(0, 1, 2, 3),
            compressor_channels=(128, 32, 8),
            vae="tiny-random",
        ),
        data=DataConfig(image_size=64, synthetic_size=2048, synthetic_classes=8, num_workers=0),
        train=TrainConfig(
            name="tiny", max_steps=300, global_batch_size=32, ema_decay=0.99, log_every=10,
            ckpt_every=100, keep_last=2, num_sample_images=16,
        ),
        sample=SampleConfig(sampler="sde", steps=50, cfg_scale=2.0, guidance_interval=(0.0, 1.0)),
    )


PRESETS: Dict[str, Callable[[], Config]] = {"tiny": tiny}
for _size in ("B", "XL"):
    for _method in ("sit", "repa", "redi", "reg", "reglue"):
        _cfg = _paper(_size, _method)
        PRESETS[_cfg.train.name] = (lambda s=_size, m=_method: _paper(s, m))


def get_preset(name: str) -> Config:
    if name not in PRESETS:
        raise KeyError(f"unknown preset {name!r}; known presets: {', '.join(sorted(PRESETS))}")
    return PRESETS[name]()
