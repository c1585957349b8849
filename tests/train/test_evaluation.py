"""FID during training: eval rows in metrics.jsonl, training unchanged, skipped without a reference."""

import json
import logging
import math

import numpy as np
import pytest
import torch

from reglue.checkpoint import latest_checkpoint, load_weights
from reglue.config import ConfigError, apply_overrides
from reglue.models import build_model
from reglue.presets import get_preset
from reglue.train.trainer import Trainer


def tiny(tmp_path, name, **overrides):
    base = {"train.out_dir": str(tmp_path), "train.name": name, "train.max_steps": "4", "train.log_every": "2",
            "train.ckpt_every": "4", "sample.steps": "2", "train.num_sample_images": "2", "data.synthetic_size": "64",
            "train.global_batch_size": "8", "train.tensorboard": "false",
            "train.metrics_plot": "false"}
    base.update({k: str(v) for k, v in overrides.items()})
    return apply_overrides(get_preset("tiny"), base)


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """A structurally valid ADM reference batch (statistics only: FID needs no reference images)."""
    path = tmp_path_factory.mktemp("ref") / "ref.npz"
    g = np.random.default_rng(0)
    np.savez(path, mu=g.normal(size=2048), sigma=np.eye(2048), mu_s=g.normal(size=2023), sigma_s=np.eye(2023))
    return path


def ema_weights(run_dir):
    model = build_model(get_preset("tiny"))
    load_weights(latest_checkpoint(run_dir), model, "ema")
    return model.state_dict()


def rows(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_evaluation_writes_eval_rows_and_leaves_training_unchanged(tmp_path, reference):
    # a VAE that decodes continuously: the demo's nearest-exemplar decoder maps the slightly moved
    # latents of 2 steps later to the same patches, so both evaluations would score the same images
    vae = {"encoders.vae": "tiny-random"}
    evaluated = Trainer(tiny(tmp_path, "eval", **vae, **{"train.eval_every": 2, "train.eval_ref": reference,
                                                         "train.eval_samples": 2, "train.eval_batch_size": 2,
                                                         "train.eval_steps": 2, "train.eval_inception_weights": "random"})).fit()
    plain = Trainer(tiny(tmp_path, "plain", **vae)).fit()
    evals = [r for r in rows(evaluated) if "eval/fid" in r]
    assert [r["step"] for r in evals] == [2, 4]
    assert all(math.isfinite(r["eval/fid"]) and r["eval/fid"] > 0 and r["eval/samples"] == 2 for r in evals)
    assert all(r["eval/random_inception"] is True for r in evals)  # a pipeline check, labelled as such
    assert evals[0]["eval/fid"] != evals[1]["eval/fid"]  # the weights moved between the two evaluations
    assert not any("eval/fid" in r for r in rows(plain))
    got, want = ema_weights(evaluated), ema_weights(plain)
    assert all(torch.equal(got[k], want[k]) for k in want)
    losses = lambda run: [r["loss/total"] for r in rows(run) if "loss/total" in r]  # noqa: E731
    assert losses(evaluated) == losses(plain)


def test_without_a_reference_evaluation_is_skipped_with_one_line(tmp_path, caplog):
    with caplog.at_level(logging.INFO, logger="reglue.train"):
        run_dir = Trainer(tiny(tmp_path, "noref", **{"train.max_steps": 2, "train.eval_every": 2})).fit()
    said = [r.getMessage() for r in caplog.records if "in-training evaluation skipped" in r.getMessage()]
    assert len(said) == 1 and "train.eval_ref" in said[0]
    assert not any("eval/fid" in r for r in rows(run_dir))


def test_a_bad_reference_fails_before_training(tmp_path):
    bad = tmp_path / "ref.npz"
    np.savez(bad, mu=np.zeros(2048))  # no sigma, no sFID statistics
    with pytest.raises(ValueError, match="sigma"):
        Trainer(tiny(tmp_path, "badref", **{"train.eval_every": 3, "train.eval_ref": bad,
                                             "train.eval_inception_weights": "random"}))
    assert not (tmp_path / "badref" / "metrics.jsonl").exists()


def test_unknown_eval_metric_is_a_config_error():
    with pytest.raises(ConfigError, match="train.eval_metrics"):
        apply_overrides(get_preset("tiny"), {"train.eval_metrics": "('fid', 'kid')"})
