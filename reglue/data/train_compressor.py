"""``reglue train-compressor``: train the semantic compressor as published.

Recipe (REGLUE ``train_compressor.py``): frozen DINOv2 multi-layer features of the training
images, standardised with the per-channel statistics (``reglue stats``), reconstructed by the
conv auto-encoder under an MSE loss; Adam (lr 1e-3), a cosine schedule stepped per epoch
(``CosineAnnealingLR(T_max=100, eta_min=1e-4)`` over 25 epochs: the defaults here), global batch
4096, validation loss after every epoch. BatchNorm uses per-rank batch statistics, as in the
published DDP run.

Data order: the batch of step s is ``GlobalBatchOrder(len(train), global_batch, seed)``'s step s,
so a run resumed from its end-of-epoch checkpoint (``OUT/checkpoints/``, the trainer's DCP
format) continues exactly, at any world size. Validation: ``--val-data`` (e.g. the ImageNet validation set prepared with
``--vae none``) or a seeded hold-out of ``--val-fraction`` of the training set. Output:
``OUT/compressor.safetensors`` (a plain state dict that ``load_compressor`` loads strictly, the
file ``encoders.compressor`` takes) and ``OUT/log.jsonl`` (one line per epoch).
"""

from __future__ import annotations

import logging
import math
import os
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import List, Optional, Sequence

import torch
import torch.nn.functional as F

from reglue import checkpoint as ckpt
from reglue.data.sampler import GlobalBatchOrder
from reglue.outputs import (MetricsWriter, add_overwrite_flag, atomic_path, check_output_dir, check_same_settings,
                            ensure_resumable_dir, removed_on_failure)
from reglue.runtime import DistInfo, all_reduce_sum, per_rank_batch, progress_bar, seeded_generator, seeded_init
from reglue.models.compressor import SemanticCompressor
from reglue.models.encoders import DINOv2Encoder, FeatureStats

log = logging.getLogger("reglue.compressor")


@dataclass
class CompressorTraining:
    """Hyper-parameters (defaults: the published run)."""

    channels: Sequence[int] = (3072, 256, 16)
    epochs: int = 25
    lr: float = 1e-3
    min_lr: float = 1e-4
    cosine_epochs: Optional[int] = 100
    """T_max of the per-epoch cosine; None = ``epochs`` (decay fully to ``min_lr``)."""
    global_batch_size: int = 4096
    seed: int = 0

    def __post_init__(self):
        if self.epochs <= 0 or self.global_batch_size <= 0:
            raise ValueError(f"epochs and global_batch_size must be positive, got {self.epochs}, {self.global_batch_size}")
        if not 0 <= self.min_lr <= self.lr:
            raise ValueError(f"need 0 <= min_lr <= lr, got min_lr={self.min_lr}, lr={self.lr}")
        if self.cosine_epochs is not None and self.cosine_epochs <= 0:
            raise ValueError(f"cosine_epochs must be positive, got {self.cosine_epochs}")

    def lr_at(self, epoch: int) -> float:
        period = self.cosine_epochs or self.epochs
        return self.min_lr + (self.lr - self.min_lr) * (1 + math.cos(math.pi * epoch / period)) / 2


def split_holdout(num_samples: int, fraction: float, seed: int):
    """Seeded (train indices, validation indices), both sorted."""
    if not 0 < fraction < 1:
        raise ValueError(f"val fraction must be in (0, 1), got {fraction}")
    n_val = max(1, int(round(num_samples * fraction)))
    if n_val >= num_samples:
        raise ValueError(f"a {fraction} hold-out leaves no training images out of {num_samples}")
    perm = torch.randperm(num_samples, generator=seeded_generator(seed, 1)).tolist()
    return sorted(perm[n_val:]), sorted(perm[:n_val])


