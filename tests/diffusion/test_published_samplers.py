"""Our samplers against transcriptions of the published evaluation samplers, on a toy model.

The transcriptions below were written here from reading the published code (not copied), one
function per published sampler family:

- ``published_em``: REPA/REG/REGLUE ``samplers.py`` ``euler_maruyama_sampler`` (REGLUE @ 90a20d4
  L46-180, REG @ 021ea2e L46-169, REPA @ 67f7145 L105-183): float64 state, drifts
  ``v - t score`` combined per branch, REGLUE's ``--vae_cfg`` rule on the stochastic steps only;
- ``published_sit_sde``: SiT/ReDi ``transport.Sampler.sample_sde`` with their CLI defaults
  (Euler, diffusion "sigma", last step "Mean" 0.04; ``train_utils.py`` L23-31), in SiT's time
  (t = 0 noise, t = 1 data), driven by ``forward_with_cfg`` (SiT ``models.py``: first 3 channels),
  ``forward_with_cfg_vae`` (ReDi ``models.py`` L309-327: 4 channels) or ``forward_with_rg`` (ReDi
  L332-350), which run on a doubled batch whose second half is discarded at every step.

The toy model mixes channels and is non-linear in x, so guiding drifts (published) and guiding
velocities (ours) agree only because the drift is affine in v at fixed (x, t), which is what the
comparison checks, together with step grid, noise use, interval ends and the last step.
"""

import math

import pytest
import torch
from torch import nn

from reglue.diffusion.samplers import euler_maruyama

NUM_CLASSES = 3  # labels 0..2, null label 3


