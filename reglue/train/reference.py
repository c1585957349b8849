"""The published recipe's execution, kept for comparison (``parallel.reference``, ``--reference``).

What each published ``train.py`` runs, and what this module reproduces on CUDA (the CPU runs the
same loop in fp32: the published fp16 path is CUDA-only):

- Precision, ``parallel.reference_precision`` (each preset sets its recipe's):
  ``fp16`` (REPA, REG, REGLUE: accelerate ``--mixed-precision fp16``, their ``train.sh``/README):
  the model's forward under fp16 autocast with its outputs converted to fp32, as accelerate's
  ``prepare`` wraps it (so the loss is computed in fp32 outside autocast; :func:`autocast_forward`),
  a ``GradScaler`` with torch's defaults, and the frozen DINOv2 (and REGLUE's compressor, not
  BN-folded, no Triton) under the same fp16 autocast with fp32 weights
  (``with accelerator.autocast()`` around the encoders: REPA ``train.py`` L298, REG L301, REGLUE
  L306; ``reglue.train.targets``). ``fp32`` (SiT ``train.py``, ReDi ``train_redi.py``): no
  autocast and no scaler anywhere, DINOv2 in fp32. TF32 matmuls in both (SiT/ReDi set them at
  import, L9-10; REPA/REG/REGLUE with ``--allow-tf32``), as the trainer sets on CUDA.
- DDP when several ranks train (gradient sync skipped on all but the last micro-batch), with
  ``find_unused_parameters`` as published (:data:`PUBLISHED_FIND_UNUSED_PARAMETERS`).
- torch's AdamW (foreach) and ``clip_grad_norm_`` after unscaling; every loss read on the host
  every step.
- A non-finite step. fp16: exactly accelerate's ``optimizer.step()`` (``optimizer.py``
  ``AcceleratedOptimizer.step``): ``scaler.step`` skips the update when the unscaled gradients
  hold an inf or NaN (a NaN loss makes NaN gradients), ``scaler.update()`` halves the scale,
  and the published loop updates the EMA anyway (``update_ema`` runs on every synced step:
  REPA ``train.py`` L321-322, REG L332-333, REGLUE L369-370), towards the unchanged weights. A
  step is counted as skipped when the scaler skipped it (its scale went down, accelerate's own
  test). fp32: the published loops have no guard (``loss.backward(); opt.step();
  update_ema(...)``: SiT ``train.py`` L252-254, ReDi ``train_redi.py`` L338-340), so a NaN would
  be written into the weights and the EMA; here the step is skipped instead, the optimizer and
  the EMA both left as they were, decided on the host. In both, ``train.max_nonfinite_steps``
  consecutive skipped steps abort the run (a guard the published code does not have).

Sample grids and in-training evaluation of a reference run are drawn as the published
``generate.py`` draws them: fp32 with TF32 matmuls, SDPA attention, an fp32 VAE
(``reglue.evaluation.generate.ImageSampler.from_state``). The fast path is
:class:`reglue.train.step.FastStep`.
"""

from __future__ import annotations

import contextlib
from typing import Callable, Dict, Optional, Tuple

import torch
import torch.nn as nn

from reglue.runtime import all_reduce_mean
from reglue.train.step import LossFn, micro_batches

PUBLISHED_FIND_UNUSED_PARAMETERS = {"sit": False, "repa": False, "redi": False, "reg": True, "reglue": True}
"""DDP ``find_unused_parameters`` of each published loop (speed only: every parameter of our SiT is
used). REG ``train.py`` L134 and REGLUE ``train.py`` L132 pass
``DistributedDataParallelKwargs(find_unused_parameters=True)``; REPA (accelerate's default), SiT
``train.py`` L168 and ReDi ``train_redi.py`` L212 keep DDP's default, False."""


