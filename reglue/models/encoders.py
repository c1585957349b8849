"""Frozen encoders and the semantic target built from them.

- :class:`DINOv2Encoder`: DINOv2-B/14 with 4 registers (timm `vit_base_patch14_reg4_dinov2`:
  REGLUE, ReDi) or without (`vit_base_patch14_dinov2`: REPA, REG), returning the multi-layer patch
  features REGLUE compresses, the final [CLS] token, and the final-layer tokens REPA aligns to.
- :class:`FeatureStats` / :class:`RunningMoments` / :func:`compute_feature_stats`: per-channel
  mean and std of those features, streamed in float64.
- :class:`PCA`: the ReDi alternative to the learned compressor.
- :func:`semantic_target`: standardise -> reduce (compressor or PCA) -> resize to the latent grid.
- :class:`VAE`: the SD-VAE (diffusers `AutoencoderKL`) as used by REPA/REGLUE: moments stored at
  preparation time, latents sampled from them and scaled by 0.18215.

Preprocessing and feature extraction follow the REGLUE code (github.com/giorgospets/reglue,
`train.py` / `calc_norm_stats.py`): uint8 -> /255 -> ImageNet mean/std -> bicubic resize to
224 * H / 256 -> `get_intermediate_layers(n=(8, 9, 10, 11), reshape=True, norm=True,
return_class_token=True)`, i.e. every chosen block's output goes through the model's final
LayerNorm, registers and [CLS] are dropped, and the blocks are concatenated on channels. The
[CLS] token and the REPA tokens come from the final block after the final norm (REGLUE takes
them from the last requested block, 11, which is the final block of ViT-B). Positional
embeddings: the torch.hub `dinov2_vitb14_reg` resamples its 37x37 table to the input grid with
bicubic + antialias at run time; timm does the same resampling once at load time, so the two
agree.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from reglue.integrity import load_safetensors, save_safetensors
from reglue.models.attention import Attention
from reglue.runtime import seeded_init

__all__ = [
    "LATENT_SCALE",
    "DINOV2_HUB_WEIGHTS",
    "DINOV2_NOREG_HUB_WEIGHTS",
    "EncoderOutput",
    "DINOv2Encoder",
    "build_dinov2",
    "tiny_dinov2",
    "FeatureStats",
    "RunningMoments",
    "compute_feature_stats",
    "PCA",
    "semantic_target",
    "VAE",
    "build_vae",
    "frozen_dtype",
    "build_frozen_dinov2",
]

LATENT_SCALE = 0.18215
"""SD-VAE latent scaling: model latents are `z * LATENT_SCALE`."""

DINOV2_HUB_WEIGHTS = "hf-hub:timm/vit_base_patch14_reg4_dinov2.lvd142m"
"""The published DINOv2-B/14-reg4 weights on the Hugging Face hub, in timm's layout."""

DINOV2_NOREG_HUB_WEIGHTS = "hf-hub:timm/vit_base_patch14_dinov2.lvd142m"
"""The published DINOv2-B/14 weights without registers (torch.hub ``dinov2_vitb14``), in timm's layout."""

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


# --------------------------------------------------------------------------------------------
# DINOv2
# --------------------------------------------------------------------------------------------


class EncoderOutput(NamedTuple):
    """features: (N, len(layers) * C, g, g) normalised patch tokens of the chosen blocks;
    cls: (N, C) final [CLS] token after the final norm;
    tokens: (N, 1 + g * g, C) final-layer [CLS] + patch tokens after the final norm (REPA target)."""

    features: torch.Tensor
    cls: torch.Tensor
    tokens: torch.Tensor


