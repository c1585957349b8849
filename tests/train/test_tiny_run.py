"""End-to-end tiny runs on CPU: loss falls, outputs are written, resume is exact, NaN guard, export."""

import json

import pytest
import torch

from reglue.cli import main as reglue_main
from reglue.config import apply_overrides
from reglue.models import build_model
from reglue.models.sit import load_sit_checkpoint
from reglue.presets import get_preset
from reglue.checkpoint import latest_checkpoint, list_checkpoints, load_weights
from reglue.train.trainer import NonFiniteError, Trainer


def tiny(tmp_path, name="run", **overrides):
    """The demo's config, small; no metrics.png (a second of matplotlib per run) unless asked for."""
    base = {"train.out_dir": str(tmp_path), "train.name": name, "sample.steps": "4", "train.num_sample_images": "4",
            "train.log_every": "5", "data.synthetic_size": "64", "train.metrics_plot": "false"}
    base.update({k: str(v) for k, v in overrides.items()})
    return apply_overrides(get_preset("tiny"), base)


def metrics(run_dir):
    """The training rows (the demo's final class-match row is an ``eval/*`` row of its own)."""
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r for r in rows if "loss/total" in r]


def weights_at(checkpoint, which="ema"):
    model = build_model(get_preset("tiny"))
    load_weights(checkpoint, model, which)
    return model.state_dict()


def weights(run_dir, which="ema"):
    return weights_at(latest_checkpoint(run_dir), which)


def test_tiny_run_loss_falls_and_writes_outputs(tmp_path):
    run_dir = Trainer(tiny(tmp_path, **{"train.max_steps": 30, "train.metrics_plot": "true"})).fit()
    records = metrics(run_dir)
    assert [r["step"] for r in records] == [5, 10, 15, 20, 25, 30]
    first, last = records[0], records[-1]
    assert last["loss/total"] < first["loss/total"] - 0.05, (first["loss/total"], last["loss/total"])
    for key in ("loss/latent", "loss/semantic", "loss/cls", "loss/align", "grad_norm", "lr", "img_per_s", "tflops_per_device"):
        assert key in last and last[key] == last[key], key
    for f in ("metrics.png", "samples-final.png", "config.json", "feature_stats.safetensors", "autoencoder.safetensors",
              "checkpoints/step-00000030/meta.json"):
        assert (run_dir / f).is_file(), f


def test_resume_is_bit_exact(tmp_path):
    straight = Trainer(tiny(tmp_path, "straight", **{"train.max_steps": 12, "train.ckpt_every": 6})).fit()
    Trainer(tiny(tmp_path, "split", **{"train.max_steps": 6, "train.ckpt_every": 6})).fit()
    resumed_trainer = Trainer(tiny(tmp_path, "split", **{"train.max_steps": 12, "train.ckpt_every": 6}))
    assert resumed_trainer.step == 6
    resumed = resumed_trainer.fit()
    for which in ("ema", "model"):
        a, b = weights(straight, which), weights(resumed, which)
        assert all(torch.equal(a[k], b[k]) for k in a), which
    # the interrupted run also logged its last step (6); windows that match are identical
    a, b = {r["step"]: r for r in metrics(straight)}, {r["step"]: r for r in metrics(resumed)}
    assert sorted(a) == [5, 10, 12] and sorted(b) == [5, 6, 10, 12]
    for step in (5, 12):
        assert a[step]["loss/total"] == b[step]["loss/total"] and a[step]["grad_norm"] == b[step]["grad_norm"]


def test_resume_refuses_changed_model_seed_or_batch(tmp_path):
    Trainer(tiny(tmp_path, **{"train.max_steps": 2})).fit()
    with pytest.raises(RuntimeError, match="model.depth"):
        Trainer(tiny(tmp_path, **{"train.max_steps": 4, "model.depth": 2, "model.encoder_depth": 1}))
    with pytest.raises(RuntimeError, match="train.seed"):
        Trainer(tiny(tmp_path, **{"train.max_steps": 4, "train.seed": 1}))
    with pytest.raises(RuntimeError, match="train.global_batch_size"):
        Trainer(tiny(tmp_path, **{"train.max_steps": 4, "train.global_batch_size": 16}))
    # what does not change the weights' meaning may change: more steps, other kernels
    assert Trainer(tiny(tmp_path, **{"train.max_steps": 4, "model.kernels": "triton"})).step == 2


