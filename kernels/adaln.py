"""Fused adaLN-Zero pieces of a SiT block: LayerNorm + modulate, gated residual, and both at once.

    adaln_modulate(x, shift, scale)          h = layer_norm(x) * (1 + scale) + shift
    gated_residual_adaln(x, y, gate, s, c)   r = x + gate * y;  h = adaln_modulate(r, s, c)  -> (r, h)
    gated_residual(x, y, gate)               x + gate * y

x, y: (N, T, D) (any (N, ..., D)); shift, scale, gate: (N, D) broadcast over the tokens, or the
full shape of x. LayerNorm has no affine parameters; statistics are fp32 whatever the storage
dtype. Gradients of the (N, D) tensors are summed over the tokens from fp32 partial rows (one row
per program and gradient, all in one buffer, added up and cast by one ``column_sums`` launch), so
they are deterministic.

One forward and one backward kernel serve all three ops through two flags: HAS_RESIDUAL (read y
and gate, write r) and HAS_NORM (normalise and modulate). The backward recomputes mean and rstd
from the row it loads anyway instead of saving them.
"""

from typing import Optional, Tuple

import torch
import torch.nn.functional as F

from ._partials import column_sums
from ._utils import (
    autotuned_rows,
    can_run_triton,
    cdiv,
    check_dtypes,
    device_guard,
    empty_output,
    reduction_programs,
    result_dtype,
    row_tile,
    triton_available,
    warn_fallback_once,
)

if triton_available():
    import triton
    import triton.language as tl
else:  # pragma: no cover - the references below still work
    triton = None


# --------------------------------------------------------------------------------------------
# Eager references
# --------------------------------------------------------------------------------------------


