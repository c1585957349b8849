"""Execution defaults: auto kernels/compile resolve per device, the flags opt out, --reference keeps
the published execution, and a kernel that fails its self-check runs eager in a real run, which
says so in its log and metrics."""

import logging

import pytest
import torch

from reglue.config import ConfigError, apply_overrides
from reglue.kernels import selfcheck
from reglue.outputs import read_metrics
from reglue.kernels.adaln import adaln_modulate, gated_residual_adaln_ref
from reglue.presets import PRESETS, get_preset
from reglue.train import parallelize
from reglue.train.cli import config_from_args
from reglue.train.parallelize import resolve_execution
from reglue.train.trainer import Trainer
from tests.kernels.test_selfcheck import _fail_gated_residual_adaln as fail_gated_residual_adaln

CPU = torch.device("cpu")


@pytest.fixture(autouse=True)
def _fresh_resolution(monkeypatch):
    monkeypatch.setattr(parallelize, "_resolved", {})
    monkeypatch.setattr(selfcheck, "_results", {})


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_every_preset_defaults_to_auto(name):
    cfg = get_preset(name)
    assert cfg.model.kernels == "auto" and cfg.parallel.compile == "auto" and not cfg.parallel.reference


def test_auto_is_eager_without_compile_on_the_cpu():
    execution = resolve_execution(get_preset("tiny"), CPU)
    assert execution.fused_ops == set() and execution.compile is False and execution.attention == "auto"
    assert execution.eager_ops == {"adaln_modulate", "gated_residual", "gated_residual_adaln", "fused_conv2d"}


def test_auto_is_kernels_and_compile_on_cuda(monkeypatch):
    """On a CUDA device "auto" means every used op fused (after the self-check) and compile."""
    monkeypatch.setattr(parallelize, "_self_checked", lambda config, device, ops: {})
    execution = resolve_execution(get_preset("reglue-sit-xl-2"), torch.device("cuda", 0))
    assert execution.fused_ops == parallelize.ops_used(get_preset("reglue-sit-xl-2")) and execution.compile is True
    redi = resolve_execution(apply_overrides(get_preset("redi-sit-b-2"), {"model.qk_norm": "true"}), torch.device("cuda", 0))
    assert redi.fused_ops == {"adaln_modulate", "gated_residual", "gated_residual_adaln", "rms_norm"}


def test_self_check_uses_the_dtypes_each_op_runs_in(monkeypatch):
    """The compressor's convolutions run in the frozen encoders' dtype only (bf16 by default): they
    are checked in that one (an fp32 check would meet TF32 convs the run never launches); the
    adaLN/RMSNorm ops in fp32 and the parameters' dtype."""
    from reglue.models import encoders

    calls = []
    monkeypatch.setattr(selfcheck, "check_fused_ops",
                        lambda device, dtypes, sizes, ops: calls.append((tuple(ops), set(dtypes))) or dict.fromkeys(ops))
    monkeypatch.setattr(encoders, "frozen_dtype", lambda name, device: {"bf16": torch.bfloat16, "fp32": torch.float32}[name])
    monkeypatch.setattr(parallelize, "compute_param_dtype", lambda cfg, device: torch.bfloat16)
    config = apply_overrides(get_preset("reglue-sit-xl-2"), {"model.qk_norm": "true"})
    assert parallelize._self_checked(config, CPU, parallelize.ops_used(config)) == {}
    assert calls == [(("adaln_modulate", "gated_residual", "gated_residual_adaln", "rms_norm"), {torch.float32, torch.bfloat16}),
                     (("fused_conv2d",), {torch.bfloat16})]
    calls.clear()
    parallelize._self_checked(apply_overrides(config, {"encoders.dtype": "fp32"}), CPU, frozenset({"fused_conv2d"}))
    assert calls == [(("fused_conv2d",), {torch.float32})]


def test_flags_opt_out_and_in():
    cfg, _ = config_from_args(["--kernels", "eager", "--no-compile"])
    assert (cfg.model.kernels, cfg.parallel.compile) == ("eager", False)
    assert resolve_execution(cfg, CPU).fused_ops == set()
    cfg, _ = config_from_args(["--kernels", "triton", "--compile"])
    assert (cfg.model.kernels, cfg.parallel.compile) == ("triton", True)
    execution = resolve_execution(cfg, CPU)
    assert execution.compile is True and execution.fused_ops == parallelize.ops_used(cfg)
    cfg, _ = config_from_args(["--kernels", "auto", "--compile", "auto"])
    assert (cfg.model.kernels, cfg.parallel.compile) == ("auto", "auto")
    assert apply_overrides(get_preset("tiny"), {"parallel.compile": "yes"}).parallel.compile is True
    with pytest.raises(ConfigError, match="parallel.compile"):
        apply_overrides(get_preset("tiny"), {"parallel.compile": "sometimes"})


def test_reference_is_the_published_execution():
    cfg = apply_overrides(get_preset("tiny"), {"parallel.reference": "true"})
    execution = resolve_execution(cfg, CPU)
    assert (execution.fused_ops, execution.compile, execution.attention, execution.reference) == (set(), False, "sdpa", True)
    for contradiction in ({"model.kernels": "triton"}, {"parallel.compile": "true"}):
        with pytest.raises(ConfigError, match="parallel.reference"):
            apply_overrides(cfg, contradiction)


def test_failed_self_check_runs_eager_and_is_logged_and_recorded(tmp_path, monkeypatch, caplog):
    """A run whose device fails gated_residual_adaln: that op runs eager, the others fused, the
    run trains like the all-eager run, and its log and first metrics record say which is which."""
    monkeypatch.setattr(parallelize, "_needs_self_check", lambda device: True)  # as on CUDA
    fail_gated_residual_adaln(monkeypatch)
    base = {"train.out_dir": str(tmp_path), "train.max_steps": "2", "train.log_every": "1", "sample.steps": "2",
            "train.num_sample_images": "2", "data.synthetic_size": "16", "train.global_batch_size": "8", "train.tensorboard": "false",
            "train.metrics_plot": "false"}
    with caplog.at_level(logging.WARNING, logger="reglue.kernels"):
        trainer = Trainer(apply_overrides(get_preset("tiny"), {**base, "train.name": "fallback", "model.kernels": "triton"}))
    assert any("FUSED KERNEL DISABLED: reglue.kernels.gated_residual_adaln" in r.getMessage() for r in caplog.records)
    block = trainer.model.blocks[0]
    assert block.ops.gated_residual_adaln is gated_residual_adaln_ref and block.ops.adaln_modulate is adaln_modulate
    run = trainer.fit()
    eager = Trainer(apply_overrides(get_preset("tiny"), {**base, "train.name": "eager", "model.kernels": "eager"})).fit()
    records = [r for r in read_metrics(run / "metrics.jsonl") if "loss/total" in r]  # training rows
    first = records[0]
    assert first["eager_ops"] == ["gated_residual_adaln"]
    assert first["fused_ops"] == ["adaln_modulate", "fused_conv2d", "gated_residual"]
    assert "shared memory (injected)" in first["self_check_failed"]["gated_residual_adaln"]
    want = [r["loss/total"] for r in read_metrics(eager / "metrics.jsonl") if "loss/total" in r]
    assert [r["loss/total"] for r in records] == pytest.approx(want, rel=1e-4, abs=1e-5)
