"""Interpolants, score conversion, and the named loss components."""

import pytest
import torch

from reglue.config import MethodConfig
from reglue.diffusion.transport import (
    Noise,
    alignment_loss,
    draw_noise,
    interpolant,
    sample_t,
    score_from_velocity,
    training_losses,
)
from tests.conftest import assert_close


@pytest.mark.parametrize("path", ["linear", "cosine"])
def test_interpolant_endpoints_and_derivatives(path):
    t = torch.linspace(0.01, 0.99, 50, dtype=torch.float64)
    alpha, sigma, d_alpha, d_sigma = interpolant(t, path)
    h = 1e-6
    a_p, s_p, _, _ = interpolant(t + h, path)
    a_m, s_m, _, _ = interpolant(t - h, path)
    assert_close(d_alpha, (a_p - a_m) / (2 * h), atol=1e-6)
    assert_close(d_sigma, (s_p - s_m) / (2 * h), atol=1e-6)
    a0, s0, _, _ = interpolant(torch.tensor([0.0, 1.0], dtype=torch.float64), path)
    assert_close(a0, torch.tensor([1.0, 0.0]), atol=1e-12)
    assert_close(s0, torch.tensor([0.0, 1.0]), atol=1e-12)


@pytest.mark.parametrize("path", ["linear", "cosine"])
def test_score_from_velocity_matches_gaussian_score(path):
    # x0 ~ N(0, s^2): p_t = N(0, alpha^2 s^2 + sigma^2), exact velocity from E[x0|x], E[eps|x]
    s2 = 0.25
    t = torch.tensor([0.2, 0.5, 0.9], dtype=torch.float64)[:, None]
    x = torch.randn(3, 7, dtype=torch.float64)
    alpha, sigma, d_alpha, d_sigma = interpolant(t, path)
    var = alpha**2 * s2 + sigma**2
    v = d_alpha * alpha * s2 / var * x + d_sigma * sigma / var * x
    assert_close(score_from_velocity(v, x, t, path), -x / var, atol=1e-9)


def test_sample_t_ranges():
    g = torch.Generator().manual_seed(0)
    for kind in ("uniform", "lognormal"):
        t = sample_t(1000, kind, generator=g)
        assert t.min() > 0 and t.max() < 1
    with pytest.raises(ValueError, match="t sampling"):
        sample_t(3, "beta")


class Oracle(torch.nn.Module):
    """Returns exactly the velocity target and the alignment targets: all regression losses are 0."""

    def __init__(self, x0, eps, cls, cls_eps, align, path):
        super().__init__()
        self.x0, self.eps, self.cls, self.cls_eps, self.align, self.path = x0, eps, cls, cls_eps, align, path

    def forward(self, xt, t, y, cls_token=None, force_drop=None):
        _, _, da, ds = (v.view(-1, 1, 1, 1) for v in interpolant(t, self.path))
        out = da * self.x0 + ds * self.eps
        cls_out = None
        if self.cls is not None:
            cda, cds = da.view(-1, 1), ds.view(-1, 1)
            cls_out = cda * self.cls + cds * self.cls_eps
        return out, [a * 3.0 for a in self.align], cls_out


@pytest.mark.parametrize("path", ["linear", "cosine"])
def test_loss_components_zero_for_oracle(path):
    n = 4
    g = torch.Generator().manual_seed(1)
    noise = draw_noise(n, (6, 4, 4), 5, 0.1, g, "cpu")
    latents, semantic, cls = torch.randn(n, 4, 4, 4), torch.randn(n, 2, 4, 4), torch.randn(n, 5)
    align = [torch.randn(n, 9, 7)]
    model = Oracle(torch.cat([latents, semantic], 1), noise.eps, cls, noise.cls_eps, align, path)
    losses = training_losses(model, latents, torch.zeros(n, dtype=torch.long), noise, semantic=semantic, cls=cls,
                             align_targets=align, path=path)
    for k in ("latent", "semantic", "cls"):
        assert losses[k].item() == pytest.approx(0.0, abs=1e-10), k
    assert losses["align"].item() == pytest.approx(-1.0, abs=1e-6)
    assert losses["total"].item() == pytest.approx(-0.5, abs=1e-6)


