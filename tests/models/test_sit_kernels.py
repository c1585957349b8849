"""SiT with kernels="triton" equals kernels="eager": forward outputs and every parameter gradient."""

import pytest
import torch

from reglue.kernels import _utils
from reglue.models.sit import SiT

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _pair(depth=2, hidden_size=384, num_heads=6, **kwargs):
    """Two SiT-S/2-shaped models (depth shrunk for CPU time) with the same non-trivial weights.

    The real init zeroes the adaLN and output layers, which would make gates, shifts and scales
    vanish; every parameter gets noise so each fused path carries signal.
    """
    config = dict(
        input_size=32, patch_size=2, in_channels=4, hidden_size=hidden_size, depth=depth, num_heads=num_heads,
        num_classes=10, z_dims=(64,), encoder_depth=1, projector_dim=64, cls_token_dim=32, qk_norm=True, **kwargs,
    )  # fmt: skip
    eager = SiT(kernels="eager", **config).to(DEVICE)
    with torch.no_grad():
        for p in eager.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.05)
    fused = SiT(kernels="triton", **config).to(DEVICE)
    fused.load_state_dict(eager.state_dict())
    assert list(fused.state_dict()) == list(eager.state_dict())
    return eager, fused


def _inputs(n=2):
    x = torch.randn(n, 4, 32, 32, device=DEVICE)
    t = torch.rand(n, device=DEVICE)
    y = torch.randint(0, 10, (n,), device=DEVICE)
    cls = torch.randn(n, 32, device=DEVICE)
    return x, t, y, cls


def _run(model, inputs, weights, autocast_dtype=None):
    model.zero_grad(set_to_none=True)
    with torch.autocast(DEVICE, dtype=autocast_dtype or torch.float32, enabled=autocast_dtype is not None):
        out, zs, cls_out = model(*inputs)
    loss = (out.float() * weights[0]).sum() + (zs[0].float() * weights[1]).sum() + (cls_out.float() * weights[2]).sum()
    loss.backward()
    grads = {name: p.grad.detach().clone() for name, p in model.named_parameters() if p.grad is not None}
    return [out.detach().float(), zs[0].detach().float(), cls_out.detach().float()], grads


def _weights(model, inputs):
    with torch.no_grad():
        outs = model(*inputs)
    return [torch.randn_like(outs[0]), torch.randn_like(outs[1][0]), torch.randn_like(outs[2])]


def test_sit_triton_equals_eager_fp32(monkeypatch):
    monkeypatch.setattr(_utils, "poison_outputs", True)
    eager, fused = _pair()
    eager.train(), fused.train()
    inputs = _inputs()
    weights = _weights(eager, inputs)
    torch.manual_seed(1)  # label dropout draws random numbers: same draws for both models
    out_e, grads_e = _run(eager, inputs, weights)
    torch.manual_seed(1)
    out_f, grads_f = _run(fused, inputs, weights)
    for name, a, b in zip(["out", "zs", "cls_out"], out_f, out_e):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4, msg=lambda m: f"{name}: {m}")
    assert grads_f.keys() == grads_e.keys()
    # Every block parameter, including the adaLN and QK-norm weights, receives a gradient.
    assert any("q_norm" in k for k in grads_e) and any("adaLN" in k for k in grads_e)
    for name in grads_e:
        scale = grads_e[name].abs().max().item()
        torch.testing.assert_close(
            grads_f[name], grads_e[name], atol=1e-4 * max(scale, 1e-3), rtol=1e-3, msg=lambda m: f"grad {name}: {m}"
        )


@pytest.mark.gpu
def test_sit_b_triton_vs_eager_bf16_autocast_gpu():
    """SiT-B/2 (hidden 768, 12 heads) under bf16 autocast: the fused model is no further from the
    fp32 model than the eager bf16 model is (relative L2 error, output and every gradient)."""
    eager, fused = _pair(depth=4, hidden_size=768, num_heads=12)
    inputs = _inputs(n=8)
    weights = _weights(eager, inputs)
    eager.eval(), fused.eval()
    out_32, grads_32 = _run(eager, inputs, weights)
    out_e, grads_e = _run(eager, inputs, weights, torch.bfloat16)
    out_f, grads_f = _run(fused, inputs, weights, torch.bfloat16)

    def rel(a, b):
        return ((a - b).norm() / b.norm().clamp_min(1e-12)).item()

    pairs = list(zip(["out", "zs", "cls_out"], out_f, out_e, out_32))
    pairs += [(f"grad {k}", grads_f[k], grads_e[k], grads_32[k]) for k in grads_32]
    for name, fused_val, eager_val, ref in pairs:
        assert rel(fused_val.float(), ref) <= 2 * rel(eager_val.float(), ref) + 1e-3, name
