"""Frozen encoders of a run and the training targets they produce from a batch.

Outside the optimizer and the checkpoint; small, so replicated (not sharded) on every rank; run
under ``no_grad`` in bf16 on CUDA (fp32 on CPU); computed once per step. Randomly initialised
encoders (tests, the tiny demo) are seeded from the run seed, so every rank and every resume
builds the same ones. Statistics and PCA fitted at start are saved in the run directory and
re-used on resume.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Callable, Dict

import torch

from reglue.config import Config
from reglue.models.encoders import (
    PCA,
    FeatureStats,
    build_frozen_dinov2,
    build_vae,
    compute_feature_stats,
    frozen_dtype,
    semantic_target,
)

log = logging.getLogger("reglue.targets")

CALIBRATION_IMAGES = 256
"""Images used to compute feature statistics / fit the PCA when no file is given."""


class _FusedCompressor:
    """A BN-folded compressor whose ``encode`` runs the fused Triton convolutions (one launch per conv)."""

    def __init__(self, compressor):
        self.compressor = compressor
        self.channels = compressor.channels

    def encode(self, features: torch.Tensor) -> torch.Tensor:
        from reglue.kernels import compressor_encode_fused

        return compressor_encode_fused(self.compressor, features)


class FrozenEncoders:
    """Builds the frozen DINOv2, semantic reducer (compressor or PCA) and VAE of ``config``.

    ``calibration_images()`` returns a uint8 (n, 3, H, W) tensor of the first dataset images; it
    is only called when statistics or a PCA must be computed at start.
    """

    def __init__(self, config: Config, device: torch.device, run_dir: Path,
                 calibration_images: Callable[[int], torch.Tensor], is_main: bool = True):
        self.config = config
        self.device = device
        enc, method = config.encoders, config.method
        self.dtype = frozen_dtype(enc.dtype, device)
        self.vae = build_vae(enc.vae, seed=config.train.seed).to(device=device, dtype=self.dtype)
        self.dinov2 = self.reducer = self.stats = None
        if method.needs_dinov2:
            self.dinov2 = build_frozen_dinov2(config, device)
            if self.dinov2.embed_dim != enc.embed_dim:
                raise ValueError(f"encoders.dinov2 has width {self.dinov2.embed_dim} but the config expects {enc.embed_dim} "
                                 "(set encoders.dinov2_overrides.embed_dim)")
        if method.semantic != "none":
            self._build_semantic(run_dir, calibration_images, is_main)

    def _features(self, images: torch.Tensor) -> torch.Tensor:
        return self.dinov2(images.to(self.device)).features.float()

    def _calibration_features(self, calibration_images, batch: int = 64):
        images = calibration_images(CALIBRATION_IMAGES)
        return [self._features(images[i : i + batch]) for i in range(0, len(images), batch)]

    def _build_semantic(self, run_dir: Path, calibration_images, is_main: bool) -> None:
        enc, method = self.config.encoders, self.config.method
        channels = self.dinov2.feature_channels
        cached = None
        stats_file = Path(enc.feature_stats) if enc.feature_stats else run_dir / "feature_stats.safetensors"
        if stats_file.is_file():
            self.stats = FeatureStats.load(stats_file)
        else:
            if enc.feature_stats:
                raise FileNotFoundError(f"encoders.feature_stats: {stats_file} does not exist")
            if enc.dinov2_weights is not None:
                log.warning("no encoders.feature_stats given: computing them over the first %d images; "
                            "use `reglue stats` over the whole dataset for real runs", CALIBRATION_IMAGES)
            cached = self._calibration_features(calibration_images)
            self.stats = compute_feature_stats(cached)
            if is_main:
                run_dir.mkdir(parents=True, exist_ok=True)
                self.stats.save(stats_file)
        if self.stats.channels != channels:
            raise ValueError(f"feature statistics have {self.stats.channels} channels but DINOv2 layers "
                             f"{enc.feature_layers} give {channels}")
        self.stats = self.stats.to(self.device)
        if method.semantic == "compressor":
            self.reducer = self._compressor()
        else:
            pca_file = Path(enc.pca) if enc.pca else run_dir / "pca.safetensors"
            if pca_file.is_file():
                pca = PCA.load(pca_file)
            else:
                if enc.pca:
                    raise FileNotFoundError(f"encoders.pca: {pca_file} does not exist")
                feats = cached if cached is not None else self._calibration_features(calibration_images)
                pca = PCA.fit(torch.cat([self.stats.normalize(f) for f in feats]).cpu(), n_components=method.semantic_channels)
                if is_main:
                    pca.save(pca_file)
            if pca.latent_channels != method.semantic_channels or pca.in_channels != channels:
                raise ValueError(f"PCA maps {pca.in_channels} -> {pca.latent_channels} channels; the run needs "
                                 f"{channels} -> {method.semantic_channels}")
            self.reducer = pca.to(self.device)

    def _compressor(self):
        from reglue.models.compressor import SemanticCompressor, load_compressor

        enc = self.config.encoders
        if enc.compressor:
            compressor = load_compressor(enc.compressor)
        else:
            if enc.dinov2_weights is not None:
                raise ValueError("encoders.compressor is required for REGLUE with pretrained DINOv2 weights: "
                                 "train one with `reglue train-compressor` or pass the published compressor file")
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(self.config.train.seed)
                compressor = SemanticCompressor(enc.compressor_channels)
        if tuple(compressor.channels) != tuple(enc.compressor_channels):
            raise ValueError(f"compressor has channels {tuple(compressor.channels)}, config says {enc.compressor_channels}")
        if compressor.in_channels != self.dinov2.feature_channels:
            raise ValueError(f"compressor expects {compressor.in_channels} feature channels, DINOv2 gives {self.dinov2.feature_channels}")
        compressor = compressor.eval().fold_batchnorm().to(device=self.device, dtype=self.dtype)
        return _FusedCompressor(compressor) if self.config.model.kernels == "triton" else compressor

    @torch.no_grad()
    def targets(self, batch: Dict[str, torch.Tensor], latent_eps: torch.Tensor) -> Dict[str, object]:
        """latents (N, 4, h, w) fp32; semantic (N, k, h, w) or None; cls (N, C) or None; align: list."""
        method = self.config.method
        images = batch["image"].to(self.device, non_blocking=True)
        moments = batch.get("moments")
        moments = self.vae.encode_moments(images) if moments is None else moments.to(self.device, non_blocking=True)
        latents = self.vae.sample_latents(moments.float(), eps=latent_eps)
        out: Dict[str, object] = {"latents": latents, "semantic": None, "cls": None, "align": []}
        if self.dinov2 is not None:
            enc = self.dinov2(images)
            if self.reducer is not None:
                features = enc.features.float() if isinstance(self.reducer, PCA) else enc.features.to(self.dtype)
                out["semantic"] = semantic_target(features, self.stats, self.reducer, latents.shape[-1]).float()
            if method.use_cls:
                out["cls"] = enc.cls.float()
            if method.use_align:
                out["align"] = [enc.tokens.float() if method.use_cls else enc.tokens[:, 1:].float()]
        return out
