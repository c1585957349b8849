"""The training loop: one code path for one CPU process, one GPU, or many nodes under torchrun.

Per step: the global batch's indices come from the step counter; all randomness (t, noise,
label dropout, latent sampling) is drawn for the whole global batch from a generator seeded by
(seed, step) and each rank takes its slice, so results do not depend on the world size or on
interruptions. Frozen encoders produce the targets once per micro-batch; gradients accumulate
over micro-batches; a non-finite loss or gradient norm skips the step (:mod:`reglue.train.step`).

Reading order: ``Trainer.__init__`` calls one builder per part (run directory, data, encoders,
model and optimizer, resume, outputs); :meth:`Trainer.fit` runs :meth:`Trainer.run_step` per
batch and stops on a signal (:mod:`reglue.train.preemption`). Hooks: :meth:`Trainer.on_log`,
:meth:`Trainer.on_checkpoint` and :meth:`Trainer.at_end`.
"""

from __future__ import annotations

import contextlib
import logging
import sys
import time
from pathlib import Path
from typing import Dict, List, Optional

import torch
from tqdm import tqdm

from reglue import checkpoint as ckpt
from reglue.config import Config
from reglue.data import build_loader, check_dataset_vae, open_dataset
from reglue.data.sampler import GlobalBatchOrder, sample_indices
from reglue.diffusion.transport import draw_noise
from reglue.outputs import MetricsWriter, ensure_output_dir, read_metrics, removed_on_failure
from reglue.runtime import (DistInfo, barrier, broadcast_object, init_distributed, per_rank_batch, progress_bar, seeded_generator,
                            shutdown)
from reglue.train.ema import EMA
from reglue.train.evaluation import TrainingEvaluation, scores_line
from reglue.train.metrics import class_match_lines, count_flops, device_peak_flops, report_class_match, sit_flops_per_image
from reglue.train.mesh import CollectiveCounter, model_parameters
from reglue.train.parallelize import build_parallel_model, execution_metrics, loss_fn, run_mesh
from reglue.train.plots import dataset_class_names, save_sample_grid, write_run_plot
from reglue.train.preemption import Preempted, StopSignals, StopVote
from reglue.train.reference import ReferenceStep
from reglue.train.rundir import RunPlan, check_resume_config, plan_run
from reglue.train.sampling import sample_from_state, sample_labels
from reglue.train.step import FastStep, SkipCounter, to_device
from reglue.train.targets import FrozenEncoders

log = logging.getLogger("reglue.train")

PLOT_INTERVAL_S = 60.0
"""``metrics.png`` is redrawn at a checkpoint only when its last drawing (or the run's start) is at
least this old: a run that checkpoints every few seconds (a test, the demo) draws it once, at the end."""


class NonFiniteError(RuntimeError):
    """Too many consecutive steps had a non-finite loss or gradient norm."""


def _lr_at(config: Config, step: int) -> float:
    warmup = config.optim.warmup_steps
    return config.optim.lr * min(1.0, (step + 1) / warmup) if warmup else config.optim.lr


def _setup_logging(dist_info: DistInfo) -> None:
    level = logging.INFO if dist_info.is_main else logging.WARNING
    logging.basicConfig(level=level, format=f"[rank{dist_info.rank}] %(asctime)s %(name)s: %(message)s", stream=sys.stderr)


