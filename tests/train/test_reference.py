"""``--reference``: each preset trains in its recipe's precision, a non-finite step does what the
published loop does (accelerate's loss scaler for the fp16 recipes), the frozen encoders and the
compressor run as published, DDP's ``find_unused_parameters`` as published, and sample grids and
in-training evaluation are drawn in fp32 as the published ``generate.py``.

Sources (``git show`` at the commits of ``reglue.presets``): REPA ``README.md`` L43-44, REG and
REGLUE ``train.sh`` (``--mixed-precision="fp16" --allow-tf32``); SiT ``train.py`` and ReDi
``train_redi.py`` L9-10 (TF32, no autocast).
"""

import warnings

import pytest
import torch
import torch.nn as nn

from reglue.config import ConfigError, apply_overrides
from reglue.data import build_loader
from reglue.evaluation import generate
from reglue.models import build_model
from reglue.models.compressor import SemanticCompressor
from reglue.presets import PRESETS, get_preset
from reglue.runtime import clean_name
from reglue.train import parallelize
from reglue.train import targets
from reglue.train.reference import PUBLISHED_FIND_UNUSED_PARAMETERS, ReferenceStep, autocast_forward, reference_autocast_dtype
from reglue.train.trainer import Trainer

CUDA = torch.device("cuda")
CPU = torch.device("cpu")

PUBLISHED_PRECISION = {
    "sit": "fp32",  # SiT train.py L9-10: TF32, no autocast; L251-254 backward/step/EMA, no scaler
    "repa": "fp16",  # REPA README.md L44 --mixed-precision="fp16"; train.py L127-131 Accelerator(mixed_precision)
    "redi": "fp32",  # ReDi train_redi.py L9-10: TF32, no autocast; L337-340, no scaler
    "reg": "fp16",  # REG train.sh L8 --mixed-precision="fp16"
    "reglue": "fp16",  # REGLUE train.sh L5 --mixed-precision="fp16"
}


def tiny(tmp_path, name="run", **overrides):
    base = {"train.out_dir": str(tmp_path), "train.name": name, "sample.steps": "2", "train.num_sample_images": "2",
            "data.synthetic_size": "64", "train.tensorboard": "false", "train.metrics_plot": "false", "parallel.reference": "true",
            "train.max_steps": "10", "train.log_every": "10", "train.ckpt_every": "10"}
    return apply_overrides(get_preset("tiny"), {**base, **{k: str(v) for k, v in overrides.items()}})


@pytest.fixture(autouse=True)
def _fresh_resolution(monkeypatch):
    monkeypatch.setattr(parallelize, "_resolved", {})


# ------------------------------------------------------------------------------ precision per preset


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_each_preset_trains_reference_runs_in_its_published_precision(name):
    """The preset's field, and the step it selects on CUDA: a loss scaler for fp16 recipes only
    (built here without a GPU: torch disables it with a warning, the choice is what is tested)."""
    cfg = get_preset(name)
    want = PUBLISHED_PRECISION[cfg.method.name]
    assert cfg.parallel.reference_precision == want
    reference = apply_overrides(cfg, {"parallel.reference": "true"})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "GradScaler is enabled, but CUDA is not available"
        on_cuda = ReferenceStep(None, [], None, None, reference, CUDA, ddp=False, micro_losses=None, vote=None)
    assert (on_cuda.scaler is not None) == (want == "fp16")
    # the same choice drives the model's autocast (parallelize) and the frozen encoders' (targets)
    assert reference_autocast_dtype(reference, CUDA) == (torch.float16 if want == "fp16" else None)
    on_cpu = ReferenceStep(None, [], None, None, reference, CPU, ddp=False, micro_losses=None, vote=None)
    assert on_cpu.scaler is None  # the published fp16 path is CUDA-only


def test_reference_precision_is_validated():
    with pytest.raises(ConfigError, match="parallel.reference_precision"):
        apply_overrides(get_preset("tiny"), {"parallel.reference_precision": "bf16"})


# ------------------------------------------------------------------------------ the model's autocast


