"""Each method preset is its published recipe: one pinned row per preset, with the source of every value.

Sources (read with ``git show`` at these commits):
  REGLUE giorgospets/reglue @ 90a20d4, REG Martinser/REG @ 021ea2e, REPA sihyun-yu/REPA @ 67f7145,
  ReDi zelaki/ReDi @ 58c65a8, SiT willisma/SiT @ 947f95b.
Steps at ImageNet size: 1,281,167 images // batch 256 = 5004 steps per epoch (drop_last loaders).
SiT-B/2 rows: every paper compares B/2 at 400K iterations without guidance (REPA Table 2, REG,
ReDi, REGLUE); they keep the method's guidance settings so ``--set sample.cfg_scale=S`` guides as
the XL evaluation does.
"""

import dataclasses
import json

import pytest
import torch

from reglue.config import Config, ConfigError, apply_overrides
from reglue.diffusion.samplers import sample
from reglue.models.encoders import build_dinov2
from reglue.presets import PRESETS, STEPS_PER_EPOCH, get_preset
from reglue.train.cli import config_from_args

NOREG = "vit_base_patch14_dinov2"  # torch.hub dinov2_vitb14: REPA utils.py L93, REG utils.py L101 (--enc-type dinov2-vit-b)
REG4 = "vit_base_patch14_reg4_dinov2"  # torch.hub dinov2_vitb14_reg: REGLUE utils.py L64, ReDi train_redi.py L67
NO_CFG = dict(cfg=1.0, cls_cfg=None)  # B/2: reported without guidance


@dataclasses.dataclass(frozen=True)
class Row:
    encoder: str | None
    layers: tuple | None
    semantic_channels: int | None
    lambda_semantic: float | None
    milestones: tuple
    lambda_cls: float | None
    lambda_align: float | None
    encoder_depth: int | None
    grad_clip: float
    steps: int
    sampler: str
    sample_steps: int
    cfg: float
    cls_cfg: float | None
    interval: tuple
    guide_channels: int | None
    rule: str = "standard"


def sit_row(size, **sample):
    # latents only; no clipping: train.py L251-253 (backward, step); 1400 epochs: train.py L324 (FID 2.06, README L55)
    # evaluation: SDE 250 (sample_ddp.py L217), sigma diffusion + Mean last step (train_utils.py L25-31),
    # cfg 1.5 (SiT paper, FID-2.06 row), guidance on the first 3 channels at all t (models.py L261)
    steps = 1400 * STEPS_PER_EPOCH if size == "xl" else 400_000
    s = dict(cfg=1.5, cls_cfg=None) | sample
    return Row(None, None, None, None, (), None, None, None, 0.0, steps, "sde", 250, s["cfg"], s["cls_cfg"], (0.0, 1.0), 3)


def repa_row(size, **sample):
    # final-layer patch tokens (train.py L303); lambda_align 0.5 (README L51); encoder depth 4 / 8 (README L52);
    # clip 1.0 (train.py L423); 4M iterations (README L138); eval SDE 250, cfg 1.8, [0, 0.7] (README L132-135)
    steps = 4_000_000 if size == "xl" else 400_000
    s = dict(cfg=1.8, cls_cfg=None) | sample
    return Row(NOREG, (11,), None, None, (), None, 0.5, 8 if size == "xl" else 4, 1.0, steps, "sde", 250,
               s["cfg"], s["cls_cfg"], (0.0, 0.7), None)


def redi_row(size, **sample):
    # final-layer patch tokens (train_redi.py L300), PCA rank 8 (L396), lambda_s 1 (transport.py L161), no clip
    # (train_redi.py L337-339); 600 epochs (README L76); eval SDE 250, cfg 2.4 --cfg-vae True (README L97):
    # forward_with_cfg_vae guides channels :4 at all t (models.py L309-327)
    steps = 600 * STEPS_PER_EPOCH if size == "xl" else 400_000
    s = dict(cfg=2.4, cls_cfg=None) | sample
    return Row(REG4, (11,), 8, 1.0, (), None, None, None, 0.0, steps, "sde", 250, s["cfg"], s["cls_cfg"], (0.0, 1.0), 4)


