"""Bytes and FLOPs per benchmarked op, in one place, so GB/s and TFLOP/s are derived, not typed in.

Bytes are the minimum traffic of a perfectly fused implementation: every input read once, every
output written once (the number a kernel is judged by against the copy bandwidth). FLOPs count
multiply-adds as two and are given only where arithmetic can bound the runtime (conv, attention).

``python bench/_roofline.py --out ceilings.json`` measures this GPU's ceilings once: device-to-
device copy bandwidth (bytes read + written) and a large bf16 matmul's TFLOP/s.
"""

from __future__ import annotations

import argparse
import json
from typing import Sequence

MODES = ("fwd", "bwd", "fwd+bwd")


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


def compressor_encode_bytes_flops(n: int, channels: Sequence[int], h: int, w: int, elem: int) -> tuple:
    """The encoder of SemanticCompressor(channels), BatchNorm folded: conv, then per hidden width a
    residual block (conv+relu, conv+residual+relu), and so on; the last conv has no block."""
    total_bytes = total_flops = 0
    for i, (c_in, c_out) in enumerate(zip(channels[:-1], channels[1:])):
        convs = [(c_in, c_out, False)]
        if i < len(channels) - 2:
            convs += [(c_out, c_out, False), (c_out, c_out, True)]
        for ci, co, res in convs:
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


def measure_ceilings() -> dict:
    """Copy bandwidth (GB/s, read + write) and bf16 matmul TFLOP/s on the current CUDA device (medians)."""
    import torch
    import triton.testing

    src = torch.randn(512 * 1024 * 1024 // 4, device="cuda")  # 512 MiB, far larger than L2
    dst = torch.empty_like(src)
    ms = triton.testing.do_bench(lambda: dst.copy_(src), warmup=25, rep=200, return_mode="median")
    copy_gbps = 2 * src.numel() * src.element_size() / (ms * 1e-3) / 1e9
    a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    ms = triton.testing.do_bench(lambda: a @ b, warmup=25, rep=200, return_mode="median")
    matmul_tflops = 2 * 8192**3 / (ms * 1e-3) / 1e12
    return {
        "device": torch.cuda.get_device_name(),
        "copy_gbps": round(copy_gbps, 1),
        "matmul_bf16_tflops": round(matmul_tflops, 1),
    }


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="JSON file for the measured ceilings")
    args = parser.parse_args()
    ceilings = measure_ceilings()
    with open(args.out, "w") as f:
        json.dump(ceilings, f, indent=2)
    print(json.dumps(ceilings))
