"""`reglue stats` (feature statistics) and `reglue train-compressor` on tiny random encoders."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from reglue import checkpoint as ckpt
from reglue import cli
from reglue.data.shards import open_data_dir
from reglue.data.stats import build_feature_encoder, compute_dataset_stats, run_config
from reglue.data.synthetic import SyntheticShapes
from reglue.data.train_compressor import CompressorTraining, split_holdout, train_compressor
from reglue.models.compressor import load_compressor
from reglue.models.encoders import FeatureStats, tiny_dinov2

from .conftest import IMAGE_SIZE


def direct_stats(encoder, dataset) -> FeatureStats:
    """Two-pass float64 mean / population std over all features at once."""
    images = torch.stack([dataset[i][0] for i in range(len(dataset))])
    features = encoder(images).features.double().movedim(1, -1).reshape(-1, encoder.feature_channels)
    return FeatureStats(features.mean(0), features.std(0, unbiased=False))


def test_stats_match_a_direct_computation(prepared):
    dataset = open_data_dir(prepared)
    encoder = tiny_dinov2(image_size=IMAGE_SIZE)
    expected = direct_stats(encoder, dataset)
    got = compute_dataset_stats(dataset, encoder, batch_size=3)
    assert got.channels == encoder.feature_channels
    torch.testing.assert_close(got.mean, expected.mean, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got.std, expected.std, atol=1e-5, rtol=1e-5)
    subset = compute_dataset_stats(dataset, encoder, batch_size=4, max_images=5, seed=1)
    assert not torch.allclose(subset.mean, got.mean), "max_images must take a subset"


def test_stats_cli_single_process(prepared, tmp_path):
    out = tmp_path / "stats.safetensors"
    assert cli.main(["stats", "--preset", "tiny", "--data", str(prepared), "--out", str(out), "--workers", "0"]) == 0
    config = run_config("tiny", None, {})
    encoder = build_feature_encoder(config, IMAGE_SIZE, torch.device("cpu"))
    expected = direct_stats(encoder, open_data_dir(prepared))
    loaded = FeatureStats.load(out)  # what encoders.feature_stats reads
    torch.testing.assert_close(loaded.mean, expected.mean, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(loaded.std, expected.std, atol=1e-5, rtol=1e-5)


@pytest.mark.slow
def test_stats_cli_two_ranks_torchrun(prepared, tmp_path):
    """Two gloo ranks each stream half of the images; the merged result equals the direct one
    (and so does the PCA from the all-reduced covariance sums)."""
    from reglue.models.encoders import PCA

    out, pca_out = tmp_path / "stats2.safetensors", tmp_path / "pca2.safetensors"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "reglue.cli", "stats",
           "--preset", "tiny", "--data", str(prepared), "--out", str(out), "--workers", "0", "--batch-size", "2",
           "--pca", "6", "--pca-out", str(pca_out)]
    result = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    encoder = build_feature_encoder(run_config("tiny", None, {}), IMAGE_SIZE, torch.device("cpu"))
    dataset = open_data_dir(prepared)
    expected = direct_stats(encoder, dataset)
    loaded = FeatureStats.load(out)
    torch.testing.assert_close(loaded.mean, expected.mean, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(loaded.std, expected.std, atol=1e-5, rtol=1e-5)
    images = torch.stack([dataset[i][0] for i in range(len(dataset))])
    assert_same_pca(PCA.load(pca_out), PCA.fit(loaded.normalize(encoder(images).features.float()), n_components=6))


@pytest.fixture(scope="module")
def tiny_features():
    dataset = SyntheticShapes(size=48, num_classes=4, image_size=IMAGE_SIZE, seed=0)
    encoder = tiny_dinov2(image_size=IMAGE_SIZE)
    stats = compute_dataset_stats(dataset, encoder, batch_size=16)
    train_idx, val_idx = split_holdout(len(dataset), 0.25, seed=0)
    assert not set(train_idx) & set(val_idx)
    subset = torch.utils.data.Subset
    return subset(dataset, train_idx), subset(dataset, val_idx), encoder, stats


HP = CompressorTraining(channels=(128, 32, 8), epochs=4, lr=3e-3, min_lr=3e-4, cosine_epochs=None, global_batch_size=12)


def test_compressor_loss_falls_and_output_loads(tiny_features, tmp_path):
    train_set, val_set, encoder, stats = tiny_features
    history = train_compressor(train_set, val_set, encoder, stats, tmp_path, HP)
    assert [h["epoch"] for h in history] == [1, 2, 3, 4]
    assert history[-1]["train_loss"] < 0.8 * history[0]["train_loss"]
    assert history[-1]["val_loss"] < history[0]["val_loss"]
    assert history[0]["lr"] == pytest.approx(HP.lr) and history[-1]["lr"] < history[0]["lr"]
    assert len((tmp_path / "log.jsonl").read_text().splitlines()) == 4
    compressor = load_compressor(tmp_path / "compressor.safetensors")  # what encoders.compressor reads
    assert compressor.channels == HP.channels


def test_compressor_training_resumes_exactly(tiny_features, tmp_path):
    """2 epochs, then the same command with 3: identical to 3 straight (the cosine period is fixed)."""
    train_set, val_set, encoder, stats = tiny_features
    hp = {**HP.__dict__, "cosine_epochs": 4}
    straight = train_compressor(train_set, val_set, encoder, stats, tmp_path / "a", CompressorTraining(**{**hp, "epochs": 3}))
    train_compressor(train_set, val_set, encoder, stats, tmp_path / "b", CompressorTraining(**{**hp, "epochs": 2}))
    resumed = train_compressor(train_set, val_set, encoder, stats, tmp_path / "b", CompressorTraining(**{**hp, "epochs": 3}))
    assert resumed == straight
    a = load_compressor(tmp_path / "a" / "compressor.safetensors").state_dict()
    b = load_compressor(tmp_path / "b" / "compressor.safetensors").state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    with pytest.raises(ValueError, match="channels"):
        train_compressor(train_set, val_set, encoder, stats, tmp_path / "b", CompressorTraining(**{**hp, "channels": (128, 16, 8)}))
    with pytest.raises(ValueError, match=r"was started with other settings \(seed: 0 there, 1 now\).*--overwrite"):
        train_compressor(train_set, val_set, encoder, stats, tmp_path / "b", CompressorTraining(**{**hp, "seed": 1}))
    again = train_compressor(train_set, val_set, encoder, stats, tmp_path / "b", CompressorTraining(**{**hp, "epochs": 1}),
                             overwrite=True)
    assert again == straight[:1]  # afresh: the first epoch of the same recipe
    [aside] = [p for p in tmp_path.iterdir() if p.name.startswith("b.replaced-")]
    assert len(ckpt.list_checkpoints(aside)) == 2


def test_cosine_schedule_matches_published():
    hp = CompressorTraining()
    scheduler_lrs = []
    opt = torch.optim.Adam([torch.nn.Parameter(torch.zeros(1))], lr=hp.lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=100, eta_min=1e-4)
    for _ in range(hp.epochs):
        scheduler_lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert [hp.lr_at(e) for e in range(hp.epochs)] == pytest.approx(scheduler_lrs, rel=1e-9)


def test_train_compressor_cli(prepared, tmp_path):
    stats_file = tmp_path / "stats.safetensors"
    assert cli.main(["stats", "--preset", "tiny", "--data", str(prepared), "--out", str(stats_file), "--workers", "0"]) == 0
    out = tmp_path / "comp"
    args = ["train-compressor", "--preset", "tiny", "--data", str(prepared), "--stats", str(stats_file), "--out", str(out),
            "--epochs", "2", "--global-batch-size", "4", "--val-fraction", "0.2", "--workers", "0", "--cosine-epochs", "0"]
    assert cli.main(args) == 0
    log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert [h["epoch"] for h in log] == [1, 2]
    assert load_compressor(out / "compressor.safetensors").channels == run_config("tiny", None, {}).encoders.compressor_channels
    assert cli.main(args) == 0, "re-running a finished run resumes and does nothing"
    assert len((out / "log.jsonl").read_text().splitlines()) == 2


@pytest.mark.slow
def test_train_compressor_two_ranks_torchrun(prepared, tmp_path):
    """DDP over two gloo ranks: runs, validates every epoch, writes a loadable compressor."""
    stats_file = tmp_path / "stats.safetensors"
    assert cli.main(["stats", "--preset", "tiny", "--data", str(prepared), "--out", str(stats_file), "--workers", "0"]) == 0
    out = tmp_path / "ddp"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "reglue.cli",
           "train-compressor", "--preset", "tiny", "--data", str(prepared), "--stats", str(stats_file), "--out", str(out),
           "--epochs", "2", "--global-batch-size", "4", "--val-fraction", "0.2", "--workers", "0", "--batch-size", "2"]
    result = subprocess.run(cmd, env=dict(os.environ, OMP_NUM_THREADS="1"), capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert [h["epoch"] for h in log] == [1, 2] and all(h["val_loss"] > 0 for h in log)
    load_compressor(out / "compressor.safetensors")


# ------------------------------------------------------------------------------ stats --pca (ReDi)


def test_pca_from_streamed_moments_matches_fit(prepared):
    """compute_dataset_pca (streamed float64 sums, tiny chunks) == PCA.fit on the standardised subset."""
    from reglue.data.stats import compute_dataset_pca, sample_indices
    from reglue.models.encoders import PCA

    dataset = open_data_dir(prepared)
    encoder = tiny_dinov2(image_size=IMAGE_SIZE)
    stats = compute_dataset_stats(dataset, encoder, batch_size=4)
    got = compute_dataset_pca(dataset, encoder, stats, 5, max_images=7, seed=3, batch_size=3, max_chunk_elements=1000)
    images = torch.stack([dataset[i][0] for i in sample_indices(len(dataset), 7, 3)])
    expected = PCA.fit(stats.normalize(encoder(images).features.float()), n_components=5)
    assert_same_pca(got, expected)
    with pytest.raises(ValueError, match="channels"):
        compute_dataset_pca(dataset, encoder, FeatureStats(torch.zeros(3), torch.ones(3)), 2)


def assert_same_pca(got, expected):
    torch.testing.assert_close(got.mean, expected.mean, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got.explained_variance, expected.explained_variance, atol=1e-4, rtol=1e-4)
    signs = (got.components * expected.components).sum(dim=1).sign().unsqueeze(1)  # equal up to sign
    torch.testing.assert_close(got.components * signs, expected.components, atol=1e-4, rtol=1e-4)
    assert got.whiten == expected.whiten


def test_stats_cli_pca_for_a_redi_config(prepared, tmp_path):
    """`reglue stats --pca` on the tiny preset made a ReDi run (layer 3): stats over all images, then
    the PCA over a seeded, class-agnostic subset; --stats-in re-fits it from the saved statistics."""
    from reglue.data.stats import sample_indices
    from reglue.models.encoders import PCA

    stats_file, pca_file = tmp_path / "stats.safetensors", tmp_path / "pca" / "pca.safetensors"
    common = ["stats", "--preset", "tiny", "--set", "method.name=redi", "--set", "encoders.feature_layers=(3,)",
              "--data", str(prepared), "--workers", "0", "--batch-size", "4", "--seed", "1"]
    assert cli.main(common + ["--out", str(stats_file), "--pca", "--pca-out", str(pca_file), "--pca-images", "6"]) == 0

    config = run_config("tiny", None, {"method.name": "redi", "encoders.feature_layers": "(3,)"})
    encoder = build_feature_encoder(config, IMAGE_SIZE, torch.device("cpu"))
    dataset = open_data_dir(prepared)
    stats = FeatureStats.load(stats_file)
    torch.testing.assert_close(stats.mean, direct_stats(encoder, dataset).mean, atol=1e-5, rtol=1e-5)
    indices = sample_indices(len(dataset), 6, 1)
    assert len({dataset[i][1] for i in indices}) > 1, "the subset spans the (sorted) classes"
    images = torch.stack([dataset[i][0] for i in indices])
    expected = PCA.fit(stats.normalize(encoder(images).features.float()), n_components=config.method.semantic_channels)
    pca = PCA.load(pca_file)  # what encoders.pca reads
    assert (pca.in_channels, pca.latent_channels) == (encoder.feature_channels, 8)
    assert_same_pca(pca, expected)

    again = tmp_path / "again.safetensors"
    assert cli.main(common + ["--stats-in", str(stats_file), "--pca", "8", "--pca-out", str(again), "--pca-images", "6",
                              "--pca-whiten"]) == 0
    expected.whiten = True
    assert_same_pca(PCA.load(again), expected)

    for bad in (["--out", str(stats_file), "--pca-out", str(again)], ["--stats-in", str(stats_file)],
                ["--out", str(stats_file), "--pca"], ["--out", str(stats_file), "--stats-in", str(stats_file), "--pca"],
                ["--pca", "--pca-out", str(again)], ["--out", str(stats_file), "--set", "method.name"]):
        assert cli.main(common + bad) == 2, bad
