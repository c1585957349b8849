"""Fused kernels vs eager PyTorch vs torch.compile (Inductor): adaLN pieces, RMSNorm, compressor convs.

Providers: ``eager`` = the ``*_ref`` function, ``compile`` = torch.compile of that same function,
``triton`` = ours. Modes: fwd, bwd (backward only, through a retained graph), fwd+bwd.
"""

from __future__ import annotations

import pytest
import torch
from _roofline import compressor_encode_bytes_flops, conv3x3_bytes_flops, row_op_bytes
from _common import (
    COMPRESSOR_SHAPES,
    DEVICE,
    DTYPE,
    HEAD_SHAPES,
    MODES,
    PROVIDERS,
    ROW_SHAPES,
    compiled,
    measure,
    skip_unless_timed,
)

from reglue.kernels import (
    adaln_modulate,
    adaln_modulate_ref,
    compressor_encode_fused,
    fused_conv2d,
    fused_conv2d_ref,
    gated_residual,
    gated_residual_adaln,
    gated_residual_adaln_ref,
    gated_residual_ref,
    pack_conv_weight,
    rms_norm,
    rms_norm_ref,
)
from reglue.models.compressor import SemanticCompressor

# op -> (triton function, eager reference, number of (N, D)-sized modulation inputs)
ROW_OPS = {
    "adaln_modulate": (adaln_modulate, adaln_modulate_ref, 2),
    "gated_residual_adaln": (gated_residual_adaln, gated_residual_adaln_ref, 3),
    "gated_residual": (gated_residual, gated_residual_ref, 1),
    "rms_norm": (rms_norm, rms_norm_ref, 0),
}


def _row_inputs(op: str, shape_name: str):
    """Leaf tensors (requires_grad) for one row op; rms_norm runs on QK-norm (N, H, T, hd) shapes."""
    def leaf(*shape, scale=1.0):
        return (torch.randn(shape, device=DEVICE) * scale).to(DTYPE).requires_grad_()

    if op == "rms_norm":
        shape = HEAD_SHAPES[shape_name]
        return shape, [leaf(*shape), leaf(shape[-1], scale=0.1)], 1
    shape = ROW_SHAPES[shape_name]
    n, _, d = shape
    mods = [leaf(n, d, scale=0.5) for _ in range(ROW_OPS[op][2])]
    if op == "adaln_modulate":
        return shape, [leaf(*shape), *mods], n
    return shape, [leaf(*shape), leaf(*shape), *mods], n  # x, y, gate(, shift, scale)


def _timed_fn(fn, inputs, mode: str):
    """The callable to time for one mode; backward-only reuses one forward graph."""
    def forward():
        out = fn(*inputs)
        return out if isinstance(out, tuple) else (out,)

    if mode == "fwd":
        return forward
    outs = forward()
    grads = [torch.randn_like(o) for o in outs]
    if mode == "bwd":
        return lambda: torch.autograd.grad(outs, inputs, grads, retain_graph=True)
    return lambda: torch.autograd.grad(forward(), inputs, grads)


def _provider_fn(provider: str, triton_fn, ref_fn):
    if provider == "compile":
        return compiled(ref_fn)
    return triton_fn if provider == "triton" else ref_fn


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("shape_name", list(ROW_SHAPES))
@pytest.mark.parametrize("op", list(ROW_OPS))
def test_row_op(benchmark, op, shape_name, provider, mode):
    skip_unless_timed(provider, op, mode)
    triton_fn, ref_fn, _ = ROW_OPS[op]
    shape, inputs, mod_rows = _row_inputs(op, shape_name)
    fn = _timed_fn(_provider_fn(provider, triton_fn, ref_fn), inputs, mode)
    measure(
        benchmark, fn,
        group=f"{op} {shape_name} {tuple(shape)} {mode}",
        bytes_=row_op_bytes(op, shape, mod_rows, inputs[0].element_size(), mode),
        op=op, shape=list(shape), dtype=str(DTYPE), provider=provider, mode=mode,
    )  # fmt: skip


def _compressor(channels):
    compressor = SemanticCompressor(channels).to(DEVICE)
    with torch.no_grad():
        for m in compressor.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.normal_(0, 0.5)
                m.running_var.uniform_(0.5, 2.0)
    return compressor.eval().requires_grad_(False).to(DTYPE)


@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("shape_name", list(COMPRESSOR_SHAPES))
def test_conv3x3(benchmark, shape_name, provider):
    """The compressor's first conv alone (C_in -> hidden): the implicit-GEMM efficiency. Every
    provider gets a channels-last input (cuDNN runs NHWC natively; ours reads NHWC) and ours a
    weight packed once, as ``compressor_encode_fused`` runs it."""
    skip_unless_timed(provider, "conv3x3", "fwd")
    channels, (n, h, w) = COMPRESSOR_SHAPES[shape_name]
    x = torch.randn(n, channels[0], h, w, device=DEVICE, dtype=DTYPE).contiguous(memory_format=torch.channels_last)
    weight = torch.randn(channels[1], channels[0], 3, 3, device=DEVICE, dtype=DTYPE) / (3 * channels[0] ** 0.5)
    if provider == "triton":
        weight = pack_conv_weight(weight)
    bias = torch.randn(channels[1], device=DEVICE, dtype=DTYPE)
    fn = _provider_fn(provider, fused_conv2d, fused_conv2d_ref)
    bytes_, flops = conv3x3_bytes_flops(n, channels[0], channels[1], h, w, x.element_size(), residual=False)
    with torch.no_grad():
        measure(
            benchmark, lambda: fn(x, weight, bias),
            group=f"conv3x3 {shape_name} {(n, channels[0], channels[1], h, w)} fwd", bytes_=bytes_, flops=flops,
            op="conv3x3", shape=[n, channels[0], channels[1], h, w], dtype=str(DTYPE), provider=provider, mode="fwd",
        )  # fmt: skip


@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("shape_name", list(COMPRESSOR_SHAPES))
def test_compressor_encode(benchmark, shape_name, provider):
    """Whole encoder: eager = cuDNN convs + eval BatchNorm + ReLU (unfolded), compile = Inductor on
    that, triton = BN folded, one fused launch per conv."""
    skip_unless_timed(provider, "compressor_encode", "fwd")
    channels, (n, h, w) = COMPRESSOR_SHAPES[shape_name]
    compressor = _compressor(channels)
    feats = torch.randn(n, channels[0], h, w, device=DEVICE, dtype=DTYPE)
    if provider == "triton":
        folded = compressor.fold_batchnorm()
        fn = lambda: compressor_encode_fused(folded, feats)  # noqa: E731
    else:
        encode = compressor.encode if provider == "eager" else compiled(compressor.encode)
        fn = lambda: encode(feats)  # noqa: E731
    bytes_, flops = compressor_encode_bytes_flops(n, channels, h, w, feats.element_size())
    with torch.no_grad():
        measure(
            benchmark, fn,
            group=f"compressor_encode {shape_name} {channels} {(n, h, w)} fwd", bytes_=bytes_, flops=flops,
            op="compressor_encode", shape=[n, *channels, h, w], dtype=str(DTYPE), provider=provider, mode="fwd",
        )  # fmt: skip
