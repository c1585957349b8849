"""The device self-check: real kernels pass; a kernel that fails to launch, or computes wrong
numbers forward or backward, is reported with its error and a loud warning, and only that op
falls back to its eager reference."""

import logging

import pytest
import torch

from reglue.kernels import _utils, adaln, conv, rmsnorm, select_ops, selfcheck
from reglue.kernels.adaln import adaln_modulate, gated_residual, gated_residual_adaln_ref
from reglue.models.sit import SiT

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")


@pytest.fixture(autouse=True)
def _fresh_results(monkeypatch):
    monkeypatch.setattr(selfcheck, "_results", {})


def _fail_gated_residual_adaln(monkeypatch):
    """The launcher raises, as a Triton compile or launch error would, for gated_residual_adaln only."""
    launch = adaln._launch_fwd

    def failing(x, y, gate, shift, scale, eps):
        if y is not None and shift is not None:
            raise RuntimeError("triton.runtime.errors.OutOfResources: shared memory (injected)")
        return launch(x, y, gate, shift, scale, eps)

    monkeypatch.setattr(adaln, "_launch_fwd", failing)


def test_real_kernels_pass():
    results = selfcheck.check_fused_ops(DEVICE, (torch.float32, torch.bfloat16))
    assert results == {op: None for op in _utils.FUSED_OPS}


def test_launch_failure_disables_that_op_only_with_one_loud_warning(monkeypatch, caplog):
    _fail_gated_residual_adaln(monkeypatch)
    with caplog.at_level(logging.WARNING, logger="reglue.kernels"):
        results = selfcheck.check_fused_ops(DEVICE)
        again = selfcheck.check_fused_ops(DEVICE)  # once per process: cached, no second warning
    assert results == again
    assert "OutOfResources" in results["gated_residual_adaln"]
    assert selfcheck.passed(results) == set(_utils.FUSED_OPS) - {"gated_residual_adaln"}
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1
    assert "FUSED KERNEL DISABLED: reglue.kernels.gated_residual_adaln" in warnings[0] and "OutOfResources" in warnings[0]


def test_wrong_forward_numbers_are_caught(monkeypatch):
    fwd = rmsnorm._rms_norm_fwd
    monkeypatch.setattr(rmsnorm, "_rms_norm_fwd", lambda x, w, eps: fwd(x, w, eps) * 1.01)
    results = selfcheck.check_fused_ops(DEVICE, ops=("rms_norm", "adaln_modulate"))
    assert results["adaln_modulate"] is None
    assert "y (torch.float32)" in results["rms_norm"] and "elements break" in results["rms_norm"]


def test_wrong_backward_numbers_are_caught(monkeypatch):
    """A forward that is right and a gradient that is not (dshift dropped) must fail too."""
    bwd = adaln._adaln_modulate_bwd

    def zero_dshift(dh, x, scale, eps, mod_dtype):
        dx, dmod = bwd(dh, x, scale, eps, mod_dtype)  # dmod: (dshift, dscale) stacked
        return dx, torch.stack([torch.zeros_like(dmod[0]), dmod[1]])

    monkeypatch.setattr(adaln, "_adaln_modulate_bwd", zero_dshift)
    error = selfcheck.check_fused_ops(DEVICE, ops=("adaln_modulate",))["adaln_modulate"]
    assert error is not None and "dshift (torch.float32)" in error and "elements break" in error
    assert "dscale" not in error


def test_unwritten_output_elements_are_caught(monkeypatch):
    """Outputs are NaN-poisoned during the check: a kernel that skips rows fails."""
    launch = adaln._launch_fwd

    def skips_last_token(*args):
        r, h = launch(*args)
        h[:, -1] = _utils.empty_output(h[:, -1].shape, h.dtype, h.device)  # as if never written
        return r, h

    monkeypatch.setattr(adaln, "_launch_fwd", skips_last_token)
    error = selfcheck.check_fused_ops(DEVICE, ops=("adaln_modulate",))["adaln_modulate"]
    assert error is not None and "NaN" in error


