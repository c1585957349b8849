"""SemanticCompressor: published key/shape parity, shapes, BatchNorm folding, checkpoint loading."""

import pytest
import torch
import torch.nn as nn

from reglue.models.compressor import ResidualBlock, SemanticCompressor, load_compressor
from tests.conftest import assert_close

BN_BUFFERS = ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")


def expected_keys(channels):
    """Key -> shape of the published REGLUE compressor, written from its description: a conv3x3
    per step, a residual block (conv1, bn1, conv2, bn2) after every conv but the last; the decoder
    runs the reversed widths."""
    shapes = {}
    for side, widths in (("encoder", channels), ("decoder", channels[::-1])):
        index = 0
        for step, (c_in, c_out) in enumerate(zip(widths[:-1], widths[1:])):
            shapes[f"{side}.model.{index}.weight"] = (c_out, c_in, 3, 3)
            shapes[f"{side}.model.{index}.bias"] = (c_out,)
            index += 1
            if step < len(widths) - 2:
                for conv, bn in (("conv1", "bn1"), ("conv2", "bn2")):
                    shapes[f"{side}.model.{index}.{conv}.weight"] = (c_out, c_out, 3, 3)
                    shapes[f"{side}.model.{index}.{conv}.bias"] = (c_out,)
                    for name in BN_BUFFERS:
                        shapes[f"{side}.model.{index}.{bn}.{name}"] = () if name == "num_batches_tracked" else (c_out,)
                index += 1
    return shapes


@pytest.mark.parametrize("channels", [(3072, 256, 16), (3072, 512, 128, 16)])
def test_published_keys_and_shapes(channels):
    with torch.device("meta"):
        model = SemanticCompressor(channels)
    got = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    want = expected_keys(channels)
    assert sorted(got) == sorted(want), f"missing {set(want) - set(got)}, extra {set(got) - set(want)}"
    for key, shape in want.items():
        assert got[key] == shape, f"{key}: {got[key]} != {shape}"


def test_published_default_layout():
    """The exact 3072 -> 256 -> 16 layout of the issue, spelled out."""
    with torch.device("meta"):
        model = SemanticCompressor()
    assert model.channels == (3072, 256, 16)
    sd = model.state_dict()
    assert sd["encoder.model.0.weight"].shape == (256, 3072, 3, 3)
    assert sd["encoder.model.1.conv1.weight"].shape == (256, 256, 3, 3)
    assert sd["encoder.model.1.conv2.bias"].shape == (256,)  # the published block convs carry biases
    assert sd["encoder.model.2.weight"].shape == (16, 256, 3, 3)
    assert sd["decoder.model.0.weight"].shape == (256, 16, 3, 3)
    assert sd["decoder.model.2.weight"].shape == (3072, 256, 3, 3)
    assert isinstance(model.encoder.model[1], ResidualBlock)
    assert len(sd) == 2 * (2 + 2 * (2 + len(BN_BUFFERS)) + 2)


def randomize_batchnorms(model):
    """Non-trivial running statistics and affine parameters, as after training."""
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.normal_(0, 0.5)
                m.running_var.uniform_(0.3, 2.0)
                m.weight.normal_(1, 0.3)
                m.bias.normal_(0, 0.3)
    return model


def test_encode_decode_shapes():
    model = SemanticCompressor((48, 24, 6)).eval()
    x = torch.randn(2, 48, 8, 8)
    z = model.encode(x)
    assert z.shape == (2, 6, 8, 8)
    assert model.decode(z).shape == (2, 48, 8, 8)
    assert model(x).shape == x.shape
    assert (model.in_channels, model.latent_channels) == (48, 6)


def test_residual_block_formula():
    block = randomize_batchnorms(ResidualBlock(8)).eval()
    x = torch.randn(2, 8, 5, 5)
    out = torch.relu(block.bn1(block.conv1(x)))
    want = torch.relu(block.bn2(block.conv2(out)) + x)
    assert_close(block(x), want, name="residual block")


@pytest.mark.parametrize("channels", [(48, 24, 6), (40, 32, 16, 4)])
def test_fold_batchnorm_matches_eval(channels):
    model = randomize_batchnorms(SemanticCompressor(channels)).eval()
    folded = model.fold_batchnorm()
    assert not any(isinstance(m, nn.BatchNorm2d) for m in folded.modules())
    assert any(isinstance(m, nn.BatchNorm2d) for m in model.modules()), "the original must be left intact"
    assert not folded.training and not any(p.requires_grad for p in folded.parameters())
    for block in folded.modules():
        if isinstance(block, ResidualBlock):
            assert isinstance(block.bn1, nn.Identity) and isinstance(block.bn2, nn.Identity)

    x = torch.randn(2, channels[0], 6, 6)
    z = torch.randn(2, channels[-1], 6, 6)
    assert_close(folded.encode(x), model.encode(x), atol=1e-5, rtol=1e-4, name="encode")
    assert_close(folded.decode(z), model.decode(z), atol=1e-5, rtol=1e-4, name="decode")
    assert_close(folded(x), model(x), atol=1e-5, rtol=1e-4, name="forward")
    assert_close(folded.fold_batchnorm()(x), folded(x), atol=0, rtol=0, name="folding twice")


def trained_state_dict(channels):
    return randomize_batchnorms(SemanticCompressor(channels)).state_dict()


@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
def test_load_strips_module_prefix_and_infers_channels(tmp_path, suffix):
    channels = (40, 32, 16, 4)
    state = trained_state_dict(channels)
    path = tmp_path / f"compression_model{suffix}"
    prefixed = {f"module.{k}": v for k, v in state.items()}
    if suffix == ".pth":
        torch.save(prefixed, path)
    else:
        from safetensors.torch import save_file

        save_file(prefixed, str(path))

    model = load_compressor(path)
    assert model.channels == channels and not model.training
    reference = SemanticCompressor(channels).eval()
    reference.load_state_dict(state)
    x = torch.randn(1, 40, 4, 4)
    assert_close(model(x), reference(x), atol=0, rtol=0, name="loaded compressor")
    assert load_compressor(prefixed, channels=channels).channels == channels


def test_bad_checkpoints_raise_clear_errors(tmp_path):
    state = trained_state_dict((48, 24, 6))

    broken = dict(state)
    del broken["encoder.model.1.bn2.running_var"]
    broken["encoder.model.1.extra.weight"] = torch.zeros(1)
    with pytest.raises(ValueError) as err:
        load_compressor(broken)
    message = str(err.value)
    assert "missing keys" in message and "encoder.model.1.bn2.running_var" in message
    assert "unexpected keys" in message and "encoder.model.1.extra.weight" in message

    with pytest.raises(ValueError, match=r"shape mismatches.*encoder\.model\.0\.weight: checkpoint \(24, 48, 3, 3\)"):
        load_compressor(state, channels=(64, 24, 6))

    with pytest.raises(ValueError, match="cannot infer"):
        load_compressor({"ema.weight": torch.zeros(3)})

    with pytest.raises(FileNotFoundError):
        load_compressor(tmp_path / "nope.pth")
