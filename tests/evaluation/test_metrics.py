"""The ADM metrics against closed forms and against brute-force transcriptions of the evaluator's
definitions (``evaluations/evaluator.py``)."""

import math
import warnings

import numpy as np
import pytest
import torch

from reglue.evaluation.inception import InceptionFeatures
from reglue.evaluation.metrics import (FeatureSet, GaussianStats, adm_pairwise_distances, frechet_distance,
                                       inception_score, manifold_radii, precision_recall)


def random_orthogonal(d, generator):
    q, _ = torch.linalg.qr(torch.randn(d, d, generator=generator, dtype=torch.float64))
    return q


# --------------------------------------------------------------------------------------------
# Fréchet distance
# --------------------------------------------------------------------------------------------


def test_frechet_distance_of_gaussians_sharing_eigenvectors():
    g = torch.Generator().manual_seed(0)
    d = 24
    q = random_orthogonal(d, g)
    a, b = torch.rand(d, generator=g, dtype=torch.float64) * 3 + 0.1, torch.rand(d, generator=g, dtype=torch.float64) * 3
    mu_a, mu_b = torch.randn(d, generator=g, dtype=torch.float64), torch.randn(d, generator=g, dtype=torch.float64)
    expected = (mu_a - mu_b).square().sum() + (a.sqrt() - b.sqrt()).square().sum()
    got = frechet_distance(GaussianStats(mu_a, q @ torch.diag(a) @ q.T), GaussianStats(mu_b, q @ torch.diag(b) @ q.T))
    assert got == pytest.approx(float(expected), rel=1e-10, abs=1e-10)


def test_frechet_distance_of_non_commuting_2d_gaussians():
    # tr √M of a 2x2 matrix with non-negative eigenvalues is √(tr M + 2 √det M)
    g = torch.Generator().manual_seed(1)
    for _ in range(5):
        x, y = torch.randn(2, 2, generator=g, dtype=torch.float64), torch.randn(2, 2, generator=g, dtype=torch.float64)
        sigma_a, sigma_b = x @ x.T + 0.1 * torch.eye(2), y @ y.T + 0.1 * torch.eye(2)
        product = sigma_a @ sigma_b
        tr_sqrt = math.sqrt(product.trace() + 2 * math.sqrt(torch.linalg.det(product)))
        mu_a, mu_b = torch.tensor([1.0, -2.0]), torch.tensor([0.5, 0.25])
        expected = float((mu_a - mu_b).square().sum() + sigma_a.trace() + sigma_b.trace() - 2 * tr_sqrt)
        assert frechet_distance(GaussianStats(mu_a, sigma_a), GaussianStats(mu_b, sigma_b)) == pytest.approx(expected, rel=1e-12)


def test_frechet_distance_agrees_with_the_evaluators_scipy_sqrtm_on_full_rank_covariances():
    linalg = pytest.importorskip("scipy.linalg")
    rng = np.random.default_rng(2)
    x, y = rng.normal(size=(400, 48)), rng.normal(size=(300, 48)) @ rng.normal(size=(48, 48)) * 0.3 + 0.2
    mu_a, mu_b, sigma_a, sigma_b = x.mean(0), y.mean(0), np.cov(x, rowvar=False), np.cov(y, rowvar=False)
    covmean = linalg.sqrtm(sigma_a.dot(sigma_b)).real  # FIDStatistics.frechet_distance
    expected = (mu_a - mu_b).dot(mu_a - mu_b) + np.trace(sigma_a) + np.trace(sigma_b) - 2 * np.trace(covmean)
    assert frechet_distance(GaussianStats(mu_a, sigma_a), GaussianStats(mu_b, sigma_b)) == pytest.approx(expected, rel=1e-9)


def test_fid_of_a_set_with_itself_is_zero_and_streamed_statistics_are_numpys():
    g = torch.Generator().manual_seed(3)
    features = torch.randn(700, 40, generator=g) * torch.linspace(0.1, 3, 40) + 5
    streamed = FeatureSet()
    for chunk in features.split(97):
        streamed.add(InceptionFeatures(pool=chunk, spatial=chunk[:, :8], logits=chunk))
    stats = streamed.fid_stats()
    np.testing.assert_allclose(stats.mu.numpy(), features.double().numpy().mean(0), rtol=1e-12)
    np.testing.assert_allclose(stats.sigma.numpy(), np.cov(features.double().numpy(), rowvar=False), rtol=1e-10, atol=1e-12)
    assert stats.factor is None  # more samples than dimensions: no low-rank factor
    assert abs(frechet_distance(stats, stats)) < 1e-9
    other = GaussianStats.of(torch.randn(700, 40, generator=g) * torch.linspace(0.1, 3, 40) + 5)
    assert frechet_distance(stats, other) > 0.1


