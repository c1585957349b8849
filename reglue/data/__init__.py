"""Training data: the built-in synthetic set, prepared shards, and per-step loaders."""

from __future__ import annotations


def open_dataset(config):
    """The map-style training set of a run config: ``data.path`` or the synthetic demo set.

    Items are ``(image uint8 (3, H, W), label int[, moments (8, h, w)])``.
    """
    data = config.data
    if data.path is None:
        from reglue.data.synthetic import SyntheticShapes

        if data.synthetic_classes > config.model.num_classes:
            raise ValueError(f"data.synthetic_classes {data.synthetic_classes} exceeds model.num_classes {config.model.num_classes}")
        return SyntheticShapes(data.synthetic_size, data.synthetic_classes, data.image_size, seed=config.train.seed)
    raise NotImplementedError("prepared datasets (data.path) come with the data pipeline")


def build_loader(config, dataset, order, rank: int, world_size: int, start_step: int, end_step: int, device=None):
    """Iterator over this rank's batches for steps [start_step, end_step): dicts with ``image``
    uint8 (B, 3, H, W), ``label`` int64 (B,) and, for prepared data, ``moments`` (B, 8, h, w)."""
    from reglue.data.loader import TorchLoader

    return TorchLoader(dataset, order, rank, world_size, start_step, end_step, num_workers=config.data.num_workers)