def reg_row(size, **sample):
    # [CLS] + patch tokens (train.py L304-308); lambda_cls 0.03, lambda_align 0.5 (train.sh L21, L15); depth 8 (L16)
    # clip 1.0 (train.py L420); 4M (eval.sh L4); eval SDE 250, cfg 2.3, [CLS] 2.3, [0, 0.85] (eval.sh L7-11)
    steps = 4_000_000 if size == "xl" else 400_000
    s = dict(cfg=2.3, cls_cfg=2.3) | sample
    return Row(NOREG, (11,), None, None, (), 0.03, 0.5, 8 if size == "xl" else 4, 1.0, steps, "sde", 250,
               s["cfg"], s["cls_cfg"], (0.0, 0.85), None)


def reglue_row(size, **sample):
    # blocks 8-11, 16 channels (train.sh L21-23); lambda_s 1 (train.py L480), XL x0.5 at 250k, x0.25 at 500k
    # (train.py L349-355); lambda_cls 0.03, lambda_align 0.5 (train.sh L18, L12); depth 8 (L13); clip 1.0
    # (train.py L458); 1M (eval.sh L2, README L128); eval SDE 250, cfg 2.3, [CLS] 2.3, VAE_CFG false, [0, 0.9]
    # (eval.sh L4-10)
    xl = size == "xl"
    s = dict(cfg=2.3, cls_cfg=2.3) | sample
    return Row(REG4, (8, 9, 10, 11), 16, 1.0, ((250_000, 0.5), (500_000, 0.25)) if xl else (), 0.03, 0.5,
               8 if xl else 4, 1.0, 1_000_000 if xl else 400_000, "sde", 250, s["cfg"], s["cls_cfg"], (0.0, 0.9), None)


RECIPES = {
    "sit-xl-2": sit_row("xl"), "sit-b-2": sit_row("b", **NO_CFG),
    "repa-sit-xl-2": repa_row("xl"), "repa-sit-b-2": repa_row("b", **NO_CFG),
    "redi-sit-xl-2": redi_row("xl"), "redi-sit-b-2": redi_row("b", **NO_CFG),
    "reg-sit-xl-2": reg_row("xl"), "reg-sit-b-2": reg_row("b", **NO_CFG),
    "reglue-sit-xl-2": reglue_row("xl"), "reglue-sit-b-2": reglue_row("b", **NO_CFG),
}


def row_of(cfg: Config) -> Row:
    """The recipe a config trains and evaluates with; None where the method does not use a part."""
    m, e, s = cfg.method, cfg.encoders, cfg.sample
    semantic = m.semantic != "none"
    return Row(
        encoder=e.dinov2 if m.needs_dinov2 else None,
        layers=e.feature_layers if m.needs_dinov2 else None,
        semantic_channels=m.semantic_channels if semantic else None,
        lambda_semantic=m.lambda_semantic if semantic else None,
        milestones=m.semantic_milestones,
        lambda_cls=m.lambda_cls if m.use_cls else None,
        lambda_align=m.lambda_align if m.use_align else None,
        encoder_depth=cfg.model.encoder_depth if m.use_align else None,
        grad_clip=cfg.optim.grad_clip,
        steps=cfg.train.max_steps,
        sampler=s.sampler, sample_steps=s.steps, cfg=s.cfg_scale, cls_cfg=s.cls_cfg_scale,
        interval=s.guidance_interval, guide_channels=s.guide_channels, rule=s.guidance_rule,
    )


def test_every_method_preset_has_a_pinned_recipe():
    assert set(RECIPES) == set(PRESETS) - {"tiny"}


@pytest.mark.parametrize("name", sorted(RECIPES))
def test_preset_is_its_published_recipe(name):
    assert row_of(get_preset(name)) == RECIPES[name]


