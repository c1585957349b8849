"""Compile every Triton kernel variant we launch to GPU machine code, without a GPU, as the JIT would.

The launches are recorded from the real launchers at the real shapes of SiT-B/2 and SiT-XL/2
REGLUE runs (QK-norm on, so RMSNorm is covered; and SiT-XL/2's compressor convs in fp32 with TF32
allowed, as an ``encoders.dtype=fp32`` run has them) and at odd shapes in fp32 (exact: TF32 off)
and bf16, then
specialised by Triton's own binder (16-byte alignment of pointers, divisibility of ints by 16)
and compiled for ``GPUTarget("cuda", 80|90, 32)`` by the bundled ptxas (``reglue.kernels.report``).
Constructs the CPU interpreter accepts but the real compiler rejects fail here, and the facts of
each cubin (registers, spills, access widths, MMA, cp.async) are written for the tests to assert.
Run in a process where TRITON_INTERPRET is unset (the kernels must be real JITFunctions):

    python -m tests.kernels._aot --arch 80,90 --json facts.json
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import multiprocessing
import os
import sys

import torch


TF32_SET = "sit-xl-2 fp32 convs (TF32)"


def shape_sets():
    """name -> RunShapes the variants are recorded at."""
    from reglue.kernels.report import RunShapes, shapes_of_preset

    sets = {name: dataclasses.replace(shapes_of_preset(f"reglue-{name}", 32), qk_norm=True)
            for name in ("sit-b-2", "sit-xl-2")}
    # encoders.dtype=fp32: the compressor's convs in fp32 on TF32 tensor cores (the trainer allows TF32).
    sets[TF32_SET] = dataclasses.replace(sets["sit-xl-2"], conv_dtype=torch.float32, tf32=True)
    for dtype, d, head_dim in ((torch.float32, 100, 72), (torch.bfloat16, 72, 100)):
        sets[f"odd D={d} hd={head_dim} {str(dtype)[6:]}"] = RunShapes(
            batch=2, tokens=17, hidden_size=d, head_dim=head_dim, num_heads=2, qk_norm=True,
            compressor_channels=(40, 24, 8), feature_grid=6, dtype=dtype, conv_dtype=dtype)
    return sets


REAL_SETS = ("sit-b-2", "sit-xl-2")
EXACT_FP32_SET = "odd D=100 hd=72 float32"


def reads_instructions(name: str, kernel: str) -> bool:
    """Whether the tests read the instruction mix of ``kernel``'s variants in shape set ``name``
    (tests/kernels/test_kernel_report.py): every kernel at the real shapes (spills, access widths,
    cp.async and MMA), the convs of the TF32 and the exact fp32 sets (MMA against FMA). The other
    variants are compiled (ptxas must accept them) and their resource usage read, not disassembled:
    the disassembly is about half of this script's CPU time (~0.3 s per cubin)."""
    return name in REAL_SETS or (name in (TF32_SET, EXACT_FP32_SET) and kernel == "conv3x3")


def _compile_set(item):
    """One (shape set name, arch): {"set", "arch", "rows"}."""
    from reglue.kernels.report import record_run_launches, report_rows

    name, arch = item
    shapes = shape_sets()[name]
    return {"set": name, "arch": arch, "rows": report_rows(shapes, arch, record_run_launches(shapes, arch),
                                                           instructions=lambda kernel: reads_instructions(name, kernel))}


def compile_all(archs, workers=None):
    """[{"set", "arch", "rows"}] for every shape set and arch, in that order. The (set, arch) pairs
    compile in ``workers`` processes (default: the CPUs this process may use): ptxas is
    single-threaded and the pairs are independent. A variant shared by several sets is compiled
    once per TRITON_CACHE_DIR (its cubin is cached) unless two workers reach it at once."""
    items = [(name, arch) for name in shape_sets() for arch in archs]
    workers = min(workers or len(os.sched_getaffinity(0)), len(items))
    if workers <= 1:
        return [_compile_set(item) for item in items]
    with multiprocessing.get_context("spawn").Pool(workers) as pool:  # spawn: no forked torch thread pools
        return pool.map(_compile_set, items, chunksize=1)


def main(argv) -> int:
    from reglue.kernels import _utils

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", default="80,90")
    parser.add_argument("--json")
    parser.add_argument("--workers", type=int, default=None, help="processes (default: the CPUs this process may use)")
    args = parser.parse_args(argv)
    if _utils.interpreter_enabled():
        print("TRITON_INTERPRET is set: the kernels are interpreted functions; unset it", file=sys.stderr)
        return 2
    results = compile_all(tuple(int(a) for a in args.arch.split(",")), args.workers)
    failures = 0
    for result in results:
        for row in result["rows"]:
            name = f"sm{result['arch']} {result['set']}: {row['kernel']} {row['constexprs']} ({', '.join(row['ops'])})"
            if "error" in row:
                failures += 1
                print(f"FAIL {name}: {row['error']}", flush=True)
            else:
                spills = row["spill_instructions"]
                print(f"ok   {name}: {row['registers']} regs, {row['local_bytes']} B local, "
                      f"{'not disassembled' if spills is None else f'{spills} spill instructions'}, "
                      f"shared {row['shared_bytes']} B", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1, default=str)
    print(f"{failures} failed")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
