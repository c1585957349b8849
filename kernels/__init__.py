"""Fused Triton kernels for reglue (installed as ``reglue.kernels``).

Each op has an eager reference (``*_ref``) beside it, runs as a ``torch.library`` custom op
(compile-able without graph breaks), and falls back to the reference with a one-time warning
where Triton cannot run (no CUDA device and no ``TRITON_INTERPRET=1``).
"""

from .adaln import (
    adaln_modulate,
    adaln_modulate_ref,
    gated_residual,
    gated_residual_adaln,
    gated_residual_adaln_ref,
    gated_residual_ref,
)
from .conv import compressor_encode_fused, fused_conv2d, fused_conv2d_ref, pack_conv_weight
from .rmsnorm import RMSNorm, rms_norm, rms_norm_ref

__all__ = [
    "adaln_modulate",
    "adaln_modulate_ref",
    "gated_residual",
    "gated_residual_ref",
    "gated_residual_adaln",
    "gated_residual_adaln_ref",
    "rms_norm",
    "rms_norm_ref",
    "RMSNorm",
    "fused_conv2d",
    "fused_conv2d_ref",
    "compressor_encode_fused",
    "pack_conv_weight",
]
