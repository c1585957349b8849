"""Encoders: tiny DINOv2 outputs and frozen-ness, feature statistics, PCA, VAE, semantic target."""

import pytest
import torch

from reglue.models.compressor import SemanticCompressor
from reglue.models.encoders import (
    LATENT_SCALE,
    PCA,
    VAE,
    FeatureStats,
    RunningMoments,
    build_dinov2,
    build_vae,
    compute_feature_stats,
    semantic_target,
    tiny_dinov2,
)
from tests.conftest import assert_close


@pytest.fixture(scope="module")
def dinov2():
    return tiny_dinov2()


@pytest.fixture(scope="module")
def vae():
    return build_vae("tiny-random")


def random_images(n=2, size=64):
    return torch.randint(0, 256, (n, 3, size, size), dtype=torch.uint8)


# ------------------------------------------------------------------------------------- DINOv2


def test_dinov2_output_shapes(dinov2):
    out = dinov2(random_images())
    assert out.features.shape == (2, 4 * 32, 4, 4)
    assert out.cls.shape == (2, 32)
    assert out.tokens.shape == (2, 1 + 16, 32)
    assert (dinov2.feature_channels, dinov2.grid_size, dinov2.embed_dim) == (128, 4, 32)


def test_dinov2_final_layer_consistency(dinov2):
    """The last chosen block is the final one here, so its normed patch tokens are the REPA
    tokens minus [CLS] (same final norm, registers dropped, row-major patch order)."""
    out = dinov2(random_images())
    last = out.features[:, -32:].flatten(2).transpose(1, 2)
    assert_close(last, out.tokens[:, 1:], name="last-layer features vs tokens")
    assert_close(out.cls, out.tokens[:, 0], name="cls vs tokens[:, 0]")
    # each chosen layer went through the final LayerNorm (affine init 1/0): zero mean per token
    per_token_mean = out.features.view(2, 4, 32, 16).mean(dim=2)
    assert per_token_mean.abs().max() < 1e-4


def test_dinov2_is_frozen(dinov2):
    assert all(not p.requires_grad for p in dinov2.parameters())
    parent = torch.nn.Sequential(dinov2)
    parent.train()
    assert not dinov2.training and not dinov2.model.training
    out = dinov2(random_images(1))
    assert not out.features.requires_grad and out.features.grad_fn is None


def test_dinov2_rejects_wrong_image_size(dinov2):
    with pytest.raises(ValueError, match=r"\(N, 3, 64, 64\)"):
        dinov2(random_images(1, size=32))


def test_tiny_dinov2_is_deterministic_and_keeps_global_rng():
    torch.manual_seed(123)
    expected_next = torch.rand(3)
    torch.manual_seed(123)
    a = tiny_dinov2(depth=2, layers=(0, 1))
    assert_close(torch.rand(3), expected_next, atol=0, rtol=0, name="global RNG")
    b = tiny_dinov2(depth=2, layers=(0, 1))
    for (name, pa), pb in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.equal(pa, pb), name


def test_dinov2_local_weights_round_trip(tmp_path, dinov2):
    from safetensors.torch import save_file

    path = tmp_path / "dinov2.safetensors"
    save_file({k: v.contiguous() for k, v in dinov2.model.state_dict().items()}, str(path))
    loaded = build_dinov2(weights=str(path), image_size=64, layers=(0, 1, 2, 3), embed_dim=32, depth=4, num_heads=2)
    images = random_images()
    for got, want in zip(loaded(images), dinov2(images)):
        assert_close(got, want, atol=0, rtol=0, name="reloaded DINOv2")
    # a checkpoint made for another resolution: positional embeddings resampled (4x4 -> 8x8 grid)
    larger = build_dinov2(weights=str(path), image_size=128, layers=(3,), embed_dim=32, depth=4, num_heads=2)
    assert larger(random_images(1, size=128)).features.shape == (1, 32, 8, 8)
    with pytest.raises(FileNotFoundError):
        build_dinov2(weights=str(tmp_path / "missing.pth"))
    with pytest.raises(ValueError, match="layers"):
        build_dinov2(image_size=64, layers=(4,), embed_dim=32, depth=4, num_heads=2)


