"""fused_conv2d and compressor_encode_fused: Triton (interpreter on CPU) vs eager (inference only)."""

import warnings

import pytest
import torch

from reglue.kernels import _utils
from reglue.kernels import conv as conv_module
from reglue.kernels.conv import (
    _fused_conv2d_fwd,
    compressor_encode_fused,
    fused_conv2d,
    fused_conv2d_ref,
    pack_conv_weight,
)
from reglue.models.compressor import SemanticCompressor
from tests.kernels._compare import assert_three_way

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
# (N, C_in, C_out, H, W): compressor-like widths at small size, channel counts below one block,
# odd spatial sizes (masks at every image border), C_out not a multiple of the block.
SHAPES = [(2, 32, 16, 8, 8), (1, 3, 5, 7, 9), (2, 48, 40, 16, 16), (1, 130, 24, 5, 3)]
VARIANTS = {
    "bias": dict(bias=True, residual=False, relu=False),
    "bias+residual+relu": dict(bias=True, residual=True, relu=True),
    "relu-no-bias": dict(bias=False, residual=False, relu=True),
}


def _inputs(n, c_in, c_out, h, w, bias, residual):
    x = torch.randn(n, c_in, h, w, device=DEVICE)
    weight = torch.randn(c_out, c_in, 3, 3, device=DEVICE) / (3 * c_in**0.5)
    b = torch.randn(c_out, device=DEVICE) if bias else None
    res = torch.randn(n, c_out, h, w, device=DEVICE) if residual else None
    return x, weight, b, res


