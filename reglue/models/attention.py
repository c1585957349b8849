"""One attention entry point: FlashAttention-3 -> FlashAttention-2 -> xformers -> SDPA.

``Attention`` is the multi-head self-attention module of the SiT and of the frozen DINOv2 (which
gets it in place of timm's, same parameters), so both run through ``attention(q, k, v, backend="auto")`` with q, k, v: (N, H, T, head_dim) returns (N, H, T, head_dim),
softmax(q kᵀ / sqrt(head_dim)) v, no mask, no dropout. ``backend``:

  auto      the first available of fa3, fa2, xformers, sdpa for these tensors
  fa3       FlashAttention-3 (``flash_attn_interface``; Hopper GPUs, fp16/bf16)
  fa2       FlashAttention-2 (``flash_attn``; Ampere or newer, fp16/bf16)
  xformers  ``xformers.ops.memory_efficient_attention`` (CUDA)
  sdpa      ``torch.nn.functional.scaled_dot_product_attention`` (PyTorch picks flash/cuDNN/efficient/math)
  math      the plain formula in fp32 (the reference)

Every backend takes head dim 72 (SiT-B/L have 64, SiT-XL 72) except the 2024 FlashAttention-3 beta
(``flashattn_hopper_cuda``: head dims 64/128 only), which "auto" skips for it. The choice is logged once per
distinct (backend, device, dtype, head_dim). An explicitly requested backend that cannot run these
tensors raises ValueError naming it and why; "auto" never raises for availability.
"""

from __future__ import annotations

import importlib
import importlib.util
import logging
from typing import Callable, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

logger = logging.getLogger(__name__)

BACKENDS = ("auto", "fa3", "fa2", "xformers", "sdpa", "math")
_AUTO_ORDER = ("fa3", "fa2", "xformers", "sdpa")
_HALF = (torch.float16, torch.bfloat16)


def _probe(module: str):
    """(module, None) when it imports, else (None, why). Run once at import: probing inside a
    torch.compile'd region would break the graph, and the answer cannot change in a process."""
    if importlib.util.find_spec(module.split(".")[0]) is None:
        return None, f"{module} is not installed"
    try:
        return importlib.import_module(module), None
    except Exception as e:  # ImportError, or a CUDA extension built for another torch
        return None, f"{module} failed to import ({type(e).__name__}: {e})"


_PACKAGES = {name: _probe(name) for name in ("flash_attn_interface", "flash_attn", "xformers.ops")}
_PACKAGE_OF = {"fa3": "flash_attn_interface", "fa2": "flash_attn", "xformers": "xformers.ops"}
# The 2024 FA3 beta (its interface imports the ``flashattn_hopper_cuda`` extension) has kernels for
# head dims 64/128/256 forward and 64/128 backward only, and raises at call time for any other
# (Dao-AILab/flash-attention#1070, #1290). Later builds round any multiple of 8 up to 256.
_FA3_BETA_HEAD_DIMS = (64, 128)


def _cuda_major(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).major


def _fa3_is_beta() -> bool:
    return hasattr(_PACKAGES["flash_attn_interface"][0], "flashattn_hopper_cuda")


def _unavailable(backend: str, q: torch.Tensor) -> Optional[str]:
    """Why ``backend`` cannot run on q's device/dtype/head dim, or None when it can."""
    if backend in ("sdpa", "math"):
        return None
    _, why = _PACKAGES[_PACKAGE_OF[backend]]
    if why is not None:
        return why
    if not q.is_cuda:
        return f"it needs CUDA tensors (got device {q.device})"
    if backend == "xformers":
        return None
    if q.dtype not in _HALF:
        return f"it needs fp16 or bf16 inputs (got {q.dtype})"
    head_dim = q.shape[-1]
    if head_dim % 8 or head_dim > 256:
        return f"head_dim must be a multiple of 8 and at most 256 (got {head_dim})"
    major = _cuda_major(q.device)
    if backend == "fa3" and major != 9:
        return f"FlashAttention-3 needs a Hopper GPU (compute capability 9.x, got {major}.x)"
    if backend == "fa3" and head_dim not in _FA3_BETA_HEAD_DIMS and _fa3_is_beta():
        return f"this FlashAttention-3 build (flashattn_hopper_cuda beta) takes head_dim 64 or 128 only (got {head_dim})"
    if backend == "fa2" and major < 8:
        return f"FlashAttention-2 needs compute capability >= 8.0 (got {major}.x)"
    return None


