"""Shared by the benchmarks: device, sizes, providers, and the one timing helper (see conftest.py)."""

from __future__ import annotations

import pytest
import torch

ON_GPU = torch.cuda.is_available()
DEVICE = "cuda" if ON_GPU else "cpu"
DTYPE = torch.bfloat16 if ON_GPU else torch.float32
MODES = ("fwd", "bwd", "fwd+bwd")
PROVIDERS = ("eager", "compile", "triton")

# (N, T, D) residual-stream tensors: SiT-XL/2 with [CLS] (larger than an H100's 50 MB L2) and SiT-B/2.
ROW_SHAPES = {"sit-xl": (256, 257, 1152), "sit-b": (256, 256, 768)} if ON_GPU else {"tiny": (4, 65, 384)}
# (N, heads, T, head_dim) for QK-norm and attention.
HEAD_SHAPES = {"sit-xl": (256, 16, 257, 72), "sit-b": (256, 12, 256, 64)} if ON_GPU else {"tiny": (2, 4, 65, 72)}
# Compressor: (channels, (N, H, W)); the published 3072 -> 256 -> 16 encoder on 16x16 DINOv2 maps.
COMPRESSOR_SHAPES = {"published": ((3072, 256, 16), (256, 16, 16))} if ON_GPU else {"tiny": ((64, 32, 8), (2, 8, 8))}

# torch.compile on CPU costs seconds per graph; only these (op, mode) pairs compile there, so that
# the CPU run stays short while still exercising the compile provider end to end.
CPU_COMPILE = {("adaln_modulate", "fwd"), ("adaln_modulate", "bwd"), ("adaln_modulate", "fwd+bwd"), ("attention", "fwd")}


def skip_unless_timed(provider: str, op: str, mode: str) -> None:
    """Skip provider/op/mode combinations that are not timed on this device, with the reason."""
    if ON_GPU:
        return
    if provider == "triton":
        pytest.skip("interpreter timings are not performance (Triton is timed on GPU only)")
    if provider == "compile" and (op, mode) not in CPU_COMPILE:
        pytest.skip("torch.compile on CPU is timed for a few (op, mode) pairs only, to keep the CPU run short")


_compiled: dict = {}


def compiled(fn):
    """torch.compile(fn), one compiled function per fn for the whole session (modes share graphs).

    The bwd mode replays one forward graph's backward (retain_graph=True), which AOTAutograd
    refuses when it donated the saved buffers to the backward; donation saves memory, not time,
    so the benchmark process turns it off.
    """
    import torch._functorch.config

    torch._functorch.config.donated_buffer = False
    if fn not in _compiled:
        _compiled[fn] = torch.compile(fn)
    return _compiled[fn]


def measure(benchmark, fn, *, group: str, bytes_: int = 0, flops: int = 0, **info) -> None:
    """Time ``fn`` (median) and record ms, GB/s, TFLOP/s and ``info`` in the benchmark's extra_info."""
    benchmark.group = group
    for _ in range(3):  # compile (forward, and the lazily compiled backward) before any timing
        fn()
    if ON_GPU:
        torch.cuda.synchronize()
        import triton.testing

        median_ms = triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median")

        def synced():
            fn()
            torch.cuda.synchronize()

        benchmark.pedantic(synced, rounds=10, warmup_rounds=2)  # pytest-benchmark's own (host) view
        timer = "triton.testing.do_bench median"
    else:
        benchmark.pedantic(fn, rounds=10, warmup_rounds=2)
        stats = getattr(benchmark, "stats", None)
        median_ms = stats.stats.median * 1e3 if stats is not None else float("nan")
        timer = "pytest-benchmark median"
    seconds = median_ms * 1e-3
    benchmark.extra_info.update(
        device=torch.cuda.get_device_name() if ON_GPU else "cpu",
        timer=timer,
        median_ms=median_ms,
        bytes=bytes_,
        flops=flops,
        gbps=bytes_ / seconds / 1e9 if bytes_ and seconds > 0 else None,
        tflops=flops / seconds / 1e12 if flops and seconds > 0 else None,
        **info,
    )