def _cast(t, dtype):
    return None if t is None else t.to(dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_fused_conv2d(shape, variant, dtype):
    flags = VARIANTS[variant]
    x, weight, bias, res = (_cast(t, dtype) for t in _inputs(*shape, flags["bias"], flags["residual"]))
    out = fused_conv2d(x, weight, bias, res, relu=flags["relu"])
    eager = fused_conv2d_ref(x, weight, bias, res, flags["relu"])
    ref32 = fused_conv2d_ref(x, weight, bias, res, flags["relu"], upcast=True)
    assert out.dtype == dtype and out.is_contiguous()
    assert_three_way(out, eager, ref32, "out")


def test_packed_weight_and_channels_last_input():
    x, weight, bias, res = _inputs(2, 32, 16, 6, 7, True, True)
    expected = fused_conv2d_ref(x, weight, bias, res, True)
    out = fused_conv2d(x.to(memory_format=torch.channels_last), pack_conv_weight(weight), bias, res, relu=True)
    torch.testing.assert_close(out, expected, atol=1e-4, rtol=1e-4)


def _compressor(channels):
    """Random compressor with non-trivial BatchNorm statistics and affine parameters."""
    compressor = SemanticCompressor(channels).to(DEVICE)
    with torch.no_grad():
        for module in compressor.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                module.running_mean.normal_(0, 0.5)
                module.running_var.uniform_(0.5, 2.0)
                module.weight.uniform_(0.5, 1.5)
                module.bias.normal_(0, 0.2)
    return compressor.eval()


@pytest.mark.parametrize("channels", [(64, 32, 8), (48, 32, 24, 4)], ids=str)
def test_compressor_encode_fused_equals_eager_eval(channels):
    compressor = _compressor(channels)
    feats = torch.randn(2, channels[0], 8, 8, device=DEVICE)
    with torch.no_grad():
        expected = compressor.encode(feats)
    torch.testing.assert_close(compressor_encode_fused(compressor.fold_batchnorm(), feats), expected, atol=1e-4, rtol=1e-4)
    # An unfolded compressor is folded on the fly.
    torch.testing.assert_close(compressor_encode_fused(compressor, feats), expected, atol=1e-4, rtol=1e-4)


def test_compressor_encode_fused_bf16():
    compressor = _compressor((64, 32, 8))
    feats = torch.randn(2, 64, 8, 8, device=DEVICE)
    folded = compressor.fold_batchnorm()
    with torch.no_grad():
        ref32 = folded.encode(feats.bfloat16().float())
        eager = folded.to(torch.bfloat16).encode(feats.bfloat16())
    out = compressor_encode_fused(folded, feats.bfloat16())
    # Four convs in a row: intermediates round in different places than eager's, allow 3 units.
    assert_three_way(out, eager, ref32, "encode", ulps=3)


def test_opcheck():
    x, weight, bias, res = _inputs(1, 16, 16, 4, 5, True, True)
    torch.library.opcheck(_fused_conv2d_fwd, (x, weight, bias, res, True))
    torch.library.opcheck(_fused_conv2d_fwd, (x, weight, None, None, False))


def test_compile_fullgraph():
    torch._dynamo.reset()
    x, weight, bias, res = _inputs(1, 16, 16, 4, 5, True, True)

    def fn(x, weight, bias, res):
        return fused_conv2d(x * 2, weight, bias, residual=res, relu=True) + 1

    out = torch.compile(fn, fullgraph=True)(x, weight, bias, res)
    torch.testing.assert_close(out, fn(x, weight, bias, res), atol=1e-5, rtol=1e-5)


def test_fallback_warns_once_and_matches_reference(monkeypatch):
    monkeypatch.setattr(_utils, "interpreter_enabled", lambda: False)
    monkeypatch.setattr(_utils, "_warned", set())
    x, weight, bias, res = (t.cpu() for t in _inputs(1, 8, 8, 4, 4, True, True))
    with pytest.warns(RuntimeWarning, match="fused_conv2d"):
        out = fused_conv2d(x, weight, bias, res, relu=True)
    assert torch.equal(out, fused_conv2d_ref(x, weight, bias, res, True))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        fused_conv2d(x, weight, bias, res, relu=True)


def test_bad_shapes():
    x = torch.randn(1, 8, 4, 4, device=DEVICE)
    with pytest.raises(ValueError, match="3, 3"):
        fused_conv2d(x, torch.randn(8, 8, 1, 1, device=DEVICE))
    with pytest.raises(ValueError, match="residual"):
        fused_conv2d(x, torch.randn(4, 8, 3, 3, device=DEVICE), residual=torch.randn(1, 8, 4, 4, device=DEVICE))


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_compressor_real_size_gpu(dtype):
    """Real compilation at the published compressor's widths (3072 -> 256 -> 16) on 16x16 maps."""
    compressor = _compressor((3072, 256, 16))
    folded = compressor.fold_batchnorm()
    feats = torch.randn(8, 3072, 16, 16, device=DEVICE).to(dtype)
    with torch.no_grad():
        ref32 = folded.encode(feats.float())
        eager = folded.to(dtype).encode(feats)
    out = compressor_encode_fused(folded, feats)
    if dtype == torch.float32:
        # 27648-term dot products: summation order alone moves the result by ~1e-6 relative.
        torch.testing.assert_close(out, ref32, atol=1e-4 * ref32.abs().max().item(), rtol=1e-3)
    else:
        assert_three_way(out, eager, ref32, "encode", ulps=3)


def test_compressor_weights_packed_once_per_weight():
    compressor = _compressor((24, 16, 8)).fold_batchnorm()
    feats = torch.randn(1, 24, 5, 5, device=DEVICE)
    convs = [m for m in compressor.encoder.modules() if isinstance(m, torch.nn.Conv2d)]
    before = conv_module.packs
    first = compressor_encode_fused(compressor, feats)
    assert conv_module.packs - before == len(convs) == 4
    assert torch.equal(compressor_encode_fused(compressor, feats), first)
    assert conv_module.packs - before == len(convs)  # the second call reuses every packed weight
    with torch.no_grad():
        convs[0].weight.mul_(2)  # an in-place change (load_state_dict, an optimizer step) repacks that one
    changed = compressor_encode_fused(compressor, feats)
    assert conv_module.packs - before == len(convs) + 1
    assert not torch.equal(changed, first)
    with torch.no_grad():
        torch.testing.assert_close(changed, compressor.encode(feats), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("allow_tf32", [False, True])
def test_fp32_precision_follows_allow_tf32(monkeypatch, allow_tf32):
    """fp32 convs use TF32 tensor cores exactly where torch allows TF32 matmuls."""
    launches = []

    class Recorder:
        def __getitem__(self, grid):
            return lambda *args, **kwargs: launches.append(kwargs)

    monkeypatch.setattr(conv_module, "_conv3x3_tuned", Recorder())
    torch.backends.cuda.matmul.allow_tf32 = allow_tf32  # the autouse fixture restores it
    x, weight, bias, _ = _inputs(1, 16, 16, 4, 4, True, False)
    fused_conv2d(x, weight, bias)
    fused_conv2d(x.bfloat16(), weight.bfloat16(), bias.bfloat16())
    assert [k["PRECISION"] for k in launches] == ["tf32" if allow_tf32 else "ieee", "tf32"]