class Trainer:
    def __init__(self, config: Config, dist_info: Optional[DistInfo] = None, overwrite: bool = False):
        self.config = config
        self.dist = dist_info or init_distributed()
        _setup_logging(self.dist)
        self.mesh = run_mesh(config, self.dist)  # first: a shape that does not fit the world stops here
        log.info("%s", self.mesh.describe())
        self.run_dir = Path(config.train.out_dir) / config.train.name
        with removed_on_failure():  # a failed start (bad data, a model that does not build, Ctrl-C) leaves no new run dir
            self.plan = self._plan_run_dir(overwrite)
            self._set_numerics()
            self._build_batching()
            self._build_data()
            self._build_encoders()
            self._build_model()
            self._resume()
            self._build_outputs()

    # ------------------------------------------------------------------------------ builders
    def _plan_run_dir(self, overwrite: bool) -> RunPlan:
        """Rank 0 decides what to do with the run directory (before anything is written) and
        creates it; every rank gets the plan, or the same error."""
        result = None
        if self.dist.is_main:
            try:
                result = plan_run(self.config, self.run_dir, overwrite)
                ensure_output_dir(self.run_dir, "--out/--name")
            except Exception as exc:  # every rank raises it, rather than waiting for rank 0 forever
                result = exc
        result = broadcast_object(result)
        if isinstance(result, Exception):
            raise result
        return result

    def _set_numerics(self) -> None:
        if self.config.train.deterministic:
            torch.use_deterministic_algorithms(True, warn_only=True)
        if self.dist.device.type == "cuda":  # fp32 matmuls (losses, sampling, the published fp32 paths) on tensor cores
            torch.backends.cuda.matmul.allow_tf32 = True
            torch.backends.cudnn.allow_tf32 = True

    def _build_batching(self) -> None:
        train = self.config.train
        self.per_rank = per_rank_batch(train.global_batch_size, self.dist.world_size, "train.global_batch_size")
        self.micro = train.micro_batch_size or self.per_rank
        if self.per_rank % self.micro:
            raise ValueError(f"train.micro_batch_size {self.micro} does not divide the per-rank batch {self.per_rank}")
        self.accum = self.per_rank // self.micro

    def _build_data(self) -> None:
        self.dataset = open_dataset(self.config)
        self.order = GlobalBatchOrder(len(self.dataset), self.config.train.global_batch_size, seed=self.config.train.seed)

    def _build_encoders(self) -> None:
        seed = self.config.train.seed

        def calibration_images(n: int) -> torch.Tensor:  # a seeded sample across the (class-sorted) dataset
            return torch.stack([self.dataset[i][0] for i in sample_indices(len(self.dataset), n, seed)])

        self.frozen = FrozenEncoders(self.config, self.dist.device, self.run_dir, calibration_images, is_main=self.dist.is_main)
        check_dataset_vae(self.dataset, self.config.encoders.vae, self.frozen.vae_sha256)
        if self.config.encoders.precompute_targets:
            self.frozen.precompute(self.dataset)

    def _build_model(self) -> None:
        cfg, d = self.config, self.dist
        self.signals = StopSignals()
        self.stop_vote = StopVote(d.device, self.signals)
        self.reference = cfg.parallel.reference
        self.model = build_parallel_model(cfg, d, self.mesh)
        self.model.train()
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        self.ema = EMA(self.model)
        # Fused AdamW takes the skip decision as a device tensor (found_inf); the reference path
        # keeps the published optimizer (foreach).
        self.optimizer = torch.optim.AdamW(
            self.params, lr=cfg.optim.lr, betas=(cfg.optim.beta1, cfg.optim.beta2), eps=cfg.optim.eps,
            weight_decay=cfg.optim.weight_decay, fused=not self.reference,
        )
        if self.reference:
            self.train_one = ReferenceStep(self.model, self.params, self.optimizer, self.ema, cfg, d.device,
                                           ddp=d.distributed, micro_losses=self._micro_losses, vote=self.stop_vote.flag)
        else:
            self.train_one = FastStep(self.model, self.params, self.optimizer, self.ema, cfg, self.mesh,
                                      micro_losses=self._micro_losses, vote=self.stop_vote.flag)
        # Nothing to count in a world of one; DDP's reducer (reference) calls the process group from C++.
        self.comm_counted = self.reference or not d.distributed
        self.x_shape = (cfg.in_channels, cfg.data.latent_size, cfg.data.latent_size)
        self.flops_per_image = None
        self.peak_flops = device_peak_flops(d.device)

    def _load(self, path: Path) -> Dict:
        state = ckpt.training_state(self.model, self.optimizer, self.ema)
        meta = ckpt.load_checkpoint(path, state)
        ckpt.apply_training_state(self.model, self.optimizer, self.ema, state)
        return meta

    def _resume(self) -> None:
        """Restore the newest checkpoint of the run that loads (or the given one), per the plan."""
        self.step, skipped, found = 0, 0, None
        if self.plan.resume_from == "auto":
            try:
                found = ckpt.load_newest(self.run_dir, self._load, self.dist)
            except ckpt.CheckpointError as exc:
                raise ckpt.CheckpointError(f"{exc}; start over with --overwrite (moves the old run aside)") from None
        elif self.plan.resume_from is not None:
            found = (Path(self.plan.resume_from), self._load(Path(self.plan.resume_from)))
        if found is not None:
            path, meta = found
            check_resume_config(meta["config"], self.config, path)
            self.step, skipped = meta["step"], int(meta.get("skipped_steps", 0))
            log.info("resumed from %s at step %d (saved with world size %s)", path, self.step, meta.get("world_size"))
        self.skips = SkipCounter(self.dist.device, skipped)
        self.last_saved = self.step

    def _build_outputs(self) -> None:
        cfg = self.config
        self.evaluation = TrainingEvaluation(cfg, self.dist)
        self.window: Dict[str, torch.Tensor] = {}
        self.window_steps, self.window_start = 0, time.perf_counter()
        self.plotted_at = time.monotonic()
        self.bar: Optional[tqdm] = None
        if self.dist.is_main:
            tmp = self.run_dir / "config.json.tmp"
            tmp.write_text(cfg.to_json())
            tmp.replace(self.run_dir / "config.json")
            self.metrics = MetricsWriter(self.run_dir / "metrics.jsonl", resume_step=self.step,
                                         tensorboard_dir=self.run_dir / "tb" if cfg.train.tensorboard else None,
                                         wandb_project=cfg.train.wandb_project, run_name=cfg.train.name, config=cfg.to_dict())

    # ------------------------------------------------------------------------------ the step
    def _step_randomness(self, step: int):
        cfg = self.config
        g = seeded_generator(cfg.train.seed, step, device=self.dist.device)
        n = cfg.train.global_batch_size
        noise = draw_noise(
            n, self.x_shape, self.config.encoders.embed_dim if cfg.method.use_cls else 0,
            cfg.model.class_dropout_prob, g, self.dist.device, cfg.method.t_sampling,
            cfg.method.t_lognormal_mean, cfg.method.t_lognormal_std, cfg.method.path,
            semantic_dropout_prob=cfg.method.semantic_dropout_prob,
        )
        latent_eps = torch.randn((n, 4, *self.x_shape[1:]), generator=g, device=self.dist.device)
        return noise, latent_eps

    def _micro_losses(self, batch, noise, latent_eps, step: int) -> Dict[str, torch.Tensor]:
        cfg = self.config
        targets = self.frozen.targets(batch, latent_eps)
        losses = loss_fn(cfg, self.dist.device)(
            self.model, targets["latents"], batch["label"], noise,
            semantic=targets["semantic"], cls=targets["cls"], align_targets=targets["align"],
            path=cfg.method.path, semantic_weight=cfg.method.semantic_weight(step),
            cls_weight=cfg.method.lambda_cls, align_weight=cfg.method.lambda_align,
        )
        if step in cfg.train.inject_nonfinite_steps:
            losses["total"] = losses["total"] * float("nan")
        return losses

    def train_step(self, step: int, batch: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
        """One optimizer step over this rank's share of global batch ``step``; device scalars out."""
        for group in self.optimizer.param_groups:
            group["lr"] = _lr_at(self.config, step)
        noise, latent_eps = self._step_randomness(step)
        with CollectiveCounter(self.mesh) if not self.comm_counted else contextlib.nullcontext() as counter:
            metrics, stop_votes = self.train_one(step, to_device(batch, self.dist.device), noise, latent_eps,
                                                 self.dist.rank * self.per_rank, self.micro, self.accum)
        if counter is not None:
            self._log_collectives(step, counter)
        self.stop_vote.publish(stop_votes)
        self.skips.record(metrics["skipped"])
        return metrics

    def _log_collectives(self, step: int, counter: CollectiveCounter) -> None:
        """Once per process, after its first step: what that step's collectives moved, per rank."""
        self.comm_counted = True
        num_params = model_parameters(self.model)
        log.info("step %d on the %s: %s", step + 1, self.mesh.describe(), counter.describe(num_params))
        if self.dist.is_main:
            self.metrics.write({"step": step + 1, "mesh": self.mesh.summary(), "params": num_params,
                                "collectives_per_rank_per_step": counter.record(num_params)})

    def _count_flops(self, batch, latent_eps) -> float:
        """Training FLOPs per image: frozen encoders forward + SiT forward and backward.

        The SiT part is counted on a meta-device copy (shapes only), so compiled, sharded or
        wrapped training models are never touched by the counter."""
        one = {k: v[:1] for k, v in batch.items() if k != "index"}  # run the encoders, precomputed or not
        return float(count_flops(lambda: self.frozen.targets(one, latent_eps[:1])) + sit_flops_per_image(self.config))

    # ------------------------------------------------------------------------------ the loop
    def fit(self) -> Path:
        """Train to ``train.max_steps``; on SIGTERM/SIGINT/SIGUSR1 save and raise :class:`Preempted`."""
        cfg, d = self.config, self.dist
        end = cfg.train.max_steps
        if self.step >= end:
            if d.is_main:
                log.info("%s is complete (step %d of %d); its results:", self.run_dir, self.step, end)
                for line in self.result_lines():
                    log.info(line)
            return self.run_dir
        batches = build_loader(cfg, self.dataset, self.order, d.rank, d.world_size, self.step, end, d.device)
        self.stop_vote.reset()
        with self.signals, progress_bar(d.is_main, total=end, initial=self.step, desc=cfg.train.name) as self.bar:
            for batch in batches:
                self.run_step(batch)
                self.bar.update(1)
                if self.stop_vote.agreed() and self.step < end:  # at the end, finishing is the quicker way out
                    self._stop()
        self.at_end()
        return self.run_dir

    def run_step(self, batch: Dict[str, torch.Tensor]) -> None:
        """One step and what is due after it: the log line, a checkpoint, a sample grid."""
        cfg, end = self.config.train, self.config.train.max_steps
        if self.flops_per_image is None:
            _, latent_eps = self._step_randomness(self.step)
            self.flops_per_image = self._count_flops(batch, latent_eps[self.dist.rank * self.per_rank :])
            self.window_start = time.perf_counter()
        out = self.train_step(self.step, batch)
        self.step += 1
        for k, v in out.items():
            self.window[k] = self.window.get(k, 0) + v
        self.window_steps += 1
        if self.step % cfg.log_every == 0 or self.step == end:
            self.on_log(self._record())
        if self.evaluation.due(self.step):
            self.evaluate()
        if self.step % cfg.ckpt_every == 0 or self.step == end:
            self.on_checkpoint(self.save())
        if cfg.sample_every and self.step % cfg.sample_every == 0 and self.step != end:
            self._write_samples(f"{self.step:08d}")

    def _stop(self) -> None:
        """All ranks: log the partial window, save at this step, raise :class:`Preempted`."""
        if self.window_steps:
            self.on_log(self._record())
        path = self.save() if self.last_saved != self.step else ckpt.checkpoint_dir(self.run_dir) / f"step-{self.step:08d}"
        why = self.signals.received.name if self.signals.received else "a signal on another rank"
        barrier()
        raise Preempted(f"stopped at step {self.step} on {why}; checkpoint {path}; "
                        "run the same command again (--resume auto) to continue")

    def _read_skips(self) -> int:
        """The skipped-step counters (a host sync: log and checkpoint steps only); raises
        :class:`NonFiniteError` after ``train.max_nonfinite_steps`` consecutive skips."""
        skipped, longest_run = self.skips.read()
        if longest_run >= self.config.train.max_nonfinite_steps:
            raise NonFiniteError(
                f"{longest_run} consecutive steps (noticed at step {self.step}) had a non-finite loss or gradient norm; "
                "aborting. The last good checkpoint is intact: lower optim.lr, check the data, or resume with --resume auto."
            )
        return skipped

    def _record(self) -> Dict:
        """The log line of the steps since the last one (reads the device counters: a host sync)."""
        cfg, d = self.config, self.dist
        window, steps = dict(self.window), self.window_steps
        elapsed = time.perf_counter() - self.window_start
        img_s = steps * cfg.train.global_batch_size / max(elapsed, 1e-9)
        skipped_in_window = int(window.pop("skipped", 0))
        record = {"step": self.step, "lr": _lr_at(cfg, self.step - 1), "img_per_s": img_s, "img_per_s_per_device": img_s / d.world_size,
                  "skipped_steps": self._read_skips(), "skipped_in_window": skipped_in_window,
                  "grad_norm": float(window.pop("grad_norm")) / steps}
        if skipped_in_window:
            log.warning("steps %d-%d: %d skipped for a non-finite loss or gradient norm", self.step - steps + 1, self.step,
                        skipped_in_window)
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
        record.update(execution_metrics(self.config, d.device))
        self.window, self.window_steps, self.window_start = {}, 0, time.perf_counter()
        return record

    # ------------------------------------------------------------------------------ outputs and hooks
    @property
    def skipped_steps(self) -> int:
        """Steps skipped so far in the run (reads the device counter)."""
        return int(self.skips.total)

    def save(self) -> Path:
        """Collective: a checkpoint at the current step (model, optimizer, EMA, counters)."""
        cfg = self.config
        meta = {"config": cfg.to_dict(), "run_id": self.plan.run_id, "skipped_steps": self._read_skips(),
                "data_position": {"step": self.step, "samples_seen": self.step * cfg.train.global_batch_size}}
        path = ckpt.save_checkpoint(self.run_dir, self.step, ckpt.training_state(self.model, self.optimizer, self.ema),
                                    meta, self.dist, cfg.train.keep_last)
        self.last_saved = self.step
        return path

    def on_log(self, record: Dict) -> None:
        """All ranks, every ``train.log_every`` steps: rank 0 writes the record."""
        if self.dist.is_main:
            self.metrics.write(record)
            if self.bar is not None:
                self.bar.set_postfix(loss=f"{record['loss/total']:.4f}", img_s=f"{record['img_per_s']:.1f}")

    def evaluate(self) -> None:
        """Collective: score EMA samples of this step (``train.eval_*``); rank 0 logs the scores."""
        record = self.evaluation(self.step, self.ema.full_state_dict(), self.frozen.vae)
        if record is not None:
            self.metrics.write(record)

    def on_checkpoint(self, path: Path) -> None:
        """All ranks, after each checkpoint is complete: rank 0 redraws the run's plot when the last
        drawing (or the start) is :data:`PLOT_INTERVAL_S` old, except at the last step, where
        :meth:`at_end` draws it a moment later with the run's results in it. A plot costs about a
        second of rank 0's time on a CPU, which the other ranks wait for at the next step."""
        if (self.dist.is_main and self.config.train.metrics_plot and self.step != self.config.train.max_steps
                and time.monotonic() - self.plotted_at >= PLOT_INTERVAL_S):
            write_run_plot(self.run_dir)
            self.plotted_at = time.monotonic()

    def at_end(self) -> None:
        """All ranks, after the last step (and its checkpoint): final samples, the class-match lines
        (datasets with fixed classifiers: the synthetic demo set's hue and shape) and the run's plot."""
        final = self._write_samples("final")
        if self.dist.is_main:
            class_match = report_class_match(self.dataset, *final, self.metrics, self.step)
            if self.config.train.metrics_plot:
                write_run_plot(self.run_dir)
            log.info("done: %s", self.run_dir)
            for line in class_match:
                log.info(line)
        barrier()

    def result_lines(self) -> List[str]:
        """The result lines of the run's last step (the class match, in-training scores), read back
        from the ``eval/*`` rows of its metrics.jsonl (rank 0)."""
        rows = [r for r in read_metrics(self.metrics.path) if r.get("step") == self.step and any(k.startswith("eval/") for k in r)]
        lines = []
        for row in rows:
            if "eval/class_match" in row:
                shares = {"hue": row["eval/class_match"]}
                if "eval/shape_match" in row:  # rows of runs from before the shape check have none
                    shares["shape"] = row["eval/shape_match"]
                lines.extend(class_match_lines(shares, sample_labels(self.config, self.config.train.num_sample_images)))
            else:
                lines.append(scores_line(row, self.config))
        return lines

    def sample_images(self, num: int, seed: int) -> Optional[torch.Tensor]:
        """EMA samples as uint8 (num, 3, H, W) on rank 0 (None elsewhere); collective."""
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
        return None


def run(config: Config, overwrite: bool = False) -> Path:
    """Train ``config`` to ``train.max_steps`` (resuming per ``train.resume``); returns the run dir.
    The process group is taken down at the end (its threads must not outlive the interpreter)."""
    try:
        return Trainer(config, overwrite=overwrite).fit()
    finally:
        shutdown()