class DINOv2Encoder(nn.Module):
    """Frozen timm DINOv2, with registers or without; see the module docstring for what it returns.

    model: a timm VisionTransformer with `img_size = image_size * 224 / 256`.
    image_size: the side of the uint8 images it is given (256 -> 224 ViT input, 512 -> 448).
    layers: block indices whose outputs form `features` (0-based; (8, 9, 10, 11) for ViT-B).
    """

    def __init__(self, model: nn.Module, image_size: int, layers: Sequence[int], attention: str = "auto"):
        super().__init__()
        depth = len(model.blocks)
        layers = tuple(int(i) for i in layers)
        if not layers or any(not 0 <= i < depth for i in layers):
            raise ValueError(f"layers must be block indices in [0, {depth}), got {layers}")
        for block in model.blocks:
            block.attn = _dispatched_attention(block.attn, attention)
        self.model = model
        self.image_size = int(image_size)
        self.layers = layers
        self.input_size = tuple(model.patch_embed.img_size)
        self.register_buffer("pixel_mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("pixel_std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)
        self.autocast_dtype: torch.dtype | None = None
        """Run under CUDA autocast in this dtype (weights, LayerNorms and residuals stay fp32, as the
        published code runs DINOv2 under mixed precision); None = the weights' dtype."""
        self.requires_grad_(False)
        self.eval()

    def train(self, mode: bool = True) -> "DINOv2Encoder":
        return super().train(False)  # frozen: a parent's .train() must not switch it

    @property
    def embed_dim(self) -> int:
        return self.model.embed_dim

    @property
    def feature_channels(self) -> int:
        return len(self.layers) * self.embed_dim

    @property
    def grid_size(self) -> int:
        return self.model.patch_embed.grid_size[0]

    def preprocess(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 (N, 3, H, W) -> ImageNet-normalised float (N, 3, 224H/256, 224W/256)."""
        if images.ndim != 4 or images.shape[1] != 3 or tuple(images.shape[-2:]) != (self.image_size,) * 2:
            raise ValueError(
                f"expected images of shape (N, 3, {self.image_size}, {self.image_size}), got {tuple(images.shape)}"
            )
        x = images.float().div(255.0)
        x = (x - self.pixel_mean) / self.pixel_std
        x = F.interpolate(x, size=self.input_size, mode="bicubic")
        return x.to(self.model.patch_embed.proj.weight.dtype)

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> EncoderOutput:
        x = self.preprocess(images)
        use_autocast = self.autocast_dtype is not None and x.is_cuda
        with torch.autocast("cuda", dtype=self.autocast_dtype or torch.bfloat16, enabled=use_autocast):
            final, intermediates = self.model.forward_intermediates(
                x, indices=list(self.layers), norm=True, output_fmt="NCHW"
            )
        prefix = self.model.num_prefix_tokens  # [CLS] then the registers (if any)
        return EncoderOutput(
            features=torch.cat(intermediates, dim=1),
            cls=final[:, 0],
            tokens=torch.cat([final[:, :1], final[:, prefix:]], dim=1),
        )


class ViTAttention(Attention):
    """Our attention called the way timm's Block calls it (``attn_mask``, ``is_causal``: DINOv2 sets neither)."""

    def forward(self, x: torch.Tensor, attn_mask=None, is_causal: bool = False) -> torch.Tensor:
        if attn_mask is not None or is_causal:
            raise ValueError("the frozen DINOv2 runs unmasked, non-causal attention only")
        return super().forward(x)


def _dispatched_attention(timm_attention: nn.Module, backend: str) -> nn.Module:
    """Our :class:`~reglue.models.attention.Attention` holding timm's own ``qkv``/``proj`` layers,
    so DINOv2 runs the same arithmetic through the one attention entry point (FA3/FA2 on a GPU).

    Only timm's plain attention (no QK-norm, output norm or gate, head_dim · heads = width) has
    this form; anything else is an error rather than a silent change of the encoder.
    """
    plain = (
        all(isinstance(getattr(timm_attention, name, nn.Identity()), nn.Identity) for name in ("q_norm", "k_norm", "norm"))
        and getattr(timm_attention, "gate", None) is None
        and timm_attention.qkv.out_features == 3 * timm_attention.proj.in_features
        and timm_attention.num_heads * timm_attention.head_dim == timm_attention.proj.in_features
    )
    if not plain:
        raise ValueError(f"unsupported DINOv2 attention layout for our attention dispatch: {timm_attention}")
    with torch.device("meta"):  # its own layers are replaced by timm's at once
        attention = ViTAttention(timm_attention.proj.in_features, timm_attention.num_heads, backend=backend)
    attention.qkv, attention.proj = timm_attention.qkv, timm_attention.proj
    return attention


def _load_vit_weights(model: nn.Module, path: str) -> None:
    """Load a local DINOv2 state dict (timm layout, or the original facebookresearch layout,
    which timm's filter converts) and resample its positional embeddings to the model's grid."""
    from timm.models.vision_transformer import checkpoint_filter_fn

    if path.endswith(".safetensors"):
        state_dict = load_safetensors(path)[0]  # published weights carry no checksum: read unverified
    else:
        state_dict = torch.load(path, map_location="cpu", weights_only=True)
    state_dict = checkpoint_filter_fn(state_dict, model)
    if isinstance(model.head, nn.Identity):
        state_dict = {k: v for k, v in state_dict.items() if not k.startswith("head.")}
    missing, unexpected = model.load_state_dict(state_dict, strict=False)
    if missing or unexpected:
        raise ValueError(f"{path} does not fit the DINOv2 model: missing keys {missing}, unexpected keys {unexpected}")


def build_dinov2(
    model_name: str = "vit_base_patch14_reg4_dinov2",
    weights: str | os.PathLike | None = None,
    image_size: int = 256,
    layers: Sequence[int] = (8, 9, 10, 11),
    attention: str = "auto",
    **timm_overrides,
) -> DINOv2Encoder:
    """Build the frozen DINOv2 encoder through timm (never torch.hub).

    weights: None = random init (tests, demo); a local `.safetensors` / `.pth` state dict; or a
        timm pretrained name, e.g. DINOV2_HUB_WEIGHTS or "vit_base_patch14_reg4_dinov2.lvd142m"
        (downloads through timm / huggingface_hub; the name then also fixes the architecture).
    image_size: side of the uint8 input images; must be a multiple of 16 so that the resized
        side 224 * image_size / 256 is a multiple of the 14-pixel patch.
    attention: backend of ``reglue.models.attention.attention`` its blocks run (auto: FA3 -> ... -> SDPA).
    timm_overrides: extra `timm.create_model` keywords (embed_dim, depth, num_heads, ...).
    """
    import timm

    if image_size % 16:
        raise ValueError(f"image_size must be a multiple of 16 (224/256 of it a multiple of 14), got {image_size}")
    kwargs = dict(img_size=image_size * 224 // 256, num_classes=0, **timm_overrides)
    if weights is None:
        model = timm.create_model(model_name, pretrained=False, **kwargs)
    elif os.path.isfile(weights):
        model = timm.create_model(model_name, pretrained=False, **kwargs)
        _load_vit_weights(model, os.fspath(weights))
    elif str(weights).endswith((".safetensors", ".pth", ".pt", ".bin")):
        raise FileNotFoundError(f"DINOv2 weights file not found: {weights}")
    else:
        model = timm.create_model(str(weights), pretrained=True, **kwargs)
    return DINOv2Encoder(model, image_size=image_size, layers=layers, attention=attention)


def tiny_dinov2(
    embed_dim: int = 32,
    depth: int = 4,
    num_heads: int = 2,
    image_size: int = 64,
    layers: Sequence[int] = (0, 1, 2, 3),
    seed: int = 0,
) -> DINOv2Encoder:
    """A random DINOv2 of the same architecture (patch 14, 4 registers) for tests and the CPU
    demo; deterministic in `seed`. 64x64 images give a 4x4 grid of patches."""
    with seeded_init(seed):
        return build_dinov2(
            image_size=image_size, layers=layers, embed_dim=embed_dim, depth=depth, num_heads=num_heads
        )


# --------------------------------------------------------------------------------------------
# Feature statistics
# --------------------------------------------------------------------------------------------


def _load_legacy_stats(path: str) -> dict:
    """The published REGLUE stats (`norm_stats/*.pth`) are torch pickles of numpy arrays; allow
    exactly the numpy globals they need (under numpy 1.x and 2.x names), nothing else."""
    import numpy as np

    try:
        reconstruct = np._core.multiarray._reconstruct
    except AttributeError:  # numpy 1.x
        reconstruct = np.core.multiarray._reconstruct
    allowed = [
        (reconstruct, "numpy.core.multiarray._reconstruct"),
        (reconstruct, "numpy._core.multiarray._reconstruct"),
        np.ndarray,
        np.dtype,
        *(type(np.dtype(t)) for t in (np.float16, np.float32, np.float64)),  # dtype classes, numpy >= 1.25
    ]
    with torch.serialization.safe_globals(allowed):
        return torch.load(path, map_location="cpu", weights_only=True)


@dataclass
class FeatureStats:
    """Per-channel mean and std of encoder features; both (C,) float32."""

    mean: torch.Tensor
    std: torch.Tensor

    def __post_init__(self):
        self.mean = torch.as_tensor(self.mean, dtype=torch.float32)
        self.std = torch.as_tensor(self.std, dtype=torch.float32)
        if self.mean.ndim != 1 or self.mean.shape != self.std.shape:
            raise ValueError(f"mean and std must both be (C,), got {tuple(self.mean.shape)} and {tuple(self.std.shape)}")

    @property
    def channels(self) -> int:
        return self.mean.numel()

    def to(self, device) -> "FeatureStats":
        return FeatureStats(self.mean.to(device), self.std.to(device))

    def normalize(self, features: torch.Tensor) -> torch.Tensor:
        """(features - mean) / std over channel dim 1 of (N, C, H, W); computed in fp32,
        returned in the features' dtype."""
        if features.ndim != 4 or features.shape[1] != self.channels:
            raise ValueError(f"expected features (N, {self.channels}, H, W), got {tuple(features.shape)}")
        mean = self.mean.to(features.device).view(1, -1, 1, 1)
        std = self.std.to(features.device).view(1, -1, 1, 1)
        return ((features.float() - mean) / std).to(features.dtype)

    def save(self, path: str | os.PathLike) -> None:
        save_safetensors({"mean": self.mean.cpu().contiguous(), "std": self.std.cpu().contiguous()}, path)

    @classmethod
    def load(cls, path: str | os.PathLike) -> "FeatureStats":
        """From our `.safetensors` (its checksum verified), or the published REGLUE `.pth` ({'mean',
        'std'} numpy arrays, which carry no checksum of ours: read unverified)."""
        path = os.fspath(path)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"feature statistics not found: {path}")
        if path.endswith(".safetensors"):
            data = load_safetensors(path, fix="compute them again (`reglue stats`)")[0]
        else:
            data = _load_legacy_stats(path)
        try:
            return cls(mean=torch.as_tensor(data["mean"]), std=torch.as_tensor(data["std"]))
        except (KeyError, TypeError) as err:
            raise ValueError(f"{path}: expected 'mean' and 'std' entries") from err


class RunningMoments:
    """Streaming per-channel count, mean and sum of squared deviations (M2), in float64.

    `update` folds in a batch; `merge` combines two partial results (Chan et al.'s parallel
    update), so shards computed on different ranks or files can be reduced in any order.
    With `covariance=True`, M2 is the full (C, C) co-moment matrix Σ (x - mean)(x - mean)ᵀ
    instead of its diagonal (C,): the streamed covariance of FID statistics.
    """

    def __init__(self, count: int = 0, mean: torch.Tensor | None = None, m2: torch.Tensor | None = None,
                 covariance: bool = False):
        self.count = int(count)
        self.mean = mean
        self.m2 = m2
        self.covariance = covariance

    @torch.no_grad()
    def update(self, x: torch.Tensor, max_chunk_elements: int = 1 << 24) -> "RunningMoments":
        """x: (N, C, ...) with channels on dim 1, or (M, C). Chunked so that the float64 copy
        stays below `max_chunk_elements` elements."""
        rows = x.movedim(1, -1).reshape(-1, x.shape[1])
        step = max(1, max_chunk_elements // rows.shape[1])
        for chunk in rows.split(step):
            chunk = chunk.double()
            mean = chunk.mean(dim=0)
            centered = chunk - mean
            m2 = centered.T @ centered if self.covariance else centered.square().sum(dim=0)
            self.merge(RunningMoments(chunk.shape[0], mean, m2, self.covariance))
        return self

    @torch.no_grad()
    def merge(self, other: "RunningMoments") -> "RunningMoments":
        if other.count == 0:
            return self
        if self.count == 0:
            self.count, self.mean, self.m2 = other.count, other.mean.clone(), other.m2.clone()
            return self
        n_a, n_b = self.count, other.count
        n = n_a + n_b
        delta = other.mean.to(self.mean) - self.mean
        self.mean = self.mean + delta * (n_b / n)
        spread = torch.outer(delta, delta) if self.m2.ndim == 2 else delta.square()
        self.m2 = self.m2 + other.m2.to(self.m2) + spread * (n_a * n_b / n)
        self.count = n
        return self

    def stats(self, min_std: float = 1e-6) -> FeatureStats:
        """Population mean/std (like numpy's default, as REGLUE computes them); std clamped at
        `min_std` so a constant channel cannot divide by zero."""
        if self.count == 0:
            raise ValueError("no samples seen")
        std = (self.m2 / self.count).sqrt().clamp_min(min_std)
        return FeatureStats(self.mean.float().cpu(), std.float().cpu())


def compute_feature_stats(batches: Iterable[torch.Tensor]) -> FeatureStats:
    """Per-channel statistics over an iterable of (N, C, H, W) feature batches."""
    moments = RunningMoments()
    for batch in batches:
        moments.update(batch)
    return moments.stats()


# --------------------------------------------------------------------------------------------
# PCA (ReDi)
# --------------------------------------------------------------------------------------------


class PCA(nn.Module):
    """Principal components of per-pixel feature vectors, the ReDi semantic reducer.

    ReDi (github.com/zelaki/ReDi, `calc_pca.py` / `train_redi.py`) standardises the DINOv2
    features, fits `sklearn.decomposition.PCA(whiten=False)` and feeds `(f - pca_mean) @
    components[:k].T` to the model. We keep that default (`whiten=False`) so ReDi runs
    reproduce; the leading components of standardised features then have variances well above 1
    (the eigenvalues), larger than the scaled VAE latents. `whiten=True` divides each component by
    its standard deviation so the semantic channels have unit variance like the latents.
    ReDi reduces the final block's patch tokens only: use DINOv2 `layers=(11,)` for it.

    Buffers (float32): mean (C,), components (k, C) orthonormal rows, explained_variance (k,).
    """

    def __init__(self, mean: torch.Tensor, components: torch.Tensor, explained_variance: torch.Tensor, whiten: bool = False):
        super().__init__()
        if components.ndim != 2 or mean.shape != components.shape[1:] or explained_variance.shape != components.shape[:1]:
            raise ValueError(
                f"inconsistent PCA shapes: mean {tuple(mean.shape)}, components {tuple(components.shape)}, "
                f"explained_variance {tuple(explained_variance.shape)}"
            )
        self.register_buffer("mean", mean.float().contiguous())
        self.register_buffer("components", components.float().contiguous())
        self.register_buffer("explained_variance", explained_variance.float().contiguous())
        self.whiten = bool(whiten)

    @property
    def in_channels(self) -> int:
        return self.components.shape[1]

    @property
    def latent_channels(self) -> int:
        return self.components.shape[0]

    @classmethod
    @torch.no_grad()
    def fit(cls, features: torch.Tensor, n_components: int = 8, whiten: bool = False,
            max_chunk_elements: int = 1 << 24) -> "PCA":
        """features: (N, C, H, W) sample; every pixel is one C-vector. The sum and the sum of
        outer products are accumulated in float64 chunk by chunk, then :meth:`from_moments`."""
        channels = features.shape[1]
        rows = features.movedim(1, -1).reshape(-1, channels)
        step = max(1, max_chunk_elements // channels)
        total = torch.zeros(channels, dtype=torch.float64, device=features.device)
        outer = torch.zeros(channels, channels, dtype=torch.float64, device=features.device)
        for chunk in rows.split(step):
            chunk = chunk.double()
            total += chunk.sum(dim=0)
            outer += chunk.T @ chunk
        return cls.from_moments(rows.shape[0], total, outer, n_components, whiten=whiten)

    @classmethod
    @torch.no_grad()
    def from_moments(cls, count: int, sum: torch.Tensor, sum_outer: torch.Tensor, n_components: int,
                     whiten: bool = False) -> "PCA":
        """The PCA of ``count`` C-vectors x given ``sum`` = Σx (C,) and ``sum_outer`` = Σx xᵀ (C, C),
        e.g. accumulated over a dataset in a stream (``reglue stats --pca``). The population
        covariance (like sklearn's explained_variance up to its n/(n-1)) is diagonalised in float64
        with eigh; each component's sign is fixed so that its largest-magnitude entry is positive."""
        count = int(count)
        channels = sum.shape[-1]
        if sum.shape != (channels,) or sum_outer.shape != (channels, channels):
            raise ValueError(f"expected sum (C,) and sum_outer (C, C), got {tuple(sum.shape)} and {tuple(sum_outer.shape)}")
        if not 0 < n_components <= channels:
            raise ValueError(f"n_components must be in [1, {channels}], got {n_components}")
        if count < 2:
            raise ValueError("PCA needs at least two feature vectors")
        mean = sum.double() / count
        cov = sum_outer.double() / count - torch.outer(mean, mean)
        cov = (cov + cov.T) / 2
        eigenvalues, eigenvectors = torch.linalg.eigh(cov)  # ascending
        order = eigenvalues.argsort(descending=True)[:n_components]
        components = eigenvectors[:, order].T
        signs = components.gather(1, components.abs().argmax(dim=1, keepdim=True)).sign()
        components = components * signs
        variance = eigenvalues[order].clamp_min(0)
        return cls(mean.cpu(), components.cpu(), variance.cpu(), whiten=whiten)

    def _scale(self) -> torch.Tensor:
        return self.explained_variance.clamp_min(1e-12).sqrt().view(1, -1, 1, 1)

    def encode(self, features: torch.Tensor) -> torch.Tensor:
        """(N, C, H, W) -> (N, k, H, W), float32."""
        x = features.to(self.components.dtype) - self.mean.view(1, -1, 1, 1)
        z = torch.einsum("nchw,kc->nkhw", x, self.components)
        return z / self._scale() if self.whiten else z

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """(N, k, H, W) -> (N, C, H, W): the projection back onto the component span."""
        z = z.to(self.components.dtype)
        if self.whiten:
            z = z * self._scale()
        return torch.einsum("nkhw,kc->nchw", z, self.components) + self.mean.view(1, -1, 1, 1)

    def save(self, path: str | os.PathLike) -> None:
        tensors = {k: v.cpu().contiguous() for k, v in self.state_dict().items()}
        save_safetensors(tensors, path, metadata={"whiten": str(int(self.whiten))})

    @classmethod
    def load(cls, path: str | os.PathLike) -> "PCA":
        """A file of :meth:`save`, its checksum verified."""
        tensors, metadata = load_safetensors(path, fix="fit it again (`reglue stats --pca`)")
        whiten = metadata.get("whiten", "0") == "1"
        return cls(tensors["mean"], tensors["components"], tensors["explained_variance"], whiten=whiten)


# --------------------------------------------------------------------------------------------
# Semantic target
# --------------------------------------------------------------------------------------------


@torch.no_grad()
def semantic_target(features: torch.Tensor, stats: FeatureStats, reducer: nn.Module, grid: int) -> torch.Tensor:
    """The semantic channels the SiT models next to the VAE latents.

    features: (N, C, g, g) from DINOv2Encoder; stats: their per-channel statistics; reducer: a
    SemanticCompressor (in eval mode: its BatchNorms must use running statistics) or a PCA,
    anything with `.encode`; grid: latent side (32 for 256x256 images).
    Returns (N, reducer.latent_channels, grid, grid), resized bilinearly (align_corners=False).
    """
    z = reducer.encode(stats.normalize(features))
    if tuple(z.shape[-2:]) != (grid, grid):
        z = F.interpolate(z, size=(grid, grid), mode="bilinear", align_corners=False)
    return z


# --------------------------------------------------------------------------------------------
# SD-VAE
# --------------------------------------------------------------------------------------------


class VAE(nn.Module):
    """Frozen diffusers AutoencoderKL with the REPA/REGLUE conventions.

    encode_moments: uint8 (N, 3, H, W) -> (N, 2 * 4, H/8, W/8) = cat(mean, std) of the latent
        Gaussian (images mapped to [-1, 1] as x / 127.5 - 1); what data preparation stores.
    sample_latents: moments -> (mean + std * eps) * LATENT_SCALE, the model's latent channels.
    decode: model latents (N, 4, h, w) -> uint8 images (N, 3, 8h, 8w).
    """

    def __init__(self, autoencoder: nn.Module):
        super().__init__()
        self.autoencoder = autoencoder
        self.requires_grad_(False)
        self.eval()

    def train(self, mode: bool = True) -> "VAE":
        return super().train(False)

    @property
    def latent_channels(self) -> int:
        return self.autoencoder.config.latent_channels

    @property
    def downsample_factor(self) -> int:
        return 2 ** (len(self.autoencoder.config.block_out_channels) - 1)

    @property
    def dtype(self) -> torch.dtype:
        return next(self.autoencoder.parameters()).dtype

    @torch.no_grad()
    def encode_moments(self, images: torch.Tensor) -> torch.Tensor:
        x = (images.float() / 127.5 - 1.0).to(self.dtype)
        dist = self.autoencoder.encode(x).latent_dist
        return torch.cat([dist.mean, dist.std], dim=1)

    @staticmethod
    def sample_latents(moments: torch.Tensor, generator: torch.Generator | None = None,
                       eps: torch.Tensor | None = None) -> torch.Tensor:
        """(mean + std * eps) * 0.18215 from (N, 8, h, w) moments; ``eps`` drawn unless given."""
        mean, std = moments.chunk(2, dim=1)
        if eps is None:
            eps = torch.randn(mean.shape, generator=generator, device=mean.device, dtype=mean.dtype)
        return (mean + std * eps.to(mean.dtype)) * LATENT_SCALE

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Like REGLUE's generate.py: ((x + 1) / 2 * 255).clamp(0, 255) truncated to uint8, so
        evaluation images match the published pipeline bit for bit given the same decoder output."""
        x = self.autoencoder.decode(latents.to(self.dtype) / LATENT_SCALE).sample
        return ((x.float() + 1) / 2 * 255).clamp(0, 255).to(torch.uint8)


def build_vae(name_or_path: str | os.PathLike = "stabilityai/sd-vae-ft-ema", seed: int = 0, run_dir=None,
              fit_images=None, is_main: bool = True):
    """`AutoencoderKL.from_pretrained` for a hub name or local folder, or "tiny-random": a small
    random AutoencoderKL (4 latent channels, downsample 8, width 16) for tests, deterministic in
    `seed`; or a patch autoencoder (:mod:`reglue.models.autoencoder`, the CPU demo's):
    "patch-pca" is the one of the run in `run_dir`, fitted now from `fit_images(n)` (uint8 images)
    if given and not saved there yet, and a `.safetensors` path is one saved before."""
    if os.fspath(name_or_path) == "patch-pca" or os.fspath(name_or_path).endswith(".safetensors"):
        from reglue.models.autoencoder import build_patch_autoencoder

        return build_patch_autoencoder(os.fspath(name_or_path), run_dir, fit_images, is_main)
    from diffusers import AutoencoderKL

    if os.fspath(name_or_path) != "tiny-random":
        return VAE(AutoencoderKL.from_pretrained(os.fspath(name_or_path)))
    with seeded_init(seed):
        autoencoder = AutoencoderKL(
            down_block_types=("DownEncoderBlock2D",) * 4,
            up_block_types=("UpDecoderBlock2D",) * 4,
            block_out_channels=(16, 16, 16, 16),
            layers_per_block=1,
            latent_channels=4,
            norm_num_groups=8,
            sample_size=64,
        )
    return VAE(autoencoder)


def frozen_dtype(name: str, device: torch.device) -> torch.dtype:
    """Compute dtype of the frozen encoders: ``name`` (bf16/fp16/fp32) on CUDA, fp32 on the CPU."""
    if device.type != "cuda":
        return torch.float32
    return {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[name]


def build_frozen_dinov2(config, device: torch.device, image_size: int | None = None,
                        attention: str = "auto") -> DINOv2Encoder:
    """The frozen DINOv2 of a run config (``reglue.config.Config``) on ``device``, fp32 weights run
    under autocast in the frozen dtype on CUDA, for images of ``image_size`` (default ``data.image_size``).

    Random-initialised encoders (``encoders.dinov2_weights`` None: tests, the tiny demo) are seeded
    by ``train.seed``, so training, ``reglue stats`` and every rank build the same network.
    """
    enc = config.encoders
    with seeded_init(config.train.seed):
        encoder = build_dinov2(enc.dinov2, enc.dinov2_weights, image_size=image_size or config.data.image_size,
                               layers=enc.feature_layers, attention=attention, **enc.dinov2_overrides)
    dtype = frozen_dtype(enc.dtype, device)
    encoder.autocast_dtype = dtype if dtype != torch.float32 else None
    return encoder.to(device=device).eval()
