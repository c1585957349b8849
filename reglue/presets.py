"""Named runs. Each preset is a function returning a full :class:`~reglue.config.Config`.

Method presets exist for SiT-B/2 and SiT-XL/2 (encoder_depth 4 for B, 8 for XL):
``sit-{b,xl}-2``, ``repa-sit-{b,xl}-2``, ``redi-sit-{b,xl}-2``, ``reg-sit-{b,xl}-2``,
``reglue-sit-{b,xl}-2``; and ``tiny`` (the CPU demo: REGLUE on a tiny SiT, synthetic images).
"""

from __future__ import annotations

from typing import Callable, Dict

from reglue.config import (
    Config,
    DataConfig,
    EncoderConfig,
    MethodConfig,
    ModelConfig,
    OptimConfig,
    SampleConfig,
    TrainConfig,
)

from reglue.models.encoders import DINOV2_HUB_WEIGHTS


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
        train=TrainConfig(name=slug),
        # REPA's evaluation setting (README): SDE 250 steps, CFG 1.8 on t in [0, 0.7].
        sample=SampleConfig(sampler="sde", steps=250, cfg_scale=1.8, guidance_interval=(0.0, 0.7)),
    )


def tiny() -> Config:
    """The CPU demo (about a minute on 2 cores): REGLUE on a 4-block, 64-wide SiT with tiny random
    DINOv2 and compressor, a patch autoencoder fitted to the synthetic set at start
    (``reglue.models.autoencoder``), 64 px images (8x8 latents, 16 tokens).

    Batch 64 and lr 5e-3: a step of this model costs about as much at batch 64 as at 32 (fixed
    per-step overhead), and class conditioning appears after ~200 steps at lr 5e-3 against ~500 at
    2e-3 (measured share of samples in their class at 400 steps, cfg 2, seeds 0/1/2: 84/86/88%).
    """
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
            vae="patch-pca",
        ),
        data=DataConfig(image_size=64, synthetic_size=2048, synthetic_classes=8, num_workers=0),
        optim=OptimConfig(lr=5e-3),
        train=TrainConfig(
            name="tiny", max_steps=400, global_batch_size=64, ema_decay=0.99, log_every=10,
            ckpt_every=200, keep_last=2, num_sample_images=64,
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