def test_frechet_distance_is_stable_on_rank_deficient_covariances():
    # n < d samples: Σ = F Fᵀ with F = centred features / √(n−1), and the nonzero eigenvalues of
    # Σa Σb are the squared singular values of Faᵀ Fb, so tr √(Σa Σb) = Σ svd(Faᵀ Fb) exactly.
    g = torch.Generator().manual_seed(4)
    d, n_a, n_b = 300, 12, 20
    basis = torch.randn(d, 30, generator=g, dtype=torch.float64)
    x_a = torch.randn(n_a, 30, generator=g, dtype=torch.float64) @ basis.T
    x_b = torch.randn(n_b, 30, generator=g, dtype=torch.float64) @ basis.T + 0.5
    f_a = ((x_a - x_a.mean(0)) / math.sqrt(n_a - 1)).T
    f_b = ((x_b - x_b.mean(0)) / math.sqrt(n_b - 1)).T
    mu_diff = x_a.mean(0) - x_b.mean(0)
    expected = float(mu_diff @ mu_diff + f_a.square().sum() + f_b.square().sum()
                     - 2 * torch.linalg.svdvals(f_a.T @ f_b).sum())
    stats_a, stats_b = GaussianStats.of(x_a), GaussianStats.of(x_b)
    assert stats_a.factor is not None and stats_b.factor is not None
    dense_a, dense_b = GaussianStats(stats_a.mu, stats_a.sigma), GaussianStats(stats_b.mu, stats_b.sigma)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # rounding noise must not be reported as an imaginary part
        assert frechet_distance(stats_a, stats_b) == pytest.approx(expected, rel=1e-9)   # r x r factor path
        assert frechet_distance(dense_a, dense_b) == pytest.approx(expected, rel=1e-7)   # d x d eigendecompositions
        assert abs(frechet_distance(dense_a, dense_a)) < 1e-8


def test_an_imaginary_part_beyond_rounding_noise_is_dropped_with_a_warning():
    sigma = torch.diag(torch.tensor([2.0, 1.0, -0.5], dtype=torch.float64))  # not a covariance
    with pytest.warns(RuntimeWarning, match="imaginary part"):
        distance = frechet_distance(GaussianStats(torch.zeros(3), sigma), GaussianStats(torch.zeros(3), torch.eye(3)))
    assert math.isfinite(distance)


# --------------------------------------------------------------------------------------------
# Inception Score
# --------------------------------------------------------------------------------------------


def test_inception_score_of_uniform_predictions_is_one():
    assert inception_score(torch.zeros(40, 1008), split_size=10) == pytest.approx(1.0, abs=1e-12)


