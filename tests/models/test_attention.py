"""The attention entry point: every backend available here agrees with the fp32 formula."""

import logging
import types

import pytest
import torch

from reglue.models import attention as attn_mod
from reglue.models.attention import BACKENDS, attention, attention_math, select_backend

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _qkv(shape, dtype, requires_grad=False):
    return [torch.randn(shape, device=DEVICE, dtype=dtype).requires_grad_(requires_grad) for _ in range(3)]


def _available(dtype, head_dim=72):
    q = torch.empty(1, 1, 1, head_dim, device=DEVICE, dtype=dtype)
    return [b for b in BACKENDS if b != "auto" and attn_mod._unavailable(b, q) is None]


def _tolerance(dtype):
    return {torch.float32: 2e-5, torch.bfloat16: 2e-2, torch.float16: 5e-3}[dtype]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("shape", [(2, 3, 17, 72), (1, 2, 65, 64)], ids=str)
def test_available_backends_agree_forward_and_backward(shape, dtype):
    q, k, v = _qkv(shape, dtype, requires_grad=True)
    grad_out = torch.randn(shape, device=DEVICE, dtype=dtype)
    q32, k32, v32 = (t.detach().float().requires_grad_() for t in (q, k, v))
    ref = attention_math(q32, k32, v32)
    ref_grads = torch.autograd.grad(ref, (q32, k32, v32), grad_out.float())
    backends = _available(dtype, shape[-1])
    assert {"sdpa", "math"} <= set(backends)
    for backend in backends + ["auto"]:
        out = attention(q, k, v, backend=backend)
        assert out.shape == shape and out.dtype == dtype, backend
        grads = torch.autograd.grad(out, (q, k, v), grad_out)
        tol = _tolerance(dtype)
        torch.testing.assert_close(out.float(), ref, atol=tol, rtol=tol, msg=lambda m: f"{backend}: {m}")
        for name, g, g_ref in zip("qkv", grads, ref_grads):
            torch.testing.assert_close(g.float(), g_ref, atol=2 * tol, rtol=2 * tol, msg=lambda m: f"{backend} d{name}: {m}")


def test_auto_prefers_the_first_available():
    q = torch.empty(1, 1, 1, 72, device=DEVICE, dtype=torch.bfloat16)
    expected = next(b for b in ("fa3", "fa2", "xformers", "sdpa") if attn_mod._unavailable(b, q) is None)
    assert select_backend(q, "auto") == expected
    if DEVICE == "cpu":
        assert expected == "sdpa"


@pytest.mark.parametrize("backend", ["fa3", "fa2", "xformers"])
def test_unavailable_backend_raises_naming_it(backend):
    q = torch.randn(1, 2, 4, 72)  # CPU tensors: none of these can run
    with pytest.raises(ValueError, match=f"'{backend}' is not available: .+"):
        attention(q, q, q, backend=backend)


def test_unknown_backend_raises():
    q = torch.randn(1, 2, 4, 72)
    with pytest.raises(ValueError, match="must be one of"):
        attention(q, q, q, backend="flash")


def test_logs_choice_once(caplog, monkeypatch):
    monkeypatch.setattr(attn_mod, "_logged", set())
    q, k, v = _qkv((1, 2, 5, 72), torch.float32)
    with caplog.at_level(logging.INFO, logger="reglue.models.attention"):
        attention(q, k, v)
        attention(q, k, v)
    records = [r for r in caplog.records if "attention: using" in r.getMessage()]
    assert len(records) == 1
    assert select_backend(q) in records[0].getMessage()


def test_mixed_dtypes_are_unified():
    """An fp32 QK-norm weight can leave q/k in fp32 while v is bf16."""
    q, k = _qkv((1, 2, 5, 72), torch.float32)[:2]
    v = torch.randn(1, 2, 5, 72, device=DEVICE, dtype=torch.bfloat16)
    out = attention(q, k, v)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, attention_math(q, k, v.float()), atol=1e-5, rtol=1e-5)


def test_compile_fullgraph():
    """Backend selection is plain Python on cached probes: no graph break under torch.compile."""
    torch._dynamo.reset()
    q, k, v = _qkv((1, 2, 5, 72), torch.float32)
    out = torch.compile(lambda q, k, v: attention(q, k, v) * 2, fullgraph=True, backend="eager")(q, k, v)
    torch.testing.assert_close(out, attention_math(q, k, v) * 2, atol=1e-5, rtol=1e-5)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("shape", [(8, 16, 257, 72), (8, 12, 256, 64)], ids=str)
def test_gpu_backends_agree_at_sit_shapes(shape, dtype):
    """SiT-XL/2 (16 heads x 72, 257 tokens) and SiT-B/2 (12 x 64): every installed backend."""
    test_available_backends_agree_forward_and_backward(shape, dtype)


def _fake_cuda_q(dtype, head_dim):
    """What the selection rules read of q (is_cuda, dtype, shape, device), as if on a GPU."""
    return types.SimpleNamespace(is_cuda=True, dtype=dtype, shape=(1, 1, 1, head_dim), device=torch.device("cuda", 0))


def _install_fakes(monkeypatch, major, fa3_beta=False, xformers=True):
    fa3 = types.SimpleNamespace(flash_attn_func=None)
    if fa3_beta:
        fa3.flashattn_hopper_cuda = object()
    packages = {
        "flash_attn_interface": (fa3, None),
        "flash_attn": (types.SimpleNamespace(flash_attn_func=None), None),
        "xformers.ops": (types.SimpleNamespace(), None) if xformers else (None, "xformers.ops is not installed"),
    }
    monkeypatch.setattr(attn_mod, "_PACKAGES", packages)
    monkeypatch.setattr(attn_mod, "_cuda_major", lambda device: major)


@pytest.mark.parametrize(
    "major, fa3_beta, dtype, head_dim, xformers, expected",
    [
        (9, False, torch.bfloat16, 72, True, "fa3"),  # current FA3 rounds 72 up to a supported size
        (9, True, torch.bfloat16, 72, True, "fa2"),  # the 2024 beta has no head dim 72 kernels
        (9, True, torch.float16, 64, True, "fa3"),
        (9, True, torch.bfloat16, 128, True, "fa3"),
        (8, False, torch.bfloat16, 72, True, "fa2"),  # A100: no FA3
        (9, False, torch.float32, 72, True, "xformers"),  # flash kernels are fp16/bf16 only
        (9, False, torch.float32, 72, False, "sdpa"),
        (9, False, torch.bfloat16, 100, True, "xformers"),  # not a multiple of 8
    ],
)
def test_auto_selection_rules(monkeypatch, major, fa3_beta, dtype, head_dim, xformers, expected):
    _install_fakes(monkeypatch, major, fa3_beta=fa3_beta, xformers=xformers)
    assert select_backend(_fake_cuda_q(dtype, head_dim), "auto") == expected


def test_fa3_beta_head_dim_72_raises_when_requested(monkeypatch):
    _install_fakes(monkeypatch, 9, fa3_beta=True)
    with pytest.raises(ValueError, match="'fa3' is not available: .*head_dim 64 or 128 only"):
        select_backend(_fake_cuda_q(torch.bfloat16, 72), "fa3")
    with pytest.raises(ValueError, match="'fa2' is not available: .*fp16 or bf16"):
        select_backend(_fake_cuda_q(torch.float32, 72), "fa2")
