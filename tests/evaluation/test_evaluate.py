"""``reglue evaluate`` end to end on tiny .npz files with a random Inception, the reference batch
format, and the bad-input errors (one line per problem, before any work, nothing lost)."""

import contextlib
import io
import json

import numpy as np
import pytest
import torch

from reglue.cli import main as cli_main
from reglue.evaluation.evaluate import DINOv2Features, score_features
from reglue.evaluation.inception import InceptionFeatures
from reglue.evaluation.metrics import FeatureSet, GaussianStats, format_score, frechet_distance
from reglue.evaluation.reference import NpzImages, NpzWriter, Reference, load_reference

MISSING_WEIGHTS = "/nonexistent/inception.pth"  # input errors must be reported before the network is built


def run_cli(*argv):
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = cli_main(["evaluate", *map(str, argv)])
    return code, out.getvalue(), err.getvalue()


def tiny_dataset_config(path, size):
    from reglue.presets import get_preset

    config = json.loads(get_preset("tiny").to_json())
    config["data"]["synthetic_size"] = size
    path.write_text(json.dumps(config))
    return path


@pytest.fixture(scope="module")
def made_ref(tmp_path_factory):
    """``reglue evaluate --make-ref`` over a 5-image synthetic set, 4 of them kept in arr_0."""
    root = tmp_path_factory.mktemp("made-ref")
    config = tiny_dataset_config(root / "config.json", 5)
    code, out, err = run_cli("--make-ref", "--data", "synthetic", "--config", config, "--out", root / "ref.npz",
                             "--num", 4, "--inception-weights", "random", "--workers", 0, "--batch-size", 4)
    assert code == 0, err
    return root / "ref.npz", out, config


def dataset_images(config, indices):
    from reglue.data import open_dataset
    from reglue.data.stats import run_config

    dataset = open_dataset(run_config(None, str(config), {}))
    return np.stack([dataset[i][0].permute(1, 2, 0).numpy() for i in indices])


def test_make_ref_writes_an_adm_reference_batch(made_ref):
    from reglue.data.sampler import sample_indices

    path, out, config = made_ref
    assert "RANDOM" in out and "4 images of 64x64" in out and "over all 5 images" in out
    with np.load(path) as npz:
        assert set(npz.files) == {"arr_0", "mu", "sigma", "mu_s", "sigma_s", "stats_count"}
        assert npz["arr_0"].dtype == np.uint8 and npz["arr_0"].shape == (4, 64, 64, 3)
        expected = dataset_images(config, sample_indices(5, 4, seed=0))  # the seeded subset, in index order
        np.testing.assert_array_equal(npz["arr_0"], expected)
        assert npz["mu"].shape == (2048,) and npz["sigma"].shape == (2048, 2048) and npz["sigma"].dtype == np.float64
        assert npz["mu_s"].shape == (2023,) and npz["sigma_s"].shape == (2023, 2023)
        np.testing.assert_allclose(npz["sigma"], npz["sigma"].T, atol=1e-12)
        assert int(npz["stats_count"]) == 5
    reference = load_reference(path)
    assert reference.stats_count == 5 and len(reference.images) == 4


def test_evaluate_end_to_end_scores_the_reference_dataset_as_identical(made_ref, tmp_path):
    ref, _, config = made_ref
    np.savez(tmp_path / "samples.npz", dataset_images(config, range(5)))
    code, out, err = run_cli("--ref", ref, "--samples", tmp_path / "samples.npz", "--out", tmp_path / "res" / "results.json",
                             "--inception-weights", "random", "--is-split-size", 3, "--batch-size", 4)
    assert code == 0, err
    results = json.loads((tmp_path / "res" / "results.json").read_text())
    assert "RANDOM" in out and "random" in results["WARNING"]
    lines = out.splitlines()
    for key, name in (("fid", "FID"), ("sfid", "sFID"), ("inception_score", "Inception Score"), ("precision", "Precision"),
                      ("recall", "Recall")):  # printed rounded to what they mean, the full value in the JSON
        assert f"{name}: {format_score(key, results[key])}" in lines, (name, lines)
    # the same 5 images through make-ref's statistics and evaluate's features: distance 0
    assert abs(results["fid"]) < 1e-6 and abs(results["sfid"]) < 1e-6
    assert results["recall"] == 1.0 and results["precision"] >= 0.8  # the reference images are among the samples
    assert results["inception_score"] >= 1.0
    assert results["num_samples"] == 5 and results["num_reference_images"] == 4 and results["reference_stats_images"] == 5
    assert any("singular" in w for w in results["warnings"])  # 5 samples for 2048 dimensions


