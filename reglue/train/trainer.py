"""The training loop: one code path for one CPU process, one GPU, or many nodes under torchrun.

Per step: the global batch's indices come from the step counter; all randomness (t, noise,
label dropout, latent sampling) is drawn for the whole global batch from a generator seeded by
(seed, step) and each rank takes its slice, so results do not depend on the world size or on
interruptions. Frozen encoders produce the targets once per micro-batch; gradients accumulate
over micro-batches; a non-finite loss or gradient norm skips the step.
"""

from __future__ import annotations

import contextlib
import json
import logging
import sys
import time
from pathlib import Path
from typing import Dict, Optional

import torch
from tqdm import tqdm

from reglue.config import Config
from reglue.data import build_loader, open_dataset
from reglue.diffusion.transport import draw_noise, training_losses
from reglue import checkpoint as ckpt
from reglue.runtime import DistInfo, all_reduce_mean, barrier, init_distributed, per_rank_batch, seeded_generator
from reglue.train.ema import EMA
from reglue.train.metrics import MetricsWriter, count_flops, device_peak_flops, report_class_match
from reglue.train.plots import dataset_class_names, save_sample_grid, write_run_plot
from reglue.train.sampling import sample_labels
from reglue.train.parallelize import build_parallel_model, use_fsdp
from reglue.train.targets import FrozenEncoders

log = logging.getLogger("reglue.train")

# Sections that must match when resuming: they change what the weights mean, or (seed, global
# batch) which samples and noise each step draws.
_RESUME_LOCKED = ("model", "method", "encoders")
_RESUME_LOCKED_FIELDS = (("train", "seed"), ("train", "global_batch_size"), ("data", "image_size"))


class NonFiniteError(RuntimeError):
    """Too many consecutive steps had a non-finite loss or gradient norm."""


def _check_resume_config(saved: Dict, config: Config, path) -> None:
    current = config.to_dict()
    fields = [(section, k) for section in _RESUME_LOCKED for k in current[section]
              if k not in ("kernels", "attention", "dtype")] + list(_RESUME_LOCKED_FIELDS)
    same = lambda a, b: json.loads(json.dumps(a)) == json.loads(json.dumps(b))  # noqa: E731  (tuples vs lists)
    diffs = [
        f"{section}.{k}: checkpoint {saved[section].get(k)!r} vs now {current[section][k]!r}"
        for section, k in fields
        if section in saved and not same(saved[section].get(k), current[section][k])
    ]
    if diffs:
        raise ckpt.CheckpointError(f"cannot resume from {path}: the run's settings changed: " + "; ".join(diffs)
                                   + " (start a new run with another --name, or --resume none)")


def _lr_at(config: Config, step: int) -> float:
    warmup = config.optim.warmup_steps
    return config.optim.lr * min(1.0, (step + 1) / warmup) if warmup else config.optim.lr


def _setup_logging(dist_info: DistInfo) -> None:
    level = logging.INFO if dist_info.is_main else logging.WARNING
    logging.basicConfig(level=level, format=f"[rank{dist_info.rank}] %(asctime)s %(name)s: %(message)s", stream=sys.stderr)


