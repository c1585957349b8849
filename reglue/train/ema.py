"""Exponential moving average of the parameters, kept in fp32 beside them.

With FSDP2 the parameters are DTensors; the EMA copies have the same sharding and are updated
on the local shards only, so an update costs no communication. The full EMA weights are
gathered only for export and sampling.
"""

from __future__ import annotations

from typing import Dict, Optional

import torch
import torch.nn as nn

from reglue.runtime import clean_name


def _local(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if hasattr(t, "to_local") else t


class EMA:
    """``shadow[name]`` follows ``param`` as ``shadow += (1 - decay) * (param - shadow)``."""

    def __init__(self, model: nn.Module):
        self.names = []
        self.shadow: Dict[str, torch.Tensor] = {}
        params = []
        for name, param in model.named_parameters():
            key = clean_name(name)
            self.names.append(key)
            self.shadow[key] = param.detach().clone().float()
            params.append(param)
        # Local shards, resolved once: parameters and shadows are updated in place, never replaced.
        self._local_shadows = [_local(self.shadow[n]) for n in self.names]
        self._local_params = [_local(p.detach()) for p in params]

    @torch.no_grad()
    def update(self, decay: float, applied: Optional[torch.Tensor] = None) -> None:
        """One EMA step. ``applied``: a boolean device scalar; False makes the weight 0, which leaves
        every shadow unchanged, decided on the device (a skipped optimizer step needs no host sync)."""
        weight = 1.0 - decay if applied is None else applied.to(torch.float32) * (1.0 - decay)
        torch._foreach_lerp_(self._local_shadows, self._local_params, weight)

    def state_dict(self) -> Dict[str, torch.Tensor]:
        return dict(self.shadow)

    @torch.no_grad()
    def load_state_dict(self, state: Dict[str, torch.Tensor]) -> None:
        missing = set(self.shadow) - set(state)
        if missing:
            raise KeyError(f"EMA state is missing {sorted(missing)[:5]}")
        for name, local in zip(self.names, self._local_shadows):
            local.copy_(_local(state[name]))

    def full_state_dict(self, keep: bool = True) -> Dict[str, torch.Tensor]:
        """Unsharded fp32 EMA weights on CPU (collective under FSDP2: call on every rank).

        ``keep=False`` (ranks other than the one that samples or exports) takes part in the
        gathers but drops each full tensor at once, so only one rank holds a host copy."""
        out = {}
        for name in self.names:
            t = self.shadow[name]
            full = (t.full_tensor() if hasattr(t, "full_tensor") else t).detach()
            if keep:
                out[name] = full.cpu()
        return out
