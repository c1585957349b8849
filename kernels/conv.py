"""3×3 stride-1 convolution with bias, residual and ReLU fused into the epilogue (inference only).

    fused_conv2d(x, weight, bias, residual=None, relu=False) = act(conv2d(x, weight, padding=1) + bias + residual)

x: (N, C_in, H, W), weight: (C_out, C_in, 3, 3), bias: (C_out,) or None, residual: (N, C_out, H, W).
A channels-last implicit GEMM (as cuDNN and Triton's matmul tutorial lay it out): the input is
read NHWC, so the K = 9 x C_in reduction is contiguous runs of channels per tap; a program owns
BLOCK_P pixels (of any images) x BLOCK_CO output channels and walks one flat K loop in fp32,
zero padding a load mask. The weight is read as (3, 3, C_in, C_out) (``pack_conv_weight``), so
its tiles are contiguous along output channels. fp32 inputs use TF32 tensor cores where
``torch.backends.cuda.matmul.allow_tf32`` permits, exact fp32 otherwise. The output has the
input's layout (channels-last in, channels-last out; NCHW otherwise).

``compressor_encode_fused`` runs a SemanticCompressor encoder with BatchNorm folded: NHWC from
the first conv to the last, one launch per convolution, every bias/BN/residual/ReLU in the
epilogues, and each weight packed once (``packed_conv_weight``), not per call.
"""

import weakref
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
        P, C_in, C_out, H, W,
        res_sn, res_shw, res_sc, out_sn, out_shw, out_sc,
        HAS_BIAS: tl.constexpr, HAS_RESIDUAL: tl.constexpr, RELU: tl.constexpr,
        PRECISION: tl.constexpr, UPCAST_DOT: tl.constexpr,
        BLOCK_P: tl.constexpr, BLOCK_CO: tl.constexpr, BLOCK_CI: tl.constexpr,
    ):  # fmt: skip
        """X channels-last (N, H, W, C_in) contiguous; Wt (9 * C_in, C_out) contiguous, K ordered
        (tap, c_in); RES/OUT addressed through (image, pixel, channel) strides.

        An implicit GEMM over the P = N*H*W pixels: one flat K loop of 9 * ceil(C_in / BLOCK_CI)
        steps (the tap is a scalar of the step), so every tap streams through the same software
        pipeline. A tap's operand rows are pixels shifted by (dh * W + dw), each a contiguous run
        of channels (16-byte vectors, cp.async); out-of-image pixels are masked to zero.
        """
        hw = H * W
        p = tl.program_id(0).to(tl.int64) * BLOCK_P + tl.arange(0, BLOCK_P)
        pmask = p < P
        n = p // hw
        pix = p % hw
        ph = pix // W
        pw = pix % W
        co = tl.program_id(1) * BLOCK_CO + tl.arange(0, BLOCK_CO)
        comask = co < C_out
        ci_range = tl.arange(0, BLOCK_CI)
        ci_steps = tl.cdiv(C_in, BLOCK_CI)
        acc = tl.zeros((BLOCK_P, BLOCK_CO), dtype=tl.float32)
        for k in range(0, 9 * ci_steps):
            tap = k // ci_steps
            ci = (k % ci_steps) * BLOCK_CI + ci_range
            dh = tap // 3 - 1
            dw = tap % 3 - 1
            inside = pmask & (ph + dh >= 0) & (ph + dh < H) & (pw + dw >= 0) & (pw + dw < W)
            cimask = ci < C_in
            a = tl.load(X + (p + (dh * W + dw))[:, None] * C_in + ci[None, :],
                        mask=inside[:, None] & cimask[None, :], other=0.0)
            b = tl.load(Wt + (tap * C_in + ci)[:, None] * C_out + co[None, :],
                        mask=cimask[:, None] & comask[None, :], other=0.0)
            if UPCAST_DOT:
                a, b = a.to(tl.float32), b.to(tl.float32)
            acc = tl.dot(a, b, acc, input_precision=PRECISION)
        if HAS_BIAS:
            acc += tl.load(B + co, mask=comask, other=0.0).to(tl.float32)[None, :]
        mask = pmask[:, None] & comask[None, :]
        if HAS_RESIDUAL:
            res_offs = (n * res_sn + pix * res_shw)[:, None] + co[None, :] * res_sc
            acc += tl.load(RES + res_offs, mask=mask, other=0.0).to(tl.float32)
        if RELU:
            acc = tl.maximum(acc, 0.0)
        out_offs = (n * out_sn + pix * out_shw)[:, None] + co[None, :] * out_sc
        tl.store(OUT + out_offs, acc.to(OUT.dtype.element_ty), mask=mask)


