"""Checking a state dict against a model before loading, with errors that name every problem."""

from __future__ import annotations

from typing import Mapping

import torch


def check_state_dict(expected: Mapping[str, torch.Tensor], state: Mapping[str, torch.Tensor], what: str,
                     strict: bool = True, limit: int = 8) -> None:
    """Raise ValueError naming missing keys, unexpected keys (when ``strict``) and shape mismatches.

    ``what`` says which model the checkpoint was meant for, e.g. "SemanticCompressor(channels=...)".
    """

    def listed(keys):
        return f"{keys[:limit]}{' ...' if len(keys) > limit else ''}"

    problems = []
    if strict:
        missing = [k for k in expected if k not in state]
        unexpected = [k for k in state if k not in expected]
        if missing:
            problems.append(f"missing keys: {listed(missing)}")
        if unexpected:
            problems.append(f"unexpected keys: {listed(unexpected)}")
    shapes = [f"{k}: checkpoint {tuple(state[k].shape)} vs model {tuple(v.shape)}"
              for k, v in expected.items() if k in state and tuple(state[k].shape) != tuple(v.shape)]
    if shapes:
        problems.append("shape mismatches: " + "; ".join(shapes[:limit]))
    if problems:
        raise ValueError(f"checkpoint does not match {what}: " + " | ".join(problems))
