"""The demo learns visibly: a shorter `python train.py` (the tiny preset) samples class-conditional
images, scored by the synthetic set's fixed hue and shape classifiers; its pictures are written
and `reglue plot` compares it with another run.

The thresholds, for the 300-step run here (the default runs 1000): its 64 EMA samples (cfg 4,
seed 0, 25 sampling steps) are assigned to their conditioning class by hue at 100% and by shape
at 50% (32/64); after 400 steps 100% and 64%, after 500 steps 100% and 59%, after 200 steps 92% and 17%, after the default
1000 steps 100% and 80-86% (seeds 0, 1, 2: 83, 80, 86%). Those are decoded by nearest exemplar; decoded
linearly, as the demo did before 2026-12-07, the 400-step run scored 38% by shape, 500 steps
45%, 1000 steps 69-72%. The
same demo with a random VAE (`encoders.vae=tiny-random`) stays at chance after 500 steps (tanh GELU): 12% by
hue (every sample decodes to noise the classifier puts in one class) and 14% by shape (noise:
11.5%, tests/data/test_synthetic.py). Hue >= 50% and shape >= 20% (13/64, chance 8/64) leave
room for other machines' rounding while failing a run that learns no shapes.
"""

import json
import logging

import pytest
from PIL import Image

from reglue.cli import main as reglue_main
from reglue.config import apply_overrides
from reglue.presets import get_preset
from reglue.train.trainer import Trainer

SHORT_DEMO_STEPS = 300
CLASS_MATCH_THRESHOLD = 0.5
SHAPE_MATCH_THRESHOLD = 0.2


def records(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def short_demo(tmp_path_factory):
    root = tmp_path_factory.mktemp("demo")
    config = apply_overrides(get_preset("tiny"), {"train.out_dir": str(root), "train.max_steps": SHORT_DEMO_STEPS,
                                                  "train.tensorboard": False})
    records_seen = []
    handler = logging.Handler()
    handler.emit = records_seen.append
    logger = logging.getLogger("reglue.train")
    level = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    try:
        run_dir = Trainer(config).fit()
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)
    return run_dir, [r.getMessage() for r in records_seen]


@pytest.mark.slow
def test_short_demo_samples_are_class_conditional(short_demo):
    run_dir, log_lines = short_demo
    class_match = records(run_dir)[-1]
    assert set(class_match) == {"step", "eval/class_match", "eval/shape_match"} and class_match["step"] == SHORT_DEMO_STEPS
    assert class_match["eval/class_match"] >= CLASS_MATCH_THRESHOLD, class_match
    assert class_match["eval/shape_match"] >= SHAPE_MATCH_THRESHOLD, class_match
    assert log_lines[-2].startswith("class match: ") and f"({class_match['eval/class_match']:.0%})" in log_lines[-2]
    assert log_lines[-1].startswith("shape match: ") and f"({class_match['eval/shape_match']:.0%})" in log_lines[-1]
    for name in ("metrics.png", "samples-final.png", "autoencoder.safetensors", "config.json"):
        assert (run_dir / name).is_file(), name
    with Image.open(run_dir / "samples-final.png") as grid:  # 8 rows of 8 (64 px + 2 px padding) + captions
        assert grid.size == (8 * 66 + 2, 8 * (68 + 14))


@pytest.mark.slow
def test_reglue_plot_overlays_two_runs(short_demo, tmp_path, capsys):
    demo_dir, _ = short_demo
    repa = apply_overrides(get_preset("tiny"), {"train.out_dir": str(tmp_path), "train.name": "repa", "method.name": "repa",
                                                "train.max_steps": 4, "train.log_every": 2, "sample.steps": 2,
                                                "train.num_sample_images": 8, "train.tensorboard": False,
                                                "data.synthetic_size": 64})
    repa_dir = Trainer(repa).fit()
    out = tmp_path / "compare" / "plot.png"
    assert reglue_main(["plot", str(demo_dir), str(repa_dir / "metrics.jsonl"), "--out", str(out)]) == 0
    # the union of both runs' metrics: REGLUE's semantic and [CLS] losses, the demo's class and shape match
    assert capsys.readouterr().out.strip() == f"wrote {out}: 10 panels, runs tiny, repa"
    with Image.open(out) as image:
        assert image.size == (1260, 1190)  # 10 panels in 4 rows of 3
    assert reglue_main(["plot", str(tmp_path / "nothing-here")]) == 2
    assert "no metrics.jsonl there" in capsys.readouterr().err


@pytest.mark.slow
def test_demo_round_trip_generate_make_ref_evaluate(short_demo, tmp_path, capsys):
    """The rest of the workflow on the demo: `reglue generate` from the run (its patch
    autoencoder found in the run directory), a reference batch of the synthetic set, and
    `reglue evaluate`; with the random Inception network the output says it is a pipeline check."""
    run_dir, _ = short_demo
    samples, ref, results = tmp_path / "samples.npz", tmp_path / "ref.npz", tmp_path / "results.json"
    assert reglue_main(["generate", "--run", str(run_dir), "--out", str(samples), "--num", "8", "--batch-size", "8",
                        "--steps", "4"]) == 0
    small_set = tmp_path / "config.json"  # the demo's synthetic set, 16 images (statistics over all of them)
    small_set.write_text(apply_overrides(get_preset("tiny"), {"data.synthetic_size": "16"}).to_json())
    assert reglue_main(["evaluate", "--make-ref", "--data", "synthetic", "--config", str(small_set), "--num", "8",
                        "--out", str(ref), "--inception-weights", "random", "--workers", "0"]) == 0
    capsys.readouterr()
    assert reglue_main(["evaluate", "--ref", str(ref), "--samples", str(samples), "--metrics", "fid,pr",
                        "--inception-weights", "random", "--out", str(results)]) == 0
    out = capsys.readouterr().out
    assert "RANDOM" in out and "meaningless" in out
    scores = json.loads(results.read_text())
    assert scores["fid"] > 0 and 0 <= scores["precision"] <= 1 and 0 <= scores["recall"] <= 1
