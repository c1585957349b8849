"""What a GPU autotunes over, checked on the CPU: every candidate config the autotuned kernels can
pick at the real shapes (and the odd ones the AOT compile covers) is launched, raw, under the
interpreter at small shapes against the eager reference; the declared config lists are those
candidates (a handful), and every conv candidate's grid covers the H100's SMs at the real shapes.

The interpreter itself autotunes nothing (one interpreter-only tile per shape), so without this
the GPU tiles are compiled by the static report but never run."""

import pytest
import torch

from reglue.kernels import _utils, adaln, conv, rmsnorm
from reglue.kernels.adaln import adaln_modulate, adaln_modulate_ref, gated_residual, gated_residual_adaln
from reglue.kernels.adaln import gated_residual_adaln_ref, gated_residual_ref
from reglue.kernels.conv import fused_conv2d, fused_conv2d_ref
from reglue.kernels.rmsnorm import rms_norm, rms_norm_ref
from reglue.kernels.roofline import SM_COUNT, compressor_encoder_convs
from tests.kernels._aot import shape_sets
from tests.kernels._compare import check_op

triton = pytest.importorskip("triton")

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
SETS = shape_sets()  # SiT-B/2 and SiT-XL/2 REGLUE runs (QK-norm on), and odd shapes
REAL = ("sit-b-2", "sit-xl-2")


def _conv_candidates(names=tuple(SETS)):
    """(C_in, C_out, pixels) -> the GPU's candidate tiles, at the convs of the shape sets."""
    out = {}
    for name in names:
        s = SETS[name]
        pixels = s.batch * s.feature_grid**2
        for c_in, c_out, _, _ in compressor_encoder_convs(s.compressor_channels):
            out[(c_in, c_out, pixels)] = conv._conv_blocks(c_in, c_out, pixels, interpreter=False)
    return out


def _row_candidates():
    """(kernel, D) -> the GPU's (BLOCK_M, num_warps) candidates at the shape sets' row counts."""
    out = {}
    for s in SETS.values():
        out.setdefault(("adaln", s.hidden_size), set()).update(
            _utils.row_candidates(s.hidden_size, s.batch * s.tokens, interpreter=False))
        out.setdefault(("rms_norm", s.head_dim), set()).update(
            _utils.row_candidates(s.head_dim, s.batch * s.num_heads * s.tokens, interpreter=False))
    return {key: sorted(tiles) for key, tiles in out.items()}


CONV_TILES = sorted({tile for tiles in _conv_candidates().values() for tile in tiles})
ROW_CASES = [(kernel, d, tile) for (kernel, d), tiles in _row_candidates().items() for tile in tiles]


def test_declared_configs_are_the_candidates_and_few():
    """The autotuners declare every tile their pruning can pick on a GPU and nothing else: a
    handful (the pruning then leaves two per shape)."""
    conv_declared = conv.conv_configs(interpreter=False)
    row_declared = _utils.row_configs(interpreter=False)
    assert len(conv_declared) <= 16 and len(row_declared) <= 16
    assert set(CONV_TILES) <= set(conv_declared)
    assert {tile for _, _, tile in ROW_CASES} <= set(row_declared)
    for (c_in, c_out, pixels), tiles in _conv_candidates().items():
        assert len(tiles) == 2, (c_in, c_out, pixels, tiles)
    # This build's autotuners declare this build's list.
    interpreted = _utils.interpreter_enabled()
    assert [(c.kwargs["BLOCK_P"], c.kwargs["BLOCK_CO"], c.kwargs["BLOCK_CI"], c.num_warps, c.num_stages)
            for c in conv._conv3x3_tuned.configs] == conv.conv_configs(interpreted)
    assert [(c.kwargs["BLOCK_M"], c.num_warps) for c in adaln._adaln_fwd_tuned.configs] == _utils.row_configs(interpreted)


def test_every_conv_candidate_covers_the_sms_at_the_real_shapes():
    """At a real run's shapes (32 images of 16 x 16 DINOv2 features) no candidate leaves an SM of
    an H100 (132) or an A100 (108) idle: the autotuner may pick any of them."""
    small = []
    for (c_in, c_out, pixels), tiles in _conv_candidates(REAL).items():
        for block_p, block_co, *_ in tiles:
            ctas = _utils.cdiv(pixels, block_p) * _utils.cdiv(c_out, block_co)
            if ctas < max(SM_COUNT.values()):
                small.append(f"{c_in}->{c_out} tile {block_p}x{block_co}: {ctas} CTAs")
    assert not small, "\n".join(small)


