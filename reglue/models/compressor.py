"""Semantic compressor: a small convolutional auto-encoder that squeezes the concatenated DINOv2
features (e.g. 4 blocks x 768 = 3072 channels) into a few channels (16) that the SiT models
jointly with the VAE latents.

The module tree, and so every state-dict key, equals the published REGLUE compressor
(`compressor.py`, `EncoderDecoder` in github.com/giorgospets/reglue), so its checkpoint
`compression_model.pth` loads with `strict=True` through :func:`load_compressor`. For
`channels=(3072, 256, 16)` the keys are::

    encoder.model.0.{weight (256,3072,3,3), bias}                     conv 3072 -> 256
    encoder.model.1.conv{1,2}.{weight (256,256,3,3), bias}            residual block convs
    encoder.model.1.bn{1,2}.{weight, bias, running_mean, running_var, num_batches_tracked}
    encoder.model.2.{weight (16,256,3,3), bias}                       conv 256 -> 16
    decoder.model.{0,1,2}...                                          the mirror: 16 -> 256 -> 3072

Every conv, including the two inside the residual block, carries a bias: the published code
builds them with `nn.Conv2d(...)` defaults (`bias=True`) although a BatchNorm follows. We keep
those biases for strict loading; :meth:`SemanticCompressor.fold_batchnorm` absorbs them anyway.
"""

from __future__ import annotations

import copy
import os
from collections.abc import Mapping, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from reglue.models.state import check_state_dict
from reglue.runtime import clean_name

__all__ = ["ResidualBlock", "ConvStack", "SemanticCompressor", "load_compressor", "fold_bn_into_conv"]


class ResidualBlock(nn.Module):
    """relu(bn2(conv2(relu(bn1(conv1(x))))) + x), all convs 3x3, padding 1, same width.

    After :meth:`SemanticCompressor.fold_batchnorm` the `bn1`/`bn2` attributes are `nn.Identity`
    and the convs hold the folded weights; the forward is unchanged.
    """

    def __init__(self, channels: int):
        super().__init__()
        self.conv1 = nn.Conv2d(channels, channels, kernel_size=3, padding=1)
        self.bn1 = nn.BatchNorm2d(channels)
        self.conv2 = nn.Conv2d(channels, channels, kernel_size=3, padding=1)
        self.bn2 = nn.BatchNorm2d(channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + x)


class ConvStack(nn.Module):
    """`model = Sequential(conv3x3, ResidualBlock, conv3x3, ResidualBlock, ..., conv3x3)`.

    channels: widths from input to output; a residual block follows every conv but the last.
    """

    def __init__(self, channels: Sequence[int]):
        super().__init__()
        layers: list[nn.Module] = []
        for i, (c_in, c_out) in enumerate(zip(channels[:-1], channels[1:])):
            layers.append(nn.Conv2d(c_in, c_out, kernel_size=3, padding=1))
            if i < len(channels) - 2:
                layers.append(ResidualBlock(c_out))
        self.model = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)


class SemanticCompressor(nn.Module):
    """Conv auto-encoder over feature maps.

    channels: (in, hidden..., latent), e.g. (3072, 256, 16). The decoder uses the reversed list.
    encode: (N, channels[0], H, W) -> (N, channels[-1], H, W); decode is the inverse map;
    forward returns the reconstruction decode(encode(x)).
    """

    def __init__(self, channels: Sequence[int] = (3072, 256, 16)):
        super().__init__()
        channels = tuple(int(c) for c in channels)
        if len(channels) < 2 or min(channels) < 1:
            raise ValueError(f"channels must list at least two positive widths, got {channels}")
        self.channels = channels
        self.encoder = ConvStack(channels)
        self.decoder = ConvStack(channels[::-1])

    @property
    def in_channels(self) -> int:
        return self.channels[0]

    @property
    def latent_channels(self) -> int:
        return self.channels[-1]

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        return self.encoder(x)

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        return self.decoder(z)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.decode(self.encode(x))

    def fold_batchnorm(self) -> "SemanticCompressor":
        """An eval-mode, frozen copy with every BatchNorm folded into the conv before it.

        Each `bn` becomes `nn.Identity`; in eval mode the copy computes the same function as
        this module (up to fp32 rounding), with two fewer normalisation passes per block.
        """
        folded = copy.deepcopy(self).eval().requires_grad_(False)
        for block in folded.modules():
            if isinstance(block, ResidualBlock):
                block.conv1 = fold_bn_into_conv(block.conv1, block.bn1)
                block.conv2 = fold_bn_into_conv(block.conv2, block.bn2)
                block.bn1 = nn.Identity()
                block.bn2 = nn.Identity()
        return folded


