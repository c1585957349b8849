"""The InceptionV3 features OpenAI's ADM evaluator scores with, from torch-fidelity's network.

The ADM evaluator (``evaluations/evaluator.py`` in the published REGLUE/REG/REPA repositories,
from openai/guided-diffusion) runs TensorFlow's 2015-12-05 Inception graph
(``classify_image_graph_def.pb``) on NHWC float images in [0, 255] fed at ``ExpandDims:0`` and
reads three tensors:

- ``pool_3:0``: (N, 2048), for FID and precision/recall;
- ``mixed_6/conv:0[..., :7]``: the first 7 channels of the 1x1-convolution branch of the
  ``mixed_6`` block, (N, 17, 17, 7) in TensorFlow's NHWC layout, flattened to (N, 2023), for sFID.
  torch-fidelity's weight converter (``utils/util_convert_inception_weights.py``) maps
  ``mixed_6/conv`` to ``Mixed_6d.branch1x1`` (mixed_3 is Mixed_6a, the 35->17 reduction); its
  output is NCHW, so we permute to NHWC before flattening, or the sFID statistics of the reference
  batches (computed in NHWC order) do not match;
- ``softmax/logits/MatMul``'s weight applied to ``pool_3`` *without the bias*: (N, 1008) logits
  whose softmax gives the Inception Score.

torch-fidelity's ``FeatureExtractorInceptionV3`` is a TensorFlow-exact port of that graph (TF1
``resize_bilinear`` to 299x299 without corner alignment, ``(x - 128) / 128``, TF's average-pool
padding, the max-pool quirk of ``mixed_10``); it gives ``2048`` and ``logits_unbiased`` itself and
we take the ``mixed_6/conv`` tensor with a forward hook on ``Mixed_6d.branch1x1`` (after its
batch-norm and ReLU, which is what the graph's ``mixed_6/conv`` node outputs). The network runs in
fp32 with TF32 off (cuDNN convolutions and matmuls), for agreement with the TF evaluator.

Weights
-------
torch-fidelity's converted weights, ``weights-inception-2015-12-05-6726825d.pth`` (released at
``URL_INCEPTION_V3``; 95,628,359 bytes, 566 tensors). They are never downloaded here: pass
``--inception-weights FILE``, or place the file where torch-fidelity caches it
(``torch.hub.get_dir()/checkpoints``, i.e. ``$TORCH_HOME/hub/checkpoints``, by default
``~/.cache/torch/hub/checkpoints``). The file is checked against its SHA-256 before it is loaded
with ``torch.load(weights_only=True)`` (no pickled code runs). The digest: the file name's
``6726825d`` is torch.hub's convention for the SHA-256 prefix (``torch.hub.download_url_to_file``
checks it), and the full digest ``INCEPTION_SHA256`` is the one several independent public
projects record for this file (with the same size and tensor count); a file with another digest
is refused with both digests in the message.

torch-fidelity's constructor always fetches weights itself (a download, or ``torch.load(path,
weights_only=False)``); :class:`_TorchFidelityInceptionV3` lets it build the modules on an empty
state dict that we serialise ourselves and then loads the checked weights, so neither happens.

``weights="random"`` builds a seeded random network of the same architecture (He-initialised
convolutions so activations keep an O(1) scale through the 94 ReLU layers) for tests and CI:
every number computed with it is meaningless, and :attr:`InceptionFeatureExtractor.is_random`
makes the callers say so.
"""

from __future__ import annotations

import hashlib
import io
import os
from contextlib import contextmanager
from pathlib import Path
from typing import NamedTuple, Optional, Union

import torch
import torch.nn as nn

from reglue.runtime import seeded_init

__all__ = [
    "INCEPTION_FILE",
    "INCEPTION_SHA256",
    "INCEPTION_URL",
    "POOL_DIM",
    "SPATIAL_DIM",
    "LOGITS_DIM",
    "SPATIAL_MODULE",
    "InceptionFeatures",
    "InceptionFeatureExtractor",
    "inception_search_paths",
    "resolve_inception_weights",
    "build_inception",
    "ieee_fp32",
    "to_nchw_uint8",
]

INCEPTION_FILE = "weights-inception-2015-12-05-6726825d.pth"
INCEPTION_URL = "https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/" + INCEPTION_FILE
INCEPTION_SHA256 = "6726825d0af5f729cebd5821db510b11b1cfad8faad88a03f1befd49fb9129b2"
INCEPTION_BYTES = 95_628_359