def test_nonfinite_step_is_skipped_then_aborts(tmp_path):
    trainer = Trainer(tiny(tmp_path, **{"train.max_steps": 4, "train.inject_nonfinite_steps": "(1,)"}))
    batches = iter(__import__("reglue.data", fromlist=["build_loader"]).build_loader(
        trainer.config, trainer.dataset, trainer.order, 0, 1, 0, 4))
    trainer.train_step(0, next(batches))
    before = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    ema_before = {k: v.clone() for k, v in trainer.ema.state_dict().items()}
    optim_before = [{k: v.clone() for k, v in s.items()} for s in trainer.optimizer.state.values()]
    out = trainer.train_step(1, next(batches))
    assert out["skipped"] == 1 and trainer.skipped_steps == 1
    assert all(torch.equal(before[k], v) for k, v in trainer.model.state_dict().items())
    assert all(torch.equal(ema_before[k], v) for k, v in trainer.ema.state_dict().items())
    optim_after = list(trainer.optimizer.state.values())
    assert all(torch.equal(a[k], b[k]) for a, b in zip(optim_before, optim_after) for k in a)  # moments and step count
    trainer.train_step(2, next(batches))
    assert int(trainer.skips.in_row) == 0 and trainer.skips.read() == (1, 1)

    with pytest.raises(NonFiniteError, match="3 consecutive steps"):
        Trainer(tiny(tmp_path, "nan", **{"train.max_steps": 8, "train.inject_nonfinite_steps": "(2, 3, 4)",
                                        "train.max_nonfinite_steps": 3, "train.ckpt_every": 1,
                                        "train.keep_last": 10})).fit()
    # checkpoints up to the abort are complete, and the skipped steps changed no weight
    run = tmp_path / "nan"
    assert [p.name for p in list_checkpoints(run)] == [f"step-{s:08d}" for s in (1, 2, 3, 4)]
    assert not list((run / "checkpoints").glob("*.tmp"))
    good = {w: weights_at(run / "checkpoints" / "step-00000002", w) for w in ("model", "ema")}
    for w in ("model", "ema"):
        last = weights_at(run / "checkpoints" / "step-00000004", w)
        assert all(torch.equal(good[w][k], last[k]) for k in last), w


def test_export_loads_into_sit_strict(tmp_path):
    run_dir = Trainer(tiny(tmp_path, **{"train.max_steps": 3})).fit()
    out = tmp_path / "ema.safetensors"
    assert reglue_main(["export", "--run", str(run_dir), "--out", str(out)]) == 0
    model = load_sit_checkpoint(build_model(get_preset("tiny")), out)
    want = weights(run_dir, "ema")
    assert all(torch.equal(model.state_dict()[k], want[k]) for k in want)
    both = tmp_path / "both.safetensors"
    assert reglue_main(["export", "--run", str(run_dir), "--out", str(both), "--weights", "both"]) == 0
    load_sit_checkpoint(build_model(get_preset("tiny")), both, key="model")
    exported = out.read_bytes()
    assert reglue_main(["export", "--run", str(run_dir), "--out", str(out)]) == 2  # exists: refused without --overwrite
    assert reglue_main(["export", "--run", str(tmp_path / "missing"), "--out", str(out), "--overwrite"]) == 2
    assert out.read_bytes() == exported  # a failed export replaces nothing
    assert reglue_main(["export", "--run", str(tmp_path / "missing"), "--out", str(tmp_path / "new" / "w.safetensors")]) == 2
    assert not (tmp_path / "new").exists()  # a failed start leaves no folder
    assert reglue_main(["export", "--run", str(run_dir), "--out", str(out), "--weights", "model", "--overwrite"]) == 0
    assert out.read_bytes() != exported
    assert reglue_main(["sample", "--run", str(run_dir), "--out", str(tmp_path / "grid")]) == 2  # no image suffix: fails at once
    grid = tmp_path / "new" / "dir" / "grid.png"  # folders are created before sampling
    for sampler, overwrite in (("sde", []), ("heun", ["--overwrite"])):
        assert reglue_main(["sample", "--run", str(run_dir), "--out", str(grid), "--num", "4", "--steps", "3",
                            "--sampler", sampler, "--cfg-scale", "2.0", *overwrite]) == 0
        from PIL import Image

        assert Image.open(grid).size == (2 * 66 + 2, 2 * 66 + 2)  # torchvision make_grid, 2 px padding
    assert reglue_main(["sample", "--run", str(run_dir), "--out", str(grid), "--num", "4"]) == 2  # exists


