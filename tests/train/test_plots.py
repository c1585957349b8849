"""Training-curve figures (matplotlib) and captioned sample grids (torchvision)."""

import json
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from reglue.train.plots import (
    METRICS_PLOT,
    dataset_class_names,
    metrics_figure,
    save_metrics_plot,
    save_sample_grid,
    smooth,
    write_run_plot,
)


def records(steps=range(10, 310, 10), scale=1.0, fid_every=100):
    rows = []
    for step in steps:
        rows.append({"step": step, "loss/total": scale * 3 / (1 + step / 100), "loss/latent": scale * 2 / (1 + step / 200),
                     "loss/align": -0.8 * step / (step + 50), "grad_norm": 1 + step / 100, "lr": 1e-4,
                     "img_per_s": 300.0 + step % 7, "skipped_steps": 0})
        if step % fid_every == 0:
            rows.append({"step": step, "eval/fid": 300.0 / (1 + step / 100)})
    return rows


def panel(fig, title):
    matches = [ax for ax in fig.axes if ax.get_visible() and ax.get_title() == title]
    assert len(matches) == 1, (title, [ax.get_title() for ax in fig.axes if ax.get_visible()])
    return matches[0]


def test_figure_has_one_panel_per_metric_with_raw_and_smoothed_lines():
    fig = metrics_figure({"run": records()})
    titles = [ax.get_title() for ax in fig.axes if ax.get_visible()]
    assert titles == ["total (loss)", "align (loss)", "latent (loss)", "gradient norm", "learning rate",
                      "throughput (images/s)", "FID (evaluation)"]
    assert panel(fig, "total (loss)").get_yscale() == "log", "positive losses on a log scale"
    assert panel(fig, "align (loss)").get_yscale() == "linear", "negative alignment loss on a linear scale"
    assert panel(fig, "learning rate").get_yscale() == "linear"
    latent = panel(fig, "latent (loss)")
    assert len(latent.get_lines()) == 2, "raw points and the smoothed line"
    np.testing.assert_array_equal(latent.get_lines()[0].get_xdata(), np.arange(10, 310, 10))
    fid = panel(fig, "FID (evaluation)")
    np.testing.assert_array_equal(fid.get_lines()[0].get_xdata(), [100, 200, 300])
    assert all(ax.get_xlabel() == "step" for ax in fig.axes if ax.get_visible())
    assert fig.legends == [], "no legend for one run"
    fig.draw_without_rendering()
    for ax in fig.axes[:6]:  # numbers a reader can use: at least two labelled y ticks in view, plain decimals
        low, high = ax.get_ylim()
        labels = [t.get_text() for t in ax.get_yticklabels(which="both") if t.get_text() and low <= t.get_position()[1] <= high]
        assert len(labels) >= 2 and not any("times" in t or "^" in t for t in labels), (ax.get_title(), labels)


def test_several_runs_overlay_in_the_same_panels_with_a_legend():
    fig = metrics_figure({"reglue": records(), "repa": records(scale=1.5, fid_every=150)})
    total = panel(fig, "total (loss)")
    assert len(total.get_lines()) == 4
    assert [t.get_text() for t in fig.legends[0].get_texts()] == ["reglue", "repa"]
    fid_steps = [list(line.get_xdata()) for line in panel(fig, "FID (evaluation)").get_lines()[::2]]
    assert fid_steps == [[100, 200, 300], [150, 300]]


def test_smoothing():
    assert np.array_equal(smooth(np.arange(10.0)), np.arange(10.0)), "too few points to smooth"
    noisy = 1 + 0.5 * np.random.default_rng(0).standard_normal(1000)
    smoothed = smooth(noisy)
    assert smoothed.std() < noisy.std() / 3 and abs(smoothed[-200:].mean() - 1) < 0.1
    positive = np.exp(noisy)
    np.testing.assert_allclose(smooth(positive, log_scale=True), np.exp(smooth(noisy)))


def test_run_plot_file_and_empty_or_damaged_metrics(tmp_path):
    assert write_run_plot(tmp_path) is None, "a checkpoint before the first log step"
    (tmp_path / "metrics.jsonl").write_text("")
    assert write_run_plot(tmp_path) is None and not (tmp_path / METRICS_PLOT).exists()
    lines = [json.dumps(r) for r in records()]
    (tmp_path / "metrics.jsonl").write_text("\n".join(lines) + '\n{"step": 310, "loss/tot')  # killed mid-write
    path = write_run_plot(tmp_path)
    assert path == tmp_path / METRICS_PLOT
    with Image.open(path) as image:
        assert image.size == (1260, 870) and image.mode == "RGBA"


def coloured_tiles(labels, size=16):
    """Tile i filled with grey level 20 * labels[i] + 10, so its class can be read back."""
    return torch.stack([torch.full((3, size, size), 20 * int(k) + 10, dtype=torch.uint8) for k in labels])


def test_sample_grid_rows_are_classes_with_captions(tmp_path):
    labels = torch.arange(12) % 4  # what sample_labels gives: cycling through 4 classes
    names = ["red circle", "orange square", "lime triangle", "green cross"]
    path = save_sample_grid(coloured_tiles(labels), tmp_path / "grid.png", labels, names)
    grid = np.asarray(Image.open(path))
    tile, pad, caption = 16, 2, 14
    row_height = pad + tile + pad + caption  # a make_grid row, then its caption strip
    assert grid.shape == (4 * row_height, 3 * (tile + pad) + pad, 3)
    for row in range(4):
        top = row * row_height + pad
        for col in range(3):
            left = pad + col * (tile + pad)
            assert (grid[top : top + tile, left : left + tile] == 20 * row + 10).all(), (row, col)
        strip = grid[top + tile + pad : top + tile + pad + caption]
        assert (strip < 128).any(), f"caption under row {row}"
        assert (grid[top + tile : top + tile + pad] == 255).all(), "white padding between tiles and caption"
    plain = np.asarray(Image.open(save_sample_grid(coloured_tiles(labels), tmp_path / "plain.png", labels)))
    assert plain.shape[:2] == (4 * (tile + pad) + pad, 3 * (tile + pad) + pad), "no captions without class names"
    assert (plain[pad : pad + tile, pad : pad + tile] == 10).all() and (plain[-pad - tile : -pad, pad : pad + tile] == 70).all()


def test_sample_grid_without_labels_is_about_square(tmp_path):
    grid = np.asarray(Image.open(save_sample_grid(coloured_tiles(range(10)), tmp_path / "g.png")))
    assert grid.shape[:2] == (3 * 18 + 2, 4 * 18 + 2)


def test_dataset_class_names():
    class Prepared:
        meta = {"classes": {"n02": 1, "n01": 0}}

    assert dataset_class_names(Prepared()) == ["n01", "n02"]
    assert dataset_class_names(object()) is None


def test_save_metrics_plot_refuses_empty_metrics(tmp_path):
    with pytest.raises(ValueError, match="no metrics to plot"):
        save_metrics_plot({"run": [{"step": 1, "note": "text"}]}, tmp_path / "x.png")


def test_run_plot_without_matplotlib_warns_and_training_goes_on(tmp_path, monkeypatch, caplog):
    (tmp_path / "metrics.jsonl").write_text(json.dumps(records()[0]) + "\n")
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)  # import fails
    assert write_run_plot(tmp_path) is None
    assert "pip install matplotlib" in caplog.text and not (tmp_path / METRICS_PLOT).exists()