class Trainer:
    def __init__(self, config: Config, dist_info: Optional[DistInfo] = None):
        self.config = config
        self.dist = dist_info or init_distributed()
        _setup_logging(self.dist)
        cfg, d = config, self.dist
        self.run_dir = Path(cfg.train.out_dir) / cfg.train.name
        self.per_rank = per_rank_batch(cfg.train.global_batch_size, d.world_size, "train.global_batch_size")
        self.micro = cfg.train.micro_batch_size or self.per_rank
        if self.per_rank % self.micro:
            raise ValueError(f"train.micro_batch_size {self.micro} does not divide the per-rank batch {self.per_rank}")
        self.accum = self.per_rank // self.micro
        if cfg.train.deterministic:
            torch.use_deterministic_algorithms(True, warn_only=True)
        if d.device.type == "cuda":  # fp32 matmuls (losses, sampling, the published fp32 paths) on tensor cores
            torch.backends.cuda.matmul.allow_tf32 = True
            torch.backends.cudnn.allow_tf32 = True

        self.dataset = open_dataset(cfg)
        from reglue.data.sampler import GlobalBatchOrder

        self.order = GlobalBatchOrder(len(self.dataset), cfg.train.global_batch_size, seed=cfg.train.seed)
        from reglue.data.sampler import sample_indices

        # a seeded sample across the dataset: prepared datasets are sorted by class
        calib = lambda n: torch.stack([self.dataset[i][0] for i in sample_indices(len(self.dataset), n, cfg.train.seed)])  # noqa: E731
        self.frozen = FrozenEncoders(cfg, d.device, self.run_dir, calib, is_main=d.is_main)

        self.reference = cfg.parallel.reference
        self.fsdp = use_fsdp(d) and not self.reference
        self.ddp = self.reference and d.distributed
        self.model = build_parallel_model(cfg, d)
        self.model.train()
        # The published recipe trains in fp16 autocast with a loss scaler (CUDA only).
        self.scaler = torch.amp.GradScaler("cuda") if (self.reference and d.device.type == "cuda") else None
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        self.ema = EMA(self.model)
        self.optimizer = torch.optim.AdamW(
            self.params, lr=cfg.optim.lr, betas=(cfg.optim.beta1, cfg.optim.beta2), eps=cfg.optim.eps,
            weight_decay=cfg.optim.weight_decay, fused=d.device.type == "cuda",
        )
        self.step = 0
        self.nonfinite_in_row = 0
        self.skipped_steps = 0
        resume = ckpt.resolve_resume(cfg.train.resume, self.run_dir, d)
        if resume is not None:
            meta = ckpt.read_meta(resume)
            _check_resume_config(meta.get("config", {}), cfg, resume)
            ckpt.load_checkpoint(resume, self.model, self.optimizer, self.ema)
            self.step = int(meta["step"])
            self.skipped_steps = int(meta.get("skipped_steps", 0))
            log.info("resumed from %s at step %d (saved with world size %s)", resume, self.step, meta.get("world_size"))
        if d.is_main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            (self.run_dir / "config.json").write_text(cfg.to_json())
            self.metrics = MetricsWriter(self.run_dir / "metrics.jsonl", resume_step=self.step,
                                         tensorboard_dir=self.run_dir / "tb" if cfg.train.tensorboard else None,
                                         wandb_project=cfg.train.wandb_project, run_name=cfg.train.name, config=cfg.to_dict())
        self.x_shape = (cfg.in_channels, cfg.data.latent_size, cfg.data.latent_size)
        self.flops_per_image = None
        self.peak_flops = device_peak_flops(d.device)

    # ---------------------------------------------------------------------------------------
    def _step_randomness(self, step: int):
        cfg = self.config
        g = seeded_generator(cfg.train.seed, step, device=self.dist.device)
        n = cfg.train.global_batch_size
        noise = draw_noise(
            n, self.x_shape, self.config.encoders.embed_dim if cfg.method.use_cls else 0,
            cfg.model.class_dropout_prob, g, self.dist.device, cfg.method.t_sampling,
            cfg.method.t_lognormal_mean, cfg.method.t_lognormal_std, cfg.method.path,
        )
        latent_eps = torch.randn((n, 4, *self.x_shape[1:]), generator=g, device=self.dist.device)
        return noise, latent_eps

    def _micro_losses(self, batch, noise, latent_eps, step: int) -> Dict[str, torch.Tensor]:
        cfg = self.config
        targets = self.frozen.targets(batch, latent_eps)
        return training_losses(
            self.model, targets["latents"], batch["label"].to(self.dist.device), noise,
            semantic=targets["semantic"], cls=targets["cls"], align_targets=targets["align"],
            path=cfg.method.path, semantic_weight=cfg.method.semantic_weight(step),
            cls_weight=cfg.method.lambda_cls, align_weight=cfg.method.lambda_align,
        )

    def _count_flops(self, batch, latent_eps) -> float:
        """Training FLOPs per image: frozen encoders forward + SiT forward and backward.

        The SiT part is counted on a meta-device copy (shapes only), so compiled, sharded or
        wrapped training models are never touched by the counter."""
        from reglue.models import build_model

        one = {k: v[:1] for k, v in batch.items()}
        encoders = count_flops(lambda: self.frozen.targets(one, latent_eps[:1]))
        with torch.device("meta"):
            model = build_model(self.config, kernels="eager")
            x = torch.zeros(1, *self.x_shape)
            cls = torch.zeros(1, model.cls_token_dim) if model.cls_token_dim else None
            t, y = torch.zeros(1), torch.zeros(1, dtype=torch.long)

        def fwd_bwd():
            out, zs, cls_out = model(x, t, y, cls)
            loss = out.sum() + sum(z.sum() for z in zs) + (cls_out.sum() if cls_out is not None else 0)
            loss.backward()

        return float(encoders + count_flops(fwd_bwd))

    def train_step(self, step: int, batch: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
        """One optimizer step over this rank's share of global batch ``step``."""
        cfg, d = self.config, self.dist
        for group in self.optimizer.param_groups:
            group["lr"] = _lr_at(cfg, step)
        noise, latent_eps = self._step_randomness(step)
        offset = d.rank * self.per_rank
        sums: Dict[str, torch.Tensor] = {}
        for m in range(self.accum):
            lo, hi = m * self.micro, (m + 1) * self.micro
            last = m == self.accum - 1
            micro_batch = {k: v[lo:hi] for k, v in batch.items()}
            if self.fsdp:
                self.model.set_requires_gradient_sync(last)
            with (self.model.no_sync() if (self.ddp and not last) else contextlib.nullcontext()):
                with torch.autocast(d.device.type, dtype=torch.float16, enabled=self.scaler is not None):
                    losses = self._micro_losses(micro_batch, noise.slice(offset + lo, offset + hi),
                                                latent_eps[offset + lo : offset + hi], step)
                if step in cfg.train.inject_nonfinite_steps:
                    losses["total"] = losses["total"] * float("nan")
                loss = losses["total"] / self.accum
                (self.scaler.scale(loss) if self.scaler else loss).backward()
            for k, v in losses.items():
                sums[k] = sums.get(k, 0) + v.detach() / self.accum
            if self.reference:  # the published loop reads every loss on the host each step
                _ = {k: v.item() for k, v in losses.items()}
        if self.scaler:
            self.scaler.unscale_(self.optimizer)
        max_norm = cfg.optim.grad_clip if cfg.optim.grad_clip > 0 else float("inf")
        grad_norm = torch.nn.utils.clip_grad_norm_(self.params, max_norm)
        if hasattr(grad_norm, "full_tensor"):
            grad_norm = grad_norm.full_tensor()
        keys = sorted(sums)  # one all-reduce for every loss component
        sums = dict(zip(keys, all_reduce_mean(torch.stack([sums[k].float() for k in keys])).unbind(0)))
        finite = bool(torch.isfinite(grad_norm) and torch.isfinite(sums["total"]))
        if self.scaler:  # fp16 overflow is the scaler's business: it skips the step and lowers the scale
            finite = bool(torch.isfinite(sums["total"]))
        if finite:
            if self.scaler:
                self.scaler.step(self.optimizer)
                self.scaler.update()
            else:
                self.optimizer.step()
            self.ema.update(cfg.train.ema_decay)
            self.nonfinite_in_row = 0
        else:
            self.nonfinite_in_row += 1
            self.skipped_steps += 1
            log.warning("step %d: non-finite loss %.4g or grad norm %.4g; step skipped (%d in a row)",
                        step, float(sums["total"]), float(grad_norm), self.nonfinite_in_row)
        self.optimizer.zero_grad(set_to_none=True)
        if self.nonfinite_in_row >= cfg.train.max_nonfinite_steps:
            raise NonFiniteError(
                f"{self.nonfinite_in_row} consecutive steps (up to step {step}) had a non-finite loss or gradient norm; "
                "aborting. The last good checkpoint is intact: lower optim.lr, check the data, or resume with --resume auto."
            )
        sums["grad_norm"] = grad_norm.detach()
        sums["skipped"] = torch.tensor(0.0 if finite else 1.0)
        return sums

    # ---------------------------------------------------------------------------------------
    def save(self) -> Path:
        meta = {"config": self.config.to_dict(), "data_position": {"step": self.step, "samples_seen": self.step * self.config.train.global_batch_size},
                "skipped_steps": self.skipped_steps}
        path = ckpt.save_checkpoint(self.run_dir, self.step, self.model, self.optimizer, self.ema, meta, self.dist, self.config.train.keep_last)
        if self.dist.is_main:
            write_run_plot(self.run_dir)
        return path

    def sample_images(self, num: int, seed: int) -> Optional[torch.Tensor]:
        """EMA samples as uint8 (num, 3, H, W) on rank 0 (None elsewhere); collective."""
        from reglue.train.sampling import sample_from_state

        state = self.ema.full_state_dict(keep=self.dist.is_main)
        if not self.dist.is_main:
            return None
        return sample_from_state(self.config, state, self.frozen.vae, self.dist.device, num, seed)

    def _write_samples(self, tag: str):
        """The EMA sample grid ``samples-TAG.png``; returns (images, labels) on rank 0, else None."""
        images = self.sample_images(self.config.train.num_sample_images, self.config.train.seed)
        if images is not None:
            labels = sample_labels(self.config, len(images))
            save_sample_grid(images, self.run_dir / f"samples-{tag}.png", labels, dataset_class_names(self.dataset))
            return images, labels

    def fit(self) -> Path:
        cfg, d = self.config, self.dist
        end = cfg.train.max_steps
        if self.step >= end:
            log.info("nothing to do: the run is at step %d of %d", self.step, end)
            return self.run_dir
        batches = build_loader(cfg, self.dataset, self.order, d.rank, d.world_size, self.step, end, d.device)
        bar = tqdm(total=end, initial=self.step, disable=not d.is_main, desc=cfg.train.name, dynamic_ncols=True)
        window: Dict[str, torch.Tensor] = {}
        window_steps, t0 = 0, time.perf_counter()
        last_saved = self.step
        for batch in batches:
            step = self.step
            if self.flops_per_image is None:
                _, latent_eps = self._step_randomness(step)
                self.flops_per_image = self._count_flops(batch, latent_eps[d.rank * self.per_rank :])
                t0 = time.perf_counter()
            out = self.train_step(step, batch)
            self.step = step + 1
            for k, v in out.items():
                window[k] = window.get(k, 0) + v
            window_steps += 1
            bar.update(1)
            if self.step % cfg.train.log_every == 0 or self.step == end:
                elapsed = time.perf_counter() - t0
                record = self._record(window, window_steps, elapsed)
                if d.is_main:
                    self.metrics.write(record)
                    bar.set_postfix(loss=f"{record['loss/total']:.4f}", img_s=f"{record['img_per_s']:.1f}")
                window, window_steps, t0 = {}, 0, time.perf_counter()
            if self.step % cfg.train.ckpt_every == 0 or self.step == end:
                self.save()
                last_saved = self.step
            if cfg.train.sample_every and self.step % cfg.train.sample_every == 0 and self.step != end:
                self._write_samples(f"{self.step:08d}")
        bar.close()
        if last_saved != self.step:
            self.save()
        final = self._write_samples("final")
        if d.is_main:
            class_match = report_class_match(self.dataset, *final, self.metrics, self.step)
            write_run_plot(self.run_dir)
            log.info("done: %s", self.run_dir)
            if class_match:
                log.info(class_match)
        barrier()
        return self.run_dir

    def _record(self, window, steps: int, elapsed: float) -> Dict:
        cfg, d = self.config, self.dist
        images = steps * cfg.train.global_batch_size
        img_s = images / max(elapsed, 1e-9)
        window = dict(window)
        record = {"step": self.step, "lr": _lr_at(cfg, self.step - 1), "img_per_s": img_s, "img_per_s_per_device": img_s / d.world_size,
                  "skipped_steps": self.skipped_steps, "skipped_in_window": int(window.pop("skipped", 0)),
                  "grad_norm": float(window.pop("grad_norm")) / steps}
        record.update({f"loss/{k}": float(v) / steps for k, v in window.items()})
        if self.flops_per_image:
            record["tflops_per_device"] = self.flops_per_image * img_s / d.world_size / 1e12
            if self.peak_flops:
                record["mfu"] = self.flops_per_image * img_s / d.world_size / self.peak_flops
        if d.device.type == "cuda":
            record["peak_mem_gib"] = torch.cuda.max_memory_allocated(d.device) / 2**30
        else:
            import resource

            record["peak_rss_gib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
        if cfg.parallel.compile:
            from torch._dynamo.utils import counters

            record["compiled_graphs"] = int(counters["stats"]["unique_graphs"])
        return record


def run(config: Config) -> Path:
    """Train ``config`` to ``train.max_steps`` (resuming per ``train.resume``); returns the run dir."""
    trainer = Trainer(config)
    return trainer.fit()
