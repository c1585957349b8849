"""Loaders over prepared shards and the published layout: decoded pixels, order, coverage, resume.

Every check runs for the torch loader and, when nvidia.dali imports, for the DALI loader on the
CPU (``device_id=None``); the GPU ``mixed`` decode path needs a CUDA machine (bench/bench_data.py).
"""

from __future__ import annotations

import json
from collections import Counter

import numpy as np
import pytest
import torch
from PIL import Image

from reglue.config import Config, DataConfig
from reglue.data import build_loader, check_rank_partition, open_dataset, resolve_backend
from reglue.data.dali import DALILoader, dali_available
from reglue.data.loader import TorchLoader
from reglue.data.prepare import center_crop_arr, jpeg_roundtrip
from reglue.data.sampler import GlobalBatchOrder
from reglue.data.shards import DatasetError, PublishedDataset, open_data_dir
from reglue.presets import get_preset

from .conftest import IMAGE_SIZE

DECODER_TOLERANCE = 2
"""Max |difference| in uint8 levels allowed between JPEG decoders (libjpeg-turbo ones agree exactly
on 4:4:4 baseline files; the bound leaves room for a different IDCT)."""

needs_dali = pytest.mark.skipif(not dali_available(), reason="nvidia.dali is not installed (pip install 'reglue[dali]')")
BACKENDS = ["torch", pytest.param("dali", marks=needs_dali)]


def make_loader(backend, dataset, order, rank, world_size, start, end, num_workers=0):
    if backend == "dali":
        return DALILoader(dataset, order, rank, world_size, start, end, device=torch.device("cpu"), num_workers=num_workers)
    return TorchLoader(dataset, order, rank, world_size, start, end, num_workers=num_workers)


def identify(dataset, moments: torch.Tensor) -> int:
    """The dataset index whose stored moments equal ``moments`` (they are unique per image)."""
    hits = [i for i in range(len(dataset)) if np.array_equal(dataset.moments(i), moments.numpy())]
    assert len(hits) == 1, f"moments match samples {hits}"
    return hits[0]


def sample_indices(dataset, batch) -> list:
    return [identify(dataset, m) for m in batch["moments"].cpu()]


@pytest.fixture(scope="module")
def shards(prepared):
    return open_data_dir(prepared)


@pytest.fixture(scope="module")
def published(shards, tmp_path_factory):
    """The prepared samples written in the published REPA layout (PNG images, .npy moments)."""
    root = tmp_path_factory.mktemp("published")
    labels = []
    for i in range(len(shards)):
        folder = f"{i // 4:05d}"  # several sub-folders, as in the 1000-per-folder original
        (root / "images" / folder).mkdir(parents=True, exist_ok=True)
        (root / "vae-sd" / folder).mkdir(parents=True, exist_ok=True)
        Image.fromarray(shards[i][0].permute(1, 2, 0).numpy()).save(root / "images" / folder / f"img{i:08d}.png")
        np.save(root / "vae-sd" / folder / f"img-mean-std-{i:08d}.npy", np.array(shards.moments(i)))
        labels.append([f"{folder}/img-mean-std-{i:08d}.npy", shards.label(i)])
    (root / "vae-sd" / "dataset.json").write_text(json.dumps({"labels": labels}))
    return root


