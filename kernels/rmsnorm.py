"""RMSNorm over the last dim with a learned weight (QK-norm per attention head).

    rms_norm(x, weight, eps)   x * rsqrt(mean(x², -1) + eps) * weight      x: (..., D), weight: (D,)

Statistics in fp32; the output has x's dtype (as ``torch.nn.functional.rms_norm``). The weight
gradient is summed over rows from fp32 partial rows, one per program, added up (and cast to the
weight's dtype) by one ``column_sums`` launch.
"""

from typing import Tuple

import torch
import torch.nn as nn

from ._partials import column_sums
from ._utils import (
    can_run_triton,
    cdiv,
    check_dtypes,
    device_guard,
    empty_output,
    fused_op_set,
    autotuned_rows,
    reduction_programs,
    row_tile,
    triton_available,
    warn_fallback_once,
)

if triton_available():
    import triton
    import triton.language as tl
else:  # pragma: no cover
    triton = None



def rms_norm_ref(x: torch.Tensor, weight: torch.Tensor, eps: float = 1e-6, upcast: bool = False) -> torch.Tensor:
    """Eager RMSNorm as torch's composite computes it: fp32 statistics, then the weight in x's dtype."""
    if upcast:
        x, weight = x.float(), weight.float()
    xf = x.float()
    normed = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return normed.to(x.dtype) * weight.to(x.dtype)


