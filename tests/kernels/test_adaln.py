"""adaln_modulate, gated_residual_adaln, gated_residual: Triton (interpreter on CPU) vs eager."""

import warnings

import pytest
import torch

from reglue.kernels import _utils
from reglue.kernels.adaln import (
    _adaln_modulate_bwd,
    _adaln_modulate_fwd,
    _gated_residual_adaln_bwd,
    _gated_residual_adaln_fwd,
    _gated_residual_bwd,
    _gated_residual_fwd,
    adaln_modulate,
    adaln_modulate_ref,
    gated_residual,
    gated_residual_adaln,
    gated_residual_adaln_ref,
    gated_residual_ref,
)
from tests.kernels._compare import check_compiled_fullgraph, check_op

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
# SiT-XL tokens with [CLS] (257 x 1152), head-dim-sized and odd hidden sizes, SiT-S/B, the largest.
SHAPES = [(2, 257, 1152), (3, 5, 72), (1, 256, 100), (2, 17, 384), (1, 7, 768), (1, 3, 4096)]
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _inputs(shape, per_token=False):
    n, t, d = shape
    mod_shape = shape if per_token else (n, d)
    x = torch.randn(shape, device=DEVICE) * 2 + 0.5
    y = torch.randn(shape, device=DEVICE)
    gate, shift, scale = (torch.randn(mod_shape, device=DEVICE) * 0.5 for _ in range(3))
    return x, y, gate, shift, scale


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_adaln_modulate(shape, dtype):
    x, _, _, shift, scale = _inputs(shape)
    check_op(
        adaln_modulate, adaln_modulate_ref, [x, shift, scale], [torch.randn(shape, device=DEVICE)], dtype,
        ["x", "shift", "scale"], ["h"],
    )  # fmt: skip


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_gated_residual_adaln(shape, dtype):
    inputs = _inputs(shape)
    grads = [torch.randn(shape, device=DEVICE), torch.randn(shape, device=DEVICE)]
    check_op(
        gated_residual_adaln, gated_residual_adaln_ref, list(inputs), grads, dtype,
        ["x", "y", "gate", "shift", "scale"], ["r", "h"],
    )  # fmt: skip


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_gated_residual(shape, dtype):
    x, y, gate, _, _ = _inputs(shape)
    check_op(
        gated_residual, gated_residual_ref, [x, y, gate], [torch.randn(shape, device=DEVICE)], dtype,
        ["x", "y", "gate"], ["out"],
    )  # fmt: skip


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_per_token_modulation(dtype):
    """shift/scale/gate with x's full shape (no broadcast over tokens)."""
    shape = (2, 9, 72)
    inputs = _inputs(shape, per_token=True)
    grads = [torch.randn(shape, device=DEVICE), torch.randn(shape, device=DEVICE)]
    check_op(
        gated_residual_adaln, gated_residual_adaln_ref, list(inputs), grads, dtype,
        ["x", "y", "gate", "shift", "scale"], ["r", "h"],
    )  # fmt: skip