@pytest.mark.parametrize("backend", BACKENDS)
def test_decoded_images_match_the_stored_pixels(backend, shards, prepared, image_folder):
    """Loader output == the JPEG-decoded ADM crop recomputed from the source file; moments and
    labels are the stored ones."""
    sources = []
    for shard in json.loads((prepared / "dataset.json").read_text())["shards"]:
        sources += (prepared / "shards" / shard["name"] / "sources.txt").read_text().splitlines()
    order = GlobalBatchOrder(len(shards), 2, seed=0)
    seen = set()
    for batch in make_loader(backend, shards, order, 0, 1, 0, order.steps_per_epoch):
        assert batch["image"].dtype == torch.uint8 and batch["image"].shape == (2, 3, IMAGE_SIZE, IMAGE_SIZE)
        assert batch["label"].dtype == torch.int64 and batch["label"].shape == (2,)
        for image, label, moments in zip(batch["image"], batch["label"], batch["moments"]):
            i = identify(shards, moments)
            seen.add(i)
            with Image.open(image_folder / sources[i]) as img:
                _, reference = jpeg_roundtrip(center_crop_arr(img.convert("RGB"), IMAGE_SIZE))
            diff = np.abs(image.permute(1, 2, 0).numpy().astype(int) - reference.astype(int)).max()
            assert diff <= DECODER_TOLERANCE, f"{backend}: sample {i} ({sources[i]}) differs by {diff} levels"
            assert int(label) == shards.label(i)
    assert seen == set(range(len(shards)))


@needs_dali
def test_dali_and_torch_deliver_the_same_batches(shards):
    order = GlobalBatchOrder(len(shards), 4, seed=5)
    for rank in range(2):
        dali = list(make_loader("dali", shards, order, rank, 2, 0, 6))
        ref = list(make_loader("torch", shards, order, rank, 2, 0, 6))
        assert len(dali) == len(ref) == 6
        for a, b in zip(dali, ref):
            assert torch.equal(a["label"], b["label"]) and torch.equal(a["moments"], b["moments"])
            assert (a["image"].int() - b["image"].int()).abs().max() <= DECODER_TOLERANCE


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("global_batch", [2, 4])
def test_two_ranks_two_epochs_cover_every_sample_once_per_epoch(backend, global_batch, shards):
    n = len(shards)
    order = GlobalBatchOrder(n, global_batch, seed=3)
    steps = 2 * order.steps_per_epoch
    per_rank = [list(make_loader(backend, shards, order, rank, 2, 0, steps)) for rank in range(2)]
    assert [len(batches) for batches in per_rank] == [steps, steps], "ranks must run the same number of steps"
    epochs = []
    for epoch in range(2):
        got = []
        for step in range(epoch * order.steps_per_epoch, (epoch + 1) * order.steps_per_epoch):
            for rank in range(2):
                indices = sample_indices(shards, per_rank[rank][step])
                assert indices == order.rank_batch(step, rank, 2)
                got += indices
        counts = Counter(got)
        assert max(counts.values()) == 1, f"epoch {epoch}: a sample was delivered twice"
        assert len(got) == order.steps_per_epoch * global_batch
        if n % global_batch == 0:
            assert set(got) == set(range(n))
        epochs.append(got)
    assert epochs[0] != epochs[1], "the epoch permutation must change with the epoch"


@pytest.mark.parametrize("backend", BACKENDS)
def test_resume_mid_epoch_continues_at_the_right_sample(backend, shards):
    order = GlobalBatchOrder(len(shards), 2, seed=11)
    full = [sample_indices(shards, b) for b in make_loader(backend, shards, order, 1, 2, 0, 8)]
    resumed = [sample_indices(shards, b) for b in make_loader(backend, shards, order, 1, 2, 3, 8)]
    assert 3 % order.steps_per_epoch != 0, "the resume point must be inside an epoch"
    assert resumed == full[3:]
    # a different world size resumes the same global batches
    wide = [sample_indices(shards, b) for b in make_loader(backend, shards, order, 0, 1, 3, 8)]
    assert [sorted(x) for x in wide] == [sorted(order.global_batch(s)) for s in range(3, 8)]


@needs_dali
def test_dali_parallel_workers_match_inline_source(shards):
    order = GlobalBatchOrder(len(shards), 4, seed=2)
    inline = list(make_loader("dali", shards, order, 0, 2, 0, 4, num_workers=0))
    workers = list(make_loader("dali", shards, order, 0, 2, 0, 4, num_workers=1))
    for a, b in zip(inline, workers, strict=True):
        assert torch.equal(a["image"], b["image"]) and torch.equal(a["moments"], b["moments"])


