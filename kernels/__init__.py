"""Fused Triton kernels for reglue (installed as ``reglue.kernels``).

Each op has an eager reference (``*_ref``) beside it, runs as a ``torch.library`` custom op
(compile-able without graph breaks), and falls back to the reference with a one-time warning
where Triton cannot run (no CUDA device and no ``TRITON_INTERPRET=1``). ``select_ops`` picks,
op by op, the kernel or the reference a model runs; ``selfcheck`` decides which kernels a device
can be trusted with.
"""

from typing import Callable, NamedTuple

from ._utils import FUSED_OPS, KERNEL_CHOICES, fused_op_set
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


class KernelOps(NamedTuple):
    """One callable per fused op: the Triton kernel, or its eager reference (same signature)."""

    adaln_modulate: Callable
    gated_residual: Callable
    gated_residual_adaln: Callable
    rms_norm: Callable
    fused_conv2d: Callable


_KERNEL = KernelOps(adaln_modulate, gated_residual, gated_residual_adaln, rms_norm, fused_conv2d)
_REFERENCE = KernelOps(adaln_modulate_ref, gated_residual_ref, gated_residual_adaln_ref, rms_norm_ref, fused_conv2d_ref)
assert KernelOps._fields == FUSED_OPS


def select_ops(kernels) -> KernelOps:
    """The implementation of every op for a ``kernels`` setting ("eager", "triton", or the set of
    op names that run fused): explicit dispatch, nothing is patched."""
    fused = fused_op_set(kernels)
    return KernelOps(*(getattr(_KERNEL if op in fused else _REFERENCE, op) for op in FUSED_OPS))


__all__ = [
    "FUSED_OPS",
    "KERNEL_CHOICES",
    "KernelOps",
    "select_ops",
    "fused_op_set",
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