@pytest.mark.parametrize("name", sorted(RECIPES))
def test_what_every_published_recipe_shares(name):
    cfg = get_preset(name)
    o, t, m = cfg.optim, cfg.train, cfg.method
    # AdamW lr 1e-4, betas (0.9, 0.999), eps 1e-8, no weight decay (REPA train.py L418-422; SiT train.py L181)
    assert (o.lr, o.beta1, o.beta2, o.eps, o.weight_decay, o.warmup_steps) == (1e-4, 0.9, 0.999, 1e-8, 0.0, 0)
    # batch 256, EMA 0.9999, label dropout 0.1, linear path, uniform t (REPA train.py L407, L434; SiT train.py L325)
    assert (t.global_batch_size, t.ema_decay, cfg.model.class_dropout_prob) == (256, 0.9999, 0.1)
    assert (m.path, m.t_sampling, cfg.data.image_size, cfg.encoders.vae) == ("linear", "uniform", 256, "stabilityai/sd-vae-ft-ema")
    # ReDi feature dropout and representation guidance exist but are off by default (train_redi.py L410, sample_ddp.py)
    assert m.semantic_dropout_prob == 0 and cfg.sample.representation_guidance_scale == 1
    if m.needs_dinov2:  # the architecture and the pretrained weights name the same network
        assert cfg.encoders.dinov2_weights.split("/")[-1].split(".")[0] == cfg.encoders.dinov2
    assert cfg.model.arch == ("SiT-XL/2" if "-xl-" in name else "SiT-B/2")


def test_xl_reglue_reaches_both_semantic_weight_milestones():
    cfg = get_preset("reglue-sit-xl-2")
    assert [cfg.method.semantic_weight(s) for s in (0, 250_000, cfg.train.max_steps - 1)] == [1.0, 0.5, 0.25]


def test_print_config_shows_the_evaluation_sampler(capsys):
    from reglue.train.cli import main

    assert main(["--preset", "reg-sit-xl-2", "--print-config"]) == 0
    sample_section = json.loads(capsys.readouterr().out)["sample"]
    assert sample_section == {"sampler": "sde", "steps": 250, "cfg_scale": 2.3, "cls_cfg_scale": 2.3,
                              "guidance_interval": [0.0, 0.85], "guide_channels": None, "guidance_rule": "standard",
                              "representation_guidance_scale": 1.0}


class PresetShapedVelocity(torch.nn.Module):
    """A toy model with a preset's channels and [CLS] width, to run its sample section end to end."""

    def __init__(self, channels, cls_dim, num_classes=1000):
        super().__init__()
        self.num_classes, self.cls_dim = num_classes, cls_dim
        self.weight = torch.linspace(-1, 1, channels).view(1, -1, 1, 1)

    def forward(self, x, t, y, cls_token=None):
        v = torch.tanh(x * self.weight + y.view(-1, 1, 1, 1) / self.num_classes) - t.view(-1, 1, 1, 1)
        return v, [], (cls_token * 0.5 if cls_token is not None else None)


@pytest.mark.parametrize("name", sorted(RECIPES))
def test_the_sample_section_drives_the_sampler(name):
    cfg = get_preset(name)
    model = PresetShapedVelocity(cfg.in_channels, cfg.encoders.embed_dim if cfg.method.use_cls else 0).eval()
    x = torch.randn(2, cfg.in_channels, 2, 2)
    cls = torch.randn(2, model.cls_dim) if model.cls_dim else None
    options = cfg.sample.sampler_options() | {"num_steps": 4}
    out, cls_out = sample(model, x, torch.tensor([1, 7]), cls, generator=torch.Generator().manual_seed(0), **options)
    assert out.shape == x.shape and torch.isfinite(out).all() and (cls_out is None) == (cls is None)