POOL_DIM = 2048
SPATIAL_CHANNELS = 7
SPATIAL_GRID = 17
SPATIAL_DIM = SPATIAL_GRID * SPATIAL_GRID * SPATIAL_CHANNELS  # 2023
LOGITS_DIM = 1008
SPATIAL_MODULE = "Mixed_6d.branch1x1"
"""torch-fidelity's module for TF's ``mixed_6/conv`` (its weight converter's mapping)."""

RANDOM = "random"


class InceptionFeatures(NamedTuple):
    """pool: (N, 2048) ``pool_3``; spatial: (N, 2023) ``mixed_6/conv[..., :7]`` flattened in NHWC
    order; logits: (N, 1008) ``pool_3 @ W`` without the bias. All float32."""

    pool: torch.Tensor
    spatial: torch.Tensor
    logits: torch.Tensor


# --------------------------------------------------------------------------------------------
# Weights: where, which, checked
# --------------------------------------------------------------------------------------------


def inception_search_paths() -> list[Path]:
    """Where the weights are looked for without ``--inception-weights``: torch-fidelity's cache
    (torch.hub's ``checkpoints`` folder, which honours ``$TORCH_HOME`` and ``$XDG_CACHE_HOME``)."""
    return [Path(torch.hub.get_dir()) / "checkpoints" / INCEPTION_FILE]


def resolve_inception_weights(weights: Union[str, os.PathLike, None]) -> Optional[Path]:
    """The weights file to load (None for ``"random"``); FileNotFoundError naming the expected
    file and every place searched when there is none."""
    if weights is not None and str(weights) == RANDOM:
        return None
    if weights is not None:
        path = Path(weights)
        if not path.is_file():
            raise FileNotFoundError(f"--inception-weights {path}: no such file (expected torch-fidelity's {INCEPTION_FILE}, "
                                    f"from {INCEPTION_URL})")
        return path
    candidates = inception_search_paths()
    for path in candidates:
        if path.is_file():
            return path
    raise FileNotFoundError(
        f"InceptionV3 weights not found: looked for {INCEPTION_FILE} in {', '.join(str(p.parent) for p in candidates)} "
        f"(torch-fidelity's cache; $TORCH_HOME moves it). Download it once from {INCEPTION_URL} into that folder, "
        f"or pass --inception-weights FILE")


def sha256_file(path: Path, chunk_bytes: int = 1 << 22) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(chunk_bytes):
            digest.update(chunk)
    return digest.hexdigest()


def load_checked_state_dict(path: Path) -> dict:
    """The weights at ``path`` after their SHA-256 matched ``INCEPTION_SHA256``, loaded weights-only."""
    digest = sha256_file(path)
    if digest != INCEPTION_SHA256:
        size = path.stat().st_size
        hint = f"truncated ({size:,} of {INCEPTION_BYTES:,} bytes)" if size < INCEPTION_BYTES else "a different file"
        raise ValueError(f"{path}: SHA-256 {digest} is not that of torch-fidelity's {INCEPTION_FILE} ({INCEPTION_SHA256}); "
                         f"it is {hint}: download it again from {INCEPTION_URL}")
    try:
        state_dict = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # the unpickler's refusal or a damaged archive: name the file, not the internals
        raise ValueError(f"{path}: not loadable as plain weights ({type(err).__name__}: {str(err).splitlines()[0]})") from err
    if not isinstance(state_dict, dict):
        raise ValueError(f"{path}: expected a state dict, found {type(state_dict).__name__}")
    return state_dict


# --------------------------------------------------------------------------------------------
# The network
# --------------------------------------------------------------------------------------------


def _torch_fidelity_class():
    from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

    class _TorchFidelityInceptionV3(FeatureExtractorInceptionV3):
        """torch-fidelity's network with the weight loading of its constructor skipped (see the
        module docstring): the constructor's ``load_state_dict`` of our empty dict is a no-op."""

        def __init__(self):
            empty = io.BytesIO()
            torch.save({}, empty)
            empty.seek(0)
            self._building = True
            super().__init__("reglue-inception-v3", ["2048", "logits_unbiased"], feature_extractor_weights_path=empty,
                             feature_extractor_internal_dtype="float32")
            self._building = False

        def load_state_dict(self, state_dict, *args, **kwargs):
            if getattr(self, "_building", False):
                return None
            return super().load_state_dict(state_dict, *args, **kwargs)

    return _TorchFidelityInceptionV3