def test_fd_dinov2_uses_stored_statistics_or_the_reference_images():
    dinov2 = DINOv2Features("random", "cpu", embed_dim=32, depth=2, num_heads=2)
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (6, 64, 64, 3), dtype=torch.uint8, generator=g)
    cls = dinov2(images)
    assert cls.shape == (6, 32) and dinov2._encoders[64].input_size == (224, 224)  # 224 input at any image size
    torch.testing.assert_close(dinov2(images.permute(0, 3, 1, 2)), cls)

    def feature_set(dinov2_rows, seed):
        fake = torch.randn(len(dinov2_rows), 2048, generator=torch.Generator().manual_seed(seed))
        features = FeatureSet(dinov2=True)
        features.add(InceptionFeatures(pool=fake, spatial=fake[:, :2023], logits=fake[:, :1008]), dinov2_rows)
        return features

    samples, reference_images = feature_set(cls[:4], 1), feature_set(cls, 2)
    stats = GaussianStats.of(torch.randn(50, 2048, dtype=torch.float64, generator=g))
    reference = Reference(path="ref.npz", images=None, fid=stats, sfid=GaussianStats(stats.mu[:2023], stats.sigma[:2023, :2023]))
    with pytest.warns(RuntimeWarning, match="singular"):  # 4 samples of 32-d features
        from_images = score_features(reference, samples, reference_images, ("fd_dinov2",))["fd_dinov2"]
    assert from_images == pytest.approx(frechet_distance(GaussianStats.of(cls[:4]), GaussianStats.of(cls)), rel=1e-9)
    reference.dinov2 = GaussianStats.of(cls[2:])
    with pytest.warns(RuntimeWarning, match="singular"):
        stored = score_features(reference, samples, None, ("fd_dinov2",))["fd_dinov2"]
    assert stored == pytest.approx(frechet_distance(GaussianStats.of(cls[:4]), GaussianStats.of(cls[2:])), rel=1e-9)


# --------------------------------------------------------------------------------------------
# .npz reading and writing
# --------------------------------------------------------------------------------------------


def test_npz_images_read_stored_and_deflated_batches_alike(tmp_path):
    images = np.random.default_rng(0).integers(0, 256, (7, 5, 4, 3), dtype=np.uint8)
    np.savez(tmp_path / "stored.npz", images, labels=np.arange(7))
    np.savez_compressed(tmp_path / "deflated.npz", images)
    for name in ("stored.npz", "deflated.npz"):
        reader = NpzImages(tmp_path / name)
        assert len(reader) == 7 and reader.image_size == (5, 4)
        batches = list(reader.batches(3))
        assert [len(b) for b in batches] == [3, 3, 1]
        np.testing.assert_array_equal(np.concatenate(batches), images)
        assert all(b.flags.writeable for b in batches)


def test_npz_writer_streams_and_leaves_nothing_on_failure(tmp_path):
    images = np.random.default_rng(1).integers(0, 256, (5, 4, 4, 3), dtype=np.uint8)
    with NpzWriter(tmp_path / "ok.npz") as writer:
        with writer.streamed("arr_0", images.shape, np.uint8) as write:
            write(images[:2])
            write(images[2:])
        writer.add("count", np.array(5))
    with np.load(tmp_path / "ok.npz") as npz:
        np.testing.assert_array_equal(npz["arr_0"], images)
        assert npz["count"].shape == () and int(npz["count"]) == 5
    (tmp_path / "kept.npz").write_bytes(b"an earlier result")
    with pytest.raises(ValueError, match="3 rows written, 5 declared"):
        with NpzWriter(tmp_path / "kept.npz") as writer, writer.streamed("arr_0", images.shape, np.uint8) as write:
            write(images[:3])
    assert (tmp_path / "kept.npz").read_bytes() == b"an earlier result"
    assert not (tmp_path / "kept.npz.partial").exists()


