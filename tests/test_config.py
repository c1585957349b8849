"""Config validation, presets, overrides and the train.py flags."""

import json

import pytest

from reglue.config import Config, ConfigError, ModelConfig, SampleConfig, TrainConfig, apply_overrides
from reglue.presets import PRESETS, get_preset
from reglue.train.cli import config_from_args


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_presets_are_valid_and_round_trip(name):
    cfg = get_preset(name)
    assert Config.from_dict(cfg.to_dict()) == cfg


@pytest.mark.parametrize("method,in_ch,cls,align", [
    ("sit", 4, False, False), ("repa", 4, False, True), ("redi", 12, False, False),
    ("reg", 4, True, True), ("reglue", 20, True, True),
])
@pytest.mark.parametrize("size,depth", [("b", 4), ("xl", 8)])
def test_method_presets(method, in_ch, cls, align, size, depth):
    cfg = get_preset(f"{method}-sit-{size}-2" if method != "sit" else f"sit-{size}-2")
    assert cfg.in_channels == in_ch
    assert cfg.method.use_cls is cls and cfg.method.use_align is align
    assert cfg.model.encoder_depth == depth
    assert cfg.model.arch == f"SiT-{size.upper()}/2"
    if method == "reglue" and size == "xl":
        assert cfg.method.semantic_weight(600_000) == 0.25


@pytest.mark.parametrize("overrides,field", [
    ({"model.kernels": "cuda"}, "model.kernels"),
    ({"model.encoder_depth": "0"}, "model.encoder_depth"),
    ({"model.arch": "SiT-XXL/2"}, "model.arch"),
    ({"train.global_batch_size": "0"}, "train.global_batch_size"),
    ({"train.ema_decay": "1.5"}, "train.ema_decay"),
    ({"method.name": "dit"}, "method.name"),
    ({"optim.lr": "-1"}, "optim.lr"),
    ({"model.patch_size": "4"}, "model.patch_size"),  # alignment needs the 8x8 token grid (patch 1)
    ({"sample.guidance_interval": "(0.8, 0.2)"}, "sample.guidance_interval"),
    ({"sample.cfg_scale": "0.5"}, "sample.cfg_scale"),
    ({"sample.sampler": "ddim"}, "sample.sampler"),
    ({"train.eval_sampler": "ddim"}, "train.eval_sampler"),
    ({"model.nonexistent": "1"}, "model.nonexistent"),
    ({"model.mlp_gelu": "erf"}, "model.mlp_gelu"),
    ({"train.max_steps": "ten"}, "train.max_steps"),
])
def test_bad_values_name_the_field(overrides, field):
    with pytest.raises(ConfigError, match=field.replace(".", r"\.")):
        apply_overrides(get_preset("tiny"), overrides)


def test_alignment_grid_follows_the_dinov2_patch_size():
    """The token grid must equal DINOv2's patch grid, whose patch is 14 unless the (random) encoder's
    overrides say otherwise: the tiny preset's patch-7 DINOv2 has an 8x8 grid on 64 px images, so
    SiT patch 1 aligns and patch 2 is refused with the patch size that fits; a patch-14 DINOv2
    (4x4) needs patch 2."""
    cfg = get_preset("tiny")
    assert (cfg.model.patch_size, cfg.encoders.dinov2_overrides["patch_size"]) == (1, 7)
    with pytest.raises(ConfigError, match=r"token grid \(4x4\) to equal the DINOv2 patch grid \(8x8\); use patch size 1"):
        apply_overrides(cfg, {"model.patch_size": "2"})
    patch14 = {**cfg.encoders.dinov2_overrides, "patch_size": 14}
    with pytest.raises(ConfigError, match=r"\(8x8\) to equal the DINOv2 patch grid \(4x4\); use patch size 2"):
        apply_overrides(cfg, {"encoders.dinov2_overrides": json.dumps(patch14)})
    assert apply_overrides(cfg, {"encoders.dinov2_overrides": json.dumps(patch14), "model.patch_size": "2"}).model.patch_size == 2


def test_custom_arch_requires_sizes():
    with pytest.raises(ConfigError, match="model.depth"):
        ModelConfig(arch="custom")


def test_overrides_parse_types():
    cfg = apply_overrides(get_preset("tiny"), {"model.qk_norm": "true",
                                               "optim.lr": "3e-4", "encoders.feature_layers": "(0, 3)",
                                               "train.micro_batch_size": "none"})
    assert cfg.model.qk_norm is True and cfg.optim.lr == 3e-4 and cfg.encoders.feature_layers == (0, 3)
    assert cfg.train.micro_batch_size is None


def test_train_flags():
    cfg, _ = config_from_args(["--max-steps", "7", "--kernels", "triton", "--no-compile", "--seed", "3",
                               "--set", "model.qk_norm=1", "--resume", "none", "--out", "/tmp/x"])
    assert (cfg.train.max_steps, cfg.model.kernels, cfg.parallel.compile, cfg.train.seed) == (7, "triton", False, 3)
    assert cfg.model.qk_norm and cfg.train.resume == "none" and cfg.train.out_dir == "/tmp/x"


def test_bad_flag_exits_with_field_name(capsys):
    with pytest.raises(SystemExit):
        config_from_args(["--set", "train.keep_last=0"])
    assert "train.keep_last" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        config_from_args(["--set", "nonsense"])


def test_train_config_defaults_match_paper():
    t = TrainConfig()
    assert t.ema_decay == 0.9999 and SampleConfig().steps == 250 and SampleConfig().sampler == "sde"
