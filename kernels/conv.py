"""3×3 stride-1 convolution with bias, residual and ReLU fused into the epilogue (inference only).

    fused_conv2d(x, weight, bias, residual=None, relu=False) = act(conv2d(x, weight, padding=1) + bias + residual)

x: (N, C_in, H, W), weight: (C_out, C_in, 3, 3), bias: (C_out,) or None, residual: (N, C_out, H, W).
An implicit GEMM: a program owns BLOCK_P pixels of one image × BLOCK_CO output channels and
accumulates nine shifted (pixels × C_in) @ (C_in × C_out) products in fp32; zero padding is a
load mask. Input and output stay NCHW (loads are contiguous along pixels); the weight is read
as (3, 3, C_in, C_out) so its tiles are contiguous along output channels (``pack_conv_weight``).

``compressor_encode_fused`` runs a SemanticCompressor encoder with BatchNorm folded: one launch
per convolution, every bias/BN/residual/ReLU in the epilogues, no other kernels.
"""

from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from ._utils import (
    can_run_triton,
    cdiv,
    check_dtypes,
    device_guard,
    empty_output,
    interpreter_enabled,
    next_power_of_2,
    triton_available,
    warn_fallback_once,
)

if triton_available():
    import triton
    import triton.language as tl
else:  # pragma: no cover
    triton = None


def fused_conv2d_ref(x, weight, bias=None, residual=None, relu: bool = False, upcast: bool = False):
    """act(conv2d(x, weight, bias, padding=1) + residual), eager."""
    if upcast:
        x, weight = x.float(), weight.float()
        bias = bias.float() if bias is not None else None
        residual = residual.float() if residual is not None else None
    out = F.conv2d(x, weight, bias, padding=1)
    if residual is not None:
        out = out + residual
    return torch.relu(out) if relu else out


if triton is not None:

    @triton.jit
    def _conv3x3_kernel(
        X, Wt, B, RES, OUT,
        C_in, C_out, H, W,
        HAS_BIAS: tl.constexpr, HAS_RESIDUAL: tl.constexpr, RELU: tl.constexpr,
        PRECISION: tl.constexpr, UPCAST_DOT: tl.constexpr,
        BLOCK_P: tl.constexpr, BLOCK_CO: tl.constexpr, BLOCK_CI: tl.constexpr,
    ):  # fmt: skip
        """X, RES, OUT contiguous NCHW; Wt contiguous (3, 3, C_in, C_out).

        A tap's input pixel is p + (dh * W + dw) in the flattened image: addresses stay
        contiguous along the pixel axis (coalesced loads); the mask zeroes what falls outside.
        """
        hw = H * W
        tiles_per_image = tl.cdiv(hw, BLOCK_P)
        pid = tl.program_id(0)
        n = (pid // tiles_per_image).to(tl.int64)
        p = (pid % tiles_per_image) * BLOCK_P + tl.arange(0, BLOCK_P)
        p = tl.max_contiguous(tl.multiple_of(p, BLOCK_P), BLOCK_P)
        pmask = p < hw
        ph = p // W
        pw = p % W
        co = tl.program_id(1) * BLOCK_CO + tl.arange(0, BLOCK_CO)
        comask = co < C_out
        ci_range = tl.arange(0, BLOCK_CI)
        x_image = X + n * C_in * hw
        acc = tl.zeros((BLOCK_P, BLOCK_CO), dtype=tl.float32)
        for tap in tl.static_range(9):
            dh = tap // 3 - 1
            dw = tap % 3 - 1
            inside = pmask & (ph + dh >= 0) & (ph + dh < H) & (pw + dw >= 0) & (pw + dw < W)
            x_tap = x_image + (p + (dh * W + dw))[:, None]
            w_tap = Wt + tap * C_in * C_out + co[None, :]
            for ci0 in range(0, C_in, BLOCK_CI):
                ci = ci0 + ci_range
                cimask = ci < C_in
                a = tl.load(x_tap + ci[None, :] * hw, mask=inside[:, None] & cimask[None, :], other=0.0)
                b = tl.load(w_tap + ci[:, None] * C_out, mask=cimask[:, None] & comask[None, :], other=0.0)
                if UPCAST_DOT:
                    a, b = a.to(tl.float32), b.to(tl.float32)
                acc = tl.dot(a, b, acc, input_precision=PRECISION)
        if HAS_BIAS:
            acc += tl.load(B + co, mask=comask, other=0.0).to(tl.float32)[None, :]
        mask = pmask[:, None] & comask[None, :]
        offs = n * C_out * hw + co[None, :] * hw + p[:, None]
        if HAS_RESIDUAL:
            acc += tl.load(RES + offs, mask=mask, other=0.0).to(tl.float32)
        if RELU:
            acc = tl.maximum(acc, 0.0)
        tl.store(OUT + offs, acc.to(OUT.dtype.element_ty), mask=mask)


def _conv_blocks(c_in: int, c_out: int, hw: int, dtype: torch.dtype):
    """(BLOCK_P, BLOCK_CO, BLOCK_CI, num_warps, num_stages); tl.dot needs every block >= 16."""
    if interpreter_enabled():
        # Few, big programs: the interpreter pays per program and per op.
        return (min(max(next_power_of_2(hw), 16), 256), min(max(next_power_of_2(c_out), 16), 256),
                min(max(next_power_of_2(c_in), 16), 128), 4, 1)  # fmt: skip
    block_ci = 32 if dtype == torch.float32 else 64
    block_co = min(max(next_power_of_2(c_out), 16), 128)
    block_p = 128 if block_co >= 64 else 64
    return block_p, block_co, min(block_ci, max(next_power_of_2(c_in), 16)), 8 if block_co >= 128 else 4, 3


def pack_conv_weight(weight: torch.Tensor) -> torch.Tensor:
    """(C_out, C_in, 3, 3) -> the same shape, stored as (3, 3, C_in, C_out) so output channels are contiguous.

    ``fused_conv2d`` packs on every call unless given a packed weight; pack once for repeated use.
    """
    if weight.permute(2, 3, 1, 0).is_contiguous():
        return weight
    return weight.permute(2, 3, 1, 0).contiguous().permute(3, 2, 0, 1)


@torch.library.custom_op("reglue::fused_conv2d_fwd", mutates_args=())
def _fused_conv2d_fwd(
    x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], residual: Optional[torch.Tensor], relu: bool
) -> torch.Tensor:
    n, c_in, h, w = x.shape
    c_out = weight.shape[0]
    x = x.contiguous()
    residual = residual.contiguous() if residual is not None else None
    packed = pack_conv_weight(weight.to(x.dtype)).permute(2, 3, 1, 0)  # (3, 3, C_in, C_out), contiguous
    out = empty_output((n, c_out, h, w), x.dtype, x.device)
    if out.numel() == 0:
        return out
    block_p, block_co, block_ci, num_warps, num_stages = _conv_blocks(c_in, c_out, h * w, x.dtype)
    grid = (n * cdiv(h * w, block_p), cdiv(c_out, block_co))
    has_bias, has_residual = bias is not None, residual is not None
    with device_guard(x):
        _conv3x3_kernel[grid](
            x, packed, bias if has_bias else x, residual if has_residual else x, out,
            c_in, c_out, h, w,
            HAS_BIAS=has_bias, HAS_RESIDUAL=has_residual, RELU=relu,
            PRECISION="ieee" if x.dtype == torch.float32 else "tf32",
            # The interpreter multiplies bf16 operands as their raw uint16 bits: upcast there (exact).
            # interpreter_enabled() asks how the kernel was built, so compiled kernels never take this.
            UPCAST_DOT=interpreter_enabled() and x.dtype == torch.bfloat16,
            BLOCK_P=block_p, BLOCK_CO=block_co, BLOCK_CI=block_ci, num_warps=num_warps, num_stages=num_stages,
        )  # fmt: skip
    return out