# ---------------------------------------------------------------------------------- statistics


def test_running_moments_match_direct_float64():
    batches = [torch.randn(n, 6, 3, 3) * torch.arange(1, 7).view(1, 6, 1, 1) + 100 for n in (3, 1, 5, 2)]
    rows = torch.cat([b.movedim(1, -1).reshape(-1, 6) for b in batches]).double()

    stats = compute_feature_stats(iter(batches))
    assert_close(stats.mean, rows.mean(0), atol=1e-5, rtol=1e-6, name="mean")
    assert_close(stats.std, rows.std(0, correction=0), atol=1e-6, rtol=1e-5, name="std")

    # tiny chunks exercise the chunked update; merging two halves equals the whole
    first = RunningMoments()
    for b in batches[:2]:
        first.update(b, max_chunk_elements=7)
    second = RunningMoments()
    for b in batches[2:]:
        second.update(b)
    merged = first.merge(second)
    assert merged.count == rows.shape[0]
    assert_close(merged.mean, rows.mean(0), atol=1e-12, rtol=1e-12, name="merged mean")
    assert_close(merged.m2, (rows - rows.mean(0)).square().sum(0), atol=1e-9, rtol=1e-9, name="merged m2")
    assert RunningMoments().merge(merged).count == merged.count


def test_feature_stats_normalize_and_round_trip(tmp_path):
    features = torch.randn(4, 5, 3, 3) * 3 + 2
    stats = compute_feature_stats([features])
    z = stats.normalize(features)
    assert_close(z.mean(dim=(0, 2, 3)), torch.zeros(5), atol=1e-5, name="normalised mean")
    assert_close(z.std(dim=(0, 2, 3), correction=0), torch.ones(5), atol=1e-5, name="normalised std")
    assert stats.normalize(features.bfloat16()).dtype == torch.bfloat16

    path = tmp_path / "stats.safetensors"
    stats.save(path)
    loaded = FeatureStats.load(path)
    assert torch.equal(loaded.mean, stats.mean) and torch.equal(loaded.std, stats.std)
    with pytest.raises(ValueError, match=r"\(N, 5, H, W\)"):
        stats.normalize(torch.zeros(1, 4, 2, 2))


@pytest.mark.parametrize("numpy_module", ["numpy._core", "numpy.core"])
def test_feature_stats_load_published_numpy_pickle(tmp_path, numpy_module):
    """REGLUE's norm_stats/*.pth hold numpy arrays, pickled under numpy 1.x ('numpy.core') or
    2.x ('numpy._core') module names."""
    np = pytest.importorskip("numpy")
    mean, std = np.linspace(-1, 1, 7).astype(np.float32), np.linspace(0.5, 2, 7).astype(np.float32)
    path = tmp_path / "dino_mean_std.pth"
    torch.save({"mean": mean, "std": std}, path, _use_new_zipfile_serialization=False)
    raw = path.read_bytes()
    assert b"numpy._core.multiarray" in raw
    path.write_bytes(raw.replace(b"numpy._core.multiarray", f"{numpy_module}.multiarray".encode()))
    stats = FeatureStats.load(path)
    assert torch.equal(stats.mean, torch.from_numpy(mean)) and torch.equal(stats.std, torch.from_numpy(std))


# ------------------------------------------------------------------------------------------ PCA


def low_rank_features(n=6, channels=12, rank=3, size=4):
    codes = torch.randn(n, size, size, rank) * torch.tensor([5.0, 2.0, 1.0])[:rank]
    basis = torch.linalg.qr(torch.randn(channels, rank)).Q.T  # (rank, C) orthonormal
    offset = torch.randn(channels)
    return (codes @ basis + offset).permute(0, 3, 1, 2).contiguous()


