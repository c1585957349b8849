"""Regional compile of what the step runs: SiT blocks, embedders, projectors, final layer, the loss,
the frozen DINOv2 blocks and the semantic target. One graph each, none recompiled after the first
step, and the run trains like the eager one. (One compiled run: ~30 s per graph on a cold CPU.)"""


import pytest
import torch

from reglue.config import apply_overrides
from reglue.models.attention import Attention
from reglue.outputs import read_metrics
from reglue.presets import get_preset
from reglue.train import parallelize
from reglue.train.trainer import Trainer

# SiT block (one graph for every block), embed, project, head, loss_inputs, loss_terms,
# DINOv2 block (one graph for every block), semantic_target.
REGIONS = 8


def _config(tmp_path, name, compile_):
    return apply_overrides(get_preset("tiny"), {
        "train.out_dir": str(tmp_path), "train.name": name, "train.max_steps": "4", "train.log_every": "1",
        "sample.steps": "2", "train.num_sample_images": "2", "data.synthetic_size": "64", "train.tensorboard": "false", "train.metrics_plot": "false",
        "parallel.compile": compile_})


def _is_compiled(fn) -> bool:
    return getattr(fn, "_compiled_call_impl", None) is not None or hasattr(fn, "_torchdynamo_orig_callable")


def test_regions_compile_once_and_train_like_eager(tmp_path, monkeypatch):
    monkeypatch.setattr(parallelize, "_resolved", {})
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    trainer = Trainer(_config(tmp_path, "compiled", "true"))
    model, frozen = trainer.model, trainer.frozen
    assert all(_is_compiled(block) for block in model.blocks)
    assert all(_is_compiled(f) for f in (model.embed, model.project, model.head, frozen.semantic_target))
    assert all(_is_compiled(block) and isinstance(block.attn, Attention) for block in frozen.dinov2.model.blocks)
    compiled = trainer.fit()
    eager = Trainer(_config(tmp_path, "eager", "false")).fit()

    records = [r for r in read_metrics(compiled / "metrics.jsonl") if "loss/total" in r]  # training rows
    assert [r["compiled_graphs"] for r in records] == [REGIONS] * 4  # no recompiles after the first step
    assert records[0]["compile"] is True
    want = [r["loss/total"] for r in read_metrics(eager / "metrics.jsonl") if "loss/total" in r]
    assert [r["loss/total"] for r in records] == pytest.approx(want, rel=1e-4, abs=1e-5)


@pytest.mark.slow
def test_compiled_regions_under_fsdp2_two_processes(tmp_path):
    """The default GPU path's structure (FSDP2 root and blocks around the compiled regions) on
    gloo: two compiled ranks train like one eager process."""
    from tests.train.test_distributed import finish, launch, losses

    eager_proc = launch(tmp_path, "eager", 3, extra=["--no-compile"], wait=False)  # beside the compiled ranks
    fsdp = launch(tmp_path, "fsdp", 3, nproc=2, extra=["--compile"])
    eager = finish(eager_proc, tmp_path, "eager")
    records = [r for r in read_metrics(fsdp / "metrics.jsonl") if "loss/total" in r]
    assert len({r["compiled_graphs"] for r in records}) == 1
    assert losses(fsdp) == pytest.approx(losses(eager), rel=1e-4, abs=1e-5)
