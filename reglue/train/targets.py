"""Frozen encoders of a run and the training targets they produce from a batch.

Outside the optimizer and the checkpoint; small, so replicated (not sharded) on every rank; run
under ``no_grad`` in ``encoders.dtype`` (bf16) on CUDA (fp32 on CPU); computed once per step.
When the run compiles (``reglue.train.parallelize.resolve_execution``), the DINOv2 blocks (one
graph for all of them, attention through our dispatch) and the semantic target (standardise ->
compressor or PCA -> resize, the fused convolutions inside) are compiled regions; the compressor
runs BN-folded. Randomly initialised encoders (tests, the tiny demo) are seeded from the run
seed, so every rank and every resume builds the same ones. Statistics and PCA fitted at start are
saved in the run directory and re-used on resume.

Under ``parallel.reference`` the encoders run as the published loops run them
(``reglue.train.reference``): fp32 weights (VAE included), DINOv2 and the semantic target under
the recipe's autocast (fp16 for REPA/REG/REGLUE on CUDA, none for ReDi), and REGLUE's compressor
as trained, with its BatchNorm layers (the published ``load_compression_model`` folds nothing)
and eager convolutions.

The VAE's weights fingerprint (:attr:`FrozenEncoders.vae_sha256`) is what a prepared dataset's
moments are checked against (``reglue.data.check_dataset_vae``).
"""

from __future__ import annotations

import contextlib
import logging
from pathlib import Path
from typing import Callable, Dict, Optional

import torch

from reglue.config import Config
from reglue.models.state import weights_fingerprint
from reglue.outputs import atomic_path
from reglue.runtime import broadcast_object, seeded_init
from reglue.train.parallelize import compile_region, resolve_execution
from reglue.train.reference import reference_autocast_dtype
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

PRECOMPUTE_LIMIT_BYTES = 2 * 2**30
"""``encoders.precompute_targets`` keeps every image's targets in device memory: at most this much."""