def test_autocast_forward_is_accelerates_mixed_precision_forward():
    """Inside the forward the matmuls run in the autocast dtype, the outputs come back in fp32 (as
    accelerate's convert_outputs_to_fp32), the weights and state-dict keys are the model's own, and
    autocast does not outlive a forward that raised. (bf16 on the CPU stands for fp16 on CUDA.)"""
    cfg = get_preset("tiny")
    plain, wrapped = build_model(cfg, kernels="eager"), build_model(cfg, kernels="eager")
    wrapped.load_state_dict(plain.state_dict())
    autocast_forward(wrapped, "cpu", torch.bfloat16)
    inner = []
    wrapped.blocks[0].mlp.fc1.register_forward_hook(lambda m, a, out: inner.append(out.dtype))
    x, t, y = torch.randn(2, cfg.in_channels, 8, 8), torch.rand(2), torch.tensor([1, 2])
    cls = torch.randn(2, plain.cls_token_dim)
    out, zs, cls_out = wrapped(x, t, y, cls_token=cls)
    assert inner == [torch.bfloat16]
    assert out.dtype == cls_out.dtype == zs[0].dtype == torch.float32
    with torch.autocast("cpu", dtype=torch.bfloat16):
        want, want_zs, want_cls = plain(x, t, y, cls_token=cls)
    assert torch.equal(out, want.float()) and torch.equal(cls_out, want_cls.float()) and torch.equal(zs[0], want_zs[0].float())
    assert wrapped.state_dict().keys() == plain.state_dict().keys()
    with pytest.raises(Exception):
        wrapped(x[:, :3], t, y, cls_token=cls)
    assert not torch.is_autocast_enabled("cpu")


def test_ddp_find_unused_parameters_as_published(monkeypatch):
    """REG and REGLUE pass find_unused_parameters=True to DDP; REPA, SiT and ReDi keep False."""
    import torch.distributed as dist

    from reglue.runtime import DistInfo
    from reglue.train.mesh import init_single_process_group

    assert PUBLISHED_FIND_UNUSED_PARAMETERS == {"sit": False, "repa": False, "redi": False, "reg": True, "reglue": True}
    monkeypatch.setattr(DistInfo, "distributed", property(lambda self: True))  # DDP, in a world of one
    init_single_process_group(DistInfo())
    try:
        for method, want in (("reglue", True), ("sit", False)):
            cfg = apply_overrides(get_preset("tiny"), {"parallel.reference": "true", "method.name": method})
            model = parallelize.build_parallel_model(cfg, DistInfo())
            assert isinstance(model, nn.parallel.DistributedDataParallel) and model.find_unused_parameters is want
    finally:
        dist.destroy_process_group()


# ------------------------------------------------------------------------------ a non-finite step


def _weights(trainer):
    return {clean_name(n): p.detach().clone() for n, p in trainer.model.named_parameters()}


def _two_steps(trainer):
    """Steps 0 (finite) and 1 (its loss made NaN by train.inject_nonfinite_steps): the weights, the
    EMA and AdamW's step count before and after step 1, and step 1's metrics."""
    loader = iter(build_loader(trainer.config, trainer.dataset, trainer.order, 0, 1, 0, 2))
    adam_steps = lambda: float(trainer.optimizer.state[trainer.params[0]]["step"])  # noqa: E731
    trainer.train_step(0, next(loader))
    before = (_weights(trainer), {k: v.clone() for k, v in trainer.ema.state_dict().items()}, adam_steps())
    metrics = trainer.train_step(1, next(loader))
    return before, (_weights(trainer), trainer.ema.state_dict(), adam_steps()), metrics


def test_fp16_recipe_on_a_nonfinite_step_does_what_accelerate_does(tmp_path):
    """The published fp16 loop (accelerate): the scaler skips the optimizer step and halves its
    scale, and the EMA is updated anyway, towards the unchanged weights. The step runs with a
    loss scaler on the CPU here (the real one is CUDA's; the same GradScaler logic)."""
    trainer = Trainer(tiny(tmp_path, **{"train.inject_nonfinite_steps": "(1,)"}))
    trainer.train_one.scaler = torch.amp.GradScaler("cpu")
    (weights, ema, adam_steps), (weights_after, ema_after, adam_after), metrics = _two_steps(trainer)
    assert trainer.train_one.scaler.get_scale() == 2.0**15  # 2**16 at start, halved once
    assert all(torch.equal(weights[n], weights_after[n]) for n in weights) and adam_after == adam_steps == 1
    decay = trainer.config.train.ema_decay
    for name in ema:
        assert torch.allclose(ema_after[name], ema[name] + (1 - decay) * (weights[name] - ema[name]), atol=1e-7, rtol=0)
    assert any(not torch.equal(ema_after[n], ema[n]) for n in ema)
    assert float(metrics["skipped"]) == 1.0


