"""`reglue prepare`: counts, labels, report, pixels, moments, flips, resume, ranks, bad inputs."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

from reglue.data.prepare import PrepareOptions, center_crop_arr, jpeg_roundtrip, prepare, read_file_list
from reglue.data.shards import DatasetError, ShardDataset, decode_image, open_data_dir
from reglue.models.encoders import build_vae

from .conftest import CLASSES, CORRUPT, FILES, IMAGE_SIZE, VAE

OPTIONS = PrepareOptions(image_size=IMAGE_SIZE, vae=VAE, shard_size=3)


def _sources(root):
    """[source path per sample] from the shards' sources.txt, in global order."""
    meta = json.loads((root / "dataset.json").read_text())
    lines = []
    for shard in meta["shards"]:
        lines += (root / "shards" / shard["name"] / "sources.txt").read_text().splitlines()
    return lines


def _shard_bytes(root):
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted((root / "shards").rglob("*")) if p.is_file()}


def test_counts_labels_and_report(prepared):
    meta = json.loads((prepared / "dataset.json").read_text())
    assert meta["num_sources"] == len(FILES) + len(CORRUPT)
    assert meta["num_samples"] == len(FILES) and meta["num_skipped"] == len(CORRUPT)
    assert meta["classes"] == CLASSES and meta["num_classes"] == 3
    assert meta["image_size"] == IMAGE_SIZE and meta["latent_size"] == IMAGE_SIZE // 8 and meta["vae"] == VAE
    assert len(meta["latent_stats"]["mean"]) == 4 and all(s > 0 for s in meta["latent_stats"]["std"])
    report = json.loads((prepared / "report.json").read_text())
    assert sorted(item["path"] for item in report["skipped"]) == sorted(f"{c}/{n}" for c, n in CORRUPT)
    assert all(item["error"] for item in report["skipped"])
    assert report["num_read"] == len(FILES)

    dataset = open_data_dir(prepared)
    assert isinstance(dataset, ShardDataset) and len(dataset) == len(FILES)
    sources = _sources(prepared)
    assert sorted(sources) == sorted(f"{c}/{n}" for c, n, *_ in FILES)
    for i, source in enumerate(sources):
        assert dataset.label(i) == CLASSES[source.split("/")[0]]
        image, label, moments = dataset[i]
        assert image.dtype == torch.uint8 and image.shape == (3, IMAGE_SIZE, IMAGE_SIZE)
        assert moments.dtype == torch.float32 and moments.shape == (8, IMAGE_SIZE // 8, IMAGE_SIZE // 8)


def test_stored_pixels_are_the_adm_crop(prepared, image_folder):
    """Each stored JPEG decodes to the ADM centre crop of its source, up to JPEG q95 error; the
    grayscale source becomes 3 equal channels."""
    dataset = open_data_dir(prepared)
    for i, source in enumerate(_sources(prepared)):
        with Image.open(image_folder / source) as img:
            crop = center_crop_arr(img.convert("RGB"), IMAGE_SIZE).astype(np.float64)
        stored = dataset[i][0].permute(1, 2, 0).numpy().astype(np.float64)
        psnr = 10 * np.log10(255**2 / max(np.mean((stored - crop) ** 2), 1e-12))
        assert psnr > 35, f"{source}: PSNR {psnr:.1f} dB against its centre crop"
        if "gray" in source:
            assert np.abs(stored[..., 0] - stored[..., 1]).max() <= 2 and np.abs(stored[..., 1] - stored[..., 2]).max() <= 2


def test_moments_are_the_vae_of_the_stored_pixels(prepared):
    dataset = open_data_dir(prepared)
    vae = build_vae(VAE, seed=OPTIONS.vae_seed)
    images = torch.stack([dataset[i][0] for i in range(len(dataset))])
    stored = torch.stack([dataset[i][2] for i in range(len(dataset))])
    torch.testing.assert_close(vae.encode_moments(images), stored, atol=1e-5, rtol=1e-5)


def test_center_crop_matches_adm_shapes():
    for size in [(300, 64), (64, 300), (40, 30), (64, 64), (1000, 700)]:
        img = Image.new("RGB", size, (10, 20, 30))
        assert center_crop_arr(img, 64).shape == (64, 64, 3)


def test_jpeg_roundtrip_is_decoder_independent():
    """4:4:4 baseline JPEG: PIL (used to compute the moments) and the loaders' decoder agree exactly."""
    pixels = np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    data, decoded = jpeg_roundtrip(pixels)
    assert data[:2] == b"\xff\xd8"
    assert np.array_equal(decode_image(np.frombuffer(data, np.uint8)).permute(1, 2, 0).numpy(), decoded)


def test_flip_copies(image_folder, tmp_path):
    out = tmp_path / "flip"
    subset = tmp_path / "src"
    shutil.copytree(image_folder / "cat", subset / "cat")
    from reglue import cli

    args = ["prepare", "--source", str(subset), "--out", str(out), "--resolution", str(IMAGE_SIZE), "--vae", VAE, "--flip",
            "--shard-size", "3", "--workers", "0", "--no-progress"]
    assert cli.main(args) == 0
    meta = json.loads((out / "dataset.json").read_text())
    n_cat = sum(c == "cat" for c, *_ in FILES)
    assert meta["num_samples"] == 2 * n_cat and meta["flip"]
    dataset = open_data_dir(out)
    sources = _sources(out)
    vae = build_vae(VAE)
    for k in range(n_cat):
        assert sources[2 * k + 1] == sources[2 * k] + "\tflip"
        original, flipped = dataset[2 * k][0].int(), dataset[2 * k + 1][0].int()
        assert (flipped.flip(-1) - original).abs().float().mean() < 2.0
        torch.testing.assert_close(vae.encode_moments(dataset[2 * k + 1][0][None])[0], dataset[2 * k + 1][2], atol=1e-5, rtol=1e-5)


def test_resume_skips_finished_shards(prepared, image_folder, tmp_path):
    out = tmp_path / "resume"
    shutil.copytree(prepared, out)
    reference = _shard_bytes(out)
    kept = out / "shards" / "00000" / "shard.json"
    kept_mtime = kept.stat().st_mtime_ns
    shutil.rmtree(out / "shards" / "00002")
    (out / "dataset.json").unlink()
    (out / "shards" / ".tmp-00003-1").mkdir()  # debris of a killed run
    meta = prepare(image_folder, out, OPTIONS, num_workers=0, progress=False)
    assert kept.stat().st_mtime_ns == kept_mtime, "a finished shard was rewritten"
    assert meta == json.loads((prepared / "dataset.json").read_text())
    after = _shard_bytes(out)
    for name, data in reference.items():
        if not name.endswith("shard.json"):
            assert after[name] == data, f"{name} differs after resume"


def test_two_ranks_write_the_same_dataset(prepared, image_folder, tmp_path):
    out = tmp_path / "ranks"
    assert prepare(image_folder, out, OPTIONS, num_workers=2, rank=1, world_size=2, progress=False) is None
    assert not (out / "dataset.json").exists()
    meta = prepare(image_folder, out, OPTIONS, num_workers=0, rank=0, world_size=2, progress=False, wait_seconds=5)
    assert meta == json.loads((prepared / "dataset.json").read_text())
    single, split = _shard_bytes(prepared), _shard_bytes(out)
    assert single.keys() == split.keys()
    for name in single:
        if not name.endswith(("shard.json", "moments.npy")):
            assert single[name] == split[name], name
    a, b = open_data_dir(prepared), open_data_dir(out)
    for i in range(len(a)):
        np.testing.assert_allclose(a.moments(i), b.moments(i), atol=1e-6, rtol=1e-6)


def test_rank_zero_times_out_on_missing_shards(image_folder, tmp_path):
    with pytest.raises(TimeoutError, match="re-run"):
        prepare(image_folder, tmp_path / "t", OPTIONS, num_workers=0, rank=0, world_size=2, progress=False, wait_seconds=0)


def test_changed_settings_refuse_to_mix(prepared, image_folder, tmp_path):
    out = tmp_path / "mixed"
    shutil.copytree(prepared, out)
    before = _shard_bytes(out)
    with pytest.raises(ValueError, match=rf"--out {out} was started with other settings \(options.image_size: "
                                         rf"{IMAGE_SIZE} there, {2 * IMAGE_SIZE} now\): .*--overwrite"):
        prepare(image_folder, out, PrepareOptions(image_size=2 * IMAGE_SIZE, vae=VAE, shard_size=3), num_workers=0, progress=False)
    assert _shard_bytes(out) == before


def test_overwrite_moves_a_prepared_dataset_or_other_files_aside(prepared, image_folder, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    with pytest.raises(ValueError, match=rf"--out {out}: holds other files, not a dataset of reglue prepare; .*--overwrite"):
        prepare(image_folder, out, OPTIONS, num_workers=0, progress=False)
    shutil.rmtree(out)
    shutil.copytree(prepared, out)
    bigger = PrepareOptions(image_size=2 * IMAGE_SIZE, vae=None, shard_size=3)
    meta = prepare(image_folder, out, bigger, num_workers=0, progress=False, overwrite=True)
    assert meta["image_size"] == 2 * IMAGE_SIZE
    [aside] = [p for p in tmp_path.iterdir() if p.name.startswith("out.replaced-")]
    assert _shard_bytes(aside) == _shard_bytes(prepared)  # nothing deleted


def test_a_failed_start_leaves_no_output_folder(tmp_path, capsys):
    """Field case: an empty --out after `prepare` on an empty folder."""
    from reglue.cli import main

    (tmp_path / "empty").mkdir()
    _class_folder(tmp_path / "no-images", images=0)
    for source, why in (("empty", "no class sub-folders"), ("no-images", "no images to prepare")):
        out = tmp_path / "new" / "out"
        assert main(["prepare", "--source", str(tmp_path / source), "--out", str(out), "--vae", "none",
                     "--workers", "0", "--no-progress"]) == 2
        assert why in capsys.readouterr().err
        assert not (tmp_path / "new").exists()


def test_file_list_with_names_and_images_only(image_folder, tmp_path):
    listing = tmp_path / "list.txt"
    listing.write_text("# path label\n" + "".join(f"{c}/{n}\tanimal_{c}\n" for c, n, *_ in FILES[:4]) + "\n")
    sources, classes = read_file_list(listing)
    assert classes == {"animal_cat": 0} and len(sources) == 4
    meta = prepare(image_folder, tmp_path / "fl", PrepareOptions(image_size=IMAGE_SIZE, vae=None), file_list=listing,
                   num_workers=0, progress=False)
    assert meta["num_samples"] == 4 and meta["vae"] is None
    dataset = open_data_dir(tmp_path / "fl")
    assert not dataset.has_moments and len(dataset[0]) == 2


def test_file_list_integer_labels(tmp_path):
    listing = tmp_path / "list.txt"
    listing.write_text("a b.jpg 3\nc.png 0\n")
    sources, classes = read_file_list(listing)
    assert sources == [("a b.jpg", 3), ("c.png", 0)] and len(classes) == 4


def test_missing_and_corrupt_dataset_errors_name_the_file(prepared, tmp_path):
    with pytest.raises(DatasetError, match="no such dataset directory"):
        open_data_dir(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DatasetError, match="neither a prepared dataset"):
        open_data_dir(tmp_path / "empty")

    def broken(name, damage):
        root = tmp_path / name
        shutil.copytree(prepared, root)
        damage(root)
        return root

    root = broken("no_json", lambda r: (r / "dataset.json").unlink())
    with pytest.raises(DatasetError, match="did not finish"):
        open_data_dir(root)
    root = broken("no_labels", lambda r: (r / "shards" / "00001" / "labels.npy").unlink())
    with pytest.raises(DatasetError, match=r"00001/labels\.npy: missing"):
        open_data_dir(root)
    root = broken("short_bin", lambda r: (r / "shards" / "00002" / "images.bin").write_bytes(b"\xff\xd8"))
    with pytest.raises(DatasetError, match=r"00002/images\.bin: 2 bytes"):
        open_data_dir(root)
    root = broken("unfinished", lambda r: (r / "shards" / "00003" / "shard.json").unlink())
    with pytest.raises(DatasetError, match=r"00003/shard\.json: missing"):
        open_data_dir(root)

    def miscount(r):
        meta = json.loads((r / "dataset.json").read_text())
        meta["shards"][0]["num_samples"] += 1
        meta["num_samples"] += 1
        (r / "dataset.json").write_text(json.dumps(meta))

    with pytest.raises(DatasetError, match=r"00000/offsets\.npy"):
        open_data_dir(broken("miscount", miscount))
    root = broken("bad_json", lambda r: (r / "dataset.json").write_text("{"))
    with pytest.raises(DatasetError, match=r"dataset\.json: not valid JSON"):
        open_data_dir(root)


def _class_folder(root, images: int, broken: int = 0):
    """ROOT/a/ with ``images`` readable 20x20 PNGs and ``broken`` unreadable files."""
    folder = root / "a"
    folder.mkdir(parents=True)
    for k in range(images):
        Image.new("RGB", (20, 20), (k * 7 % 256, 40, 90)).save(folder / f"{k:03d}.png")
    for k in range(broken):
        (folder / f"zz{k}.jpg").write_bytes(b"not a jpeg")
    return root


def test_batch_boundary_and_empty_shards(tmp_path):
    """A shard whose images fill whole VAE batches, one whose every file is broken, and a
    dataset with nothing readable: no crash, exact counts."""
    options = PrepareOptions(image_size=16, vae=VAE, shard_size=4)
    full_batches = _class_folder(tmp_path / "full", images=4)
    meta = prepare(full_batches, tmp_path / "out_full", options, num_workers=0, batch_size=2, progress=False)
    assert meta["num_samples"] == 4 and [s["num_samples"] for s in meta["shards"]] == [4]

    mixed = _class_folder(tmp_path / "mixed", images=2, broken=4)  # sorted: 2 images + 2 broken | 2 broken
    meta = prepare(mixed, tmp_path / "out_mixed", options, num_workers=0, batch_size=2, progress=False)
    assert [s["num_samples"] for s in meta["shards"]] == [2, 0] and meta["num_skipped"] == 4
    dataset = open_data_dir(tmp_path / "out_mixed")
    assert len(dataset) == 2 and dataset[1][0].shape == (3, 16, 16)

    nothing = _class_folder(tmp_path / "nothing", images=0, broken=3)
    meta = prepare(nothing, tmp_path / "out_nothing", options, num_workers=0, batch_size=2, progress=False)
    assert meta["num_samples"] == 0 and meta["num_skipped"] == 3 and meta["latent_stats"] is None
    with pytest.raises(DatasetError, match=r"out_nothing: the prepared dataset holds no samples: all 3 source files "
                                           r"were unreadable \(listed in .*report\.json\)"):
        open_data_dir(tmp_path / "out_nothing")  # training, stats, make-ref: one line, not 'batch exceeds size 0'


def test_prepare_command_fails_when_nothing_could_be_read(tmp_path, capsys):
    from reglue.cli import main

    nothing = _class_folder(tmp_path / "nothing", images=0, broken=2)
    out = tmp_path / "out"
    assert main(["prepare", "--source", str(nothing), "--out", str(out), "--resolution", "16", "--vae", VAE,
                 "--workers", "0", "--no-progress"]) == 2
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        f"reglue prepare: error: none of the 2 source files could be read (listed in {out / 'report.json'}): "
        f"{out} holds no samples")


def test_dataset_json_of_the_wrong_type_is_one_clear_error(prepared, tmp_path):
    root = tmp_path / "typed"
    shutil.copytree(prepared, root)
    (root / "dataset.json").write_text("[]")
    with pytest.raises(DatasetError, match=r"dataset\.json: expected a JSON object, got a list"):
        open_data_dir(root)
    meta = json.loads((prepared / "dataset.json").read_text())
    for field, value, message in (("image_size", "big", "image_size"), ("shards", {"a": 1}, "shards"),
                                  ("shards", [{"name": "00000"}], "num_samples")):
        (root / "dataset.json").write_text(json.dumps(dict(meta, **{field: value})))
        with pytest.raises(DatasetError, match=message):
            open_data_dir(root)


def test_published_labels_of_the_wrong_type_are_one_clear_error(tmp_path):
    from reglue.data.shards import PublishedDataset

    root = tmp_path / "published"
    (root / "images" / "00000").mkdir(parents=True)
    (root / "vae-sd" / "00000").mkdir(parents=True)
    Image.new("RGB", (16, 16)).save(root / "images" / "00000" / "img00000000.png")
    np.save(root / "vae-sd" / "00000" / "img-mean-std-00000000.npy", np.zeros((8, 2, 2), np.float32))
    for labels in ("[]", '{"labels": {"a": 1}}', '{"labels": [["00000/img-mean-std-00000000.npy"]]}',
                   '{"labels": [["00000/img-mean-std-00000000.npy", "cat"]]}'):
        (root / "vae-sd" / "dataset.json").write_text(labels)
        with pytest.raises(DatasetError, match=r"vae-sd/dataset\.json"):
            PublishedDataset(root)


def test_prepare_checks_its_output_before_listing_the_source(tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(ValueError, match="--out .*file"):
        prepare(tmp_path / "does-not-matter", tmp_path / "file" / "out", OPTIONS, num_workers=0, progress=False)


def test_image_size_follows_the_prepared_dataset_unless_set(prepared, caplog):
    """`train.py --data DIR` takes DIR's resolution when data.image_size was not set; an explicit
    mismatch is an error naming the flag; fewer classes than model.num_classes is one log line."""
    import logging

    from reglue.data import open_dataset
    from reglue.train.cli import config_from_args

    followed, _ = config_from_args(["--preset", "sit-b-2", "--data", str(prepared)])
    assert followed.data.image_size == IMAGE_SIZE != 256
    explicit, _ = config_from_args(["--preset", "sit-b-2", "--data", str(prepared), "--set", "data.image_size=256"])
    assert explicit.data.image_size == 256
    with pytest.raises(ValueError, match=f"holds {IMAGE_SIZE}x{IMAGE_SIZE} images: set --set data.image_size={IMAGE_SIZE}"):
        open_dataset(explicit)
    tiny, _ = config_from_args(["--data", str(prepared)])
    with caplog.at_level(logging.INFO, logger="reglue.data"):
        open_dataset(tiny)
    lines = [r.getMessage() for r in caplog.records if "class embeddings stay unused" in r.getMessage()]
    assert len(lines) == 1 and "has 3 classes, model.num_classes is 8" in lines[0]


def test_data_commands_check_their_outputs_first(prepared, tmp_path, capsys):
    """stats and train-compressor fail in one line, before any feature is computed, when an output
    cannot be written (here a file stands where a folder must be)."""
    from reglue import cli

    (tmp_path / "file").write_text("x")
    blocked = str(tmp_path / "file" / "out")
    for args in (["stats", "--preset", "tiny", "--data", str(prepared), "--out", blocked + ".safetensors"],
                 ["stats", "--preset", "tiny", "--data", str(prepared), "--out", str(tmp_path / "s.safetensors"),
                  "--pca", "4", "--pca-out", blocked + ".safetensors"],
                 ["train-compressor", "--preset", "tiny", "--data", str(prepared), "--stats", "unused", "--out", blocked]):
        assert cli.main(args) == 2
        err = capsys.readouterr().err
        assert "a file is in the way" in err and "Traceback" not in err, err
    assert not (tmp_path / "s.safetensors").exists()


def test_damaged_shard_files_are_refused_where_they_are_read(prepared, tmp_path):
    """Same-size garbles: index files at open (checked against shard.json), a sample's JPEG or
    moments when that sample is read (against checksums.npy); the other samples still read."""
    from tests._damage import garble

    def damaged(name, file, at=None):
        root = tmp_path / name
        shutil.copytree(prepared, root)
        garble(root / "shards" / "00000" / file, size=40, at=at)
        return root

    intact = ShardDataset(prepared)
    first_shard = int(intact.starts[1])
    for file in ("labels.npy", "offsets.npy", "checksums.npy", "sources.txt"):
        with pytest.raises(DatasetError, match=rf"00000/{file}: the file is damaged: CRC-32") as caught:
            ShardDataset(damaged(f"index-{file}", file))
        assert len(str(caught.value).splitlines()) == 1
    offsets = np.load(prepared / "shards" / "00000" / "offsets.npy")
    dataset = ShardDataset(damaged("jpeg", "images.bin", at=int(offsets[1]) + 100))  # inside sample 1's JPEG
    with pytest.raises(DatasetError, match=r"00000/images\.bin sample 1 \(global 1\): the JPEG is damaged: CRC-32"):
        dataset[1]
    assert torch.equal(dataset[0][0], intact[0][0]) and first_shard > 2 and torch.equal(dataset[2][0], intact[2][0])
    row_bytes = intact.moments(0).nbytes
    header = (prepared / "shards" / "00000" / "moments.npy").stat().st_size - first_shard * row_bytes
    dataset = ShardDataset(damaged("moments", "moments.npy", at=header + 2 * row_bytes + 8))  # sample 2's row
    with pytest.raises(DatasetError, match=r"00000/moments\.npy sample 2 \(global 2\): the moments row is damaged"):
        dataset[2]
    np.testing.assert_array_equal(dataset.moments(1), intact.moments(1))