def test_loss_weights_and_split_by_channels():
    n = 3
    g = torch.Generator().manual_seed(2)
    noise = draw_noise(n, (6, 2, 2), 5, 0.0, g, "cpu")

    class Zero(torch.nn.Module):
        def forward(self, xt, t, y, cls_token=None, force_drop=None):
            return torch.zeros_like(xt), [torch.ones(n, 4, 3)], torch.zeros(n, 5)

    latents, semantic, cls = torch.randn(n, 4, 2, 2), torch.randn(n, 2, 2, 2), torch.randn(n, 5)
    target_align = [torch.randn(n, 4, 3)]
    losses = training_losses(Zero(), latents, torch.zeros(n, dtype=torch.long), noise, semantic=semantic, cls=cls,
                             align_targets=target_align, semantic_weight=0.7, cls_weight=0.03, align_weight=0.5)
    t = noise.t.view(-1, 1, 1, 1)
    x0 = torch.cat([latents, semantic], 1)
    target = noise.eps - x0  # linear path velocity
    assert_close(losses["latent"], (target[:, :4] ** 2).mean())
    assert_close(losses["semantic"], (target[:, 4:] ** 2).mean())
    assert_close(losses["cls"], ((noise.cls_eps - cls) ** 2).mean())
    cos = torch.nn.functional.cosine_similarity(torch.ones(n, 4, 3), target_align[0], dim=-1)
    assert_close(losses["align"], -cos.mean())
    want = losses["latent"] + 0.7 * losses["semantic"] + 0.03 * losses["cls"] + 0.5 * losses["align"]
    assert_close(losses["total"], want)
    assert t.shape[0] == n


def test_missing_components_are_zero_and_no_cls_noise_needed():
    n = 2
    noise = draw_noise(n, (4, 2, 2), 0, 0.0, torch.Generator().manual_seed(0), "cpu")
    assert noise.cls_eps is None and noise.drop is None

    class M(torch.nn.Module):
        def forward(self, xt, t, y, cls_token=None, force_drop=None):
            assert cls_token is None
            return xt * 0, [], None

    losses = training_losses(M(), torch.randn(n, 4, 2, 2), torch.zeros(n, dtype=torch.long), noise)
    assert losses["semantic"] == 0 and losses["cls"] == 0 and losses["align"] == 0
    assert losses["total"] == losses["latent"]


def test_alignment_loss_shape_mismatch_is_clear():
    with pytest.raises(ValueError, match="does not match alignment target"):
        alignment_loss([torch.randn(2, 5, 3)], [torch.randn(2, 4, 3)])


def test_noise_slices_compose():
    noise = draw_noise(8, (3, 2, 2), 4, 0.5, torch.Generator().manual_seed(3), "cpu")
    part = noise.slice(2, 6)
    assert torch.equal(part.eps, noise.eps[2:6]) and torch.equal(part.drop, noise.drop[2:6])


def test_semantic_weight_milestones():
    m = MethodConfig(name="reglue", semantic_milestones=((250_000, 0.5), (500_000, 0.25)))
    assert [m.semantic_weight(s) for s in (0, 249_999, 250_000, 499_999, 500_000, 900_000)] == [1, 1, 0.5, 0.5, 0.25, 0.25]


@pytest.mark.parametrize("path", ["linear", "cosine"])
def test_lognormal_t_has_lognormal_snr(path):
    # sigma_t / alpha_t = e^z with z ~ N(mean, std^2) on both paths
    t = sample_t(20000, "lognormal", generator=torch.Generator().manual_seed(0), mean=-0.4, std=1.2, path=path)
    alpha, sigma, _, _ = interpolant(t.double(), path)
    z = torch.log(sigma / alpha)
    assert abs(z.mean().item() + 0.4) < 0.03 and abs(z.std().item() - 1.2) < 0.03


# ---------------------------------------------------------------- ReDi semantic (feature) dropout


def test_semantic_dropout_mask_is_drawn_last_and_at_its_rate():
    """Turning the option on changes no other draw (t, noise, label dropout), so runs without it are unchanged."""
    args = (4096, (6, 2, 2), 5, 0.1)
    off = draw_noise(*args, torch.Generator().manual_seed(4), "cpu")
    on = draw_noise(*args, torch.Generator().manual_seed(4), "cpu", semantic_dropout_prob=0.2)
    assert off.semantic_drop is None
    for name in ("t", "eps", "cls_eps", "drop"):
        assert torch.equal(getattr(off, name), getattr(on, name)), name
    assert on.semantic_drop.dtype == torch.bool and abs(on.semantic_drop.float().mean().item() - 0.2) < 0.03
    assert torch.equal(on.slice(5, 9).semantic_drop, on.semantic_drop[5:9])


class Recorder(torch.nn.Module):
    """A fixed function of its input (so losses are non-trivial) that keeps the inputs it saw."""

    def forward(self, xt, t, y, cls_token=None, force_drop=None):
        self.xt = xt
        return torch.tanh(xt) * 0.5, [], None