def test_fp16_recipe_counts_a_finite_step_as_taken(tmp_path):
    trainer = Trainer(tiny(tmp_path))
    trainer.train_one.scaler = torch.amp.GradScaler("cpu")
    (weights, _, adam_steps), (weights_after, _, adam_after), metrics = _two_steps(trainer)
    assert trainer.train_one.scaler.get_scale() == 2.0**16 and adam_after == adam_steps + 1
    assert any(not torch.equal(weights[n], weights_after[n]) for n in weights) and float(metrics["skipped"]) == 0.0


def test_fp32_recipe_skips_the_update_and_the_ema_on_a_nonfinite_step(tmp_path):
    """The published fp32 loops have no guard (a NaN would be written into the weights); the
    reference run skips the step: weights, optimizer and EMA as they were."""
    trainer = Trainer(tiny(tmp_path, **{"train.inject_nonfinite_steps": "(1,)", "parallel.reference_precision": "fp32"}))
    assert trainer.train_one.scaler is None
    (weights, ema, adam_steps), (weights_after, ema_after, adam_after), metrics = _two_steps(trainer)
    assert all(torch.equal(weights[n], weights_after[n]) for n in weights) and adam_after == adam_steps
    assert all(torch.equal(ema_after[n], ema[n]) for n in ema) and float(metrics["skipped"]) == 1.0


# ------------------------------------------------------------------------------ frozen encoders, sampling


def test_reference_encoders_are_fp32_and_the_compressor_is_unfolded_and_eager(tmp_path):
    """Published: REGLUE loads its compressor as trained (BatchNorm layers, no folding) and runs
    plain convolutions; the fast path folds the BatchNorms (and fuses the convolutions on CUDA)."""
    trainer = Trainer(tiny(tmp_path, "reference"))
    reference = trainer.frozen
    assert type(reference.reducer) is SemanticCompressor
    assert any(isinstance(m, nn.BatchNorm2d) for m in reference.reducer.modules())
    assert all(p.dtype == torch.float32 for p in list(reference.reducer.parameters()) + list(reference.vae.parameters()))
    assert reference.dinov2.autocast_dtype is None and reference.autocast_dtype is None  # CPU: fp32
    fast = Trainer(tiny(tmp_path, "fast", **{"parallel.reference": "false"})).frozen
    assert not any(isinstance(m, nn.BatchNorm2d) for m in fast.reducer.modules())
    batch = next(iter(build_loader(trainer.config, trainer.dataset, trainer.order, 0, 1, 0, 1)))
    eps = torch.randn(len(batch["label"]), 4, 8, 8)
    unfolded, folded = reference.targets(batch, eps)["semantic"], fast.targets(batch, eps)["semantic"]
    assert torch.allclose(unfolded, folded, atol=1e-4, rtol=1e-4)  # the same target, up to the folding's rounding


def test_the_recipes_autocast_reaches_dinov2_and_the_compressor(tmp_path, monkeypatch):
    """The frozen encoders take the recipe's autocast, not DINOv2's own bf16 (encoders.dtype), on
    every batch (the demo's precomputed targets are off under --reference): here bf16 on the CPU
    stands for the fp16 of CUDA, which only a GPU runs (test_reference_numerics_on_cuda)."""
    monkeypatch.setattr(targets, "reference_autocast_dtype", lambda config, device: torch.bfloat16)
    trainer = Trainer(tiny(tmp_path, **{"encoders.dtype": "fp32"}))
    frozen, seen = trainer.frozen, []
    assert trainer.config.encoders.precompute_targets and frozen.table is None  # the recipe runs its encoders every batch
    assert frozen.dinov2.autocast_dtype == torch.bfloat16 and frozen.dtype == torch.float32
    conv = next(m for m in frozen.reducer.modules() if isinstance(m, nn.Conv2d))
    conv.register_forward_hook(lambda module, args, out: seen.append(out.dtype))
    batch = next(iter(build_loader(trainer.config, trainer.dataset, trainer.order, 0, 1, 0, 1)))
    semantic = frozen.targets(batch, torch.randn(len(batch["label"]), 4, 8, 8))["semantic"]
    assert seen == [torch.bfloat16] and semantic.dtype == torch.float32


