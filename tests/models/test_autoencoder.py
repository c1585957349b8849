"""The demo's patch autoencoder: reconstruction of the synthetic set by both decoders (nearest
exemplar, linear), VAE interface, the run-directory cache (re-used, never silently refitted) and
the errors for files that do not fit."""

import copy

import pytest
import torch

from reglue.data.synthetic import SyntheticShapes
from reglue.models.autoencoder import AUTOENCODER_FILE, FIT_IMAGES, PatchAutoencoder
from reglue.models.encoders import LATENT_SCALE, PCA, build_vae


def synthetic_images(start, count, size=64):
    dataset = SyntheticShapes(4096, 8, size)
    return torch.stack([dataset[i][0] for i in range(start, start + count)])


@pytest.fixture(scope="module")
def fitted():
    return PatchAutoencoder.fit(synthetic_images(0, 256))


def psnr(a, b):
    return float(10 * torch.log10(255.0**2 / (a.float() - b.float()).square().mean()))


def test_linear_decoder_reconstructs_unseen_synthetic_images(fitted):
    images = synthetic_images(2048, 128)
    latents = fitted.sample_latents(fitted.encode_moments(images))
    decoded = fitted.decode_linear(latents)
    assert decoded.dtype == torch.uint8 and decoded.shape == images.shape
    # measured 20.8 dB; each 8x8 patch replaced by its mean colour gives 18.8 dB
    assert psnr(decoded, images) > 20.5
    # the 3x3 decoder beats decoding each patch from its own code alone (the PCA projection: 19.6 dB)
    patches = torch.nn.functional.pixel_unshuffle(images.float() / 127.5 - 1, 8)
    projected = fitted.pca.decode(fitted.pca.encode(patches))
    blocky = ((torch.nn.functional.pixel_shuffle(projected, 8) + 1) / 2 * 255).clamp(0, 255).to(torch.uint8)
    assert psnr(decoded, images) > psnr(blocky, images) + 0.5
    # the decoded images keep the shapes: the demo's shape classifier gets 92% of these right (real images: 99%)
    shape = SyntheticShapes(4096, 8, 64).classifiers()["shape"]
    assert shape.accuracy(decoded, torch.arange(2048, 2048 + 128) % 8) >= 0.85