def test_the_published_vae_cfg_variant_and_redi_options_are_one_override_away():
    cfg = apply_overrides(get_preset("reglue-sit-xl-2"), {"sample.guidance_rule": "reglue-vae-cfg", "sample.guide_channels": "4"})
    assert cfg.sample.sampler_options()["guidance_rule"] == "reglue-vae-cfg"
    cfg = apply_overrides(get_preset("redi-sit-xl-2"), {"method.semantic_dropout_prob": "0.2",
                                                       "sample.cfg_scale": "1", "sample.representation_guidance_scale": "1.5"})
    assert cfg.sample.representation_guidance_scale == 1.5


@pytest.mark.parametrize(("preset", "overrides", "field"), [
    ("reglue-sit-xl-2", {"sample.guidance_rule": "reglue-vae-cfg"}, "sample.guidance_rule"),  # needs guide_channels
    ("reglue-sit-xl-2", {"sample.guidance_rule": "reglue-vae-cfg", "sample.guide_channels": "4",
                         "sample.sampler": "heun"}, "sample.guidance_rule"),
    ("reglue-sit-xl-2", {"sample.guidance_rule": "vae"}, "sample.guidance_rule"),
    ("reglue-sit-xl-2", {"sample.guidance_rule": "reglue-vae-cfg", "sample.guide_channels": "4",
                         "train.eval_every": "1000", "train.eval_sampler": "euler"}, "train.eval_sampler"),
    ("redi-sit-xl-2", {"sample.representation_guidance_scale": "1.5", "sample.cfg_scale": "1"},
     "sample.representation_guidance_scale"),  # the model was not trained with feature dropout
    ("redi-sit-xl-2", {"method.semantic_dropout_prob": "0.2", "sample.representation_guidance_scale": "1.5"},
     "sample.representation_guidance_scale"),  # excludes CFG (cfg 2.4 in the preset)
    ("redi-sit-xl-2", {"sample.representation_guidance_scale": "0.5"}, "sample.representation_guidance_scale"),
    ("reglue-sit-xl-2", {"method.semantic_dropout_prob": "0.2", "sample.cfg_scale": "1",
                         "sample.representation_guidance_scale": "1.5"}, "sample.representation_guidance_scale"),
    ("repa-sit-xl-2", {"method.semantic_dropout_prob": "0.2"}, "method.semantic_dropout_prob"),
    ("redi-sit-xl-2", {"method.semantic_dropout_prob": "1.0"}, "method.semantic_dropout_prob"),
])
def test_bad_recipe_options_name_the_field(preset, overrides, field):
    with pytest.raises(ConfigError, match=field.replace(".", r"\.")):
        apply_overrides(get_preset(preset), overrides)


def test_bad_recipe_flags_stop_train_py(capsys):
    with pytest.raises(SystemExit):
        config_from_args(["--preset", "reglue-sit-xl-2", "--set", "sample.guidance_rule=reglue-vae-cfg"])
    assert "sample.guide_channels=4" in capsys.readouterr().err


@pytest.mark.parametrize("arch", [NOREG, REG4])
def test_encoder_token_layout_with_and_without_registers(arch):
    """[CLS], then the patch tokens; registers (REG4 only) never reach the features, [CLS] or tokens.
    Checked against timm's own forward on a tiny random network of the preset's architecture."""
    torch.manual_seed(0)
    encoder = build_dinov2(arch, None, image_size=64, layers=(1, 3), embed_dim=32, depth=4, num_heads=2)
    registers = {NOREG: 0, REG4: 4}[arch]
    assert encoder.model.num_prefix_tokens == 1 + registers
    images = torch.randint(0, 256, (2, 3, 64, 64), dtype=torch.uint8)
    out = encoder(images)
    normed = encoder.model.forward_features(encoder.preprocess(images))  # (N, 1 + registers + 16, 32)
    assert out.tokens.shape == (2, 17, 32) and out.features.shape == (2, 64, 4, 4)
    torch.testing.assert_close(out.cls, normed[:, 0])
    torch.testing.assert_close(out.tokens[:, 1:], normed[:, 1 + registers:])
    torch.testing.assert_close(out.features[:, 32:].flatten(2).transpose(1, 2), normed[:, 1 + registers:])
