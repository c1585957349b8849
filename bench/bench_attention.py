"""Attention backends side by side at SiT shapes (head dims 72 and 64).

Providers: ``eager`` = softmax(q kᵀ/√d) v in the input dtype, ``compile`` = torch.compile of that
formula, and every backend of ``reglue.models.attention`` (sdpa, fa2, fa3, xformers) — skipped
with the reason where not installed or not supported by this device.
"""

from __future__ import annotations

import pytest
import torch
from _common import DEVICE, DTYPE, HEAD_SHAPES, MODES, compiled, measure, skip_unless_timed
from _roofline import attention_bytes_flops

from reglue.models import attention as attention_module

PROVIDERS = ("eager", "compile", "sdpa", "fa2", "fa3", "xformers")


def attention_eager(q, k, v):
    """The textbook formula in the input dtype: the baseline every backend is measured against."""
    scores = (q @ k.transpose(-2, -1)) * q.shape[-1] ** -0.5
    return scores.softmax(dim=-1) @ v


def _fn(provider: str):
    if provider == "eager":
        return attention_eager
    if provider == "compile":
        return compiled(attention_eager)
    return lambda q, k, v: attention_module.attention(q, k, v, backend=provider)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("shape_name", list(HEAD_SHAPES))
def test_attention(benchmark, shape_name, provider, mode):
    skip_unless_timed("compile" if provider == "compile" else "eager", "attention", mode)
    shape = HEAD_SHAPES[shape_name]
    q, k, v = (torch.randn(shape, device=DEVICE, dtype=DTYPE, requires_grad=True) for _ in range(3))
    if provider not in ("eager", "compile"):
        reason = attention_module._unavailable(provider, q)
        if reason is not None:
            pytest.skip(f"{provider}: {reason}")
    fn = _fn(provider)
    if mode == "fwd":
        timed = lambda: fn(q, k, v)  # noqa: E731
    else:
        dout = torch.randn(shape, device=DEVICE, dtype=DTYPE)
        if mode == "bwd":
            out = fn(q, k, v)
            timed = lambda: torch.autograd.grad(out, (q, k, v), dout, retain_graph=True)  # noqa: E731
        else:
            timed = lambda: torch.autograd.grad(fn(q, k, v), (q, k, v), dout)  # noqa: E731
    bytes_, flops = attention_bytes_flops(*shape, q.element_size(), mode)
    measure(
        benchmark, timed,
        group=f"attention {shape_name} {tuple(shape)} {mode}", bytes_=bytes_, flops=flops,
        op="attention", shape=list(shape), dtype=str(DTYPE), provider=provider, mode=mode,
    )  # fmt: skip
