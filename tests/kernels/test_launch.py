"""How kernels are launched: the interpreter-only paths follow how the kernels were built, and a
launch runs on its tensors' GPU whatever the current device is."""

import pytest
import torch

from reglue.kernels import _utils, adaln, conv, rmsnorm
from reglue.kernels import adaln_modulate, fused_conv2d, gated_residual_adaln, rms_norm


def test_interpreter_flag_matches_the_built_kernels():
    """conv.py upcasts bf16 dots only under the interpreter: the flag must agree with the kernels."""
    from triton.runtime.interpreter import InterpretedFunction

    for kernel in (adaln._adaln_fwd_kernel, adaln._adaln_bwd_kernel, rmsnorm._rms_norm_fwd_kernel, conv._conv3x3_kernel):
        assert isinstance(kernel, InterpretedFunction) == _utils.interpreter_enabled()


def test_device_guard_is_a_no_op_on_cpu():
    with _utils.device_guard(torch.zeros(1)):
        pass


@pytest.mark.gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")
def test_launch_on_a_non_current_gpu():
    """Tensors on cuda:1 while cuda:0 is current (Triton launches on the current device)."""
    dev = torch.device("cuda", 1)
    x = torch.randn(2, 5, 72, device=dev, requires_grad=True)
    y, gate, shift, scale = (torch.randn(s, device=dev) for s in ((2, 5, 72), (2, 72), (2, 72), (2, 72)))
    weight = torch.randn(72, device=dev)
    with torch.cuda.device(0):
        r, h = gated_residual_adaln(x, y, gate, shift, scale)
        (h.sum() + r.sum() + adaln_modulate(x, shift, scale).sum() + rms_norm(x, weight).sum()).backward()
        img = torch.randn(1, 16, 8, 8, device=dev)
        out = fused_conv2d(img, torch.randn(16, 16, 3, 3, device=dev), relu=True)
    torch.cuda.synchronize(dev)
    r_ref, h_ref = adaln.gated_residual_adaln_ref(x, y, gate, shift, scale)
    torch.testing.assert_close(h, h_ref, atol=1e-4, rtol=1e-4)
    assert out.device == dev and x.grad.device == dev and torch.isfinite(x.grad).all()