def _conv_blocks(c_in: int, c_out: int, pixels: int, interpreter: bool = None) -> list:
    """Candidate (BLOCK_P, BLOCK_CO, BLOCK_CI, num_warps, num_stages) tiles for the autotuner, the
    default first; tl.dot needs every block >= 16. ``interpreter``: the tiles for that build
    (default: how this process's kernels were built).

    On a GPU: 64-pixel tiles (a 16 x 16 x 32 batch gives 128 x ceil(C_out / 128) CTAs, >= one per
    SM of an H100 with two column tiles, and 3+ CTAs fit an SM), 128 output channels, and K steps of
    32 channels (64-byte bf16 rows) in a 3-stage pipeline. The alternative never has fewer CTAs:
    it halves the output channels (twice the CTAs) with a 4-stage pipeline; at 16 output channels
    (32-pixel tiles, 256 CTAs at 16 x 16 x 32) it keeps the grid and takes K steps of 64 channels
    (whole 128-byte lines of bf16), or for fewer than 64 input channels a 4-stage pipeline. The
    interpreter gets one tile, few and big programs (it pays per program and per op)."""
    if interpreter_enabled() if interpreter is None else interpreter:
        return [(min(max(next_power_of_2(pixels), 16), 256), min(max(next_power_of_2(c_out), 16), 256),
                 min(max(next_power_of_2(c_in), 16), 128), 4, 1)]  # fmt: skip
    block_ci = min(32, max(next_power_of_2(c_in), 16))
    block_co = min(max(next_power_of_2(c_out), 16), 128)
    block_p = 64 if block_co >= 64 else 32
    if block_co > 16:
        alternative = (block_p, block_co // 2, block_ci, 4, 4)
    elif c_in >= 2 * block_ci:
        alternative = (block_p, 16, 2 * block_ci, 4, 3)
    else:
        alternative = (block_p, 16, block_ci, 4, 4)
    return [(block_p, block_co, block_ci, 4, 3), alternative]


def conv_configs(interpreter: bool) -> list:
    """Every tile :func:`_conv_blocks` can return for that build, whatever the widths and pixel
    count: the autotuner's declared configs (pruned to a shape's candidates)."""
    sizes = [1 << i for i in range(4, 13)]  # channel and pixel counts by power-of-two class, 16 .. 4096
    return sorted({tile for c_in in sizes for c_out in sizes for p in sizes for tile in _conv_blocks(c_in, c_out, p, interpreter)})


if triton is not None:

    def _prune_conv_configs(configs, nargs, **kwargs):
        wanted = _conv_blocks(nargs["C_in"], nargs["C_out"], nargs["P"])
        return [c for c in configs if (c.kwargs["BLOCK_P"], c.kwargs["BLOCK_CO"], c.kwargs["BLOCK_CI"],
                                       c.num_warps, c.num_stages) in wanted]

    _conv3x3_tuned = triton.autotune(
        [triton.Config({"BLOCK_P": p, "BLOCK_CO": co, "BLOCK_CI": ci}, num_warps=w, num_stages=st)
         for p, co, ci, w, st in conv_configs(interpreter_enabled())],
        key=["C_in", "C_out", "P"], prune_configs_by={"early_config_prune": _prune_conv_configs},
    )(_conv3x3_kernel)


def pack_conv_weight(weight: torch.Tensor) -> torch.Tensor:
    """(C_out, C_in, 3, 3) -> the same shape, stored as (3, 3, C_in, C_out): the GEMM's K x C_out
    operand with output channels contiguous. A packed weight is returned as is."""
    if weight.permute(2, 3, 1, 0).is_contiguous():
        return weight
    return weight.permute(2, 3, 1, 0).contiguous().permute(3, 2, 0, 1)


packs = 0
"""How many weights :func:`packed_conv_weight` has packed in this process (tests count it)."""

_packed: dict = {}  # id(weight) -> (weakref to it, (version, dtype), packed); tensors cannot be dict keys


def packed_conv_weight(weight: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``pack_conv_weight(weight.to(dtype))``, built once per weight and dtype and reused until the
    weight changes (an in-place update bumps its version: load_state_dict, an optimizer step)."""
    global packs
    key = (weight._version, dtype)
    cached = _packed.get(id(weight))
    if cached is not None and cached[0]() is weight and cached[1] == key:
        return cached[2]
    with torch.no_grad():
        packed = pack_conv_weight(weight.detach().to(dtype))
    packs += 1
    wid = id(weight)
    _packed[wid] = (weakref.ref(weight, lambda _: _packed.pop(wid, None)), key, packed)
    return packed


def uses_tf32(dtype: torch.dtype) -> bool:
    """Do the conv's dots for ``dtype`` inputs run TF32 (10-bit mantissa operands, fp32 accumulation)?
    fp32 inputs do where ``torch.backends.cuda.matmul.allow_tf32`` permits (the trainer sets it on
    CUDA); bf16/fp16 operands are exact in TF32 anyway. The self-check judges fp32 by this."""
    return dtype == torch.float32 and torch.backends.cuda.matmul.allow_tf32


def _channels_last_out(x: torch.Tensor) -> bool:
    """Outputs follow the input's layout: channels-last in, channels-last out; NCHW otherwise."""
    return x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous()


def _pixel_strides(t: torch.Tensor):
    """(image, pixel, channel) strides of an (N, C, H, W) tensor whose H, W flatten to one pixel index."""
    return t.stride(0), t.stride(3), t.stride(1)


@torch.library.custom_op("reglue::fused_conv2d_fwd", mutates_args=())
def _fused_conv2d_fwd(
    x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], residual: Optional[torch.Tensor], relu: bool
) -> torch.Tensor:
    n, c_in, h, w = x.shape
    c_out = weight.shape[0]
    fmt = torch.channels_last if _channels_last_out(x) else torch.contiguous_format
    x = x.contiguous(memory_format=torch.channels_last)
    if residual is not None and residual.stride(2) != w * residual.stride(3):
        residual = residual.contiguous()
    packed = pack_conv_weight(weight.to(x.dtype)).permute(2, 3, 1, 0)  # (3, 3, C_in, C_out), contiguous
    out = empty_output((n, c_out, h, w), x.dtype, x.device, memory_format=fmt)
    if out.numel() == 0:
        return out
    grid = lambda meta: (cdiv(n * h * w, meta["BLOCK_P"]), cdiv(c_out, meta["BLOCK_CO"]))  # noqa: E731
    has_bias, has_residual = bias is not None, residual is not None
    with device_guard(x):
        _conv3x3_tuned[grid](
            x, packed, bias if has_bias else x, residual if has_residual else x, out,
            n * h * w, c_in, c_out, h, w,
            *(_pixel_strides(residual) if has_residual else (0, 0, 0)), *_pixel_strides(out),
            HAS_BIAS=has_bias, HAS_RESIDUAL=has_residual, RELU=relu,
            # fp32 runs on tensor cores (TF32) where torch allows it for matmuls, else exact FMA.
            PRECISION="ieee" if x.dtype == torch.float32 and not uses_tf32(x.dtype) else "tf32",
            # The interpreter multiplies bf16 operands as their raw uint16 bits: upcast there (exact).
            # interpreter_enabled() asks how the kernel was built, so compiled kernels never take this.
            UPCAST_DOT=interpreter_enabled() and x.dtype == torch.bfloat16,
        )  # fmt: skip
    return out


@_fused_conv2d_fwd.register_fake
def _(x, weight, bias, residual, relu):
    fmt = torch.channels_last if _channels_last_out(x) else torch.contiguous_format
    return x.new_empty((x.shape[0], weight.shape[0], x.shape[2], x.shape[3])).contiguous(memory_format=fmt)


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
    x = feats.contiguous(memory_format=torch.channels_last)  # the one layout change: NHWC throughout

    def conv(x, layer, **kwargs):
        return fused_conv2d(x, packed_conv_weight(layer.weight, x.dtype), layer.bias, **kwargs)

    for layer in layers:
        if isinstance(layer, nn.Conv2d):
            x = conv(x, layer)
        else:
            h = conv(x, layer.conv1, relu=True)
            x = conv(h, layer.conv2, residual=x, relu=True)
    return x
