"""Samplers: Euler-Maruyama SDE and Euler/Heun ODE, with classifier-free guidance, [CLS] co-sampling
and ReDi's representation guidance.

Convention as in ``transport.py``: t = 1 is noise, t = 0 is data, the model predicts the velocity.
The model is called as ``model(x, t, y, cls_token=None) -> (out, zs, cls_out)`` with ``x`` in the
dtype of the initial noise, ``t`` an (N,) float32 tensor and ``y`` (N,) int64 labels; ``zs`` is
ignored. The sampler state is kept in float64 (float32 on MPS, which has no float64), as in the
published REPA/REG/REGLUE samplers; it is cast to the model's dtype for every call.

Guidance: at an evaluation time t inside ``guidance_interval`` (inclusive) the conditional and
unconditional predictions come from one call on a 2N batch (labels ``y`` then the null label) and
are combined per ``guidance_rule``; elsewhere one conditional call on N. The published samplers
combine SDE drifts ``d = v - g^2/2 score(v)``, we combine velocities: the same thing, because at
fixed (x, t) the drift is affine in v and every rule below is an affine combination (weights
summing to one), so combining before or after the drift is exact up to rounding.

``guidance_rule``:
    "standard":        ``uncond + s (cond - uncond)`` on the first ``guide_channels`` channels (all
                       when None; the rest take the conditional prediction) at every guided time.
                       REPA/REG/REGLUE ``samplers.py`` (all channels), ReDi ``forward_with_cfg_vae``
                       (4 = the VAE channels) and SiT ``forward_with_cfg`` (its first 3 channels).
    "reglue-vae-cfg":  REGLUE ``samplers.py`` with ``--vae_cfg true``, exactly: on every stochastic
                       SDE step ``cond + s (cond - uncond)`` on the first ``guide_channels`` channels
                       (published: 4), the rest conditional; on the final deterministic step the
                       standard ``uncond + s (cond - uncond)`` on *all* channels; nothing (not even
                       the [CLS] token) is guided unless s > 1. Its scale s therefore equals our
                       standard s + 1 on the stochastic steps but plain s on the last step, and the
                       semantic channels are guided there too: no "standard" setting reproduces it.
                       SDE only (the published code has no ODE variant).

Representation guidance (ReDi ``forward_with_rg``, ``--rg-scale``; its paper, Sec. 3.5): with
``representation_guidance_scale`` w != 1 the 2N batch is ``x`` and ``x`` with every channel from
``latent_channels`` on set to zero, both with the labels ``y``, combined as
``v_zeroed + w (v - v_zeroed)`` on all channels. It needs a model trained with semantic dropout
(``MethodConfig.semantic_dropout_prob``) and, as published, excludes classifier-free guidance.

Model evaluations (NFE), counting a 2N guided call as one:
    euler_maruyama: num_steps      (num_steps - 1 stochastic steps on linspace(1, 0.04, num_steps),
                                    then one deterministic step 0.04 -> 0)
    ode, "euler":   num_steps      (uniform grid linspace(1, 0, num_steps + 1))
    ode, "heun":    2 num_steps - 1 (the last step is a plain Euler step, as published: it would
                                    otherwise need a second evaluation at t = 0)
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from reglue.diffusion.transport import PATHS, score_from_velocity

SAMPLERS = ("sde", "euler", "heun")
GUIDANCE_RULES = ("standard", "reglue-vae-cfg")
SDE_T_END = 0.04  # last stochastic time of the published schedule, followed by a deterministic step to 0
VAE_LATENT_CHANNELS = 4  # SD-VAE latent channels, first in x; semantic channels follow


@dataclass(frozen=True)
class _Guidance:
    """Resolved guidance settings; ``cls_scale`` 1 means conditional only, ``rg_scale`` 1 no
    representation guidance."""

    scale: float
    interval: tuple[float, float]
    cls_scale: float
    channels: int | None
    null_label: int | None
    rule: str
    rg_scale: float
    latent_channels: int

    def active(self, t: float, has_cls: bool) -> bool:
        """Whether the evaluation at time ``t`` needs a second (unconditional) prediction."""
        if self.rule == "reglue-vae-cfg":
            wanted = self.scale > 1  # the published sampler guides nothing, [CLS] included, unless s > 1
        else:
            wanted = self.scale != 1 or (has_cls and self.cls_scale != 1) or self.rg_scale != 1
        return wanted and self.interval[0] <= t <= self.interval[1]

    def combine(self, cond: torch.Tensor, uncond: torch.Tensor, final_step: bool) -> torch.Tensor:
        """The guided prediction of x from the two halves of a 2N call (see the module docstring)."""
        if self.rg_scale != 1:
            return uncond + self.rg_scale * (cond - uncond)
        if self.rule == "reglue-vae-cfg":
            if final_step:
                return uncond + self.scale * (cond - uncond)
            return _prefix(cond + self.scale * (cond - uncond), cond, self.channels)
        if self.scale == 1:
            return cond
        return _prefix(uncond + self.scale * (cond - uncond), cond, self.channels)


def _prefix(guided: torch.Tensor, cond: torch.Tensor, channels: int | None) -> torch.Tensor:
    """``guided`` on the first ``channels`` channels (all when None), ``cond`` on the rest."""
    if channels is None:
        return guided
    return torch.cat([guided[:, :channels], cond[:, channels:]], dim=1)


def _resolve_guidance(model, x, cls, cfg_scale, guidance_interval, cls_cfg_scale, guide_channels, null_label,
                      guidance_rule="standard", representation_guidance_scale=1.0,
                      latent_channels=VAE_LATENT_CHANNELS) -> _Guidance:
    if cfg_scale < 1:
        raise ValueError(f"cfg_scale must be >= 1 (1 = no guidance), got {cfg_scale}")
    low, high = guidance_interval
    if not 0 <= low <= high <= 1:
        raise ValueError(f"guidance_interval must be (low, high), 0 <= low <= high <= 1; got {guidance_interval}")
    if cls_cfg_scale is None:
        cls_scale = cfg_scale
    elif cls_cfg_scale == 0:
        cls_scale = 1.0
    elif cls_cfg_scale > 0:
        cls_scale = cls_cfg_scale
    else:
        raise ValueError(f"cls_cfg_scale must be None (= cfg_scale), 0 (conditional only) or > 0; got {cls_cfg_scale}")
    channels = x.shape[1]
    if guide_channels is not None and not 1 <= guide_channels <= channels:
        raise ValueError(f"guide_channels must be None or in [1, {channels}] (channels of x), got {guide_channels}")
    if guidance_rule not in GUIDANCE_RULES:
        raise ValueError(f"guidance_rule must be one of {GUIDANCE_RULES}, got {guidance_rule!r}")
    if guidance_rule == "reglue-vae-cfg" and guide_channels is None:
        raise ValueError("guidance_rule 'reglue-vae-cfg' guides a channel prefix: pass guide_channels "
                         "(4 = the VAE latents, as published)")
    rg_scale = float(representation_guidance_scale)
    if rg_scale != 1:
        _check_representation_guidance(rg_scale, cfg_scale, guidance_rule, cls, latent_channels, channels)
    if null_label is None and (cfg_scale != 1 or cls_scale != 1):
        null_label = getattr(model, "num_classes", None)
        if null_label is None:
            raise ValueError("guidance needs the null label: pass null_label= (model has no num_classes)")
    return _Guidance(float(cfg_scale), (float(low), float(high)), float(cls_scale), guide_channels, null_label,
                     guidance_rule, rg_scale, latent_channels)


def _check_representation_guidance(rg_scale, cfg_scale, guidance_rule, cls, latent_channels, channels) -> None:
    if rg_scale < 1:
        raise ValueError(f"representation_guidance_scale must be >= 1 (1 = off), got {rg_scale}")
    if cfg_scale != 1 or guidance_rule != "standard":
        raise ValueError("representation guidance excludes classifier-free guidance (as in ReDi's sample_ddp.py): "
                         "use cfg_scale 1 and guidance_rule 'standard' with representation_guidance_scale > 1")
    if cls is not None:
        raise ValueError("representation guidance is defined for ReDi-style models without a [CLS] token")
    if not 1 <= latent_channels < channels:
        raise ValueError(f"representation guidance zeroes the channels from latent_channels={latent_channels} on; "
                         f"x has {channels} channels, so it has no semantic channels to drop")


def _check_inputs(model, x, y, cls, path, num_steps, min_steps):
    if path not in PATHS:
        raise ValueError(f"path must be one of {PATHS}, got {path!r}")
    if not isinstance(num_steps, int) or num_steps < min_steps:
        raise ValueError(f"num_steps must be an int >= {min_steps}, got {num_steps!r}")
    if x.dim() != 4:
        raise ValueError(f"x must be (N, C, H, W), got shape {tuple(x.shape)}")
    if y.shape != (x.shape[0],):
        raise ValueError(f"y must be ({x.shape[0]},) labels, got shape {tuple(y.shape)}")
    if cls is not None and (cls.dim() != 2 or cls.shape[0] != x.shape[0]):
        raise ValueError(f"cls must be ({x.shape[0]}, cls_dim), got shape {tuple(cls.shape)}")
    if getattr(model, "training", False):
        raise ValueError("model is in training mode (label dropout would corrupt conditioning): call model.eval()")


def _state_dtype(device: torch.device) -> torch.dtype:
    return torch.float32 if device.type == "mps" else torch.float64


def _velocity(model, x, cls, t: float, y, guidance: _Guidance, dtypes, final_step: bool = False,
              guide_at: float | None = None):
    """Guided velocities ``(v, cls_v)`` at time ``t`` for the state ``(x, cls)``, in the state dtype.

    x: (N, C, H, W), cls: (N, D) or None, y: (N,); dtypes: the model input dtypes for (x, cls);
    ``final_step``: the SDE's deterministic last step (where ``reglue-vae-cfg`` changes formula);
    ``guide_at``: the time whose place in the guidance interval decides (default ``t``).
    """
    has_cls = cls is not None
    guided = guidance.active(t if guide_at is None else guide_at, has_cls)
    x_in, cls_in, y_in = x, cls, y
    if guided and guidance.rg_scale != 1:
        without_semantics = x.clone()
        without_semantics[:, guidance.latent_channels:] = 0
        x_in, y_in = torch.cat([x, without_semantics]), torch.cat([y, y])
    elif guided:
        x_in = torch.cat([x, x])
        cls_in = torch.cat([cls, cls]) if has_cls else None
        y_in = torch.cat([y, torch.full_like(y, guidance.null_label)])
    t_in = torch.full((x_in.shape[0],), t, dtype=torch.float32, device=x.device)
    out, _, cls_out = model(x_in.to(dtypes[0]), t_in, y_in, cls_token=cls_in.to(dtypes[1]) if has_cls else None)
    v = out.to(x.dtype)
    if has_cls and cls_out is None:
        raise ValueError("cls was given but the model returned no [CLS] velocity (cls_out is None)")
    cls_v = cls_out.to(cls.dtype) if has_cls else None
    if guided:
        v = guidance.combine(*v.chunk(2), final_step)
        if has_cls:
            cond, uncond = cls_v.chunk(2)
            cls_v = cond if guidance.cls_scale == 1 else uncond + guidance.cls_scale * (cond - uncond)
    return v, cls_v


def _em_step(x, v, t: float, dt: float, diffusion: float, noisy: bool, path: str, generator):
    """One Euler-Maruyama step ``x + (v - diffusion/2 score) dt [+ sqrt(diffusion |dt|) eps]``,
    the score implied by ``v`` at ``(x, t)``."""
    # torch.full launches a fill; torch.tensor(t, device=...) would copy from the host and wait for the GPU every step
    t_ = torch.full((), t, dtype=x.dtype, device=x.device)
    x_next = x + (v - 0.5 * diffusion * score_from_velocity(v, x, t_, path)) * dt
    if noisy:
        noise = torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
        x_next = x_next + (diffusion * abs(dt)) ** 0.5 * noise
    return x_next


@torch.no_grad()
def euler_maruyama(
    model,
    x: torch.Tensor,
    y: torch.Tensor,
    cls: torch.Tensor | None = None,
    num_steps: int = 250,
    cfg_scale: float = 1.0,
    guidance_interval: tuple[float, float] = (0.0, 1.0),
    cls_cfg_scale: float | None = None,
    guide_channels: int | None = None,
    null_label: int | None = None,
    path: str = "linear",
    generator: torch.Generator | None = None,
    guidance_rule: str = "standard",
    representation_guidance_scale: float = 1.0,
    latent_channels: int = VAE_LATENT_CHANNELS,
):
    """Euler-Maruyama sampler of the reverse SDE, as published by REPA/REG/REGLUE (and, in SiT's
    reversed time, SiT/ReDi ``sample_sde`` with diffusion form "sigma" and last step "Mean" 0.04).

    Times ``linspace(1, 0.04, num_steps)`` (float64) then 0. Each interval but the last:
    ``x += (v - g^2/2 score) dt + g sqrt(|dt|) eps`` with ``g^2 = 2t`` (2 sigma_t on the linear
    path) and the score derived from v; the last interval 0.04 -> 0 is the same drift without
    noise. The [CLS] token follows the same update with its own noise (drawn after the latent
    noise at every step). Exactly ``num_steps`` model evaluations.

    x: (N, C, H, W) initial noise at t = 1; y: (N,) labels; cls: (N, D) initial [CLS] noise, or
    None for a model without [CLS] token. ``cfg_scale`` >= 1 (1 = no guidance) applies at times in
    ``guidance_interval`` (inclusive) with ``guidance_rule`` (module docstring), to the first
    ``guide_channels`` channels if given (e.g. 4 = the VAE channels; the rest take the conditional
    prediction). ``cls_cfg_scale``: None = same as ``cfg_scale``, 0 = conditional only, else its own
    scale > 0 (as published). ``representation_guidance_scale`` > 1: ReDi's representation
    guidance, zeroing the channels from ``latent_channels`` on. ``null_label`` defaults to
    ``model.num_classes``. Returns ``(x0, cls0)`` in the dtypes of ``x`` and ``cls`` (cls0 None
    without [CLS]).
    """
    _check_inputs(model, x, y, cls, path, num_steps, min_steps=2)
    guidance = _resolve_guidance(model, x, cls, cfg_scale, guidance_interval, cls_cfg_scale, guide_channels, null_label,
                                 guidance_rule, representation_guidance_scale, latent_channels)
    dtypes = (x.dtype, cls.dtype if cls is not None else None)
    state = _state_dtype(x.device)
    times = torch.linspace(1.0, SDE_T_END, num_steps, dtype=torch.float64).tolist() + [0.0]
    xs = x.to(state)
    cs = cls.to(state) if cls is not None else None
    for i, (t_cur, t_next) in enumerate(zip(times[:-1], times[1:])):
        dt = t_next - t_cur
        final_step = i == num_steps - 1
        v, cls_v = _velocity(model, xs, cs, t_cur, y, guidance, dtypes, final_step)
        # g^2 = 2t on every path, as published (on the linear path 2t = 2 sigma_t).
        diffusion = 2 * t_cur
        xs = _em_step(xs, v, t_cur, dt, diffusion, not final_step, path, generator)
        if cs is not None:
            cs = _em_step(cs, cls_v, t_cur, dt, diffusion, not final_step, path, generator)
    return xs.to(dtypes[0]), (cs.to(dtypes[1]) if cs is not None else None)


@torch.no_grad()
def ode(
    model,
    x: torch.Tensor,
    y: torch.Tensor,
    cls: torch.Tensor | None = None,
    num_steps: int = 50,
    method: str = "euler",
    cfg_scale: float = 1.0,
    guidance_interval: tuple[float, float] = (0.0, 1.0),
    cls_cfg_scale: float | None = None,
    guide_channels: int | None = None,
    null_label: int | None = None,
    path: str = "linear",
    guidance_rule: str = "standard",
    representation_guidance_scale: float = 1.0,
    latent_channels: int = VAE_LATENT_CHANNELS,
):
    """Probability-flow ODE from t = 1 to t = 0 on ``linspace(1, 0, num_steps + 1)``, Euler or Heun.

    Uses the velocity only (no score, so no division by sigma_t = 0 at t = 0). Heun corrects every
    step but the last with a second evaluation at the step's end; as in REPA's ``euler_sampler``,
    a step is guided or not as a whole, by where its start time lies in the interval.
    ``num_steps`` evaluations for "euler", ``2 num_steps - 1`` for "heun". Arguments and return
    value as in :func:`euler_maruyama`; ``guidance_rule`` must be "standard".
    """
    if method not in ("euler", "heun"):
        raise ValueError(f"method must be 'euler' or 'heun', got {method!r}")
    if guidance_rule != "standard":
        raise ValueError(f"guidance_rule {guidance_rule!r} is defined for the SDE sampler only (as published); "
                         "use sampler 'sde' or guidance_rule 'standard'")
    _check_inputs(model, x, y, cls, path, num_steps, min_steps=1)
    guidance = _resolve_guidance(model, x, cls, cfg_scale, guidance_interval, cls_cfg_scale, guide_channels, null_label,
                                 guidance_rule, representation_guidance_scale, latent_channels)
    dtypes = (x.dtype, cls.dtype if cls is not None else None)
    state = _state_dtype(x.device)
    times = torch.linspace(1.0, 0.0, num_steps + 1, dtype=torch.float64).tolist()
    xs = x.to(state)
    cs = cls.to(state) if cls is not None else None
    for i, (t_cur, t_next) in enumerate(zip(times[:-1], times[1:])):
        dt = t_next - t_cur
        v, cls_v = _velocity(model, xs, cs, t_cur, y, guidance, dtypes)
        x_next = xs + v * dt
        c_next = cs + cls_v * dt if cs is not None else None
        if method == "heun" and i < num_steps - 1:
            v2, cls_v2 = _velocity(model, x_next, c_next, t_next, y, guidance, dtypes, guide_at=t_cur)
            x_next = xs + 0.5 * (v + v2) * dt
            c_next = cs + 0.5 * (cls_v + cls_v2) * dt if cs is not None else None
        xs, cs = x_next, c_next
    return xs.to(dtypes[0]), (cs.to(dtypes[1]) if cs is not None else None)


def sample(model, x, y, cls=None, *, sampler: str = "sde", num_steps: int | None = None, generator=None, **options):
    """Dispatch to :func:`euler_maruyama` ("sde", 250 steps by default) or :func:`ode` ("euler" or
    "heun", 50 steps by default); ``options`` are the chosen sampler's keyword arguments.
    ``generator`` feeds the SDE noise; the ODE is deterministic given ``x`` and ``cls`` and ignores it,
    so one call site serves every sampler."""
    if sampler == "sde":
        steps = 250 if num_steps is None else num_steps
        return euler_maruyama(model, x, y, cls, num_steps=steps, generator=generator, **options)
    if sampler in ("euler", "heun"):
        return ode(model, x, y, cls, num_steps=50 if num_steps is None else num_steps, method=sampler, **options)
    raise ValueError(f"sampler must be one of {SAMPLERS}, got {sampler!r}")
