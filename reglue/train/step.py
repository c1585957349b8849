"""The training step, without a host sync: what happens between two batches.

Per step: the micro-batches' losses are back-propagated (gradients accumulate; FSDP2 reduces them
after the last one), then ONE all-reduce over all ranks carries the loss components, this rank's
share of the squared gradient norm (its shard's, divided by the mesh's replicate degree), and the
stop vote of :mod:`reglue.train.preemption`. A non-finite loss or
gradient norm skips the update on the device: fused AdamW's ``found_inf`` leaves parameters,
moments and step counts as they were, and the EMA's weight becomes 0. Skips are counted on the
device (:class:`SkipCounter`) and read on log and checkpoint steps only, so a run of
``train.max_nonfinite_steps`` skipped steps aborts up to one log window after it happens (the
weights did not change meanwhile). The gradient is clipped only when ``optim.grad_clip`` > 0.

The published recipe's execution (DDP, fp16 grad scaler, a host read every step) is
:mod:`reglue.train.reference`; it shares :func:`micro_batches` and :class:`SkipCounter`.
"""

from __future__ import annotations

from typing import Callable, Dict, Iterator, List, Tuple

import torch

from reglue.runtime import all_reduce_sum
from reglue.train.mesh import ParallelMesh

LossFn = Callable[[Dict[str, torch.Tensor], object, torch.Tensor, int], Dict[str, torch.Tensor]]


def to_device(batch: Dict[str, torch.Tensor], device: torch.device) -> Dict[str, torch.Tensor]:
    """Copy a batch to ``device`` without blocking the host: pinned host tensors copy
    asynchronously; others (DALI's labels) are pinned first, a host-side copy."""
    if device.type != "cuda":
        return batch
    moved = {}
    for key, value in batch.items():
        if value.device != device:
            value = (value if value.is_pinned() else value.pin_memory()).to(device, non_blocking=True)
        moved[key] = value
    return moved


def micro_batches(batch: Dict[str, torch.Tensor], noise, latent_eps: torch.Tensor, offset: int, micro: int,
                  accum: int) -> Iterator[Tuple[bool, Dict[str, torch.Tensor], object, torch.Tensor]]:
    """(is last, micro-batch, its slice of the global noise, of the latent eps) for each of the
    ``accum`` micro-batches of this rank's share, which starts at global sample ``offset``."""
    for m in range(accum):
        lo, hi = m * micro, (m + 1) * micro
        yield (m == accum - 1, {k: v[lo:hi] for k, v in batch.items()},
               noise.slice(offset + lo, offset + hi), latent_eps[offset + lo : offset + hi])


def local_grads(params) -> List[torch.Tensor]:
    """This rank's gradient tensors (the local shard of an FSDP2 DTensor gradient)."""
    return [p.grad.to_local() if hasattr(p.grad, "to_local") else p.grad for p in params if p.grad is not None]


class SkipCounter:
    """Skipped-step counters kept on the device; :meth:`read` (a host sync) on log/checkpoint steps."""

    def __init__(self, device: torch.device, skipped: int = 0):
        self.total = torch.full((), skipped, dtype=torch.int64, device=device)
        self.in_row = torch.zeros((), dtype=torch.int64, device=device)
        self.longest_run = torch.zeros((), dtype=torch.int64, device=device)

    def record(self, skipped: torch.Tensor) -> None:
        """skipped: 0-dim 0/1 tensor of this step."""
        s = skipped.to(torch.int64)
        self.total += s
        self.in_row.mul_(s).add_(s)  # (in_row + 1) if skipped else 0
        torch.maximum(self.longest_run, self.in_row, out=self.longest_run)

    def read(self) -> Tuple[int, int]:
        """(skipped steps in the run, longest run of consecutive skips since the last read)."""
        total, longest = (int(v) for v in torch.stack([self.total, self.longest_run]).tolist())
        self.longest_run.copy_(self.in_row)
        return total, longest


class FastStep:
    """One optimizer step over this rank's share of a global batch; no host syncs."""

    def __init__(self, model, params, optimizer, ema, config, mesh: ParallelMesh, micro_losses: LossFn,
                 vote: Callable[[], torch.Tensor]):
        self.model, self.params, self.optimizer, self.ema = model, params, optimizer, ema
        self.config, self.mesh, self.fsdp = config, mesh, mesh.device_mesh is not None
        self.micro_losses, self.vote = micro_losses, vote

    def __call__(self, step: int, batch, noise, latent_eps, offset: int, micro: int, accum: int
                 ) -> Tuple[Dict[str, torch.Tensor], torch.Tensor]:
        """Returns (step metrics as device scalars: the mean loss components, grad_norm, skipped;
        the stop vote summed over ranks)."""
        optim = self.config.optim
        sums: Dict[str, torch.Tensor] = {}
        for last, micro_batch, micro_noise, micro_eps in micro_batches(batch, noise, latent_eps, offset, micro, accum):
            if self.fsdp:
                self.model.set_requires_gradient_sync(last)
            losses = self.micro_losses(micro_batch, micro_noise, micro_eps, step)
            (losses["total"] / accum).backward()
            for k, v in losses.items():
                sums[k] = sums.get(k, 0) + v.detach().float() / accum
        grads = local_grads(self.params)
        keys = sorted(sums)
        # Each gradient shard lives on the `replicate` ranks that hold the same shard (HSDP): the
        # sum over all ranks counts it that many times.
        squared_norm = torch.stack(torch._foreach_norm(grads)).float().square().sum() / self.mesh.replicate
        reduced = all_reduce_sum(torch.stack([sums[k] for k in keys] + [squared_norm, self.vote()]))
        means = reduced[: len(keys)] / self.mesh.world_size
        grad_norm = reduced[len(keys)].sqrt()
        finite = torch.isfinite(grad_norm) & torch.isfinite(means[keys.index("total")])
        if optim.grad_clip > 0:  # as torch.nn.utils.clip_grad_norm_
            torch._foreach_mul_(grads, (optim.grad_clip / (grad_norm + 1e-6)).clamp(max=1.0))
        self.optimizer.found_inf = (~finite).float()  # fused AdamW: skip the update on the device
        self.optimizer.step()
        self.ema.update(self.config.train.ema_decay, applied=finite)
        self.optimizer.zero_grad(set_to_none=True)
        metrics = dict(zip(keys, means.unbind(0)))
        metrics.update(grad_norm=grad_norm, skipped=(~finite).float())
        return metrics, reduced[-1]
