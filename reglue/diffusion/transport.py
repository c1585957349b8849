"""Interpolants, time sampling and the training loss.

Convention (as SiT/REPA): t = 0 is data, t = 1 is noise, x_t = alpha_t * x_0 + sigma_t * eps,
and the network predicts the velocity dx_t/dt = d_alpha_t * x_0 + d_sigma_t * eps.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Dict, Optional, Sequence

import torch
import torch.nn.functional as F

PATHS = ("linear", "cosine")
T_SAMPLINGS = ("uniform", "lognormal")


def interpolant(t: torch.Tensor, path: str = "linear"):
    """(alpha_t, sigma_t, d_alpha_t, d_sigma_t) for times ``t`` (any shape)."""
    if path == "linear":
        return 1 - t, t, -torch.ones_like(t), torch.ones_like(t)
    if path == "cosine":
        half_pi = math.pi / 2
        return (
            torch.cos(half_pi * t),
            torch.sin(half_pi * t),
            -half_pi * torch.sin(half_pi * t),
            half_pi * torch.cos(half_pi * t),
        )
    raise ValueError(f"path must be one of {PATHS}, got {path!r}")


def score_from_velocity(v: torch.Tensor, x: torch.Tensor, t: torch.Tensor, path: str = "linear") -> torch.Tensor:
    """Score grad log p_t(x) implied by the velocity ``v`` at ``(x, t)``; ``t`` broadcasts against ``x``.

    From v = d_alpha x0 + d_sigma eps and x = alpha x0 + sigma eps:
    eps = (alpha v - d_alpha x) / (alpha d_sigma - d_alpha sigma), score = -eps / sigma.
    """
    alpha, sigma, d_alpha, d_sigma = interpolant(t, path)
    eps = (alpha * v - d_alpha * x) / (alpha * d_sigma - d_alpha * sigma)
    return -eps / sigma


def sample_t(n: int, sampling: str = "uniform", generator=None, device=None, mean: float = 0.0, std: float = 1.0,
             path: str = "linear"):
    """Training times in (0, 1): uniform, or log-normal in the path's signal-to-noise ratio, as in
    REPA: z ~ N(mean, std²), t = sigmoid(z) on the linear path (sigma/alpha = e^z) and
    t = 2/π·atan(e^z) on the cosine path."""
    if sampling == "uniform":
        return torch.rand(n, generator=generator, device=device)
    if sampling == "lognormal":
        z = torch.randn(n, generator=generator, device=device) * std + mean
        return torch.sigmoid(z) if path == "linear" else 2 / math.pi * torch.atan(torch.exp(z))
    raise ValueError(f"t sampling must be one of {T_SAMPLINGS}, got {sampling!r}")


@dataclass
class Noise:
    """All the randomness of one training step for a batch, drawn up front so it is a pure
    function of (seed, step, sample index) and independent of world size and micro-batching.

    t: (N,); eps: like x0; cls_eps: (N, cls_dim) or None; drop: (N,) bool label-dropout mask;
    semantic_drop: (N,) bool mask of the samples whose semantic channels are dropped (ReDi
    ``--dino-drop-prob``), or None.
    """

    t: torch.Tensor
    eps: torch.Tensor
    cls_eps: Optional[torch.Tensor]
    drop: Optional[torch.Tensor]
    semantic_drop: Optional[torch.Tensor] = None

    def slice(self, start: int, stop: int) -> "Noise":
        pick = lambda v: None if v is None else v[start:stop]  # noqa: E731
        return Noise(self.t[start:stop], self.eps[start:stop], pick(self.cls_eps), pick(self.drop),
                     pick(self.semantic_drop))


def draw_noise(n: int, x_shape, cls_dim: int, dropout_prob: float, generator: torch.Generator, device,
               t_sampling: str = "uniform", t_mean: float = 0.0, t_std: float = 1.0, path: str = "linear",
               semantic_dropout_prob: float = 0.0) -> Noise:
    """Draw the step's randomness for ``n`` samples (x_shape excludes the batch dimension).

    The semantic-dropout mask is drawn last, so enabling it leaves every other draw unchanged."""
    t = sample_t(n, t_sampling, generator=generator, device=device, mean=t_mean, std=t_std, path=path)
    eps = torch.randn((n, *x_shape), generator=generator, device=device)
    cls_eps = torch.randn((n, cls_dim), generator=generator, device=device) if cls_dim else None
    drop = torch.rand(n, generator=generator, device=device) < dropout_prob if dropout_prob > 0 else None
    semantic_drop = None
    if semantic_dropout_prob > 0:
        semantic_drop = torch.rand(n, generator=generator, device=device) < semantic_dropout_prob
    return Noise(t, eps, cls_eps, drop, semantic_drop)


def alignment_loss(zs_pred, zs_target) -> torch.Tensor:
    """Negative cosine similarity per token, averaged over tokens, samples and projectors (fp32)."""
    if len(zs_pred) != len(zs_target):
        raise ValueError(f"{len(zs_pred)} projector outputs but {len(zs_target)} alignment targets")
    total = 0.0
    for pred, target in zip(zs_pred, zs_target):
        if pred.shape != target.shape:
            raise ValueError(f"projector output {tuple(pred.shape)} does not match alignment target {tuple(target.shape)}")
        pred = F.normalize(pred.float(), dim=-1)
        target = F.normalize(target.float(), dim=-1)
        total = total + (-(pred * target).sum(dim=-1)).mean()
    return total / len(zs_pred)


def _semantic_loss(err: torch.Tensor, dropped: Optional[torch.Tensor]) -> torch.Tensor:
    """Mean squared error (N, k, h, w) -> (), dropped samples counting as zero."""
    if dropped is None:
        return err.mean()
    return (err.mean(dim=(1, 2, 3)) * (~dropped).to(err.dtype)).mean()


def loss_inputs(latents: torch.Tensor, noise: Noise, semantic: Optional[torch.Tensor] = None,
                cls: Optional[torch.Tensor] = None, path: str = "linear"):
    """What the model sees and what it should predict, before the model runs.

    Returns (xt, t, target, cls_t, cls_target): noisy input (N, C, h, w) with C = 4 latent
    (+ k semantic) channels, times (N,), velocity target like xt, noisy [CLS] (N, C_cls) and its
    velocity target (both None without ``cls``).

    Semantic dropout (``noise.semantic_drop``, ReDi ``transport.py`` ``dino_drop_prob``): a dropped
    sample's clean semantic channels are zero, so the model sees only their noise (and
    :func:`loss_terms` leaves its semantic error out). ReDi draws one coin per GPU batch and zeroes
    that whole batch's features and λs; we draw one per sample from the step's seeded generator, so
    the result does not depend on the world size. The expected loss is the same:
    latent + (1 - p) λs semantic.
    """
    semantic_drop = noise.semantic_drop
    if semantic_drop is not None and semantic is not None:
        semantic = semantic * (~semantic_drop).to(semantic.dtype).view(-1, 1, 1, 1)
    x0 = latents if semantic is None else torch.cat([latents, semantic.to(latents.dtype)], dim=1)
    if noise.eps.shape != x0.shape:
        raise ValueError(f"noise {tuple(noise.eps.shape)} does not match the model input {tuple(x0.shape)}")
    t = noise.t.to(x0.dtype)
    alpha, sigma, d_alpha, d_sigma = (v.view(-1, 1, 1, 1) for v in interpolant(t, path))
    eps = noise.eps.to(x0.dtype)
    xt = alpha * x0 + sigma * eps
    target = d_alpha * x0 + d_sigma * eps
    cls_t = cls_target = None
    if cls is not None:
        ca, cs, cda, cds = (v.view(-1, 1) for v in interpolant(t, path))
        cls_eps = noise.cls_eps.to(cls.dtype)
        cls_t = ca * cls + cs * cls_eps
        cls_target = cda * cls + cds * cls_eps
    return xt, t, target, cls_t, cls_target


def loss_terms(out: torch.Tensor, target: torch.Tensor, n_latent: int, cls_out: Optional[torch.Tensor] = None,
               cls_target: Optional[torch.Tensor] = None, zs: Sequence[torch.Tensor] = (),
               align_targets: Sequence[torch.Tensor] = (), semantic_drop: Optional[torch.Tensor] = None
               ) -> Dict[str, torch.Tensor]:
    """The unweighted loss components (fp32 scalars) from the model's outputs: ``latent`` (MSE
    over the first ``n_latent`` channels), ``semantic`` (the rest; samples in ``semantic_drop``
    count as zero), ``cls``, ``align``; zero when unused."""
    err = (out.float() - target.float()) ** 2
    zero = err.new_zeros(())
    return {
        "latent": err[:, :n_latent].mean(),
        "semantic": _semantic_loss(err[:, n_latent:], semantic_drop) if target.shape[1] > n_latent else zero,
        "cls": ((cls_out.float() - cls_target.float()) ** 2).mean() if cls_target is not None else zero,
        "align": alignment_loss(zs, align_targets) if len(align_targets) else zero,
    }


def training_losses(
    model,
    latents: torch.Tensor,
    y: torch.Tensor,
    noise: Noise,
    *,
    semantic: Optional[torch.Tensor] = None,
    cls: Optional[torch.Tensor] = None,
    align_targets: Sequence[torch.Tensor] = (),
    path: str = "linear",
    semantic_weight: float = 1.0,
    cls_weight: float = 0.03,
    align_weight: float = 0.5,
    inputs_fn=loss_inputs,
    terms_fn=loss_terms,
) -> Dict[str, torch.Tensor]:
    """The joint REGLUE loss; methods without a component simply pass ``None``/empty for it.

    latents: (N, 4, h, w) scaled VAE latents; semantic: (N, k, h, w) or None; cls: (N, C) global
    token or None; align_targets: list of (N, T, C) frozen encoder tokens (empty: no alignment).
    Returns ``latent``, ``semantic``, ``cls``, ``align`` (zero when unused) and ``total``.
    ``inputs_fn``/``terms_fn``: :func:`loss_inputs` and :func:`loss_terms`, or compiled versions
    of them (``reglue.train.parallelize.loss_fn``); the weighting stays outside them, so a weight
    that changes during training (λs milestones) never recompiles anything.
    """
    xt, t, target, cls_t, cls_target = inputs_fn(latents, noise, semantic, cls, path)
    out, zs, cls_out = model(xt, t, y, cls_token=cls_t, force_drop=noise.drop)
    losses = terms_fn(out, target, latents.shape[1], cls_out, cls_target, zs, align_targets, noise.semantic_drop)
    losses["total"] = (
        losses["latent"]
        + semantic_weight * losses["semantic"]
        + cls_weight * losses["cls"]
        + align_weight * losses["align"]
    )
    return losses
