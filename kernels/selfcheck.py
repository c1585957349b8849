"""Trust a fused kernel on a device only after it has met that device: one check per op.

``check_fused_ops(device, ...)`` runs every fused op once on small inputs (at the run's hidden
size, head dim and compressor widths, so the kernel variants compiled are the run's own) and
compares it with its ``*_ref``, output and every gradient, by the three-way rule the kernel tests
use: fp32 tight; bf16/fp16 ``|kernel - ref32| <= 2 |eager - ref32| + atol``; an fp32 convolution
that runs TF32 (the trainer allows TF32 on CUDA) by the same rule at TF32's precision. The fp32
reference is computed with TF32 off, whatever the process allows. Output buffers are
NaN-poisoned while it runs, so an element a kernel never writes fails. A kernel that fails to
compile or launch, or disagrees, is reported with the error; the caller runs the reference for
that op alone (``reglue.kernels.select_ops`` takes the passing set). One loud warning per failed
op is logged, and results are cached per (device, dtypes, sizes), so a process checks once.

The first check pays the Triton JIT for those variants (which the run needs anyway); the check
itself is milliseconds on a GPU. ``python -m reglue.kernels.selfcheck`` prints the table for the
visible GPU (or, with ``TRITON_INTERPRET=1``, the CPU).

The comparison helpers (``outputs_and_grads``, ``three_way_mismatch``, ``compare_op``) are also
what ``tests/kernels`` assert with, so tests and the runtime check hold kernels to one standard.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Callable, Dict, Optional, Sequence, Tuple

import torch

from . import _utils
from ._utils import tf32_allowed

log = logging.getLogger("reglue.kernels")

# fp32: kernel and reference differ only by summation order.
FP32_RTOL = 1e-4
FP32_ATOL_REL = 1e-5  # times the largest |reference| element of that tensor

TF32_EPS = 2.0**-10
"""Epsilon of TF32 (10 explicit mantissa bits; bf16 has 7): a TF32 tensor-core dot keeps that much
of each fp32 operand and accumulates in fp32, so its products are off by up to about 2^-10
relative (2^-11 if the operands are rounded to nearest, as cvt.rna does, 2^-10 if truncated)."""


def outputs_and_grads(fn: Callable, inputs: Sequence[Optional[torch.Tensor]], grad_outputs=None):
    """Fresh leaves from ``inputs`` (None passes through); returns (outputs, grads of every input),
    detached. ``grad_outputs`` None: forward only (inference ops), grads are all None."""
    backward = grad_outputs is not None
    leaves = [None if t is None else t.detach().clone().requires_grad_(backward) for t in inputs]
    outs = fn(*leaves)
    outs = tuple(outs) if isinstance(outs, (tuple, list)) else (outs,)
    if backward:
        torch.autograd.backward(outs, [g.to(o.dtype) for g, o in zip(grad_outputs, outs)])
    return [o.detach() for o in outs], [None if leaf is None else leaf.grad for leaf in leaves]


def three_way_mismatch(kernel: torch.Tensor, eager: torch.Tensor, ref32: torch.Tensor, name: str,
                       ulps: float = 1, tf32: bool = False) -> Optional[str]:
    """None when ``kernel`` is as close to the fp32 reference as the rule asks, else why not.

    fp32: ``|kernel - ref32| <= FP32_ATOL_REL·max|ref32| + FP32_RTOL·|ref32|``. bf16/fp16:
    ``|kernel - ref32| <= 2 |eager - ref32| + atol``, atol ``ulps`` units of the dtype's epsilon
    at the tensor's largest magnitude (1 for one op; a chain of ops earns a few). ``tf32``: an fp32
    kernel whose dots run TF32 is held to the bf16/fp16 rule with TF32's epsilon
    (:data:`TF32_EPS`), ``eager`` being the reference with TF32 allowed, ``ref32`` without.
    """
    if kernel is None:
        return f"{name}: the kernel gave no result (no gradient?)"
    if kernel.shape != eager.shape or kernel.dtype != eager.dtype:
        return (f"{name}: kernel gives {tuple(kernel.shape)} {kernel.dtype}, "
                f"the reference {tuple(eager.shape)} {eager.dtype}")
    ref32 = ref32.float()
    n_nan = int(torch.isnan(kernel).sum()) - int(torch.isnan(ref32).sum())
    if n_nan > 0:
        return f"{name} ({kernel.dtype}): {n_nan} more NaN elements than the reference"
    scale = ref32.abs().max().item() if ref32.numel() else 0.0
    err_kernel = (kernel.float() - ref32).abs().nan_to_num(0.0)
    if kernel.dtype == torch.float32 and not tf32:
        allowed = FP32_ATOL_REL * max(scale, 1.0) + FP32_RTOL * ref32.abs()
        rule = f"{FP32_ATOL_REL:g}·max(|ref|, 1) + {FP32_RTOL:g}·|ref|"
    else:
        err_eager = (eager.float() - ref32).abs().nan_to_num(0.0)
        eps = TF32_EPS if kernel.dtype == torch.float32 else torch.finfo(kernel.dtype).eps
        allowed = 2 * err_eager + ulps * eps * max(scale, 1e-3)
        rule = f"2|eager-ref32| + atol{' (TF32)' if kernel.dtype == torch.float32 else ''}"
    bad = err_kernel > allowed
    if not bad.any():
        return None
    worst = (err_kernel - allowed).flatten().topk(min(5, int(bad.sum()))).indices
    rows = [f"  idx {tuple(int(i) for i in torch.unravel_index(w, kernel.shape))}: kernel "
            f"{kernel.flatten()[w].item():.6g}, eager {eager.flatten()[w].item():.6g}, ref32 {ref32.flatten()[w].item():.6g}"
            for w in worst]
    return (f"{name} ({kernel.dtype}): {int(bad.sum())}/{kernel.numel()} elements break |kernel-ref32| <= {rule}; "
            f"max error {err_kernel.max().item():.3g} at max |ref32| {scale:.3g}:\n" + "\n".join(rows))


def compare_op(kernel_fn: Callable, ref_fn: Callable, inputs, grad_outputs, dtype: torch.dtype,
               input_names: Sequence[str], output_names: Sequence[str], ulps: float = 1,
               tf32: bool = False) -> Optional[str]:
    """Run ``kernel_fn``, ``ref_fn(..., upcast=False)`` and ``ref_fn(..., upcast=True)`` on
    ``inputs`` cast to ``dtype`` (the fp32 reference sees those same values upcast); None when
    every output and every input gradient passes :func:`three_way_mismatch`, else the failures.
    ``grad_outputs`` None compares the forward only.

    The kernel runs under the process's TF32 settings, the fp32 reference always without TF32 (it
    is the truth), the same-dtype reference with TF32 exactly when ``tf32`` says the kernel's fp32
    dots run TF32 (then fp32 outputs are judged at TF32's precision)."""
    low = [None if t is None else t.to(dtype) for t in inputs]
    grads_low = None if grad_outputs is None else [g.to(dtype) for g in grad_outputs]
    up = [None if t is None else t.float() for t in low]
    grads_up = None if grad_outputs is None else [g.float() for g in grads_low]
    k_out, k_grad = outputs_and_grads(kernel_fn, low, grads_low)
    with tf32_allowed(tf32):
        e_out, e_grad = outputs_and_grads(lambda *a: ref_fn(*a, upcast=False), low, grads_low)
    with tf32_allowed(False):
        r_out, r_grad = outputs_and_grads(lambda *a: ref_fn(*a, upcast=True), up, grads_up)
    problems = [three_way_mismatch(k, e, r, name, ulps, tf32)
                for name, k, e, r in zip(output_names, k_out, e_out, r_out)]
    if grad_outputs is not None:
        problems += [three_way_mismatch(k, e if k is None else e.to(k.dtype), r, f"d{name}", ulps, tf32)
                     for name, k, e, r in zip(input_names, k_grad, e_grad, r_grad) if r is not None]
    problems = [p for p in problems if p]
    return "\n".join(problems) if problems else None


# --------------------------------------------------------------------------------------------
# The check
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class CheckSizes:
    """Shapes the ops are checked at: the run's widths (so the compiled variants are the run's),
    few rows. ``conv_channels``: (C_in, C_out) of a compressor convolution."""

    hidden_size: int = 64
    head_dim: int = 16
    tokens: int = 17
    conv_channels: Tuple[int, int] = (32, 16)


def _case(op: str, sizes: CheckSizes, device: torch.device):
    """(kernel_fn, ref_fn, inputs, grad_outputs or None, input names, output names) for ``op``,
    random inputs from a seeded generator on ``device``."""
    from .adaln import adaln_modulate, adaln_modulate_ref, gated_residual, gated_residual_adaln
    from .adaln import gated_residual_adaln_ref, gated_residual_ref
    from .conv import fused_conv2d, fused_conv2d_ref
    from .rmsnorm import rms_norm, rms_norm_ref

    g = torch.Generator(device=device).manual_seed(0)

    def randn(*shape, std=1.0, mean=0.0):
        return torch.randn(shape, generator=g, device=device) * std + mean

    n, t, d = 2, sizes.tokens, sizes.hidden_size
    if op == "fused_conv2d":  # inference only: the forward, every epilogue (bias, residual, ReLU) on
        c_in, c_out = sizes.conv_channels
        inputs = [randn(1, c_in, 6, 6), randn(c_out, c_in, 3, 3, std=1 / (3 * c_in**0.5)), randn(c_out), randn(1, c_out, 6, 6)]
        return (lambda *a: fused_conv2d(*a, relu=True), lambda *a, upcast: fused_conv2d_ref(*a, relu=True, upcast=upcast),
                inputs, None, ["x", "weight", "bias", "residual"], ["out"])
    if op == "rms_norm":  # QK-norm: (N, heads, T, head_dim) rows
        x = randn(n, 2, t, sizes.head_dim)
        return rms_norm, rms_norm_ref, [x, randn(sizes.head_dim, std=0.5, mean=1.0)], [randn(*x.shape)], ["x", "weight"], ["y"]
    x, y = randn(n, t, d, std=2.0, mean=0.5), randn(n, t, d)
    gate, shift, scale = (randn(n, d, std=0.5) for _ in range(3))
    if op == "adaln_modulate":
        return adaln_modulate, adaln_modulate_ref, [x, shift, scale], [randn(n, t, d)], ["x", "shift", "scale"], ["h"]
    if op == "gated_residual":
        return gated_residual, gated_residual_ref, [x, y, gate], [randn(n, t, d)], ["x", "y", "gate"], ["out"]
    if op == "gated_residual_adaln":
        return (gated_residual_adaln, gated_residual_adaln_ref, [x, y, gate, shift, scale], [randn(n, t, d), randn(n, t, d)],
                ["x", "y", "gate", "shift", "scale"], ["r", "h"])
    raise ValueError(f"unknown fused op {op!r}; known: {list(_utils.FUSED_OPS)}")


def check_op(op: str, device: torch.device, dtype: torch.dtype, sizes: CheckSizes = CheckSizes()) -> Optional[str]:
    """None when ``op`` compiles, launches and agrees with its reference on ``device`` in
    ``dtype``; otherwise the error (exception or mismatch) as text."""
    if not _utils.can_run_triton(torch.empty(0, device=device)):  # the "kernel" would be the reference itself
        return "Triton cannot run here (not installed, or a CPU device without TRITON_INTERPRET=1)"
    from .conv import uses_tf32

    kernel_fn, ref_fn, inputs, grads, in_names, out_names = _case(op, sizes, device)
    tf32 = op == "fused_conv2d" and uses_tf32(dtype)  # the one op with dots
    poison = _utils.poison_outputs
    _utils.poison_outputs = True
    try:
        return compare_op(kernel_fn, ref_fn, inputs, grads, dtype, in_names, out_names, tf32=tf32)  # syncs: reads results
    except Exception as exc:  # a compile, launch or resource failure: the op must not run fused
        _check_device_usable(device, op, exc)
        return f"{type(exc).__name__}: {exc}".strip()
    finally:
        _utils.poison_outputs = poison


def _check_device_usable(device: torch.device, op: str, exc: Exception) -> None:
    """A device-side fault (illegal address, ...) leaves the CUDA context unusable for the rest of
    the process: eager fallback is impossible then, so say which kernel did it and how to run."""
    if device.type != "cuda":
        return
    try:
        torch.cuda.synchronize(device)
    except Exception:
        raise RuntimeError(
            f"reglue.kernels.{op} crashed the GPU during its self-check ({type(exc).__name__}: {exc}); the CUDA "
            "context cannot be used any more in this process. Run with --kernels eager (and report this)."
        ) from exc


_results: Dict[tuple, Dict[str, Optional[str]]] = {}


def check_fused_ops(device, dtypes: Sequence[torch.dtype] = (torch.float32,), sizes: CheckSizes = CheckSizes(),
                    ops: Sequence[str] = _utils.FUSED_OPS) -> Dict[str, Optional[str]]:
    """op -> None (runs fused) or the error that sends it to the eager reference, for ``device``.

    Each op is checked in every dtype of ``dtypes``, once per process for the same arguments and
    TF32 setting; a failure is logged once as a warning naming the op, the device and the error.
    """
    device = torch.device(device)
    # TF32 changes what an fp32 conv computes (and the rule it is judged by): part of the key.
    key = (str(device), tuple(dtypes), sizes, tuple(ops), torch.backends.cuda.matmul.allow_tf32)
    if key in _results:
        return dict(_results[key])
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else "the Triton interpreter"
    results = {}
    for op in ops:
        errors = [f"[{str(dtype).removeprefix('torch.')}] {err}"
                  for dtype in dtypes if (err := check_op(op, device, dtype, sizes)) is not None]
        results[op] = "\n".join(errors) if errors else None
        if errors:
            log.warning(
                "\n%s\nFUSED KERNEL DISABLED: reglue.kernels.%s failed its self-check on %s (%s); it runs as "
                "eager PyTorch for this process (correct, slower). Error:\n%s\n%s",
                "!" * 100, op, device, where, results[op], "!" * 100,
            )
    _results[key] = results
    return dict(results)


def passed(results: Dict[str, Optional[str]]) -> frozenset:
    """The ops of a :func:`check_fused_ops` result that run fused."""
    return frozenset(op for op, error in results.items() if error is None)


def main() -> int:
    """Print the self-check of every op on this machine's GPU (or the interpreter); exit 1 on any failure."""
    logging.basicConfig(level=logging.INFO)
    if not (torch.cuda.is_available() or _utils.interpreter_enabled()):
        print("no CUDA device and TRITON_INTERPRET is not 1: nothing to check")
        return 2
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    sizes = CheckSizes(hidden_size=1152, head_dim=72, tokens=257, conv_channels=(3072, 256)) if device.type == "cuda" else CheckSizes()
    dtypes = (torch.float32, torch.bfloat16)
    results = check_fused_ops(device, dtypes, sizes)
    for op, error in results.items():
        print(f"{op:22s} {'fused' if error is None else 'EAGER (failed: ' + error.splitlines()[0] + ')'}")
    return 0 if all(e is None for e in results.values()) else 1


if __name__ == "__main__":
    raise SystemExit(main())
