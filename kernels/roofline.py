"""Bytes and FLOPs per fused op at a shape, and the roofline floor they put under its runtime.

Bytes are the minimum traffic of a perfectly fused implementation: every input read once, every
output written once (the number a kernel is judged by against the copy bandwidth). FLOPs count
multiply-adds as two and are given only where arithmetic can bound the runtime (conv, attention).
The benchmarks (``bench/_roofline.py``) and the static kernel report (``reglue.kernels.report``)
both derive their figures from here.

The floors use data-sheet peaks (H100 SXM: 3.35 TB/s HBM3, 989 TFLOP/s dense bf16; A100 SXM:
2.0 TB/s, 312 TFLOP/s): a floor is the time below which no kernel can run, not a measured speed.
"""

from __future__ import annotations

from typing import Iterator, Sequence, Tuple

PEAKS = {90: (3.35e12, 989e12), 80: (2.0e12, 312e12)}
"""Compute capability -> (memory bytes/s, dense bf16 tensor-core FLOP/s) of the SXM parts."""

SM_COUNT = {90: 132, 80: 108}
"""Compute capability -> SMs of the H100 SXM / A100 SXM."""


def _size(shape: Sequence[int]) -> int:
    n = 1
    for s in shape:
        n *= int(s)
    return n


def row_op_bytes(op: str, x_shape: Sequence[int], mod_rows: int, elem: int, mode: str) -> int:
    """Traffic of the (M, D) row ops. x_shape: the big tensor; mod_rows: rows of each (N, D)
    modulation tensor; elem: bytes per element. Weight/modulation gradients are written in fp32
    partial rows, counted here at the final (N, D) size (the partials are a few % extra).

      adaln_modulate        fwd: x, shift, scale -> h           bwd: dh, x, scale -> dx, dshift, dscale
      gated_residual_adaln  fwd: x, y, gate, shift, scale -> r, h
                            bwd: dr, dh, r, y, gate, scale -> dx, dy, dgate, dshift, dscale
      gated_residual        fwd: x, y, gate -> out              bwd: dout, y, gate -> dy, dgate (dx = dout)
      rms_norm              fwd: x, weight -> y                 bwd: dy, x, weight -> dx, dweight
    """
    big = _size(x_shape) * elem
    d = int(x_shape[-1])
    mod = mod_rows * d * elem
    table = {
        "adaln_modulate": (2 * big + 2 * mod, 3 * big + 3 * mod),
        "gated_residual_adaln": (4 * big + 3 * mod, 6 * big + 5 * mod),
        "gated_residual": (3 * big + mod, 3 * big + 2 * mod),
        "rms_norm": (2 * big + mod, 3 * big + 2 * mod),
    }
    fwd, bwd = table[op]
    return {"fwd": fwd, "bwd": bwd, "fwd+bwd": fwd + bwd}[mode]


def conv3x3_bytes_flops(n: int, c_in: int, c_out: int, h: int, w: int, elem: int, residual: bool) -> tuple:
    """One 3x3 stride-1 conv (+bias, +residual): read x, weight, bias(, residual); write out."""
    bytes_ = (n * c_in * h * w + c_out * c_in * 9 + c_out + n * c_out * h * w * (2 if residual else 1)) * elem
    return bytes_, 2 * n * h * w * c_out * c_in * 9


def compressor_encoder_convs(channels: Sequence[int]) -> Iterator[Tuple[int, int, bool, bool]]:
    """(C_in, C_out, residual, relu) of each conv of a SemanticCompressor(channels) encoder with
    BatchNorm folded, in order: a conv per width step, then a residual block (conv+relu,
    conv+residual+relu) after every conv but the last (``reglue.models.compressor.ConvStack``)."""
    for i, (c_in, c_out) in enumerate(zip(channels[:-1], channels[1:])):
        yield c_in, c_out, False, False
        if i < len(channels) - 2:
            yield c_out, c_out, False, True
            yield c_out, c_out, True, True


def compressor_encode_bytes_flops(n: int, channels: Sequence[int], h: int, w: int, elem: int) -> tuple:
    """The encoder of SemanticCompressor(channels), BatchNorm folded: the sum over its convs."""
    total_bytes = total_flops = 0
    for ci, co, res, _ in compressor_encoder_convs(channels):
        b, f = conv3x3_bytes_flops(n, ci, co, h, w, elem, res)
        total_bytes += b
        total_flops += f
    return total_bytes, total_flops


def attention_bytes_flops(n: int, heads: int, tokens: int, head_dim: int, elem: int, mode: str) -> tuple:
    """Softmax attention without mask. FLOPs: 4·N·H·T²·hd forward (QKᵀ and PV); backward 2.5× that
    (FlashAttention's convention: five matmuls, one recomputed). Bytes: q, k, v, out (+lse) forward;
    q, k, v, out, dout -> dq, dk, dv backward."""
    tensor = n * heads * tokens * head_dim * elem
    fwd_flops = 4 * n * heads * tokens * tokens * head_dim
    fwd = (4 * tensor, fwd_flops)
    bwd = (8 * tensor, int(2.5 * fwd_flops))
    if mode == "fwd":
        return fwd
    if mode == "bwd":
        return bwd
    return fwd[0] + bwd[0], fwd[1] + bwd[1]


def floor_us(bytes_: int, flops: int, cap: int) -> float:
    """The roofline floor in µs on the SXM part of compute capability ``cap`` (80 or 90)."""
    bandwidth, peak = PEAKS[cap]
    return max(bytes_ / bandwidth, flops / peak) * 1e6
