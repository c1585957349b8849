"""``reglue stats``: per-channel mean/std of the multi-layer DINOv2 features over a dataset.

Streaming and numerically stable: each rank folds its batches into a float64
:class:`~reglue.models.encoders.RunningMoments` (count, mean, M2), the partial results are
gathered and merged in rank order (Chan et al.), so the result does not depend on the batch
size and matches a direct two-pass computation. The output (``mean``, ``std`` safetensors,
population std like the published ``calc_norm_stats.py``) is what ``encoders.feature_stats``
reads. The encoder comes from a preset or run config, so the statistics belong to the exact
DINOv2 (weights, layers, image size) the training run uses.

With ``--pca K`` it also fits ReDi's PCA (the published ``calc_pca.py``: standardise the features
with these per-channel statistics, fit a K-component PCA) over a seeded random subset of
``--pca-images`` images: each rank streams its share into float64 sums of x and x xᵀ over the
per-pixel feature vectors, the sums are all-reduced and :meth:`PCA.from_moments` diagonalises
the covariance, so no more than one batch of features is held at a time. The output is what
``encoders.pca`` reads.
"""

from __future__ import annotations

import logging
from typing import Iterator, Optional, Sequence

import torch

from reglue.data.sampler import sample_indices
from reglue.runtime import WORKERS_HELP, all_gather_object, all_reduce_sum, default_workers, progress_bar
from reglue.models.encoders import PCA, DINOv2Encoder, FeatureStats, RunningMoments

log = logging.getLogger("reglue.stats")


def build_feature_encoder(config, image_size: int, device: torch.device) -> DINOv2Encoder:
    """The frozen DINOv2 of a run config, exactly as the trainer builds it."""
    from reglue.models.encoders import build_frozen_dinov2

    return build_frozen_dinov2(config, device, image_size=image_size)


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
    local = (moments.count, None if moments.mean is None else moments.mean.cpu(), None if moments.m2 is None else moments.m2.cpu())
    parts = all_gather_object(local)
    if len(parts) == 1:
        return moments
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
    with progress_bar(progress and rank == 0, total=len(indices), unit="img", desc="stats") as bar:
        for images in image_batches(dataset, indices, batch_size, num_workers):
            moments.update(encoder(images.to(device, non_blocking=True)).features.float())
            bar.update(len(images))
    return gather_moments(moments).stats()


DEFAULT_PCA_IMAGES = 20_000


