"""Bytes and FLOPs per benchmarked op (defined once, in ``reglue.kernels.roofline``, which the
static kernel report uses too), so GB/s and TFLOP/s are derived, not typed in.

``python bench/_roofline.py --out ceilings.json`` measures this GPU's ceilings once: device-to-
device copy bandwidth (bytes read + written) and a large bf16 matmul's TFLOP/s.
"""

from __future__ import annotations

import argparse
import json

from reglue.kernels.roofline import (  # noqa: F401  (re-exported for the benchmarks)
    attention_bytes_flops,
    compressor_encode_bytes_flops,
    conv3x3_bytes_flops,
    row_op_bytes,
)


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
