"""Training data: the built-in synthetic set, prepared shards / the published layout, and the
per-step loaders (DALI or torch) that deliver ``GlobalBatchOrder.rank_batch(step, rank, world)``."""

from __future__ import annotations

import logging

log = logging.getLogger("reglue.data")


def open_dataset(config):
    """The map-style training set of a run config: ``data.path`` or the synthetic demo set.

    Items are ``(image uint8 (3, H, W), label int[, moments (8, h, w)])``. A prepared directory
    must match ``data.image_size`` and fit ``model.num_classes``.
    """
    data = config.data
    if data.path is None:
        from reglue.data.synthetic import SyntheticShapes

        if data.synthetic_classes > config.model.num_classes:
            raise ValueError(f"data.synthetic_classes {data.synthetic_classes} exceeds model.num_classes {config.model.num_classes}")
        return SyntheticShapes(data.synthetic_size, data.synthetic_classes, data.image_size, seed=config.train.seed)
    from reglue.data.shards import open_data_dir

    dataset = open_data_dir(data.path)
    size = dataset.image_size
    if size != data.image_size:
        raise ValueError(f"data.image_size is {data.image_size} but {data.path} holds {size}x{size} images: set "
                         f"--set data.image_size={size} (train.py follows the dataset when the field is not set), "
                         f"or prepare the data again with --resolution {data.image_size}")
    if dataset.num_classes > config.model.num_classes:
        raise ValueError(f"{data.path} has {dataset.num_classes} classes, more than model.num_classes {config.model.num_classes}")
    if dataset.num_classes < config.model.num_classes:
        log.info("data: %s has %d classes, model.num_classes is %d: %d class embeddings stay unused "
                 "(--set model.num_classes=%d for a model of this dataset)", data.path, dataset.num_classes,
                 config.model.num_classes, config.model.num_classes - dataset.num_classes, dataset.num_classes)
    log.info("data: %s (%d samples, %d classes, %dpx%s)", data.path, len(dataset), dataset.num_classes, dataset.image_size,
             ", with VAE moments" if dataset.has_moments else ", no stored moments: latents encoded online")
    return dataset


def check_dataset_vae(dataset, vae: str, vae_sha256: str) -> None:
    """Refuse a dataset whose stored VAE moments another VAE computed than the run's ``encoders.vae``
    (``vae``, whose weights have the fingerprint ``vae_sha256``): the run would learn another
    VAE's latent space and decode its samples with the wrong decoder.

    Identity is the fingerprint of the weights, not the name: a hub name and a local copy of the
    same weights agree; a ``tiny-random`` VAE of another seed, or a patch autoencoder fitted again
    (``patch-pca`` in another run directory) does not. A dataset prepared before fingerprints were
    recorded is compared by name. The published layout records no VAE: it is assumed to be
    ``vae``, and the log says so."""
    if not getattr(dataset, "has_moments", False):
        return
    if dataset.vae is None:
        log.info("data: %s records no VAE (the published layout): its moments are taken to be encoders.vae's (%s)",
                 dataset.root, vae)
        return
    if (dataset.vae_sha256 == vae_sha256) if dataset.vae_sha256 else (dataset.vae == vae):
        return
    from reglue.data.shards import DatasetError
    from reglue.models.autoencoder import AUTOENCODER_FILE, PATCH_AUTOENCODER

    recorded = f"sha256 {dataset.vae_sha256[:12]}" if dataset.vae_sha256 else "no fingerprint recorded"
    if dataset.vae == vae:
        fix = "prepare the data again with the run's VAE (a tiny-random VAE needs --vae-seed equal to train.seed)"
    elif vae == PATCH_AUTOENCODER:  # fitted by the run itself: no dataset can have been prepared with it before
        fix = (f"train with --set encoders.vae={dataset.vae}, or prepare the data with --vae none (the run encodes the "
               f"images with the autoencoder it fits) or --vae RUN/{AUTOENCODER_FILE} of an earlier run")
    else:
        fix = f"train with --set encoders.vae={dataset.vae}, or prepare the data again with --vae {vae}"

    raise DatasetError(f"{dataset.root}: its VAE moments were computed with {dataset.vae!r} ({recorded}) but "
                       f"encoders.vae is {vae!r} (sha256 {vae_sha256[:12]}), another latent space: {fix}")


def resolve_backend(requested: str, dataset) -> str:
    """``dali`` | ``torch`` from ``data.backend`` (auto: DALI when importable and the data are
    encoded files, else torch)."""
    from reglue.data.dali import dali_available

    encoded = hasattr(dataset, "encoded")
    if requested == "torch":
        return "torch"
    if requested == "dali":
        if not dali_available():
            raise ValueError("data.backend=dali but nvidia.dali does not import; pip install 'reglue[dali]' or use data.backend=torch")
        if not encoded:
            raise ValueError("data.backend=dali needs a prepared dataset or the published layout (data.path); "
                             "the synthetic demo set is generated in Python: use data.backend=torch or auto")
        return "dali"
    if not encoded:
        return "torch"
    if dali_available():
        return "dali"
    log.info("data: DALI is not installed; using the torch loader (pip install 'reglue[dali]' for GPU JPEG decoding)")
    return "torch"


def check_rank_partition(order, step: int, world_size: int, num_samples: int) -> None:
    """Sanity at start: at ``step`` the ranks' shares are disjoint, cover the global batch, and
    index inside the dataset (every rank computes this for all ranks, so no communication)."""
    if order.num_samples != num_samples:
        raise ValueError(f"batch order covers {order.num_samples} samples but the dataset has {num_samples}")
    shares = [order.rank_batch(step, r, world_size) for r in range(world_size)]
    flat = [i for share in shares for i in share]
    if len(set(flat)) != len(flat) or sorted(flat) != sorted(order.global_batch(step)):
        raise RuntimeError(f"step {step}: rank shares overlap or do not cover the global batch")
    if flat and not 0 <= min(flat) <= max(flat) < num_samples:
        raise RuntimeError(f"step {step}: sample index outside [0, {num_samples})")


def build_loader(config, dataset, order, rank: int, world_size: int, start_step: int, end_step: int, device=None):
    """Iterator over this rank's batches for steps [start_step, end_step): dicts with ``image``
    uint8 (B, 3, H, W), ``label`` int64 (B,) and, for prepared data, ``moments`` (B, 8, h, w).

    ``data.backend``: dali | torch | auto. The DALI loader returns ``image`` and ``moments``
    already on ``device`` when it is a GPU; the torch loader returns CPU (pinned) tensors.
    """
    backend = resolve_backend(config.data.backend, dataset)
    if start_step < end_step:
        check_rank_partition(order, start_step, world_size, len(dataset))
    if backend == "dali":
        from reglue.data.dali import DALILoader

        loader = DALILoader(dataset, order, rank, world_size, start_step, end_step, device=device,
                            num_workers=config.data.num_workers)
        where = f"cuda:{loader.device_id} (mixed)" if loader.device_id is not None else "cpu"
        log.info("data: DALI loader, decoding on %s, %d workers, steps [%d, %d)", where, config.data.num_workers, start_step, end_step)
        return loader
    from reglue.data.loader import TorchLoader

    log.info("data: torch loader, %d workers, steps [%d, %d)", config.data.num_workers, start_step, end_step)
    return TorchLoader(dataset, order, rank, world_size, start_step, end_step, num_workers=config.data.num_workers)
