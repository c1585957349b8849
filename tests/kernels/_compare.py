"""Run a kernel, its eager reference in the same dtype and the fp32 reference; compare outputs and
every gradient (the three-way rule for bf16/fp16, a tight comparison for fp32).

The rule itself lives in ``reglue.kernels.selfcheck`` (the runtime check of a device uses it too);
these wrappers turn its verdicts into assertions.
"""

from typing import Callable, Sequence

import torch

from reglue.kernels.selfcheck import compare_op, three_way_mismatch


def assert_three_way(kernel: torch.Tensor, eager: torch.Tensor, ref32: torch.Tensor, name: str, ulps: float = 1) -> None:
    """fp32: |kernel - ref32| tight. bf16/fp16: |kernel - ref32| <= 2 |eager - ref32| + atol (see
    ``three_way_mismatch``)."""
    problem = three_way_mismatch(kernel, eager, ref32, name, ulps)
    assert problem is None, problem


def check_op(kernel_fn, ref_fn, inputs, grad_outputs, dtype, input_names, output_names) -> None:
    """Compare kernel_fn against ref_fn (which takes ``upcast=``) on ``inputs`` cast to ``dtype``.

    All three runs see the same values: the low-precision inputs, upcast for the fp32 reference.
    """
    problem = compare_op(kernel_fn, ref_fn, inputs, grad_outputs, dtype, input_names, output_names)
    assert problem is None, problem


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