def redi_batch_loss(latents, semantic, eps, t, dropped: bool):
    """ReDi ``transport.training_losses`` for one batch (zelaki/ReDi @ 58c65a8 L134-161), written in
    SiT's time s = 1 - t (x_s = s x1 + (1 - s) x0, u = x1 - x0) with the model above read in our
    time: a dropped batch has its clean features zeroed and lam = 0."""
    x1 = torch.cat([latents, semantic], 1).clone()
    lam = 1.0
    if dropped:
        lam = 0.0
        x1[:, 4:] = 0
    s = (1 - t).view(-1, 1, 1, 1)
    xs = s * x1 + (1 - s) * eps
    u = x1 - eps
    out = -(torch.tanh(xs) * 0.5)  # our velocity d x / d t is minus SiT's d x / d s
    per_sample = ((out[:, :4] - u[:, :4]) ** 2).mean(dim=(1, 2, 3)) + lam * ((out[:, 4:] - u[:, 4:]) ** 2).mean(dim=(1, 2, 3))
    return per_sample.mean()


def test_semantic_dropout_is_redis_rule_applied_per_sample():
    """Our per-sample dropout equals ReDi's per-batch rule run on batches of one sample, averaged:
    dropped samples see only noise in the semantic channels and add no semantic loss."""
    n = 64
    noise = draw_noise(n, (6, 2, 2), 0, 0.0, torch.Generator().manual_seed(5), "cpu", semantic_dropout_prob=0.5)
    assert 0 < noise.semantic_drop.sum() < n
    latents, semantic = torch.randn(n, 4, 2, 2), torch.randn(n, 2, 2, 2)
    model = Recorder()
    losses = training_losses(model, latents, torch.zeros(n, dtype=torch.long), noise, semantic=semantic)
    dropped = noise.semantic_drop
    t = noise.t.view(-1, 1, 1, 1)
    assert_close(model.xt[dropped][:, 4:], (t * noise.eps)[dropped][:, 4:])
    assert_close(model.xt[~dropped][:, 4:], ((1 - t) * semantic + t * noise.eps[:, 4:])[~dropped])
    want = torch.stack([redi_batch_loss(latents[i:i + 1], semantic[i:i + 1], noise.eps[i:i + 1], noise.t[i:i + 1],
                                        bool(dropped[i])) for i in range(n)]).mean()
    assert_close(losses["total"], want, atol=1e-6, rtol=1e-6)
    kept = ~dropped
    err = (torch.tanh(model.xt) * 0.5 - (noise.eps - torch.cat([latents, semantic * kept.view(-1, 1, 1, 1)], 1))) ** 2
    assert_close(losses["semantic"], (err[:, 4:].mean(dim=(1, 2, 3)) * kept).sum() / n, atol=1e-6, rtol=1e-6)


def test_semantic_dropout_of_every_sample_leaves_the_latent_loss_alone():
    n = 8
    g = torch.Generator().manual_seed(6)
    base = draw_noise(n, (6, 2, 2), 0, 0.0, g, "cpu")
    all_dropped = Noise(base.t, base.eps, None, None, torch.ones(n, dtype=torch.bool))
    latents, semantic = torch.randn(n, 4, 2, 2), torch.randn(n, 2, 2, 2)
    with_drop = training_losses(Recorder(), latents, torch.zeros(n, dtype=torch.long), all_dropped, semantic=semantic)
    without = training_losses(Recorder(), latents, torch.zeros(n, dtype=torch.long), base, semantic=semantic)
    assert with_drop["semantic"] == 0 and with_drop["total"] == with_drop["latent"]
    assert_close(with_drop["latent"], without["latent"])
    assert without["semantic"] > 0


@pytest.mark.parametrize("cls_dim, dropout, semantic_dropout", [(4, 0.5, 0.3), (0, 0.0, 0.0)])
def test_noise_slice_takes_the_same_rows_of_every_field(cls_dim, dropout, semantic_dropout):
    """Every field of a slice is rows [start, stop) of the global draw (t, eps, [CLS] noise,
    label-dropout mask, semantic-dropout mask), and absent fields stay absent."""
    noise = draw_noise(10, (3, 2, 2), cls_dim, dropout, torch.Generator().manual_seed(4), "cpu",
                       semantic_dropout_prob=semantic_dropout)
    for start, stop in ((0, 10), (3, 7), (9, 10)):
        part = noise.slice(start, stop)
        assert torch.equal(part.t, noise.t[start:stop]) and torch.equal(part.eps, noise.eps[start:stop])
        if cls_dim:
            assert torch.equal(part.cls_eps, noise.cls_eps[start:stop]) and torch.equal(part.drop, noise.drop[start:stop])
        else:
            assert part.cls_eps is None and part.drop is None
        if semantic_dropout:
            assert torch.equal(part.semantic_drop, noise.semantic_drop[start:stop])
        else:
            assert part.semantic_drop is None
