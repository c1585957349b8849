"""The training step: no host syncs outside log steps, gradient accumulation, the EMA formula."""

import sys
from pathlib import Path

import pytest
import torch

import reglue
from reglue.config import apply_overrides
from reglue.data import build_loader
from reglue.presets import get_preset
from reglue.train.ema import EMA
from reglue.train.trainer import Trainer

REGLUE_CODE = tuple(str(Path(p).resolve()) for p in (Path(reglue.__file__).parent, Path(reglue.kernels.__file__).parent))
HOST_CONVERSIONS = ("__bool__", "item", "tolist", "__float__", "__int__", "__index__")


def tiny(tmp_path, name="run", **overrides):
    base = {"train.out_dir": str(tmp_path), "train.name": name, "sample.steps": "2", "train.num_sample_images": "2",
            "data.synthetic_size": "256", "train.tensorboard": "false", "train.metrics_plot": "false"}
    return apply_overrides(get_preset("tiny"), {**base, **{k: str(v) for k, v in overrides.items()}})


def batches(trainer, steps):
    loader = iter(build_loader(trainer.config, trainer.dataset, trainer.order, 0, 1, trainer.step, trainer.step + steps))
    return [next(loader) for _ in range(steps)]


def count_host_conversions(monkeypatch):
    """Patch torch.Tensor's host conversions to record each call made from reglue's own code."""
    calls = []

    def counting(name, original):
        def conversion(self, *args, **kwargs):
            caller = sys._getframe(1).f_code.co_filename
            if str(Path(caller).resolve()).startswith(REGLUE_CODE):
                calls.append(f"{name} at {caller}:{sys._getframe(1).f_lineno}")
            return original(self, *args, **kwargs)

        return conversion

    for name in HOST_CONVERSIONS:
        monkeypatch.setattr(torch.Tensor, name, counting(name, getattr(torch.Tensor, name)))
    return calls


def test_no_host_conversions_in_steps_that_do_not_log(tmp_path, monkeypatch):
    """Steps 2-4 of a run that logs and saves only at step 100 convert no tensor to a host value
    in reglue code (the first step counts the FLOPs). A non-finite step (skipped on the device)
    and gradient clipping are part of it; the counters are read at the log step."""
    trainer = Trainer(tiny(tmp_path, **{"train.max_steps": 100, "train.log_every": 100, "train.ckpt_every": 100,
                                        "train.inject_nonfinite_steps": "(2,)", "optim.grad_clip": 1.0}))
    first, *rest = batches(trainer, 4)
    trainer.run_step(first)
    calls = count_host_conversions(monkeypatch)
    for batch in rest:
        trainer.run_step(batch)
    assert calls == [], calls
    monkeypatch.undo()
    assert trainer.skips.read() == (1, 1) and trainer.step == 4


@pytest.mark.gpu
def test_no_cuda_syncs_in_steps_that_do_not_log(tmp_path):
    trainer = Trainer(tiny(tmp_path, **{"train.max_steps": 100, "train.log_every": 100, "train.ckpt_every": 100,
                                        "train.inject_nonfinite_steps": "(2,)"}))
    first, *rest = batches(trainer, 4)
    trainer.run_step(first)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for batch in rest:
            trainer.run_step(batch)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert trainer.skips.read() == (1, 1)


def test_gradient_accumulation_equals_the_full_batch(tmp_path):
    """Two micro-batches of 16 give the weights and the logged losses of one batch of 32 (fp32, CPU)."""
    overrides = {"train.max_steps": 2, "train.log_every": 2, "train.ckpt_every": 100, "train.global_batch_size": 32}
    full = Trainer(tiny(tmp_path, "full", **overrides))
    accumulated = Trainer(tiny(tmp_path, "accumulated", **overrides, **{"train.micro_batch_size": 16}))
    assert (full.accum, accumulated.accum) == (1, 2)
    logs = []
    for trainer in (full, accumulated):
        trainer.on_log = logs.append
        for batch in batches(trainer, 2):
            trainer.run_step(batch)
    a, b = full.model.state_dict(), accumulated.model.state_dict()
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=1e-5, atol=1e-6, msg=k)
    for key in ("loss/total", "loss/latent", "loss/semantic", "loss/cls", "loss/align", "grad_norm"):
        assert logs[1][key] == pytest.approx(logs[0][key], rel=1e-5, abs=1e-7), key


def test_ema_matches_its_closed_form():
    """Parameters held at p: after k updates the shadow is p + (s0 - p) decay^k. A skipped update
    (applied=False) leaves it unchanged."""
    model = torch.nn.Linear(3, 2)
    ema = EMA(model)
    start = {k: v.clone() for k, v in ema.state_dict().items()}
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p))
    target = {k: v.detach().clone() for k, v in model.named_parameters()}
    decay, k = 0.9, 5
    for _ in range(k):
        ema.update(decay)
    for name, value in ema.state_dict().items():
        want = target[name] + (start[name] - target[name]) * decay**k
        torch.testing.assert_close(value, want, rtol=1e-6, atol=1e-6, msg=name)
    before = {n: v.clone() for n, v in ema.state_dict().items()}
    ema.update(decay, applied=torch.tensor(False))
    assert all(torch.equal(before[n], v) for n, v in ema.state_dict().items())
    ema.update(decay, applied=torch.tensor(True))
    assert not any(torch.equal(before[n], v) for n, v in ema.state_dict().items())
