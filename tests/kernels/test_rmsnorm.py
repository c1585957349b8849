"""rms_norm and RMSNorm: Triton (interpreter on CPU) vs eager."""

import warnings

import pytest
import torch

from reglue.kernels import _utils
from reglue.kernels.rmsnorm import RMSNorm, _rms_norm_bwd, _rms_norm_fwd, rms_norm, rms_norm_ref
from tests.kernels._compare import check_compiled_fullgraph, check_op

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
# QK-norm: (N, heads, tokens, head_dim) with head dims 64 (SiT-B/L) and 72 (SiT-XL); odd sizes; wide rows.
SHAPES = [(2, 6, 257, 64), (2, 3, 65, 72), (3, 5, 72), (7, 100), (1, 256, 100), (3, 1152), (2, 4096)]
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _inputs(shape):
    x = torch.randn(shape, device=DEVICE) * 3
    weight = 1 + 0.2 * torch.randn(shape[-1], device=DEVICE)
    return x, weight


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_rms_norm(shape, dtype):
    x, weight = _inputs(shape)
    check_op(rms_norm, rms_norm_ref, [x, weight], [torch.randn(shape, device=DEVICE)], dtype, ["x", "weight"], ["out"])


def test_non_contiguous_heads():
    """q/k arrive as permuted views of the qkv projection."""
    qkv = torch.randn(2, 9, 3, 4, 72, device=DEVICE)
    q = qkv.permute(2, 0, 3, 1, 4)[0]  # (N, H, T, hd), not contiguous
    weight = torch.rand(72, device=DEVICE) + 0.5
    torch.testing.assert_close(rms_norm(q, weight), rms_norm_ref(q, weight), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("head_dim, tokens", [(72, 257), (100, 9), (64, 17)])
def test_strided_heads_read_in_place(head_dim, tokens, dtype):
    """q of the qkv projection, (N, T, 3, H, hd).permute(2, 0, 3, 1, 4)[0], normalised without a
    copy: output and the gradients of qkv and weight against the reference."""
    qkv = torch.randn(2, tokens, 3, 2, head_dim, device=DEVICE) * 3
    weight = 1 + 0.2 * torch.randn(head_dim, device=DEVICE)

    def q_of(qkv):
        return qkv.permute(2, 0, 3, 1, 4)[0]

    check_op(lambda qkv, w: rms_norm(q_of(qkv), w), lambda qkv, w, upcast: rms_norm_ref(q_of(qkv), w, upcast=upcast),
             [qkv, weight], [torch.randn(2, 2, tokens, head_dim, device=DEVICE)], dtype, ["qkv", "weight"], ["out"])


def test_strided_rows_are_not_copied(monkeypatch):
    """The launcher hands the kernel the view's own storage and strides."""
    from reglue.kernels import rmsnorm

    seen = []
    real = rmsnorm._rows_of
    monkeypatch.setattr(rmsnorm, "_rows_of", lambda x: seen.append(real(x)) or seen[-1])
    qkv = torch.randn(2, 9, 3, 4, 72, device=DEVICE)
    rms_norm(qkv.permute(2, 0, 3, 1, 4)[0], torch.ones(72, device=DEVICE))
    x, m, s1, s2, strides, align = seen[0]
    assert x.data_ptr() == qkv.data_ptr() and (m, s1, s2) == (2 * 4 * 9, 4, 9)
    assert strides == (9 * 3 * 4 * 72, 72, 3 * 4 * 72) and align == 4  # fp32: 16 bytes = 4 elements


def test_module_state_dict_and_dispatch():
    eager, fused = RMSNorm(72, kernels="eager").to(DEVICE), RMSNorm(72, kernels="triton").to(DEVICE)
    assert list(eager.state_dict()) == list(fused.state_dict()) == ["weight"]
    with torch.no_grad():
        eager.weight.uniform_(0.5, 1.5)
    fused.load_state_dict(eager.state_dict())
    x = torch.randn(2, 4, 17, 72, device=DEVICE)
    torch.testing.assert_close(fused(x), eager(x), atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="kernels"):
        RMSNorm(72, kernels="cuda")


def test_opcheck():
    x, weight = _inputs((3, 5, 72))
    x2 = x.reshape(-1, 72)
    torch.library.opcheck(_rms_norm_fwd, (x2.clone().requires_grad_(), weight.clone().requires_grad_(), 1e-6))
    torch.library.opcheck(_rms_norm_bwd, (torch.randn_like(x2), x2, weight, 1e-6))


def test_compile_fullgraph():
    x, weight = (t.requires_grad_() for t in _inputs((2, 3, 5, 72)))

    def fn(x, weight):
        return rms_norm(x * 2, weight).sum(dim=-1)

    check_compiled_fullgraph(fn, (x, weight))


def test_fallback_warns_once_and_matches_reference(monkeypatch):
    monkeypatch.setattr(_utils, "interpreter_enabled", lambda: False)
    monkeypatch.setattr(_utils, "_warned", set())
    x, weight = (t.cpu() for t in _inputs((3, 5, 72)))
    with pytest.warns(RuntimeWarning, match="rms_norm"):
        out = rms_norm(x, weight)
    assert torch.equal(out, rms_norm_ref(x, weight))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        rms_norm(x, weight)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("shape", [(256, 16, 257, 72), (256, 12, 256, 64)], ids=str)
def test_sit_shapes_gpu(shape, dtype):
    """Real compilation at SiT-XL/2 (16 heads x 72) and SiT-B/2 (12 heads x 64) QK-norm sizes."""
    x, weight = _inputs(shape)
    check_op(rms_norm, rms_norm_ref, [x, weight], [torch.randn(shape, device=DEVICE)], dtype, ["x", "weight"], ["out"])


@pytest.mark.parametrize("impl", [rms_norm, rms_norm_ref], ids=["triton", "ref"])
def test_zero_and_tiny_rows_follow_the_formula(impl):
    """eps sits inside the square root: a zero row gives 0 (not NaN), rows far below sqrt(eps)
    are scaled by 1/sqrt(eps); forward and backward against the formula in float64."""
    eps, d = 1e-6, 72
    x = torch.zeros(4, d, device=DEVICE)
    x[1] = 1e-5 * torch.randn(d, device=DEVICE)  # mean(x^2) ~ 1e-10, eps dominates
    x[2] = 1e-3 * torch.randn(d, device=DEVICE)  # mean(x^2) ~ eps
    x[3] = torch.randn(d, device=DEVICE)
    weight = 1 + 0.2 * torch.randn(d, device=DEVICE)
    dy = torch.randn(4, d, device=DEVICE)

    def formula(x, weight):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * weight

    x64, w64 = (t.double().requires_grad_() for t in (x, weight))
    want = formula(x64, w64)
    want.backward(dy.double())
    xi, wi = (t.clone().requires_grad_() for t in (x, weight))
    out = impl(xi, wi, eps)
    out.backward(dy)
    assert torch.equal(out[0], torch.zeros(d, device=DEVICE))
    torch.testing.assert_close(out.double(), want, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(xi.grad.double(), x64.grad, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(wi.grad.double(), w64.grad, rtol=1e-5, atol=1e-5)