# --------------------------------------------------------------------------------------------
# Bad input: one clear line per problem, before any work, nothing lost
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def fake_ref(tmp_path_factory):
    """A structurally valid reference batch (identity covariances, random images)."""
    path = tmp_path_factory.mktemp("fake-ref") / "ref.npz"
    np.savez(path, arr_0=np.zeros((5, 16, 16, 3), np.uint8), mu=np.zeros(2048), sigma=np.eye(2048, dtype=np.float32),
             mu_s=np.zeros(2023), sigma_s=np.eye(2023, dtype=np.float32))
    return path


def samples_file(tmp_path, array, name="samples.npz", **extra):
    np.savez(tmp_path / name, array, **extra)
    return tmp_path / name


def assert_one_error(code, err, *fragments, lines=1):
    assert code == 2
    error_lines = err.strip().splitlines()
    assert len(error_lines) == lines, err
    assert error_lines[0].startswith("reglue evaluate: error: ")
    for fragment in fragments:
        assert fragment in err, err


def test_sample_batches_with_wrong_dtype_layout_or_keys(fake_ref, tmp_path):
    cases = [
        (np.zeros((6, 16, 16, 3), np.float32), ("dtype float32", "expected uint8")),
        (np.zeros((6, 3, 16, 16), np.uint8), ("shape (6, 3, 16, 16)", "channels first")),
        (np.zeros((6, 16, 16), np.uint8), ("expected (N, H, W, 3)",)),
    ]
    for array, fragments in cases:
        code, _, err = run_cli("--ref", fake_ref, "--samples", samples_file(tmp_path, array), "--metrics", "fid",
                               "--inception-weights", MISSING_WEIGHTS)
        assert_one_error(code, err, "samples.npz", *fragments)
    np.savez(tmp_path / "named.npz", images=np.zeros((6, 16, 16, 3), np.uint8))
    code, _, err = run_cli("--ref", fake_ref, "--samples", tmp_path / "named.npz", "--inception-weights", MISSING_WEIGHTS)
    assert_one_error(code, err, "no 'arr_0' array", "images")


def test_truncated_sample_batch(fake_ref, tmp_path):
    path = samples_file(tmp_path, np.zeros((6, 16, 16, 3), np.uint8))
    path.write_bytes(path.read_bytes()[:3000])
    code, _, err = run_cli("--ref", fake_ref, "--samples", path, "--metrics", "fid", "--inception-weights", MISSING_WEIGHTS)
    assert_one_error(code, err, "not a readable .npz", "truncated")


def test_reference_without_statistics_or_with_bad_ones(tmp_path):
    samples = samples_file(tmp_path, np.zeros((6, 16, 16, 3), np.uint8))
    np.savez(tmp_path / "bare.npz", np.zeros((5, 16, 16, 3), np.uint8))
    code, _, err = run_cli("--ref", tmp_path / "bare.npz", "--samples", samples, "--inception-weights", MISSING_WEIGHTS)
    assert_one_error(code, err, "no precomputed statistics mu, sigma, mu_s, sigma_s", "--make-ref")
    np.savez(tmp_path / "bad.npz", np.zeros((5, 16, 16, 3), np.uint8), mu=np.zeros(1000), sigma=np.eye(2048),
             mu_s=np.zeros(2023), sigma_s=np.full((2023, 2023), np.nan))
    code, _, err = run_cli("--ref", tmp_path / "bad.npz", "--samples", samples, "--metrics", "fid",
                           "--inception-weights", MISSING_WEIGHTS)
    assert_one_error(code, err, "'mu' has shape (1000,), expected (2048,)", "'sigma_s' holds NaN", lines=2)
    assert err.strip().splitlines()[1].startswith(str(tmp_path / "bad.npz"))


def test_too_few_samples_for_the_inception_score_splits(fake_ref, tmp_path):
    samples = samples_file(tmp_path, np.zeros((6, 16, 16, 3), np.uint8))
    code, _, err = run_cli("--ref", fake_ref, "--samples", samples, "--inception-weights", MISSING_WEIGHTS)
    assert_one_error(code, err, "6 samples", "at least 5000")


def test_unwritable_output_is_refused_before_any_work(fake_ref, tmp_path):
    samples = samples_file(tmp_path, np.zeros((6, 16, 16, 3), np.uint8))
    (tmp_path / "a-file").write_text("x")
    code, _, err = run_cli("--ref", fake_ref, "--samples", samples, "--out", tmp_path / "a-file" / "results.json",
                           "--metrics", "fid", "--inception-weights", MISSING_WEIGHTS)
    assert_one_error(code, err, "a file is in the way")
    code, _, err = run_cli("--ref", fake_ref, "--samples", samples, "--out", tmp_path, "--metrics", "fid",
                           "--inception-weights", MISSING_WEIGHTS)
    assert_one_error(code, err, "is a directory")


