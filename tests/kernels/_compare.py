"""Run a kernel, its eager reference in the same dtype and the fp32 reference; compare outputs and
every gradient (the three-way rule for bf16/fp16, a tight comparison for fp32)."""

from typing import Callable, Sequence

import torch

from tests.conftest import assert_close

# fp32: kernel and reference differ only by summation order.
FP32_RTOL = 1e-4
FP32_ATOL_REL = 1e-5  # times the largest |reference| element of that tensor


def outputs_and_grads(fn: Callable, inputs: Sequence[torch.Tensor], grad_outputs: Sequence[torch.Tensor]):
    """Fresh leaves from ``inputs``; returns (outputs, grads of every input), detached."""
    leaves = [t.detach().clone().requires_grad_(True) for t in inputs]
    outs = fn(*leaves)
    outs = tuple(outs) if isinstance(outs, (tuple, list)) else (outs,)
    torch.autograd.backward(outs, [g.to(o.dtype) for g, o in zip(grad_outputs, outs)])
    return [o.detach() for o in outs], [leaf.grad for leaf in leaves]


def assert_three_way(kernel: torch.Tensor, eager: torch.Tensor, ref32: torch.Tensor, name: str, ulps: float = 1) -> None:
    """fp32: |kernel - ref32| tight. bf16/fp16: |kernel - ref32| <= 2 |eager - ref32| + atol, with
    atol ``ulps`` units of the dtype's epsilon at the tensor's largest magnitude (1 for one op; a
    chain of ops, whose intermediates round differently, earns a few)."""
    assert kernel.dtype == eager.dtype, f"{name}: kernel dtype {kernel.dtype} != eager dtype {eager.dtype}"
    assert not torch.isnan(kernel).any(), f"{name}: NaN in kernel result ({int(torch.isnan(kernel).sum())} elements)"
    ref32 = ref32.float()
    scale = ref32.abs().max().item() if ref32.numel() else 0.0
    if kernel.dtype == torch.float32:
        assert_close(kernel, ref32, atol=FP32_ATOL_REL * max(scale, 1.0), rtol=FP32_RTOL, name=name)
        return
    err_kernel = (kernel.float() - ref32).abs()
    err_eager = (eager.float() - ref32).abs()
    atol = ulps * torch.finfo(kernel.dtype).eps * max(scale, 1e-3)
    bad = err_kernel > 2 * err_eager + atol
    if bad.any():
        worst = torch.where(bad, err_kernel - 2 * err_eager, torch.zeros_like(err_kernel)).flatten().topk(
            min(5, int(bad.sum()))
        ).indices
        rows = [
            f"  idx {tuple(int(i) for i in torch.unravel_index(w, kernel.shape))}: kernel {kernel.flatten()[w].item():.6g}, "
            f"eager {eager.flatten()[w].item():.6g}, ref32 {ref32.flatten()[w].item():.6g}"
            for w in worst
        ]
        raise AssertionError(
            f"{name} ({kernel.dtype}): {int(bad.sum())}/{kernel.numel()} elements break |kernel-ref32| <= "
            f"2|eager-ref32| + {atol:.3g}; max kernel err {err_kernel.max().item():.3g}, "
            f"max eager err {err_eager.max().item():.3g}:\n" + "\n".join(rows)
        )


def check_op(kernel_fn, ref_fn, inputs, grad_outputs, dtype, input_names, output_names) -> None:
    """Compare kernel_fn against ref_fn (which takes ``upcast=``) on ``inputs`` cast to ``dtype``.

    All three runs see the same values: the low-precision inputs, upcast for the fp32 reference.
    """
    low = [t.to(dtype) for t in inputs]
    grads_low = [g.to(dtype) for g in grad_outputs]
    k_out, k_grad = outputs_and_grads(kernel_fn, low, grads_low)
    e_out, e_grad = outputs_and_grads(lambda *a: ref_fn(*a, upcast=False), low, grads_low)
    r_out, r_grad = outputs_and_grads(
        lambda *a: ref_fn(*a, upcast=True), [t.float() for t in low], [g.float() for g in grads_low]
    )
    for name, k, e, r in zip(output_names, k_out, e_out, r_out):
        assert_three_way(k, e, r, name)
    for name, k, e, r in zip(input_names, k_grad, e_grad, r_grad):
        assert k is not None, f"d{name}: no gradient from the kernel"
        assert_three_way(k, e.to(k.dtype), r, f"d{name}")


def check_compiled_fullgraph(fn: Callable, inputs: Sequence[torch.Tensor], atol: float = 1e-5) -> None:
    """``torch.compile(fn, fullgraph=True)`` (no graph breaks) matches eager ``fn``: output and the
    gradients of ``out.square().sum()`` with respect to ``inputs``."""
    torch._dynamo.reset()
    out = torch.compile(fn, fullgraph=True)(*inputs)
    grads = torch.autograd.grad(out.square().sum(), inputs)
    out_ref = fn(*inputs)
    grads_ref = torch.autograd.grad(out_ref.square().sum(), inputs)
    torch.testing.assert_close(out, out_ref, atol=atol, rtol=atol)
    for g, g_ref in zip(grads, grads_ref):
        torch.testing.assert_close(g, g_ref, atol=10 * atol, rtol=10 * atol)