@torch.no_grad()
def fold_bn_into_conv(conv: nn.Conv2d, bn: nn.BatchNorm2d) -> nn.Conv2d:
    """A conv equal to bn(conv(x)) with bn in eval mode (its running statistics).

    scale = gamma / sqrt(running_var + eps); W' = W * scale (per output channel);
    b' = (b - running_mean) * scale + beta. Computed in float64, stored in the conv's dtype.
    """
    if isinstance(bn, nn.Identity):  # already folded
        return conv
    if bn.running_mean is None or bn.running_var is None:
        raise ValueError("cannot fold a BatchNorm without running statistics")
    scale = bn.running_var.double().add(bn.eps).rsqrt()
    if bn.weight is not None:
        scale = scale * bn.weight.double()
    shift = -bn.running_mean.double() * scale
    if bn.bias is not None:
        shift = shift + bn.bias.double()
    bias = conv.bias.double() if conv.bias is not None else torch.zeros_like(shift)

    fused = copy.deepcopy(conv)
    if fused.bias is None:
        fused.bias = nn.Parameter(torch.empty_like(conv.weight[:, 0, 0, 0]))
    fused.weight.copy_((conv.weight.double() * scale.view(-1, 1, 1, 1)).to(conv.weight.dtype))
    fused.bias.copy_((bias * scale + shift).to(fused.bias.dtype))
    return fused


def _infer_channels(state_dict: Mapping[str, torch.Tensor]) -> tuple[int, ...]:
    """Widths from the encoder's top-level convs `encoder.model.<i>.weight` (4-D)."""
    convs = {}
    for key, value in state_dict.items():
        parts = key.split(".")
        if len(parts) == 4 and parts[:2] == ["encoder", "model"] and parts[3] == "weight" and parts[2].isdigit():
            if value.ndim == 4:
                convs[int(parts[2])] = value
    if not convs:
        raise ValueError(
            "cannot infer the compressor's channels: the checkpoint has no 'encoder.model.<i>.weight' "
            f"conv keys (first keys: {list(state_dict)[:5]}); pass channels=... explicitly"
        )
    weights = [convs[i] for i in sorted(convs)]
    return (weights[0].shape[1], *(w.shape[0] for w in weights))


def _read_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"compressor checkpoint not found: {path}")
    if path.endswith(".safetensors"):  # ours (`reglue train-compressor`) verified; published ones carry no checksum
        from reglue.integrity import load_safetensors

        return load_safetensors(path, fix="train it again (`reglue train-compressor`) or restore it")[0]
    state_dict = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(state_dict, Mapping):
        raise ValueError(f"{path}: expected a state dict (a mapping of names to tensors), got {type(state_dict)}")
    return dict(state_dict)


def load_compressor(
    path_or_state_dict: str | os.PathLike | Mapping[str, torch.Tensor],
    channels: Sequence[int] | None = None,
) -> SemanticCompressor:
    """Build a SemanticCompressor from a checkpoint and load it strictly; returned in eval mode.

    path_or_state_dict: a bare state dict, or a file holding one (`.safetensors`, or a torch
        pickle such as the published `compression_model.pth`). A leading `module.` (saved from
        DDP) is stripped from every key.
    channels: the widths; inferred from the conv shapes when None.
    Raises ValueError naming the missing keys, unexpected keys and shape mismatches.
    """
    if isinstance(path_or_state_dict, Mapping):
        state_dict = dict(path_or_state_dict)
    else:
        state_dict = _read_state_dict(path_or_state_dict)
    state_dict = {clean_name(k): v for k, v in state_dict.items()}

    model = SemanticCompressor(channels if channels is not None else _infer_channels(state_dict))
    check_state_dict(model.state_dict(), state_dict, f"SemanticCompressor(channels={model.channels})", limit=64)
    model.load_state_dict(state_dict, strict=True)
    return model.eval()