if triton is not None:

    @triton.jit
    def _row_offsets(rows, S1, S2, stride0, stride1, stride2, ROW_ALIGN: tl.constexpr):
        """Element offset of each row of a (S0, S1, S2, D) view with unit last stride: q/k of the qkv
        projection arrive as such a permuted view and are read in place, not copied."""
        i2 = rows % S2
        i1 = (rows // S2) % S1
        i0 = rows // S2 // S1
        return tl.multiple_of(i0 * stride0 + i1 * stride1 + i2 * stride2, ROW_ALIGN)

    @triton.jit
    def _rms_norm_fwd_kernel(
        X, W, Y, M, S1, S2, sx0, sx1, sx2, eps,
        D: tl.constexpr, ROW_ALIGN: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
    ):  # fmt: skip
        """Y (M, D) contiguous = rmsnorm of the M rows of X (strided, see _row_offsets).

        D is a constexpr and ROW_ALIGN (elements, a power of two) divides every row start, so row
        accesses vectorise to 128 bits where the row size and alignment allow it."""
        rows = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
        cols = tl.arange(0, BLOCK_D)
        cmask = cols < D
        mask = (rows < M)[:, None] & cmask[None, :]
        x_offs = _row_offsets(rows, S1, S2, sx0, sx1, sx2, ROW_ALIGN)[:, None] + cols[None, :]
        y_offs = tl.multiple_of(rows * D, ROW_ALIGN)[:, None] + cols[None, :]
        x = tl.load(X + x_offs, mask=mask, other=0.0).to(tl.float32)
        w = tl.load(W + cols, mask=cmask, other=0.0).to(tl.float32)
        rstd = tl.rsqrt(tl.sum(x * x, axis=1) / D + eps)
        tl.store(Y + y_offs, (x * rstd[:, None] * w[None, :]).to(Y.dtype.element_ty), mask=mask)

    _rms_norm_fwd_tuned = autotuned_rows(_rms_norm_fwd_kernel)

    @triton.jit
    def _rms_norm_bwd_kernel(
        DY, X, W, DX, DW_PART, M, S1, S2, sx0, sx1, sx2, eps,
        D: tl.constexpr, ROW_ALIGN: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
    ):  # fmt: skip
        """Grid-stride over row tiles of X (strided); DY, DX (M, D) contiguous; one fp32 partial
        row of dweight per program."""
        pid = tl.program_id(0)
        n_programs = tl.num_programs(0)
        cols = tl.arange(0, BLOCK_D)
        cmask = cols < D
        w = tl.load(W + cols, mask=cmask, other=0.0).to(tl.float32)
        acc_w = tl.zeros((BLOCK_M, BLOCK_D), dtype=tl.float32)
        for tile in range(pid, tl.cdiv(M, BLOCK_M), n_programs):
            rows = (tile * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
            mask = (rows < M)[:, None] & cmask[None, :]
            x_offs = _row_offsets(rows, S1, S2, sx0, sx1, sx2, ROW_ALIGN)[:, None] + cols[None, :]
            offs = tl.multiple_of(rows * D, ROW_ALIGN)[:, None] + cols[None, :]
            x = tl.load(X + x_offs, mask=mask, other=0.0).to(tl.float32)
            dy = tl.load(DY + offs, mask=mask, other=0.0).to(tl.float32)
            rstd = tl.rsqrt(tl.sum(x * x, axis=1) / D + eps)
            xhat = x * rstd[:, None]
            g = dy * w[None, :]
            c = tl.sum(g * xhat, axis=1) / D
            dx = (g - xhat * c[:, None]) * rstd[:, None]
            tl.store(DX + offs, dx.to(DX.dtype.element_ty), mask=mask)
            acc_w += dy * xhat
        tl.store(DW_PART + pid.to(tl.int64) * D + cols, tl.sum(acc_w, axis=0), mask=cmask)


def _row_view(x: torch.Tensor):
    """(M, S1, S2, strides (s0, s1, s2)) describing the rows of x (..., D) in place, or None when
    its leading dims do not fit three strides (then the caller copies)."""
    if x.stride(-1) != 1 and x.shape[-1] > 1:
        return None
    dims = [(size, stride) for size, stride in zip(x.shape[:-1], x.stride()[:-1]) if size != 1]
    merged = []
    for size, stride in dims:  # merge dims that are contiguous with their inner neighbour
        if merged and merged[-1][1] == stride * size:
            merged[-1] = (merged[-1][0] * size, stride)
        else:
            merged.append((size, stride))
    if len(merged) > 3:
        return None
    merged = [(1, 0)] * (3 - len(merged)) + merged
    (s0, t0), (s1, t1), (s2, t2) = merged
    return s0 * s1 * s2, s1, s2, (t0, t1, t2)


def _row_align(x: torch.Tensor, strides) -> int:
    """The largest power of two (elements, at most 16 bytes' worth) dividing every row start of x."""
    align = 16 // x.element_size()
    while align > 1 and (x.data_ptr() % (align * x.element_size()) or x.shape[-1] % align
                         or any(s % align for s in strides)):
        align //= 2
    return align


def _rows_of(x: torch.Tensor):
    """(x or a contiguous copy, M, S1, S2, strides, ROW_ALIGN) for the kernels."""
    view = _row_view(x)
    if view is None:
        x = x.contiguous()
        view = _row_view(x)
    m, s1, s2, strides = view
    return x, m, s1, s2, strides, _row_align(x, strides)


@torch.library.custom_op("reglue::rms_norm_fwd", mutates_args=())
def _rms_norm_fwd(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """x: (..., D) with any strides (rows read in place), weight: (D,) -> contiguous, x's shape and dtype."""
    weight = weight.contiguous()
    d = x.shape[-1]
    y = empty_output(x.shape, x.dtype, x.device)
    x, m, s1, s2, (t0, t1, t2), align = _rows_of(x)
    if m:
        with device_guard(x):
            _rms_norm_fwd_tuned[lambda meta: (cdiv(m, meta["BLOCK_M"]),)](
                x, weight, y, m, s1, s2, t0, t1, t2, eps, D=d, ROW_ALIGN=align, BLOCK_D=row_tile(d, m)[1],
            )  # fmt: skip
    return y


@_rms_norm_fwd.register_fake
def _(x, weight, eps):
    return x.new_empty(x.shape)


@torch.library.custom_op("reglue::rms_norm_bwd", mutates_args=())
def _rms_norm_bwd(dy: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, eps: float) -> Tuple[torch.Tensor, torch.Tensor]:
    """-> (dx contiguous in x's shape and dtype, dweight in weight's dtype); x read in place."""
    dy, weight = dy.contiguous(), weight.contiguous()
    d = x.shape[-1]
    dx = empty_output(x.shape, x.dtype, x.device)
    x, m, s1, s2, (t0, t1, t2), align = _rows_of(x)
    align = min(align, _row_align(dy, ()))
    block_m, block_d, num_warps = row_tile(d, m, per_thread=8)
    n_programs = max(1, min(reduction_programs(x.device), cdiv(m, block_m)))
    dw_part = empty_output((n_programs, d), torch.float32, x.device)
    if not m:
        dw_part.zero_()
    else:
        with device_guard(x):
            _rms_norm_bwd_kernel[(n_programs,)](
                dy, x, weight, dx, dw_part, m, s1, s2, t0, t1, t2, eps,
                D=d, ROW_ALIGN=align, BLOCK_M=block_m, BLOCK_D=block_d, num_warps=num_warps,
            )  # fmt: skip
    return dx, column_sums(dw_part.view(1, n_programs, d), weight.dtype).view(d)


@_rms_norm_bwd.register_fake
def _(dy, x, weight, eps):
    return x.new_empty(x.shape), weight.new_empty(weight.shape)


def _rms_norm_setup(ctx, inputs, output):
    x, weight, eps = inputs
    ctx.save_for_backward(x, weight)
    ctx.eps = eps


def _rms_norm_backward(ctx, dy):
    x, weight = ctx.saved_tensors
    dx, dw = _rms_norm_bwd(dy, x, weight, ctx.eps)
    return dx, dw, None


_rms_norm_fwd.register_autograd(_rms_norm_backward, setup_context=_rms_norm_setup)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """Fused RMSNorm over the last dim. x: (..., D), weight: (D,); output in x's dtype."""
    if not can_run_triton(x):
        warn_fallback_once("rms_norm")
        return rms_norm_ref(x, weight, eps)
    check_dtypes("rms_norm", x, weight)
    d = x.shape[-1]
    if weight.shape != (d,):
        raise ValueError(f"reglue.kernels.rms_norm: weight {tuple(weight.shape)} must be ({d},) for x {tuple(x.shape)}")
    return _rms_norm_fwd(x, weight, eps)


class RMSNorm(nn.Module):
    """RMSNorm with a learned ``weight`` (state-dict key as torch.nn.RMSNorm and timm).

    ``kernels``: ``"triton"`` runs the fused kernel, ``"eager"`` the PyTorch reference; or a set of
    fused op names (see ``fused_op_set``), fused when it holds ``"rms_norm"``.
    """

    def __init__(self, dim: int, eps: float = 1e-6, kernels="eager"):
        super().__init__()
        self.eps = eps
        self.fused = "rms_norm" in fused_op_set(kernels)
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.fused:
            return rms_norm(x, self.weight, self.eps)
        return rms_norm_ref(x, self.weight, self.eps)

    def extra_repr(self) -> str:
        return f"{self.weight.shape[0]}, eps={self.eps}, fused={self.fused}"
