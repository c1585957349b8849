"""The backward's (N, D) / (D,) gradients: every partial row of one backward summed (and cast) by
one column_sums launch, so each op's backward is two launches, its kernel and that one."""

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode, _disable_current_modes
from triton.runtime import interpreter

from reglue.kernels import _utils
from reglue.kernels._partials import column_sums
from reglue.kernels.adaln import adaln_modulate, gated_residual, gated_residual_adaln
from reglue.kernels.rmsnorm import rms_norm

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.mark.parametrize("shape", [(6, 17, 1152), (1, 528, 72), (2, 1, 100), (3, 40, 5)], ids=str)
def test_column_sums(shape):
    part = torch.randn(shape, device=DEVICE)
    total = column_sums(part, torch.float32)
    torch.testing.assert_close(total, part.double().sum(1).float(), atol=1e-5, rtol=1e-5)
    # The cast is part of the launch: the same fp32 sums, rounded once (within one bf16 unit: the
    # GPU rounds to nearest, the interpreter truncates).
    low = column_sums(part, torch.bfloat16)
    assert low.dtype == torch.bfloat16
    assert ((low.float() - total).abs() <= torch.finfo(torch.bfloat16).eps * total.abs()).all()
    assert torch.equal(column_sums(part, torch.float32), total)  # a fixed order: deterministic


_NOT_A_LAUNCH = {torch.ops.aten.empty.memory_format, torch.ops.aten.empty_strided.default,
                 torch.ops.aten.new_empty.default, torch.ops.aten.new_empty_strided.default}


class _CountLaunches(TorchDispatchMode):
    """Records every aten op that computes (views and allocations launch nothing), inside reglue's
    custom ops too (their Python bodies run under the mode), and every Triton kernel launch."""

    def __init__(self, record):
        super().__init__()
        self.record = record

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func.namespace == "reglue":
            opdef = torch._library.custom_ops._maybe_get_opdef(func)
            with _CountLaunches(self.record):
                return opdef._init_fn(*args, **kwargs)
        if not func.is_view and func not in _NOT_A_LAUNCH:
            self.record.append(str(func))
        return func(*args, **kwargs)


@pytest.fixture
def launches(monkeypatch):
    """The launches of the block under ``with _CountLaunches(launches):``."""
    record = []
    run = interpreter.GridExecutor.__call__

    def counted(self, *args, **kwargs):
        record.append(f"triton {self.fn.__name__}")
        with _disable_current_modes():  # the interpreter's own copies are not the kernel's launches
            return run(self, *args, **kwargs)

    monkeypatch.setattr(interpreter.GridExecutor, "__call__", counted)
    monkeypatch.setattr(_utils, "poison_outputs", False)  # NaN fills are the tests' own launches
    return record


def _backward_launches(record, fn, inputs):
    leaves = [t.detach().requires_grad_() for t in inputs]
    outs = fn(*leaves)
    outs = outs if isinstance(outs, tuple) else (outs,)
    grads = [torch.randn_like(o) for o in outs]
    record.clear()
    with _CountLaunches(record):
        torch.autograd.grad(outs, leaves, grads)
    return list(record)


@pytest.mark.skipif(not _utils.interpreter_enabled(), reason="counts the Triton interpreter's launches")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("op", ["adaln_modulate", "gated_residual_adaln", "gated_residual", "rms_norm"])
def test_backward_is_its_kernel_and_one_column_sum(launches, op, dtype):
    n, t, d = 2, 33, 72
    x, y = (torch.randn(n, t, d, device=DEVICE, dtype=dtype) for _ in range(2))
    gate, shift, scale = (torch.randn(n, d, device=DEVICE, dtype=dtype) for _ in range(3))
    fn, inputs = {
        "adaln_modulate": (adaln_modulate, [x, shift, scale]),
        "gated_residual_adaln": (gated_residual_adaln, [x, y, gate, shift, scale]),
        "gated_residual": (gated_residual, [x, y, gate]),
        "rms_norm": (rms_norm, [x, torch.randn(d, device=DEVICE, dtype=dtype)]),
    }[op]
    kernel = "_rms_norm_bwd_kernel" if op == "rms_norm" else "_adaln_bwd_kernel"
    assert _backward_launches(launches, fn, inputs) == [f"triton {kernel}", "triton _column_sum_kernel"]