def test_pca_reconstructs_low_rank_data_and_has_orthonormal_components():
    features = low_rank_features()
    pca = PCA.fit(features, n_components=3)
    z = pca.encode(features)
    assert z.shape == (6, 3, 4, 4) and pca.latent_channels == 3 and pca.in_channels == 12
    assert_close(pca.decode(z), features, atol=1e-4, rtol=1e-4, name="reconstruction")
    assert_close(pca.components @ pca.components.T, torch.eye(3), atol=1e-5, name="orthonormal")
    variance = pca.explained_variance
    assert (variance[:-1] >= variance[1:]).all()
    # unwhitened codes: variance per component equals its eigenvalue; zero mean
    assert_close(z.var(dim=(0, 2, 3), correction=0), variance, atol=1e-3, rtol=1e-4, name="code variance")
    assert_close(z.mean(dim=(0, 2, 3)), torch.zeros(3), atol=1e-4, name="code mean")


def test_pca_matches_svd_and_whitening():
    features = torch.randn(3, 10, 5, 5)
    rows = features.movedim(1, -1).reshape(-1, 10).double()
    centred = rows - rows.mean(0)
    singular = torch.linalg.svdvals(centred)
    pca = PCA.fit(features, n_components=4)
    assert_close(pca.explained_variance, singular[:4].square() / rows.shape[0], rtol=1e-5, name="eigenvalues")

    white = PCA.fit(features, n_components=4, whiten=True)
    z = white.encode(features)
    assert_close(z.var(dim=(0, 2, 3), correction=0), torch.ones(4), atol=1e-4, name="whitened variance")
    assert_close(white.decode(z), pca.decode(pca.encode(features)), atol=1e-5, name="whitened decode")


def test_pca_save_load(tmp_path):
    for whiten in (False, True):
        pca = PCA.fit(torch.randn(2, 8, 3, 3), n_components=2, whiten=whiten)
        path = tmp_path / f"pca_{whiten}.safetensors"
        pca.save(path)
        loaded = PCA.load(path)
        assert loaded.whiten == whiten
        for key, value in pca.state_dict().items():
            assert torch.equal(loaded.state_dict()[key], value), key
    with pytest.raises(ValueError, match="n_components"):
        PCA.fit(torch.randn(2, 8, 3, 3), n_components=9)


# ------------------------------------------------------------------------------------------ VAE


def test_vae_moments_sampling_and_decode(vae):
    images = random_images()
    moments = vae.encode_moments(images)
    assert moments.shape == (2, 8, 8, 8)
    assert (moments[:, 4:] > 0).all(), "the second half holds standard deviations"
    assert not any(p.requires_grad for p in vae.parameters()) and not vae.training

    latents = VAE.sample_latents(moments, generator=torch.Generator().manual_seed(0))
    eps = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    assert_close(latents, (moments[:, :4] + moments[:, 4:] * eps) * LATENT_SCALE, name="sampled latents")
    deterministic = torch.cat([moments[:, :4], torch.zeros_like(moments[:, 4:])], dim=1)
    assert torch.equal(VAE.sample_latents(deterministic), moments[:, :4] * LATENT_SCALE)

    decoded = vae.decode(latents)
    assert decoded.shape == (2, 3, 64, 64) and decoded.dtype == torch.uint8
    assert (vae.latent_channels, vae.downsample_factor) == (4, 8)


def test_tiny_vae_is_deterministic(vae):
    again = build_vae("tiny-random")
    for (name, a), b in zip(vae.state_dict().items(), again.state_dict().values()):
        assert torch.equal(a, b), name


# ------------------------------------------------------------------------------ semantic target


def test_semantic_target_shapes(dinov2):
    features = dinov2(random_images(3)).features
    stats = compute_feature_stats([features])
    compressor = SemanticCompressor((128, 32, 8)).eval()
    target = semantic_target(features, stats, compressor, grid=8)
    assert target.shape == (3, 8, 8, 8)

    same_grid = semantic_target(features, stats, compressor, grid=4)
    assert_close(same_grid, compressor.encode(stats.normalize(features)), atol=0, rtol=0, name="no resize")

    pca = PCA.fit(stats.normalize(features), n_components=8)
    assert semantic_target(features, stats, pca, grid=8).shape == (3, 8, 8, 8)
