"""``reglue stats``: per-channel mean/std of the multi-layer DINOv2 features over a dataset.

Streaming and numerically stable: each rank folds its batches into a float64
:class:`~reglue.models.encoders.RunningMoments` (count, mean, M2), the partial results are
gathered and merged in rank order (Chan et al.), so the result does not depend on the batch
size and matches a direct two-pass computation. The output (``mean``, ``std`` safetensors,
population std like the published ``calc_norm_stats.py``) is what ``encoders.feature_stats``
reads. The encoder comes from a preset or run config, so the statistics belong to the exact
DINOv2 (weights, layers, image size) the training run uses.
"""

from __future__ import annotations

import logging
from typing import Iterator, Optional, Sequence

import torch

from reglue.models.encoders import DINOv2Encoder, FeatureStats, RunningMoments

log = logging.getLogger("reglue.stats")


def build_feature_encoder(config, image_size: int, device: torch.device) -> DINOv2Encoder:
    """The frozen DINOv2 of a run config, exactly as the trainer builds it."""
    from reglue.models.encoders import build_frozen_dinov2

    return build_frozen_dinov2(config, device, image_size=image_size)


def sample_indices(num_samples: int, max_images: Optional[int], seed: int) -> list:
    """All indices, or a seeded random subset of ``max_images`` (sorted): a sorted ImageFolder's
    first N images would cover only the first classes."""
    if max_images is None or max_images >= num_samples:
        return list(range(num_samples))
    g = torch.Generator().manual_seed(seed)
    return sorted(torch.randperm(num_samples, generator=g)[:max_images].tolist())


def image_batches(dataset, indices: Sequence[int], batch_size: int, num_workers: int = 0) -> Iterator[torch.Tensor]:
    """uint8 (B, 3, H, W) image batches of ``dataset[indices]``, in order."""
    from reglue.data.loader import collate

    loader = torch.utils.data.DataLoader(torch.utils.data.Subset(dataset, list(indices)), batch_size=batch_size,
                                         num_workers=num_workers, collate_fn=collate,
                                         pin_memory=torch.cuda.is_available())
    for batch in loader:
        yield batch["image"]


def gather_moments(moments: RunningMoments) -> RunningMoments:
    """Merge every rank's partial moments (in rank order, so all ranks get the same result)."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
        return moments
    parts = [None] * dist.get_world_size()
    local = (moments.count, None if moments.mean is None else moments.mean.cpu(), None if moments.m2 is None else moments.m2.cpu())
    dist.all_gather_object(parts, local)
    total = RunningMoments()
    for count, mean, m2 in parts:
        total.merge(RunningMoments(count, mean, m2))
    return total


@torch.no_grad()
def compute_dataset_stats(dataset, encoder: DINOv2Encoder, *, batch_size: int = 64, max_images: Optional[int] = None,
                          seed: int = 0, rank: int = 0, world_size: int = 1, num_workers: int = 0,
                          progress: bool = False) -> FeatureStats:
    """Per-channel statistics of ``encoder(images).features`` over the dataset (or a seeded subset
    of ``max_images``); rank r takes every world_size-th image. Collective when distributed."""
    device = encoder.pixel_mean.device
    indices = sample_indices(len(dataset), max_images, seed)[rank::world_size]
    moments = RunningMoments()
    bar = None
    if progress and rank == 0:
        from tqdm import tqdm

        bar = tqdm(total=len(indices), unit="img", desc="stats", dynamic_ncols=True)
    for images in image_batches(dataset, indices, batch_size, num_workers):
        moments.update(encoder(images.to(device, non_blocking=True)).features.float())
        if bar is not None:
            bar.update(len(images))
    if bar is not None:
        bar.close()
    return gather_moments(moments).stats()


def run_config(preset: Optional[str], config_file: Optional[str], overrides: dict):
    """A Config from ``--preset`` or ``--config`` plus ``section.field`` overrides."""
    import json

    from reglue.config import Config, apply_overrides
    from reglue.presets import get_preset

    if config_file:
        with open(config_file) as f:
            config = Config.from_dict(json.load(f))
    else:
        config = get_preset(preset)
    return apply_overrides(config, {k: v for k, v in overrides.items() if v is not None})


def add_encoder_arguments(p) -> None:
    """Flags shared by ``stats`` and ``train-compressor``: which DINOv2 (from a run's config)."""
    p.add_argument("--preset", default="reglue-sit-xl-2", help="take the DINOv2 (weights, layers) from this preset (default: reglue-sit-xl-2)")
    p.add_argument("--config", help="a run's config.json instead of --preset")
    p.add_argument("--dinov2-weights", help="override encoders.dinov2_weights (timm hub name or local file)")
    p.add_argument("--layers", help="override encoders.feature_layers, e.g. 8,9,10,11")
    p.add_argument("--batch-size", type=int, default=64, help="images per forward per rank")
    p.add_argument("--workers", type=int, default=4, help="DataLoader workers per rank")
    p.add_argument("--seed", type=int, default=0)


def encoder_overrides(args) -> dict:
    return {"encoders.dinov2_weights": args.dinov2_weights,
            "encoders.feature_layers": f"({args.layers})" if args.layers else None}


def add_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "stats", help="per-channel mean/std of the DINOv2 features over a dataset (for encoders.feature_stats)",
        description="Streams the dataset through the run's DINOv2; distributed with torchrun (-m reglue.cli stats ...).",
    )
    p.add_argument("--data", required=True, help="prepared dataset (`reglue prepare`) or the published layout")
    p.add_argument("--out", required=True, help="output .safetensors (mean, std)")
    p.add_argument("--max-images", type=int, help="a seeded random subset of this many images (default: all)")
    add_encoder_arguments(p)
    p.set_defaults(func=main)


def main(args) -> int:
    from pathlib import Path

    from reglue.data.shards import open_data_dir
    from reglue.train.distributed import init_distributed, shutdown

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    config = run_config(args.preset, args.config, encoder_overrides(args))
    dist_info = init_distributed()
    try:
        dataset = open_data_dir(args.data)
        encoder = build_feature_encoder(config, dataset.image_size, dist_info.device)
        stats = compute_dataset_stats(dataset, encoder, batch_size=args.batch_size, max_images=args.max_images, seed=args.seed,
                                      rank=dist_info.rank, world_size=dist_info.world_size, num_workers=args.workers,
                                      progress=True)
        if dist_info.is_main:
            Path(args.out).parent.mkdir(parents=True, exist_ok=True)
            stats.save(args.out)
            print(f"wrote {stats.channels}-channel feature statistics to {args.out} (layers {config.encoders.feature_layers})")
    finally:
        shutdown()
    return 0
