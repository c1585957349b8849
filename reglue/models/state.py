"""State dicts: checked against a model before loading, with errors that name every problem, and
fingerprinted (what identifies a set of weights whatever their file or name)."""

from __future__ import annotations

import hashlib
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


def weights_fingerprint(state: Mapping[str, torch.Tensor]) -> str:
    """sha256 over the names, dtypes, shapes and bytes of a state dict (sorted by name)."""
    digest = hashlib.sha256()
    for name in sorted(state):
        t = state[name].detach().cpu().contiguous()
        digest.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        digest.update(t.reshape(-1).view(torch.uint8).numpy())
    return digest.hexdigest()