@contextmanager
def ieee_fp32():
    """fp32 convolutions and matmuls without TF32 inside the block (restored after)."""
    cuda_mm, cudnn_conv = torch.backends.cuda.matmul, torch.backends.cudnn.conv
    if hasattr(cudnn_conv, "fp32_precision"):  # torch >= 2.9
        saved = (cuda_mm.fp32_precision, cudnn_conv.fp32_precision)
        cuda_mm.fp32_precision = cudnn_conv.fp32_precision = "ieee"
        try:
            yield
        finally:
            cuda_mm.fp32_precision, cudnn_conv.fp32_precision = saved
    else:
        saved = (cuda_mm.allow_tf32, torch.backends.cudnn.allow_tf32)
        cuda_mm.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
        try:
            yield
        finally:
            cuda_mm.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def to_nchw_uint8(images: torch.Tensor) -> torch.Tensor:
    """uint8 images (N, H, W, 3) or (N, 3, H, W) -> (N, 3, H, W) (a view; no copy)."""
    if images.dtype != torch.uint8 or images.ndim != 4:
        raise ValueError(f"expected uint8 images (N, H, W, 3) or (N, 3, H, W), got {images.dtype} {tuple(images.shape)}")
    channels_last, channels_first = images.shape[-1] == 3, images.shape[1] == 3
    if channels_last == channels_first:
        raise ValueError(f"cannot tell the channel axis of images shaped {tuple(images.shape)}: "
                         "expected (N, H, W, 3) or (N, 3, H, W) with H, W != 3")
    return images.permute(0, 3, 1, 2) if channels_last else images


class InceptionFeatureExtractor(nn.Module):
    """uint8 image batches -> :class:`InceptionFeatures` on the network's device.

    weights: a file path, None (torch-fidelity's cache, see :func:`resolve_inception_weights`) or
        ``"random"`` (seeded random network, tests only: :attr:`is_random`).
    """

    def __init__(self, weights: Union[str, os.PathLike, None] = None, seed: int = 0):
        super().__init__()
        path = resolve_inception_weights(weights)
        state_dict = load_checked_state_dict(path) if path is not None else None
        with seeded_init(seed):
            self.net = _torch_fidelity_class()()
            if state_dict is None:
                self._he_init()
        if state_dict is not None:
            try:
                self.net.load_state_dict(state_dict)
            except RuntimeError as err:
                raise ValueError(f"{path}: does not fit torch-fidelity's InceptionV3: {str(err).splitlines()[0]}") from err
        self.weights_path = path
        self.requires_grad_(False)
        self.eval()
        self._spatial: Optional[torch.Tensor] = None
        self.net.get_submodule(SPATIAL_MODULE).register_forward_hook(self._keep_spatial)

    @property
    def is_random(self) -> bool:
        return self.weights_path is None

    def describe(self) -> str:
        """What network this is, for logs and results files."""
        if self.is_random:
            return "RANDOM InceptionV3 weights (seeded, tests/CI only): these scores are meaningless"
        return f"torch-fidelity InceptionV3 {self.weights_path} (sha256 {INCEPTION_SHA256[:16]}...)"

    def _he_init(self) -> None:
        for module in self.net.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, nonlinearity="relu")
            elif isinstance(module, nn.Linear):
                nn.init.normal_(module.weight, std=module.in_features**-0.5)

    def _keep_spatial(self, module, inputs, output: torch.Tensor) -> None:
        # (N, 192, 17, 17) NCHW -> first 7 channels -> NHWC -> (N, 2023); reshape copies, so the
        # later in-place ReLUs of the network cannot touch it.
        self._spatial = output[:, :SPATIAL_CHANNELS].permute(0, 2, 3, 1).reshape(output.shape[0], -1).float()

    @property
    def device(self) -> torch.device:
        return self.net.fc.weight.device

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> InceptionFeatures:
        """images: uint8 (N, H, W, 3) or (N, 3, H, W), any size (resized to 299 as TF does)."""
        images = to_nchw_uint8(images).to(self.device, non_blocking=True)
        with ieee_fp32():
            pool, logits = self.net(images)
        spatial, self._spatial = self._spatial, None
        return InceptionFeatures(pool=pool, spatial=spatial, logits=logits)


def build_inception(weights: Union[str, os.PathLike, None] = None, device: Union[str, torch.device] = "cpu",
                    seed: int = 0) -> InceptionFeatureExtractor:
    """:class:`InceptionFeatureExtractor` on ``device``."""
    return InceptionFeatureExtractor(weights, seed=seed).to(device)