class ToyVelocity(nn.Module):
    """A fixed random network v(x, t, y) (and [CLS] velocity) that mixes channels non-linearly."""

    def __init__(self, channels, cls_dim=None, seed=0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.num_classes = NUM_CLASSES
        self.mix = torch.randn(channels, channels, generator=g, dtype=torch.float64) / math.sqrt(channels)
        self.label = torch.randn(NUM_CLASSES + 1, channels, generator=g, dtype=torch.float64)
        self.cls_mix = torch.randn(cls_dim, cls_dim, generator=g, dtype=torch.float64) if cls_dim else None
        self.cls_label = torch.randn(NUM_CLASSES + 1, cls_dim, generator=g, dtype=torch.float64) if cls_dim else None
        self.calls = 0

    def forward(self, x, t, y, cls_token=None):
        """t is read in float32, as SiT's timestep embedding does (the published samplers pass t in
        the noise's dtype, ours always in float32)."""
        self.calls += 1
        t = t.float().double()
        tt = t.view(-1, 1, 1, 1)
        h = torch.einsum("oc,nchw->nohw", self.mix, x.double()) + self.label[y][..., None, None] * (1 + tt)
        v = torch.tanh(h) - (1 - tt) * x.double()
        cls_out = None
        if cls_token is not None:
            tc = t.view(-1, 1)
            cls_out = torch.tanh(cls_token.double() @ self.cls_mix + self.cls_label[y] * tc) - cls_token.double()
        return v.to(x.dtype), [], None if cls_out is None else cls_out.to(cls_token.dtype)


def make_inputs(n=6, channels=6, cls_dim=5, hw=3, seed=1):
    """float64 noise, so that both samplers run the model in float64 and agree to rounding."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, channels, hw, hw, generator=g, dtype=torch.float64)
    cls = torch.randn(n, cls_dim, generator=g, dtype=torch.float64) if cls_dim else None
    y = torch.arange(n) % NUM_CLASSES
    return x, y, cls


# ------------------------------------------------------------------ REPA / REG / REGLUE


def published_em(model, x, y, cls, *, num_steps, cfg_scale, low, high, cls_cfg_scale, vae_cfg, seed):
    """REPA/REG/REGLUE ``euler_maruyama_sampler`` on the linear path (see the module docstring)."""
    gen = torch.Generator().manual_seed(seed)
    times = torch.cat([torch.linspace(1.0, 0.04, num_steps, dtype=torch.float64), torch.zeros(1, dtype=torch.float64)])
    x_state = x.double()
    c_state = cls.double() if cls is not None else None
    null = torch.full_like(y, NUM_CLASSES)

    def score(v, xt, t):  # the published get_score_from_velocity on the linear path: alpha/d_alpha = -(1 - t), var = t
        return (-(1 - t) * v - xt) / t

    for i in range(num_steps):
        t, dt = times[i].item(), (times[i + 1] - times[i]).item()
        stochastic = i < num_steps - 1
        guided = cfg_scale > 1.0 and low <= t <= high
        if stochastic:  # drawn before the model call, latent noise first
            eps_x = torch.randn(x_state.shape, generator=gen, dtype=torch.float64)
            eps_c = torch.randn(c_state.shape, generator=gen, dtype=torch.float64) if c_state is not None else None
        xin = torch.cat([x_state, x_state]) if guided else x_state
        cin = (torch.cat([c_state, c_state]) if guided else c_state) if c_state is not None else None
        yin = torch.cat([y, null]) if guided else y
        tin = torch.full((xin.shape[0],), t, dtype=torch.float64)
        dtype = x.dtype  # the published casts the model inputs to the initial noise's dtype
        v, _, cv = model(xin.to(dtype), tin.to(dtype), yin, cls_token=cin.to(dtype) if cin is not None else None)
        drift = v.double() - 0.5 * (2 * t) * score(v.double(), xin, t)
        cdrift = cv.double() - t * score(cv.double(), cin, t) if cin is not None else None
        if guided:
            cond, uncond = drift.chunk(2)
            if vae_cfg and stochastic:
                drift = torch.cat([cond[:, :4] + cfg_scale * (cond[:, :4] - uncond[:, :4]), cond[:, 4:]], dim=1)
            else:
                drift = uncond + cfg_scale * (cond - uncond)
            if cdrift is not None:
                ccond, cuncond = cdrift.chunk(2)
                cdrift = cuncond + cls_cfg_scale * (ccond - cuncond) if cls_cfg_scale > 0 else ccond
        x_state = x_state + drift * dt
        if c_state is not None:
            c_state = c_state + cdrift * dt
        if stochastic:
            x_state = x_state + math.sqrt(2 * t) * math.sqrt(abs(dt)) * eps_x
            if c_state is not None:
                c_state = c_state + math.sqrt(2 * t) * math.sqrt(abs(dt)) * eps_c
    return x_state, c_state


def ours(model, x, y, cls, *, num_steps, seed, **options):
    out = euler_maruyama(model, x, y, cls, num_steps=num_steps, generator=torch.Generator().manual_seed(seed), **options)
    return out[0].double(), (out[1].double() if out[1] is not None else None)


PUBLISHED = {
    # name: (published settings, our settings)
    "reglue-eval.sh": (dict(cfg_scale=2.3, low=0.0, high=0.9, cls_cfg_scale=2.3, vae_cfg=False),
                       dict(cfg_scale=2.3, guidance_interval=(0.0, 0.9), cls_cfg_scale=2.3)),
    "reglue-eval.sh-vae-cfg": (dict(cfg_scale=2.3, low=0.0, high=0.9, cls_cfg_scale=2.3, vae_cfg=True),
                               dict(cfg_scale=2.3, guidance_interval=(0.0, 0.9), cls_cfg_scale=2.3,
                                    guidance_rule="reglue-vae-cfg", guide_channels=4)),
    "reg-eval.sh": (dict(cfg_scale=2.3, low=0.0, high=0.85, cls_cfg_scale=2.3, vae_cfg=False),
                    dict(cfg_scale=2.3, guidance_interval=(0.0, 0.85), cls_cfg_scale=2.3)),
    "cls-conditional-only": (dict(cfg_scale=3.0, low=0.2, high=1.0, cls_cfg_scale=0.0, vae_cfg=True),
                             dict(cfg_scale=3.0, guidance_interval=(0.2, 1.0), cls_cfg_scale=0,
                                  guidance_rule="reglue-vae-cfg", guide_channels=4)),
    "vae-cfg-scale-one-guides-nothing": (dict(cfg_scale=1.0, low=0.0, high=1.0, cls_cfg_scale=2.0, vae_cfg=True),
                                         dict(cfg_scale=1.0, cls_cfg_scale=2.0, guidance_rule="reglue-vae-cfg",
                                              guide_channels=4)),
}


@pytest.mark.parametrize("case", list(PUBLISHED))
def test_sde_equals_the_published_reglue_reg_sampler(case):
    published, options = PUBLISHED[case]
    x, y, cls = make_inputs()
    model = ToyVelocity(6, 5).eval()
    want_x, want_c = published_em(model, x, y, cls, num_steps=30, seed=4, **published)
    got_x, got_c = ours(model, x, y, cls, num_steps=30, seed=4, **options)
    torch.testing.assert_close(got_x, want_x, atol=1e-9, rtol=1e-9)
    torch.testing.assert_close(got_c, want_c, atol=1e-9, rtol=1e-9)


def test_sde_equals_the_published_repa_sampler():
    """REPA README: cfg 1.8, guidance-high 0.7, no [CLS] token."""
    x, y, _ = make_inputs(channels=4, cls_dim=None)
    model = ToyVelocity(4).eval()
    want, _ = published_em(model, x, y, None, num_steps=30, seed=5, cfg_scale=1.8, low=0.0, high=0.7,
                           cls_cfg_scale=0.0, vae_cfg=False)
    got, _ = ours(model, x, y, None, num_steps=30, seed=5, cfg_scale=1.8, guidance_interval=(0.0, 0.7))
    torch.testing.assert_close(got, want, atol=1e-9, rtol=1e-9)


def test_published_vae_cfg_is_standard_s_plus_one_except_on_the_last_step():
    """The README's mapping, made exact: with the last evaluation (t = 0.04) outside the interval the
    published ``--vae_cfg`` at s equals the standard rule at s + 1 on 4 channels; inside it, it does not."""
    x, y, cls = make_inputs()
    model = ToyVelocity(6, 5).eval()
    standard = dict(cfg_scale=3.3, guide_channels=4, cls_cfg_scale=2.3)
    for high_low, equal in (((0.05, 1.0), True), ((0.0, 1.0), False)):
        want, _ = published_em(model, x, y, cls, num_steps=30, seed=6, cfg_scale=2.3, low=high_low[0], high=high_low[1],
                               cls_cfg_scale=2.3, vae_cfg=True)
        got, _ = ours(model, x, y, cls, num_steps=30, seed=6, guidance_interval=high_low, **standard)
        if equal:
            torch.testing.assert_close(got, want, atol=1e-9, rtol=1e-9)
        else:  # the last step guides every channel at s, not the first 4 at s + 1
            assert (got - want)[:, :4].abs().max() > 1e-3 and (got - want)[:, 4:].abs().max() > 1e-3


# ------------------------------------------------------------------ SiT / ReDi


def sit_time_model(model):
    """The toy in SiT's convention: t_sit = 1 - t and velocity d x / d t_sit = -v."""

    def forward(x, t_sit, y):
        v, _, _ = model(x, (1 - t_sit).float(), y)  # our samplers give the model float32 times
        return -v.double()

    return forward


def with_cfg(net, channels):
    """SiT ``forward_with_cfg`` (channels 3) / ReDi ``forward_with_cfg_vae`` (channels 4)."""

    def forward(x, t, y, scale):
        half = x[: len(x) // 2]
        out = net(torch.cat([half, half]), t, y)
        guided_part, rest = out[:, :channels], out[:, channels:]
        cond, uncond = guided_part.chunk(2)
        guided = uncond + scale * (cond - uncond)
        return torch.cat([torch.cat([guided, guided]), rest], dim=1)

    return forward


def with_rg(net):
    """ReDi ``forward_with_rg``: the second half sees the first with channels 4: zeroed; all channels guided."""

    def forward(x, t, y, scale):
        half = x[: len(x) // 2]
        zeroed = half.clone()
        zeroed[:, 4:] = 0
        out = net(torch.cat([half, zeroed]), t, y)
        cond, uncond = out.chunk(2)
        guided = uncond + scale * (cond - uncond)
        return torch.cat([guided, guided])

    return forward


def published_sit_sde(model_fn, x, labels, scale, *, num_steps, seed):
    """SiT/ReDi ``sample_sde`` (Euler, "sigma", "Mean", 0.04) on the doubled batch [x; x].

    Each step draws one Gaussian for the doubled state; only the first half is ever read by the
    model functions, so its noise is drawn from the generator and repeated for the discarded half.
    """
    gen = torch.Generator().manual_seed(seed)
    times = torch.linspace(0.0, 0.96, num_steps, dtype=torch.float64)
    dt = (times[1] - times[0]).item()
    state = torch.cat([x, x]).double()

    def drift(state, t):  # velocity + diffusion * score; diffusion "sigma" = 1 - t; linear score (t v - x) / (1 - t)
        tt = torch.full((state.shape[0],), t, dtype=torch.float64)
        v = model_fn(state, tt, labels, scale)
        return v + (1 - t) * (t * v - state) / (1 - t)

    for t in times[:-1].tolist():
        noise = torch.randn(x.shape, generator=gen, dtype=torch.float64)
        state = state + drift(state, t) * dt + math.sqrt(2 * (1 - t)) * math.sqrt(dt) * torch.cat([noise, noise])
    state = state + drift(state, times[-1].item()) * 0.04  # the "Mean" last step at t = 0.96
    return state[: len(x)]


@pytest.mark.parametrize(("name", "channels"), [("sit-forward_with_cfg", 3), ("redi-forward_with_cfg_vae", 4)])
def test_sde_equals_the_published_sit_and_redi_samplers(name, channels):
    x, y, _ = make_inputs(channels=12 if channels == 4 else 4, cls_dim=None)
    model = ToyVelocity(x.shape[1]).eval()
    labels = torch.cat([y, torch.full_like(y, NUM_CLASSES)])
    want = published_sit_sde(with_cfg(sit_time_model(model), channels), x, labels, 2.4, num_steps=30, seed=7)
    got, _ = ours(model, x, y, None, num_steps=30, seed=7, cfg_scale=2.4, guide_channels=channels)
    torch.testing.assert_close(got, want, atol=2e-5, rtol=2e-5)  # float32 model inputs at 1 - t vs t


def test_representation_guidance_equals_the_published_redi_sampler():
    x, y, _ = make_inputs(channels=12, cls_dim=None)
    model = ToyVelocity(12).eval()
    want = published_sit_sde(with_rg(sit_time_model(model)), x, torch.cat([y, y]), 1.7, num_steps=30, seed=8)
    got, _ = ours(model, x, y, None, num_steps=30, seed=8, representation_guidance_scale=1.7)
    torch.testing.assert_close(got, want, atol=2e-5, rtol=2e-5)
    unguided, _ = ours(model, x, y, None, num_steps=30, seed=8)
    assert (got - unguided).abs().max() > 1e-2, "representation guidance had no effect"