class _OneConfig:
    """Stands in for an autotuned kernel: launches its raw kernel with one given config (what the
    GPU's autotuner does for each candidate it times)."""

    def __init__(self, tuned, config):
        self.fn, self.config, self.launches = tuned.fn, config, 0

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            kwargs = {**kwargs, **self.config.all_kwargs()}
            self.fn[grid(kwargs) if callable(grid) else grid](*args, **kwargs)
            self.launches += 1

        return launch


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("tile", CONV_TILES, ids=lambda t: "P{}_CO{}_CI{}_w{}_s{}".format(*t))
def test_conv_candidate_matches_eager(monkeypatch, tile, dtype):
    """Each tile at widths that leave partial tiles in every dimension (C_in 72 = 2 K steps of 32 and
    a part, C_out 40, 2 x 5 x 7 = 70 pixels), bias, residual and ReLU in the epilogue."""
    block_p, block_co, block_ci, warps, stages = tile
    stand_in = _OneConfig(conv._conv3x3_tuned, triton.Config(
        {"BLOCK_P": block_p, "BLOCK_CO": block_co, "BLOCK_CI": block_ci}, num_warps=warps, num_stages=stages))
    monkeypatch.setattr(conv, "_conv3x3_tuned", stand_in)
    c_in, c_out = 72, 40
    inputs = [torch.randn(2, c_in, 5, 7, device=DEVICE), torch.randn(c_out, c_in, 3, 3, device=DEVICE) / (3 * c_in**0.5),
              torch.randn(c_out, device=DEVICE), torch.randn(2, c_out, 5, 7, device=DEVICE)]
    check_op(lambda *a: fused_conv2d(*a, relu=True), lambda *a, upcast: fused_conv2d_ref(*a, relu=True, upcast=upcast),
             inputs, None, dtype, ["x", "weight", "bias", "residual"], ["out"])
    assert stand_in.launches == 1


_ROW_OPS = {  # name -> (kernel fn, reference, number of (N, T, D) inputs, number of (N, D) ones)
    "adaln_modulate": (adaln_modulate, adaln_modulate_ref, 1, 2),
    "gated_residual_adaln": (gated_residual_adaln, gated_residual_adaln_ref, 2, 3),
    "gated_residual": (gated_residual, gated_residual_ref, 2, 1),
}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("kernel, d, tile", ROW_CASES, ids=lambda v: str(v))
def test_row_candidate_matches_eager(monkeypatch, kernel, d, tile, dtype):
    """Each forward row tile at its row size with a row count that leaves a partial tile (every
    adaLN variant: norm, residual, both; RMSNorm on the q view of a qkv projection)."""
    block_m, warps = tile
    module, attr = (adaln, "_adaln_fwd_tuned") if kernel == "adaln" else (rmsnorm, "_rms_norm_fwd_tuned")
    stand_in = _OneConfig(getattr(module, attr), triton.Config({"BLOCK_M": block_m}, num_warps=warps))
    monkeypatch.setattr(module, attr, stand_in)
    n, t = 2, 2 * block_m + 1
    if kernel == "rms_norm":
        qkv = torch.randn(n, t, 3, 2, d, device=DEVICE) * 3
        q_of = lambda qkv: qkv.permute(2, 0, 3, 1, 4)[0]  # noqa: E731
        check_op(lambda qkv, w: rms_norm(q_of(qkv), w), lambda qkv, w, upcast: rms_norm_ref(q_of(qkv), w, upcast=upcast),
                 [qkv, 1 + 0.2 * torch.randn(d, device=DEVICE)], None, dtype, ["qkv", "weight"], ["out"])
        assert stand_in.launches == 1
        return
    for name, (fn, ref, n_big, n_mod) in _ROW_OPS.items():
        inputs = [torch.randn(n, t, d, device=DEVICE) * 2 + 0.5 for _ in range(n_big)]
        inputs += [torch.randn(n, d, device=DEVICE) * 0.5 for _ in range(n_mod)]
        outs = ["r", "h"] if name == "gated_residual_adaln" else ["out"]
        check_op(fn, ref, inputs, None, dtype, [f"in{i}" for i in range(len(inputs))], outs)
    assert stand_in.launches == len(_ROW_OPS)