def test_model_runs_the_reference_for_a_failed_op_and_kernels_for_the_rest(monkeypatch):
    _fail_gated_residual_adaln(monkeypatch)
    fused = selfcheck.passed(selfcheck.check_fused_ops(DEVICE))
    config = dict(input_size=8, patch_size=2, in_channels=4, hidden_size=64, depth=2, num_heads=4, num_classes=5,
                  z_dims=(16,), encoder_depth=1, projector_dim=16, cls_token_dim=8)
    model = SiT(kernels=fused, **config).to(DEVICE)
    eager = SiT(kernels="eager", **config).to(DEVICE)
    with torch.no_grad():
        for p in eager.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    model.load_state_dict(eager.state_dict())
    ops = model.blocks[0].ops
    assert ops.gated_residual_adaln is gated_residual_adaln_ref
    assert ops.adaln_modulate is adaln_modulate and ops.gated_residual is gated_residual
    assert select_ops(fused).adaln_modulate is adaln_modulate
    x, t, y, cls = torch.randn(2, 4, 8, 8), torch.rand(2), torch.tensor([1, 3]), torch.randn(2, 8)
    inputs = [v.to(DEVICE) for v in (x, t, y, cls)]
    model.eval(), eager.eval()
    out, zs, cls_out = model(*inputs)  # the failing launcher is never reached
    want, want_zs, want_cls = eager(*inputs)
    torch.testing.assert_close(out, want, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(cls_out, want_cls, atol=1e-4, rtol=1e-4)


def _tf32_operands(t: torch.Tensor, rounding: str) -> torch.Tensor:
    """fp32 -> the TF32 value a tensor core multiplies (10 mantissa bits kept, fp32 storage): rounded
    to nearest, ties away (cvt.rna.tf32.f32), or truncated (the low 13 bits ignored)."""
    bits = t.contiguous().view(torch.int32)
    if rounding == "rna":
        bits = bits + 0x1000  # half a TF32 unit on the magnitude bits; a carry moves the exponent, as rounding does
    return (bits & ~0x1FFF).view(torch.float32)


def _conv_as_on_tf32_tensor_cores(monkeypatch, rounding: str, bug=None, always: bool = False):
    """fused_conv2d computes what a GPU's TF32 dot does when the kernel runs TF32 (``always``: even
    when it should not): the interpreter multiplies exact fp32, so the operands are reduced to TF32
    first (accumulation stays fp32). ``bug`` changes the input as a kernel bug would."""
    launch = conv._fused_conv2d_fwd

    def tf32_launch(x, weight, bias, residual, relu):
        if always or conv.uses_tf32(x.dtype):
            x, weight = _tf32_operands(x, rounding), _tf32_operands(weight, rounding)
        return launch(x if bug is None else bug(x), weight, bias, residual, relu)

    monkeypatch.setattr(conv, "_fused_conv2d_fwd", tf32_launch)


RUN_CONV = selfcheck.CheckSizes(conv_channels=(3072, 256))  # the REGLUE compressor's first conv: 27648-term dots


def _allow_tf32(allowed: bool):
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = allowed  # the autouse fixture restores them


@pytest.mark.parametrize("rounding", ["rna", "truncate"])
def test_fp32_conv_running_tf32_passes_at_tf32_precision(monkeypatch, rounding):
    """The trainer allows TF32 on CUDA before the self-check: the fp32 conv then runs TF32 and is
    judged at TF32's precision (the exact-fp32 rule fails ~2000-3500 of its 9216 outputs)."""
    _allow_tf32(True)
    _conv_as_on_tf32_tensor_cores(monkeypatch, rounding)
    results = selfcheck.check_fused_ops(DEVICE, (torch.float32,), RUN_CONV, ("fused_conv2d",))
    assert results == {"fused_conv2d": None}


def test_tf32_rule_still_catches_a_wrong_conv(monkeypatch):
    """The last input channel dropped (an off-by-one in the channel mask) moves each output by
    ~2x TF32's rounding error: caught by the TF32 rule."""
    _allow_tf32(True)
    _conv_as_on_tf32_tensor_cores(monkeypatch, "rna", bug=lambda x: torch.cat([x[:, :-1], 0 * x[:, -1:]], 1))
    error = selfcheck.check_op("fused_conv2d", DEVICE, torch.float32, RUN_CONV)
    assert error is not None and "(TF32)" in error


def test_exact_fp32_conv_is_held_to_the_fp32_rule(monkeypatch):
    """TF32 off: the conv must compute exact fp32, so TF32-rounded results fail."""
    _allow_tf32(False)
    _conv_as_on_tf32_tensor_cores(monkeypatch, "rna", always=True)
    error = selfcheck.check_op("fused_conv2d", DEVICE, torch.float32, RUN_CONV)
    assert error is not None and "(TF32)" not in error and "elements break" in error


def test_unknown_op_names_are_rejected():
    with pytest.raises(ValueError, match="unknown fused ops"):
        select_ops({"adaln_modulate", "layer_norm"})
    with pytest.raises(ValueError, match="kernels must be one of"):
        select_ops("cuda")


@pytest.mark.gpu
@pytest.mark.parametrize("allow_tf32", [False, True])
def test_real_kernels_pass_at_sit_xl_sizes_gpu(allow_tf32):
    """As a run checks them: the trainer allows TF32 first (the fp32 conv then runs TF32)."""
    _allow_tf32(allow_tf32)
    sizes = selfcheck.CheckSizes(hidden_size=1152, head_dim=72, tokens=257, conv_channels=(3072, 256))
    results = selfcheck.check_fused_ops(DEVICE, (torch.float32, torch.bfloat16, torch.float16), sizes)
    assert results == {op: None for op in _utils.FUSED_OPS}


def test_no_triton_means_nothing_runs_fused(monkeypatch):
    monkeypatch.setattr(_utils, "_TRITON_AVAILABLE", False)
    results = selfcheck.check_fused_ops(DEVICE, ops=("adaln_modulate",))
    assert "Triton cannot run here" in results["adaln_modulate"] and selfcheck.passed(results) == set()


def test_a_kernel_that_breaks_the_cuda_context_is_named(monkeypatch):
    """Device-side faults leave no eager fallback: the run stops with the op's name and the fix."""
    cuda = torch.device("cuda", 0)
    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: None)
    selfcheck._check_device_usable(cuda, "gated_residual", RuntimeError("out of resources"))  # recoverable
    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: (_ for _ in ()).throw(RuntimeError("sticky")))
    with pytest.raises(RuntimeError, match=r"reglue.kernels.gated_residual crashed the GPU.*--kernels eager"):
        selfcheck._check_device_usable(cuda, "gated_residual", RuntimeError("an illegal memory access was encountered"))