CALIBRATION_IMAGES = 256
"""Images (a seeded sample across the dataset) used to compute feature statistics / fit the PCA at
start when no file is given; random-initialised encoders only."""


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
        self.is_main = is_main
        self.table: Optional[Dict[str, Optional[torch.Tensor]]] = None
        """dataset index -> encoder outputs (:meth:`precompute`), or None."""
        enc, method = config.encoders, config.method
        self.execution = resolve_execution(config, device)
        self.reference = self.execution.reference
        self.dtype = torch.float32 if self.reference else frozen_dtype(enc.dtype, device)
        self.autocast_dtype = reference_autocast_dtype(config, device) if self.reference else None
        """The published autocast of DINOv2 and the semantic target (``--reference`` fp16 recipes on
        CUDA); None: none (the fast path runs bf16 weights, DINOv2 its own bf16 autocast)."""
        vae = build_vae(enc.vae, seed=config.train.seed, run_dir=run_dir, fit_images=calibration_images, is_main=is_main)
        self.vae_sha256 = weights_fingerprint(vae.state_dict())
        """Fingerprint of the VAE's weights as built (before any cast)."""
        self.vae = vae.to(device=device, dtype=self.dtype)
        self.dinov2 = self.reducer = self.stats = None
        self.semantic_target = semantic_target
        if method.needs_dinov2:
            self.dinov2 = build_frozen_dinov2(config, device, attention=self.execution.attention)
            if self.reference:
                self.dinov2.autocast_dtype = self.autocast_dtype
            if self.dinov2.embed_dim != enc.embed_dim:
                raise ValueError(f"encoders.dinov2 has width {self.dinov2.embed_dim} but the config expects {enc.embed_dim} "
                                 "(set encoders.dinov2_overrides.embed_dim)")
        if method.semantic != "none":
            self._build_semantic(run_dir, calibration_images)
        if self.execution.compile:  # after any calibration at start, so only the step's shapes compile
            self._compile()

    def _compile(self) -> None:
        if self.dinov2 is not None:
            for block in self.dinov2.model.blocks:
                compile_region(block, "DINOv2 block", self.execution.compile_fallback)
        if self.reducer is not None:
            self.semantic_target = compile_region(semantic_target, "semantic target", self.execution.compile_fallback)

    def _features(self, images: torch.Tensor) -> torch.Tensor:
        return self.dinov2(images.to(self.device)).features.float()

    def _calibration_features(self, calibration_images, batch: int = 64):
        images = calibration_images(CALIBRATION_IMAGES)
        return [self._features(images[i : i + batch]) for i in range(0, len(images), batch)]

    def _file_or_fit(self, field: str, given, default: Path, load, fit, command: str):
        """Load ``encoders.<field>`` (or the run's own earlier fit at ``default``), or fit it now.

        Fitting at start is for random-initialised encoders only (tests, the demo): with pretrained
        DINOv2 weights a fit over a few images would silently bias every target, so a missing
        file is an error naming the command that computes it over the dataset. Rank 0 fits,
        writes atomically and broadcasts, so no rank reads a half-written file.
        """
        path = Path(given) if given else default
        if given and not path.is_file():
            raise FileNotFoundError(f"encoders.{field}: {path} does not exist")
        if broadcast_object(path.is_file() if self.is_main else None):
            return load(path)
        if self.config.encoders.dinov2_weights is not None:
            raise ValueError(f"encoders.{field} is required with pretrained DINOv2 weights: compute it over the "
                             f"dataset with `{command}` and pass --set encoders.{field}=FILE")
        value = fit() if self.is_main else None
        if self.is_main:
            path.parent.mkdir(parents=True, exist_ok=True)
            with atomic_path(path) as tmp:
                value.save(tmp)
        return broadcast_object(value)

    def _build_semantic(self, run_dir: Path, calibration_images) -> None:
        enc, method = self.config.encoders, self.config.method
        channels = self.dinov2.feature_channels
        cache = {}

        def features():
            if "f" not in cache:
                cache["f"] = self._calibration_features(calibration_images)
            return cache["f"]

        self.stats = self._file_or_fit("feature_stats", enc.feature_stats, run_dir / "feature_stats.safetensors",
                                       FeatureStats.load, lambda: compute_feature_stats(features()),
                                       "reglue stats --data DIR --out stats.safetensors")
        if self.stats.channels != channels:
            raise ValueError(f"feature statistics have {self.stats.channels} channels but DINOv2 layers "
                             f"{enc.feature_layers} give {channels}")
        self.stats = self.stats.to(self.device)
        if method.semantic == "compressor":
            self.reducer = self._compressor()
            return
        pca = self._file_or_fit(
            "pca", enc.pca, run_dir / "pca.safetensors", PCA.load,
            lambda: PCA.fit(torch.cat([self.stats.normalize(f) for f in features()]).cpu(), n_components=method.semantic_channels),
            f"reglue stats --data DIR --out stats.safetensors --pca {method.semantic_channels} --pca-out pca.safetensors",
        )
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
            with seeded_init(self.config.train.seed):
                compressor = SemanticCompressor(enc.compressor_channels)
        if tuple(compressor.channels) != tuple(enc.compressor_channels):
            raise ValueError(f"compressor has channels {tuple(compressor.channels)}, config says {enc.compressor_channels}")
        if compressor.in_channels != self.dinov2.feature_channels:
            raise ValueError(f"compressor expects {compressor.in_channels} feature channels, DINOv2 gives {self.dinov2.feature_channels}")
        if self.reference:
            return compressor.eval().to(device=self.device, dtype=self.dtype)
        compressor = compressor.eval().fold_batchnorm().to(device=self.device, dtype=self.dtype)
        return _FusedCompressor(compressor) if "fused_conv2d" in self.execution.fused_ops else compressor

    def _published_autocast(self):
        """The published autocast around the semantic target (``--reference`` fp16 recipes), else nothing."""
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.autocast_dtype)

    @torch.no_grad()
    def targets(self, batch: Dict[str, torch.Tensor], latent_eps: torch.Tensor) -> Dict[str, object]:
        """latents (N, 4, h, w) fp32; semantic (N, k, h, w) or None; cls (N, C) or None; align: list.

        A batch with an ``index`` (dataset indices) after :meth:`precompute` gathers the stored
        encoder outputs instead of running the encoders; the latents are still drawn from the
        VAE moments with this step's ``latent_eps``."""
        if self.table is not None and "index" in batch:
            index = batch["index"].to(self.device, non_blocking=True)  # pinned by the loader on CUDA, like the images
            stored = {k: (v.index_select(0, index) if v is not None else None) for k, v in self.table.items()}
        else:
            stored = self._encode(batch)
        latents = self.vae.sample_latents(stored["moments"], eps=latent_eps)
        return {"latents": latents, "semantic": stored["semantic"], "cls": stored["cls"],
                "align": [stored["align"]] if stored["align"] is not None else []}

    def _encode(self, batch: Dict[str, torch.Tensor]) -> Dict[str, Optional[torch.Tensor]]:
        """What the frozen encoders make of a batch: VAE moments, semantic target, [CLS], alignment tokens."""
        method = self.config.method
        images = batch["image"].to(self.device, non_blocking=True)
        moments = batch.get("moments")
        moments = self.vae.encode_moments(images) if moments is None else moments.to(self.device, non_blocking=True)
        out: Dict[str, Optional[torch.Tensor]] = {"moments": moments.float(), "semantic": None, "cls": None, "align": None}
        if self.dinov2 is not None:
            enc = self.dinov2(images)
            if self.reducer is not None:
                features = enc.features.float() if isinstance(self.reducer, PCA) else enc.features.to(self.dtype)
                with self._published_autocast():
                    grid = moments.shape[-1]
                    out["semantic"] = self.semantic_target(features, self.stats, self.reducer, grid).float()
            if method.use_cls:
                out["cls"] = enc.cls.float()
            if method.use_align:
                out["align"] = enc.tokens.float() if method.use_cls else enc.tokens[:, 1:].float()
        return out

    @torch.no_grad()
    def precompute(self, dataset, batch_size: int = 256) -> None:
        """Run the encoders over every image of ``dataset`` (``dataset[i] -> (image, label[,
        moments])``) in fixed batches of ``batch_size`` in index order, and keep the outputs on the
        device for :meth:`targets`. The same numbers on every rank and every resume. Raises
        ValueError (naming ``encoders.precompute_targets``) when they would exceed
        ``PRECOMPUTE_LIMIT_BYTES``. Nothing under ``--reference``: the published loops run their
        encoders on every batch."""
        from reglue.data.loader import collate

        if self.reference:
            log.info("encoders.precompute_targets is off under --reference: the encoders run on every batch")
            return
        n = len(dataset)
        chunks = []
        for lo in range(0, n, batch_size):
            chunk = self._encode(collate([dataset[i] for i in range(lo, min(n, lo + batch_size))]))
            need = _nbytes(chunk) * n // len(chunk["moments"]) if not chunks else 0  # from the first batch
            if need > PRECOMPUTE_LIMIT_BYTES:
                raise ValueError(f"encoders.precompute_targets: the targets of {n} images would take {need / 2**30:.1f} "
                                 f"GiB (limit {PRECOMPUTE_LIMIT_BYTES / 2**30:.0f} GiB); set it false for this dataset")
            chunks.append(chunk)
        self.table = {k: (torch.cat([c[k] for c in chunks]) if chunks[0][k] is not None else None) for k in chunks[0]}
        log.info("encoders: targets of %d images precomputed (%.1f MiB on %s)", n, _nbytes(self.table) / 2**20,
                 self.device.type)


def _nbytes(tensors: Dict[str, Optional[torch.Tensor]]) -> int:
    return sum(t.nelement() * t.element_size() for t in tensors.values() if t is not None)
