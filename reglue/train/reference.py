"""The published recipe's execution, kept for comparison (``parallel.reference``, ``--reference``).

As REPA/REGLUE's ``train.py`` runs it: DDP when several ranks train (gradient sync skipped on all
but the last micro-batch), fp16 autocast with a loss scaler on CUDA, torch's AdamW (foreach) and
``clip_grad_norm_``, and every loss read on the host every step. The skip of a non-finite step is
decided on the host. The fast path is :class:`reglue.train.step.FastStep`.
"""

from __future__ import annotations

import contextlib
from typing import Callable, Dict, Tuple

import torch

from reglue.runtime import all_reduce_mean
from reglue.train.step import LossFn, micro_batches


class ReferenceStep:
    def __init__(self, model, params, optimizer, ema, config, device: torch.device, ddp: bool, micro_losses: LossFn,
                 vote: Callable[[], torch.Tensor]):
        self.model, self.params, self.optimizer, self.ema = model, params, optimizer, ema
        self.config, self.device, self.ddp = config, device, ddp
        self.micro_losses, self.vote = micro_losses, vote
        # The published recipe trains in fp16 autocast with a loss scaler (CUDA only).
        self.scaler = torch.amp.GradScaler("cuda") if device.type == "cuda" else None

    def __call__(self, step: int, batch, noise, latent_eps, offset: int, micro: int, accum: int
                 ) -> Tuple[Dict[str, torch.Tensor], torch.Tensor]:
        sums: Dict[str, torch.Tensor] = {}
        for last, micro_batch, micro_noise, micro_eps in micro_batches(batch, noise, latent_eps, offset, micro, accum):
            with (self.model.no_sync() if (self.ddp and not last) else contextlib.nullcontext()):
                with torch.autocast(self.device.type, dtype=torch.float16, enabled=self.scaler is not None):
                    losses = self.micro_losses(micro_batch, micro_noise, micro_eps, step)
                loss = losses["total"] / accum
                (self.scaler.scale(loss) if self.scaler else loss).backward()
            for k, v in losses.items():
                sums[k] = sums.get(k, 0) + v.detach().float() / accum
            _ = {k: v.item() for k, v in losses.items()}  # the published loop reads every loss each step
        if self.scaler:
            self.scaler.unscale_(self.optimizer)
        clip = self.config.optim.grad_clip
        grad_norm = torch.nn.utils.clip_grad_norm_(self.params, clip if clip > 0 else float("inf"))
        keys = sorted(sums)
        reduced = all_reduce_mean(torch.stack([sums[k] for k in keys] + [self.vote()]))
        total = reduced[keys.index("total")]
        # fp16 overflow is the scaler's business: it skips the step and lowers the scale
        finite = bool(torch.isfinite(total)) and (self.scaler is not None or bool(torch.isfinite(grad_norm)))
        if finite:
            if self.scaler:
                self.scaler.step(self.optimizer)
                self.scaler.update()
            else:
                self.optimizer.step()
            self.ema.update(self.config.train.ema_decay)
        self.optimizer.zero_grad(set_to_none=True)
        metrics = dict(zip(keys, reduced[: len(keys)].unbind(0)))
        metrics.update(grad_norm=grad_norm.detach(), skipped=torch.tensor(0.0 if finite else 1.0, device=self.device))
        return metrics, reduced[-1]
