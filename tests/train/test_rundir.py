"""No silent destruction: a new run never mixes with or overwrites another run's directory."""

import json

import pytest
import torch

from reglue import checkpoint as ckpt
from reglue.config import apply_overrides
from reglue.presets import get_preset
from reglue.runtime import DistInfo
from reglue.train.rundir import RunDirError, plan_run


def config(tmp_path, **overrides):
    return apply_overrides(get_preset("tiny"), {"train.out_dir": str(tmp_path), "train.name": "run", **overrides})


def make_run(run_dir, cfg, checkpoints=(1, 2), metrics_rows=3, run_id="the-run"):
    """A run directory as the trainer leaves it: config.json, metrics.jsonl, checkpoints."""
    run_dir.mkdir(parents=True)
    (run_dir / "config.json").write_text(cfg.to_json())
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps({"step": s}) + "\n" for s in range(1, metrics_rows + 1)))
    for step in checkpoints:
        ckpt.save_checkpoint(run_dir, step, {"w": torch.zeros(2)}, {"config": cfg.to_dict(), "run_id": run_id}, DistInfo(), 10)


def test_resume_none_refuses_an_occupied_directory_naming_what_is_there(tmp_path):
    cfg = config(tmp_path, **{"train.resume": "none"})
    make_run(tmp_path / "run", cfg)
    before = (tmp_path / "run" / "metrics.jsonl").read_text()
    with pytest.raises(RunDirError, match=r"2 checkpoints \(newest step-00000002\), metrics.jsonl \(3 rows\), config.json.*--overwrite"):
        plan_run(cfg, tmp_path / "run", overwrite=False)
    assert (tmp_path / "run" / "metrics.jsonl").read_text() == before


def test_overwrite_moves_the_old_run_aside(tmp_path):
    cfg = config(tmp_path, **{"train.resume": "none"})
    make_run(tmp_path / "run", cfg)
    plan = plan_run(cfg, tmp_path / "run", overwrite=True)
    assert plan.resume_from is None and plan.run_id != "the-run"
    [aside] = [p for p in tmp_path.iterdir() if p.name.startswith("run.replaced-")]
    assert not (tmp_path / "run").exists()
    assert [p.name for p in ckpt.list_checkpoints(aside)] == ["step-00000001", "step-00000002"]
    make_run(tmp_path / "run", config(tmp_path))  # the same run, resumable: --overwrite still starts afresh
    assert plan_run(config(tmp_path), tmp_path / "run", overwrite=True).resume_from is None
    assert len([p for p in tmp_path.iterdir() if p.name.startswith("run.replaced-")]) == 2


def test_auto_continues_the_same_run_and_refuses_a_changed_one(tmp_path):
    cfg = config(tmp_path)
    make_run(tmp_path / "run", cfg)
    plan = plan_run(apply_overrides(cfg, {"train.max_steps": "999", "model.kernels": "triton"}), tmp_path / "run", False)
    assert plan.resume_from == "auto" and plan.run_id == "the-run"
    with pytest.raises(RunDirError, match=r"train\.seed: 0 there, 1 now"):
        plan_run(apply_overrides(cfg, {"train.seed": "1"}), tmp_path / "run", False)


def test_before_its_first_checkpoint_a_run_restarts_only_with_the_same_settings(tmp_path):
    cfg = config(tmp_path)
    make_run(tmp_path / "run", cfg, checkpoints=())
    assert plan_run(cfg, tmp_path / "run", False).resume_from is None
    with pytest.raises(RunDirError, match=r"metrics.jsonl \(3 rows\).*model\.depth"):
        plan_run(apply_overrides(cfg, {"model.depth": "2", "model.encoder_depth": "1"}), tmp_path / "run", False)


def test_a_run_whose_checkpoints_are_all_damaged_is_refused(tmp_path):
    cfg = config(tmp_path)
    make_run(tmp_path / "run", cfg, checkpoints=(1,))
    (tmp_path / "run" / "checkpoints" / "step-00000001" / ".metadata").unlink()
    with pytest.raises(RunDirError, match=r"none of its checkpoints is complete \(step-00000001: \.metadata is missing\)"):
        plan_run(cfg, tmp_path / "run", False)


def test_resume_from_another_runs_checkpoint_needs_an_empty_directory(tmp_path):
    cfg = config(tmp_path)
    make_run(tmp_path / "old", cfg)
    path = str(tmp_path / "old" / "checkpoints" / "step-00000001")
    plan = plan_run(apply_overrides(cfg, {"train.resume": path}), tmp_path / "run", False)
    assert plan.resume_from == path and plan.run_id != "the-run"
    make_run(tmp_path / "run", cfg, checkpoints=())
    with pytest.raises(RunDirError, match="is not one of its checkpoints"):
        plan_run(apply_overrides(cfg, {"train.resume": path}), tmp_path / "run", False)


def test_train_cli_refuses_before_loading_anything(tmp_path, capsys):
    from reglue.train.cli import main

    cfg = config(tmp_path)
    make_run(tmp_path / "run", cfg)
    before = (tmp_path / "run" / "metrics.jsonl").read_text()
    assert main(["--out", str(tmp_path), "--name", "run", "--resume", "none"]) == 2
    err = capsys.readouterr().err
    assert "holds another run" in err and "--overwrite" in err and "Traceback" not in err
    assert (tmp_path / "run" / "metrics.jsonl").read_text() == before


def test_a_saved_config_without_a_newer_field_compares_as_that_fields_default():
    """Runs saved before a field existed resume: the missing field had its default then. A saved
    value that differs from the current one is still refused."""
    from reglue.presets import get_preset
    from reglue.train.rundir import config_differences

    config = get_preset("tiny")
    saved = config.to_dict()
    del saved["method"]["semantic_dropout_prob"]
    assert config_differences(saved, config) == []
    saved["method"]["lambda_cls"] = 0.5
    assert [d.split(":")[0] for d in config_differences(saved, config)] == ["method.lambda_cls"]


def test_a_shorter_max_steps_than_the_run_has_is_refused_naming_the_ways_out(tmp_path):
    cfg = config(tmp_path)
    make_run(tmp_path / "run", cfg, checkpoints=(1, 2))
    assert plan_run(apply_overrides(cfg, {"train.max_steps": "2"}), tmp_path / "run", False).resume_from == "auto"
    with pytest.raises(RunDirError, match=r"is at step 2, past --max-steps 1 .*another --name, or --overwrite"):
        plan_run(apply_overrides(cfg, {"train.max_steps": "1"}), tmp_path / "run", False)
    path = str(tmp_path / "run" / "checkpoints" / "step-00000002")
    with pytest.raises(RunDirError, match=r"step-00000002 is at step 2, past --max-steps 1"):
        plan_run(apply_overrides(cfg, {"train.max_steps": "1", "train.resume": path}), tmp_path / "other", False)
    assert plan_run(apply_overrides(cfg, {"train.max_steps": "1"}), tmp_path / "run", True).resume_from is None