def _features(encoder: DINOv2Encoder, stats: FeatureStats, images: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return stats.normalize(encoder(images).features.float())


@torch.no_grad()
def validation_loss(model, encoder, stats, dataset, batch_size: int, rank: int, world_size: int, num_workers: int = 0) -> float:
    """Mean squared reconstruction error over every element of the validation set (all ranks)."""
    from reglue.data.stats import image_batches

    device = encoder.pixel_mean.device
    model.eval()
    totals = torch.zeros(2, dtype=torch.float64, device=device)
    for images in image_batches(dataset, range(rank, len(dataset), world_size), batch_size, num_workers):
        z = _features(encoder, stats, images.to(device, non_blocking=True))
        totals[0] += F.mse_loss(model(z), z, reduction="sum").double()
        totals[1] += z.numel()
    all_reduce_sum(totals)
    model.train()
    return float(totals[0] / totals[1].clamp_min(1))


def train_compressor(train_set, val_set, encoder: DINOv2Encoder, stats: FeatureStats, out_dir: str | os.PathLike,
                     hp: CompressorTraining = CompressorTraining(), *, rank: int = 0, world_size: int = 1,
                     num_workers: int = 0, val_batch_size: Optional[int] = None, progress: bool = False,
                     overwrite: bool = False) -> List[dict]:
    """Train (or resume) a SemanticCompressor; returns the per-epoch history.

    train_set / val_set: map-style datasets of ``(image uint8 (3, H, W), label, ...)``.
    Writes under ``out_dir``: ``compressor.safetensors`` and ``log.jsonl`` (rank 0), and a DCP
    checkpoint per epoch (``checkpoints/``, as the trainer's: complete only with its marker; a
    damaged newest one is skipped on resume). The same command resumes; other settings are
    refused (naming them); ``overwrite`` moves an existing run aside first.
    """
    from reglue.data.loader import TorchLoader

    if overwrite and world_size > 1:
        raise ValueError("--overwrite with several processes: move --out aside first (each rank would move it)")
    out = Path(out_dir)
    device = encoder.pixel_mean.device
    dist_info = DistInfo(rank=rank, world_size=world_size, device=device)
    with removed_on_failure():  # a failed start leaves no new folder behind
        ours = any((out / name).exists() for name in ("checkpoints", "log.jsonl", "compressor.safetensors"))
        ensure_resumable_dir(out, "--out", overwrite, ours, "a train-compressor run")
        if tuple(hp.channels)[0] != encoder.feature_channels:
            raise ValueError(f"compressor input {hp.channels[0]} != DINOv2 feature channels {encoder.feature_channels}")
        if stats.channels != encoder.feature_channels:
            raise ValueError(f"feature statistics have {stats.channels} channels, DINOv2 gives {encoder.feature_channels}")
        per_rank_batch(hp.global_batch_size, world_size, "--global-batch-size")
        stats = stats.to(device)
        with seeded_init(hp.seed):
            model = SemanticCompressor(hp.channels).to(device)
        optimizer = torch.optim.Adam(model.parameters(), lr=hp.lr)
        order = GlobalBatchOrder(len(train_set), hp.global_batch_size, seed=hp.seed)
        steps_per_epoch = order.steps_per_epoch
        step, history, run_id = _resume(out, model, optimizer, hp, steps_per_epoch, dist_info)
        metrics = MetricsWriter(out / "log.jsonl", resume_step=step) if rank == 0 else None
    trained = model
    if world_size > 1:
        trained = torch.nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    model.train()
    end = hp.epochs * steps_per_epoch
    with progress_bar(progress and rank == 0, total=end, initial=step, unit="step", desc="compressor") as bar:
        loss_sum = torch.zeros((), dtype=torch.float64, device=device)
        for batch in TorchLoader(train_set, order, rank, world_size, step, end, num_workers=num_workers):
            epoch = step // steps_per_epoch
            for group in optimizer.param_groups:
                group["lr"] = hp.lr_at(epoch)
            z = _features(encoder, stats, batch["image"].to(device, non_blocking=True))
            loss = F.mse_loss(trained(z), z)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            loss_sum += loss.detach().double()
            step += 1
            bar.update(1)
            if step % steps_per_epoch == 0:
                train_loss = float(all_reduce_sum(loss_sum.clone())) / (steps_per_epoch * world_size)
                loss_sum.zero_()
                val_loss = validation_loss(model, encoder, stats, val_set, val_batch_size or hp.global_batch_size // world_size,
                                           rank, world_size, num_workers)
                history.append({"epoch": epoch + 1, "step": step, "lr": hp.lr_at(epoch), "train_loss": train_loss, "val_loss": val_loss})
                if rank == 0:
                    log.info("epoch %d/%d: train loss %.5f, val loss %.5f", epoch + 1, hp.epochs, train_loss, val_loss)
                    metrics.write(history[-1])
                    _save_weights(model, out / "compressor.safetensors")
                meta = {"config": _recipe(hp, steps_per_epoch), "run_id": run_id, "history": history}
                ckpt.save_checkpoint(out, step, ckpt.training_state(model, optimizer), meta, dist_info, keep_last=2)
    return history


def _recipe(hp: CompressorTraining, steps_per_epoch: int) -> dict:
    """What a resumed run must share with the run it continues (``epochs`` may grow)."""
    return {"channels": list(hp.channels), "steps_per_epoch": steps_per_epoch, "lr": hp.lr, "min_lr": hp.min_lr,
            "cosine_epochs": hp.cosine_epochs, "global_batch_size": hp.global_batch_size, "seed": hp.seed}


def _resume(out: Path, model, optimizer, hp: CompressorTraining, steps_per_epoch: int, dist_info: DistInfo):
    """(step, history, run id) of the newest checkpoint under ``out`` that loads, restored into
    ``model`` and ``optimizer``; (0, [], a new id) when there is none."""
    def load(path: Path) -> dict:
        state = ckpt.training_state(model, optimizer)
        meta = ckpt.load_checkpoint(path, state)
        ckpt.apply_training_state(model, optimizer, None, state)
        return meta

    latest = ckpt.latest_checkpoint(out)
    if latest:  # refuse a different recipe before loading anything
        check_same_settings(f"--out {out}", ckpt.read_meta(latest)["config"], _recipe(hp, steps_per_epoch))
    found = ckpt.load_newest(out, load, dist_info)
    if found is None:
        return 0, [], uuid.uuid4().hex
    path, meta = found
    log.info("resumed from %s at epoch %d", path, meta["step"] // steps_per_epoch)
    return meta["step"], list(meta["history"]), meta["run_id"]


def _save_weights(model, path: Path) -> None:
    from reglue.integrity import save_safetensors

    with atomic_path(path) as tmp:
        save_safetensors({k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}, tmp)


def add_parser(subparsers) -> None:
    from reglue.data.stats import add_encoder_arguments

    p = subparsers.add_parser(
        "train-compressor", help="train the semantic compressor on DINOv2 features (resumable; torchrun for multi-GPU)",
        description="Defaults follow the published recipe. Re-running the same command resumes from the newest checkpoint in OUT/checkpoints.",
    )
    p.add_argument("--data", required=True, help="training set: prepared dataset or the published layout")
    p.add_argument("--val-data", help="validation set (prepared, e.g. with --vae none); default: a hold-out of --data")
    p.add_argument("--val-fraction", type=float, default=0.01, help="hold-out fraction when --val-data is not given")
    p.add_argument("--stats", required=True, help="feature statistics from `reglue stats`")
    p.add_argument("--out", required=True, help="output directory (compressor.safetensors, log.jsonl, checkpoints/)")
    p.add_argument("--channels", help="compressor widths, e.g. 3072,256,16 (default: the config's encoders.compressor_channels)")
    p.add_argument("--epochs", type=int, default=25, help="passes over the training set (default 25)")
    p.add_argument("--lr", type=float, default=1e-3, help="peak AdamW learning rate (default 1e-3)")
    p.add_argument("--min-lr", type=float, default=1e-4, help="floor of the cosine schedule (default 1e-4)")
    p.add_argument("--cosine-epochs", type=int, default=100, help="cosine period in epochs (published: 100 over 25 epochs); 0 = --epochs")
    p.add_argument("--global-batch-size", type=int, default=4096, help="images per step over all ranks (default 4096)")
    add_overwrite_flag(p)
    add_encoder_arguments(p)
    p.set_defaults(func=main)


def main(args) -> int:
    from reglue.data.shards import open_data_dir
    from reglue.data.stats import build_feature_encoder, encoder_overrides, run_config
    from reglue.runtime import init_distributed, shutdown

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    check_output_dir(args.out, "--out")  # created once the inputs are read (train_compressor)
    config = run_config(args.preset, args.config, encoder_overrides(args))
    channels = tuple(int(c) for c in args.channels.split(",")) if args.channels else config.encoders.compressor_channels
    hp = CompressorTraining(channels=channels, epochs=args.epochs, lr=args.lr, min_lr=args.min_lr,
                            cosine_epochs=args.cosine_epochs or None, global_batch_size=args.global_batch_size, seed=args.seed)
    dist_info = init_distributed()
    try:
        dataset = open_data_dir(args.data)
        if args.val_data:
            train_set, val_set = dataset, open_data_dir(args.val_data)
        else:
            train_idx, val_idx = split_holdout(len(dataset), args.val_fraction, args.seed)
            train_set, val_set = torch.utils.data.Subset(dataset, train_idx), torch.utils.data.Subset(dataset, val_idx)
        encoder = build_feature_encoder(config, dataset.image_size, dist_info.device)
        history = train_compressor(train_set, val_set, encoder, FeatureStats.load(args.stats), args.out, hp,
                                   rank=dist_info.rank, world_size=dist_info.world_size, num_workers=args.workers,
                                   val_batch_size=args.batch_size, progress=True, overwrite=args.overwrite)
        if dist_info.is_main and history:
            print(f"compressor after epoch {history[-1]['epoch']}: val loss {history[-1]['val_loss']:.5f}; "
                  f"weights in {Path(args.out) / 'compressor.safetensors'}")
    finally:
        shutdown()
    return 0