@torch.no_grad()
def compute_dataset_pca(dataset, encoder: DINOv2Encoder, stats: FeatureStats, n_components: int, *,
                        max_images: Optional[int] = DEFAULT_PCA_IMAGES, whiten: bool = False, batch_size: int = 64,
                        seed: int = 0, rank: int = 0, world_size: int = 1, num_workers: int = 0, progress: bool = False,
                        max_chunk_elements: int = 1 << 24) -> PCA:
    """ReDi's PCA of the standardised features ``stats.normalize(encoder(images).features)`` over
    a seeded random subset of ``max_images`` images (None: all), every pixel one C-vector.

    Equals ``PCA.fit`` on those features concatenated, without holding them: each rank (every
    world_size-th image of the subset) accumulates count, Σx and Σx xᵀ in float64, chunked so the
    float64 copy stays below ``max_chunk_elements``; the sums are all-reduced (collective when
    distributed) and every rank returns the same PCA.
    """
    device = encoder.pixel_mean.device
    channels = encoder.feature_channels
    if stats.channels != channels:
        raise ValueError(f"feature statistics have {stats.channels} channels but the DINOv2 layers give {channels}")
    if not 0 < n_components <= channels:
        raise ValueError(f"--pca must be in [1, {channels}], got {n_components}")
    stats = stats.to(device)
    indices = sample_indices(len(dataset), max_images, seed)[rank::world_size]
    # one buffer [count, Σx (C), Σx xᵀ (C*C)] so the reduction is a single all-reduce
    sums = torch.zeros(1 + channels + channels * channels, dtype=torch.float64, device=device)
    count, total, outer = sums[:1], sums[1 : 1 + channels], sums[1 + channels :].view(channels, channels)
    step = max(1, max_chunk_elements // channels)
    with progress_bar(progress and rank == 0, total=len(indices), unit="img", desc="pca") as bar:
        for images in image_batches(dataset, indices, batch_size, num_workers):
            features = stats.normalize(encoder(images.to(device, non_blocking=True)).features.float())
            rows = features.movedim(1, -1).reshape(-1, channels)
            for chunk in rows.split(step):
                chunk = chunk.double()
                total += chunk.sum(dim=0)
                outer.addmm_(chunk.T, chunk)
            count += rows.shape[0]
            bar.update(len(images))
    all_reduce_sum(sums)
    return PCA.from_moments(int(count.item()), total, outer, n_components, whiten=whiten)


def run_config(preset: Optional[str], config_file: Optional[str], overrides: dict):
    """A Config from ``--preset`` or ``--config`` plus ``section.field`` overrides."""
    from reglue.config import Config, apply_overrides
    from reglue.presets import get_preset

    config = Config.from_file(config_file) if config_file else get_preset(preset)
    return apply_overrides(config, {k: v for k, v in overrides.items() if v is not None})


def add_encoder_arguments(p) -> None:
    """Flags shared by ``stats`` and ``train-compressor``: which DINOv2 (from a run's config)."""
    p.add_argument("--preset", default="reglue-sit-xl-2", help="take the DINOv2 (weights, layers) from this preset (default: reglue-sit-xl-2)")
    p.add_argument("--config", help="a run's config.json instead of --preset")
    p.add_argument("--dinov2-weights", help="override encoders.dinov2_weights (timm hub name or local file)")
    p.add_argument("--layers", help="override encoders.feature_layers, e.g. 8,9,10,11")
    p.add_argument("--set", action="append", default=[], metavar="SECTION.FIELD=VALUE",
                   help="override any field of the config, e.g. --set method.name=redi (repeatable; "
                        "--dinov2-weights/--layers win over it)")
    p.add_argument("--batch-size", type=int, default=64, help="images per forward per rank")
    p.add_argument("--workers", type=int, default=default_workers(),
                   help="DataLoader workers per rank " + WORKERS_HELP.format(default_workers()))
    p.add_argument("--seed", type=int, default=0, help="seed of the random subsets (and of train-compressor's data "
                                                        "order, hold-out and initialisation)")


def encoder_overrides(args) -> dict:
    from reglue.config import parse_set_items

    overrides = parse_set_items(getattr(args, "set", None))
    if args.dinov2_weights is not None:
        overrides["encoders.dinov2_weights"] = args.dinov2_weights
    if args.layers:
        overrides["encoders.feature_layers"] = f"({args.layers})"
    return overrides


def add_parser(subparsers) -> None:
    from reglue.outputs import add_overwrite_flag

    p = subparsers.add_parser(
        "stats",
        help="per-channel mean/std of the DINOv2 features over a dataset (encoders.feature_stats); "
             "with --pca, also ReDi's PCA of the standardised features (encoders.pca)",
        description="Streams the dataset through the run's DINOv2 (from --preset/--config, e.g. layer 11 for "
                    "redi-sit-xl-2) and writes the per-channel mean/std of its features to --out. With --pca K it "
                    "then fits ReDi's K-component PCA of the features standardised with those statistics (or with "
                    "--stats-in, computed earlier) over a seeded random subset of --pca-images images, streaming "
                    "float64 covariance sums, and writes it to --pca-out. Distributed with torchrun "
                    "(-m reglue.cli stats ...): each rank takes every world_size-th image.",
        epilog="examples: reglue stats --preset redi-sit-xl-2 --data DATA --out stats.safetensors --pca 8 "
               "--pca-out pca.safetensors;  reglue stats --preset redi-sit-xl-2 --data DATA "
               "--stats-in stats.safetensors --pca 8 --pca-out pca.safetensors --pca-images 50000",
    )
    p.add_argument("--data", required=True, help="prepared dataset (`reglue prepare`) or the published layout")
    p.add_argument("--out", help="output .safetensors (mean, std); required unless --stats-in is given")
    p.add_argument("--max-images", type=int, help="statistics over a seeded random subset of this many images (default: all)")
    p.add_argument("--stats-in", help="use these statistics (from an earlier `reglue stats`) instead of computing them; "
                                      "needs --pca")
    p.add_argument("--pca", type=int, nargs="?", const=0, metavar="K",
                   help="also fit a K-component PCA of the standardised features (ReDi); K defaults to the config's "
                        "method.semantic_channels (8 for the redi presets)")
    p.add_argument("--pca-out", help="output .safetensors of the PCA (what encoders.pca reads); required with --pca")
    p.add_argument("--pca-images", type=int, default=DEFAULT_PCA_IMAGES,
                   help=f"fit the PCA on a seeded random, class-agnostic subset of this many images "
                        f"(default: {DEFAULT_PCA_IMAGES}; 0 = all)")
    p.add_argument("--pca-whiten", action="store_true",
                   help="divide each component by its standard deviation (the published ReDi does not)")
    add_overwrite_flag(p)
    add_encoder_arguments(p)
    p.set_defaults(func=main)


def check_arguments(args) -> None:
    """The flag combinations ``main`` accepts; ValueError otherwise."""
    if args.stats_in and args.out:
        raise ValueError("give either --out (compute the statistics) or --stats-in (load them), not both")
    if not args.stats_in and not args.out:
        raise ValueError("--out is required (or --stats-in with --pca)")
    if args.pca is None:
        if args.pca_out or args.stats_in:
            raise ValueError(f"{'--pca-out' if args.pca_out else '--stats-in'} needs --pca")
        return
    if not args.pca_out:
        raise ValueError("--pca needs --pca-out FILE")
    if args.pca < 0 or args.pca_images < 0:
        raise ValueError("--pca and --pca-images must not be negative")


def main(args) -> int:
    from reglue.data.shards import open_data_dir
    from reglue.outputs import atomic_path, ensure_output_file, removed_on_failure
    from reglue.runtime import init_distributed, shutdown

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    dist_info = init_distributed()
    try:
        with removed_on_failure():  # a failed start leaves no new folder behind
            check_arguments(args)
            for flag, path in (("--out", args.out), ("--pca-out", args.pca_out)):
                if path:
                    ensure_output_file(path, flag, suffixes=(".safetensors",), overwrite=args.overwrite)
            config = run_config(args.preset, args.config, encoder_overrides(args))
            n_components = None
            if args.pca is not None:
                n_components = args.pca or config.method.semantic_channels
                if config.method.semantic != "pca":
                    log.warning("--pca with a %s config: the PCA is of its DINOv2 layers %s; ReDi uses layer (11,) "
                                "(--preset redi-sit-xl-2, or --set method.name=redi --layers 11)",
                                config.method.name, config.encoders.feature_layers)
                elif n_components != config.method.semantic_channels:
                    log.warning("--pca %d but the config's method.semantic_channels is %d: a run with this config will "
                                "reject the PCA", n_components, config.method.semantic_channels)
            dataset = open_data_dir(args.data)
            encoder = build_feature_encoder(config, dataset.image_size, dist_info.device)
            stats = FeatureStats.load(args.stats_in) if args.stats_in else None
        if stats is None:
            stats = compute_dataset_stats(dataset, encoder, batch_size=args.batch_size, max_images=args.max_images,
                                          seed=args.seed, rank=dist_info.rank, world_size=dist_info.world_size,
                                          num_workers=args.workers, progress=True)
            if dist_info.is_main:
                with atomic_path(args.out) as tmp:
                    stats.save(tmp)
                print(f"wrote {stats.channels}-channel feature statistics to {args.out} (layers {config.encoders.feature_layers})")
        if n_components is not None:
            pca = compute_dataset_pca(dataset, encoder, stats, n_components, max_images=args.pca_images or None,
                                      whiten=args.pca_whiten, batch_size=args.batch_size, seed=args.seed,
                                      rank=dist_info.rank, world_size=dist_info.world_size, num_workers=args.workers,
                                      progress=True)
            if dist_info.is_main:
                with atomic_path(args.pca_out) as tmp:
                    pca.save(tmp)
                images = min(len(dataset), args.pca_images or len(dataset))
                print(f"wrote a {pca.in_channels}->{pca.latent_channels} PCA{' (whitened)' if pca.whiten else ''} "
                      f"fitted on {images} images to {args.pca_out} (layers {config.encoders.feature_layers}); "
                      f"leading variances {[round(v, 3) for v in pca.explained_variance[:4].tolist()]}")
    finally:
        shutdown()
    return 0
