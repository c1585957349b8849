"""Samplers against an analytic case: per-label Gaussian data, whose exact velocity is closed form.

Data: every pixel of channel c of a label-y image is N(MU[y, c], S[y, c]^2), independently, and the
[CLS] vector is N(CLS_MU[y], CLS_S[y]^2) per dimension; the null label (row 2) is one more Gaussian,
so guidance has a known unconditional branch. Along x_t = alpha x0 + sigma eps:
    x_t ~ N(alpha mu, V), V = alpha^2 s^2 + sigma^2,
    E[x0 | x_t] = mu + alpha s^2 / V (x_t - alpha mu),  E[eps | x_t] = sigma / V (x_t - alpha mu),
    v = d_alpha E[x0 | x_t] + d_sigma E[eps | x_t],      score = -(x_t - alpha mu) / V.
Both v and the SDE drift v - sigma * score are affine in x_t, so every sampler step is an affine
map plus (for the SDE) independent Gaussian noise, guided or not. The output of a sampler started
from x1 is therefore exactly k x1 + c + N(0, q) per coordinate, with (k, c, q) computed below by
scalar recursion: that is the sampler's exact discretised law. The tests check the samplers
against it (to float precision for the ODEs, within sampling error for the SDE) and check that it
is close to the data law (the discretisation error, known exactly here).
"""

import math

import pytest
import torch
from torch import nn

from reglue.diffusion.samplers import euler_maruyama, ode, sample
from reglue.diffusion.transport import interpolant

MU = torch.tensor([[1.0, -0.5, 0.3], [-1.0, 0.8, 0.0], [0.2, 0.1, -0.3]])
S = torch.tensor([[0.5, 1.0, 2.0], [1.5, 0.7, 1.2], [1.0, 1.3, 0.8]])
CLS_MU = torch.tensor([[0.5, -1.0, 0.0, 2.0], [-0.3, 0.4, 1.0, -2.0], [0.0, 0.0, 0.5, 0.0]])
CLS_S = torch.tensor([[1.0, 0.6, 1.8, 0.9], [0.8, 1.4, 0.5, 1.1], [1.0, 1.0, 1.0, 1.0]])
NULL = 2
LABELS = (0, 1)
Z = 5.0  # standard errors allowed by the statistical checks


def gaussian_velocity(x, t, mu, s, path):
    """Exact velocity at (x, t) for data N(mu, s^2); t, mu, s broadcast against x."""
    alpha, sigma, d_alpha, d_sigma = interpolant(t, path)
    var = alpha**2 * s**2 + sigma**2
    mean_x0 = mu + alpha * s**2 / var * (x - alpha * mu)
    mean_eps = sigma / var * (x - alpha * mu)
    return d_alpha * mean_x0 + d_sigma * mean_eps


class GaussianVelocity(nn.Module):
    """The exact velocity model of the data above; records every call (batch, t, y, dtypes)."""

    def __init__(self, path="linear", with_cls=True):
        super().__init__()
        self.path, self.with_cls, self.num_classes = path, with_cls, NULL
        self.calls = []

    def forward(self, x, t, y, cls_token=None):
        self.calls.append(dict(batch=x.shape[0], t=t.clone(), y=y.clone(), x_dtype=x.dtype))
        tx = t.float()[:, None, None, None]
        v = gaussian_velocity(x.float(), tx, MU[y][..., None, None], S[y][..., None, None], self.path)
        cls_out = None
        if self.with_cls and cls_token is not None:
            cls_out = gaussian_velocity(cls_token.float(), t.float()[:, None], CLS_MU[y], CLS_S[y], self.path)
            cls_out = cls_out.to(cls_token.dtype)
        return v.to(x.dtype), [], cls_out


def make_model(path="linear", with_cls=True):
    return GaussianVelocity(path, with_cls).eval()