def test_exemplar_decoder_keeps_the_shapes_of_unseen_images_and_draws_none_from_noise(fitted):
    """decode: every cell the pixels of the fit patch with the nearest code neighbourhood. Unseen
    images keep their shape better than decoded linearly (measured 97.7% against 92.2%); their
    PSNR is lower (19.2 against 20.8 dB), since a background cell brings another image's sensor
    noise. Random latents decode to chance (12.5%): the lookup draws no shape the codes lack."""
    images, labels = synthetic_images(2048, 128), torch.arange(2048, 2048 + 128) % 8
    latents = fitted.sample_latents(fitted.encode_moments(images))
    decoded = fitted.decode(latents)
    assert decoded.dtype == torch.uint8 and decoded.shape == images.shape
    classifiers = SyntheticShapes(4096, 8, 64).classifiers()
    shape = classifiers["shape"]
    assert shape.accuracy(decoded, labels) >= 0.95
    assert shape.accuracy(decoded, labels) > shape.accuracy(fitted.decode_linear(latents), labels)
    assert classifiers["hue"].accuracy(decoded, labels) >= 0.99
    assert 18.5 < psnr(decoded, images) < psnr(fitted.decode_linear(latents), images)
    noise = torch.randn(128, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    assert shape.accuracy(fitted.decode(noise), labels) <= 0.25


def test_exemplar_decoder_returns_the_fit_images_and_decodes_each_image_alone():
    """The fit images' own codes find their own patches (distance 0): decoded exactly. An image
    decodes to the same bits alone as in a batch."""
    images = synthetic_images(0, 32)
    autoencoder = PatchAutoencoder.fit(images)
    assert autoencoder.exemplar_keys.shape == (32 * 64, 36) and autoencoder.exemplar_patches.shape == (32 * 64, 192)
    latents = autoencoder.sample_latents(autoencoder.encode_moments(images))
    assert torch.equal(autoencoder.decode(latents), images)
    others = torch.randn(6, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    batch = autoencoder.decode(others)
    assert all(torch.equal(autoencoder.decode(others[i : i + 1])[0], batch[i]) for i in range(6))
    assert autoencoder.decode(others[:0]).shape == (0, 3, 64, 64)
    # the trainer casts frozen encoders to bf16 on CUDA: the lookup still runs (in fp32), nearly as exact
    half = copy.deepcopy(autoencoder).to(torch.bfloat16)
    assert half.exemplar_keys.dtype == torch.bfloat16 and half.exemplar_patches.dtype == torch.uint8
    assert (half.decode(latents) == images).float().mean() > 0.9


def test_a_file_without_exemplars_decodes_linearly_and_half_a_table_is_refused(fitted, tmp_path):
    """Runs fitted before the exemplar decoder keep their autoencoder.safetensors: it loads and
    decodes with the linear decoder, as when it was written."""
    from reglue.integrity import save_safetensors

    tensors = {k: v.contiguous() for k, v in fitted.state_dict().items()}
    metadata = {"format": "reglue-patch-autoencoder", "patch_size": "8"}  # what PatchAutoencoder.save writes
    old = {k: v for k, v in tensors.items() if not k.startswith("exemplar_")}
    save_safetensors(old, tmp_path / "old.safetensors", metadata=metadata)
    loaded = PatchAutoencoder.load(tmp_path / "old.safetensors")
    latents = torch.randn(2, 4, 8, 8)
    assert loaded.exemplar_keys is None and torch.equal(loaded.decode(latents), fitted.decode_linear(latents))
    half = dict(old, exemplar_keys=tensors["exemplar_keys"])
    save_safetensors(half, tmp_path / "half.safetensors", metadata=metadata)
    with pytest.raises(ValueError, match="half.safetensors: patch autoencoder: exemplar keys and patches come together"):
        PatchAutoencoder.load(tmp_path / "half.safetensors")


def test_vae_conventions(fitted):
    images = synthetic_images(3000, 64)
    moments = fitted.encode_moments(images)
    assert moments.shape == (64, 8, 8, 8)
    assert torch.equal(moments[:, 4:], torch.zeros_like(moments[:, 4:])), "deterministic encoder: zero std"
    latents = fitted.sample_latents(moments, eps=torch.randn(64, 4, 8, 8))
    assert torch.equal(latents, moments[:, :4] * LATENT_SCALE)
    assert 0.8 < float(latents.square().mean().sqrt()) < 1.2, "model latents have about unit scale"
    assert (fitted.latent_channels, fitted.downsample_factor) == (4, 8)
    assert not fitted.training and not any(t.requires_grad for t in fitted.state_dict().values())
    with pytest.raises(ValueError, match="multiples of 8"):
        fitted.encode_moments(torch.zeros(1, 3, 60, 60, dtype=torch.uint8))


def test_save_load_round_trip(fitted, tmp_path):
    fitted.save(tmp_path / "ae.safetensors")
    loaded = build_vae(str(tmp_path / "ae.safetensors"))
    assert isinstance(loaded, PatchAutoencoder)
    for key, value in fitted.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key
    latents = torch.randn(2, 4, 8, 8)
    assert torch.equal(loaded.decode(latents), fitted.decode(latents))


def test_run_directory_cache_is_fitted_once_then_reused(tmp_path):
    asked = []

    def fit_images(n):
        asked.append(n)
        return synthetic_images(0, 64)

    first = build_vae("patch-pca", run_dir=tmp_path, fit_images=fit_images)
    assert asked == [FIT_IMAGES] and (tmp_path / AUTOENCODER_FILE).is_file()
    assert not list(tmp_path.glob("*.tmp")), "written atomically"

    def must_not_fit(n):
        raise AssertionError("refitted although the run directory holds the autoencoder")

    again = build_vae("patch-pca", run_dir=tmp_path, fit_images=must_not_fit)  # resume
    sampling = build_vae("patch-pca", run_dir=tmp_path)  # reglue sample --run
    for key, value in first.state_dict().items():
        assert torch.equal(again.state_dict()[key], value) and torch.equal(sampling.state_dict()[key], value), key


def test_files_that_do_not_fit_are_refused_with_the_file_named(fitted, tmp_path):
    with pytest.raises(FileNotFoundError, match="name the run"):
        build_vae("patch-pca")  # sampling without the run directory
    with pytest.raises(FileNotFoundError, match="autoencoder.safetensors does not exist .*pass --vae FILE"):
        build_vae("patch-pca", run_dir=tmp_path)

    path = tmp_path / AUTOENCODER_FILE
    fitted.save(path)
    path.write_bytes(path.read_bytes()[:-100])  # a truncated copy
    with pytest.raises(ValueError, match=f"{AUTOENCODER_FILE}: the file is damaged: CRC-32 .*delete it"):
        build_vae("patch-pca", run_dir=tmp_path, fit_images=synthetic_images)

    PCA.fit(torch.randn(4, 8, 3, 3), n_components=2).save(path)  # another kind of safetensors file
    with pytest.raises(ValueError, match="is not a patch autoencoder"):
        build_vae("patch-pca", run_dir=tmp_path, fit_images=synthetic_images)

    PatchAutoencoder.fit(synthetic_images(0, 16), patch_size=4).save(path)  # a latent grid of H/4
    with pytest.raises(ValueError, match="maps 4x4 patches to 4 channels; runs need 8x8"):
        build_vae("patch-pca", run_dir=tmp_path, fit_images=synthetic_images)
    with pytest.raises(FileNotFoundError, match="not found"):
        build_vae(str(tmp_path / "missing.safetensors"))