def test_triton_kernels_train_like_eager(tmp_path):
    """The fused path (adaLN kernels in the SiT, fused compressor convs for the targets) trains the
    same as eager (Triton interpreter on CPU)."""
    small = {"train.max_steps": 2, "train.log_every": 1, "train.global_batch_size": 8, "data.synthetic_size": 16}
    runs = {k: Trainer(tiny(tmp_path, k, **small, **{"model.kernels": k})).fit()
            for k in ("eager", "triton")}
    eager, triton_ = metrics(runs["eager"]), metrics(runs["triton"])
    for a, b in zip(eager, triton_):
        for key in ("loss/total", "loss/semantic", "grad_norm"):
            assert b[key] == pytest.approx(a[key], rel=1e-4, abs=1e-5), key


def test_damaged_latest_checkpoint_falls_back_to_previous(tmp_path, capsys, caplog):
    """A shard of the newest checkpoint garbled at its own size (only its checksum tells): resume and
    export use the one before, say so in one warning, and keep the damaged one."""
    from tests._damage import garble

    Trainer(tiny(tmp_path, **{"train.max_steps": 2, "train.ckpt_every": 1})).fit()
    damaged = tmp_path / "run" / "checkpoints" / "step-00000002"
    shard = damaged / "__0_0.distcp"
    garble(shard, size=4096)
    assert reglue_main(["export", "--run", str(tmp_path / "run"), "--out", str(tmp_path / "w.safetensors")]) == 0
    assert "step-00000001 to" in capsys.readouterr().out
    warnings = [r.getMessage() for r in caplog.records if r.name == "reglue.checkpoint" and str(damaged) in r.getMessage()]
    assert len(warnings) == 1 and "__0_0.distcp is damaged: CRC-32" in warnings[0], warnings
    assert Trainer(tiny(tmp_path, **{"train.max_steps": 3})).step == 1
    assert shard.is_file()


def test_train_cli_reports_bad_input_without_traceback(tmp_path, capsys):
    from reglue.train.cli import main

    assert main(["--data", str(tmp_path / "missing"), "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "no such dataset directory" in err and "Traceback" not in err
    for text, message in (("[]", "expected a JSON object of sections, got a list"),
                          ('{"train": {"max_steps": "10"}}', 'train.max_steps: expected an integer, got "10"'),
                          ("{", "not valid JSON")):
        (tmp_path / "config.json").write_text(text)
        with pytest.raises(SystemExit) as exit_:
            main(["--config", str(tmp_path / "config.json")])
        err = capsys.readouterr().err
        assert exit_.value.code == 2 and message in err and "Traceback" not in err, err


def test_precomputed_targets_train_exactly_like_encoders_run_every_step(tmp_path):
    """encoders.precompute_targets (the demo's default) gathers each step's targets from outputs
    computed once at start; the run must be the run whose encoders run on every batch: the same
    losses and the same final weights, bit for bit. A dataset whose targets exceed the limit is
    refused in one line naming the field."""
    on = Trainer(tiny(tmp_path, "on", **{"train.max_steps": 10})).fit()
    off = Trainer(tiny(tmp_path, "off", **{"train.max_steps": 10, "encoders.precompute_targets": "false"})).fit()
    assert [r["loss/total"] for r in metrics(on)] == [r["loss/total"] for r in metrics(off)]
    assert len(metrics(on)) == 2
    a, b = weights(on, "model"), weights(off, "model")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_precomputed_targets_beyond_the_limit_are_refused(tmp_path, monkeypatch):
    import reglue.train.targets as targets

    monkeypatch.setattr(targets, "PRECOMPUTE_LIMIT_BYTES", 2**20)  # 512 demo images need ~6 MiB
    with pytest.raises(ValueError, match=r"encoders\.precompute_targets: the targets of 512 images would take"):
        Trainer(tiny(tmp_path, "big", **{"train.max_steps": 1, "data.synthetic_size": 512}))


def test_metrics_plot_is_redrawn_at_a_checkpoint_only_when_a_minute_old(tmp_path, monkeypatch):
    """A run checkpointing every step draws metrics.png once, at the end; with the interval reached
    (here: set to 0) every checkpoint before the last redraws it too; train.metrics_plot=false: never."""
    import reglue.train.trainer as trainer_module

    for interval, plot, expected in ((trainer_module.PLOT_INTERVAL_S, True, [3]), (0.0, True, [1, 2, 3]), (0.0, False, [])):
        monkeypatch.setattr(trainer_module, "PLOT_INTERVAL_S", interval)
        trainer = Trainer(tiny(tmp_path, f"plots-{interval}-{plot}",
                               **{"train.max_steps": 3, "train.ckpt_every": 1, "train.metrics_plot": str(plot).lower()}))
        drawn = []
        monkeypatch.setattr(trainer_module, "write_run_plot", lambda run_dir: drawn.append(trainer.step))
        trainer.fit()
        assert drawn == expected
