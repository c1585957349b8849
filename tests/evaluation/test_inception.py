"""torch-fidelity's InceptionV3 taps (random weights: no downloads), weight resolution and the hash check."""

import hashlib
import os

import pytest
import torch

from reglue.evaluation import inception as inception_module
from reglue.evaluation.inception import (INCEPTION_FILE, LOGITS_DIM, POOL_DIM, SPATIAL_DIM, SPATIAL_MODULE,
                                         InceptionFeatureExtractor, build_inception, ieee_fp32,
                                         resolve_inception_weights)


@pytest.fixture(scope="module")
def random_inception():
    return build_inception("random")


@pytest.fixture(scope="module")
def images():
    return torch.randint(0, 256, (2, 48, 40, 3), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))


@pytest.fixture(scope="module")
def tapped(random_inception, images):
    """The features of ``images`` and the whole Mixed_6d.branch1x1 output, from one forward."""
    captured = {}
    handle = random_inception.net.get_submodule(SPATIAL_MODULE).register_forward_hook(
        lambda module, inputs, output: captured.setdefault("full", output.clone()))
    try:
        features = random_inception(images)
    finally:
        handle.remove()
    return features, captured["full"]


def test_taps_shapes_and_the_nhwc_order_of_mixed_6_conv(tapped):
    features, full = tapped
    assert features.pool.shape == (2, POOL_DIM) and features.pool.dtype == torch.float32
    assert features.spatial.shape == (2, SPATIAL_DIM) == (2, 17 * 17 * 7)
    assert features.logits.shape == (2, LOGITS_DIM)
    # full: (N, 192, 17, 17), NCHW; element (n, c, h, w) sits at (h * 17 + w) * 7 + c of the tap
    assert full.shape == (2, 192, 17, 17)
    for n, c, h, w in [(0, 0, 0, 1), (1, 6, 3, 16), (0, 2, 16, 0), (1, 5, 9, 4)]:
        assert features.spatial[n, (h * 17 + w) * 7 + c] == full[n, c, h, w]
    torch.testing.assert_close(features.spatial.view(2, 17, 17, 7), full[:, :7].permute(0, 2, 3, 1), rtol=0, atol=0)
    assert features.spatial.std() > 0.01 and features.pool.std() > 0.01  # the random network is not degenerate


def test_mixed_6_conv_is_torch_fidelitys_mixed_6d_branch1x1():
    # torch-fidelity's utils/util_convert_inception_weights.py maps TF "mixed_6/conv" to
    # "Mixed_6d.branch1x1" (mixed_3 = Mixed_6a, the 35->17 reduction; mixed_7 = Mixed_6e)
    assert SPATIAL_MODULE == "Mixed_6d.branch1x1"


def test_logits_are_pool_3_times_the_weights_without_the_bias(random_inception, tapped):
    features = tapped[0]
    fc = random_inception.net.fc
    assert fc.bias.abs().max() > 1e-3  # so that a biased logit would differ
    torch.testing.assert_close(features.logits, features.pool @ fc.weight.T, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(features.logits, fc(features.pool), atol=1e-4)


def test_channels_first_input_gives_the_same_features(random_inception, images, tapped):
    nhwc = tapped[0]
    nchw = random_inception(images.permute(0, 3, 1, 2).contiguous())
    for a, b in zip(nhwc, nchw):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    with pytest.raises(ValueError, match="uint8"):
        random_inception(images[:, :8, :8].float())


def test_random_weights_are_seeded_and_say_so(random_inception, images, tapped):
    again = build_inception("random")
    torch.testing.assert_close(again(images[:1]).pool, tapped[0].pool[:1], rtol=1e-6, atol=1e-6)
    assert random_inception.is_random and "RANDOM" in random_inception.describe()


def test_tf32_is_off_inside_and_restored_after():
    cudnn_conv = torch.backends.cudnn.conv
    before = getattr(cudnn_conv, "fp32_precision", None)
    with ieee_fp32():
        if before is not None:
            assert cudnn_conv.fp32_precision == "ieee" and torch.backends.cuda.matmul.fp32_precision == "ieee"
        else:
            assert not torch.backends.cudnn.allow_tf32 and not torch.backends.cuda.matmul.allow_tf32
    assert getattr(cudnn_conv, "fp32_precision", None) == before


@pytest.fixture(scope="module")
def weights_file(tmp_path_factory, random_inception):
    path = tmp_path_factory.mktemp("inception") / INCEPTION_FILE
    torch.save(random_inception.net.state_dict(), path)
    return path


def test_a_weights_file_with_the_wrong_hash_is_refused(weights_file, tmp_path):
    with pytest.raises(ValueError, match="SHA-256 .* is not that of torch-fidelity's"):
        InceptionFeatureExtractor(weights_file)
    truncated = tmp_path / "truncated.pth"
    truncated.write_bytes(weights_file.read_bytes()[:1000])
    with pytest.raises(ValueError, match="truncated"):
        InceptionFeatureExtractor(truncated)


def test_a_file_with_the_expected_hash_loads_weights_only(weights_file, images, tapped, monkeypatch):
    monkeypatch.setattr(inception_module, "INCEPTION_SHA256", hashlib.sha256(weights_file.read_bytes()).hexdigest())
    loaded = InceptionFeatureExtractor(weights_file, seed=123)  # another seed: the weights must come from the file
    assert not loaded.is_random and str(weights_file) in loaded.describe()
    torch.testing.assert_close(loaded(images[:1]).pool, tapped[0].pool[:1], rtol=1e-6, atol=1e-6)


class NotAWeight:
    def __reduce__(self):
        return (os.getcwd, ())  # a pickle that would run code when loaded


def test_pickled_code_is_never_executed(tmp_path, monkeypatch):
    path = tmp_path / "evil.pth"
    torch.save({"fc.weight": NotAWeight()}, path)
    monkeypatch.setattr(inception_module, "INCEPTION_SHA256", hashlib.sha256(path.read_bytes()).hexdigest())
    with pytest.raises(ValueError, match="not loadable as plain weights"):
        InceptionFeatureExtractor(path)


def test_missing_weights_name_the_file_and_the_places_searched(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch-home"))
    with pytest.raises(FileNotFoundError) as err:
        resolve_inception_weights(None)
    message = str(err.value)
    assert INCEPTION_FILE in message and str(tmp_path / "torch-home" / "hub" / "checkpoints") in message
    assert "--inception-weights" in message
    with pytest.raises(FileNotFoundError, match="no such file"):
        resolve_inception_weights(tmp_path / "nowhere.pth")
    cached = tmp_path / "torch-home" / "hub" / "checkpoints" / INCEPTION_FILE
    cached.parent.mkdir(parents=True)
    cached.write_bytes(b"x")
    assert resolve_inception_weights(None) == cached
