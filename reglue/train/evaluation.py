"""FID during training: every ``train.eval_every`` steps, EMA samples scored against a reference batch.

All ranks sample their share of ``train.eval_samples`` images from the full EMA weights (blocks of
``train.eval_batch_size`` dealt to ranks, as ``reglue generate`` deals them), with the run's
``sample`` section except for the sampler and its step count (``train.eval_sampler``,
``train.eval_steps``: a cheaper setting than the paper's 250-step SDE). Each rank turns its
images into Inception features at once (no image is kept); the statistics are all-reduced and
rank 0 scores them (:mod:`reglue.evaluation.evaluate`). The scores go to ``metrics.jsonl`` as
``eval/<metric>`` rows (TensorBoard and wandb with them) and from there into the run's plot.

Sampling draws from its own seeded generators, and the whole evaluation runs under a forked
global RNG, so a run with evaluation trains exactly as one without. Without ``train.eval_ref``
the evaluation is skipped with one log line saying why.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from typing import Dict, Optional

import torch

from reglue.config import Config
from reglue.runtime import DistInfo, mix_seed

log = logging.getLogger("reglue.train")

_EVAL_SEED_TAG = 0xE7A1  # the evaluation's sample seeds differ from the sample grids' (train.seed)


class TrainingEvaluation:
    """What one run needs to score its EMA samples: the reference batch and the Inception
    network, loaded once at start (so a bad reference fails before training, not hours in)."""

    def __init__(self, config: Config, dist_info: DistInfo):
        self.config, self.dist = config, dist_info
        train = config.train
        self.evaluator = None
        if not train.eval_every:
            return
        if not train.eval_ref:
            log.info("in-training evaluation skipped: train.eval_every=%d but no train.eval_ref (make a reference batch "
                     "with `reglue evaluate --make-ref --data DIR --out REF.npz`, then --set train.eval_ref=REF.npz)",
                     train.eval_every)
            return
        from reglue.evaluation.evaluate import Evaluator

        self.evaluator = Evaluator.from_files(train.eval_ref, train.eval_metrics, inception_weights=train.eval_inception_weights,
                                              device=dist_info.device, is_split_size=min(5000, train.eval_samples))
        if self.evaluator.is_random:
            log.warning("in-training evaluation uses a RANDOM Inception network (train.eval_inception_weights=random): "
                        "its scores check the pipeline, they are not FID")

    @property
    def enabled(self) -> bool:
        return self.evaluator is not None

    def due(self, step: int) -> bool:
        every = self.config.train.eval_every
        return self.enabled and (step % every == 0 or step == self.config.train.max_steps)

    def settings(self):
        """The ``sample`` section with the evaluation's sampler and step count."""
        train = self.config.train
        return dataclasses.replace(self.config.sample, sampler=train.eval_sampler, steps=train.eval_steps)

    def __call__(self, step: int, ema_state: Dict[str, torch.Tensor], vae) -> Optional[Dict]:
        """Collective (every rank, with the full EMA weights): the ``eval/*`` record of ``step`` on
        rank 0, None elsewhere."""
        from reglue.evaluation.generate import BlockPlan, ImageSampler, iter_blocks, label_classes

        cfg, d = self.config, self.dist
        start = time.perf_counter()
        with torch.random.fork_rng(devices=[d.device] if d.device.type == "cuda" else []):
            sampler = ImageSampler.from_state(cfg, ema_state, vae, d.device, self.settings())
            plan = BlockPlan(num=cfg.train.eval_samples, batch_size=cfg.train.eval_batch_size,
                             seed=mix_seed(cfg.train.seed, _EVAL_SEED_TAG), num_classes=label_classes(cfg))
            features = self.evaluator.new_feature_set()
            for _, images, _ in iter_blocks(sampler, plan, plan.share(d.rank, d.world_size)):
                self.evaluator.add_images(features, torch.from_numpy(images))
            del sampler
            features = features.gather(dst=0)
            scores = self.evaluator.score(features) if d.is_main else None
        if not d.is_main:
            return None
        record = {"step": step, **{f"eval/{name}": float(value) for name, value in scores.items()},
                  "eval/samples": cfg.train.eval_samples, "eval/seconds": time.perf_counter() - start}
        if self.evaluator.is_random:
            record["eval/random_inception"] = True
        log.info(scores_line(record, cfg))
        return record


SCORE_EXTRAS = ("samples", "seconds", "random_inception")
"""Keys of an ``eval/*`` score record that describe the evaluation rather than score it."""


def scores_line(record: Dict, config: Config) -> str:
    """The log line of an in-training evaluation ``record`` (a metrics.jsonl row of ``eval/*`` scores)."""
    from reglue.evaluation.metrics import format_score

    train = config.train
    scores = {k[len("eval/"):]: v for k, v in record.items() if k.startswith("eval/") and k[len("eval/"):] not in SCORE_EXTRAS}
    random = "; RANDOM Inception: a pipeline check, not FID" if record.get("eval/random_inception") else ""
    return (f"step {record['step']}: {', '.join(f'{k} {format_score(k, v)}' for k, v in scores.items())} "
            f"({record.get('eval/samples', train.eval_samples)} samples, {train.eval_sampler} {train.eval_steps} steps{random})")