def make_inputs(n, hw=2, seed=0):
    """x1 (n, 3, hw, hw), labels alternating 0/1, cls1 (n, 4)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 3, hw, hw, generator=g)
    cls = torch.randn(n, 4, generator=g)
    y = torch.arange(n) % 2
    return x, y, cls


# ---------------------------------------------------------------- the exact discretised law


def affine_coeffs(t, path, mu, s, sde):
    """(a, b): the velocity (``sde``: the drift v - g^2/2 score, g^2 = 2t as published) is a x + b at time t."""
    alpha, sigma, d_alpha, d_sigma = (float(u) for u in interpolant(torch.tensor(t, dtype=torch.float64), path))
    var = alpha**2 * s**2 + sigma**2
    a = (d_alpha * alpha * s**2 + d_sigma * sigma) / var
    if sde:
        a += t / var
    return a, d_alpha * mu - a * alpha * mu


def sampler_times(scheme, num_steps):
    if scheme == "sde":
        return torch.linspace(1, 0.04, num_steps, dtype=torch.float64).tolist() + [0.0]
    return torch.linspace(1, 0, num_steps + 1, dtype=torch.float64).tolist()


def exact_law(scheme, num_steps, path, cond, uncond=None, scale=1.0, interval=(0.0, 1.0)):
    """(k, c, q): a sampler started at x1 returns k x1 + c + N(0, q) for one coordinate.

    cond, uncond: (mu, s) of the conditional and null-label Gaussians; guidance with ``scale`` on
    steps whose start time lies inside ``interval`` (both Heun evaluations of a step, as REPA's
    ``euler_sampler`` decides by ``t_cur``).
    """
    sde = scheme == "sde"

    def coeffs(t, step_start):
        a, b = affine_coeffs(t, path, *cond, sde)
        if scale != 1 and interval[0] <= step_start <= interval[1]:
            a_u, b_u = affine_coeffs(t, path, *uncond, sde)
            a, b = a_u + scale * (a - a_u), b_u + scale * (b - b_u)
        return a, b

    times = sampler_times(scheme, num_steps)
    k, c, q = 1.0, 0.0, 0.0
    for i, (t0, t1) in enumerate(zip(times[:-1], times[1:])):
        dt = t1 - t0
        a0, b0 = coeffs(t0, t0)
        if scheme == "heun" and i < num_steps - 1:
            a1, b1 = coeffs(t1, t0)
            step_k = 1 + 0.5 * dt * (a0 + a1 * (1 + a0 * dt))
            step_c = 0.5 * dt * (b0 + a1 * b0 * dt + b1)
        else:
            step_k, step_c = 1 + a0 * dt, b0 * dt
        noise = 0.0
        if sde and i < num_steps - 1:  # g^2 |dt| with g^2 = 2t
            noise = 2 * t0 * abs(dt)
        k, c, q = step_k * k, step_k * c + step_c, step_k**2 * q + noise
    return k, c, q


def exact_tables(scheme, num_steps, path, cfg=1.0, interval=(0.0, 1.0), guide_channels=None, cls_scale=None):
    """(k, c, q) tables indexed [label, channel] for x and [label, dim] for [CLS]."""
    cls_scale = cfg if cls_scale is None else cls_scale

    def table(mu, s, scale_of):
        out = torch.zeros(3, 2, mu.shape[1], dtype=torch.float64)
        for y in LABELS:
            for j in range(mu.shape[1]):
                law = exact_law(scheme, num_steps, path, (mu[y, j].item(), s[y, j].item()),
                                (mu[NULL, j].item(), s[NULL, j].item()), scale_of(j), interval)
                out[:, y, j] = torch.tensor(law, dtype=torch.float64)
        return out

    def x_scale(channel):
        return cfg if guide_channels is None or channel < guide_channels else 1.0

    return table(MU, S, x_scale), table(CLS_MU, CLS_S, lambda _: cls_scale)


def expand(table, y, like):
    """A [label, channel] table indexed by labels y and broadcast like x (N, C, H, W) or cls (N, D)."""
    out = table[y]
    return out.view(*out.shape, *([1] * (like.dim() - 2)))


def assert_moments(samples, mean, var, name, bias_mean=0.0, bias_var=0.0):
    """Sample mean and variance of iid ``samples`` within Z standard errors (+ a known bias) of (mean, var)."""
    samples = samples.double().flatten()
    n = samples.numel()
    tol_mean = Z * math.sqrt(var / n) + bias_mean
    tol_var = Z * var * math.sqrt(2 / (n - 1)) + bias_var
    got_mean, got_var = samples.mean().item(), samples.var().item()
    assert abs(got_mean - mean) <= tol_mean, f"{name}: mean {got_mean:.5f}, want {mean:.5f} +- {tol_mean:.5f}"
    assert abs(got_var - var) <= tol_var, f"{name}: variance {got_var:.5f}, want {var:.5f} +- {tol_var:.5f}"


def groups(x, cls, y):
    """(name, samples, label, index, which) per (label, channel) of x (which 0) and (label, dim) of cls (1)."""
    for label in LABELS:
        for j in range(x.shape[1]):
            yield f"x label {label} channel {j}", x[y == label][:, j], label, j, 0
        for j in range(cls.shape[1]):
            yield f"cls label {label} dim {j}", cls[y == label][:, j], label, j, 1


# ---------------------------------------------------------------- accuracy

GUIDANCE = {
    "none": dict(),
    "cfg": dict(cfg_scale=3.0),
    "cfg-interval": dict(cfg_scale=3.0, guidance_interval=(0.3, 0.7)),
    "cfg-vae-channels-cls-cond": dict(cfg_scale=3.0, guide_channels=2, cls_cfg_scale=0),
    "cfg-own-cls-scale": dict(cfg_scale=3.0, cls_cfg_scale=2.0),
}


def table_kwargs(options):
    cls_scale = options.get("cls_cfg_scale")
    return dict(
        cfg=options.get("cfg_scale", 1.0),
        interval=options.get("guidance_interval", (0.0, 1.0)),
        guide_channels=options.get("guide_channels"),
        cls_scale=1.0 if cls_scale == 0 else cls_scale,
    )


@pytest.mark.parametrize("guidance", list(GUIDANCE))
@pytest.mark.parametrize("method", ["euler", "heun"])
@pytest.mark.parametrize("path", ["linear", "cosine"])
def test_ode_is_the_exact_discrete_map(path, method, guidance):
    """The ODE output equals k x1 + c, the exact composition of its affine steps, guided or not."""
    x1, y, cls1 = make_inputs(64)
    options = GUIDANCE[guidance]
    x0, cls0 = ode(make_model(path), x1, y, cls1, num_steps=12, method=method, path=path, **options)
    (xk, xc, _), (ck, cc, _) = exact_tables(method, 12, path, **table_kwargs(options))
    want_x = expand(xk, y, x1) * x1.double() + expand(xc, y, x1)
    want_cls = expand(ck, y, cls1) * cls1.double() + expand(cc, y, cls1)
    torch.testing.assert_close(x0.double(), want_x, atol=2e-5, rtol=2e-5)
    torch.testing.assert_close(cls0.double(), want_cls, atol=2e-5, rtol=2e-5)


@pytest.mark.parametrize("guidance", ["none", "cfg-interval", "cfg-vae-channels-cls-cond"])
@pytest.mark.parametrize("path", ["linear", "cosine"])
def test_sde_has_the_exact_discrete_law(path, guidance):
    """Euler-Maruyama samples have the mean and variance of the exact discretised law, per group."""
    x1, y, cls1 = make_inputs(8192)
    options = GUIDANCE[guidance]
    gen = torch.Generator().manual_seed(1)
    num_steps = 100
    model = make_model(path)
    x0, cls0 = euler_maruyama(model, x1, y, cls1, num_steps=num_steps, path=path, generator=gen, **options)
    tables = exact_tables("sde", num_steps, path, **table_kwargs(options))
    for name, samples, label, j, which in groups(x0, cls0, y):
        k, c, q = tables[which][:, label, j].tolist()
        assert_moments(samples, c, k**2 + q, name)


# Steps where the scheme's own error is small; the published 250 for the SDE.
DATA_STEPS = {"sde": 250, "euler": 100, "heun": 20}


@pytest.mark.parametrize("sampler", ["sde", "euler", "heun"])
@pytest.mark.parametrize("path", ["linear", "cosine"])
def test_samplers_reproduce_the_data_law(path, sampler):
    """Sample mean and variance match the data within sampling error plus the exact discretisation bias,
    and that bias is small: at most 1% of |mu| + s in the mean and 3.5% of s^2 in the variance (the
    largest is the SDE's fixed deterministic last step 0.04 -> 0 at s = 0.5: 2.3% linear, 3.0% cosine)."""
    x1, y, cls1 = make_inputs(8192)
    num_steps = DATA_STEPS[sampler]
    x0, cls0 = sample(make_model(path), x1, y, cls1, sampler=sampler, num_steps=num_steps, path=path,
                      generator=torch.Generator().manual_seed(2))
    tables = exact_tables(sampler, num_steps, path)
    for name, samples, label, j, which in groups(x0, cls0, y):
        mu, s = ((MU, S), (CLS_MU, CLS_S))[which]
        mu, s = mu[label, j].item(), s[label, j].item()
        k, c, q = tables[which][:, label, j].tolist()
        bias_mean, bias_var = abs(c - mu), abs(k**2 + q - s**2)
        assert bias_mean <= 0.01 * (abs(mu) + s), f"{name}: discretisation bias of the mean {bias_mean}"
        assert bias_var <= 0.035 * s**2, f"{name}: discretisation bias of the variance {bias_var}"
        assert_moments(samples, mu, s**2, name, bias_mean, bias_var)


def pathwise_error(path, method, num_steps):
    """RMS distance of the ODE output to the exact flow map x0 = mu + s x1 (the Gaussian ODE is linear)."""
    x1, y, cls1 = make_inputs(256)
    x0, cls0 = ode(make_model(path), x1, y, cls1, num_steps=num_steps, method=method, path=path)
    err_x = x0.double() - (expand(MU.double(), y, x1) + expand(S.double(), y, x1) * x1.double())
    err_cls = cls0.double() - (CLS_MU.double()[y] + CLS_S.double()[y] * cls1.double())
    return torch.cat([err_x.flatten(), err_cls.flatten()]).pow(2).mean().sqrt().item()


@pytest.mark.parametrize("path", ["linear", "cosine"])
def test_heun_beats_euler_and_both_converge_at_their_order(path):
    errors = {(m, n): pathwise_error(path, m, n) for m in ("euler", "heun") for n in (10, 20)}
    assert errors["heun", 10] < errors["euler", 10] / 3
    # Halving the step divides the error by about 2 (first order) and 4 (second order).
    assert 1.7 < errors["euler", 10] / errors["euler", 20] < 2.3
    assert 3.4 < errors["heun", 10] / errors["heun", 20] < 4.6


# ---------------------------------------------------------------- evaluations and guidance plumbing


def expected_evaluations(sampler, num_steps):
    """(evaluation time, start time of its step) of every model call."""
    times = sampler_times("sde" if sampler == "sde" else "ode", num_steps)
    if sampler != "heun":
        return [(t, t) for t in times[:num_steps]]
    evals = []
    for i in range(num_steps):
        evals += [(times[i], times[i]), (times[i + 1], times[i])] if i < num_steps - 1 else [(times[i], times[i])]
    return evals


@pytest.mark.parametrize(("sampler", "num_steps", "nfe"), [
    ("sde", 2, 2), ("sde", 17, 17), ("euler", 1, 1), ("euler", 17, 17), ("heun", 1, 1), ("heun", 17, 33),
])
def test_evaluation_count_times_and_guided_batches(sampler, num_steps, nfe):
    """NFE: sde and euler num_steps, heun 2 num_steps - 1; a call is a 2N batch [y; null] exactly
    when its step's start time lies in the guidance interval, else N with y; t is (N,) float32."""
    model = make_model()
    x1, y, cls1 = make_inputs(6)
    low, high = 0.33, 0.71  # no grid point on either end
    sample(model, x1, y, cls1, sampler=sampler, num_steps=num_steps, cfg_scale=2.0, guidance_interval=(low, high))
    evaluations = expected_evaluations(sampler, num_steps)
    assert len(model.calls) == len(evaluations) == nfe
    for call, (t, step_start) in zip(model.calls, evaluations):
        guided = low <= step_start <= high
        assert call["batch"] == (12 if guided else 6)
        assert call["t"].dtype == torch.float32 and call["t"].shape == (call["batch"],)
        assert torch.equal(call["t"], torch.full((call["batch"],), t, dtype=torch.float32))
        want_y = torch.cat([y, torch.full_like(y, NULL)]) if guided else y
        assert torch.equal(call["y"], want_y)


@pytest.mark.parametrize(
    ("interval", "guided_calls"), [((1.0, 1.0), [0]), ((0.04, 0.04), [9]), ((0.0, 1.0), list(range(10)))]
)
def test_guidance_interval_is_inclusive(interval, guided_calls):
    model = make_model()
    x1, y, cls1 = make_inputs(4)
    euler_maruyama(model, x1, y, cls1, num_steps=10, cfg_scale=2.0, guidance_interval=interval)
    assert [i for i, call in enumerate(model.calls) if call["batch"] == 8] == guided_calls


def run_sde(model=None, **options):
    x1, y, cls1 = make_inputs(16, hw=3)
    gen = torch.Generator().manual_seed(3)
    return euler_maruyama(model or make_model(), x1, y, cls1, num_steps=20, generator=gen, **options)


def test_scale_one_and_empty_interval_change_nothing_and_cost_nothing():
    x_ref, cls_ref = run_sde()
    for options in (
        dict(cfg_scale=1.0, guide_channels=2, guidance_interval=(0.2, 0.5)),
        dict(cfg_scale=1.0, cls_cfg_scale=0),
        dict(cfg_scale=4.0, guidance_interval=(0.01, 0.03)),  # between the last evaluation (0.04) and 0
    ):
        model = make_model()
        x0, cls0 = run_sde(model, **options)
        assert torch.equal(x0, x_ref) and torch.equal(cls0, cls_ref), options
        assert all(call["batch"] == 16 for call in model.calls), options


def test_guide_channels_and_cls_scale_touch_only_their_part():
    x_ref, cls_ref = run_sde()
    x0, cls0 = run_sde(cfg_scale=4.0, guide_channels=2, cls_cfg_scale=0)
    assert torch.equal(x0[:, 2:], x_ref[:, 2:]), "unguided channels changed"
    assert (x0[:, :2] - x_ref[:, :2]).abs().min() > 0, "guided channels unchanged"
    assert torch.equal(cls0, cls_ref), "cls_cfg_scale=0 must leave [CLS] conditional"
    _, cls_same = run_sde(cfg_scale=4.0)
    _, cls_own = run_sde(cfg_scale=4.0, cls_cfg_scale=2.0)
    assert not torch.equal(cls_same, cls_ref) and not torch.equal(cls_own, cls_same)


def test_cls_only_guidance_batches_when_image_guidance_is_off():
    model = make_model()
    x_ref, _ = run_sde()
    x0, cls0 = run_sde(model, cfg_scale=1.0, cls_cfg_scale=3.0)
    assert all(call["batch"] == 32 for call in model.calls)
    assert torch.equal(x0, x_ref)


def test_seeded_generator_is_deterministic():
    x1, y, cls1 = make_inputs(8)
    def run(seed):
        gen = torch.Generator().manual_seed(seed)
        return euler_maruyama(make_model(), x1, y, cls1, num_steps=10, cfg_scale=2.0, generator=gen)

    runs = [run(7), run(7), run(8)]
    assert torch.equal(runs[0][0], runs[1][0]) and torch.equal(runs[0][1], runs[1][1])
    assert not torch.equal(runs[0][0], runs[2][0]) and not torch.equal(runs[0][1], runs[2][1])


def test_no_cls_token_and_low_precision_inputs():
    model = make_model(with_cls=False)
    x1, y, _ = make_inputs(4)
    for sampler in ("sde", "heun"):
        x0, cls0 = sample(model, x1.bfloat16(), y, sampler=sampler, num_steps=5, cfg_scale=2.0)
        assert cls0 is None and x0.dtype == torch.bfloat16 and x0.shape == x1.shape
    assert all(call["x_dtype"] == torch.bfloat16 and call["t"].dtype == torch.float32 for call in model.calls)


@pytest.mark.parametrize(("options", "message"), [
    (dict(sampler="ddim"), "sampler must be one of"),
    (dict(sampler="sde", num_steps=1), "num_steps"),
    (dict(sampler="euler", num_steps=0), "num_steps"),
    (dict(sampler="heun", num_steps=2.5), "num_steps"),
    (dict(guidance_interval=(0.7, 0.3)), "guidance_interval"),
    (dict(guidance_interval=(-0.1, 0.5)), "guidance_interval"),
    (dict(cfg_scale=0.5), "cfg_scale"),
    (dict(cfg_scale=2.0, cls_cfg_scale=-0.5), "cls_cfg_scale"),
    (dict(guide_channels=0), "guide_channels"),
    (dict(guide_channels=4), "guide_channels"),
    (dict(path="vp"), "path"),
    (dict(guidance_rule="vae"), "guidance_rule must be one of"),
    (dict(cfg_scale=2.0, guidance_rule="reglue-vae-cfg"), "pass guide_channels"),
    (dict(sampler="heun", cfg_scale=2.0, guidance_rule="reglue-vae-cfg", guide_channels=2), "SDE sampler only"),
    (dict(representation_guidance_scale=0.5), "representation_guidance_scale must be >= 1"),
    (dict(representation_guidance_scale=2.0, cfg_scale=2.0), "excludes classifier-free guidance"),
    (dict(representation_guidance_scale=2.0, with_cls=True), r"without a \[CLS\] token"),
    (dict(representation_guidance_scale=2.0), "no semantic channels"),  # x has 3 channels, all "latent"
])
def test_bad_arguments_fail_with_a_clear_message(options, message):
    x1, y, cls1 = make_inputs(2)
    options = dict(options)
    with_cls = options.pop("with_cls", "representation_guidance_scale" not in options)
    with pytest.raises(ValueError, match=message):
        sample(make_model(), x1, y, cls1 if with_cls else None, **options)


def test_bad_models_fail_with_a_clear_message():
    x1, y, cls1 = make_inputs(2)
    with pytest.raises(ValueError, match="training mode"):
        sample(GaussianVelocity(), x1, y, cls1)
    with pytest.raises(ValueError, match="no \\[CLS\\] velocity"):
        sample(make_model(with_cls=False), x1, y, cls1, num_steps=3)
    with pytest.raises(ValueError, match="null_label"):
        sample(lambda x, t, y, cls_token=None: (x, [], None), x1, y, cfg_scale=2.0)
    with pytest.raises(ValueError, match="method"):
        ode(make_model(), x1, y, cls1, method="rk4")


def test_sde_last_step_is_the_drift_alone():
    """Directly: the last interval 0.04 -> 0 adds no noise, it is x + (v - t score) dt from the
    state the model saw at t = 0.04 (latents and [CLS])."""
    from reglue.diffusion.transport import score_from_velocity

    class Recording(GaussianVelocity):
        def forward(self, x, t, y, cls_token=None):
            self.seen = (x.clone(), cls_token.clone())
            return super().forward(x, t, y, cls_token)

    model = Recording("linear").eval()
    x1, y, cls1 = (v.double() if v.is_floating_point() else v for v in make_inputs(64))
    x0, cls0 = euler_maruyama(model, x1, y, cls1, num_steps=5, generator=torch.Generator().manual_seed(3))
    x_last, cls_last = model.seen
    assert model.calls[-1]["t"][0].item() == pytest.approx(0.04)
    v, _, cls_v = model(x_last, torch.full((64,), 0.04, dtype=torch.float64), y, cls_last)
    t, dt = torch.tensor(0.04, dtype=torch.float64), -0.04
    for got, state, vel in ((x0, x_last, v), (cls0, cls_last, cls_v)):
        want = state + (vel - 0.5 * 2 * 0.04 * score_from_velocity(vel, state, t, "linear")) * dt
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