def test_results_replace_nothing_without_overwrite(fake_ref, tmp_path):
    """Field case: ``--out samples.npz`` (a slip for --samples) replaced the samples with JSON: a
    results file must end in .json, and an existing one is replaced only with --overwrite."""
    samples = samples_file(tmp_path, np.zeros((6, 16, 16, 3), np.uint8))
    kept = samples.read_bytes()
    notes = tmp_path / "notes.json"
    notes.write_text("my notes, not JSON")
    for out, why in [(samples, "the file name must end in .json"),
                     (notes, f"--out {notes}: already exists; pass --overwrite to replace it, or choose another name")]:
        code, _, err = run_cli("--ref", fake_ref, "--samples", samples, "--out", out, "--metrics", "fid",
                               "--inception-weights", MISSING_WEIGHTS)
        assert_one_error(code, err, why)
    assert samples.read_bytes() == kept and notes.read_text() == "my notes, not JSON"
    code, _, err = run_cli("--ref", fake_ref, "--samples", samples, "--out", notes, "--metrics", "fid",
                           "--inception-weights", MISSING_WEIGHTS, "--overwrite")
    assert_one_error(code, err, MISSING_WEIGHTS)  # past the output check, to the next input
    assert notes.read_text() == "my notes, not JSON"  # a failed evaluation replaces nothing
    code, _, err = run_cli("--ref", fake_ref, "--samples", samples, "--out", tmp_path / "new" / "deeper" / "r.json",
                           "--metrics", "fid", "--inception-weights", MISSING_WEIGHTS)
    assert_one_error(code, err, MISSING_WEIGHTS)
    assert not (tmp_path / "new").exists()  # a failed start leaves no folder behind


def test_make_ref_never_overwrites_a_reference(tmp_path):
    existing = tmp_path / "ref.npz"
    existing.write_bytes(b"precious")
    code, _, err = run_cli("--make-ref", "--data", "synthetic", "--out", existing, "--inception-weights", MISSING_WEIGHTS)
    assert_one_error(code, err, "already exists; pass --overwrite")
    assert existing.read_bytes() == b"precious"
    code, _, err = run_cli("--make-ref", "--data", "synthetic", "--out", existing, "--inception-weights", MISSING_WEIGHTS,
                           "--overwrite")
    assert_one_error(code, err, MISSING_WEIGHTS)
    assert existing.read_bytes() == b"precious"  # replaced only by a complete reference
    code, _, err = run_cli("--make-ref", "--data", "synthetic", "--out", tmp_path / "ref.json",
                           "--inception-weights", MISSING_WEIGHTS)
    assert_one_error(code, err, "the file name must end in .npz")
    code, _, err = run_cli("--make-ref", "--out", tmp_path / "new.npz")
    assert_one_error(code, err, "--make-ref takes --data DIR")


def test_unknown_metric_and_missing_weights(fake_ref, tmp_path):
    samples = samples_file(tmp_path, np.zeros((6, 16, 16, 3), np.uint8))
    code, _, err = run_cli("--ref", fake_ref, "--samples", samples, "--metrics", "fid,kid")
    assert_one_error(code, err, "unknown kid")
    code, _, err = run_cli("--ref", fake_ref, "--samples", samples, "--metrics", "fid", "--inception-weights", MISSING_WEIGHTS)
    assert_one_error(code, err, MISSING_WEIGHTS, "no such file")


def test_reference_images_are_opened_when_present_and_required_when_needed(fake_ref, tmp_path):
    assert len(load_reference(fake_ref, need_images=False).images) == 5  # FD_DINOv2 may need them
    with np.load(fake_ref) as npz:
        np.savez(tmp_path / "stats-only.npz", **{k: npz[k] for k in ("mu", "sigma", "mu_s", "sigma_s")})
    assert load_reference(tmp_path / "stats-only.npz", need_images=False).images is None
    with pytest.raises(ValueError, match="no 'arr_0' array"):
        load_reference(tmp_path / "stats-only.npz", need_images=True)


# --------------------------------------------------------------------------------------------
# Damage: every .npz reader verifies the zip CRC-32, streaming
# --------------------------------------------------------------------------------------------