@_fused_conv2d_fwd.register_fake
def _(x, weight, bias, residual, relu):
    return x.new_empty((x.shape[0], weight.shape[0], x.shape[2], x.shape[3]))


def fused_conv2d(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: Optional[torch.Tensor] = None,
    residual: Optional[torch.Tensor] = None,
    relu: bool = False,
) -> torch.Tensor:
    """act(conv2d(x, weight, padding=1) + bias + residual) for 3×3 stride-1 convs; NCHW; inference only."""
    if x.dim() != 4 or weight.dim() != 4 or tuple(weight.shape[2:]) != (3, 3) or weight.shape[1] != x.shape[1]:
        raise ValueError(
            f"reglue.kernels.fused_conv2d: need x (N, C_in, H, W) and weight (C_out, C_in, 3, 3), "
            f"got {tuple(x.shape)} and {tuple(weight.shape)}"
        )
    out_shape = (x.shape[0], weight.shape[0], x.shape[2], x.shape[3])
    if residual is not None and tuple(residual.shape) != out_shape:
        raise ValueError(f"reglue.kernels.fused_conv2d: residual {tuple(residual.shape)} must be {out_shape}")
    if not can_run_triton(x):
        warn_fallback_once("fused_conv2d")
        return fused_conv2d_ref(x, weight, bias, residual, relu)
    check_dtypes("fused_conv2d", x, weight, *[t for t in (bias, residual) if t is not None])
    return _fused_conv2d_fwd(x, weight, bias, residual, relu)


def _is_folded(block: nn.Module) -> bool:
    return isinstance(block.bn1, nn.Identity) and isinstance(block.bn2, nn.Identity)


@torch.no_grad()
def compressor_encode_fused(compressor: nn.Module, feats: torch.Tensor) -> torch.Tensor:
    """compressor.encode(feats) in eval mode, one fused launch per convolution.

    compressor: a SemanticCompressor, best already ``compressor.fold_batchnorm()``-ed (an unfolded
    one is folded here on every call). feats: (N, C, H, W) -> (N, C_latent, H, W).
    Encoder layout: Conv2d 3×3, then residual blocks (conv1, bn1, conv2, bn2) with
    relu(bn2(conv2(relu(bn1(conv1(x))))) + x), and Conv2d 3×3 between/after them.
    """
    layers = compressor.encoder.model
    if not all(_is_folded(layer) for layer in layers if not isinstance(layer, nn.Conv2d)):
        layers = compressor.fold_batchnorm().encoder.model
    x = feats
    for layer in layers:
        if isinstance(layer, nn.Conv2d):
            x = fused_conv2d(x, layer.weight, layer.bias)
        else:
            h = fused_conv2d(x, layer.conv1.weight, layer.conv1.bias, relu=True)
            x = fused_conv2d(h, layer.conv2.weight, layer.conv2.bias, residual=x, relu=True)
    return x