def test_chunked_views_and_broadcast_shapes():
    """SiT passes .chunk() views of one (N, 6D) tensor; (N, 1, D) is accepted like (N, D)."""
    n, t, d = 2, 11, 100
    x, y = torch.randn(n, t, d, device=DEVICE), torch.randn(n, t, d, device=DEVICE)
    mods = torch.randn(n, 3 * d, device=DEVICE, requires_grad=True)
    gate, shift, scale = mods.chunk(3, dim=-1)
    r, h = gated_residual_adaln(x, y, gate, shift.unsqueeze(1), scale)
    (r.sum() + (h * h).sum()).backward()
    grad = mods.grad.clone()
    mods.grad = None
    gate, shift, scale = mods.chunk(3, dim=-1)
    r_ref, h_ref = gated_residual_adaln_ref(x, y, gate, shift, scale)
    (r_ref.sum() + (h_ref * h_ref).sum()).backward()
    torch.testing.assert_close(h, h_ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(grad, mods.grad, atol=1e-4, rtol=1e-4)


def test_mixed_dtypes_promote_like_eager():
    """fp32 residual stream with bf16 branch output and modulation (autocast training)."""
    x = torch.randn(2, 5, 72, device=DEVICE)
    y = torch.randn(2, 5, 72, device=DEVICE, dtype=torch.bfloat16)
    gate, shift, scale = (torch.randn(2, 72, device=DEVICE, dtype=torch.bfloat16) for _ in range(3))
    r, h = gated_residual_adaln(x, y, gate, shift, scale)
    r_ref, h_ref = gated_residual_adaln_ref(x, y, gate, shift, scale, upcast=True)
    assert r.dtype == h.dtype == torch.float32
    torch.testing.assert_close(r, r_ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(h, h_ref, atol=1e-5, rtol=1e-5)


def test_backward_is_deterministic():
    x, y, gate, shift, scale = (t.requires_grad_() for t in _inputs((2, 257, 384)))
    grads = []
    for _ in range(2):
        r, h = gated_residual_adaln(x, y, gate, shift, scale)
        grads.append(torch.autograd.grad((r * 1.5 + h).sum(), (gate, shift, scale)))
    for a, b in zip(*grads):
        assert torch.equal(a, b)


def test_bad_modulation_shape():
    x = torch.randn(2, 5, 72, device=DEVICE)
    with pytest.raises(ValueError, match="modulation shape"):
        adaln_modulate(x, torch.randn(3, 72, device=DEVICE), torch.randn(2, 72, device=DEVICE))


def test_opcheck():
    x, y, gate, shift, scale = _inputs((2, 5, 72))
    leaf = lambda t: t.clone().requires_grad_()  # noqa: E731
    torch.library.opcheck(_adaln_modulate_fwd, (leaf(x), leaf(shift), leaf(scale), 1e-6))
    torch.library.opcheck(_gated_residual_adaln_fwd, (leaf(x), leaf(y), leaf(gate), leaf(shift), leaf(scale), 1e-6))
    torch.library.opcheck(_gated_residual_fwd, (leaf(x), leaf(y), leaf(gate)))
    torch.library.opcheck(_adaln_modulate_bwd, (torch.randn_like(x), x, scale, 1e-6, torch.float32))
    torch.library.opcheck(_adaln_modulate_bwd, (torch.randn_like(x), x, scale, 1e-6, torch.bfloat16))
    torch.library.opcheck(_gated_residual_adaln_bwd,
                          (torch.randn_like(x), torch.randn_like(x), x, y, gate, scale, 1e-6, torch.float32))
    torch.library.opcheck(_gated_residual_bwd, (torch.randn_like(x), y, gate))


def _block_residuals(x, a, b, mods):
    """The fused pieces of a SiT block, with stand-ins for attention and MLP."""
    shift1, scale1, gate1, shift2, scale2, gate2 = mods.chunk(6, dim=-1)
    h = adaln_modulate(x, shift1, scale1)
    x, h = gated_residual_adaln(x, h * a, gate1, shift2, scale2)
    return gated_residual(x, h * b, gate2)


def test_compile_fullgraph():
    """One compiled graph (forward and backward) holding all three ops: no graph breaks."""
    x = torch.randn(2, 5, 72, device=DEVICE, requires_grad=True)
    a, b = torch.randn(72, device=DEVICE), torch.randn(72, device=DEVICE)
    mods = torch.randn(2, 6 * 72, device=DEVICE, requires_grad=True)
    check_compiled_fullgraph(lambda x, mods: _block_residuals(x, a, b, mods), (x, mods))


def test_fallback_warns_once_and_matches_reference(monkeypatch):
    monkeypatch.setattr(_utils, "interpreter_enabled", lambda: False)
    monkeypatch.setattr(_utils, "_warned", set())
    x, y, gate, shift, scale = (t.cpu() for t in _inputs((2, 5, 72)))
    with pytest.warns(RuntimeWarning, match="gated_residual_adaln"):
        r, h = gated_residual_adaln(x, y, gate, shift, scale)
    r_ref, h_ref = gated_residual_adaln_ref(x, y, gate, shift, scale)
    assert torch.equal(r, r_ref) and torch.equal(h, h_ref)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        gated_residual_adaln(x, y, gate, shift, scale)
    with pytest.warns(RuntimeWarning, match="adaln_modulate"):
        adaln_modulate(x, shift, scale)
    with pytest.warns(RuntimeWarning, match="gated_residual"):
        gated_residual(x, y, gate)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_sit_xl_shapes_gpu(dtype):
    """Real compilation at SiT-XL/2 size: x = (256, 257, 1152)."""
    shape = (256, 257, 1152)
    inputs = _inputs(shape)
    grads = [torch.randn(shape, device=DEVICE), torch.randn(shape, device=DEVICE)]
    check_op(
        gated_residual_adaln, gated_residual_adaln_ref, list(inputs), grads, dtype,
        ["x", "y", "gate", "shift", "scale"], ["r", "h"],
    )  # fmt: skip
    x, _, _, shift, scale = inputs
    check_op(adaln_modulate, adaln_modulate_ref, [x, shift, scale], grads[:1], dtype, ["x", "shift", "scale"], ["h"])
    x, y, gate, _, _ = inputs
    check_op(gated_residual, gated_residual_ref, [x, y, gate], grads[:1], dtype, ["x", "y", "gate"], ["out"])