def written_samples(path, images):
    """A sample batch as ``reglue generate`` writes it (NpzWriter, streamed, arr_0 + arr_1)."""
    with NpzWriter(path) as writer:
        with writer.streamed("arr_0", images.shape, np.uint8) as write:
            for start in range(0, len(images), 4):
                write(images[start : start + 4])
        writer.add("arr_1", np.arange(len(images)))
    return path


def arr_0_middle(path):
    """Offset of the middle of arr_0's image bytes in the file (where a zeroed disk block hit)."""
    import zipfile

    from reglue.evaluation.reference import _member_data_offset

    with zipfile.ZipFile(path) as zf:
        info = zf.getinfo("arr_0.npy")
    return _member_data_offset(path, info) + info.file_size // 2


def test_damaged_sample_batch_is_refused_in_one_line_and_nothing_is_written(fake_ref, tmp_path):
    """Field case: 100 KB zeroed in the middle of a generate .npz was scored (exit 0, another FID)."""
    from tests._damage import garble

    images = np.random.default_rng(3).integers(0, 256, (2, 32, 32, 3), dtype=np.uint8)  # > one 4 KB zip read
    samples = written_samples(tmp_path / "samples.npz", images)
    garble(samples, size=100, at=arr_0_middle(samples))
    code, out, err = run_cli("--ref", fake_ref, "--samples", samples, "--metrics", "fid", "--inception-weights", "random",
                             "--batch-size", 2, "--out", tmp_path / "results.json")
    assert_one_error(code, err.strip().splitlines()[-1], str(samples), "'arr_0' is damaged: CRC-32")  # below the bar
    assert "FID" not in out and not (tmp_path / "results.json").exists()


@pytest.mark.parametrize("save", ["stored", "deflated"])
def test_npz_images_verify_the_crc_while_streaming_and_refuse_damage(tmp_path, save):
    from reglue.integrity import DamagedFileError
    from tests._damage import garble

    images = np.random.default_rng(4).integers(0, 256, (10, 8, 8, 3), dtype=np.uint8)
    path = tmp_path / "images.npz"
    (np.savez if save == "stored" else np.savez_compressed)(path, images)
    np.testing.assert_array_equal(np.concatenate(list(NpzImages(path).batches(3))), images)
    garble(path, size=50, at=arr_0_middle(path) if save == "stored" else None)
    with pytest.raises(DamagedFileError, match=r"images\.npz: 'arr_0' is damaged") as caught:
        for _ in NpzImages(path).batches(3):
            pass
    assert len(str(caught.value).splitlines()) == 1


def test_npz_images_checksum_without_holding_the_images(tmp_path):
    """The CRC is computed over the batches as read: memory stays at a few batches, not the array."""
    import tracemalloc

    images = np.random.default_rng(5).integers(0, 256, (64, 64, 64, 3), dtype=np.uint8)  # 786 KB
    path = written_samples(tmp_path / "samples.npz", images)
    tracemalloc.start()
    try:
        count = sum(len(batch) for batch in NpzImages(path).batches(4))  # 49 KB per batch
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert count == 64 and peak < images.nbytes // 4, peak


def test_damaged_reference_statistics_or_images_are_refused(fake_ref, tmp_path):
    from reglue.integrity import DamagedFileError
    from tests._damage import garble

    ref = tmp_path / "ref.npz"
    rng = np.random.default_rng(6)
    np.savez(ref, arr_0=rng.integers(0, 256, (8, 16, 16, 3), dtype=np.uint8), mu=np.zeros(2048),
             sigma=np.eye(2048), mu_s=np.zeros(2023), sigma_s=np.eye(2023))
    images_only = tmp_path / "images-damaged.npz"
    images_only.write_bytes(ref.read_bytes())
    garble(images_only, size=100, at=arr_0_middle(images_only))
    reference = load_reference(images_only)  # opening reads headers only; the images are verified as streamed
    with pytest.raises(DamagedFileError, match="'arr_0' is damaged"):
        list(reference.images.batches(5))
    garble(ref, size=1000)  # the middle of the file: inside sigma
    samples = samples_file(tmp_path, np.zeros((6, 16, 16, 3), np.uint8))
    code, _, err = run_cli("--ref", ref, "--samples", samples, "--metrics", "fid", "--inception-weights", MISSING_WEIGHTS)
    assert_one_error(code, err, str(ref), "statistics not readable: damaged", "CRC-32")