def test_inception_score_of_one_hot_predictions_is_the_number_of_classes():
    classes = 7
    labels = torch.arange(70) % classes
    logits = torch.nn.functional.one_hot(labels, 1008).float() * 1000
    assert inception_score(logits, split_size=70) == pytest.approx(classes, rel=1e-12)
    # two splits of 35 consecutive samples, each with all 7 classes: still 7; classes 0..4 then 5..9: 5
    assert inception_score(logits, split_size=35) == pytest.approx(classes, rel=1e-12)
    blocked = torch.nn.functional.one_hot(torch.arange(40) // 4, 1008).float() * 1000
    assert inception_score(blocked, split_size=20) == pytest.approx(5, rel=1e-12)


def test_inception_score_matches_the_evaluators_formula_including_a_partial_last_split():
    g = torch.Generator().manual_seed(5)
    logits = torch.randn(25, 1008, generator=g, dtype=torch.float64) * 3
    preds = torch.softmax(logits, dim=1).numpy()
    scores = []
    for i in range(0, len(preds), 10):  # Evaluator.compute_inception_score with split_size=10
        part = preds[i : i + 10]
        kl = part * (np.log(part) - np.log(np.expand_dims(np.mean(part, 0), 0)))
        scores.append(np.exp(np.mean(np.sum(kl, 1))))
    assert inception_score(logits, split_size=10) == pytest.approx(float(np.mean(scores)), rel=1e-12)


def test_inception_score_refuses_fewer_samples_than_a_split():
    with pytest.raises(ValueError, match="at least 5000 samples"):
        inception_score(torch.zeros(4999, 1008))


# --------------------------------------------------------------------------------------------
# Precision and recall: brute force of the evaluator's ManifoldEstimator
# --------------------------------------------------------------------------------------------


def tf_distance_block(u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """DistanceBlock.pairwise_distances in numpy: the fp16 graph op by op (fp16 squares, norms
    and matmul accumulated in fp32 then cast to fp16, fp16 elementwise arithmetic), and the fp32
    graph when any entry is not finite."""
    u16, v16 = u.astype(np.float16), v.astype(np.float16)
    norm_u = np.square(u16).astype(np.float32).sum(1).astype(np.float16)
    norm_v = np.square(v16).astype(np.float32).sum(1).astype(np.float16)
    dot = (u16.astype(np.float32) @ v16.astype(np.float32).T).astype(np.float16)
    with np.errstate(invalid="ignore"):  # inf - inf in an overflowing block, as in the graph
        d = np.maximum(norm_u[:, None] - np.float16(2) * dot + norm_v[None, :], np.float16(0))
    if np.isfinite(d).all():
        return d.astype(np.float32)
    u, v = u.astype(np.float32), v.astype(np.float32)
    return np.maximum((u * u).sum(1)[:, None] - 2 * (u @ v.T) + (v * v).sum(1)[None, :], 0)


def brute_force_precision_recall(ref: np.ndarray, samples: np.ndarray, k: int = 3, distances=tf_distance_block):
    def radii(x):
        return np.array([np.sort(distances(x[i : i + 1], x)[0])[k] for i in range(len(x))])  # itself included

    r_ref, r_samples = radii(ref), radii(samples)
    d = distances(ref, samples)
    precision = np.mean([any(d[i, j] <= r_ref[i] for i in range(len(ref))) for j in range(len(samples))])
    recall = np.mean([any(d[i, j] <= r_samples[j] for j in range(len(samples))) for i in range(len(ref))])
    return precision, recall


def fp32_distances(u, v):
    u, v = u.astype(np.float64), v.astype(np.float64)
    return (((u[:, None] - v[None]) ** 2).sum(-1)).astype(np.float32)


def test_precision_recall_with_ties_and_duplicates_match_brute_force():
    # small integers: every distance is exact in fp16, so many tie exactly with a radius (<= counts)
    rng = np.random.default_rng(6)
    ref = rng.integers(0, 3, (30, 8)).astype(np.float32)
    samples = np.concatenate([rng.integers(0, 3, (20, 8)), ref[:5]]).astype(np.float32)
    expected = brute_force_precision_recall(ref, samples)
    assert precision_recall(torch.from_numpy(ref), torch.from_numpy(samples)) == pytest.approx(expected, abs=0)
    assert 0 < expected[0] < 1 and 0 < expected[1] < 1


def test_precision_recall_round_distances_to_fp16_like_the_evaluator():
    # multiples of 1/8: every product and sum is exact in fp32, so only the fp16 roundings of the
    # graph decide, bit for bit; squared distances of ~400 sit on an fp16 grid of 0.25
    rng = np.random.default_rng(7)
    ref = (rng.integers(0, 40, (60, 64)) / 8).astype(np.float32)
    samples = (rng.integers(0, 40, (50, 64)) / 8 + rng.integers(0, 2, (50, 64)) / 8).astype(np.float32)
    u, v = torch.from_numpy(ref), torch.from_numpy(samples)
    np.testing.assert_array_equal(adm_pairwise_distances(u, v).numpy(), tf_distance_block(ref, samples))
    radii = manifold_radii(u).numpy()
    np.testing.assert_array_equal(radii, [np.sort(tf_distance_block(ref[i : i + 1], ref)[0])[3] for i in range(60)])
    expected = brute_force_precision_recall(ref, samples)
    assert precision_recall(u, v) == pytest.approx(expected, abs=0)
    # the fp16 rounding matters here: exact distances decide differently
    assert brute_force_precision_recall(ref, samples, distances=fp32_distances) != expected


def test_precision_recall_blocks_and_fp32_fallback():
    rng = np.random.default_rng(8)
    ref = (rng.integers(0, 40, (23, 16)) / 8).astype(np.float32)
    samples = (rng.integers(0, 40, (19, 16)) / 8).astype(np.float32)
    u, v = torch.from_numpy(ref), torch.from_numpy(samples)
    assert precision_recall(u, v, block=5) == precision_recall(u, v)  # tiling does not change the result
    big_ref, big_samples = ref * 64, samples * 64  # squared norms beyond fp16's 65504: fp32 block
    with np.errstate(over="ignore"):
        norms16 = np.square(big_ref.astype(np.float16)).astype(np.float32).sum(1).astype(np.float16)
        assert not np.isfinite(norms16).all()  # the fp16 graph overflows: the fp32 block decides
        expected = brute_force_precision_recall(big_ref, big_samples)
    assert precision_recall(torch.from_numpy(big_ref), torch.from_numpy(big_samples)) == pytest.approx(expected, abs=0)


def test_fp16_overflow_of_the_dot_product_alone_gives_zero_distances_as_in_the_evaluator():
    # ‖u‖² ≈ 40,000 fits fp16, 2 u·v ≈ 80,000 does not: ‖u‖² − inf + ‖v‖² = −inf, clamped to 0,
    # which is finite, so TensorFlow keeps the fp16 block: every distance is 0
    rng = np.random.default_rng(9)
    ref = (50 + rng.integers(-8, 8, (12, 16)) / 8).astype(np.float32)
    samples = (50 + rng.integers(-8, 8, (10, 16)) / 8).astype(np.float32)
    with np.errstate(over="ignore"):
        assert (tf_distance_block(ref, samples) == 0).all()
        expected = brute_force_precision_recall(ref, samples)
    distances = adm_pairwise_distances(torch.from_numpy(ref), torch.from_numpy(samples))
    assert (distances == 0).all()
    assert precision_recall(torch.from_numpy(ref), torch.from_numpy(samples)) == pytest.approx(expected, abs=0)


def test_precision_recall_need_more_than_k_vectors():
    with pytest.raises(ValueError, match="more than k=3"):
        precision_recall(torch.rand(3, 8), torch.rand(10, 8))


# --------------------------------------------------------------------------------------------
# FeatureSet across ranks (gloo)
# --------------------------------------------------------------------------------------------


def rank_features(rank: int, n: int = 9):
    g = torch.Generator().manual_seed(100 + rank)
    pool = torch.randn(n + rank, 2048, generator=g) + rank  # ranks differ in count and mean
    return InceptionFeatures(pool=pool, spatial=pool[:, :2023] * 2, logits=pool[:, :1008])


def gather_worker(rank: int, world_size: int, init_file: str, out_dir: str):
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size)
    try:
        features = FeatureSet(keep_pool=True, keep_logits=True)
        batch = rank_features(rank)
        features.add(InceptionFeatures(*(t[:4] for t in batch)))
        features.add(InceptionFeatures(*(t[4:] for t in batch)))
        merged = features.gather(dst=0)
        stats = merged.fid_stats()
        torch.save({"mu": stats.mu, "sigma": stats.sigma, "count": merged.count,
                    "pool": merged.pool if rank == 0 else None, "logits": merged.logits if rank == 0 else None},
                   f"{out_dir}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_feature_set_gather_merges_statistics_on_every_rank_and_rows_on_one(tmp_path):
    import torch.multiprocessing as mp

    mp.spawn(gather_worker, args=(2, str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=True)
    everything = [rank_features(0), rank_features(1)]
    pool = torch.cat([f.pool for f in everything])
    results = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    for result in results:
        assert result["count"] == len(pool) == 19
        np.testing.assert_allclose(result["mu"].numpy(), pool.double().numpy().mean(0), rtol=1e-12, atol=1e-12)
        np.testing.assert_allclose(result["sigma"].numpy(), np.cov(pool.double().numpy(), rowvar=False), rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(results[0]["pool"], pool, rtol=0, atol=0)  # in rank order
    torch.testing.assert_close(results[0]["logits"], torch.cat([f.logits for f in everything]), rtol=0, atol=0)
    assert results[1]["pool"] is None


def test_scores_print_to_the_digits_they_mean():
    from reglue.evaluation.metrics import format_score

    assert format_score("fid", 5.781234) == "5.781"
    assert format_score("fid", 2.0) == "2.000"
    assert format_score("sfid", 123.456) == "123.5"
    assert format_score("fd_dinov2", 1234.56) == "1235"
    assert format_score("inception_score", 215.8412) == "215.8"
    assert format_score("fid", 0.00012345) == "0.0001234"
    assert format_score("precision", 0.82649) == "0.826" and format_score("recall", 1.0) == "1.000"
    assert format_score("fid", float("nan")) == "nan"