def test_reference_runs_sample_in_fp32_with_sdpa_as_published(monkeypatch):
    """ImageSampler.from_state (the trainer's grids and in-training evaluation): a reference run's
    config asks for no autocast and SDPA attention; other runs for bf16 autocast and their own."""
    from reglue.models.encoders import build_vae

    seen = {}
    prepare_model, init = generate.prepare_model, generate.ImageSampler.__init__

    def recording_prepare(config, state, device, **kwargs):
        seen["attention"] = kwargs.get("attention")
        return prepare_model(config, state, device, **kwargs)

    def recording_init(self, *args, **kwargs):
        seen["autocast"] = kwargs["autocast"]
        init(self, *args, **kwargs)

    monkeypatch.setattr(generate, "prepare_model", recording_prepare)
    monkeypatch.setattr(generate.ImageSampler, "__init__", recording_init)
    vae = build_vae("tiny-random")
    for reference, autocast, attention in ((True, False, "sdpa"), (False, True, None)):
        cfg = apply_overrides(get_preset("tiny"), {"parallel.reference": str(reference)})
        generate.ImageSampler.from_state(cfg, build_model(cfg, kernels="eager").state_dict(), vae, CPU)
        assert (seen["autocast"], seen["attention"]) == (autocast, attention)
    generate.ImageSampler.from_state(cfg, build_model(cfg, kernels="eager").state_dict(), vae, CPU, autocast=False)
    assert seen["autocast"] is False  # an explicit choice (reglue generate --precision) wins


@pytest.mark.gpu
@pytest.mark.parametrize("precision", ["fp16", "fp32"])
def test_reference_numerics_on_cuda(tmp_path, monkeypatch, precision):
    """What runs in which dtype in a reference run's step and final sample grid, read off the modules:
    fp16 recipes run the SiT, DINOv2 and the compressor in fp16 under one autocast (not DINOv2's
    own bf16), the model returns fp32 and the loss is fp32; fp32 recipes run everything in fp32.
    The VAE is fp32 and the grid is sampled without autocast."""
    dtypes, sampled_under_autocast = {}, []

    def record(key, pick=lambda out: out):
        def hook(module, args, out):  # returns None: the output is left as it is
            dtypes.setdefault(key, pick(out).dtype)

        return hook

    sample = generate.sample

    def recording_sample(*args, **kwargs):
        sampled_under_autocast.append(torch.is_autocast_enabled("cuda"))
        return sample(*args, **kwargs)

    monkeypatch.setattr(generate, "sample", recording_sample)
    trainer = Trainer(tiny(tmp_path, **{"parallel.reference_precision": precision, "train.max_steps": 1}))
    trainer.model.blocks[0].mlp.fc1.register_forward_hook(record("sit_fc1"))
    trainer.model.register_forward_hook(record("sit_out", pick=lambda out: out[0]))
    trainer.frozen.dinov2.model.blocks[0].mlp.fc1.register_forward_hook(record("dinov2_fc1"))
    next(m for m in trainer.frozen.reducer.modules() if isinstance(m, nn.Conv2d)).register_forward_hook(record("conv"))
    losses = trainer.train_one.micro_losses

    def recording_losses(*args):
        out = losses(*args)
        dtypes.setdefault("loss", out["total"].dtype)
        return out

    trainer.train_one.micro_losses = recording_losses
    trainer.fit()
    low = torch.float16 if precision == "fp16" else torch.float32
    assert (dtypes["sit_fc1"], dtypes["dinov2_fc1"], dtypes["conv"]) == (low, low, low)
    assert dtypes["sit_out"] == dtypes["loss"] == torch.float32
    assert (trainer.train_one.scaler is not None) == (precision == "fp16")
    assert trainer.frozen.vae.dtype == torch.float32
    assert sampled_under_autocast and not any(sampled_under_autocast)