def reference_autocast_dtype(config, device: torch.device) -> Optional[torch.dtype]:
    """The autocast dtype of a ``--reference`` run's model and frozen encoders on ``device``:
    float16 for a ``parallel.reference_precision`` fp16 recipe on CUDA; None (fp32) otherwise."""
    fp16 = config.parallel.reference_precision == "fp16" and torch.device(device).type == "cuda"
    return torch.float16 if fp16 else None


def _outputs_to_fp32(value):
    """fp16/bf16 tensors in a (nested) tuple or list of outputs -> fp32, as accelerate's
    ``convert_outputs_to_fp32``; anything else as it is."""
    if isinstance(value, torch.Tensor):
        return value.float() if value.dtype in (torch.float16, torch.bfloat16) else value
    if isinstance(value, (tuple, list)):
        return type(value)(_outputs_to_fp32(v) for v in value)
    return value


def autocast_forward(model: nn.Module, device_type: str, dtype: torch.dtype) -> nn.Module:
    """Make ``model``'s forward run under autocast in ``dtype`` and return fp32 outputs: what
    accelerate's ``prepare`` does to a model under ``--mixed-precision`` (before wrapping it in DDP).

    Done with forward hooks, so parameters and state-dict keys stay the model's own; the
    post-hook runs even when the forward raises, so autocast never leaks out of a failed call."""
    entered = []

    def enter(module, args):
        context = torch.autocast(device_type, dtype=dtype)
        context.__enter__()
        entered.append(context)

    def leave(module, args, output):
        entered.pop().__exit__(None, None, None)
        return _outputs_to_fp32(output)

    model.register_forward_pre_hook(enter)
    model.register_forward_hook(leave, always_call=True)
    return model


class ReferenceStep:
    """One optimizer step as the published loop runs it (see the module docstring)."""

    def __init__(self, model, params, optimizer, ema, config, device: torch.device, ddp: bool, micro_losses: LossFn,
                 vote: Callable[[], torch.Tensor]):
        self.model, self.params, self.optimizer, self.ema = model, params, optimizer, ema
        self.config, self.device, self.ddp = config, device, ddp
        self.micro_losses, self.vote = micro_losses, vote
        # accelerate's GradScaler (torch's defaults) goes with fp16 autocast; the model autocasts
        # its own forward (autocast_forward, applied by reglue.train.parallelize).
        fp16 = reference_autocast_dtype(config, device) is not None
        self.scaler: Optional[torch.amp.GradScaler] = torch.amp.GradScaler(device.type) if fp16 else None

    def __call__(self, step: int, batch, noise, latent_eps, offset: int, micro: int, accum: int
                 ) -> Tuple[Dict[str, torch.Tensor], torch.Tensor]:
        sums: Dict[str, torch.Tensor] = {}
        for last, micro_batch, micro_noise, micro_eps in micro_batches(batch, noise, latent_eps, offset, micro, accum):
            with (self.model.no_sync() if (self.ddp and not last) else contextlib.nullcontext()):
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
        skipped = self._scaled_update() if self.scaler else self._fp32_update(reduced[keys.index("total")], grad_norm)
        self.optimizer.zero_grad(set_to_none=True)
        metrics = dict(zip(keys, reduced[: len(keys)].unbind(0)))
        metrics.update(grad_norm=grad_norm.detach(), skipped=torch.tensor(float(skipped), device=self.device))
        return metrics, reduced[-1]

    def _scaled_update(self) -> bool:
        """accelerate's ``optimizer.step()`` then the EMA, as the fp16 loops run them; True when
        the scaler skipped the update (non-finite gradients: it lowered the scale)."""
        scale = self.scaler.get_scale()
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.ema.update(self.config.train.ema_decay)
        return self.scaler.get_scale() < scale

    def _fp32_update(self, total: torch.Tensor, grad_norm: torch.Tensor) -> bool:
        """The fp32 loops' step and EMA, unless the loss or the gradient norm is non-finite: then
        neither (True)."""
        if not (bool(torch.isfinite(total)) and bool(torch.isfinite(grad_norm))):
            return True
        self.optimizer.step()
        self.ema.update(self.config.train.ema_decay)
        return False
