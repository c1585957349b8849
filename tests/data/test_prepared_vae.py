"""Prepared moments and the run's VAE must be the same VAE: ``reglue prepare`` records the
fingerprint of the weights that computed the moments, and training refuses another VAE at start
(one line naming both and the fix). Identity is the weights, not the name."""

from __future__ import annotations

import json
import logging
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

from reglue.data import check_dataset_vae
from reglue.data.prepare import PrepareOptions, prepare
from reglue.data.shards import DatasetError, open_data_dir
from reglue.models.autoencoder import PatchAutoencoder
from reglue.models.encoders import build_vae
from reglue.models.state import weights_fingerprint

from .conftest import IMAGE_SIZE


def fingerprint(vae) -> str:
    return weights_fingerprint(vae.state_dict())


@pytest.fixture(scope="module")
def tiny_vae_folder(tmp_path_factory):
    """The tiny-random VAE (seed 0) saved as a local diffusers folder: the same weights by another name."""
    folder = tmp_path_factory.mktemp("tiny-vae")
    build_vae("tiny-random", seed=0).autoencoder.save_pretrained(folder)
    return folder


def test_prepare_records_the_vae_that_computed_the_moments(prepared):
    meta = json.loads((prepared / "dataset.json").read_text())
    want = fingerprint(build_vae("tiny-random", seed=0))
    assert (meta["vae"], meta["vae_sha256"]) == ("tiny-random", want)
    assert {json.loads(p.read_text())["vae_sha256"] for p in prepared.glob("shards/*/shard.json")} == {want}
    dataset = open_data_dir(prepared)
    assert (dataset.vae, dataset.vae_sha256) == ("tiny-random", want)


def test_the_same_weights_pass_under_any_name_and_other_weights_are_refused(prepared, tiny_vae_folder):
    dataset = open_data_dir(prepared)
    check_dataset_vae(dataset, "tiny-random", fingerprint(build_vae("tiny-random", seed=0)))
    check_dataset_vae(dataset, str(tiny_vae_folder), fingerprint(build_vae(str(tiny_vae_folder))))
    with pytest.raises(DatasetError, match=r"computed with 'tiny-random' .* encoders.vae is 'tiny-random' .*--vae-seed"):
        check_dataset_vae(dataset, "tiny-random", fingerprint(build_vae("tiny-random", seed=1)))  # train.seed 1
    patch = PatchAutoencoder.fit(torch.randint(0, 256, (8, 3, 64, 64), dtype=torch.uint8))
    with pytest.raises(DatasetError, match=r"encoders.vae is 'patch-pca' .*--set encoders.vae=tiny-random"):
        check_dataset_vae(dataset, "patch-pca", fingerprint(patch))


def test_a_dataset_without_a_fingerprint_is_known_by_name(prepared, tmp_path):
    """Prepared before fingerprints were recorded: the name decides."""
    old = tmp_path / "old"
    shutil.copytree(prepared, old)
    meta = json.loads((old / "dataset.json").read_text())
    del meta["vae_sha256"]
    (old / "dataset.json").write_text(json.dumps(meta))
    dataset = open_data_dir(old)
    check_dataset_vae(dataset, "tiny-random", fingerprint(build_vae("tiny-random", seed=1)))
    with pytest.raises(DatasetError, match="no fingerprint recorded"):
        check_dataset_vae(dataset, "stabilityai/sd-vae-ft-mse", "0" * 64)


def test_the_published_layout_is_assumed_to_be_the_runs_vae_and_the_log_says_so(tmp_path, caplog):
    root = tmp_path / "published"
    (root / "images" / "00000").mkdir(parents=True)
    (root / "vae-sd" / "00000").mkdir(parents=True)
    Image.fromarray(np.zeros((IMAGE_SIZE, IMAGE_SIZE, 3), np.uint8)).save(root / "images" / "00000" / "img00000000.png")
    np.save(root / "vae-sd" / "00000" / "img-mean-std-00000000.npy", np.zeros((8, IMAGE_SIZE // 8, IMAGE_SIZE // 8), np.float32))
    (root / "vae-sd" / "dataset.json").write_text(json.dumps({"labels": [["00000/img-mean-std-00000000.npy", 0]]}))
    with caplog.at_level(logging.INFO, logger="reglue.data"):
        check_dataset_vae(open_data_dir(root), "stabilityai/sd-vae-ft-ema", "0" * 64)
    assert [r.getMessage() for r in caplog.records if "records no VAE" in r.getMessage()] == [
        f"data: {root} records no VAE (the published layout): its moments are taken to be encoders.vae's "
        "(stabilityai/sd-vae-ft-ema)"]


def test_shards_encoded_by_different_weights_are_not_finalized(image_folder, tmp_path):
    """A local VAE folder whose files changed between two runs of the same command: the recipe is
    the same (same name), the shards are not; prepare refuses to write dataset.json."""
    folder, out = tmp_path / "vae", tmp_path / "out"
    options = PrepareOptions(image_size=IMAGE_SIZE, vae=str(folder), shard_size=3)
    build_vae("tiny-random", seed=0).autoencoder.save_pretrained(folder)
    assert prepare(image_folder, out, options, num_workers=0, rank=1, world_size=2, progress=False) is None
    build_vae("tiny-random", seed=1).autoencoder.save_pretrained(folder)
    with pytest.raises(DatasetError, match=r"shards were encoded by 2 different VAEs \(shards 00000, 00002 by sha256 "
                                           r"\w{12}; shards 00001, 00003 by sha256 \w{12}\)"):
        prepare(image_folder, out, options, num_workers=0, rank=0, world_size=2, progress=False, wait_seconds=5)
    assert not (out / "dataset.json").exists()


@pytest.mark.parametrize("vae_flags", [[], ["--set", "encoders.vae=tiny-random", "--set", "train.seed=1"]])
def test_training_refuses_moments_of_another_vae_at_start(prepared, tmp_path, capsys, vae_flags):
    """The demo's own patch autoencoder, or a tiny-random VAE of another seed, on data prepared with
    the seed-0 tiny-random VAE: one error line naming both VAEs and the fix, before any step."""
    from reglue.train.cli import main

    args = ["--preset", "tiny", "--data", str(prepared), "--out", str(tmp_path), "--set", "data.num_workers=0",
            "--set", "train.global_batch_size=4", *vae_flags]
    assert main(args) == 2
    err = capsys.readouterr().err
    line = next(line for line in err.splitlines() if "error:" in line)
    assert "its VAE moments were computed with 'tiny-random'" in line and "encoders.vae is" in line
    assert not (tmp_path / "tiny" / "metrics.jsonl").exists()