def _bthd(fn: Callable) -> Callable:
    """Adapt a (N, T, H, hd) kernel to the (N, H, T, hd) layout of this module."""

    def run(q, k, v):
        out = fn(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
        if isinstance(out, tuple):  # some flash_attn_interface versions return (out, lse)
            out = out[0]
        return out.transpose(1, 2)

    return run


def _fa3(q, k, v):
    return _bthd(_PACKAGES["flash_attn_interface"][0].flash_attn_func)(q, k, v)


def _fa2(q, k, v):
    return _bthd(_PACKAGES["flash_attn"][0].flash_attn_func)(q, k, v)


def _xformers(q, k, v):
    return _bthd(_PACKAGES["xformers.ops"][0].memory_efficient_attention)(q, k, v)


def _sdpa(q, k, v):
    return F.scaled_dot_product_attention(q, k, v)


def attention_math(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """softmax(q kᵀ / sqrt(d)) v in fp32, cast back to q's dtype: the reference every backend is tested against."""
    scores = (q.float() @ k.float().transpose(-2, -1)) * q.shape[-1] ** -0.5
    return (scores.softmax(dim=-1) @ v.float()).to(q.dtype)


_IMPLS = {"fa3": _fa3, "fa2": _fa2, "xformers": _xformers, "sdpa": _sdpa, "math": attention_math}
_logged: set = set()


def select_backend(q: torch.Tensor, backend: str = "auto") -> str:
    """The backend ``attention`` runs for tensors like q; raises ValueError if a requested one cannot run."""
    if backend not in BACKENDS:
        raise ValueError(f"attention backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "auto":
        for candidate in _AUTO_ORDER:
            if _unavailable(candidate, q) is None:
                return candidate
    reason = _unavailable(backend, q)
    if reason is not None:
        raise ValueError(f"attention backend {backend!r} is not available: {reason}")
    return backend


def _log_choice(chosen: str, requested: str, q: torch.Tensor) -> None:
    key = (chosen, requested, q.device.type, q.dtype, q.shape[-1])
    if key in _logged:
        return
    _logged.add(key)
    skipped = ""
    if requested == "auto":
        why = [f"{b}: {_unavailable(b, q)}" for b in _AUTO_ORDER[: _AUTO_ORDER.index(chosen)]]
        skipped = f" (skipped {'; '.join(why)})" if why else ""
    logger.info(
        "attention: using %s for %s %s head_dim=%d (requested %r)%s",
        chosen, q.device.type, str(q.dtype).removeprefix("torch."), q.shape[-1], requested, skipped,
    )  # fmt: skip


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, backend: str = "auto") -> torch.Tensor:
    """q, k, v: (N, H, T, head_dim) -> (N, H, T, head_dim); see the module docstring for ``backend``."""
    if q.dim() != 4 or k.shape != q.shape or v.shape[:3] != q.shape[:3]:
        raise ValueError(
            f"attention needs q, k, v as (N, H, T, head_dim) with equal shapes, got "
            f"{tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}"
        )
    # Under autocast, or with an fp32 QK-norm weight, q/k/v may disagree; kernels need one dtype.
    if q.device.type in ("cuda", "cpu") and torch.is_autocast_enabled(q.device.type):
        dtype = torch.get_autocast_dtype(q.device.type)
    else:
        dtype = torch.promote_types(torch.promote_types(q.dtype, k.dtype), v.dtype)
    q, k, v = q.to(dtype), k.to(dtype), v.to(dtype)
    chosen = select_backend(q, backend)
    if not torch.compiler.is_compiling() and q.device.type != "meta":  # meta: shapes only (the FLOP count), no kernel runs
        _log_choice(chosen, backend, q)
    return _IMPLS[chosen](q, k, v)


class Attention(nn.Module):
    """Multi-head self-attention: qkv splits as (3, heads, head_dim); optional RMSNorm on q and k
    (``kernels`` picks its implementation); ``attention`` with ``backend`` in between.

    Parameter names (``qkv``, ``proj``, ``q_norm``, ``k_norm``) are those of timm's Attention and
    of the published SiT checkpoints. x: (N, T, dim) -> (N, T, dim).
    """

    def __init__(self, dim: int, num_heads: int, qk_norm: bool = False, kernels="eager", backend: str = "auto"):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"hidden size {dim} is not divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.backend = backend
        self.qkv = nn.Linear(dim, dim * 3, bias=True)
        if qk_norm:
            from reglue.kernels.rmsnorm import RMSNorm

            self.q_norm = RMSNorm(self.head_dim, eps=1e-6, kernels=kernels)
            self.k_norm = RMSNorm(self.head_dim, eps=1e-6, kernels=kernels)
        else:
            self.q_norm = nn.Identity()
            self.k_norm = nn.Identity()
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, t, d = x.shape
        q, k, v = self.qkv(x).reshape(n, t, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        q, k = self.q_norm(q), self.k_norm(k)
        out = attention(q, k, v, backend=self.backend)  # (N, H, T, hd)
        return self.proj(out.transpose(1, 2).reshape(n, t, d))