@pytest.mark.parametrize("backend", BACKENDS)
def test_published_layout_loads(backend, published, shards):
    dataset = open_data_dir(published)
    assert isinstance(dataset, PublishedDataset)
    assert len(dataset) == len(shards) and dataset.image_size == IMAGE_SIZE and dataset.num_classes == shards.num_classes
    order = GlobalBatchOrder(len(dataset), 2, seed=0)
    for step, batch in enumerate(make_loader(backend, dataset, order, 0, 2, 0, 4)):
        index = order.rank_batch(step, 0, 2)[0]
        assert torch.equal(batch["image"][0], shards[index][0]), "PNG decoding is lossless"
        assert torch.equal(batch["moments"][0], shards[index][2]) and int(batch["label"][0]) == shards.label(index)


def test_published_layout_errors(published, tmp_path):
    import shutil

    root = tmp_path / "pub"
    shutil.copytree(published, root)
    next((root / "vae-sd").rglob("*.npy")).unlink()
    with pytest.raises(DatasetError, match="images but .* moments files"):
        open_data_dir(root)
    shutil.rmtree(root)
    shutil.copytree(published, root)
    (root / "vae-sd" / "dataset.json").write_text(json.dumps({"labels": [["00000/other.npy", 1]]}))
    with pytest.raises(DatasetError, match="no label for"):
        open_data_dir(root)


def _config(path, backend="auto", image_size=IMAGE_SIZE):
    config = get_preset("tiny")
    config.data = DataConfig(path=str(path) if path else None, image_size=image_size, backend=backend, num_workers=0)
    return Config(**{name: getattr(config, name) for name in ("model", "method", "encoders", "data", "optim", "parallel", "train")})


def test_open_dataset_and_backend_choice(prepared, published):
    dataset = open_dataset(_config(prepared))
    assert len(dataset) == 10 and dataset.has_moments
    assert len(open_dataset(_config(published))) == 10
    with pytest.raises(ValueError, match="data.image_size is 128"):
        open_dataset(_config(prepared, image_size=128))
    assert resolve_backend("auto", dataset) == ("dali" if dali_available() else "torch")
    assert resolve_backend("torch", dataset) == "torch"
    synthetic = open_dataset(_config(None))
    assert resolve_backend("auto", synthetic) == "torch"
    with pytest.raises(ValueError, match="data.backend=dali"):
        resolve_backend("dali", synthetic)


def test_build_loader_checks_and_delivers(prepared):
    config = _config(prepared)
    dataset = open_dataset(config)
    order = GlobalBatchOrder(len(dataset), 4, seed=0)
    batches = list(build_loader(config, dataset, order, 1, 2, 2, 5, torch.device("cpu")))
    assert len(batches) == 3
    assert [sample_indices(dataset, b) for b in batches] == [order.rank_batch(s, 1, 2) for s in range(2, 5)]
    with pytest.raises(ValueError, match="dataset has 9"):
        check_rank_partition(order, 0, 2, 9)


def test_training_runs_from_prepared_shards(prepared, tmp_path):
    """`train.py --data PATH`: a few tiny-model steps read the shards (backend auto) and the stored moments
    (with the VAE that computed them)."""
    from reglue.config import apply_overrides
    from reglue.train.trainer import run

    config = apply_overrides(_config(prepared), {
        "encoders.vae": "tiny-random", "train.max_steps": 2, "train.global_batch_size": 4, "train.out_dir": str(tmp_path), "train.log_every": 1,
        "train.ckpt_every": 2, "train.num_sample_images": 1, "sample.steps": 2, "train.name": "shards",
    })
    run(config)
    records = [json.loads(line) for line in (tmp_path / "shards" / "metrics.jsonl").read_text().splitlines()]
    assert len(records) == 2 and all(np.isfinite(r["loss/total"]) for r in records)
