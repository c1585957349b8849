"""RMSNorm over the last dim with a learned weight (QK-norm per attention head).

    rms_norm(x, weight, eps)   x * rsqrt(mean(x², -1) + eps) * weight      x: (..., D), weight: (D,)

Statistics in fp32; the output has x's dtype (as ``torch.nn.functional.rms_norm``). The weight
gradient is summed over rows from fp32 partial rows, one per program, added up afterwards.
"""

from typing import Tuple

import torch
import torch.nn as nn

from ._utils import (
    can_run_triton,
    cdiv,
    check_dtypes,
    device_guard,
    empty_output,
    fused_op_set,
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
    def _rms_norm_fwd_kernel(
        X, W, Y, M, D, eps,
        BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
    ):  # fmt: skip
        rows = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
        cols = tl.arange(0, BLOCK_D)
        cmask = cols < D
        mask = (rows < M)[:, None] & cmask[None, :]
        offs = rows[:, None] * D + cols[None, :]
        x = tl.load(X + offs, mask=mask, other=0.0).to(tl.float32)
        w = tl.load(W + cols, mask=cmask, other=0.0).to(tl.float32)
        rstd = tl.rsqrt(tl.sum(x * x, axis=1) / D + eps)
        tl.store(Y + offs, (x * rstd[:, None] * w[None, :]).to(Y.dtype.element_ty), mask=mask)

    @triton.jit
    def _rms_norm_bwd_kernel(
        DY, X, W, DX, DW_PART, M, D, eps,
        BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
    ):  # fmt: skip
        """Grid-stride over row tiles; one fp32 partial row of dweight per program."""
        pid = tl.program_id(0)
        n_programs = tl.num_programs(0)
        cols = tl.arange(0, BLOCK_D)
        cmask = cols < D
        w = tl.load(W + cols, mask=cmask, other=0.0).to(tl.float32)
        acc_w = tl.zeros((BLOCK_M, BLOCK_D), dtype=tl.float32)
        for tile in range(pid, tl.cdiv(M, BLOCK_M), n_programs):
            rows = (tile * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
            mask = (rows < M)[:, None] & cmask[None, :]
            offs = rows[:, None] * D + cols[None, :]
            x = tl.load(X + offs, mask=mask, other=0.0).to(tl.float32)
            dy = tl.load(DY + offs, mask=mask, other=0.0).to(tl.float32)
            rstd = tl.rsqrt(tl.sum(x * x, axis=1) / D + eps)
            xhat = x * rstd[:, None]
            g = dy * w[None, :]
            c = tl.sum(g * xhat, axis=1) / D
            dx = (g - xhat * c[:, None]) * rstd[:, None]
            tl.store(DX + offs, dx.to(DX.dtype.element_ty), mask=mask)
            acc_w += dy * xhat
        tl.store(DW_PART + pid.to(tl.int64) * D + cols, tl.sum(acc_w, axis=0), mask=cmask)


@torch.library.custom_op("reglue::rms_norm_fwd", mutates_args=())
def _rms_norm_fwd(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """x: (M, D), weight: (D,) -> (M, D) in x's dtype."""
    x, weight = x.contiguous(), weight.contiguous()
    m, d = x.shape
    y = empty_output(x.shape, x.dtype, x.device)
    if m:
        block_m, block_d, num_warps = row_tile(d, m)
        with device_guard(x):
            _rms_norm_fwd_kernel[(cdiv(m, block_m),)](
                x, weight, y, m, d, eps, BLOCK_M=block_m, BLOCK_D=block_d, num_warps=num_warps
            )
    return y


@_rms_norm_fwd.register_fake
def _(x, weight, eps):
    return x.new_empty(x.shape)


@torch.library.custom_op("reglue::rms_norm_bwd", mutates_args=())
def _rms_norm_bwd(dy: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, eps: float) -> Tuple[torch.Tensor, torch.Tensor]:
    """-> (dx in x's dtype, dweight in fp32)."""
    dy, x, weight = dy.contiguous(), x.contiguous(), weight.contiguous()
    m, d = x.shape
    dx = empty_output(x.shape, x.dtype, x.device)
    block_m, block_d, num_warps = row_tile(d, m)
    n_programs = max(1, min(reduction_programs(x.device), cdiv(m, block_m)))
    dw_part = empty_output((n_programs, d), torch.float32, x.device)
    if not m:
        dw_part.zero_()
    else:
        with device_guard(x):
            _rms_norm_bwd_kernel[(n_programs,)](
                dy, x, weight, dx, dw_part, m, d, eps, BLOCK_M=block_m, BLOCK_D=block_d, num_warps=num_warps
            )
    return dx, dw_part.sum(dim=0)


@_rms_norm_bwd.register_fake
def _(dy, x, weight, eps):
    return x.new_empty(x.shape), weight.new_empty(weight.shape, dtype=torch.float32)


def _rms_norm_setup(ctx, inputs, output):
    x, weight, eps = inputs
    ctx.save_for_backward(x, weight)
    ctx.eps = eps


def _rms_norm_backward(ctx, dy):
    x, weight = ctx.saved_tensors
    dx, dw = _rms_norm_bwd(dy, x, weight, ctx.eps)
    return dx, dw.to(weight.dtype), None


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
    return _rms_norm_fwd(x.reshape(-1, d), weight, eps).reshape(x.shape)


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