def _per_token(mod: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """(N, D) -> (N, 1, ..., 1, D) so it broadcasts over the token dims of x; x-shaped stays."""
    if mod.shape == x.shape:
        return mod
    return mod.reshape(mod.shape[0], *([1] * (x.dim() - 2)), mod.shape[-1])


def _upcast(*tensors):
    return [t.float() for t in tensors]


def adaln_modulate_ref(x, shift, scale, eps: float = 1e-6, upcast: bool = False):
    """layer_norm(x) * (1 + scale) + shift; x: (N, T, D), shift/scale: (N, D) or x.shape."""
    if upcast:
        x, shift, scale = _upcast(x, shift, scale)
    h = F.layer_norm(x, (x.shape[-1],), eps=eps)
    return h * (1 + _per_token(scale, x)) + _per_token(shift, x)


def gated_residual_ref(x, y, gate, upcast: bool = False):
    """x + gate * y; x, y: (N, T, D), gate: (N, D) or x.shape."""
    if upcast:
        x, y, gate = _upcast(x, y, gate)
    return x + _per_token(gate, x) * y


def gated_residual_adaln_ref(x, y, gate, shift, scale, eps: float = 1e-6, upcast: bool = False):
    """(r, h) with r = x + gate * y and h = layer_norm(r) * (1 + scale) + shift."""
    r = gated_residual_ref(x, y, gate, upcast=upcast)
    return r, adaln_modulate_ref(r, shift, scale, eps=eps, upcast=upcast)


# --------------------------------------------------------------------------------------------
# Triton kernels
# --------------------------------------------------------------------------------------------

if triton is not None:

    @triton.jit
    def _adaln_fwd_kernel(
        X, Y, GATE, SHIFT, SCALE, R, H,
        M, T, D: tl.constexpr, stride_gate, stride_shift, stride_scale, eps,
        HAS_RESIDUAL: tl.constexpr, HAS_NORM: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
    ):  # fmt: skip
        """One tile = BLOCK_M whole rows of the (M = N*T, D) matrix; sample n = row // T."""
        rows = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
        cols = tl.arange(0, BLOCK_D)
        mask = (rows < M)[:, None] & (cols < D)[None, :]
        offs = rows[:, None] * D + cols[None, :]
        n = (rows // T)[:, None]
        x = tl.load(X + offs, mask=mask, other=0.0).to(tl.float32)
        if HAS_RESIDUAL:
            y = tl.load(Y + offs, mask=mask, other=0.0).to(tl.float32)
            gate = tl.load(GATE + n * stride_gate + cols[None, :], mask=mask, other=0.0).to(tl.float32)
            r = (x + gate * y).to(R.dtype.element_ty)
            tl.store(R + offs, r, mask=mask)
            # Normalise the stored (rounded) r: the backward reloads exactly that.
            x = r.to(tl.float32)
        if HAS_NORM:
            mean = tl.sum(x, axis=1) / D
            xc = tl.where(mask, x - mean[:, None], 0.0)
            rstd = tl.rsqrt(tl.sum(xc * xc, axis=1) / D + eps)
            shift = tl.load(SHIFT + n * stride_shift + cols[None, :], mask=mask, other=0.0).to(tl.float32)
            scale = tl.load(SCALE + n * stride_scale + cols[None, :], mask=mask, other=0.0).to(tl.float32)
            h = xc * rstd[:, None] * (1.0 + scale) + shift
            tl.store(H + offs, h.to(H.dtype.element_ty), mask=mask)

    _adaln_fwd_tuned = autotuned_rows(_adaln_fwd_kernel)

    @triton.jit
    def _adaln_bwd_kernel(
        DH, DR, XN, Y, GATE, SCALE, DX, DY, DSHIFT, DSCALE, DGATE,
        T, D: tl.constexpr, rows_per_chunk, n_chunks, stride_gate, stride_scale, eps,
        HAS_RESIDUAL: tl.constexpr, HAS_NORM: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
    ):  # fmt: skip
        """Program (n, chunk) walks tokens [chunk*rows_per_chunk, ...) of sample n, writes the
        per-row gradients and one fp32 partial row of each (N, D) gradient.

        XN is the tensor that was normalised (x, or r for the residual variant); DR is the
        gradient arriving at r. With HAS_NORM the row gradient dr = DR + d(LN-modulate)/dr is
        written to DX; without it DX is DR itself and is not written.
        """
        n = tl.program_id(0)
        chunk = tl.program_id(1)
        cols = tl.arange(0, BLOCK_D)
        cmask = cols < D
        t_start = chunk * rows_per_chunk
        t_end = tl.minimum(t_start + rows_per_chunk, T)
        acc_shift = tl.zeros((BLOCK_M, BLOCK_D), dtype=tl.float32)
        acc_scale = tl.zeros((BLOCK_M, BLOCK_D), dtype=tl.float32)
        acc_gate = tl.zeros((BLOCK_M, BLOCK_D), dtype=tl.float32)
        for t0 in range(t_start, t_end, BLOCK_M):
            t = t0 + tl.arange(0, BLOCK_M)
            mask = (t < t_end)[:, None] & cmask[None, :]
            offs = (n.to(tl.int64) * T + t)[:, None] * D + cols[None, :]
            dr = tl.zeros((BLOCK_M, BLOCK_D), dtype=tl.float32)
            if HAS_NORM:
                dh = tl.load(DH + offs, mask=mask, other=0.0).to(tl.float32)
                xn = tl.load(XN + offs, mask=mask, other=0.0).to(tl.float32)
                mean = tl.sum(xn, axis=1) / D
                xc = tl.where(mask, xn - mean[:, None], 0.0)
                rstd = tl.rsqrt(tl.sum(xc * xc, axis=1) / D + eps)
                xhat = xc * rstd[:, None]
                # scale and gate are re-read per row tile (L1 hits) rather than held: registers, not
                # memory, bound this kernel's occupancy.
                scale = tl.load(SCALE + n * stride_scale + cols, mask=cmask, other=0.0).to(tl.float32)
                g = dh * (1.0 + scale[None, :])
                c1 = tl.sum(xhat * g, axis=1) / D
                c2 = tl.sum(g, axis=1) / D
                acc_shift += dh
                acc_scale += dh * xhat
                dr = tl.where(mask, (g - xhat * c1[:, None] - c2[:, None]) * rstd[:, None], 0.0)
            if HAS_RESIDUAL:  # loaded after the norm's reductions: fewer rows live across them
                dr += tl.load(DR + offs, mask=mask, other=0.0).to(tl.float32)
            if HAS_NORM:
                tl.store(DX + offs, dr.to(DX.dtype.element_ty), mask=mask)
            if HAS_RESIDUAL:
                y = tl.load(Y + offs, mask=mask, other=0.0).to(tl.float32)
                gate = tl.load(GATE + n * stride_gate + cols, mask=cmask, other=0.0).to(tl.float32)
                tl.store(DY + offs, (dr * gate[None, :]).to(DY.dtype.element_ty), mask=mask)
                acc_gate += dr * y
        part = (n * n_chunks + chunk).to(tl.int64) * D + cols
        if HAS_NORM:
            tl.store(DSHIFT + part, tl.sum(acc_shift, axis=0), mask=cmask)
            tl.store(DSCALE + part, tl.sum(acc_scale, axis=0), mask=cmask)
        if HAS_RESIDUAL:
            tl.store(DGATE + part, tl.sum(acc_gate, axis=0), mask=cmask)


# --------------------------------------------------------------------------------------------
# Launchers. Inside the ops x, y are (N, T, D) and the modulation tensors (N, D); the public
# functions below reshape any accepted layout into that.
# --------------------------------------------------------------------------------------------


def _unit_stride(t: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    """(N, D) with a contiguous last dim; row stride is passed to the kernel (chunk() views stay views)."""
    if t is None or t.stride(-1) == 1:
        return t
    return t.contiguous()


def _launch_fwd(x, y, gate, shift, scale, eps: float):
    has_residual, has_norm = y is not None, shift is not None
    x = x.contiguous()
    n, t, d = x.shape
    m = n * t
    r = h = None
    dummy = x
    if has_residual:
        y, gate = y.contiguous(), _unit_stride(gate)
        r = empty_output(x.shape, result_dtype(x, y, gate), x.device)
    if has_norm:
        shift, scale = _unit_stride(shift), _unit_stride(scale)
        h = empty_output(x.shape, result_dtype(r if has_residual else x, shift, scale), x.device)
    if m == 0:
        return r, h
    with device_guard(x):
        _adaln_fwd_tuned[lambda meta: (cdiv(m, meta["BLOCK_M"]),)](
            x, y if has_residual else dummy, gate if has_residual else dummy,
            shift if has_norm else dummy, scale if has_norm else dummy,
            r if has_residual else dummy, h if has_norm else dummy,
            m, t, d,
            gate.stride(0) if has_residual else 0,
            shift.stride(0) if has_norm else 0,
            scale.stride(0) if has_norm else 0,
            eps,
            HAS_RESIDUAL=has_residual, HAS_NORM=has_norm, BLOCK_D=row_tile(d, m)[1],
        )  # fmt: skip
    return r, h


def _launch_bwd(dh, dr, xn, y, gate, scale, eps: float, x_dtype: torch.dtype, mod_dtype: torch.dtype):
    """Returns (dx or None, dy or None, dmod): dmod (k, N, D) in ``mod_dtype`` stacks the (N, D)
    gradients in the order (dgate if y is given, then dshift, dscale if dh is given)."""
    has_residual, has_norm = y is not None, dh is not None
    ref = xn if has_norm else dr
    n, t, d = ref.shape
    dummy = ref
    dx = dy = None
    block_m, block_d, num_warps = row_tile(d, t, per_thread=8)
    n_chunks = max(1, min(cdiv(reduction_programs(ref.device), max(n, 1)), cdiv(t, block_m)))
    rows_per_chunk = cdiv(cdiv(max(t, 1), n_chunks), block_m) * block_m
    n_chunks = cdiv(max(t, 1), rows_per_chunk)
    kinds = ["gate"] * has_residual + ["shift", "scale"] * has_norm
    partials = empty_output((len(kinds), n, n_chunks, d), torch.float32, ref.device)  # one fp32 row per program
    part = dict(zip(kinds, partials))
    if has_norm:
        dh, xn, scale = dh.contiguous(), xn.contiguous(), _unit_stride(scale)
        dx = empty_output(ref.shape, x_dtype, ref.device)
    if has_residual:
        dr, y, gate = dr.contiguous(), y.contiguous(), _unit_stride(gate)
        dy = empty_output(ref.shape, y.dtype, ref.device)
    if n * t:
        with device_guard(ref):
            _adaln_bwd_kernel[(n, n_chunks)](
                dh if has_norm else dummy, dr if has_residual else dummy, xn if has_norm else dummy,
                y if has_residual else dummy, gate if has_residual else dummy, scale if has_norm else dummy,
                dx if has_norm else dummy, dy if has_residual else dummy,
                part.get("shift", dummy), part.get("scale", dummy), part.get("gate", dummy),
                t, d, rows_per_chunk, n_chunks,
                gate.stride(0) if has_residual else 0, scale.stride(0) if has_norm else 0, eps,
                HAS_RESIDUAL=has_residual, HAS_NORM=has_norm, BLOCK_M=block_m, BLOCK_D=block_d, num_warps=num_warps,
            )  # fmt: skip
    else:
        partials.zero_()
    # Fixed-order sums of the per-program partial rows (deterministic), every gradient in one launch.
    return dx, dy, column_sums(partials.view(len(kinds) * n, n_chunks, d), mod_dtype).view(len(kinds), n, d)


def _mod_grad_dtype(*dtypes: torch.dtype) -> torch.dtype:
    """The dtype the (N, D) gradients are summed into: theirs when they share one (the chunks of
    one adaLN modulation tensor do), else fp32 (each then cast on its own)."""
    return dtypes[0] if len(set(dtypes)) == 1 else torch.float32


# --------------------------------------------------------------------------------------------
# Custom ops (compile-able, opcheck-able) with autograd
# --------------------------------------------------------------------------------------------


@torch.library.custom_op("reglue::adaln_modulate_fwd", mutates_args=())
def _adaln_modulate_fwd(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor, eps: float) -> torch.Tensor:
    return _launch_fwd(x, None, None, shift, scale, eps)[1]


@_adaln_modulate_fwd.register_fake
def _(x, shift, scale, eps):
    return x.new_empty(x.shape, dtype=result_dtype(x, shift, scale))


@torch.library.custom_op("reglue::adaln_modulate_bwd", mutates_args=())
def _adaln_modulate_bwd(
    dh: torch.Tensor, x: torch.Tensor, scale: torch.Tensor, eps: float, mod_dtype: torch.dtype
) -> Tuple[torch.Tensor, torch.Tensor]:
    """-> (dx, (dshift, dscale) stacked as (2, N, D) in ``mod_dtype``)."""
    dx, _, dmod = _launch_bwd(dh, None, x, None, None, scale, eps, x.dtype, mod_dtype)
    return dx, dmod


@_adaln_modulate_bwd.register_fake
def _(dh, x, scale, eps, mod_dtype):
    return x.new_empty(x.shape), x.new_empty((2, x.shape[0], x.shape[-1]), dtype=mod_dtype)


def _adaln_modulate_setup(ctx, inputs, output):
    x, shift, scale, eps = inputs
    ctx.save_for_backward(x, scale)
    ctx.eps = eps
    ctx.shift_dtype = shift.dtype


def _adaln_modulate_backward(ctx, dh):
    x, scale = ctx.saved_tensors
    dtypes = (ctx.shift_dtype, scale.dtype)
    dx, dmod = _adaln_modulate_bwd(dh, x, scale, ctx.eps, _mod_grad_dtype(*dtypes))
    dshift, dscale = (g.to(dtype) for g, dtype in zip(dmod, dtypes))
    return dx, dshift, dscale, None


_adaln_modulate_fwd.register_autograd(_adaln_modulate_backward, setup_context=_adaln_modulate_setup)


@torch.library.custom_op("reglue::gated_residual_adaln_fwd", mutates_args=())
def _gated_residual_adaln_fwd(
    x: torch.Tensor, y: torch.Tensor, gate: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor, eps: float
) -> Tuple[torch.Tensor, torch.Tensor]:
    return _launch_fwd(x, y, gate, shift, scale, eps)


@_gated_residual_adaln_fwd.register_fake
def _(x, y, gate, shift, scale, eps):
    r = x.new_empty(x.shape, dtype=result_dtype(x, y, gate))
    return r, x.new_empty(x.shape, dtype=result_dtype(r, shift, scale))


@torch.library.custom_op("reglue::gated_residual_adaln_bwd", mutates_args=())
def _gated_residual_adaln_bwd(
    dr: torch.Tensor, dh: torch.Tensor, r: torch.Tensor, y: torch.Tensor, gate: torch.Tensor, scale: torch.Tensor,
    eps: float, mod_dtype: torch.dtype,
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:  # fmt: skip
    """-> (d(r-input) in r's dtype, dy, (dgate, dshift, dscale) stacked as (3, N, D) in ``mod_dtype``)."""
    return _launch_bwd(dh, dr, r, y, gate, scale, eps, r.dtype, mod_dtype)


@_gated_residual_adaln_bwd.register_fake
def _(dr, dh, r, y, gate, scale, eps, mod_dtype):
    return r.new_empty(r.shape), y.new_empty(y.shape), r.new_empty((3, r.shape[0], r.shape[-1]), dtype=mod_dtype)


def _gated_residual_adaln_setup(ctx, inputs, output):
    x, y, gate, shift, scale, eps = inputs
    r, _ = output
    ctx.save_for_backward(r, y, gate, scale)
    ctx.eps = eps
    ctx.dtypes = (x.dtype, shift.dtype)


def _gated_residual_adaln_backward(ctx, dr, dh):
    r, y, gate, scale = ctx.saved_tensors
    x_dtype, shift_dtype = ctx.dtypes
    if dr is None:
        dr = torch.zeros_like(r)
    if dh is None:
        dh = torch.zeros_like(r)
    dtypes = (gate.dtype, shift_dtype, scale.dtype)
    dx, dy, dmod = _gated_residual_adaln_bwd(dr, dh, r, y, gate, scale, ctx.eps, _mod_grad_dtype(*dtypes))
    dgate, dshift, dscale = (g.to(dtype) for g, dtype in zip(dmod, dtypes))
    return dx.to(x_dtype), dy, dgate, dshift, dscale, None


_gated_residual_adaln_fwd.register_autograd(_gated_residual_adaln_backward, setup_context=_gated_residual_adaln_setup)


@torch.library.custom_op("reglue::gated_residual_fwd", mutates_args=())
def _gated_residual_fwd(x: torch.Tensor, y: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
    return _launch_fwd(x, y, gate, None, None, 0.0)[0]


@_gated_residual_fwd.register_fake
def _(x, y, gate):
    return x.new_empty(x.shape, dtype=result_dtype(x, y, gate))


@torch.library.custom_op("reglue::gated_residual_bwd", mutates_args=())
def _gated_residual_bwd(dout: torch.Tensor, y: torch.Tensor, gate: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """-> (dy, dgate in gate's dtype); dx is dout itself."""
    _, dy, dmod = _launch_bwd(None, dout, None, y, gate, None, 0.0, dout.dtype, gate.dtype)
    return dy, dmod[0]


@_gated_residual_bwd.register_fake
def _(dout, y, gate):
    return y.new_empty(y.shape), gate.new_empty((y.shape[0], y.shape[-1]))


def _gated_residual_setup(ctx, inputs, output):
    x, y, gate = inputs
    ctx.save_for_backward(y, gate)
    ctx.x_dtype = x.dtype


def _gated_residual_backward(ctx, dout):
    y, gate = ctx.saved_tensors
    dy, dgate = _gated_residual_bwd(dout, y, gate)
    return dout.to(ctx.x_dtype), dy, dgate


_gated_residual_fwd.register_autograd(_gated_residual_backward, setup_context=_gated_residual_setup)


# --------------------------------------------------------------------------------------------
# Public functions
# --------------------------------------------------------------------------------------------


def _to_rows(op: str, x: torch.Tensor, *mods: torch.Tensor):
    """Reshape x to (N, T, D) and each modulation tensor to (N, D) for the kernels.

    Modulation tensors are (N, D) / (N, 1, D) per sample, or x.shape per token. If any is per
    token, all are treated per token (rows of x become samples with T = 1).
    """
    if x.dim() < 2:
        raise ValueError(f"reglue.kernels.{op}: x must be (N, ..., D), got shape {tuple(x.shape)}")
    check_dtypes(op, x, *mods)
    n, d = x.shape[0], x.shape[-1]
    per_token = any(m.shape == x.shape and m.dim() > 2 for m in mods)
    out = []
    for m in mods:
        if m.shape == x.shape and (per_token or x.dim() == 2):
            out.append(m.reshape(-1, d))
        elif m.shape[0] == n and m.shape[-1] == d and m.numel() == n * d:
            m = m.reshape(n, d)
            out.append(m.unsqueeze(1).expand(n, x[0].numel() // d, d).reshape(-1, d) if per_token else m)
        else:
            raise ValueError(
                f"reglue.kernels.{op}: modulation shape {tuple(m.shape)} does not fit x {tuple(x.shape)} "
                "(expected (N, D), (N, 1, D) or x.shape)"
            )
    x3 = x.reshape(-1, 1, d) if per_token or x.dim() == 2 else x.reshape(n, -1, d)
    return x3, out


def adaln_modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """layer_norm(x) * (1 + scale) + shift, fused. x: (N, T, D); shift, scale: (N, D) or x.shape."""
    if not can_run_triton(x):
        warn_fallback_once("adaln_modulate")
        return adaln_modulate_ref(x, shift, scale, eps)
    x3, (shift2, scale2) = _to_rows("adaln_modulate", x, shift, scale)
    return _adaln_modulate_fwd(x3, shift2, scale2, eps).reshape(x.shape)


def gated_residual_adaln(
    x: torch.Tensor, y: torch.Tensor, gate: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor, eps: float = 1e-6
) -> Tuple[torch.Tensor, torch.Tensor]:
    """(r, h): r = x + gate * y, h = layer_norm(r) * (1 + scale) + shift, in one pass over memory."""
    if not can_run_triton(x):
        warn_fallback_once("gated_residual_adaln")
        return gated_residual_adaln_ref(x, y, gate, shift, scale, eps)
    if y.shape != x.shape:
        raise ValueError(f"reglue.kernels.gated_residual_adaln: y {tuple(y.shape)} must have x's shape {tuple(x.shape)}")
    x3, (gate2, shift2, scale2) = _to_rows("gated_residual_adaln", x, gate, shift, scale)
    check_dtypes("gated_residual_adaln", y)
    r, h = _gated_residual_adaln_fwd(x3, y.reshape(x3.shape), gate2, shift2, scale2, eps)
    return r.reshape(x.shape), h.reshape(x.shape)


def gated_residual(x: torch.Tensor, y: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
    """x + gate * y, fused. x, y: (N, T, D); gate: (N, D) or x.shape."""
    if not can_run_triton(x):
        warn_fallback_once("gated_residual")
        return gated_residual_ref(x, y, gate)
    if y.shape != x.shape:
        raise ValueError(f"reglue.kernels.gated_residual: y {tuple(y.shape)} must have x's shape {tuple(x.shape)}")
    x3, (gate2,) = _to_rows("gated_residual", x, gate)
    check_dtypes("gated_residual", y)
    return _gated_residual_fwd(x3, y.reshape(x3.shape), gate2).reshape(x.shape)
