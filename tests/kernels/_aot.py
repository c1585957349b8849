"""Compile every Triton kernel variant we launch to GPU machine code, without a GPU.

Triton compiles ahead of time for a target (``GPUTarget("cuda", 80|90, 32)``) down to cubin with
its bundled ptxas, so constructs that the CPU interpreter accepts but the real compiler rejects
fail here. Run in a process where TRITON_INTERPRET is unset (the kernels must be real JITFunctions):

    python -m tests.kernels._aot 80,90
"""

from __future__ import annotations

import sys

import torch

TYPES = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}


def variants(caps=(80, 90), dtypes=(torch.float32, torch.bfloat16), dims=((72, 4096), (1152, 257))):
    """(name, kernel, signature, constexprs, num_warps, num_stages, cap) for every launch we make."""
    from reglue.kernels import adaln, conv, rmsnorm
    from reglue.kernels._utils import row_tile

    for cap in caps:
        for dt in dtypes:
            p = "*" + TYPES[dt]
            for d, rows in dims:
                bm, bd, nw = row_tile(d, rows)
                tile = dict(BLOCK_M=bm, BLOCK_D=bd)
                for res, norm in ((True, True), (False, True), (True, False)):
                    flags = dict(HAS_RESIDUAL=res, HAS_NORM=norm, **tile)
                    sig = dict(X=p, Y=p, GATE=p, SHIFT=p, SCALE=p, R=p, H=p, M="i32", T="i32", D="i32",
                               stride_gate="i32", stride_shift="i32", stride_scale="i32", eps="fp32")
                    yield f"sm{cap} adaln_fwd {TYPES[dt]} D={d} res={res} norm={norm}", adaln._adaln_fwd_kernel, sig, flags, nw, 3, cap
                    sig = dict(DH=p, DR=p, XN=p, Y=p, GATE=p, SCALE=p, DX=p, DY=p, DSHIFT="*fp32", DSCALE="*fp32",
                               DGATE="*fp32", T="i32", D="i32", rows_per_chunk="i32", n_chunks="i32",
                               stride_gate="i32", stride_scale="i32", eps="fp32")
                    yield f"sm{cap} adaln_bwd {TYPES[dt]} D={d} res={res} norm={norm}", adaln._adaln_bwd_kernel, sig, flags, nw, 3, cap
                sig = dict(X=p, W=p, Y=p, M="i32", D="i32", eps="fp32")
                yield f"sm{cap} rms_fwd {TYPES[dt]} D={d}", rmsnorm._rms_norm_fwd_kernel, sig, tile, nw, 3, cap
                sig = dict(DY=p, X=p, W=p, DX=p, DW_PART="*fp32", M="i32", D="i32", eps="fp32")
                yield f"sm{cap} rms_bwd {TYPES[dt]} D={d}", rmsnorm._rms_norm_bwd_kernel, sig, tile, nw, 3, cap
            for c_in, c_out in ((3072, 256), (256, 16)):
                bp, bco, bci, nw, ns = conv._conv_blocks(c_in, c_out, 256, dt)
                for bias, res, relu in ((True, True, True), (True, False, False)):
                    sig = dict(X=p, Wt=p, B=p, RES=p, OUT=p, C_in="i32", C_out="i32", H="i32", W="i32")
                    flags = dict(HAS_BIAS=bias, HAS_RESIDUAL=res, RELU=relu,
                                 PRECISION="ieee" if dt == torch.float32 else "tf32", UPCAST_DOT=False,
                                 BLOCK_P=bp, BLOCK_CO=bco, BLOCK_CI=bci)
                    yield f"sm{cap} conv3x3 {TYPES[dt]} {c_in}->{c_out} res={res}", conv._conv3x3_kernel, sig, flags, nw, ns, cap


def compile_one(kernel, signature, constexprs, num_warps, num_stages, cap):
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    signature = dict(signature, **{k: "constexpr" for k in constexprs})
    src = ASTSource(fn=kernel, signature=signature,
                    constexprs={(kernel.arg_names.index(k),): v for k, v in constexprs.items()})
    return triton.compile(src, target=GPUTarget("cuda", cap, 32), options={"num_warps": num_warps, "num_stages": num_stages})


def main(argv) -> int:
    from reglue.kernels import _utils

    if _utils.interpreter_enabled():
        print("TRITON_INTERPRET is set: the kernels are interpreted functions; unset it", file=sys.stderr)
        return 2
    caps = tuple(int(c) for c in argv[0].split(",")) if argv else (80, 90)
    failures = 0
    for name, kernel, sig, flags, nw, ns, cap in variants(caps):
        try:
            compiled = compile_one(kernel, sig, flags, nw, ns, cap)
            print(f"ok   {name} (shared {compiled.metadata.shared} B)", flush=True)
        except Exception as exc:  # report every failing variant, not just the first
            failures += 1
            print(f"FAIL {name}: {type(exc).__name__}: {str(exc)[:1500]}", flush=True)
    print(f"{failures} failed")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
